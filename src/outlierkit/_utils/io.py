"""Atomic writes, staged output directories (nothing half-written) and safe loading."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from outlierkit.errors import ConfigError, DataError, OutputExistsError

if TYPE_CHECKING:
    import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def partial_dir(out: str | Path) -> Path:
    """Where a run writes before it is finished (and where its checkpoints live for ``--resume``)."""
    p = Path(out)
    return p.with_name(p.name + ".partial")


def check_output(out: str | Path, *, force: bool = False) -> None:
    """Fail early, before any work, when ``out`` exists and may not be replaced, or cannot be created."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise OutputExistsError(f"output path {p} exists and is not a directory; choose another --out")
    if p.exists() and not force:
        raise OutputExistsError(f"output directory {p} already exists; pass --force to replace it")
    if p.exists():
        _check_replaceable(p)
    _check_creatable(p)


def _check_replaceable(p: Path) -> None:
    """``--force`` replaces only an earlier run's output (it holds report.json) or an empty directory, never
    the working directory or one above it: a typo in ``--out`` must not delete a user's folder."""
    here, target = Path.cwd().resolve(), p.resolve()
    if target == here or target in here.parents:
        raise OutputExistsError(f"--out {p} is the working directory or above it; refusing to replace it")
    if any(target.iterdir()) and not (target / "report.json").is_file():
        raise OutputExistsError(f"{p} is not an outlierkit output (no report.json) and not empty; --force "
                                "replaces only earlier outputs: choose another --out")


def _check_creatable(p: Path) -> None:
    """``--out`` under a regular file or an unwritable directory is a one-line error, not a traceback."""
    parent = p.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"cannot create output directory {p}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create output directory {p}: {parent} is not writable")


def _mkdir(p: Path) -> None:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # read-only file system, permissions, a file in the way
        raise ConfigError(f"cannot create output directory {p}: {e.strerror or e}") from None


def _resumable(stage: Path) -> bool:
    """Whether a failed run left anything in its staging directory worth resuming from."""
    return any(f.is_file() for f in stage.rglob("*"))


@contextlib.contextmanager
def staged_output(
    out: str | Path, *, force: bool = False, resume: bool = False, keep_on_error: bool = False
) -> Iterator[Path]:
    """Yield a staging directory ``OUT.partial``; on success it replaces ``OUT`` in one rename.

    On error the staging directory is removed, unless ``keep_on_error`` and it holds files (checkpoints
    to ``--resume`` from); an empty ``OUT.partial`` is never left behind, and ``OUT`` itself is never
    left half-written.
    """
    final = Path(out)
    check_output(final, force=force)
    stage = partial_dir(final)
    if stage.exists() and not stage.is_dir():
        raise OutputExistsError(f"{stage} exists and is not a directory; remove it or choose another --out")
    if stage.exists() and not resume:
        shutil.rmtree(stage)
    created = [d for d in (stage, *stage.absolute().parents) if not d.exists()]  # to undo on error
    _mkdir(stage)
    try:
        yield stage
    except BaseException:
        if not (keep_on_error and _resumable(stage)):
            shutil.rmtree(stage, ignore_errors=True)
            for d in created[1:]:  # parent folders this run created, innermost first, if still empty
                with contextlib.suppress(OSError):
                    d.rmdir()
        raise
    old = None
    if final.exists():
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p} does not exist")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors, truncated files, disallowed globals
        raise DataError(f"cannot load {p} safely ({type(e).__name__}); the file is corrupt or not a "
                        "plain tensor checkpoint") from None
