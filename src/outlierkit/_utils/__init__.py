"""Small shared helpers: seeding, devices/dtypes, hook ownership, atomic writes, progress and logging.

Names resolve lazily (PEP 562), so importing ``outlierkit`` (e.g. for ``outlierkit graph --help``) does not
import torch until a helper that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

# Imported eagerly (rich only, no torch): the submodule is named like the function ``log``, and binding
# the function after the submodule keeps ``outlierkit._utils.log`` the function for every importer.
from outlierkit._utils.log import get_console as get_console
from outlierkit._utils.log import log as log
from outlierkit._utils.log import progress as progress

_WHERE = {
    "resolve_device": "device", "resolve_dtype": "device", "HookSet": "hooks",
    "atomic_write_bytes": "io", "atomic_write_text": "io", "safe_torch_load": "io", "staged_output": "io",
    "seed_everything": "seed",
}

__all__ = sorted([*_WHERE, "get_console", "log", "progress"])


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"outlierkit._utils.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'outlierkit._utils' has no attribute {name!r}")
