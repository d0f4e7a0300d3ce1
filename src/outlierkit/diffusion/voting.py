"""Answer extraction and vote rules for HEX, both registered by name."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from outlierkit.registry import Registry

Extractor = Callable[[str], "str | None"]
#: Answer extractors: ``fn(text) -> normalised answer`` or None when the text has no answer (abstains).
EXTRACTORS: Registry[Extractor] = Registry("answer extractor")

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_answer(text: str) -> str | None:
    """Strip LaTeX dressing, ``$``, spaces and thousands commas; ``"3.50"`` -> ``"3.5"``, ``"4.0"`` -> ``"4"``."""
    s = text.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\[!,;: ]", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac")
    s = " ".join(s.split()).rstrip(".").strip()
    compact = s.replace(",", "").replace(" ", "")
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", compact):
        if "." in compact:
            compact = compact.rstrip("0").rstrip(".") or "0"
        if compact in ("-0", ""):
            compact = "0"
        return compact
    return s or None


@EXTRACTORS.register("gsm8k")
def extract_gsm8k(text: str) -> str | None:
    """The number after the last ``####``; without a marker, the last number in the text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        return normalize_answer(m.group(0)) if m else None
    nums = _NUMBER.findall(text)
    return normalize_answer(nums[-1]) if nums else None


@EXTRACTORS.register("boxed")
def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces allowed), normalised."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth, j = 0, i
    while j < len(text):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return normalize_answer(text[i + 1:j])
        j += 1
    return None  # unbalanced: the box was never closed


_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-E])\)?(?![A-Za-z])")


@EXTRACTORS.register("mc")
def extract_choice(text: str) -> str | None:
    """The first standalone option letter A-E (``"(B)"``, ``"B."``, ``"answer: C"``); after ``####`` if present."""
    part = text.rsplit("####", 1)[1] if "####" in text else text
    m = _LETTER.search(part)
    return m.group(1) if m else None


@EXTRACTORS.register("after_hash")
def extract_after_hash(text: str) -> str | None:
    """The stripped text after the last ``####`` (exact-match tasks); None if no marker or nothing after it."""
    if "####" not in text:
        return None
    ans = text.rsplit("####", 1)[1].strip()
    return ans or None


@dataclass(frozen=True)
class Ballot:
    """One path's vote: its answer (None abstains), its block length, and its order among the paths."""

    answer: str | None
    block_length: int
    order: int = 0


@dataclass
class VoteResult:
    """The voted answer (None when every path abstained), the counts, and whether a tie was broken."""

    answer: str | None
    counts: dict[str, int] = field(default_factory=dict)
    tie: bool = False
    votes: int = 0


VoteRule = Callable[[Sequence[Ballot]], VoteResult]
#: Vote rules: ``fn(ballots) -> VoteResult``.
VOTES: Registry[VoteRule] = Registry("vote rule")


def _majority(ballots: Sequence[Ballot], tie_key: Callable[[Ballot], tuple[int, int]]) -> VoteResult:
    live = [(b.answer, b) for b in ballots if b.answer is not None]
    if not live:
        return VoteResult(None, {}, False, 0)
    counts: Counter[str] = Counter(a for a, _ in live)
    top = max(counts.values())
    tied = {a for a, c in counts.items() if c == top}
    if len(tied) == 1:
        return VoteResult(next(iter(tied)), dict(counts), False, len(live))
    best = min((b for a, b in live if a in tied), key=tie_key)
    return VoteResult(best.answer, dict(counts), True, len(live))


@VOTES.register("majority")
def majority_vote(ballots: Sequence[Ballot]) -> VoteResult:
    """Majority over answered paths; a tie goes to the answer of the smallest block (as HEX reports),
    then to the earliest path. Paths without an answer do not vote."""
    return _majority(ballots, lambda b: (b.block_length, b.order))


@VOTES.register("majority_largest_block")
def majority_vote_largest(ballots: Sequence[Ballot]) -> VoteResult:
    """Majority as above, but a tie goes to the largest block (an ablation of HEX's tie rule)."""
    return _majority(ballots, lambda b: (-b.block_length, b.order))
