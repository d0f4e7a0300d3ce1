"""Fake-quantization formats against naive references, plus hypothesis properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from outlierkit.errors import ConfigError
from outlierkit.llm.formats import (
    FP8Format,
    IntFormat,
    RangeObserver,
    fake_quant,
    parse_format,
    quant_step,
    weight_fake_quant,
)


def naive_int(x: torch.Tensor, bits: int, symmetric: bool, granularity: str, group: int | None = None) -> torch.Tensor:
    """Element loops over granules, formulas written out (quant-anchors 2.6)."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    out = torch.empty_like(x2)
    if granularity == "tensor":
        granules = [[(r, c) for r in range(x2.shape[0]) for c in range(x2.shape[1])]]
    elif granularity in ("channel", "token"):
        granules = [[(r, c) for c in range(x2.shape[1])] for r in range(x2.shape[0])]
    else:
        assert group is not None
        granules = [[(r, c) for c in range(g, g + group)] for r in range(x2.shape[0])
                    for g in range(0, x2.shape[1], group)]
    for idx in granules:
        vals = [float(x2[r, c]) for r, c in idx]
        lo, hi = min(vals), max(vals)
        if symmetric:
            qmax = 2 ** (bits - 1) - 1
            s = max(abs(lo), abs(hi)) / qmax or 1.0
            for r, c in idx:
                out[r, c] = max(-qmax, min(qmax, round(float(x2[r, c]) / s))) * s
        else:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            s = (hi - lo) / (2**bits - 1) or 1.0
            zp = max(0, min(2**bits - 1, -round(lo / s)))
            for r, c in idx:
                q = max(0, min(2**bits - 1, round(float(x2[r, c]) / s) + zp))
                out[r, c] = (q - zp) * s
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "group"])
def test_int_matches_naive(bits, symmetric, granularity):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64) * 3 + 0.5
    fmt = IntFormat(bits, symmetric, granularity, group_size=4 if granularity == "group" else None)
    got = fake_quant(x, fmt)
    ref = naive_int(x, bits, symmetric, granularity, 4)
    # torch.round and Python round both round half to even
    assert torch.allclose(got, ref, atol=1e-12), (got - ref).abs().max()


@pytest.mark.parametrize("kind,fmax", [("e4m3", 448.0), ("e5m2", 57344.0)])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fp8_matches_reference(kind, fmax, granularity):
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)) * 7
    fmt = FP8Format(kind, granularity)
    got = fake_quant(x, fmt)
    dt = torch.float8_e4m3fn if kind == "e4m3" else torch.float8_e5m2
    for r in range(x.shape[0]):
        rows = x[r] if granularity == "channel" else x
        s = rows.abs().max() / fmax
        ref = (x[r] / s).clamp(-fmax, fmax).to(dt).float() * s
        assert torch.equal(got[r], ref)
    unscaled = fake_quant(x, FP8Format(kind, scaled=False))
    assert torch.equal(unscaled, x.clamp(-fmax, fmax).to(dt).float())


def test_fp8_relative_error_bound():
    x = torch.randn(1000) * 100
    err = (fake_quant(x, FP8Format("e4m3")) - x).abs()
    big = x.abs() > x.abs().max() / 64  # normal range: 3 mantissa bits -> rel. error <= 2^-4
    assert (err[big] / x[big].abs()).max() <= 2**-4 + 1e-6


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)
tensors = st.lists(finite, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32).reshape(1, -1))
formats = st.builds(IntFormat, bits=st.integers(2, 8), symmetric=st.booleans(),
                    granularity=st.sampled_from(["tensor", "token"]))


@settings(max_examples=150, deadline=None)
@given(x=tensors, fmt=formats)
def test_roundtrip_within_half_step(x, fmt):
    q = fake_quant(x, fmt)
    step = quant_step(x, fmt).reshape(-1)[0]
    assert ((q - x).abs() <= step / 2 * (1 + 1e-5) + 1e-30).all()


@settings(max_examples=150, deadline=None)
@given(x=tensors, fmt=formats)
@example(x=torch.tensor([[9998.0, -9998.0]]), fmt=IntFormat(3, symmetric=False))  # float rounding left code 7 unused
def test_idempotent_and_exact_grid(x, fmt):
    q = fake_quant(x, fmt)
    q2 = fake_quant(q, fmt)
    step = quant_step(x, fmt).reshape(-1)[0]
    assert torch.allclose(q2, q, rtol=1e-5, atol=float(step) * 1e-4)
    codes = q.double() / float(step)
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # on the integer grid
    assert codes.round().abs().max() <= 2**fmt.bits - 1


@pytest.mark.parametrize("fmt", [IntFormat(8), IntFormat(4, False, "token"), IntFormat(6, True, "group", 4),
                                 FP8Format(), FP8Format("e5m2", "channel")])
@pytest.mark.parametrize("value", [0.0, 3.25, -7.0])
def test_zero_and_constant_inputs_are_finite(fmt, value):
    x = torch.full((3, 8), value)
    q = fake_quant(x, fmt)
    assert torch.isfinite(q).all()
    if value == 0.0:
        assert torch.equal(q, x)
    else:
        assert torch.allclose(q, x, rtol=0.07)


def test_bad_formats_are_config_errors():
    for bad in (1, 9, 0, 16):
        with pytest.raises(ConfigError, match="2..8"):
            IntFormat(bits=bad)
    with pytest.raises(ConfigError, match="group_size"):
        IntFormat(4, granularity="group")
    with pytest.raises(ConfigError, match="does not divide"):
        fake_quant(torch.randn(2, 10), IntFormat(4, granularity="group", group_size=4))
    with pytest.raises(ConfigError, match="static"):
        IntFormat(8, granularity="token", dynamic=False)
    with pytest.raises(ConfigError, match="cannot read"):
        parse_format("float7")
    with pytest.raises(ConfigError, match="unknown key"):
        parse_format({"bitz": 8})


def test_parse_short_strings():
    assert parse_format("int8") == IntFormat(8)
    assert parse_format("int6-asym-token") == IntFormat(6, False, "token")
    assert parse_format("int4-g32") == IntFormat(4, True, "group", 32)
    assert parse_format("int8-static") == IntFormat(8, dynamic=False)
    assert parse_format("fp8-e5m2-channel") == FP8Format("e5m2", "channel")
    assert parse_format("none") is None
    assert parse_format({"bits": 4, "granularity": "channel"}) == IntFormat(4, granularity="channel")


def test_static_observers():
    xs = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0])]
    for name, expect in (("minmax", (-3.0, 2.0)), ("avg_minmax", (-2.0, 1.5))):
        obs = RangeObserver(IntFormat(8, dynamic=False, observer=name))  # type: ignore[arg-type]
        for x in xs:
            obs.update(x)
        assert obs.range() == expect
    # a heavy tail: the MSE clip is inside the min-max range and has lower error than min-max
    x = torch.cat([torch.randn(5000), torch.tensor([60.0])])
    fmt = IntFormat(4, dynamic=False, observer="mse")
    obs = RangeObserver(fmt)
    obs.update(x)
    lo, hi = obs.range()
    assert hi < 60.0
    e_mse = (fake_quant(x, fmt, (torch.tensor(lo), torch.tensor(hi))) - x).pow(2).mean()
    e_mm = (fake_quant(x, fmt, (x.min(), x.max())) - x).pow(2).mean()
    assert e_mse < e_mm
    p = RangeObserver(IntFormat(8, dynamic=False, observer="percentile", percentile=99.0))
    p.update(x)
    assert p.range()[1] < 5.0


def test_weight_mse_clip_not_worse_than_minmax():
    w = torch.randn(16, 64)
    w[0, 0] = 40.0
    fmt_mm, fmt_mse = IntFormat(4, granularity="channel"), IntFormat(4, granularity="channel", observer="mse")
    e_mm = (weight_fake_quant(w, fmt_mm) - w).pow(2).sum(-1)
    e_mse = (weight_fake_quant(w, fmt_mse) - w).pow(2).sum(-1)
    assert (e_mse <= e_mm + 1e-6).all() and e_mse.sum() < e_mm.sum()
    assert not math.isnan(float(e_mse.sum()))


def test_nan_in_a_symmetric_group_is_not_quantized_with_scale_one():
    """Regression (issue 10): one NaN made the group's scale NaN, replaced by 1, so the finite values were
    rounded to integers. Now the granule is NaN (what the engines compute), visibly."""
    x = torch.tensor([[0.013, -0.02, float("nan"), 0.005], [0.5, -0.25, 0.125, 0.1]])
    for fmt in (IntFormat(8, granularity="token"), IntFormat(4, granularity="group", group_size=2),
                IntFormat(8, symmetric=False, granularity="token"), FP8Format(granularity="token")):
        q = fake_quant(x, fmt)
        bad = q[0] if fmt.granularity == "token" else q[0, 2:]
        assert torch.isnan(bad).all(), fmt
        assert torch.isfinite(q[1]).all() and torch.allclose(q[1], x[1], atol=0.04)  # half an int4 step
        if fmt.granularity == "group":
            assert torch.allclose(q[0, :2], x[0, :2], atol=0.01)  # the other group keeps its own scale


@pytest.mark.parametrize("strategy", ["token", "tensor"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_ct_grid_equals_compressed_tensors_fake_quantize(strategy, bits, symmetric):
    """grid ct reproduces compressed-tensors' own dynamic quantizer (calculate_qparams + fake_quantize) bit for bit."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-2, 2, 64)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, dynamic=True)
    if strategy == "tensor":
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    else:
        lo, hi = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    scale, zp = calculate_qparams(lo, hi, args)
    ref = fake_quantize(x, scale, zp, args)
    ours = fake_quant(x, IntFormat(bits, symmetric, granularity=strategy, grid="ct"))
    assert torch.equal(ours, ref)
    if symmetric:
        vllm = fake_quant(x, IntFormat(bits, granularity=strategy))
        assert not torch.equal(vllm, ref)  # absmax / 127 vs / 127.5: the two engines really differ


def test_static_grid_uses_the_engines_clamp_range():
    """Static scales: codes saturate to [-128, 127] as vLLM's and compressed-tensors' kernels do."""
    fmt = IntFormat(8, dynamic=False)
    q = fake_quant(torch.tensor([[-5.0, 5.0, 0.5]]), fmt, (torch.tensor(-1.27), torch.tensor(1.27)))
    assert torch.allclose(q, torch.tensor([[-1.28, 1.27, 0.5]]))
