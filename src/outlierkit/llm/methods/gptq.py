"""``gptq``: second-order weight quantization with column-wise error compensation (Frantar et al. 2023)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from outlierkit._utils import HookSet
from outlierkit.errors import ConfigError, DataError, NumericalError
from outlierkit.llm.calibrate import token_rows
from outlierkit.llm.corpus import Batch
from outlierkit.llm.formats import IntFormat, int_fake_quant, int_qparams, minmax
from outlierkit.llm.hadamard import OnlineQuantLinear
from outlierkit.llm.layers import QuantLinear, quant_layers, set_module
from outlierkit.llm.methods.base import METHODS, LayerRecord, QuantContext, QuantMethod, out_weight
from outlierkit.llm.models import get_attr, is_fused_experts


class _StopForward(Exception):
    """Raised by a hook after the block being calibrated: later blocks need not run."""


# ------------------------------------------------------------------------------------------ the algorithm

def weight_qparams(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (scale, zero point), both (R, C), from the min-max of the granules of ``w`` (R, C).

    The same formula as :func:`outlierkit.llm.formats.fake_quant` (so the grid is the deployed one).
    """
    lo, hi = minmax(w, fmt)
    scale, zp = int_qparams(lo, hi, fmt.bits, fmt.symmetric, fmt.grid)  # (1, 1), (R, 1) or (R, C/G, 1)
    r, c = w.shape
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        g = fmt.group_size
        return (scale.reshape(r, c // g, 1).expand(r, c // g, g).reshape(r, c),
                zp.reshape(r, c // g, 1).expand(r, c // g, g).reshape(r, c))
    return scale.expand(r, c).clone(), zp.expand(r, c).clone()


def pin_values(w: torch.Tensor, fmt: IntFormat, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """(R, C): the grid value each granule's extreme element must keep, NaN elsewhere.

    Keeping the element that set a granule's min-max range on its extreme code (+-qmax symmetric; 0 and
    2^b - 1 asymmetric) makes the quantized weights reproduce the same scale and zero point when the
    min-max is taken again (by ``QuantLinear`` or an exporter), so the GPTQ grid is the exported grid.
    """
    r, c = w.shape
    if fmt.granularity == "group":
        assert fmt.group_size is not None
        view = w.reshape(r, c // fmt.group_size, fmt.group_size)
    elif fmt.granularity == "tensor":
        view = w.reshape(1, 1, -1)
    else:
        view = w.reshape(r, 1, c)
    pin = torch.full_like(view, math.nan)
    sc = scale.reshape(view.shape)
    z = zp.reshape(view.shape)
    if fmt.symmetric:
        amax, idx = view.abs().max(dim=-1, keepdim=True)
        # grid "vllm": the extreme code +-qmax gives back amax. Grid "ct" (scale amax / (qmax + 1/2)) has no
        # code at amax, so the element keeps its own value: min-max then gives back the scale, and the
        # deployed value is that element's fake quantization (see gptq_quantize's error term).
        val = (view.gather(-1, idx) if fmt.grid == "ct"
               else torch.sign(view.gather(-1, idx)) * fmt.qmax * sc.gather(-1, idx))
        pin.scatter_(-1, idx, torch.where(amax > 0, val, math.nan))
    else:
        top = 2**fmt.bits - 1
        lo, ilo = view.min(dim=-1, keepdim=True)
        hi, ihi = view.max(dim=-1, keepdim=True)
        pin.scatter_(-1, ilo, torch.where(lo < 0, (0 - z.gather(-1, ilo)) * sc.gather(-1, ilo), math.nan))
        pin.scatter_(-1, ihi, torch.where(hi > 0, (top - z.gather(-1, ihi)) * sc.gather(-1, ihi), math.nan))
    return pin.reshape(r, c)


def damped_inverse_factor(h: torch.Tensor, percdamp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = percdamp * mean(diag H), in float64.

    A Hessian that is not positive definite after damping is an error naming the layer.
    """
    h = h.double().clone()
    damp = percdamp * float(torch.diagonal(h).mean())
    h.diagonal().add_(damp)
    try:
        chol = torch.linalg.cholesky(h)
        hinv = torch.cholesky_inverse(chol)
        return torch.linalg.cholesky(hinv, upper=True)
    except torch.linalg.LinAlgError:
        raise NumericalError(
            f"gptq: the Hessian of {name} is not positive definite after damping (percdamp={percdamp}, "
            f"lambda={damp:.3g}); raise percdamp or pass more varied calibration text") from None


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, fmt: IntFormat, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, static_groups: bool = True,
                  pin: bool = True, name: str = "layer", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GPTQ on one weight (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative
    Pre-trained Transformers", ICLR 2023, Algorithm 1).

    With U = Cholesky((H + lambda I)^-1)^T (upper) and columns taken in order (descending diag H with
    ``act_order``)::

        q_j = Q(w_j),   e_j = (w_j - q_j) / U_jj,   W[:, j+1:] -= e_j U_j,j+1:

    Updates inside a block of ``block_size`` columns are applied at once to the rest ("lazy batch"),
    which gives the same result as updating after every column. Group scales (``group`` granularity)
    come from the original weight (``static_groups``, exportable with act-order) or from the updated
    weight when a group starts (the reference's default; not combinable with act-order here, as the
    groups would then follow the permuted order).

    Args:
        w: (R, C) weight (out, in). h: (C, C) Hessian 2/N sum x x^T of the layer's inputs.
        fmt: integer weight format (tensor / channel / group, sym or asym, min-max range).
        pin: keep each granule's extreme element on its extreme code (see :func:`pin_values`).
        dtype: working precision of the column loop (float32 as the reference; tests use float64).

    Returns:
        (R, C) quantized weight (dequantized values on the grid), in ``dtype``.
    """
    r, c = w.shape
    if h.shape != (c, c):
        raise ValueError(f"{name}: Hessian shape {tuple(h.shape)} does not match weight columns {c}")
    group = fmt.group_size if fmt.granularity == "group" else None
    if group is not None and act_order and not static_groups:
        raise ConfigError("gptq: act_order with group scales needs static_groups: true (exportable groups)")
    W = w.to(dtype).clone()
    H = h.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if group is not None:
        block_size = group * max(1, block_size // group)  # a group never straddles a lazy block
    dynamic_groups = group is not None and not static_groups
    gsz = group or 0
    scale, zp = weight_qparams(W, fmt)
    pins = pin_values(W, fmt, scale, zp) if pin else torch.full_like(W, math.nan)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        scale, zp, pins = scale[:, perm], zp[:, perm], pins[:, perm]
    U = damped_inverse_factor(H, percdamp, name).to(dtype)
    Q = torch.zeros_like(W)
    for i1 in range(0, c, block_size):
        i2 = min(i1 + block_size, c)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if dynamic_groups and (i1 + i) % gsz == 0:
                g = W1[:, i:i + gsz]  # the whole group lies in this block and has all updates so far
                gs, gz = weight_qparams(g, IntFormat(fmt.bits, fmt.symmetric, "channel"))
                scale[:, i1 + i:i1 + i + gsz], zp[:, i1 + i:i1 + i + gsz] = gs, gz
                if pin:
                    pins[:, i1 + i:i1 + i + gsz] = pin_values(
                        g, IntFormat(fmt.bits, fmt.symmetric, "channel"), gs, gz)
            col = W1[:, i]
            s_i, z_i = scale[:, i1 + i], zp[:, i1 + i]
            q = int_fake_quant(col, s_i, z_i, fmt.bits, fmt.symmetric)
            if fmt.symmetric:  # never past the granule's range: min-max of Q must give back the scale
                q = torch.clamp(q, -fmt.qmax * s_i, fmt.qmax * s_i)
            p = pins[:, i1 + i]
            Q[:, i1 + i] = torch.where(torch.isnan(p), q, p)
            # the error is taken against the deployed value (a "ct" pin is stored off-grid, served quantized)
            deployed = torch.where(torch.isnan(p), q, int_fake_quant(torch.nan_to_num(p), s_i, z_i, fmt.bits,
                                                                     fmt.symmetric))
            err = (col - deployed) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q


def proxy_sqnr_db(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """Layer-output SQNR on the calibration inputs from the Hessian: tr(W H W^T) / tr(D H D^T), D = W - Q."""
    w64, d = w.double(), (w.double() - q.double())
    sig = float((w64 @ h * w64).sum())
    noise = float((d @ h * d).sum())
    return math.inf if noise <= 0 else 10 * math.log10(max(sig, 1e-300) / noise)


# ------------------------------------------------------------------------------------------ the method

class HessianAccumulator:
    """Streaming Hessians H = 2/N sum x x^T of the inputs of ``sites`` (per-batch products in float32,
    accumulated in float64), from forward-pre hooks. Call :meth:`set_batch` before each batch (pads are
    masked out); the inputs are the ones the layer's weight sees (after an :class:`OnlineQuantLinear` rotation).
    """

    def __init__(self, model: nn.Module, sites: list[str]) -> None:
        self.model, self.sites = model, sites
        self.sums: dict[str, torch.Tensor] = {}
        self.counts = dict.fromkeys(sites, 0)
        self.mask: torch.Tensor | None = None

    def set_batch(self, index: int, batch: Batch) -> None:
        self.mask = batch.attention_mask

    def attach(self, hooks: HookSet) -> None:
        for s in self.sites:
            hooks.forward_pre(get_attr(self.model, s), self._grab(s))

    def _grab(self, name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if isinstance(module, OnlineQuantLinear):
                x = module.transform_input(x)
            rows = token_rows(x, self.mask)  # (N, C) on the layer's device
            if name not in self.sums:
                self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            # one batch's X^T X in float32 (as the reference; float64 matmuls are several times slower),
            # summed over batches in float64
            self.sums[name] += (rows.t() @ rows).double()
            self.counts[name] += rows.shape[0]
        return fn

    def result(self) -> dict[str, tuple[torch.Tensor, int]]:
        missing = [s for s in self.sites if self.counts[s] == 0]
        if missing:
            raise DataError(f"gptq: calibration never reached {missing[:3]}; pass more calibration text")
        return {s: (self.sums[s] * (2.0 / self.counts[s]), self.counts[s]) for s in self.sites}


@torch.no_grad()
def block_hessians(model: nn.Module, block: str | None, sites: list[str],
                   batches: list[Batch]) -> dict[str, tuple[torch.Tensor, int]]:
    """Hessians of ``sites`` from full forwards of ``batches`` that stop after ``block`` (the replay path, for
    models whose decoder layers cannot be run one at a time; see :class:`HessianAccumulator`)."""

    def stop(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        raise _StopForward

    acc = HessianAccumulator(model, sites)
    device = next(model.parameters()).device
    with HookSet() as hooks:
        acc.attach(hooks)
        if block is not None:
            hooks.forward(get_attr(model, block), stop)
        for i, b in enumerate(batches):
            acc.set_batch(i, b)
            try:
                model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device))
            except _StopForward:
                pass
    return acc.result()


def _layerwise_runner(model: nn.Module, ctx: QuantContext) -> Any:
    """A :class:`~outlierkit.llm.sequential.LayerwiseRunner` over the calibration batches, or None (with a
    note) for models whose layers cannot run one at a time (different masks per layer)."""
    from outlierkit.llm.sequential import LayerwiseRunner

    home = next(model.parameters()).device
    try:
        # all at once: the cached layer inputs stay on the model's device; sequential: on the CPU
        return LayerwiseRunner(model, ctx.batches, device=ctx.device if ctx.sequential else None,
                               cache_device="cpu" if ctx.sequential else home, mm=ctx.model_map(model))
    except ConfigError as e:
        if ctx.sequential:
            raise
        ctx.notes.append(f"gptq: replays the earlier layers for each layer ({e})")
        return None


@METHODS.register("gptq")
@dataclass
class GPTQ(QuantMethod):
    """GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
    Transformers", ICLR 2023, arXiv:2210.17323).

    Per block linear with input X (N, C) from the calibration batches (pads masked)::

        H = 2/N X^T X  (streamed: float32 per batch, float64 sum),   U = chol((H + percdamp mean(diag H) I)^-1)^T
        for each column j:  q_j = Q(w_j),  W[:, j+1:] -= ((w_j - q_j) / U_jj) U_j,j+1:

    minimizing ||X W^T - X Q^T||^2 column by column with the error pushed into the columns not yet
    quantized. Blocks are processed in order: layer i's Hessians come from a forward pass in which
    blocks 0..i-1 already hold their GPTQ weights (the reference's sequential mode, computed from each
    layer's cached inputs rather than by replaying the model; all linears of one block share that pass, as
    in llm-compressor's default, not "true sequential" within the block).
    Weights only: activation formats (and static ranges, q/k/v output formats) are then set by the
    ``rtn`` pass that runs at the end of this step, on the GPTQ weights, so a recipe needs no separate
    ``rtn`` step. Equivalence transforms (smoothquant, os_plus, rotate) go before ``gptq``; ``spike_mp``
    goes before it with ``quantize: false`` (its kept layers are left alone by GPTQ).

    The result is an ordinary fake-quantized layer (:class:`OnlineQuantLinear`, a ``QuantLinear``) whose
    float weight holds the GPTQ values on the recipe's weight grid, with the per-channel or static group
    scales recoverable by min-max: each granule's extreme element keeps its extreme code (see
    :func:`pin_values`), so ``QuantLinear``'s own fake quantization leaves the GPTQ weights unchanged and an
    exporter packs them like any RTN layer, with the same scales.

    Args:
        block_size: lazy-batch width (default 128; rounded to a multiple of the group size).
        percdamp: damping as a fraction of the mean Hessian diagonal (default 0.01).
        act_order: quantize columns in order of decreasing Hessian diagonal (default False).
        static_groups: group scales from the original weight (default True; needed with act_order).
        experts: fused MoE experts (3-D weights): ``error`` (default; GPTQ needs per-expert Hessians, not
            implemented) or ``rtn`` (round them to nearest and say so).
        dtype: working precision of the column loop, ``float32`` (default) or ``float64``.
        rtn_layers: FQNs left to the final ``rtn`` pass (rounded to nearest, not GPTQ; the planner's
            per-layer choice where GPTQ was measured not to help).
        cache_inputs: run the decoder layers one at a time on cached inputs (default True: 2 layer forwards
            per layer; with the recipe's ``sequential`` mode only one layer is on the device). False replays
            the model from the embeddings for every layer (L^2/2 layer forwards), as the reference does;
            models whose layers need different masks fall back to it with a note.
    """

    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = True
    experts: Literal["error", "rtn"] = "error"
    dtype: Literal["float32", "float64"] = "float32"
    rtn_layers: list[str] = field(default_factory=list)
    cache_inputs: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"gptq.block_size must be >= 1, got {self.block_size}")
        if not self.percdamp >= 0:
            raise ConfigError(f"gptq.percdamp must be >= 0, got {self.percdamp}")
        if self.experts not in ("error", "rtn"):
            raise ConfigError(f"gptq.experts must be error or rtn, got {self.experts!r}")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"gptq.dtype must be float32 or float64, got {self.dtype!r}")

    def _check_format(self, fqn: str, fmt: Any) -> IntFormat:
        if not isinstance(fmt, IntFormat):
            raise ConfigError(f"gptq quantizes to integer weight formats; {fqn} has {fmt.label()}")
        if fmt.observer == "mse":
            raise ConfigError(f"gptq uses min-max weight scales; {fqn}: weight observer 'mse' is not supported")
        if fmt.granularity == "group" and self.act_order and not self.static_groups:
            raise ConfigError("gptq: act_order with group scales needs static_groups: true (exportable groups)")
        return fmt

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        for name, q in quant_layers(model):
            if not q.is_float:
                raise ConfigError(f"gptq must come before rtn (and spike_mp needs quantize: false before gptq); "
                                  f"{name} is already quantized")
        targets: dict[int, list[tuple[str, IntFormat]]] = {}
        records: list[LayerRecord] = []
        experts_rtn: list[str] = []
        for fqn, layer in mm.linears.items():
            weight, _, skipped = ctx.formats_for(fqn)
            if skipped or weight is None or fqn in self.rtn_layers:
                continue
            mod = get_attr(model, fqn)
            inner = mod.inner if isinstance(mod, QuantLinear) else mod
            if is_fused_experts(inner):
                if self.experts == "error":
                    raise ConfigError(f"gptq does not quantize fused MoE experts ({fqn}: per-expert Hessians are "
                                      "not implemented); set `experts: rtn` to round them to nearest, or skip "
                                      "them with an override")
                experts_rtn.append(fqn)
                continue
            targets.setdefault(layer, []).append((fqn, self._check_format(fqn, weight)))
        if not targets:
            ctx.notes.append("gptq: no layer has a weight format (recipe weight is none or every layer is "
                             "skipped); only the rtn pass ran")
        tokens = sum(int(b.attention_mask.sum()) for b in ctx.batches)
        widest = max(((in_features(model, f), f) for ts in targets.values() for f, _ in ts), default=(0, ""))
        if widest[0] > tokens:
            raise DataError(f"gptq needs at least {widest[0]} calibration tokens ({widest[1]} has {widest[0]} input "
                            f"columns; fewer tokens leave its Hessian singular), got {tokens}; pass more "
                            "calibration text")
        dt = torch.float64 if self.dtype == "float64" else torch.float32
        last = max(targets, default=-1)
        runner = _layerwise_runner(model, ctx) if targets and self.cache_inputs else None
        for layer in range(last + 1) if runner is not None else sorted(targets):
            if layer in targets:
                sites = [f for f, _ in targets[layer]]
                if runner is not None:  # this layer's cached inputs: one layer forward
                    acc = HessianAccumulator(model, sites)
                    with HookSet() as hooks:
                        acc.attach(hooks)
                        runner.run(layer, advance=False, before_batch=acc.set_batch)
                    hess = acc.result()
                else:  # a full forward that stops after this layer
                    hess = block_hessians(model, mm.layers[layer] if layer < last else None, sites, ctx.batches)
                for fqn, fmt in targets[layer]:
                    t0 = time.perf_counter()
                    h, n = hess[fqn]
                    records.append(self._quantize_layer(model, fqn, fmt, h, n, dt, t0))
            if runner is not None and layer < last:
                runner.run(layer, advance=True)  # the next layer's inputs, through the GPTQ weights
        if experts_rtn:
            ctx.notes.append(f"gptq: fused MoE experts {experts_rtn} were rounded to nearest (experts: rtn), "
                             "not GPTQ-quantized")
        from outlierkit.llm.methods.rtn import RTN

        records += RTN().apply(model, ctx)
        return records

    def _quantize_layer(self, model: nn.Module, fqn: str, fmt: IntFormat, h: torch.Tensor, n: int,
                        dt: torch.dtype, t0: float) -> LayerRecord:
        mod = get_attr(model, fqn)
        if isinstance(mod, OnlineQuantLinear):
            ql = mod
        else:
            inner = mod.inner if isinstance(mod, QuantLinear) else mod
            ql = OnlineQuantLinear(inner, name=fqn)
            set_module(model, fqn, ql)
        wv = out_weight(ql.inner)  # (out, in) view of the float weight
        w = wv.detach().double()
        h = h.to(w.device)
        if fmt.granularity == "group" and fmt.group_size and w.shape[1] % fmt.group_size:
            raise ConfigError(f"{fqn}: group_size {fmt.group_size} does not divide the input dimension {w.shape[1]}")
        q = gptq_quantize(w, h, fmt, block_size=self.block_size, percdamp=self.percdamp, act_order=self.act_order,
                          static_groups=self.static_groups, name=fqn, dtype=dt)
        rtn = int_fake_quant(w, *weight_qparams(w, fmt), fmt.bits, fmt.symmetric)
        ql.ref_weight = wv.detach().clone()
        wv.copy_(q.to(wv.dtype).to(wv.device))
        ql.weight_format = fmt
        ql.refresh_()
        return LayerRecord(fqn, "gptq", {
            "weight": fmt.label(), "tokens": n, "proxy_sqnr_db": proxy_sqnr_db(w, q, h),
            "rtn_proxy_sqnr_db": proxy_sqnr_db(w, rtn, h), "dead_columns": int((torch.diagonal(h) == 0).sum()),
            "act_order": self.act_order, "time_s": time.perf_counter() - t0})


def in_features(model: nn.Module, fqn: str) -> int:
    mod = get_attr(model, fqn)
    inner = mod.inner if isinstance(mod, QuantLinear) else mod
    return int(out_weight(inner).shape[1])
