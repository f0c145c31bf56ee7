"""Deprecated location of the pure-PyTorch twins: use ``moe.ops.twins``."""

import warnings

from moe.ops.twins import *  # noqa: F401,F403
from moe.ops.twins import __all__  # noqa: F401

warnings.warn("moe.ops_torch moved to moe.ops.twins", DeprecationWarning, stacklevel=2)
