"""GPTQ: equal to a direct implementation of the paper's algorithm, exact on the export grid, composes, refuses."""

from __future__ import annotations

import math

import pytest
import torch

from outlierkit.errors import ConfigError, DataError, NumericalError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import IntFormat, parse_format, weight_fake_quant
from outlierkit.llm.hadamard import OnlineQuantLinear
from outlierkit.llm.layers import quant_layers
from outlierkit.llm.methods import METHODS, QuantContext
from outlierkit.llm.methods.gptq import gptq_quantize
from outlierkit.llm.recipe import layer_sqnr, quantize_


@pytest.fixture(scope="module")
def batches(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    return build_corpus(tok, load_documents(None), samples=12, seq_len=32, seed=3).batches(6)


# ------------------------------------------------------------------------------ the paper, written directly

def _ref_quant_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of ``w`` (R, k): the min-max grid, written out."""
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if sym:
        s = torch.maximum(lo.abs(), hi) / (2 ** (bits - 1) - 1)
        s[s == 0] = 1
        return s, torch.zeros_like(s)
    s = (hi - lo) / (2**bits - 1)
    s[s == 0] = 1
    return s, torch.clamp(-torch.round(lo / s), 0, 2**bits - 1)


def _ref_q(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    if sym:
        m = 2 ** (bits - 1) - 1
        return torch.clamp(torch.round(x / s), -m, m) * s
    return (torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1) - z) * s


def _ref_pins(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, sym: bool) -> dict[tuple[int, int], float]:
    """Position in ``w`` (R, k) -> forced grid value for each row's range-setting element."""
    out = {}
    for r in range(w.shape[0]):
        if sym:
            j = int(w[r].abs().argmax())
            if w[r, j] != 0:
                out[(r, j)] = float(torch.sign(w[r, j]) * (2 ** (bits - 1) - 1) * s[r])
        else:
            jl, jh = int(w[r].argmin()), int(w[r].argmax())
            if w[r, jl] < 0:
                out[(r, jl)] = float(-z[r] * s[r])
            if w[r, jh] > 0:
                out[(r, jh)] = float((2**bits - 1 - z[r]) * s[r])
    return out


def reference_gptq(w, h, bits, sym, group, percdamp, act_order, static_groups, pin, tensor=False):
    """Optimal Brain Quantization with a fixed column order (GPTQ, Frantar et al. 2023, eqs. 2-3): quantize a
    column, spread its error with the inverse Hessian of the remaining columns, remove it from that inverse
    (Gaussian elimination), one column at a time, float64, no Cholesky and no lazy batches."""
    W = w.double().clone()
    H = h.double().clone()
    R, C = W.shape
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(C, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    G = group or C
    scales = torch.zeros(R, C, dtype=torch.float64)
    zeros = torch.zeros(R, C, dtype=torch.float64)
    pins: dict[tuple[int, int], float] = {}

    def set_group(g0: int, cols: torch.Tensor) -> None:
        s, z = _ref_quant_params(cols, bits, sym)
        scales[:, g0:g0 + G], zeros[:, g0:g0 + G] = s[:, None], z[:, None]
        if pin:
            for (r, j), v in _ref_pins(cols, s, z, bits, sym).items():
                pins[(r, g0 + j)] = v

    if tensor:  # one granule: the whole weight
        s, z = _ref_quant_params(W.reshape(1, -1), bits, sym)
        scales[:], zeros[:] = s, z
        if pin:
            pins.update({divmod(j, C): v for (_, j), v in _ref_pins(W.reshape(1, -1), s, z, bits, sym).items()})
    elif static_groups:
        for g0 in range(0, C, G):
            set_group(g0, W[:, g0:g0 + G])
    order = torch.argsort(torch.diagonal(H), descending=True).tolist() if act_order else list(range(C))
    Q = torch.zeros_like(W)
    remaining = set(range(C))
    for j in order:
        if not static_groups and j % G == 0:
            set_group(j, W[:, j:j + G])
        q = _ref_q(W[:, j], scales[:, j], zeros[:, j], bits, sym)
        for r in range(R):
            if (r, j) in pins:
                q[r] = pins[(r, j)]
        Q[:, j] = q
        remaining.discard(j)
        rest = sorted(remaining)
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, rest] -= err[:, None] * Hinv[j, rest][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


def _layer_problem(seed: int = 0, r: int = 6, c: int = 32, n: int = 200, dead: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64)
    x[:, 3] *= 20  # an outlier channel
    if dead:
        x[:, 7] = 0
    w = torch.randn(r, c, generator=g, dtype=torch.float64)
    return w, 2 / n * x.t() @ x


@pytest.mark.parametrize("bits, sym, gran, act_order, static, pin, block, dead", [
    (4, True, "channel", False, True, False, 8, False),  # the paper's plain setting
    (4, True, "channel", True, True, True, 8, True),
    (4, False, "group", True, True, True, 16, False),  # act-order + static groups
    (3, True, "group", False, False, True, 16, True),  # groups found on the updated weight
    (8, True, "tensor", True, True, True, 5, False),
])
def test_gptq_equals_direct_reference(bits, sym, gran, act_order, static, pin, block, dead):
    w, h = _layer_problem(seed=bits, dead=dead)
    group = 8 if gran == "group" else None
    fmt = IntFormat(bits, sym, gran, group_size=group)
    got = gptq_quantize(w, h, fmt, block_size=block, percdamp=0.01, act_order=act_order, static_groups=static,
                        pin=pin, dtype=torch.float64)
    want = reference_gptq(w, h, bits, sym, group, 0.01, act_order, static, pin, tensor=gran == "tensor")
    assert torch.allclose(got, want, atol=1e-9, rtol=0), (got - want).abs().max()
    # and it beats round-to-nearest on the layer-output error it minimizes
    rtn = weight_fake_quant(w, fmt).double()
    err = lambda q: float(((w - q) @ h * (w - q)).sum())  # noqa: E731
    assert err(got) < err(rtn)


def test_pinned_weights_are_on_the_min_max_grid():
    """Taking min-max scales again from the GPTQ weights gives the same grid (what QuantLinear and an
    exporter do): the same integer codes, the scale equal up to its float rounding (one ulp)."""
    w, h = _layer_problem(seed=5, c=64)
    off_grid = []
    for spec in ("int4-channel", "int4-asym-g16", "int3-g32", "int3-asym-g8", "int8-tensor"):
        fmt = parse_format(spec)
        q = gptq_quantize(w, h, fmt, block_size=32).float()
        assert torch.allclose(weight_fake_quant(q, fmt), q, rtol=1e-6, atol=1e-7), spec
        unpinned = gptq_quantize(w, h, fmt, block_size=32, pin=False).float()
        if not torch.allclose(weight_fake_quant(unpinned, fmt), unpinned, rtol=1e-6, atol=1e-7):
            off_grid.append(spec)
    assert off_grid  # without pinning, re-deriving the scales moves some weights (why pinning exists)


def test_hessian_not_positive_definite_names_the_layer():
    h = torch.ones(4, 4, dtype=torch.float64)  # rank 1
    with pytest.raises(NumericalError, match="my.layer.q_proj.*not positive definite"):
        gptq_quantize(torch.randn(3, 4), h, parse_format("int4-channel"), percdamp=0.0, name="my.layer.q_proj")
    # end to end: one repeated token gives rank-1 inputs; without damping the first layer is refused
    ids = torch.full((4, 64), 2023)
    b = Batch(ids, torch.ones_like(ids), list(range(4)))
    with pytest.raises(NumericalError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        METHODS.get("gptq")(percdamp=0.0).apply(tiny_model("llama"), QuantContext([b], parse_format("int4-channel")))


def test_too_few_tokens_refused_with_the_number_needed(batches):
    few = [Batch(b.input_ids[:1, :20], b.attention_mask[:1, :20], b.sample_ids[:1]) for b in batches[:1]]
    n = int(few[0].attention_mask.sum())
    with pytest.raises(DataError, match=rf"at least 128 calibration tokens .*down_proj.*got {n}"):
        METHODS.get("gptq")().apply(tiny_model("llama"), QuantContext(few, parse_format("int4-channel")))


# ------------------------------------------------------------------------------ on models

def test_gptq_on_llama_beats_rtn_and_is_exactly_its_grid(batches):
    model = tiny_model("llama")
    ctx = QuantContext(batches, parse_format("int4-g32"), None)
    recs = [r for r in METHODS.get("gptq")().apply(model, ctx) if r.method == "gptq"]
    assert len(recs) == 14  # 7 linears x 2 layers
    gain = [r.info["proxy_sqnr_db"] - r.info["rtn_proxy_sqnr_db"] for r in recs]
    assert sum(gain) / len(gain) > 1.0 and min(gain) > -0.5, gain
    layers = dict(quant_layers(model))
    assert len(layers) == 14 and all(isinstance(q, OnlineQuantLinear) for q in layers.values())
    for q in layers.values():
        # fake quant leaves the GPTQ values (codes) as they are
        assert torch.allclose(q.quantized_weights()[0], q.inner.weight, rtol=1e-6, atol=1e-7)
        assert not torch.equal(q.ref_weight, q.inner.weight)
    sq = layer_sqnr(model, batches)  # measured against the pre-GPTQ weights, so finite (not inf)
    assert all(math.isfinite(v["sqnr_db"]) for v in sq.values())


def test_gptq_conv1d_gpt2(batches):
    model = tiny_model("gpt2")
    ctx = QuantContext(batches, parse_format("int4-channel"), parse_format("int8-token"))
    recs = METHODS.get("gptq")(act_order=True).apply(model, ctx)
    done = {r.layer for r in recs if r.method == "gptq"}
    assert done >= {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"}
    q = dict(quant_layers(model))["transformer.h.0.mlp.c_fc"]
    assert type(q.inner).__name__ == "Conv1D" and q.act_format is not None
    assert torch.allclose(q.quantized_weights()[0], q.inner.weight.t(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(q.ref_weight, q.inner.weight.t())


def _w4a8(steps, batches) -> tuple[float, dict]:
    rep = quantize_(tiny_model("llama"), {"weight": "int4-channel", "act": "int8-token", "steps": steps,
                                          "calib": {"min_tokens": 64}}, batches, baseline=False)
    return rep.metrics["output_sqnr_db"], rep.tables


def test_os_plus_then_gptq_beats_rtn_w4a8(batches):
    rtn, _ = _w4a8([{"rtn": {}}], batches[:1])
    both, tables = _w4a8([{"os_plus": {"batches": 1, "max_candidates": 50}}, {"gptq": {}}], batches[:1])
    assert {r["method"] for r in tables["transforms"]} == {"os_plus", "gptq"}
    assert both > rtn + 1.0, (both, rtn)


@pytest.mark.slow
def test_recipe_compositions_beat_rtn_w4a8(batches):
    """GPTQ alone and after OS+, rotate (QuaRot) and spike-MP as recipe steps all beat plain RTN at W4A8."""
    out = {name: _w4a8(steps, batches)[0] for name, steps in {
        "rtn": [{"rtn": {}}], "gptq": [{"gptq": {}}],
        "os_plus+gptq": [{"os_plus": {"batches": 1, "max_candidates": 50}}, {"gptq": {}}],
        "rotate+gptq": [{"rotate": {}}, {"gptq": {}}],
        "spike_mp+gptq": [{"spike_mp": {"quantize": False, "select": "topk", "top_k": 1}}, {"gptq": {}}]}.items()}
    assert all(v > out["rtn"] for k, v in out.items() if k != "rtn"), out


def test_gptq_refusals(batches):
    with pytest.raises(ConfigError, match="fused MoE experts.*experts: rtn"):
        METHODS.get("gptq")().apply(tiny_model("qwen2_moe"), QuantContext(batches, parse_format("int4-channel")))
    ctx = QuantContext(batches, parse_format("int4-channel"))
    METHODS.get("gptq")(experts="rtn").apply(tiny_model("qwen2_moe"), ctx)
    assert any("rounded to nearest" in n for n in ctx.notes)
    model = tiny_model("llama")
    METHODS.get("rtn")().apply(model, QuantContext(batches, parse_format("int4-channel")))
    with pytest.raises(ConfigError, match="before rtn"):
        METHODS.get("gptq")().apply(model, QuantContext(batches, parse_format("int4-channel")))
    with pytest.raises(ConfigError, match="integer weight formats"):
        METHODS.get("gptq")().apply(tiny_model("llama"), QuantContext(batches, parse_format("fp8")))
    with pytest.raises(ConfigError, match="static_groups"):
        gptq_quantize(torch.randn(2, 8), torch.eye(8), parse_format("int4-g4"), act_order=True, static_groups=False)
    with pytest.raises(ConfigError, match="percdamp"):
        METHODS.get("gptq")(percdamp=-1)


def test_rotate_then_gptq_saves_and_reloads_identically(batches, tok, tmp_path):
    """The layers stay exportable: folded rotation (tied embeddings untied) + GPTQ weights with their grid
    go through save_quantized / load_quantized with the same outputs."""
    from outlierkit.llm.export import load_quantized, save_quantized
    from outlierkit.llm.recipe import model_outputs

    model = tiny_model("llama", tie_word_embeddings=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    quantize_(model, {"weight": "int4-g32", "act": None, "steps": [{"rotate": {}}, {"gptq": {}}],
                      "calib": {"min_tokens": 64}}, batches[:1], baseline=False)
    ref = model_outputs(model, batches[:1])
    save_quantized(model, tok, tmp_path / "q")
    again = model_outputs(load_quantized(tmp_path / "q").model, batches[:1])
    assert torch.equal(again[0], ref[0])


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gpt2", "opt", "gemma2"])
def test_cached_layer_inputs_equal_replaying_the_model(family, batches):
    """GPTQ on cached per-layer inputs (2 layer forwards per layer) gives the weights of the reference's
    replay (a full forward up to each layer); gemma2 alternates attention masks, so it replays, with a note."""
    from outlierkit.llm.fixtures import tiny_model
    from outlierkit.llm.recipe import quantize_

    out = {}
    for cache in (True, False):
        model = tiny_model(family, num_hidden_layers=3) if family not in ("gpt2", "opt") else tiny_model(family)
        rep = quantize_(model, {"weight": "int4-channel", "act": None, "steps": [{"gptq": {"cache_inputs": cache}}]},
                        batches, baseline=False)
        out[cache] = ({n: p.detach().clone() for n, p in model.named_parameters()}, rep.warnings)
    for name, p in out[False][0].items():
        torch.testing.assert_close(out[True][0][name], p, rtol=0, atol=1e-6, msg=name)
    replayed = any("replays the earlier layers" in w for w in out[True][1])
    assert replayed == (family == "gemma2")
