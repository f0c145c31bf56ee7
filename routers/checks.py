"""The argument checks every router constructor shares: one helper per kind of argument.

- :func:`check_int`: a count or index (hidden_size, num_experts, top_k, groups, max_experts,
  router_dim, num_layers): an integer in [minimum, maximum]. Floats (2.0), bools (True is not
  1 expert) and strings are refused; numpy integers are accepted and returned as int.
- :func:`check_number`: a real setting (capacity factors, scaling factors, thresholds,
  jitter, init std, alpha): a finite real number within the given bounds. bool, NaN, inf
  and strings are refused; the value is returned as float.
- :func:`check_coefficient`: a loss coefficient or step size: a finite number >= 0.

Each raises ValueError with a message that names the argument and shows the value it got.
Host-side Python checks only: they run once, in ``__init__``, never in forward.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

__all__ = ["check_int", "check_number", "check_coefficient"]

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def check_int(name: str, value, *, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """``value`` as an int in [minimum, maximum] (maximum None: no upper bound), else ValueError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (
            minimum <= value and (maximum is None or value <= maximum)):
        where = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an int {where}, got {value!r}")
    return int(value)


def check_number(name: str, value, *, gt: Optional[float] = None, ge: Optional[float] = None,
                 lt: Optional[float] = None, le: Optional[float] = None) -> float:
    """``value`` as a finite float with value > gt, >= ge, < lt, <= le (the bounds given), else
    ValueError naming ``name``."""
    bounds = [(op, b) for op, b in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if b is not None]
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and all(_OPS[op](value, b) for op, b in bounds))
    if not ok:
        where = " and ".join(f"{op} {b}" for op, b in bounds)
        raise ValueError(f"{name} must be a finite number{' ' + where if where else ''}, got {value!r}")
    return float(value)


def check_coefficient(name: str, value) -> float:
    """A loss coefficient or step size: a finite number >= 0 (0 turns the term off)."""
    return check_number(name, value, ge=0.0)
