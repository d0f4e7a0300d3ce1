"""Block schedules for semi-autoregressive decoding: a block size plus a remasking rule, registered by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from outlierkit.diffusion.sampler import REMASKING, check_schedule
from outlierkit.errors import ConfigError
from outlierkit.registry import Registry


@dataclass(frozen=True)
class Schedule:
    """One HEX "expert": decode with blocks of ``block_length`` and the given remasking rule.

    Args:
        block_length: semi-AR block size; the generation length means one block.
        remasking: score rule from ``REMASKING`` (default: ``"low_confidence"``).
        name: display name (default: ``b{block_length}`` plus ``:{remasking}`` when not low-confidence).
    """

    block_length: int
    remasking: str = "low_confidence"
    name: str = ""

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        suffix = "" if self.remasking == "low_confidence" else f":{self.remasking}"
        return f"b{self.block_length}{suffix}"


#: Named schedules: ``factory(gen_length) -> Schedule``. Block-size specs ("8", "b8", "8:margin") need no entry.
SCHEDULES: Registry[Callable[[int], Schedule]] = Registry("schedule")


@SCHEDULES.register("full")
def _full(gen_length: int) -> Schedule:
    """The whole answer as one block, low-confidence remasking (pure diffusion order)."""
    return Schedule(gen_length, "low_confidence", "full")


@SCHEDULES.register("topk_margin")
def _topk_margin(gen_length: int) -> Schedule:
    """Top-K margin decoding over the whole answer (Kim et al. 2502.06768), HEX's main baseline."""
    return Schedule(gen_length, "margin", "topk_margin")


@SCHEDULES.register("random")
def _random(gen_length: int) -> Schedule:
    """Random unmasking order over the whole answer (HEX's "Random" column)."""
    return Schedule(gen_length, "random", "random")


def parse_schedule(spec: str, gen_length: int, steps: int | None = None) -> Schedule:
    """``"8"``, ``"b8"``, ``"8:margin"`` or a registered name -> :class:`Schedule` (validated when steps given)."""
    text = spec.strip()
    if not text:
        raise ConfigError("empty schedule name")
    if text in SCHEDULES:
        sched = SCHEDULES.get(text)(gen_length)
    else:
        size, _, rule = text.partition(":")
        size = size[1:] if size.startswith("b") else size
        if not size.isdigit():
            SCHEDULES.get(text)  # raises: unknown name, listing the valid ones
        rule = rule or "low_confidence"
        REMASKING.get(rule)
        sched = Schedule(int(size), rule)
    if steps is not None:
        check_schedule(gen_length, steps, sched.block_length)
    return sched


def parse_schedules(specs: str | Sequence[str], gen_length: int, steps: int | None = None) -> list[Schedule]:
    """A comma-separated string or a list of specs -> schedules; an empty set is an error."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if str(s).strip()]
    if not items:
        raise ConfigError("the schedule set is empty; give at least one block size or schedule name")
    out = [parse_schedule(str(s), gen_length, steps) for s in items]
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"duplicate schedules in {labels}")
    return out
