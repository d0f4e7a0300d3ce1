"""spike_mp: selection from the profile on the planted spikes, the random ablation, keep precisions, bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from outlierkit.errors import ConfigError
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import FP8Format
from outlierkit.llm.layers import QuantLinear
from outlierkit.llm.methods.spike_mp import LinearSpike, SpikeMP, linear_input_spikes
from outlierkit.llm.models import resolve
from outlierkit.llm.recipe import Recipe, quantize_

W8A8 = {"weight": "int8-channel", "act": "int8-tensor", "calib": {"min_tokens": 64}}


@pytest.fixture(scope="module")
def batches(corpus):
    return corpus.batches(5)[:1]  # 5 samples: fast, and enough to see the spikes


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _selected(rep):
    return [r["layer"] for r in rep.tables["transforms"] if r.get("method") == "spike_mp" and r["selected"]]


def test_profile_sees_the_planted_spike(llama, batches):
    planted = linear_input_spikes(llama, resolve(llama, warn=False), batches)
    clean_model = tiny_model("llama", plant=False)
    clean = linear_input_spikes(clean_model, resolve(clean_model, warn=False), batches)
    assert set(planted) == set(clean) and len(planted) == 14
    # The x60 residual spike written by layer 0's down projection reaches layer 1's q/k/v inputs.
    q1 = "model.layers.1.self_attn.q_proj"
    assert planted[q1].ratio > 100 > clean[q1].ratio
    assert max(s.ratio for s in clean.values()) < 100
    # Medians are exact: recompute one site by hand.
    x = []
    h = llama.get_submodule(q1).register_forward_hook(lambda m, i, o: x.append(i[0]))
    with torch.no_grad():
        for b in batches:
            llama(input_ids=b.input_ids, attention_mask=b.attention_mask)
    h.remove()
    vals = torch.cat([xi[b.attention_mask.bool()] for xi, b in zip(x, batches, strict=True)]).abs()
    assert planted[q1].absmax == pytest.approx(float(vals.max()), rel=1e-6)
    assert planted[q1].median == pytest.approx(float(vals.flatten().median()), rel=2e-2)


def test_threshold_selection_and_report(llama, batches):
    m = copy.deepcopy(llama)
    rep = quantize_(m, {**W8A8, "steps": [{"spike_mp": {}}]}, batches, baseline=False)
    rows = [r for r in rep.tables["transforms"] if r.get("method") == "spike_mp"]
    assert len(rows) == 14
    sel = _selected(rep)
    assert "model.layers.1.self_attn.q_proj" in sel
    for r in rows:
        assert r["selected"] == (r["spike_ratio"] >= 100)
        assert (">= 100" in r["reason"]) == r["selected"]
        mod = m.get_submodule(r["layer"])
        assert isinstance(mod, QuantLinear)
        assert mod.is_float == r["selected"]
    assert not rep.warnings


def test_topk_absmax_list(llama, batches):
    spikes = linear_input_spikes(llama, resolve(llama, warn=False), batches)
    by_ratio = sorted(spikes, key=lambda n: -spikes[n].ratio)
    sel, reasons, _ = SpikeMP(select="topk", top_k=2).choose(spikes)
    assert sel == by_ratio[:2] and reasons[sel[0]].startswith("rank 1")
    thr = sorted(s.absmax for s in spikes.values())[-3]
    sel, _, _ = SpikeMP(select="absmax", threshold=thr).choose(spikes)
    assert len(sel) >= 3 and all(spikes[n].absmax >= thr for n in sel)
    sel, _, _ = SpikeMP(select="list", layers=["re:.*\\.0\\.mlp\\.down_proj"]).choose(spikes)
    assert sel == ["model.layers.0.mlp.down_proj"]
    with pytest.raises(ConfigError, match="match no block linear"):
        SpikeMP(select="list", layers=["model.nope"]).choose(spikes)


def test_random_ablation_same_count_and_seeded():
    spikes = {f"l{i}": LinearSpike(f"l{i}", 0, float(a), 1.0) for i, a in enumerate([500, 300, 5, 4, 3, 2, 1, 1])}
    thr_sel, _, _ = SpikeMP().choose(spikes)
    assert thr_sel == ["l0", "l1"]
    a, ra, _ = SpikeMP(select="random", seed=1).choose(spikes)
    b, _, _ = SpikeMP(select="random", seed=1).choose(spikes)
    draws = {tuple(SpikeMP(select="random", seed=s).choose(spikes)[0]) for s in range(20)}
    assert len(a) == 2 and a == b and len(draws) > 3
    assert all("random (seed 1" in ra[n] for n in a)
    assert len(SpikeMP(select="random", top_k=5).choose(spikes)[0]) == 5
    with pytest.raises(ConfigError, match="model has 8"):
        SpikeMP(select="random", top_k=9).choose(spikes)


def test_random_ablation_in_a_recipe(llama, batches):
    reps = {}
    for sel in ("ratio", "random"):
        m = copy.deepcopy(llama)
        reps[sel] = quantize_(m, {**W8A8, "steps": [{"spike_mp": {"select": sel, "seed": 3}}]}, batches,
                              baseline=False)
    assert len(_selected(reps["random"])) == len(_selected(reps["ratio"]))
    assert _selected(reps["random"]) != _selected(reps["ratio"])


def test_nothing_or_everything_selected_is_said(llama, batches):
    m = copy.deepcopy(llama)
    rep = quantize_(m, {**W8A8, "steps": [{"spike_mp": {"threshold": 1e9}}]}, batches, baseline=False)
    assert _selected(rep) == [] and any("selects no layer" in w for w in rep.warnings)
    assert all(not q.is_float for q in m.modules() if isinstance(q, QuantLinear))
    m = copy.deepcopy(llama)
    rep = quantize_(m, {**W8A8, "steps": [{"spike_mp": {"threshold": 1.0}}]}, batches, baseline=False)
    assert len(_selected(rep)) == 14 and any("selects all 14" in w for w in rep.warnings)


@pytest.mark.parametrize("keep,fp8,scaled", [("fp8", "e4m3", True), ("fp8-e5m2", "e5m2", False)])
def test_fp8_keep(llama, batches, keep, fp8, scaled):
    m = copy.deepcopy(llama)
    quantize_(m, {**W8A8, "steps": [{"spike_mp": {"select": "topk", "top_k": 1, "keep": keep}}]}, batches,
              baseline=False)
    kinds = {type(q.weight_format).__name__ for q in m.modules() if isinstance(q, QuantLinear)}
    assert kinds == {"IntFormat", "FP8Format"}
    fp8_layers = [q for q in m.modules() if isinstance(q, QuantLinear) and isinstance(q.act_format, FP8Format)]
    assert len(fp8_layers) == 1
    assert fp8_layers[0].act_format == FP8Format(fp8, "tensor", scaled=scaled)


def test_composes_with_smoothquant(llama, batches):
    out = {}
    for name, steps in [("sq", [{"smoothquant": {}}, {"rtn": {}}]),
                        ("sq+spike", [{"smoothquant": {}}, {"spike_mp": {"select": "topk", "top_k": 3}}])]:
        m = copy.deepcopy(llama)
        rep = quantize_(m, {**W8A8, "steps": steps}, batches, baseline=False)
        out[name] = rep.metrics["output_sqnr_db"]
        if name == "sq+spike":
            rows = [r for r in rep.tables["transforms"] if r.get("method") == "spike_mp"]
            assert len(_selected(rep)) == 3
            assert any(r.get("method") == "smoothquant" for r in rep.tables["transforms"])
            # the profile ran after smoothing: the ratios are lower than on the untransformed model
            raw = linear_input_spikes(llama, resolve(llama, warn=False), batches)
            q1 = next(r for r in rows if r["layer"] == "model.layers.1.self_attn.q_proj")
            assert q1["spike_ratio"] < raw["model.layers.1.self_attn.q_proj"].ratio
    assert out["sq+spike"] > out["sq"]


def test_bad_parameters():
    with pytest.raises(ConfigError, match="select"):
        Recipe.from_dict({"steps": [{"spike_mp": {"select": "biggest"}}]})
    with pytest.raises(ConfigError, match="keep"):
        Recipe.from_dict({"steps": [{"spike_mp": {"keep": "int4"}}]})
    with pytest.raises(ConfigError, match="top_k"):
        Recipe.from_dict({"steps": [{"spike_mp": {"select": "topk"}}]})
    with pytest.raises(ConfigError, match="threshold"):
        Recipe.from_dict({"steps": [{"spike_mp": {"threshold": 0}}]})


def test_must_come_before_rtn(llama, batches):
    m = copy.deepcopy(llama)
    with pytest.raises(ConfigError, match="before rtn"):
        quantize_(m, {**W8A8, "steps": [{"rtn": {}}, {"spike_mp": {}}]}, batches, baseline=False)


def test_bundled_recipe_with_separate_rtn_step(llama, batches):
    from pathlib import Path

    from outlierkit.llm.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "spike_mp.yaml")
    recipe.calib = type(recipe.calib)(min_tokens=64)
    assert [s.method for s in recipe.steps] == ["spike_mp", "rtn"]
    m = copy.deepcopy(llama)
    rep = quantize_(m, recipe, batches, baseline=False)
    sel = _selected(rep)
    rows = [r for r in rep.tables["transforms"] if r.get("method") == "spike_mp"]
    assert sorted(sel) == sorted(r["layer"] for r in rows if r["spike_ratio"] >= 100)
    assert sorted(n for n, q in m.named_modules() if isinstance(q, QuantLinear) and q.is_float) == sorted(sel)


def test_fused_selection_keeps_whole_fused_groups(llama, batches):
    """fused (set by --target vllm): selecting k_proj keeps q/k/v together, so vLLM can serve the export."""
    from outlierkit.llm.export_ct import vllm_problems

    recipe = {"weight": "int8-channel", "act": "int8-token", "calib": {"min_tokens": 64},
              "steps": [{"spike_mp": {"select": "list", "layers": ["model.layers.1.self_attn.k_proj"],
                                      "fused": True}}]}
    m = copy.deepcopy(llama)
    rep = quantize_(m, recipe, batches, baseline=False)
    assert sorted(_selected(rep)) == [f"model.layers.1.self_attn.{p}_proj" for p in "kqv"]
    assert vllm_problems(m) == []
    m = copy.deepcopy(llama)
    recipe["steps"][0]["spike_mp"]["fused"] = False
    quantize_(m, recipe, batches, baseline=False)
    assert any("fused shards" in p for p in vllm_problems(m))
