"""Logging and progress on stderr through rich; quiet when ``OUTLIERKIT_QUIET=1``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
_console: Console | None = None


def get_console() -> Console:
    global _console
    if _console is None or _console.file is not sys.stderr:
        _console = Console(stderr=True, highlight=False)
    return _console


def _quiet() -> bool:
    return os.environ.get("OUTLIERKIT_QUIET", "") not in ("", "0")


def log(message: str) -> None:
    """One progress line on stderr (a log line per stage of long work)."""
    if not _quiet():
        get_console().print(f"[dim]outlierkit:[/dim] {message}")


def progress(items: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
    """Iterate with a progress bar on a terminal; elsewhere log roughly ten lines over the run."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    console = get_console()
    if _quiet():
        yield from items
        return
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    every = max(1, (total or 10) // 10)
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0 or i == total:
            log(f"{description} {i}/{total if total is not None else '?'}")
