"""What a profile reports: unusable results flagged, all-NaN sites in the sites table, the INT8 check
skipped (not failed) on too few samples, and massive-token counts defined so that they add up."""

from __future__ import annotations

import json

import pytest
import torch

from outlierkit._utils.hooks import first_tensor
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.models import get_attr, resolve
from outlierkit.llm.profile import PER_TOKEN_KINDS, ProfileOptions, profile_model
from outlierkit.llm.profile_report import build_profile_report, site_rows, summary_row


def _poisoned_profile(corpus):
    model = tiny_model("llama")
    mm = resolve(model)

    def poison(m, a, o):
        first_tensor(o)[:, 3, 7] = float("nan")  # every sample: the NaN then spreads to all later tokens
        return o

    h = get_attr(model, mm.layers[0]).register_forward_hook(poison)
    try:
        return profile_model(model, mm, corpus.subset(range(2)), ProfileOptions(batch_size=2, calib_fraction=0.0))
    finally:
        h.remove()


def test_nan_forward_is_flagged_unusable_and_all_nan_sites_are_listed(corpus, tmp_path, capsys):
    # regression: NaN in the forward gave exit 0 with a normal-looking table, warnings only in report.md,
    # and sites that were all-NaN were missing from the sites table
    prof = _poisoned_profile(corpus)
    assert prof.status == "unusable" and prof.unusable and prof.problems()
    assert "NaN/Inf in the forward" in capsys.readouterr().err  # on the console, not only in report.md
    all_nan = [s.name for s in prof.sites if prof.stats[s.name].nonfinite_tokens and not prof.stats[s.name].count]
    assert all_nan  # the NaN spreads through attention: layer 1 sees nothing finite
    rows = {r["site"]: r for r in site_rows(prof, None)}
    assert set(rows) == {s.name for s in prof.sites}
    for name in all_nan:
        assert rows[name]["count"] == 0 and rows[name]["nonfinite_tokens"] > 0 and rows[name]["absmax"] is None
    rep = build_profile_report([prof], [None], tmp_path, {})
    path = rep.save(tmp_path)
    data = json.loads((path if path.is_file() else tmp_path / "report.json").read_text())
    assert data["metrics"]["status"] == "unusable" and data["metrics"]["unusable"] is True
    assert any("NaN/Inf in the forward" in w for w in data["warnings"])


def test_clean_profile_is_ok(corpus, tmp_path):
    model = tiny_model("llama")
    prof = profile_model(model, resolve(model), corpus.subset(range(3)), ProfileOptions(calib_fraction=0.0))
    assert prof.status == "ok" and not prof.unusable
    rep = build_profile_report([prof], [None], tmp_path, {})
    assert rep.metrics["status"] == "ok"


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_samples_skip_the_int8_check_with_a_warning(n, corpus, capsys):
    # regression: --samples 1 failed because of the INT8 check the user did not ask about
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="INT8 check skipped"):
        prof = profile_model(model, resolve(model), corpus.subset(range(n)), ProfileOptions())
    assert "INT8 check skipped" in capsys.readouterr().err
    assert not prof.int8 and any("INT8 check skipped" in w for w in prof.warnings)
    assert prof.status == "ok" and prof.global_max() is not None


def test_massive_token_counts_are_defined_and_add_up(corpus):
    # regression: the summary said massive_tokens 0 while the sites table listed 48 for one site
    from test_profile import _naive_acts as naive_acts

    model = tiny_model("llama")
    mm = resolve(model)
    opts = ProfileOptions(calib_fraction=0.0, massive_abs=1.0, massive_ratio=5.0, batch_size=3)
    prof = profile_model(model, mm, corpus, opts)
    rows = site_rows(prof, None)
    summary = summary_row(prof, None)
    hits = sum(r["massive_tokens"] or 0 for r in rows)
    assert summary["massive_site_hits"] == hits  # token-site pairs: the sum of the sites column
    # distinct tokens massive at one or more per-token sites, against a naive reference
    sites = [s for s in prof.sites if s.kind in PER_TOKEN_KINDS]
    acts, _ = naive_acts(model, mm, corpus, sites)
    union = torch.zeros(next(iter(acts.values())).shape[0], dtype=torch.bool)
    for s in sites:
        a = acts[s.name].abs()
        tmax = a.amax(1)
        union |= (tmax > 1.0) & (tmax / a.median(1).values.clamp_min(1e-12) > 5.0)
    assert summary["massive_tokens"] == prof.massive_tokens == int(union.sum())
    assert 0 < summary["massive_tokens"] < summary["massive_site_hits"]
