"""Answer extractors, vote rules and schedule parsing; a contract test over every registry entry."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outlierkit.diffusion.schedules import SCHEDULES, parse_schedule, parse_schedules
from outlierkit.diffusion.voting import EXTRACTORS, VOTES, Ballot, VoteResult, majority_vote, normalize_answer
from outlierkit.errors import ConfigError, UnknownNameError


@pytest.mark.parametrize("text,expected", [
    ("She pays 3 + 4 = 7 dollars.\n#### 1,234", "1234"),
    ("#### $12.50", "12.5"),
    ("#### 4.0", "4"),
    ("no marker, numbers 3 then 18 apples", "18"),
    ("#### -7", "-7"),
    ("#### nothing here", None),
    ("no numbers at all", None),
])
def test_gsm8k_extractor(text, expected):
    assert EXTRACTORS.get("gsm8k")(text) == expected


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}} and finally \boxed{42}", "42"),
    (r"\boxed{\frac{a}{b+{c}}}", r"\frac{a}{b+{c}}"),
    (r"\boxed{1,000}", "1000"),
    (r"\boxed{3", None),
    ("no box", None),
])
def test_boxed_extractor(text, expected):
    assert EXTRACTORS.get("boxed")(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is (B).", "B"),
    ("C. because", "C"),
    ("After thinking... Answer: D", "D"),
    ("Because of reasons #### A", "A"),
    ("none of these", None),
])
def test_choice_extractor(text, expected):
    assert EXTRACTORS.get("mc")(text) == expected


def test_after_hash_and_normalize():
    ex = EXTRACTORS.get("after_hash")
    assert ex("0110####0") == "0" and ex("0110####") is None and ex("0110") is None
    assert normalize_answer(r"\$1,000.00") == "1000" and normalize_answer(r"\text{5} ") == "5"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_every_extractor_returns_str_or_none_on_any_text(text):
    for name, fn in EXTRACTORS.items():
        out = fn(text)
        assert out is None or (isinstance(out, str) and out), name


def test_majority_vote_tie_goes_to_smallest_block_and_none_abstains():
    b = [Ballot("5", 32, 0), Ballot("7", 8, 1), Ballot(None, 4, 2), Ballot(None, 2, 3)]
    r = majority_vote(b)
    assert r.answer == "7" and r.tie and r.votes == 2 and r.counts == {"5": 1, "7": 1}
    r2 = majority_vote([Ballot("5", 32, 0), Ballot("5", 64, 1), Ballot("7", 8, 2)])
    assert r2.answer == "5" and not r2.tie
    # same block: the earlier path breaks the tie
    assert majority_vote([Ballot("9", 8, 0), Ballot("1", 8, 1)]).answer == "9"
    assert majority_vote([Ballot(None, 8, 0)]) == VoteResult(None, {}, False, 0)
    assert VOTES.get("majority_largest_block")(b).answer == "5"


@pytest.mark.parametrize("name", VOTES.names())
def test_vote_rule_contract(name):
    rule = VOTES.get(name)
    ballots = [Ballot("a", 8, 0), Ballot("b", 16, 1), Ballot("a", 32, 2), Ballot(None, 2, 3)]
    r = rule(ballots)
    assert isinstance(r, VoteResult) and r.answer == "a" and r.votes == 3
    assert rule([]).answer is None
    tie = rule([Ballot("x", 8, 0), Ballot("y", 16, 1)])
    assert tie.tie and tie.answer in ("x", "y")


def test_schedule_parsing():
    assert parse_schedule("8", 32).label == "b8"
    assert parse_schedule("b16:margin", 32).label == "b16:margin"
    s = parse_schedule("topk_margin", 32)
    assert (s.block_length, s.remasking, s.label) == (32, "margin", "topk_margin")
    assert [x.block_length for x in parse_schedules("2,4, 8", 16, steps=8)] == [2, 4, 8]
    with pytest.raises(ConfigError, match="empty"):
        parse_schedules("", 16)
    with pytest.raises(ConfigError, match="empty"):
        parse_schedules([], 16)
    with pytest.raises(UnknownNameError, match="valid names"):
        parse_schedule("bogus", 16)
    with pytest.raises(ConfigError, match="does not divide"):
        parse_schedule("5", 16, steps=8)
    with pytest.raises(ConfigError, match="duplicate"):
        parse_schedules("8,b8", 16)


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_named_schedule_contract(name):
    s = SCHEDULES.get(name)(24)
    assert s.block_length == 24 and s.label == name
    assert parse_schedule(name, 24, steps=12) == s
