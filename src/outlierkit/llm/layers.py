"""``QuantLinear``: one wrapper that fake-quantizes the weight and input activation of a linear layer.

It wraps ``nn.Linear``, GPT-2 ``Conv1D`` (weight stored (in, out)) and transformers-5 fused MoE experts
(3-D ``gate_up_proj`` (E, 2I, C) / ``down_proj`` (E, C, I)); optionally it also fake-quantizes its output
(the q/k/v outputs that feed the attention matmuls), and with no formats it keeps the layer in full
precision. On demand it records its own SQNR against the float output of the same input.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from outlierkit.llm.formats import Format, IntFormat, RangeObserver, fake_quant, weight_fake_quant
from outlierkit.llm.models import get_attr, is_fused_experts, is_linear


class QuantLinear(nn.Module):
    """Fake-quantized linear layer: y = Q_a(x) Q_w(W)^T + b  (optionally y <- Q_o(y)).

    Args:
        inner: the float module (``nn.Linear``, ``Conv1D`` or fused experts); kept, so unwrapping or
            exporting gives back the float weights.
        weight: weight format (default None = keep float weights).
        act: input-activation format (default None = keep float inputs). Static int formats use the
            range set by :meth:`calibrate_ranges_` (``act_lo``/``act_hi`` buffers).
        out: output format (default None); used for q/k/v outputs (attention matmul inputs).
        name: the layer's fully-qualified name, for reports.

    Shapes:
        Linear / Conv1D: x (..., C_in) -> (..., C_out). Experts: the experts' own signature
        (hidden (N, C), top_k_index (N, k), top_k_weights (N, k)) -> (N, C).
    """

    act_range: torch.Tensor
    inner: Any  # nn.Linear / Conv1D / fused experts: attribute access is duck-typed

    def __init__(self, inner: nn.Module, *, weight: Format | None = None, act: Format | None = None,
                 out: Format | None = None, name: str = "") -> None:
        super().__init__()
        if not (is_linear(inner) or is_fused_experts(inner)):
            raise TypeError(f"{name or type(inner).__name__} is not a linear layer or fused experts module")
        self.inner = inner
        self.weight_format = weight
        self.act_format = act
        self.out_format = out
        self.name = name
        self.kind = "experts" if is_fused_experts(inner) else ("conv1d" if type(inner).__name__ == "Conv1D"
                                                                else "linear")
        # Static activation ranges (per tensor); index 0: the input, index 1: experts' down_proj input.
        self.register_buffer("act_range", torch.full((2, 2), math.nan), persistent=False)
        self.observing = False
        self._observers: list[RangeObserver] = []
        self.recording = False
        self.signal = 0.0
        self.noise = 0.0
        self.in_absmax = 0.0
        self._wq: list[torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------ weights
    @property
    def is_float(self) -> bool:
        return self.weight_format is None and self.act_format is None and self.out_format is None

    def weight_matrices(self) -> list[torch.Tensor]:
        """The float weights as (out, in) [(E, out, in) for experts]."""
        if self.kind == "experts":
            return [self.inner.gate_up_proj, self.inner.down_proj]
        w = self.inner.weight
        return [w.t() if self.kind == "conv1d" else w]

    def refresh_(self) -> None:
        """Drop the cached quantized weights (call after editing the float weights)."""
        self._wq = None

    def quantized_weights(self) -> list[torch.Tensor]:
        if self._wq is None:
            with torch.no_grad():
                self._wq = [_quant_weight(w.detach(), self.weight_format) for w in self.weight_matrices()]
        return self._wq

    # ------------------------------------------------------------------------------------ activations
    def _qa(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        fmt = self.act_format
        if fmt is None:
            return x
        if self.observing:
            while len(self._observers) <= slot:
                assert isinstance(fmt, IntFormat)
                self._observers.append(RangeObserver(fmt))
            self._observers[slot].update(x)
            return x
        if isinstance(fmt, IntFormat) and not fmt.dynamic:
            lo, hi = self.act_range[slot]
            if torch.isnan(lo):
                raise RuntimeError(f"{self.name}: static activation range not calibrated; run calibrate_ranges_")
            return fake_quant(x, fmt, (lo, hi))
        return fake_quant(x, fmt)

    @property
    def needs_calibration(self) -> bool:
        return isinstance(self.act_format, IntFormat) and not self.act_format.dynamic

    def finish_observing_(self) -> None:
        for slot, obs in enumerate(self._observers):
            lo, hi = obs.range()
            self.act_range[slot, 0], self.act_range[slot, 1] = lo, hi
        self._observers = []
        self.observing = False

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.observing or self.is_float:
            y = self._forward_quant(x, *args, float_only=True, **kwargs)
        else:
            y = self._forward_quant(x, *args, **kwargs)
        if self.recording and not self.observing:
            with torch.no_grad():
                self.in_absmax = max(self.in_absmax, float(x.detach().abs().max())) if x.numel() else 0.0
                ref = self.inner(x, *args, **kwargs).float()
                self.signal += ref.double().pow(2).sum().item()
                self.noise += (ref.double() - y.detach().double()).pow(2).sum().item()
        return y

    def _forward_quant(self, x: torch.Tensor, *args: Any, float_only: bool = False, **kwargs: Any) -> torch.Tensor:
        if float_only and not self.observing:
            return self.inner(x, *args, **kwargs)
        if self.kind == "experts":
            return self._experts(x, args[0] if args else kwargs["top_k_index"],
                                 args[1] if len(args) > 1 else kwargs["top_k_weights"], float_only)
        w = self.weight_matrices()[0] if float_only else self.quantized_weights()[0]
        y = F.linear(self._qa(x, 0), w, self.inner.bias)
        return y if float_only else fake_quant(y, self.out_format)

    def _experts(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 float_only: bool = False) -> torch.Tensor:
        """The transformers-5 fused experts loop with fake-quantized weights and inputs."""
        ex = self.inner
        gate_up, down = self.weight_matrices() if float_only else self.quantized_weights()
        out = torch.zeros_like(hidden)  # (N, C)
        n_exp = gate_up.shape[0]
        xq = self._qa(hidden, 0)
        mask = F.one_hot(top_k_index, num_classes=n_exp + 1).permute(2, 1, 0)  # (E+1, k, N)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            if e == n_exp:
                continue
            pos, tok = torch.where(mask[e])
            g, u = F.linear(xq[tok], gate_up[e]).chunk(2, dim=-1)
            h = self._qa(ex.act_fn(g) * u, 1)  # (n_e, I)
            h = F.linear(h, down[e]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        return out

    # ------------------------------------------------------------------------------------ reporting
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf if self.signal > 0 else math.nan
        return 10 * math.log10(max(self.signal, 1e-300) / self.noise)

    # Let code that reads ``proj.weight`` / ``proj.bias`` (e.g. dtype checks) see the float module's.
    @property
    def weight(self) -> torch.Tensor:
        w: torch.Tensor = self.inner.weight
        return w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.inner, "bias", None)

    def extra_repr(self) -> str:
        def lab(f: Format | None) -> str:
            return "float" if f is None else f.label()

        return f"{self.kind}, w={lab(self.weight_format)}, a={lab(self.act_format)}, out={lab(self.out_format)}"


def _quant_weight(w: torch.Tensor, fmt: Format | None) -> torch.Tensor:
    """Weights: ``tensor`` granularity on 3-D experts means one scale per expert."""
    if fmt is None:
        return w
    if w.dim() == 3 and fmt.granularity == "tensor":
        return torch.stack([weight_fake_quant(w[e], fmt) for e in range(w.shape[0])])
    return weight_fake_quant(w, fmt)


# ---------------------------------------------------------------------------------------- model surgery

def set_module(model: nn.Module, fqn: str, module: nn.Module) -> None:
    parent, _, child = fqn.rpartition(".")
    owner: Any = get_attr(model, parent) if parent else model
    if child.isdigit():
        owner[int(child)] = module
    else:
        setattr(owner, child, module)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod


def wrap_(model: nn.Module, fqn: str, *, weight: Format | None, act: Format | None,
          out: Format | None = None) -> QuantLinear:
    """Replace the module at ``fqn`` by a :class:`QuantLinear` (or update the existing wrapper)."""
    mod = get_attr(model, fqn)
    if isinstance(mod, QuantLinear):
        mod.weight_format, mod.act_format, mod.out_format = weight, act, out
        mod.refresh_()
        return mod
    ql = QuantLinear(mod, weight=weight, act=act, out=out, name=fqn)
    set_module(model, fqn, ql)
    return ql


def unwrap_(model: nn.Module) -> nn.Module:
    """Put the float modules back (their weights include every equivalence transform applied)."""
    for name, ql in list(quant_layers(model)):
        set_module(model, name, ql.inner)
    return model


def set_recording_(model: nn.Module, on: bool, reset: bool = True) -> None:
    for _, ql in quant_layers(model):
        ql.recording = on
        if reset:
            ql.signal = ql.noise = ql.in_absmax = 0.0


def unwrapped_fqn(name: str) -> str:
    return re.sub(r"\.inner(?=\.|$)", "", name)
