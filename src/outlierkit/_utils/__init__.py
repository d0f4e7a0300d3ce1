"""Small shared helpers: seeding, devices/dtypes, hook ownership, atomic writes, progress and logging.

Names resolve lazily (PEP 562), so importing ``outlierkit`` (e.g. for ``outlierkit graph --help``) does not
import torch until a helper that needs it is used.
"""

from __future__ import annotations

from outlierkit._utils.lazy import lazy_exports

# Imported eagerly (rich only, no torch): the submodule is named like the function ``log``, and binding
# the function after the submodule keeps ``outlierkit._utils.log`` the function for every importer.
from outlierkit._utils.log import get_console as get_console
from outlierkit._utils.log import log as log
from outlierkit._utils.log import progress as progress
from outlierkit._utils.log import stage as stage
from outlierkit._utils.log import stdout_console as stdout_console
from outlierkit._utils.log import warning as warning

_WHERE = {
    "resolve_device": "outlierkit._utils.device", "resolve_dtype": "outlierkit._utils.device",
    "HookSet": "outlierkit._utils.hooks", "atomic_write_bytes": "outlierkit._utils.io",
    "atomic_write_text": "outlierkit._utils.io", "safe_torch_load": "outlierkit._utils.io",
    "staged_output": "outlierkit._utils.io", "seed_everything": "outlierkit._utils.seed",
    "positive_int": "outlierkit._utils.args", "nonneg_int": "outlierkit._utils.args",
    "finite_float": "outlierkit._utils.args", "positive_float": "outlierkit._utils.args",
}

__all__ = sorted([*_WHERE, "get_console", "log", "progress", "stage", "stdout_console", "warning"])


__getattr__ = lazy_exports(__name__, _WHERE)
