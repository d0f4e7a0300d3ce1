"""Logging, warnings and progress on stderr through rich; progress is quiet when ``OUTLIERKIT_QUIET=1``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")
_console: Console | None = None
_warned: set[str] = set()
_columns_set_here = False

# Width of output that is not a terminal (a pipe, a file, a CI log): rich would squeeze tables to 80
# columns there and cut cells to "rec…"; tables are only as wide as their content, so a large width
# costs nothing. A user's COLUMNS still wins.
PIPE_WIDTH = 1000


def is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def console_width(stream: IO[str]) -> int | None:
    """The width for a console on ``stream``: the user's COLUMNS, else the terminal's, else :data:`PIPE_WIDTH`."""
    columns = os.environ.get("COLUMNS", "")
    tty = is_tty(stream)
    if columns.isdigit() and int(columns) > 0 and not (_columns_set_here and tty):
        return int(columns)
    if tty:
        try:
            return os.get_terminal_size(stream.fileno()).columns or None
        except (OSError, ValueError, AttributeError):
            return None
    return PIPE_WIDTH


def get_console() -> Console:
    """The stderr console for progress, log lines and warnings."""
    global _console
    if _console is None or _console.file is not sys.stderr:
        _console = Console(stderr=True, highlight=False, width=console_width(sys.stderr))
    return _console


def stdout_console() -> Console:
    """A console for a command's results on stdout; not squeezed to 80 columns when stdout is a pipe."""
    return Console(width=console_width(sys.stdout))


@contextlib.contextmanager
def wide_pipes() -> Iterator[None]:
    """While active, consoles that rich builds on a non-terminal stdout are :data:`PIPE_WIDTH` wide.

    Commands print their tables through ``rich.console.Console()``, which reads ``COLUMNS`` when it
    renders; setting it (only when stdout is not a terminal and the user has not set it) fixes the width
    for every command at once. Consoles on a terminal (e.g. stderr while stdout is piped) keep the
    terminal's width.
    """
    global _columns_set_here
    set_here = "COLUMNS" not in os.environ and not is_tty(sys.stdout)
    if set_here:
        os.environ["COLUMNS"] = str(PIPE_WIDTH)
        _columns_set_here = True
    try:
        yield
    finally:
        if set_here:
            os.environ.pop("COLUMNS", None)
            _columns_set_here = False


def _quiet() -> bool:
    return os.environ.get("OUTLIERKIT_QUIET", "") not in ("", "0")


def log(message: str) -> None:
    """One progress line on stderr (a log line per stage of long work)."""
    if not _quiet():
        get_console().print(f"[dim]outlierkit:[/dim] {escape(message)}", soft_wrap=True)


@contextlib.contextmanager
def stage(description: str) -> Iterator[None]:
    """Log a line when a long step without an item loop starts and another with its time when it ends.

    For steps that ``progress`` cannot count (loading a model, fitting, quantizing), so that no command
    is silent for minutes; on failure nothing is claimed done.
    """
    import time

    log(f"{description} ...")
    t0 = time.perf_counter()
    yield
    log(f"{description}: done in {time.perf_counter() - t0:.1f} s")


def warning(message: str) -> None:
    """A warning on stderr, once per message and run; shown also when ``OUTLIERKIT_QUIET`` hides progress."""
    text = " ".join(str(message).split())
    if text in _warned:
        return
    _warned.add(text)
    get_console().print(f"[bold yellow]outlierkit: warning:[/bold yellow] {escape(text)}", soft_wrap=True)


def reset_warnings() -> None:
    """Forget which warnings were shown (the CLI calls it at the start of every command)."""
    _warned.clear()


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
