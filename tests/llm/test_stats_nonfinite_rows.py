"""SiteStats updates with non-finite rows against a naive reference over the finite rows only."""

from __future__ import annotations

import math

import pytest
import torch

from outlierkit.llm.stats import SiteStats, TokenInfo


def _info(n: int) -> TokenInfo:
    return TokenInfo(sample=torch.arange(n) // 4, pos=torch.arange(n) % 4, token=torch.arange(n) + 100)


@pytest.mark.parametrize("bad_rows", [[0], [0, 3], [2, 5], [5]])
def test_nonfinite_rows_change_no_extreme_sum_or_location(bad_rows: list[int]) -> None:
    # all values negative in channel 0 and positive in channel 1: a row zeroed (instead of excluded) would
    # become the max of channel 0 / min of channel 1; a bad row ahead of the first finite one ties with it
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    x[:, 0] = -x[:, 0].abs() - 1
    x[:, 1] = x[:, 1].abs() + 1
    for i, r in enumerate(bad_rows):
        x[r, (2 * i) % 5] = (math.nan, math.inf, -math.inf)[i % 3]
    st = SiteStats(channels=5)
    st.update(x, _info(6))
    keep = [r for r in range(6) if r not in bad_rows]
    ref = x[keep]
    assert st.tokens == len(keep) and st.nonfinite_tokens == len(bad_rows)
    assert st.vmax == ref.max().item() and st.vmin == ref.min().item()
    assert torch.equal(st.ch_max, ref.amax(0)) and torch.equal(st.ch_min, ref.amin(0))
    r, c = divmod(int(x.masked_fill(~torch.isfinite(x).all(1, keepdim=True), -math.inf).argmax()), 5)
    assert (st.loc_max.sample * 4 + st.loc_max.pos, st.loc_max.channel) == (r, c)
    assert st.s1 == pytest.approx(ref.sum().item()) and st.s2 == pytest.approx((ref**2).sum().item())
    assert st.hist.sum() == ref.numel()


def test_a_row_that_ties_with_the_first_finite_row_is_located_at_the_finite_row() -> None:
    x = torch.tensor([[math.nan, 0.0], [5.0, -5.0], [1.0, 1.0]])
    st = SiteStats(channels=2)
    st.update(x, _info(3))
    assert (st.vmax, st.vmin) == (5.0, -5.0)
    assert (st.loc_max.pos, st.loc_max.channel, st.loc_min.pos, st.loc_min.channel) == (1, 0, 1, 1)


def test_a_batch_of_only_nonfinite_rows_adds_no_extreme() -> None:
    st = SiteStats(channels=3)
    st.update(torch.full((4, 3), math.inf), _info(4))
    assert st.tokens == 0 and st.nonfinite_tokens == 4
    assert st.vmax == -math.inf and st.vmin == math.inf
    assert torch.equal(st.ch_max, torch.full((3,), -math.inf)) and st.hist.sum() == 0
