"""``rtn``: round-to-nearest fake quantization of every block linear with the recipe's formats."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from outlierkit.errors import ConfigError
from outlierkit.llm.layers import QuantLinear, wrap_
from outlierkit.llm.methods.base import METHODS, LayerRecord, QuantContext, QuantMethod

# q/k/v projections (separate or fused): their outputs are the attention matmul inputs.
_QKV = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|query|key|value|c_attn|qkv_proj|query_key_value)$")


@METHODS.register("rtn")
@dataclass
class RTN(QuantMethod):
    """Round-to-nearest: wrap every projection inside the blocks in a :class:`QuantLinear`.

    x^ = s clamp(round(x / s), qmin, qmax) for weights and input activations, with the formats of the
    recipe (``weight``, ``act``, optional ``qkv_out``) and its per-layer overrides; static activation
    ranges are calibrated on the calibration batches. Nothing outside the blocks (embeddings, LM head)
    is quantized.

    Args:
        include_experts: also quantize fused MoE experts (default True).
    """

    include_experts: bool = True

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        records: list[LayerRecord] = []
        wrapped: list[QuantLinear] = []
        for fqn in mm.linears:
            weight, act, skipped = ctx.formats_for(fqn)
            out = ctx.qkv_out if (_QKV.search(fqn) and not skipped) else None
            ql = wrap_(model, fqn, weight=weight, act=act, out=out)
            if ql.kind == "experts" and not self.include_experts:
                ql.weight_format = ql.act_format = None
            try:
                ql.quantized_weights()  # surface format errors (group size vs dimension) now
            except ConfigError as e:
                raise ConfigError(f"{fqn}: {e}") from None
            wrapped.append(ql)
            records.append(LayerRecord(fqn, "rtn", {
                "weight": weight.label() if weight else "float", "act": act.label() if act else "float",
                "qkv_out": out.label() if out else "", "skipped": skipped}))
        need = [q for q in wrapped if q.needs_calibration]
        if need:
            if not ctx.batches:
                from outlierkit.errors import DataError
                raise DataError("static activation ranges need calibration batches")
            for q in need:
                q.observing = True
            from outlierkit.llm.sequential import forward_each

            try:
                forward_each(model, ctx.batches)
            finally:
                for q in need:
                    if q._observers:
                        q.finish_observing_()
                    q.observing = False
            by_name = {r.layer: r for r in records}
            for q in need:
                lo, hi = q.act_range[0].tolist()
                by_name[q.name].info.update(act_lo=lo, act_hi=hi)
        return records
