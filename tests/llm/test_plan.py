"""The planner: meets its target (verified end to end) with fewer float layers than uniform recipes; CLI."""

from __future__ import annotations

import copy
import json

import pytest

from outlierkit.cli import main
from outlierkit.errors import ConfigError
from outlierkit.llm.evaluate import EvalData, split_documents
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import parse_format
from outlierkit.llm.plan import Planner, PlanTarget, measure, quality_loss
from outlierkit.llm.recipe import CalibConfig, Recipe, quantize_

W, A = parse_format("int8-channel"), parse_format("int8-tensor")


@pytest.fixture(scope="module")
def data(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    cal_docs, held_docs = split_documents(load_documents(None))
    calib = build_corpus(tok, cal_docs, samples=6, seq_len=32, seed=0).batches(6)
    held = build_corpus(tok, held_docs, samples=6, seq_len=32, seed=1)
    return calib, held, held_docs


def _ev(data):
    _, held, docs = data
    return EvalData(held.batches(6), docs, causal=True, window=32, max_windows=2)


@pytest.fixture(scope="module")
def llama_plan(tok, data):
    model = tiny_model("llama")
    planner = Planner(model, tok, data[0], _ev(data), weight=W, act=A, target=PlanTarget(max_loss=0.06),
                      transforms=("rtn", "smoothquant"), metric="top1", calib_config=CalibConfig(min_tokens=64))
    return model, planner.run()


@pytest.mark.slow
def test_plan_meets_target_with_fewer_float_layers_than_uniform(llama_plan, tok, data):
    model, plan = llama_plan
    assert plan.meets_target and plan.loss <= 0.06
    uniform = plan.uniform
    assert not uniform[0]["meets"]  # the plain recipe misses the target: a plan is needed
    assert 0 < len(plan.kept) < len(plan.layers)
    meeting = [r["kept_float"] for r in uniform if r["meets"]]
    assert len(plan.kept) < (min(meeting) if meeting else len(plan.layers))
    # every layer has a precision and a reason; kept layers are the top of the SQNR ranking
    assert {r["method"] for r in plan.layers} <= {"keep", "rtn", "smoothquant"}
    assert all(r["reason"] for r in plan.layers)
    kept_rows = [r for r in plan.layers if r["method"] == "keep"]
    assert sorted(r["layer"] for r in kept_rows) == sorted(plan.kept)
    # independent check: the written recipe, reloaded from YAML, on a fresh copy, meets the target
    import yaml

    recipe = Recipe.from_dict(yaml.safe_load(plan.recipe.to_yaml()))
    m = copy.deepcopy(model)
    quantize_(m, recipe, data[0], baseline=False)
    ev = _ev(data)
    ref = measure(model, tok, ev, "top1")
    assert quality_loss(measure(m, tok, ev, "top1"), ref, "top1") == pytest.approx(plan.loss)


@pytest.mark.slow
def test_bit_budget(tok, data):
    model = tiny_model("llama")
    plan = Planner(model, tok, data[0], _ev(data), weight=W, act=A, target=PlanTarget(bits=9.0),
                   transforms=("rtn",), metric="top1").run()
    assert plan.metrics["avg_weight_bits"] <= 9.0 and plan.meets_target
    assert len(plan.kept) >= 1
    zero = [p for p in plan.probes if not p.kept]
    assert zero and plan.loss <= zero[0].loss


def test_bad_targets_and_metrics(tok, data):
    with pytest.raises(ConfigError, match="exactly one"):
        PlanTarget()
    with pytest.raises(ConfigError, match="exactly one"):
        PlanTarget(max_loss=0.1, bits=8)
    with pytest.raises(ConfigError, match="bits"):
        PlanTarget(bits=40)
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="encoders"):
        Planner(model, tok, data[0], _ev(data), weight=W, act=A, target=PlanTarget(max_loss=0.1), metric="cos")
    with pytest.raises(ConfigError, match="unknown transform"):
        Planner(model, tok, data[0], _ev(data), weight=W, act=A, target=PlanTarget(max_loss=0.1),
                transforms=("awq",))


def test_plan_cli(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "plan"
    args = ["plan", str(tiny_llama_dir), "--max-loss", "0.08", "--metric", "top1", "--transforms", "rtn",
            "--calib-samples", "6", "--samples", "4", "--seq-len", "32", "--batch-size", "6", "--out", str(out),
            "--export-ct"]
    assert main(args) == 0  # the plan meets its target (verified end to end inside the command)
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["meets_target"] == 1.0 and rep["metrics"]["loss"] <= 0.08
    uniform_meeting = [r["kept_float"] for r in rep["tables"]["uniform"] if r["meets"]]
    assert rep["metrics"]["kept_float"] <= min(uniform_meeting, default=rep["metrics"]["layers"])
    assert rep["kind"] == "llm.plan" and {"layers", "uniform", "probes"} <= set(rep["tables"])
    recipe = Recipe.load(out / "recipe.yaml")
    assert [s.method for s in recipe.steps] == ["rtn"]
    assert len(recipe.overrides) == rep["metrics"]["kept_float"]
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert sorted(cfg["quantization_config"]["ignore"]) == sorted(["lm_head", *[o.pattern for o in recipe.overrides]])
    assert "uniform alternatives" in capsys.readouterr().out
    assert main(["plan", str(tiny_llama_dir), "--out", str(tmp_path / "x")]) == 2  # no target
    assert main(["plan", str(tiny_llama_dir), "--bits", "8.5", "--metric", "cos", "--out", str(tmp_path / "y")]) == 2


def test_vllm_target_decides_per_fused_group(tok, data, tmp_path, capsys):
    """--target vllm: q/k/v and gate/up are kept or quantized together (vLLM loads each as one layer), the
    formats must be servable, and the export passes vLLM's scheme matching."""
    from outlierkit.llm.export_ct import fused_groups, vllm_problems

    model = tiny_model("llama")
    plan = Planner(model, tok, data[0], _ev(data), weight=W, act=parse_format("int8-token"),
                   target=PlanTarget(bits=11.0), transforms=("rtn",), metric="top1", fused=True).run()
    kept = set(plan.kept)
    assert kept
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.") and hasattr(m, "weight")
             and m.weight.dim() == 2]
    for shards in fused_groups(names).values():
        assert len({s in kept for s in shards}) == 1, (shards, kept)
    m = copy.deepcopy(model)
    rec = copy.deepcopy(plan.recipe)
    rec.calib = CalibConfig(min_tokens=1)
    quantize_(m, rec, data[0], baseline=False)
    assert vllm_problems(m) == []
    # per-tensor dynamic INT8 activations are refused before any work
    from outlierkit.llm.fixtures import save_tiny

    d = save_tiny(tmp_path / "llama", "llama")
    assert main(["plan", str(d), "--bits", "9", "--target", "vllm", "--out", str(tmp_path / "p")]) == 2
    assert "per-token dynamic or per-tensor static" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_sequential_plan_equals_all_at_once(tok, data, monkeypatch):
    """`Planner(sequential=True)`: the profile, transforms, GPTQ, every probe's perplexity and the verification
    run one decoder layer at a time (the copies inherit it) and give the all-at-once plan."""
    from outlierkit.llm import sequential

    def plan(seq: bool):
        model = tiny_model("llama")
        return Planner(model, tok, data[0], _ev(data), weight=parse_format("int4-channel"),
                       act=parse_format("int8-token"), target=PlanTarget(max_loss=0.02),
                       transforms=("rtn", "smoothquant", "gptq"), metric="ppl", sequential=seq,
                       device="cpu" if seq else None).run()

    whole = plan(False)
    passes = {"n": 0}
    real = sequential.LayerwiseRunner.finish

    def counting(self, *a, **k):
        passes["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(sequential.LayerwiseRunner, "finish", counting)
    seq = plan(True)
    assert passes["n"] >= len(seq.probes) + 2  # every probe, the reference and the verification went layer-wise
    assert (seq.transform, seq.kept) == (whole.transform, whole.kept)
    assert seq.recipe.to_yaml() == whole.recipe.to_yaml()
    assert seq.loss == pytest.approx(whole.loss, rel=1e-4, abs=1e-6)
    for a, b in zip(whole.probes, seq.probes, strict=True):
        assert (a.transform, a.kept) == (b.transform, b.kept)
        assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-6)


def test_sequential_cli_flags(tiny_llama_dir, tmp_path):
    """`plan --sequential` and `profile --sequential` run on their defaults; a device map and --sequential
    together are refused with a one-line error."""
    out = tmp_path / "plan"
    args = ["plan", str(tiny_llama_dir), "--max-loss", "0.08", "--metric", "top1", "--transforms", "rtn",
            "--calib-samples", "6", "--samples", "4", "--seq-len", "32", "--batch-size", "6", "--out", str(out),
            "--sequential", "--device", "cpu"]
    assert main(args) == 0
    assert json.loads((out / "report.json").read_text())["config"]["sequential"] is True
    prof = ["profile", str(tiny_llama_dir), "--samples", "6", "--seq-len", "32", "--sequential", "--device", "cpu"]
    assert main([*prof, "--out", str(tmp_path / "p")]) == 0
    assert main([*prof, "--device-map", "auto", "--out", str(tmp_path / "q")]) == 2
