"""Small shared helpers: seeding, devices/dtypes, hook ownership, atomic writes, progress and logging."""

from __future__ import annotations

from outlierkit._utils.device import resolve_device, resolve_dtype
from outlierkit._utils.hooks import HookSet
from outlierkit._utils.io import atomic_write_bytes, atomic_write_text, safe_torch_load, staged_output
from outlierkit._utils.log import get_console, log, progress
from outlierkit._utils.seed import seed_everything

__all__ = [
    "HookSet",
    "atomic_write_bytes",
    "atomic_write_text",
    "get_console",
    "log",
    "progress",
    "resolve_device",
    "resolve_dtype",
    "safe_torch_load",
    "seed_everything",
    "staged_output",
]
