"""``smoothquant``: migrate activation outliers into the weights with per-channel scales (Xiao et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from outlierkit.errors import ConfigError
from outlierkit.llm.calibrate import collect_input_stats
from outlierkit.llm.methods.base import (
    METHODS,
    LayerRecord,
    QuantContext,
    QuantMethod,
    float_module,
    fold_,
    in_weight,
    nothing_to_fold,
    resolve_groups,
    select_groups,
    tie_reduce,
)

# Published alpha per family (quant-anchors 2.3): OPT 0.5, Llama-2/3 0.85, Mistral/Mixtral 0.8, Falcon 0.6.
ALPHA_PRESETS: dict[str, float] = {"opt": 0.5, "bloom": 0.5, "llama": 0.85, "mistral": 0.8, "mixtral": 0.8}


@METHODS.register("smoothquant")
@dataclass
class SmoothQuant(QuantMethod):
    """SmoothQuant (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for
    Large Language Models", ICML 2023).

    For each producer -> linears group (norm -> q,k,v; norm -> gate,up; norm -> router + every expert)::

        a_j = max_t |X_tj| (calibration, pads masked),   w_j = max(max_{linears, o} |W_oj|, 1e-5)
        s_j = max(a_j^alpha / w_j^(1 - alpha), 1e-5),    norm.{weight,bias} /= s,   W[:, j] *= s_j

    which leaves the float model unchanged and makes X / s easier to quantize.

    Args:
        alpha: migration strength (default None = the family preset, 0.5 where there is none).
        folds: which fold kinds to smooth (default ``("norm",)`` as in the paper; ``"attn_v"`` adds
            v -> o, ``"linear"`` adds up -> down, both exact but not in the reference code).
        groups: only the fold groups whose first consumer linear matches one of these FQNs or ``re:`` regexes
            (default None: all; the planner's per-group choice writes them).
    """

    alpha: float | None = None
    folds: tuple[str, ...] = ("norm",)
    groups: list[str] | None = None
    transform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"smoothquant.alpha must be in [0, 1], got {self.alpha}")
        bad = set(self.folds) - {"norm", "attn_v", "linear"}
        if bad:
            raise ConfigError(f"smoothquant.folds: unknown kind(s) {sorted(bad)}; valid: norm, attn_v, linear")

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        alpha = self.alpha if self.alpha is not None else ALPHA_PRESETS.get(mm.spec.name, 0.5)
        groups = select_groups(resolve_groups(model, mm, tuple(self.folds), "smoothquant"), self.groups,
                               "smoothquant")
        if not groups:
            return nothing_to_fold(ctx, mm, "smoothquant", self.folds, "smoothed")
        stats = collect_input_stats(model, sorted({g.linears[0] for g in groups}), ctx.batches,
                                    sequential=ctx.sequential, device=ctx.device)
        records = []
        for g in groups:
            a = tie_reduce(stats[g.linears[0]].absmax.double(), g, "amax")  # (R,)
            w = torch.stack([tie_reduce(in_weight(float_module(model, n)).detach().abs().reshape(
                -1, in_weight(float_module(model, n)).shape[-1]).amax(0).double().cpu(), g, "amax")
                for n in g.linears]).amax(0).clamp(min=1e-5)  # (R,)
            s = (a.clamp(min=1e-5).pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)
            fold_(model, g, s)
            records.append(LayerRecord(g.name, "smoothquant", {
                "alpha": alpha, "s_min": float(s.min()), "s_max": float(s.max()),
                "act_absmax_before": float(a.max()), "act_absmax_after": float((a / s).max())}))
        return records
