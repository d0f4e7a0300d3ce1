"""Real INT8 execution (real_int8 step) against fake INT8, LLM.int8() against the naive decomposition, fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch

from outlierkit.llm import int8 as int8_mod
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import parse_format
from outlierkit.llm.int8 import Int8Linear, naive_llm_int8
from outlierkit.llm.layers import QuantLinear
from outlierkit.llm.methods.real_int8 import model_weight_bytes
from outlierkit.llm.recipe import quantize_

CAL = {"min_tokens": 64}



def _logits(m, batches):
    with torch.no_grad():
        return torch.cat([m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches])


def test_int8_linear_equals_fake_quant_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    x = torch.randn(3, 7, 96)
    x[..., 5] *= 40  # an outlier channel
    fake = QuantLinear(lin, weight=parse_format("int8-channel"), act=parse_format("int8-token"))
    real = Int8Linear.from_float(lin, real=True)
    with torch.no_grad():
        ref, y = fake(x), real(x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # INT8 storage: one byte per weight plus one fp32 scale per output channel
    assert real.weight_int8.dtype == torch.int8 and real.weight_scale.shape == (40,)


def test_real_int8_recipe_matches_fake(llama, batches):
    fake, real = copy.deepcopy(llama), copy.deepcopy(llama)
    rec = {"weight": "int8-channel", "act": "int8-token", "calib": CAL}
    quantize_(fake, {**rec, "steps": ["rtn"]}, batches, baseline=False)
    rep = quantize_(real, {**rec, "steps": ["rtn", "real_int8"]}, batches, baseline=False)
    n_int8 = sum(isinstance(m, Int8Linear) for m in real.modules())
    assert n_int8 == 14 and not any(isinstance(m, QuantLinear) for m in real.modules())
    a, b = _logits(fake, batches), _logits(real, batches)
    f = _logits(llama, batches)
    # same function up to float rounding of the rescale: far below the quantization error itself
    assert float((a - b).abs().max()) < 1e-3 * float((a - f).abs().max())
    assert any("14 layer(s) run as Int8Linear" in w for w in rep.warnings)
    # memory: the 14 block linears drop from 4 to ~1 byte per weight
    lin_params = sum(m.weight_int8.numel() for m in real.modules() if isinstance(m, Int8Linear))
    saved = model_weight_bytes(fake) - model_weight_bytes(real)
    assert saved >= 3 * lin_params - 4 * 14 * 128


def test_real_int8_falls_back_for_other_formats(llama, batches):
    m = copy.deepcopy(llama)
    rep = quantize_(m, {"weight": "int8-channel", "act": "int8-tensor", "calib": CAL,
                        "overrides": {"re:.*q_proj": {"act": "int8-token"}},
                        "steps": ["rtn", "real_int8"]}, batches, baseline=False)
    assert sum(isinstance(q, Int8Linear) for q in m.modules()) == 2  # the two q_proj
    assert sum(isinstance(q, QuantLinear) for q in m.modules()) == 12
    assert any("12 layer(s) stay fake-quantized" in w and "not int8 symmetric dynamic per-token" in w
               for w in rep.warnings)


def test_int_mm_unavailable_falls_back_with_a_warning(monkeypatch):
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 24)
    x = torch.randn(5, 64)
    fast = Int8Linear.from_float(lin)
    monkeypatch.setitem(int8_mod._INT_MM_OK, "cpu", False)
    with pytest.warns(UserWarning, match="unavailable"):
        slow = Int8Linear.from_float(lin)
    assert torch.equal(fast(x), slow(x))  # both integer-exact


def test_llm_int8_layer_matches_naive_decomposition():
    torch.manual_seed(2)
    lin = torch.nn.Linear(80, 48, bias=False)
    x = torch.randn(9, 80)
    x[:, [3, 41]] *= 20  # outlier columns
    x[2, 60] = 7.0  # one token over the threshold makes its whole column an outlier column
    ref = naive_llm_int8(x, lin.weight.detach(), 6.0)
    for real in (True, False):
        q = Int8Linear.from_float(lin, threshold=6.0, real=real)
        y = q(x)
        assert q.last_outlier_columns == int((x.abs().amax(0) >= 6.0).sum()) >= 3
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the decomposition matters: plain vector-wise W8A8 is further from the float result
    plain = Int8Linear.from_float(lin)(x)
    exact = x @ lin.weight.detach().t()
    assert (plain - exact).norm() > 3 * (ref - exact).norm()


def test_llm_int8_method(llama, batches):
    outs = {}
    for real in (True, False):
        m = copy.deepcopy(llama)
        rep = quantize_(m, {"calib": CAL, "steps": [{"llm_int8": {"real": real}}],
                            "overrides": {"re:.*\\.0\\.mlp\\.down_proj": "skip"}}, batches, baseline=False)
        q = [x for x in m.modules() if isinstance(x, Int8Linear)]
        assert len(q) == 13 and all(x.threshold == 6.0 and x.real == real for x in q)
        rows = {r["layer"]: r for r in rep.tables["transforms"]}
        assert rows["model.layers.0.mlp.down_proj"]["precision"] == "float"
        # the planted outlier channels (5, 17) exceed 6.0 after the norms
        assert rows["model.layers.0.self_attn.q_proj"]["outlier_cols_max"] >= 2
        outs[real] = _logits(m, batches)
    f = _logits(llama, batches)
    assert float((outs[True] - outs[False]).abs().max()) < 0.05 * float((outs[False] - f).abs().max())


def test_llm_int8_fused_experts_reported():
    m = tiny_model("mixtral")
    from outlierkit.llm.methods import QuantContext
    from outlierkit.llm.methods.llm_int8 import LLMInt8

    recs = LLMInt8().apply(m, QuantContext([]))
    ex = [r for r in recs if "experts" in r.layer]
    assert ex and all(r.info["precision"] == "float" and "kept in float" in r.info["reason"] for r in ex)
    m2 = tiny_model("mixtral")
    recs = LLMInt8(experts="int8").apply(m2, QuantContext([]))
    assert any(isinstance(x, QuantLinear) and x.kind == "experts" for x in m2.modules())


def test_real_int8_step_without_int_mm_notes_and_still_matches(monkeypatch):
    from outlierkit.llm.methods import QuantContext
    from outlierkit.llm.methods.real_int8 import RealInt8
    from outlierkit.llm.methods.rtn import RTN

    torch.manual_seed(3)
    m = tiny_model("llama", plant=False)
    ctx = QuantContext([], parse_format("int8-channel"), parse_format("int8-token"))
    RTN().apply(m, ctx)
    ids = torch.randint(1000, 5000, (2, 12))
    with torch.no_grad():
        fake = m(input_ids=ids).logits
    monkeypatch.setitem(int8_mod._INT_MM_OK, "cpu", False)
    with pytest.warns(UserWarning, match="unavailable"):
        RealInt8().apply(m, ctx)
    assert any("unavailable" in n for n in ctx.notes)
    with torch.no_grad():
        real = m(input_ids=ids).logits
    assert float((real - fake).abs().max()) < 1e-4 * float(fake.abs().max())


def test_real_int8_warns_when_int8_is_slower_than_float_here(llama, batches, monkeypatch):
    """real_int8 measures Int8Linear against the float and bf16 linear on this machine and says when it is slower."""
    import outlierkit.llm.methods.real_int8 as ri

    calls = []

    def fake_probe(q, tokens=16, reps=3):
        calls.append(q.name)
        return {"layer": q.name, "tokens": tokens, "float_dtype": "float32", "float_ms": 1.0, "bf16_ms": 2.0,
                "int8_ms": 3.0}

    monkeypatch.setattr(ri, "int8_speed_probe", fake_probe)
    rec = {"weight": "int8-channel", "act": "int8-token", "calib": {"min_tokens": 64}, "steps": ["rtn", "real_int8"]}
    rep = quantize_(copy.deepcopy(llama), rec, batches, baseline=False)
    assert calls and any("slower than the float linear" in w for w in rep.warnings)
    monkeypatch.setattr(ri, "int8_speed_probe", lambda q, tokens=16, reps=3: {**fake_probe(q), "int8_ms": 0.5})
    rep = quantize_(copy.deepcopy(llama), rec, batches, baseline=False)
    assert not any("slower than the float linear" in w for w in rep.warnings)
    probe = ri.int8_speed_probe(ri.Int8Linear(torch.randn(8, 16), name="x"), tokens=2, reps=1)
    assert probe["int8_ms"] > 0 and probe["bf16_ms"] > 0 and probe["layer"] == "x"
