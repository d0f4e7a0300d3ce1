"""QuantLinear: naive references for Linear / Conv1D / fused experts, skip, SQNR recording, unwrap."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from outlierkit.llm.formats import FP8Format, IntFormat, fake_quant
from outlierkit.llm.layers import QuantLinear, quant_layers, set_recording_, unwrap_, wrap_


def test_linear_matches_manual_fake_quant():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(2, 5, 16)
    wf, af, of = IntFormat(4, granularity="channel"), IntFormat(8, granularity="token"), IntFormat(8)
    q = QuantLinear(lin, weight=wf, act=af, out=of)
    ref = fake_quant(F.linear(fake_quant(x, af), fake_quant(lin.weight, wf), lin.bias), of)
    assert torch.equal(q(x), ref)
    assert torch.equal(q.weight, lin.weight)


def test_conv1d_equals_linear():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    conv = Conv1D(8, 16)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.t())
        conv.bias.copy_(lin.bias)
    x = torch.randn(3, 16)
    fmt = dict(weight=IntFormat(6, granularity="channel"), act=IntFormat(6, False))
    assert torch.allclose(QuantLinear(conv, **fmt)(x), QuantLinear(lin, **fmt)(x), atol=1e-6)


def test_fused_experts_float_and_quantized():
    from outlierkit.llm.fixtures import tiny_model

    model = tiny_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    torch.manual_seed(0)
    h = torch.randn(6, 64)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [0, 2], [1, 3]])
    w = torch.rand(6, 2)
    ref = experts(h, idx, w)
    assert torch.equal(QuantLinear(experts)(h, idx, w), ref)  # no formats: the float module itself
    wf, af = IntFormat(8, granularity="channel"), IntFormat(8, granularity="token")
    q = QuantLinear(experts, weight=wf, act=af)
    # naive: the same loop, per-expert fake-quantized weights and inputs
    out = torch.zeros_like(h)
    for t in range(6):
        for k in range(2):
            e = int(idx[t, k])
            g, u = F.linear(fake_quant(h[t:t + 1], af), fake_quant(experts.gate_up_proj[e], wf)).chunk(2, -1)
            a = fake_quant(experts.act_fn(g) * u, af)
            out[t] += (F.linear(a, fake_quant(experts.down_proj[e], wf)) * w[t, k])[0]
    assert torch.allclose(q(h, idx, w), out, atol=1e-5)
    assert not torch.allclose(q(h, idx, w), ref, atol=1e-6)


def test_float_override_sqnr_and_unwrap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(10, 8)
    ref = model(x)
    wrap_(model, "0", weight=IntFormat(4), act=IntFormat(4))
    wrap_(model, "2", weight=None, act=None)  # kept in full precision
    assert isinstance(model[0], QuantLinear) and model[2].is_float
    set_recording_(model, True)
    y = model(x)
    set_recording_(model, False, reset=False)
    q0, q2 = model[0], model[2]
    assert math.isfinite(q0.sqnr_db()) and 5 < q0.sqnr_db() < 40
    assert q2.sqnr_db() == math.inf
    assert not torch.allclose(y, ref)
    wrap_(model, "0", weight=FP8Format(), act=FP8Format())
    assert model[0].sqnr_db() == q0.sqnr_db() and isinstance(model[0].weight_format, FP8Format)
    unwrap_(model)
    assert not list(quant_layers(model))
    assert torch.equal(model(x), ref)


def test_static_range_needs_calibration():
    q = QuantLinear(nn.Linear(4, 4), act=IntFormat(8, dynamic=False), name="l")
    assert q.needs_calibration
    try:
        q(torch.randn(2, 4))
    except RuntimeError as e:
        assert "not calibrated" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected an error")
    q.observing = True
    q(torch.tensor([[-2.0, 1.0, 0.0, 0.5]]))
    q.finish_observing_()
    assert q.act_range[0].tolist() == [-2.0, 1.0]
    assert torch.isfinite(q(torch.randn(2, 4))).all()
