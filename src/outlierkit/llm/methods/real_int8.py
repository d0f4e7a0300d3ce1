"""``real_int8``: run the recipe's W8A8 layers with real INT8 weights and integer GEMMs (``Int8Linear``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from outlierkit.llm.formats import Format, IntFormat
from outlierkit.llm.int8 import Int8Linear, int_mm_available
from outlierkit.llm.layers import QuantLinear, quant_layers, set_module, unwrapped_fqn
from outlierkit.llm.methods.base import METHODS, LayerRecord, QuantContext, QuantMethod


def real_int8_reason(q: QuantLinear) -> str:
    """Empty if ``q`` can run as :class:`Int8Linear` exactly as fake-quantized, else why not."""
    w, a = q.weight_format, q.act_format
    if q.kind == "experts":
        return "fused experts (3-D weights)"
    if q.out_format is not None:
        return f"output quantized ({q.out_format.label()})"

    def ok(f: Format | None, gran: tuple[str, ...]) -> bool:
        return (isinstance(f, IntFormat) and f.bits == 8 and f.symmetric and f.granularity in gran
                and f.dynamic and f.observer == "minmax")

    if not ok(w, ("channel", "token")):
        return f"weight {w.label() if w else 'float'} is not int8 symmetric per-channel min-max"
    if not ok(a, ("token",)):
        return f"activation {a.label() if a else 'float'} is not int8 symmetric dynamic per-token"
    if isinstance(w, IntFormat) and isinstance(a, IntFormat) and w.grid != a.grid:
        return f"weight grid {w.grid} differs from activation grid {a.grid}"
    return ""


@METHODS.register("real_int8")
@dataclass
class RealInt8(QuantMethod):
    """Replace fake-quantized W8A8 layers by :class:`~outlierkit.llm.int8.Int8Linear` (a final step).

    A layer qualifies when its weight format is int8 symmetric per-channel (min-max) and its input format
    int8 symmetric dynamic per-token, with no output quantization: then ``Int8Linear`` computes the same
    function, y = s_x s_w^T * (Q(x) Q(W)^T) + b, with int8 storage (1 byte per weight + one fp32 scale per
    output channel, the float weight is dropped) and ``torch._int_mm`` products accumulated in int32; the
    result equals the fake-quantized layer up to float rounding of the rescale. Other layers (per-tensor
    or static activations, other bit widths, FP8, experts, q/k/v outputs) stay fake-quantized and are
    listed in a warning. Place it after ``rtn`` (or ``spike_mp``).

    Args:
        real: integer GEMM (default True); False runs the same quantized math in float (for checking).
    """

    real: bool = True

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        records: list[LayerRecord] = []
        fallback: list[str] = []
        device = next(model.parameters()).device
        if self.real and not int_mm_available(device):
            ctx.notes.append(f"real_int8: torch._int_mm is unavailable on {device.type}; integer products run "
                             "through an exact fallback matmul (same results, slower)")
        wrapped = list(quant_layers(model))
        converted: list[Int8Linear] = []
        if not wrapped:
            ctx.notes.append("real_int8: no fake-quantized layer to convert; put real_int8 after rtn/spike_mp")
        for name, q in wrapped:
            fqn = unwrapped_fqn(name)
            if q.is_float:
                continue
            why = real_int8_reason(q)
            if why:
                fallback.append(f"{fqn} ({why})")
                records.append(LayerRecord(fqn, "real_int8", {"execution": "fake", "reason": why}))
                continue
            assert isinstance(q.act_format, IntFormat)
            lin = Int8Linear.from_float(q.inner, real=self.real, name=fqn, grid=q.act_format.grid)
            set_module(model, name, lin)
            converted.append(lin)
            records.append(LayerRecord(fqn, "real_int8", {
                "execution": "int8" if self.real else "int8-math-in-float",
                "weight_bytes": lin.weight_int8.numel() + 4 * lin.weight_scale.numel()}))
        if fallback:
            ctx.notes.append(f"real_int8: {len(fallback)} layer(s) stay fake-quantized (no real INT8 kernel for "
                             f"their formats): " + "; ".join(fallback[:8]) + (" ..." if len(fallback) > 8 else ""))
        if self.real and converted:
            probe = int8_speed_probe(max(converted, key=lambda q8: q8.in_features * q8.out_features))
            for r in records:
                if r.layer == probe["layer"]:
                    r.info.update({k: v for k, v in probe.items() if k != "layer"})
            slower = [k for k in ("float_ms", "bf16_ms") if probe[k] < probe["int8_ms"]]
            if slower:
                ctx.notes.append(
                    f"real_int8: on this machine Int8Linear is slower than the float linear: {probe['int8_ms']:.3g} ms "
                    f"vs {probe['float_ms']:.3g} ms ({probe['float_dtype']}) and {probe['bf16_ms']:.3g} ms (bf16) for "
                    f"{probe['tokens']} tokens at {probe['layer']} (measured now; CPUs without VNNI/AMX int8 "
                    "instructions run torch._int_mm slowly). Real INT8 saves memory here, not time")
        n_real = sum(1 for r in records if r.info.get("execution") != "fake")
        if n_real:
            ctx.notes.append(f"real_int8: {n_real} layer(s) run as Int8Linear; the layer_sqnr table lists only the "
                             "layers still fake-quantized (output_sqnr_db covers the whole model)")
        return records


@torch.no_grad()
def int8_speed_probe(q: Int8Linear, tokens: int = 16, reps: int = 3) -> dict[str, Any]:
    """Time ``q`` against the float linear of the same weight (model dtype and bf16) on ``tokens`` random rows:
    median of ``reps`` interleaved runs, in ms. So that ``real_int8`` can say when INT8 is slower here."""
    import statistics
    import time

    w = q.dequantized_weight()
    dev = w.device
    x = torch.randn(tokens, q.in_features, device=dev)
    x16, w16 = x.to(torch.bfloat16), w.to(torch.bfloat16)
    fns = {"float_ms": lambda: F.linear(x, w), "bf16_ms": lambda: F.linear(x16, w16), "int8_ms": lambda: q(x)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():
        f()
    for _ in range(reps):
        for k, f in fns.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {"layer": q.name, "tokens": tokens, "float_dtype": str(w.dtype).split(".")[-1],
            **{k: statistics.median(v) for k, v in times.items()}}


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (INT8 weights count one byte each)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
