"""The activation profiler against a naive reference, and its invariants (padding, merge, resume, families)."""

from __future__ import annotations

import math

import pytest
import torch

from outlierkit._utils import HookSet
from outlierkit._utils.hooks import count_hooks, first_tensor
from outlierkit.llm.fixtures import FAMILIES, OUTLIER_CHANNELS, tiny_model
from outlierkit.llm.models import get_attr, resolve
from outlierkit.llm.profile import (
    ActivationProfile,
    ProfileOptions,
    discover_sites,
    profile_model,
)
from outlierkit.llm.stats import HIST_SHIFT, SiteStats


def _naive_acts(model, mm, corpus, sites):
    """Store every activation of every site (valid tokens only, one sample at a time: no padding)."""
    acts = {s.name: [] for s in sites}
    meta = []
    with HookSet() as hooks:
        for s in sites:
            mod = get_attr(model, s.module)
            if s.capture == "input":
                hooks.forward_pre(mod, lambda m, a, s=s: acts[s.name].append(a[0].reshape(-1, a[0].shape[-1])))
            else:
                hooks.forward(mod, lambda m, a, o, s=s: acts[s.name].append(
                    first_tensor(o).reshape(-1, first_tensor(o).shape[-1])))
        base = get_attr(model, mm.backbone.split(".")[0]) if mm.backbone else model
        with torch.no_grad():
            for i, sample in enumerate(corpus.samples):
                ids = torch.tensor([sample])
                base(input_ids=ids, attention_mask=torch.ones_like(ids))
                meta += [(i, p, t) for p, t in enumerate(sample)]
    return {k: torch.cat(v).float() for k, v in acts.items()}, meta


def test_statistics_match_naive_reference(corpus):
    model = tiny_model("llama")
    mm = resolve(model)
    prof = profile_model(model, mm, corpus, ProfileOptions(level="full", batch_size=4, calib_fraction=0.0))
    acts, meta = _naive_acts(model, mm, corpus, prof.sites)
    assert len(prof.sites) > 20
    for site in prof.sites:
        x = acts[site.name].double()
        st = prof.stats[site.name]
        n, c = x.shape
        assert st.count == n * c and st.tokens == n
        assert st.mean == pytest.approx(float(x.mean()), rel=1e-4, abs=1e-7)
        assert st.std == pytest.approx(float(x.std(unbiased=False)), rel=1e-4)
        assert st.rms == pytest.approx(float(x.pow(2).mean().sqrt()), rel=1e-5)
        assert st.vmin == pytest.approx(float(x.min()), rel=1e-6)
        assert st.vmax == pytest.approx(float(x.max()), rel=1e-6)
        torch.testing.assert_close(st.ch_max.double(), x.amax(0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(st.ch_min.double(), x.amin(0), rtol=1e-6, atol=1e-7)
        # location of the absolute maximum
        flat = int(x.abs().flatten().argmax())
        row, ch = divmod(flat, c)
        loc = st.loc_absmax
        assert (loc.sample, loc.pos, loc.channel, loc.token) == (meta[row][0], meta[row][1], ch, meta[row][2])
        # top-k values
        ref_top = x.abs().flatten().topk(len(st.top_vals)).values
        torch.testing.assert_close(st.top_vals.abs().double(), ref_top, rtol=1e-6, atol=1e-7)
        # excess kurtosis
        m = x.mean()
        ref_k = float(((x - m) ** 4).mean() / ((x - m) ** 2).mean() ** 2 - 3)
        assert st.kurtosis == pytest.approx(ref_k, rel=1e-3, abs=1e-3)
        # quantiles of |x| within the histogram's resolution
        rel = 2 * 2.0 ** -(23 - HIST_SHIFT)  # two bins of 6 mantissa bits (sparse tails)
        for q in (0.5, 0.99, 0.999, 0.9999):
            ref_q = float(torch.quantile(x.abs().flatten(), q))
            assert st.quantile_abs(q) == pytest.approx(ref_q, rel=rel)
        if st.per_token:
            a = x.abs()
            ratio = a.amax(1) / a.median(1).values.clamp_min(1e-12)
            # the ratio is taken over candidate tokens, which always include the token holding the max
            assert float(ratio[a.amax(1).argmax()]) - 1e-4 <= st.max_token_ratio <= float(ratio.max()) + 1e-4
            assert st.massive_tokens == int(((a.amax(1) > 100) & (ratio > 1000)).sum())


def test_planted_spike_is_the_global_max(corpus):
    model = tiny_model("llama")
    prof = profile_model(model, resolve(model), corpus, ProfileOptions(calib_fraction=0.0))
    name, value, loc = prof.global_max()
    assert name.endswith("residual") and loc.channel == OUTLIER_CHANNELS[0]
    assert abs(value) == pytest.approx(prof.stats[name].absmax)


def test_massive_activation_thresholds_are_configurable(corpus):
    model = tiny_model("llama")
    mm = resolve(model)
    strict = profile_model(model, mm, corpus, ProfileOptions(calib_fraction=0.0))
    loose = profile_model(model, mm, corpus, ProfileOptions(calib_fraction=0.0, massive_abs=1.0, massive_ratio=5.0))
    assert sum(s.massive_tokens for s in loose.stats.values()) > sum(s.massive_tokens for s in strict.stats.values())
    assert loose.stats["layer_0.residual"].massive


def test_padding_never_enters_statistics(corpus):
    model = tiny_model("gpt2")
    mm = resolve(model)
    one = profile_model(model, mm, corpus, ProfileOptions(batch_size=1, calib_fraction=0.0))
    # Padding tokens get a huge id-0 embedding here: if pads leaked into any statistic, maxima would change.
    with torch.no_grad():
        get_attr(model, mm.embed).weight[corpus.pad_id] = 1e4
    padded = profile_model(model, mm, corpus, ProfileOptions(batch_size=5, calib_fraction=0.0))
    for name, st in one.stats.items():
        other = padded.stats[name]
        assert other.count == st.count
        assert other.absmax == pytest.approx(st.absmax, rel=1e-4)
        assert other.mean == pytest.approx(st.mean, rel=1e-3, abs=1e-6)
        torch.testing.assert_close(other.hist, st.hist, atol=2, rtol=0)  # bin-edge rounding only


def test_merge_is_associative_and_order_independent(corpus):
    model = tiny_model("qwen2")
    mm = resolve(model)
    opts = ProfileOptions(batch_size=3, calib_fraction=0.0, hist_stride=1)  # subsets renumber samples
    parts = [profile_model(model, mm, corpus.subset(r), opts) for r in (range(0, 3), range(3, 7), range(7, 10))]
    # fix sample ids: subsets restart at 0, so compare location-free numbers only
    def merged(order):
        profs = [ActivationProfile(p.model, p.model_type, p.sites, {k: SiteStats.from_state(*v.state())
                 for k, v in p.stats.items()}) for p in (parts[i] for i in order)]
        acc = profs[0]
        for p in profs[1:]:
            acc.merge(p)
        return acc
    a, b = merged([0, 1, 2]), merged([2, 0, 1])
    full = profile_model(model, mm, corpus, opts)
    for name, st in full.stats.items():
        for m in (a, b):
            o = m.stats[name]
            assert o.count == st.count and o.absmax == pytest.approx(st.absmax)
            assert o.s2 == pytest.approx(st.s2, rel=1e-6) and o.kurtosis == pytest.approx(st.kurtosis, rel=1e-4)
            torch.testing.assert_close(o.hist, st.hist)
            torch.testing.assert_close(o.ch_max, st.ch_max)
            torch.testing.assert_close(o.top_vals.abs(), st.top_vals.abs())


def test_resume_equals_uninterrupted(corpus, tmp_path):
    model = tiny_model("mixtral")
    mm = resolve(model)
    opts = ProfileOptions(batch_size=2, checkpoint_every=1)
    full = profile_model(model, mm, corpus, opts)
    ckpt = tmp_path / "ckpt"
    calls = {"n": 0}

    def crash(m, a, o):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt

    handle = get_attr(model, mm.layers[-1]).register_forward_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        profile_model(model, mm, corpus, opts, checkpoint=ckpt)
    handle.remove()
    assert count_hooks(model) == 0  # the profiler's hooks were removed on the error
    assert ActivationProfile.load(ckpt).batches_done == 3
    resumed = profile_model(model, mm, corpus, opts, checkpoint=ckpt, resume=True)
    assert resumed.batches_done == full.batches_done
    for name, st in full.stats.items():
        o = resumed.stats[name]
        assert (o.count, o.vmax, o.vmin, o.loc_max) == (st.count, st.vmax, st.vmin, st.loc_max)
        assert o.s2 == pytest.approx(st.s2, rel=1e-12)
    for name, checks in full.int8.items():
        for kind, chk in checks.items():
            assert resumed.int8[name][kind].sqnr_db == pytest.approx(chk.sqnr_db)
    for name, ex in full.experts.items():
        torch.testing.assert_close(resumed.experts[name].tokens, ex.tokens)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_profiles(family, corpus):
    model = tiny_model(family)
    mm = resolve(model)
    prof = profile_model(model, mm, corpus.subset(range(4)), ProfileOptions(batch_size=2, calib_fraction=0.5))
    kinds = {s.kind for s in prof.sites}
    assert {"embedding", "residual", "attn", "mlp"} <= kinds, kinds
    assert all(prof.stats[s.name].count > 0 for s in prof.sites), [s.name for s in prof.sites
                                                                   if not prof.stats[s.name].count]
    assert not getattr(prof, "shape_warnings", [])
    assert prof.global_max() is not None and prof.int8
    if mm.spec.experts:
        assert "router" in kinds and prof.experts
        ex = next(iter(prof.experts.values()))
        # every valid token is routed to k experts
        assert float(ex.tokens.sum()) == 2 * sum(len(s) for s in corpus.samples[:4])
    if mm.spec.gate or mm.spec.gate_up:
        assert "gate" in kinds and "down_in" in kinds
    assert count_hooks(model) == 0


def test_full_level_adds_every_linear_and_expert_outputs(corpus):
    model = tiny_model("olmoe")
    mm = resolve(model)
    sites = discover_sites(model, mm, "full")
    linear_sites = {s.module for s in sites if s.kind == "linear_in"}
    assert linear_sites == {f for f in mm.linears if not f.endswith("experts")}
    prof = profile_model(model, mm, corpus.subset(range(3)), ProfileOptions(level="full", calib_fraction=0.0))
    ex = next(iter(prof.experts.values()))
    assert (ex.out_absmax[ex.tokens > 0] > 0).all() and (ex.gated_absmax[ex.tokens > 0] > 0).all()


def test_nan_and_inf_are_reported_with_location(corpus):
    model = tiny_model("llama")
    mm = resolve(model)

    def poison(m, a, o):
        t = first_tensor(o)
        t[0, 3, 7] = float("nan")
        t[0, 5, 2] = float("inf")
        return o

    h = get_attr(model, mm.layers[0]).register_forward_hook(poison)
    try:
        prof = profile_model(model, mm, corpus.subset(range(2)), ProfileOptions(batch_size=1, calib_fraction=0.0))
    finally:
        h.remove()
    st = prof.stats["layer_0.residual"]
    assert st.nonfinite_tokens == 4  # 2 tokens in each of the 2 single-sample batches
    assert (st.loc_nonfinite.pos, st.loc_nonfinite.channel) == (3, 7)
    assert math.isfinite(st.mean) and math.isfinite(st.absmax)


def test_int8_check_matches_direct_computation(corpus):
    model = tiny_model("llama")
    mm = resolve(model)
    prof = profile_model(model, mm, corpus, ProfileOptions(batch_size=4, calib_fraction=0.4, hist_stride=1))
    n_cal = int(len(corpus) * 0.4)
    cal = profile_model(model, mm, corpus.subset(range(n_cal)), ProfileOptions(batch_size=4, calib_fraction=0.0))
    site = [s for s in prof.sites if s.name == "layer_1.residual"][0]
    acts, _ = _naive_acts(model, mm, corpus.subset(range(n_cal, len(corpus))), [site])
    x = acts[site.name]
    t = cal.stats[site.name].absmax
    chk = prof.int8[site.name]["absmax"]
    assert chk.threshold == pytest.approx(t)
    s = t / 127
    xq = torch.clamp(torch.round(torch.clamp(x, -t, t) / s), -127, 127) * s
    ref = 10 * math.log10(float((x.double() ** 2).sum() / ((xq - x).double() ** 2).sum()))
    assert chk.sqnr_db == pytest.approx(ref, rel=1e-4)
    assert chk.clip_rate == pytest.approx(float((x.abs() > t).float().mean()))
    # the percentile threshold clips more and, on a planted spike, loses badly
    assert prof.int8[site.name]["p99.9"].clip_rate > chk.clip_rate
    # default stride: same thresholds (calibrated on every token), errors over one token in 8 of the
    # evaluation split, equal to the direct computation over exactly those tokens
    sub = profile_model(model, mm, corpus, ProfileOptions(batch_size=4, calib_fraction=0.4))
    chk8 = sub.int8[site.name]["absmax"]
    assert chk8.threshold == chk.threshold
    ev = corpus.subset(range(n_cal, len(corpus)))
    keep = [(s * 7919 + p) % 8 == 0 for s in range(n_cal, len(corpus)) for p in range(len(ev.samples[s - n_cal]))]
    xs = x[torch.tensor(keep)]
    assert 0 < chk8.count == xs.numel() < chk.count
    xq = torch.clamp(torch.round(torch.clamp(xs, -t, t) / s), -127, 127) * s
    ref8 = 10 * math.log10(float((xs.double() ** 2).sum() / ((xq - xs).double() ** 2).sum()))
    assert chk8.sqnr_db == pytest.approx(ref8, rel=1e-4)


def test_hooks_removed_when_forward_fails(corpus):
    model = tiny_model("bert")
    mm = resolve(model)

    def boom(m, a, o):
        raise RuntimeError("boom")

    h = get_attr(model, mm.layers[1]).register_forward_hook(boom)
    with pytest.raises(RuntimeError):
        profile_model(model, mm, corpus, ProfileOptions())
    h.remove()
    assert count_hooks(model) == 0


def test_token_subsample_keeps_exact_statistics_and_close_quantiles(corpus):
    model = tiny_model("qwen3")
    mm = resolve(model)
    exact = profile_model(model, mm, corpus, ProfileOptions(calib_fraction=0.0, hist_stride=1))
    sub = profile_model(model, mm, corpus, ProfileOptions(calib_fraction=0.0, hist_stride=4))
    for name, st in exact.stats.items():
        o = sub.stats[name]
        assert (o.count, o.vmax, o.vmin, o.loc_max, o.massive_tokens) == (st.count, st.vmax, st.vmin, st.loc_max,
                                                                          st.massive_tokens)
        assert o.rms == pytest.approx(st.rms, rel=1e-5)
        torch.testing.assert_close(o.ch_max, st.ch_max)
        assert 0 < o.dcount < st.dcount
        assert o.quantile_abs(0.5) == pytest.approx(st.quantile_abs(0.5), rel=0.1)
    # the subsample depends on token identity only: another batching gives the same histogram
    rebatched = profile_model(model, mm, corpus, ProfileOptions(calib_fraction=0.0, hist_stride=4, batch_size=3))
    for name, st in sub.stats.items():
        torch.testing.assert_close(rebatched.stats[name].hist, st.hist, atol=2, rtol=0)
