"""The planner over rtn / smoothquant / os_plus / rotate / gptq: measured per-layer GPTQ-vs-RTN choices, rotate
as a folded (exportable) candidate, refused families dropped with a visible reason."""

from __future__ import annotations

import copy

import pytest
import torch

from outlierkit.errors import ConfigError
from outlierkit.llm.evaluate import EvalData, split_documents
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import parse_format
from outlierkit.llm.plan import Planner, PlanTarget, measure, plan_report, quality_loss
from outlierkit.llm.recipe import CalibConfig, Recipe, quantize_

W4, A8 = parse_format("int4-channel"), parse_format("int8-token")


@pytest.fixture(scope="module")
def data(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    cal_docs, held_docs = split_documents(load_documents(None))
    calib = build_corpus(tok, cal_docs, samples=8, seq_len=32, seed=0).batches(8)
    held = build_corpus(tok, held_docs, samples=6, seq_len=32, seed=1)
    return calib, held, held_docs


def _ev(data):
    _, held, docs = data
    return EvalData(held.batches(6), docs, causal=True, window=32, max_windows=2)


def _verify(model, plan, tok, data):
    """The written recipe, reloaded from YAML, on a fresh copy: its loss."""
    import yaml

    recipe = Recipe.from_dict(yaml.safe_load(plan.recipe.to_yaml()))
    recipe.calib = CalibConfig(min_tokens=1)
    m = copy.deepcopy(model)
    quantize_(m, recipe, data[0], baseline=False)
    ev = _ev(data)
    ref = measure(model, tok, ev, "top1")  # first: fills the float reference
    return quality_loss(measure(m, tok, ev, "top1"), ref, "top1")


def test_gptq_is_a_measured_per_layer_choice(tok, data):
    model = tiny_model("llama")
    planner = Planner(model, tok, data[0], _ev(data), weight=W4, act=A8, target=PlanTarget(bits=4.0),
                      transforms=("rtn", "gptq"), metric="top1")
    assert planner.transforms == ["rtn", "rtn+gptq"]
    plan = planner.run()
    # both candidates were measured (one all-quantized probe each at a 4-bit budget)
    assert {p.transform for p in plan.probes} >= {"rtn", "rtn+gptq"}
    gptq_rows = [r for r in plan.layers if r["method"] == "gptq"]
    rtn_rows = [r for r in plan.layers if r["method"] == "rtn"]
    # every layer's choice follows its own measurement: GPTQ where its layer SQNR beat RTN's
    if plan.transform == "rtn+gptq":
        assert gptq_rows
        for r in gptq_rows:
            assert r["sqnr_db_rtn+gptq"] > r["sqnr_db_rtn"] and "beats RTN" in r["reason"]
        for r in rtn_rows:
            assert r["sqnr_db_rtn+gptq"] == r["sqnr_db_rtn"] and "no better" in r["reason"]
        step = plan.recipe.steps[-1]
        assert step.method == "gptq"
        assert sorted(step.params["rtn_layers"]) == sorted(r["layer"] for r in rtn_rows)
    probe = {p.transform: p.loss for p in plan.probes if not p.kept}
    assert plan.transform == min(probe, key=lambda t: (probe[t], t != "rtn"))  # best loss at the same bits
    # the recipe as written (reloaded) reproduces the verified loss
    assert _verify(model, plan, tok, data) == pytest.approx(plan.loss)


def test_gptq_beats_rtn_at_w4_and_is_picked(tok, data):
    """At W4 on the tiny LLaMA GPTQ lowers the loss; the planner must measure that and pick it."""
    model = tiny_model("llama")
    plan = Planner(model, tok, data[0], _ev(data), weight=W4, act=None, target=PlanTarget(bits=4.0),
                   transforms=("rtn", "gptq"), metric="top1").run()
    probe = {p.transform: p.loss for p in plan.probes if not p.kept}
    assert probe["rtn+gptq"] < probe["rtn"]
    assert plan.transform == "rtn+gptq"
    assert any(r["method"] == "gptq" for r in plan.layers)
    assert [s.method for s in plan.recipe.steps] == ["gptq"]


def test_rotate_candidate_is_folded_and_exportable(tok, data):
    model = tiny_model("llama")
    plan = Planner(model, tok, data[0], _ev(data), weight=W4, act=A8, target=PlanTarget(bits=4.0),
                   transforms=("rotate",), metric="top1").run()
    assert plan.transform == "rotate" and not plan.notes
    assert [(s.method, s.params) for s in plan.recipe.steps] == [("rotate", {"online_down": False}), ("rtn", {})]
    assert all(r["method"] in ("rotate", "rtn") for r in plan.layers)
    assert any(r["method"] == "rotate" and "rotated by rotate" in r["reason"] for r in plan.layers)
    assert _verify(model, plan, tok, data) == pytest.approx(plan.loss)


def test_rotate_refused_family_is_dropped_visibly(tok, data):
    model = tiny_model("gemma2")  # branch norms: a rotation cannot be folded
    plan = Planner(model, tok, data[0], _ev(data), weight=W4, act=A8, target=PlanTarget(bits=4.0),
                   transforms=("rtn", "rotate"), metric="top1").run()
    assert plan.transform == "rtn"
    assert {p.transform for p in plan.probes} == {"rtn"}
    assert len(plan.notes) == 1 and "rotate" in plan.notes[0] and "refused" in plan.notes[0]
    rep = plan_report(plan, PlanTarget(bits=4.0), {})
    assert any("rotate" in w for w in rep.warnings)
    with pytest.raises(ConfigError, match="refused"):
        Planner(model, tok, data[0], _ev(data), weight=W4, act=A8, target=PlanTarget(bits=4.0),
                transforms=("rotate",), metric="top1").run()


def test_bad_method_choices(tok, data):
    model = tiny_model("llama")
    kw = dict(act=A8, target=PlanTarget(bits=8.0), metric="top1")
    with pytest.raises(ConfigError, match="online"):
        Planner(model, tok, data[0], _ev(data), weight=W4, transforms=("rotate_online",), **kw)
    with pytest.raises(ConfigError, match="gptq rounds integer weights"):
        Planner(model, tok, data[0], _ev(data), weight=parse_format("fp8"), transforms=("gptq",), **kw)
    with pytest.raises(ConfigError, match="unknown transform .*gptq"):
        Planner(model, tok, data[0], _ev(data), weight=W4, transforms=("awq",), **kw)


def test_per_layer_rounding_mixes_gptq_and_rtn(tok, data):
    """Where RTN measures better a layer keeps its float weight (rounded to nearest later) and the recipe
    names it in ``gptq.rtn_layers``; quantizing with that recipe gives exactly RTN there and GPTQ elsewhere."""
    from outlierkit.llm.formats import fake_quant
    from outlierkit.llm.methods.base import float_module, out_weight

    model = tiny_model("llama")
    planner = Planner(model, tok, data[0], _ev(data), weight=W4, act=None, target=PlanTarget(bits=4.0),
                      transforms=("gptq",), metric="top1")
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight")
             and m.weight.dim() == 2]
    rtn_better = {n: (1e9 if "down_proj" in n or "layers.0.self_attn" in n else -1e9) for n in names}
    chosen, rounding, sqnr_g = planner._gptq(model, names, "rtn+gptq", rtn_better)
    rtn_layers = sorted(n for n in names if rounding[n] == "rtn")
    assert rtn_layers == sorted(n for n in names if rtn_better[n] > 0) and len(rtn_layers) < len(names)
    for n in names:
        w, w0 = out_weight(float_module(chosen, n)), out_weight(float_module(model, n))
        assert (w.equal(w0)) == (n in rtn_layers), n  # GPTQ's weights only where GPTQ was chosen
        assert sqnr_g[n] > -1e9
    recipe = planner.recipe("rtn+gptq", [names[-1]], rtn_layers)
    assert recipe.steps[-1].method == "gptq"
    assert recipe.steps[-1].params["rtn_layers"] == [n for n in rtn_layers if n != names[-1]]
    import yaml

    recipe = Recipe.from_dict(yaml.safe_load(recipe.to_yaml()))  # as written to recipe.yaml
    recipe.calib = CalibConfig(min_tokens=1)
    m = copy.deepcopy(model)
    quantize_(m, recipe, data[0], baseline=False)
    for n in names[:-1]:  # RTN layers hold their float weight (rounded at run time), GPTQ layers GPTQ's values
        q = out_weight(float_module(m, n))
        w0 = out_weight(float_module(model, n))
        assert q.equal(w0) == (n in rtn_layers), n
        assert fake_quant(q, W4).equal(q) == (n not in rtn_layers), n  # GPTQ's values lie on the grid
    assert out_weight(float_module(m, names[-1])).equal(out_weight(float_module(model, names[-1])))  # kept float


def test_plan_cli_with_rotate_and_gptq_exports(tiny_llama_dir, tmp_path):
    import json

    from outlierkit.cli import main

    out = tmp_path / "plan"
    args = ["plan", str(tiny_llama_dir), "--bits", "4", "--weight", "int4-channel", "--act", "none", "--metric",
            "top1", "--transforms", "rtn", "rotate", "gptq", "--calib-samples", "8", "--samples", "4",
            "--seq-len", "32", "--batch-size", "8", "--max-windows", "2", "--out", str(out), "--export-ct"]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    probes = {p["transform"] for p in rep["tables"]["probes"] if p["kept_float"] == 0}
    assert probes == {"rtn", "rotate", "rtn+gptq", "rotate+gptq"}  # every candidate measured
    recipe = Recipe.load(out / "recipe.yaml")
    assert recipe.steps[-1].method in ("rtn", "gptq")
    assert all(s.params.get("online_down") is False for s in recipe.steps if s.method == "rotate")
    assert (out / "model" / "config.json").exists()


def test_per_group_picks_the_best_measured_transform_per_fold_group(tok, data):
    """per_group: each fold group gets the transform under which its consumers measured the best worst-layer
    SQNR; the written recipe restricts smoothquant / os_plus to those groups and reproduces the probe."""
    import yaml

    model = tiny_model("llama")
    w8, a8 = parse_format("int8-channel"), parse_format("int8-tensor")
    planner = Planner(model, tok, data[0], _ev(data), weight=w8, act=a8, target=PlanTarget(bits=8.0),
                      transforms=("rtn", "smoothquant", "per_group"), metric="top1")
    assert planner.transforms == ["rtn", "smoothquant", "per_group"]
    plan = planner.run()
    assert len(plan.groups) == 2 * 4  # 2 layers x (norm -> qkv, norm -> gate/up, v -> o, up -> down)
    for row in plan.groups:
        scores = {t: row[f"min_sqnr_db_{t}"] for t in ("rtn", "smoothquant", "os_plus") if f"min_sqnr_db_{t}" in row}
        assert scores[row["chosen"]] == max(scores.values())
        if row["kind"] == "linear":  # smoothquant is planned on norm and v -> o folds only
            assert "min_sqnr_db_smoothquant" not in scores
    assert len({r["chosen"] for r in plan.groups}) == 2  # a real mix (up -> down has only rtn)
    recipe = Recipe.from_dict(yaml.safe_load(planner.recipe("per_group", []).to_yaml()))
    chosen = {t: sorted(r["group"] for r in plan.groups if r["chosen"] == t) for t in ("smoothquant",)}
    assert {s.method: sorted(s.params.get("groups", [])) for s in recipe.steps[:-1]} == \
        {t: g for t, g in chosen.items() if g}
    probe = next(p for p in plan.probes if p.transform == "per_group" and not p.kept)
    recipe.calib = CalibConfig(min_tokens=1)
    m = copy.deepcopy(model)
    quantize_(m, recipe, data[0], baseline=False)
    ev = _ev(data)
    ref = measure(model, tok, ev, "top1")
    assert quality_loss(measure(m, tok, ev, "top1"), ref, "top1") == pytest.approx(probe.loss)
    assert "fold_groups" in plan_report(plan, PlanTarget(bits=8.0), {}).tables
    with pytest.raises(ConfigError, match="at least two"):
        Planner(model, tok, data[0], _ev(data), weight=w8, act=a8, target=PlanTarget(bits=8.0),
                transforms=("rtn", "per_group"), metric="top1")


def test_transform_groups_restrict_the_fold(tok, data):
    """smoothquant/os_plus `groups` transform only the named fold groups; a name matching none is an error."""
    from outlierkit.llm.recipe import model_outputs

    model = tiny_model("llama")
    ref = model_outputs(model, data[0])
    m = copy.deepcopy(model)
    only = "model.layers.1.self_attn.q_proj"
    quantize_(m, {"weight": None, "act": None, "steps": [{"smoothquant": {"groups": [only]}}]}, data[0],
              baseline=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, dict(model.named_parameters())[n])}
    assert changed == {"model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.q_proj.weight",
                       "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    for a, b in zip(ref, model_outputs(m, data[0]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # still the float model
    with pytest.raises(ConfigError, match="match no fold group"):
        quantize_(copy.deepcopy(model), {"weight": None, "act": None,
                                         "steps": [{"os_plus": {"groups": ["model.layers.9.mlp.up_proj"]}}]},
                  data[0], baseline=False)
