"""``llm_int8``: LLM.int8() vector-wise INT8 with the outlier columns computed in floating point."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from outlierkit.errors import ConfigError
from outlierkit.llm.formats import IntFormat
from outlierkit.llm.int8 import Int8Linear, int_mm_available
from outlierkit.llm.layers import QuantLinear, set_module, wrap_
from outlierkit.llm.methods.base import METHODS, LayerRecord, QuantContext, QuantMethod, float_module
from outlierkit.llm.models import get_attr, is_fused_experts


@METHODS.register("llm_int8")
@dataclass
class LLMInt8(QuantMethod):
    """LLM.int8() (Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
    NeurIPS 2022; reference: ModelTC/llmc ``llmint8.py``, quant-anchors 2.5).

    Every block linear becomes an :class:`~outlierkit.llm.int8.Int8Linear` with INT8 weights (per output
    channel, absmax / 127) and, per input batch X (tokens x in)::

        O = {j : max_t |X_tj| >= threshold}
        Y = X[:, O] W^[:, O]^T  +  s_x s_w^T * (Q(X[:, ~O]) Q(W[:, ~O])^T)     (int32 accumulation)

    with per-token activation scales s_x. ``W^`` is the dequantized INT8 weight (the weights are stored
    once, as INT8; the paper keeps the outlier columns of W in FP16, a difference of one INT8 rounding
    on those columns). The recipe's ``weight``/``act`` formats are not used (the method fixes them);
    overrides with ``skip`` keep layers in float.

    Fused MoE experts (3-D weights): the decomposition needs per-expert matmuls on routed tokens, which
    ``Int8Linear`` does not cover; ``experts: float`` (default) keeps them in float, ``experts: int8``
    fake-quantizes them vector-wise (int8 per-channel weights, int8 per-token inputs) without the outlier
    decomposition. Both are reported.

    Args:
        threshold: outlier threshold on max |x| per input column (default 6.0, the paper's).
        real: integer GEMM via ``torch._int_mm`` (default True; falls back to an exact int32 matmul with a
            warning where unavailable); False: the same math in float (fake quantization).
        experts: ``float`` (default) or ``int8`` for fused experts.
    """

    threshold: float = 6.0
    real: bool = True
    experts: Literal["float", "int8"] = "float"

    def __post_init__(self) -> None:
        if not self.threshold > 0:
            raise ConfigError(f"llm_int8.threshold must be positive, got {self.threshold}")
        if self.experts not in ("float", "int8"):
            raise ConfigError(f"llm_int8.experts must be float or int8, got {self.experts!r}")

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        records: list[LayerRecord] = []
        converted: list[Int8Linear] = []
        device = next(model.parameters()).device
        if self.real and not int_mm_available(device):
            ctx.notes.append(f"llm_int8: torch._int_mm is unavailable on {device.type}; the integer products run "
                             "through an exact int32/float64 fallback (same results, slower)")
        for fqn in mm.linears:
            _, _, skipped = ctx.formats_for(fqn)
            mod = float_module(model, fqn)
            if skipped:
                records.append(LayerRecord(fqn, "llm_int8", {"precision": "float", "reason": "override: skip"}))
                continue
            if is_fused_experts(mod):
                if self.experts == "int8":
                    wrap_(model, fqn, weight=IntFormat(8, granularity="channel"), act=IntFormat(8, granularity="token"))
                    why = "fused experts: vector-wise int8 fake quantization, no outlier decomposition"
                else:
                    why = "fused experts kept in float (no per-expert decomposition)"
                records.append(LayerRecord(fqn, "llm_int8", {"precision": self.experts, "reason": why}))
                continue
            if isinstance(get_attr(model, fqn), QuantLinear):
                set_module(model, fqn, mod)
            q = Int8Linear.from_float(mod, threshold=self.threshold, real=self.real, name=fqn)
            set_module(model, fqn, q)
            converted.append(q)
        # One pass over the calibration batches to report how many outlier columns each layer sees.
        seen: dict[str, int] = {q.name: 0 for q in converted}
        if ctx.batches and converted:
            hooks = [q.register_forward_hook(lambda m, i, o: seen.__setitem__(
                m.name, max(seen[m.name], m.last_outlier_columns))) for q in converted]
            from outlierkit.llm.sequential import forward_each

            try:
                forward_each(model, ctx.batches)
            finally:
                for h in hooks:
                    h.remove()
        for q in converted:
            records.append(LayerRecord(q.name, "llm_int8", {
                "precision": "int8 vector-wise + float outliers", "threshold": self.threshold, "real": self.real,
                "outlier_cols_max": seen[q.name], "in_features": q.in_features}))
        return records
