"""The one way an op of ``torch.ops.moe`` is registered: :func:`define_op`.

Each op has a schema, a fallback kernel, a fake (meta) kernel and, when differentiable, an
autograd formula. The fallback is the op's pure-PyTorch twin (moe/ops/twins.py) or a composition
of other moe ops, registered under ``CompositeExplicitAutograd``: the dispatcher runs it on every
device for which no compiled kernel is registered, and the C++ CPU and CUDA kernels of
``moe._C`` (csrc/registration.cpp, csrc/cuda/*.cu) override it for their device. So
``torch.ops.moe.<op>`` always exists once ``moe.ops`` is imported, and no Python code asks which
kernel is present. The autograd formula sits above both (the Autograd key), so kernel and twin
share it; the fake kernel serves meta / fake tensors (``torch.compile``, ``opcheck``).

The C++ library defines the same schemas for its C++ users; when it is loaded, define_op checks
that the two agree instead of defining the op again.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

__all__ = ["define_op", "compiled_kernels", "OPS"]

_LIB = torch.library.Library("moe", "FRAGMENT")  # kept alive: dropping it would undo the registrations
OPS: dict = {}  # name -> schema, in definition order


def define_op(name: str, schema: str, *, fallback: Callable, fake: Callable,
              check: Optional[Callable] = None, backward: Optional[Callable] = None,
              setup_context: Optional[Callable] = None):
    """Registers ``moe::<name><schema>`` with its fallback, fake and (optional) autograd formula
    and returns the op's default overload (``torch.ops.moe.<name>.default``). ``check`` (the op's
    metadata checks, moe/ops/checks.py: those of its compiled kernels) runs before the fake kernel
    and the fallback, so meta / fake tensors and the twins reject what the kernels reject."""
    qualname = f"moe::{name}"
    if check is not None:
        fallback, fake = _checked(check, fallback), _checked(check, fake)
    wanted = torch._C.parse_schema(qualname + schema)
    if torch._C._dispatch_has_kernel(qualname) or _is_defined(qualname):  # defined by moe._C
        have = getattr(torch.ops.moe, name).default._schema
        if str(have) != str(wanted):
            raise RuntimeError(f"moe.ops: the compiled moe._C defines {have}, moe/ops/defs.py {wanted}; "
                               "rebuild the extension (pip install -e .) or fix one of the two")
    else:
        _LIB.define(name + schema)
    _LIB.impl(name, fallback, "CompositeExplicitAutograd")
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    OPS[name] = schema
    return getattr(torch.ops.moe, name).default


def _checked(check: Callable, kernel: Callable) -> Callable:
    @functools.wraps(kernel)
    def checked(*args, **kwargs):
        check(*args, **kwargs)
        return kernel(*args, **kwargs)
    return checked


def _is_defined(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def compiled_kernels(name: str) -> tuple:
    """The dispatch keys ("CPU", "CUDA") with a compiled kernel for ``moe::<name>`` (for
    ``moe.ops.build_info`` and the tests; the library itself never asks)."""
    return tuple(key for key in ("CPU", "CUDA")
                 if torch._C._dispatch_has_kernel_for_dispatch_key(f"moe::{name}", key))
