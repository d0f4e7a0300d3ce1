"""Layer-by-layer calibration gives the all-at-once results (statistics, cached inputs, transforms)."""

from __future__ import annotations

import os

import pytest
import torch

from outlierkit.llm.calibrate import collect_input_stats
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.methods.base import resolve_groups
from outlierkit.llm.models import resolve

# The compute device of the layer-wise tests: the CPU here; `OUTLIERKIT_TEST_DEVICE=cuda` (bench/gpu_check.sh)
# runs the same tests with the weights in CPU memory and every layer moved to the GPU and back.
DEV = os.environ.get("OUTLIERKIT_TEST_DEVICE", "cpu")
TOL = 1e-5 if DEV == "cpu" else 2e-3  # another device's kernels reduce in another order


@pytest.fixture(scope="module")
def batches(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    return build_corpus(tok, load_documents(None), samples=6, seq_len=24, seed=4).batches(3)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "bert", "opt"])
def test_sequential_statistics_equal_all_at_once(family, batches):
    model = tiny_model(family)
    mm = resolve(model, warn=False)
    groups = resolve_groups(model, mm, ("norm", "attn_v", "linear"))
    sites = sorted({g.linears[0] for g in groups})
    ctx = {g.linears[0]: mm.fqn(g.layer, mm.spec.attn) for g in groups if g.spec.role == "qkv"}
    ref = collect_input_stats(model, sites, batches, cache=set(sites), context_sites=ctx)
    seq = collect_input_stats(model, sites, batches, cache=set(sites), context_sites=ctx, sequential=True)
    assert set(ref) == set(seq)
    for name in sites:
        a, b = ref[name], seq[name]
        assert a.tokens == b.tokens
        for x, y in ((a.absmax, b.absmax), (a.min, b.min), (a.max, b.max), *zip(a.cached, b.cached, strict=True)):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), name
        for ca, cb in zip(a.context, b.context, strict=True):
            for pa, pb in zip(ca.get("position_embeddings") or (), cb.get("position_embeddings") or (), strict=True):
                assert torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["smoothquant", "os_plus"])
def test_sequential_quantize_equals_all_at_once(method, batches):
    from outlierkit.llm.recipe import model_outputs, quantize_

    recipe = {"weight": "int8-channel", "act": "int8-tensor",
              "steps": [{method: {"max_candidates": 60} if method == "os_plus" else {}}, "rtn"],
              "calib": {"min_tokens": 16}}
    outs = []
    for sequential in (False, True):
        model = tiny_model("llama")
        quantize_(model, recipe, batches, baseline=False, sequential=sequential)
        outs.append(model_outputs(model, batches))
    for a, b in zip(*outs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_sequential_refuses_alternating_layer_types(batches):
    from outlierkit.errors import ConfigError
    from outlierkit.llm.sequential import forward_layer_by_layer

    model = tiny_model("llama")
    model.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ConfigError, match="alternates layer types"):
        forward_layer_by_layer(model, batches)


def test_sequential_runs_only_the_layers_it_needs_one_at_a_time(batches):
    """The final norm never runs, layers after the last site never run, and each layer runs all batches
    before the next layer starts (so only one layer's activations are live)."""
    model = tiny_model("llama")
    order: list[str] = []
    model.model.norm.register_forward_hook(lambda *a: order.append("norm"))
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, i=i: order.append(f"layer{i}"))
    collect_input_stats(model, ["model.layers.0.mlp.down_proj"], batches, sequential=True)
    assert order == ["layer0"] * len(batches)
    order.clear()
    collect_input_stats(model, ["model.layers.1.self_attn.q_proj"], batches, sequential=True)
    assert order == ["layer0"] * len(batches) + ["layer1"] * len(batches)


def test_quantize_cli_sequential_writes_the_same_model(tiny_llama_dir, tmp_path):
    """`quantize --sequential` (layers calibrated one at a time, SmoothQuant then GPTQ) saves the weights the
    all-at-once run saves."""
    from safetensors.torch import load_file

    from outlierkit.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("weight: int4-channel\nact: int8-token\nsteps:\n  - smoothquant: {}\n  - gptq: {}\n")
    small = ["--calib-samples", "12", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]
    outs = []
    for flag in ([], ["--sequential"]):
        out = tmp_path / f"q{len(flag)}"
        assert main(["quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out), *small, *flag]) == 0
        outs.append(load_file(str(out / "model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    for k in outs[0]:
        torch.testing.assert_close(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-6, msg=k)


_ALL = ["llama", "qwen2", "gemma2", "phi3", "mixtral", "qwen2_moe", "olmoe", "opt", "bloom", "gpt2", "bert"]


@pytest.mark.parametrize("family", _ALL)
def test_layerwise_forward_gives_the_model_outputs(family, batches):
    """forward_each inside `layerwise` (every input through layer 0, then layer 1, ..., then the model's own
    head over a replay of the last layer's outputs) returns what the plain forward returns."""
    from outlierkit.llm.recipe import model_outputs
    from outlierkit.llm.sequential import layerwise, layerwise_device

    model = tiny_model(family)
    if family == "gemma2":  # alternating sliding / full attention: refused, see below
        model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    ref = model_outputs(model, batches)
    with layerwise(model, DEV):
        assert layerwise_device(model) == torch.device(DEV)
        seq = model_outputs(model, batches)
    assert layerwise_device(model) is None and not hasattr(model, "_outlierkit_layerwise")
    assert all(p.device.type == "cpu" for p in model.parameters())  # every weight back home
    for a, b in zip(ref, seq, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


def test_layerwise_forward_is_layer_major_and_moves_each_layer_once(batches):
    """Inside `layerwise` every input goes through layer 0 before any enters layer 1, the final norm runs once
    per input after the last layer, and each layer is moved to the compute device once per pass."""
    from outlierkit.llm import sequential
    from outlierkit.llm.sequential import forward_each, layerwise

    model = tiny_model("llama")
    order: list[str] = []
    model.model.norm.register_forward_hook(lambda *a: order.append("norm"))
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *a, i=i: order.append(f"layer{i}"))
    moves: list[int] = []
    real_move = sequential._move_
    layers = list(model.model.layers)

    def counting_move(module, device, skip=None):
        if any(module is layer for layer in layers) and not (skip and id(module) in skip):
            moves.append(1)
        real_move(module, device, skip)

    sequential._move_ = counting_move
    try:
        with layerwise(model, DEV):
            forward_each(model, batches)
    finally:
        sequential._move_ = real_move
    n = len(batches)
    assert order == ["layer0"] * n + ["layer1"] * n + ["norm"] * n
    assert len(moves) == 2 * len(model.model.layers)  # to the device and back, once per layer


def test_layerwise_perplexity_and_embeddings_equal_plain(tok, batches):
    from outlierkit.llm.corpus import load_documents
    from outlierkit.llm.evaluate import embeddings, window_nll
    from outlierkit.llm.sequential import layerwise

    docs = load_documents(None)[:6]
    model = tiny_model("llama")
    ref = window_nll(model, tok, docs, window=32, max_windows=6)
    with layerwise(model, DEV):
        seq = window_nll(model, tok, docs, window=32, max_windows=6)
    for a, b in zip(ref, seq, strict=True):
        torch.testing.assert_close(a, b, rtol=max(TOL, 1e-6), atol=1e-4)
    enc = tiny_model("bert")
    ref_e = embeddings(enc, batches)
    with layerwise(enc, DEV):
        torch.testing.assert_close(embeddings(enc, batches), ref_e, rtol=TOL, atol=TOL)


def test_sequential_quantize_report_equals_all_at_once(batches):
    """`quantize_(..., sequential=True)` runs every pass layer by layer (transform statistics, the static range
    observers, the report's layer and output SQNR passes) and reports what the all-at-once run reports."""
    from outlierkit.llm.recipe import quantize_

    recipe = {"weight": "int8-channel", "act": "int8-tensor-static", "steps": ["smoothquant", "rtn"],
              "calib": {"min_tokens": 16}}
    reps = []
    for sequential in (False, True):
        model = tiny_model("llama")
        reps.append(quantize_(model, recipe, batches, sequential=sequential, device=DEV if sequential else None))
    a, b = reps
    rel = 1e-5 if DEV == "cpu" else 1e-2
    for k in ("output_sqnr_db", "output_sqnr_db_rtn", "layer_sqnr_db_min", "layer_sqnr_db_mean"):
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=rel), k
    ra = {r["layer"]: r for r in a.tables["layer_sqnr"]}
    for r in b.tables["layer_sqnr"]:
        assert r["sqnr_db"] == pytest.approx(ra[r["layer"]]["sqnr_db"], rel=rel)


def test_sequential_load_dtype_follows_the_compute_device():
    """Sequential runs load on the CPU but compute on --device: the default dtype is the compute device's
    (bf16 for a GPU), not the CPU's fp32 (twice the host memory and weight traffic); an explicit one wins."""
    from outlierkit._utils.device import sequential_dtype

    assert sequential_dtype(None, torch.device("cuda")) == "bf16"
    assert sequential_dtype("auto", torch.device("cuda", 1)) == "bf16"
    assert sequential_dtype(None, torch.device("cpu")) == "fp32"
    assert sequential_dtype("fp32", torch.device("cuda")) == "fp32"
