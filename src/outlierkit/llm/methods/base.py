"""The quantization-method contract (registry, context, per-layer records) and the exact fold helpers
that SmoothQuant and OS+ share (scale and shift moved between a producer and its consumer linears)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from outlierkit.errors import ConfigError, UnsupportedArchitectureError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.formats import Format
from outlierkit.llm.layers import QuantLinear
from outlierkit.llm.models import FoldGroup, ModelMap, get_attr, is_fused_experts, resolve
from outlierkit.registry import Registry


@dataclass
class LayerRecord:
    """What a method did to one layer or fold group (one row of the report's ``layers`` table)."""

    layer: str
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"layer": self.layer, "method": self.method, **self.info}


@dataclass
class Override:
    """Per-layer override: FQN or ``re:`` regex -> formats (None keeps a tensor float) or skip."""

    pattern: str
    skip: bool = False
    weight: Format | None = None
    act: Format | None = None
    set_weight: bool = False
    set_act: bool = False

    def matches(self, fqn: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.fullmatch(self.pattern[3:], fqn) is not None
        return fqn == self.pattern


@dataclass
class QuantContext:
    """What a method gets: calibration batches, the recipe's default formats and per-layer overrides.

    Args:
        batches: calibration batches (right-padded, with attention masks).
        weight / act: default weight and activation formats of quantized layers.
        qkv_out: optional format of q/k/v outputs (attention matmul inputs).
        overrides: per-layer overrides, first match wins.
        map: the resolved architecture map (computed from the model when None).
        sequential: calibrate one decoder layer at a time (models larger than the device), on ``device``.
    """

    batches: list[Batch]
    weight: Format | None = None
    act: Format | None = None
    qkv_out: Format | None = None
    overrides: list[Override] = field(default_factory=list)
    map: ModelMap | None = None
    notes: list[str] = field(default_factory=list)
    sequential: bool = False
    device: str | None = None

    def model_map(self, model: nn.Module) -> ModelMap:
        if self.map is None:
            self.map = resolve(model, warn=False)
        return self.map

    def formats_for(self, fqn: str) -> tuple[Format | None, Format | None, bool]:
        """(weight, act, skipped) for layer ``fqn`` after overrides."""
        for ov in self.overrides:
            if ov.matches(fqn):
                if ov.skip:
                    return None, None, True
                return (ov.weight if ov.set_weight else self.weight), (ov.act if ov.set_act else self.act), False
        return self.weight, self.act, False


class QuantMethod:
    """Base of registered methods: a dataclass of hyperparameters with ``apply``.

    ``transform = True`` marks an equivalence transform (the float model's outputs must not change; the
    contract test checks every such method on every family).
    """

    transform: ClassVar[bool] = False

    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        raise NotImplementedError


METHODS: Registry[type[QuantMethod]] = Registry("quantization method")


# ------------------------------------------------------------------------------------ fold helpers

def float_module(model: nn.Module, fqn: str) -> nn.Module:
    mod = get_attr(model, fqn)
    return mod.inner if isinstance(mod, QuantLinear) else mod


def in_weight(mod: nn.Module) -> torch.Tensor:
    """The consumer's weight as a view whose LAST axis is its input channel: (O, C) or (E, O, C)."""
    if is_fused_experts(mod):
        gu: torch.Tensor = getattr(mod, "gate_up_proj")  # noqa: B009
        return gu
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w.t() if type(mod).__name__ == "Conv1D" else w


def out_weight(mod: nn.Module) -> torch.Tensor:
    """A producer linear's weight as a view (out, in)."""
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w.t() if type(mod).__name__ == "Conv1D" else w


def _heads(model: nn.Module) -> tuple[int, int, int]:
    cfg: Any = getattr(model, "config")  # noqa: B009
    h = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or h)
    d = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // h)
    return h, kv, d


@dataclass
class Group:
    """A fold group resolved on one model layer."""

    layer: int
    spec: FoldGroup
    prev: str  # FQN of the producer
    linears: list[str]  # FQNs of the consumers
    rows: slice | None = None  # producer output rows of this group (fused qkv producers)
    tie: torch.Tensor | None = None  # (C,) consumer channel -> producer row (GQA v -> o), None = identity
    n_rows: int = 0  # number of producer rows (channels that get one scale)

    @property
    def name(self) -> str:
        return f"{self.prev} -> {', '.join(n.rsplit('.', 1)[-1] for n in self.linears)}"


def resolve_groups(model: nn.Module, mm: ModelMap, kinds: tuple[str, ...], method: str = "") -> list[Group]:
    """The model's fold groups of the given kinds, with GQA ties and fused-qkv row slices worked out.

    A model found by generic discovery (no table entry) has no fold groups at all: that is an error
    naming the missing mapping, not a silent no-op.
    """
    if mm.generic:
        raise UnsupportedArchitectureError(
            f"{method or 'this transform'} needs the fold groups of model_type {mm.model_type!r} "
            "(ArchSpec.folds: norm -> linears, up -> down, v -> o), which the architecture table does not "
            "have; add an ArchSpec entry to outlierkit/llm/models.py (see docs/architectures.md)")
    out = []
    for i, g in mm.fold_groups(model):
        if g.kind not in kinds:
            continue
        prev = mm.fqn(i, g.prev)
        linears = [mm.fqn(i, n) for n in g.linears]
        if any(getattr(get_attr(model, n), "rotation", None) is not None for n in linears):  # rotate's online H
            raise ConfigError(f"{method or 'this transform'} cannot fold into {linears[0]}: it has an online "
                              "rotation (rotate ran first); put smoothquant/os_plus before rotate in the recipe")
        c = in_weight(float_module(model, linears[0])).shape[-1]
        grp = Group(i, g, prev, linears, n_rows=c)
        if g.kind == "attn_v":
            h, kv, d = _heads(model)
            n_out = out_weight(float_module(model, prev)).shape[0]
            if c != h * d:
                continue
            # o column h*D + d reads v row (h // (H / KV)) * D + d
            cols = torch.arange(c)
            tie = (cols // d) // (h // kv) * d + cols % d  # (C,)
            grp.tie = None if kv == h else tie
            grp.n_rows = kv * d
            if g.prev_slice == "v":
                grp.rows = slice(n_out - kv * d, n_out)
            elif n_out != kv * d:
                continue
        out.append(grp)
    return out


def select_groups(groups: list[Group], only: Sequence[str] | None, method: str) -> list[Group]:
    """The groups whose first consumer linear matches an entry of ``only`` (FQNs or ``re:`` regexes); all when
    ``only`` is None. An entry that matches no group is a recipe error (a typo would silently do nothing)."""
    if only is None:
        return groups
    pats = [Override(p) for p in only]
    unmatched = [p.pattern for p in pats if not any(p.matches(g.linears[0]) for g in groups)]
    if unmatched:
        firsts = ", ".join(g.linears[0] for g in groups[:4])
        raise ConfigError(f"{method}.groups: {unmatched[:3]} match no fold group of the asked kinds; name a "
                          f"group by its first consumer linear (e.g. {firsts}, ...) or a 're:' regex")
    return [g for g in groups if any(p.matches(g.linears[0]) for p in pats)]


def nothing_to_fold(ctx: QuantContext, mm: ModelMap, method: str, folds: tuple[str, ...] | list[str],
                    verb: str) -> list[LayerRecord]:
    """The record (and context note) of a transform that found no fold group of the asked kinds."""
    note = (f"{method}: family {mm.spec.name!r} has no {'/'.join(folds)} fold group in the architecture table; "
            f"nothing was {verb}")
    ctx.notes.append(note)
    return [LayerRecord(mm.spec.name, method, {"applied": False, "note": note})]


def tie_reduce(x: torch.Tensor, grp: Group, how: str) -> torch.Tensor:
    """Reduce a per-consumer-channel (C,) vector to per-producer-row (R,) over GQA-tied channels."""
    if grp.tie is None:
        return x
    out = torch.full((grp.n_rows,), -torch.inf if how == "amax" else torch.inf, dtype=x.dtype)
    return out.scatter_reduce(0, grp.tie, x, reduce=how, include_self=True)


def tie_expand(v: torch.Tensor, grp: Group) -> torch.Tensor:
    """(R,) per producer row -> (C,) per consumer channel."""
    return v if grp.tie is None else v[grp.tie]


def norm_is_offset(norm: nn.Module) -> bool:
    """Gemma's RMSNorm multiplies by (1 + weight)."""
    return type(norm).__name__.startswith("Gemma") and "RMSNorm" in type(norm).__name__


def can_shift(model: nn.Module, grp: Group) -> bool:
    """A shift z needs a producer bias to absorb -z and consumer biases to absorb W z."""
    prev = float_module(model, grp.prev)
    if getattr(prev, "bias", None) is None:
        return False
    for n in grp.linears:
        mod = float_module(model, n)
        if is_fused_experts(mod) or getattr(mod, "bias", None) is None:
            return False
    return True


@torch.no_grad()
def fold_(model: nn.Module, grp: Group, s: torch.Tensor, z: torch.Tensor | None = None) -> None:
    """Exactly move scale ``s`` (and shift ``z``) from the producer into the consumers.

    Producer output y -> (y - z) / s, consumer W[:, j] -> W[:, j] s_j, b -> b + W z (original W).
    ``s`` and ``z`` are per producer row, shape (R,); ties expand them to the consumers' C columns.
    """
    prev = float_module(model, grp.prev)
    s_rows = s.to(torch.float64)
    s_cols = tie_expand(s_rows, grp)
    z_cols = tie_expand(z.to(torch.float64), grp) if z is not None else None
    for n in grp.linears:
        mod = float_module(model, n)
        w = in_weight(mod)
        dev, dt = w.device, w.dtype
        if z_cols is not None:
            b: torch.Tensor = getattr(mod, "bias")  # noqa: B009
            b.copy_((b.double() + w.double() @ z_cols.to(dev)).to(dt))
        w.copy_((w.double() * s_cols.to(dev)).to(dt))
    if grp.spec.kind == "norm":
        weight = getattr(prev, "weight", None)
        if weight is None:
            raise ConfigError(f"{grp.prev} has no weight to absorb the scale")
        dev, dt = weight.device, weight.dtype
        if norm_is_offset(prev):
            weight.copy_(((1 + weight.double()) / s_rows.to(dev) - 1).to(dt))
        else:
            weight.copy_((weight.double() / s_rows.to(dev)).to(dt))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            zz = z.to(torch.float64).to(dev) if z is not None else 0.0
            bias.copy_(((bias.double() - zz) / s_rows.to(dev)).to(dt))
    else:
        w = out_weight(prev)
        rows = grp.rows or slice(0, w.shape[0])
        dev, dt = w.device, w.dtype
        w[rows].copy_((w[rows].double() / s_rows.to(dev)[:, None]).to(dt))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            zz = z.to(torch.float64).to(dev) if z is not None else 0.0
            bias[rows].copy_(((bias[rows].double() - zz) / s_rows.to(dev)).to(dt))
    for n in [grp.prev, *grp.linears]:
        mod = get_attr(model, n)
        if isinstance(mod, QuantLinear):
            mod.refresh_()
