"""Small shared helpers: seeding, devices/dtypes, hook ownership, atomic writes, progress and logging.

Names resolve lazily (PEP 562), so importing ``outlierkit`` (e.g. for ``outlierkit graph --help``) does not
import torch until a helper that needs it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "resolve_device": "device", "resolve_dtype": "device", "HookSet": "hooks",
    "atomic_write_bytes": "io", "atomic_write_text": "io", "safe_torch_load": "io", "staged_output": "io",
    "get_console": "log", "log": "log", "progress": "log", "seed_everything": "seed",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"outlierkit._utils.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'outlierkit._utils' has no attribute {name!r}")
