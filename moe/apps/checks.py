"""Argument checks of the `moe` CLI and the apps' configs: one function per kind of argument.

A config field names its kind in its dataclass metadata (`field(default=..., metadata=kind("..."))`);
the config checks its fields with :func:`check_fields` (a ValueError naming the field) and the CLI
builds each option's argparse `type=` with :func:`arg_type` from the same kind (argparse then
prints "argument --name: ..." and exits 2). So a bad value gets the same rule and a one-line
error whether it comes from Python or from the command line.

Kinds: positive_int (>= 1), nonnegative_int (>= 0), positive_float (finite, > 0), probability
(finite, in (0, 1]), out_dir (a folder, or a path where one can be made: no part of it is a file),
mor_eval_routing (topk or threshold: routers.depth's eval routings), mor_routing (expert or token:
MoR's expert-choice or token-choice depth routing).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _out_dir_problem(v) -> str | None:
    p = Path(v)
    for q in (p, *p.parents):  # the nearest existing part must be a folder
        if q.exists():
            return None if q.is_dir() else f"{str(q)!r} is a file, not a folder"
    return None


# kind -> (what a good value is, parse a command-line string, the problem with a parsed value or None)
KINDS = {
    "positive_int": ("an integer >= 1", int, lambda v: None if _is_int(v) and v >= 1 else "bad"),
    "nonnegative_int": ("an integer >= 0", int, lambda v: None if _is_int(v) and v >= 0 else "bad"),
    "positive_float": ("a finite number > 0", float,
                       lambda v: None if _is_real(v) and math.isfinite(v) and v > 0 else "bad"),
    "probability": ("a number in (0, 1]", float,
                    lambda v: None if _is_real(v) and math.isfinite(v) and 0 < v <= 1 else "bad"),
    "out_dir": ("a folder (or a path where one can be made)", str, _out_dir_problem),
    "mor_eval_routing": ("one of topk, threshold", str,
                         lambda v: None if v in ("topk", "threshold") else "bad"),
    "mor_routing": ("one of expert, token", str, lambda v: None if v in ("expert", "token") else "bad"),
}


def kind(name: str) -> dict:
    """Dataclass field metadata naming the field's kind: `field(default=1, metadata=kind("positive_int"))`."""
    if name not in KINDS:
        raise ValueError(f"unknown argument kind {name!r}; one of {sorted(KINDS)}")
    return {"kind": name}


def check(name: str, value, kind_name: str):
    """value if it is of kind_name, else ValueError naming `name`; None passes (optional fields)."""
    if value is None:
        return value
    what, _, problem = KINDS[kind_name]
    p = problem(value)
    if p is not None:
        raise ValueError(f"{name}={value!r} must be {what}" + ("" if p == "bad" else f": {p}"))
    return value


def check_fields(obj) -> None:
    """Check every dataclass field of obj that names a kind in its metadata."""
    for f in fields(obj):
        if "kind" in f.metadata:
            check(f.name, getattr(obj, f.name), f.metadata["kind"])


def field_kind(cls, name: str) -> str:
    """The kind a dataclass field names (for the CLI option of that field)."""
    return next(f.metadata["kind"] for f in fields(cls) if f.name == name)


def arg_type(kind_name: str):
    """argparse `type=` for kind_name: parses the string, checks it, says what a good value is."""
    what, parse, problem = KINDS[kind_name]

    def convert(s: str):
        try:
            v = parse(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}") from None
        p = problem(v)
        if p is not None:
            raise argparse.ArgumentTypeError(f"{s!r} is not {what}" + ("" if p == "bad" else f": {p}"))
        return v

    convert.__name__ = kind_name  # argparse names the type in some messages
    return convert
