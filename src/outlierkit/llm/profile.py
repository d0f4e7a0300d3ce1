"""Measure activation outliers of a Hugging Face model: hooks over every site, streaming statistics.

``profile_model`` runs a model over a tokenized corpus with forward hooks (owned by ``HookSet``) on the
sites its architecture entry names, and returns an :class:`ActivationProfile`: per-site
:class:`~outlierkit.llm.stats.SiteStats`, per-expert routing statistics for fused MoE experts, and an
INT8 reconstruction check calibrated on one split and evaluated on another. Padding never enters a
statistic; whole activations are never stored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from outlierkit._utils.hooks import HookSet, first_tensor
from outlierkit._utils.io import atomic_write_text
from outlierkit._utils.log import log, progress
from outlierkit.errors import ConfigError, DataError
from outlierkit.llm.corpus import Batch, TokenCorpus
from outlierkit.llm.models import ModelMap, get_attr, has_attr, is_fused_experts, is_linear
from outlierkit.llm.stats import Int8Check, Loc, SiteStats, TokenInfo, update_int8_checks

Level = Literal["basic", "default", "full"]
LEVELS: tuple[str, ...] = ("basic", "default", "full")
# Site kinds over which the model's global maximum is taken (as the measurement paper does: router and
# gate excluded).
GLOBAL_KINDS = ("embedding", "residual", "attn", "mlp", "final_norm")
_LEVEL_KINDS: dict[str, tuple[str, ...]] = {
    "basic": GLOBAL_KINDS,
    "default": GLOBAL_KINDS + ("router", "gate", "down_in"),
    "full": GLOBAL_KINDS + ("router", "gate", "down_in", "linear_in", "linear_out"),
}
# Fused experts: per-expert input statistics from ``default`` on; per-expert gated product and output
# (recomputed, so costly) at ``full``.
PER_TOKEN_KINDS = frozenset(GLOBAL_KINDS)


@dataclass(frozen=True)
class Site:
    """One place activations are read: ``module``'s output (or input), named and typed.

    Args:
        name: unique, readable name (``layer_3.residual``, ``<fqn>:in``).
        kind: ``embedding|residual|attn|mlp|router|gate|down_in|final_norm|linear_in|linear_out``.
        layer: block index, or -1 for embedding/final norm.
        module: fully-qualified module name.
        capture: ``"output"`` or ``"input"``; ``half`` takes the first half of the channels (fused
            gate_up projections).
    """

    name: str
    kind: str
    layer: int
    module: str
    capture: Literal["output", "input"] = "output"
    half: bool = False


def discover_sites(model: nn.Module, mm: ModelMap, level: str = "default",
                   kinds: Sequence[str] | None = None) -> list[Site]:
    """Sites present in ``model`` for ``level`` (``basic`` < ``default`` < ``full``), optionally only
    those of the given ``kinds`` (e.g. ``("linear_in",)`` for spike selection)."""
    if level not in _LEVEL_KINDS:
        raise ConfigError(f"unknown --level {level!r}; valid: {list(LEVELS)}")
    wanted = set(_LEVEL_KINDS[level]) if kinds is None else set(kinds)
    spec = mm.spec
    sites: list[Site] = []

    def add(name: str, kind: str, layer: int, fqn: str, capture: Literal["output", "input"] = "output",
            half: bool = False) -> None:
        if kind in wanted and fqn and has_attr(model, fqn):
            sites.append(Site(name, kind, layer, fqn, capture, half))

    add("embedding", "embedding", -1, mm.embed)
    for i, layer_fqn in enumerate(mm.layers):
        add(f"layer_{i}.residual", "residual", i, layer_fqn)
        if spec.attn:
            add(f"layer_{i}.attn", "attn", i, mm.fqn(i, spec.attn))
        if spec.mlp:
            add(f"layer_{i}.mlp", "mlp", i, mm.fqn(i, spec.mlp))
        if spec.router:
            add(f"layer_{i}.router_logits", "router", i, mm.fqn(i, spec.router))
        if spec.gate:
            add(f"layer_{i}.gate", "gate", i, mm.fqn(i, spec.gate))
        elif spec.gate_up:
            add(f"layer_{i}.gate", "gate", i, mm.fqn(i, spec.gate_up), half=True)
        if spec.down:
            add(f"layer_{i}.down_in", "down_in", i, mm.fqn(i, spec.down), capture="input")
        if "linear_in" in wanted or "linear_out" in wanted:
            for fqn, li in mm.linears.items():
                if li == i and is_linear(get_attr(model, fqn)):
                    add(f"{fqn}:in", "linear_in", i, fqn, capture="input")
                    add(f"{fqn}:out", "linear_out", i, fqn)
    if mm.final_norm:
        add("final_norm", "final_norm", -1, mm.final_norm)
    return sites


@dataclass
class ExpertStats:
    """Per-expert routing statistics of one fused-experts module (E experts)."""

    layer: int
    module: str
    n_experts: int
    tokens: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E,) routed valid tokens
    in_absmax: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E,)
    gated_absmax: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E,) full level only
    out_absmax: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E,) full level only

    def __post_init__(self) -> None:
        if self.tokens.numel() == 0:
            self.tokens = torch.zeros(self.n_experts, dtype=torch.float64)
            self.in_absmax = torch.zeros(self.n_experts)
            self.gated_absmax = torch.zeros(self.n_experts)
            self.out_absmax = torch.zeros(self.n_experts)

    def merge(self, other: ExpertStats) -> ExpertStats:
        self.tokens = self.tokens + other.tokens
        self.in_absmax = torch.maximum(self.in_absmax, other.in_absmax)
        self.gated_absmax = torch.maximum(self.gated_absmax, other.gated_absmax)
        self.out_absmax = torch.maximum(self.out_absmax, other.out_absmax)
        return self


@dataclass
class ActivationProfile:
    """The result of profiling one model: statistics per site, per expert, and the INT8 check."""

    model: str
    model_type: str
    sites: list[Site]
    stats: dict[str, SiteStats]
    experts: dict[str, ExpertStats] = field(default_factory=dict)
    int8: dict[str, dict[str, Int8Check]] = field(default_factory=dict)  # site -> {"absmax"|"p99.9": check}
    batches_done: int = 0
    tokens: int = 0
    shape_warnings: list[str] = field(default_factory=list)  # sites whose tensors did not fit the batch

    def merge(self, other: ActivationProfile) -> ActivationProfile:
        """In place: statistics of both profiles' token sets (same model and sites)."""
        for name, st in other.stats.items():
            self.stats[name].merge(st)
        for name, ex in other.experts.items():
            self.experts[name].merge(ex)
        for name, checks in other.int8.items():
            mine = self.int8.setdefault(name, {})
            for kind, chk in checks.items():
                if kind in mine:
                    mine[kind].merge(chk)
                else:
                    mine[kind] = chk
        self.batches_done += other.batches_done
        self.tokens += other.tokens
        return self

    def global_max(self) -> tuple[str, float, Loc] | None:
        """Largest |max| or |min| over embedding, residual, attention, MLP outputs and final norm."""
        best: tuple[str, float, Loc] | None = None
        for site in self.sites:
            st = self.stats[site.name]
            if site.kind in GLOBAL_KINDS and st.count and (best is None or st.absmax > abs(best[1])):
                best = (site.name, st.signed_absmax, st.loc_absmax)
        return best

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path) -> None:
        """Write ``path.safetensors`` + ``path.json`` (both atomically) holding every statistic."""
        from safetensors.torch import save

        from outlierkit._utils.io import atomic_write_bytes

        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"model": self.model, "model_type": self.model_type,
                                "batches_done": self.batches_done, "tokens": self.tokens,
                                "sites": [asdict(s) for s in self.sites], "stats": {}, "experts": {}, "int8": {}}
        for name, st in self.stats.items():
            t, m = st.state()
            tensors.update({f"stats/{name}/{k}": v.contiguous() for k, v in t.items()})
            meta["stats"][name] = m
        for name, ex in self.experts.items():
            for k in ("tokens", "in_absmax", "gated_absmax", "out_absmax"):
                tensors[f"experts/{name}/{k}"] = getattr(ex, k).contiguous()
            meta["experts"][name] = {"layer": ex.layer, "module": ex.module, "n_experts": ex.n_experts}
        meta["int8"] = {name: {k: asdict(c) for k, c in checks.items()} for name, checks in self.int8.items()}
        p = Path(path)
        atomic_write_bytes(p.with_suffix(".safetensors"), save(tensors))
        atomic_write_text(p.with_suffix(".json"), json.dumps(meta, default=str))

    @classmethod
    def load(cls, path: str | Path) -> ActivationProfile:
        from safetensors.torch import load

        p = Path(path)
        try:
            meta = json.loads(p.with_suffix(".json").read_text())
            tensors = load(p.with_suffix(".safetensors").read_bytes())
        except (OSError, json.JSONDecodeError, Exception) as e:  # safetensors raises its own errors
            raise DataError(f"cannot read profile checkpoint {p}: {e}; delete it and run without --resume") from None
        sites = [Site(**s) for s in meta["sites"]]
        stats = {}
        for name, m in meta["stats"].items():
            pre = f"stats/{name}/"
            stats[name] = SiteStats.from_state({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}, m)
        experts = {}
        for name, m in meta["experts"].items():
            pre = f"experts/{name}/"
            arrays: dict[str, Any] = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            experts[name] = ExpertStats(**m, **arrays)
        int8 = {name: {k: Int8Check(**c) for k, c in checks.items()} for name, checks in meta["int8"].items()}
        return cls(model=meta["model"], model_type=meta["model_type"], sites=sites, stats=stats, experts=experts,
                   int8=int8, batches_done=meta["batches_done"], tokens=meta["tokens"])


class Collector:
    """Hooks that stream every site's activations into statistics; one instance per model.

    Before each forward, ``begin_batch`` stores the attention mask so every hook keeps only real tokens.
    """

    def __init__(self, model: nn.Module, mm: ModelMap, sites: Sequence[Site], *, massive_abs: float = 100.0,
                 massive_ratio: float = 1000.0, level: str = "default", hist_stride: int = 1) -> None:
        self.model, self.mm, self.sites = model, mm, list(sites)
        self.massive_abs, self.massive_ratio = massive_abs, massive_ratio
        self.hist_stride = hist_stride
        self.stats: dict[str, SiteStats] = {}
        self.experts: dict[str, ExpertStats] = {}
        self.int8: dict[str, dict[str, Int8Check]] = {}
        self.thresholds: dict[str, dict[str, float]] = {}  # set to run the INT8 check
        self.experts_on = level in ("default", "full")
        self.experts_full = level == "full"
        self._valid: torch.Tensor | None = None
        self._info: TokenInfo | None = None
        self._bt = 0
        self.shape_warnings: list[str] = []

    # -------------------------------------------------------------- batch context
    def begin_batch(self, batch: Batch, device: torch.device) -> None:
        mask = batch.attention_mask.bool()  # (B, T)
        b, t = mask.shape
        self._bt = b * t
        valid = mask.flatten().nonzero().flatten()  # (N,)
        rows = valid // t
        sample = torch.tensor(batch.sample_ids, dtype=torch.long)[rows]
        self._valid = valid.to(device)
        self._info = TokenInfo(sample=sample.to(device), pos=(valid % t).to(device),
                               token=batch.input_ids.flatten()[valid].to(device))

    def _tokens(self, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """``x`` (B, T, C) or (B*T, C) -> the valid rows (N, C); None if the shape does not fit."""
        if x.dim() < 2 or x.numel() // x.shape[-1] != self._bt:
            if name not in self.shape_warnings:
                self.shape_warnings.append(name)
            return None
        assert self._valid is not None
        flat = x.reshape(-1, x.shape[-1]).detach()  # (B*T, C)
        return flat if self._valid.numel() == self._bt else flat.index_select(0, self._valid)  # (N, C)

    def _record(self, site: Site, x: torch.Tensor) -> None:
        xv = self._tokens(x, site.name)
        if xv is None:
            return
        if site.half:
            xv = xv[:, : xv.shape[1] // 2]
        st = self.stats.get(site.name)
        if st is None:
            st = self.stats[site.name] = SiteStats(channels=xv.shape[1], per_token=site.kind in PER_TOKEN_KINDS,
                                                   stride=self.hist_stride)
        assert self._info is not None
        kept = st.update(xv, self._info, massive_abs=self.massive_abs, massive_ratio=self.massive_ratio)
        th = self.thresholds.get(site.name)
        if th and kept is not None:
            checks = self.int8.setdefault(site.name, {})
            update_int8_checks([checks.setdefault(kind, Int8Check(value)) for kind, value in th.items()], kept)

    def _expert_hook(self, layer: int, fqn: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            if len(vals) < 2:
                return
            hidden, index = vals[0], vals[1]  # (B*T, C), (B*T, k)
            xv = self._tokens(hidden, fqn + ":experts")
            if xv is None:
                return
            assert self._valid is not None
            idx = index.reshape(-1, index.shape[-1]).index_select(0, self._valid)  # (N, k)
            gate_up: torch.Tensor = module.gate_up_proj  # type: ignore[assignment]  # (E, 2I, C)
            down: torch.Tensor = module.down_proj  # type: ignore[assignment]  # (E, C, I)
            n_exp = int(gate_up.shape[0])
            ex = self.experts.get(fqn)
            if ex is None:
                ex = self.experts[fqn] = ExpertStats(layer, fqn, n_exp)
            tok_abs = xv.abs().amax(dim=1).float()  # (N,)
            flat = idx.flatten()
            valid_e = flat < n_exp
            src = tok_abs.repeat_interleave(idx.shape[1])[valid_e]
            ex.tokens += torch.bincount(flat[valid_e], minlength=n_exp).double().cpu()[:n_exp]
            cur = torch.zeros(n_exp, device=xv.device).scatter_reduce(0, flat[valid_e], src, "amax")
            ex.in_absmax = torch.maximum(ex.in_absmax, cur.cpu())
            if self.experts_full:
                # Per-expert gated product and output, recomputed for the routed tokens (full level only:
                # it repeats the experts' work).
                act = getattr(module, "act_fn", torch.nn.functional.silu)
                for e in flat[valid_e].unique().tolist():
                    rows = (idx == e).any(dim=1)
                    h = xv[rows]
                    gate, up = torch.nn.functional.linear(h, gate_up[e]).chunk(2, dim=-1)
                    gated = act(gate) * up
                    out = torch.nn.functional.linear(gated, down[e])
                    ex.gated_absmax[e] = max(float(ex.gated_absmax[e]), float(gated.abs().max()))
                    ex.out_absmax[e] = max(float(ex.out_absmax[e]), float(out.abs().max()))

        return hook

    def attach(self, hooks: HookSet) -> None:
        for site in self.sites:
            module = get_attr(self.model, site.module)
            if site.capture == "input":
                hooks.forward_pre(module, lambda m, args, s=site: self._record(s, args[0]) if args else None)
            else:
                def out_hook(m: nn.Module, args: Any, output: Any, s: Site = site) -> None:
                    t = first_tensor(output)
                    if t is not None:
                        self._record(s, t)
                hooks.forward(module, out_hook)
        if self.experts_on:
            for i in range(len(self.mm.layers)):
                rel = self.mm.spec.experts
                if rel and has_attr(self.model, self.mm.fqn(i, rel)):
                    mod = get_attr(self.model, self.mm.fqn(i, rel))
                    if is_fused_experts(mod):
                        hooks.forward_pre(mod, self._expert_hook(i, self.mm.fqn(i, rel)), with_kwargs=True)


def _base_model(model: nn.Module, mm: ModelMap) -> nn.Module:
    """Run the backbone, not the LM head (the head's logits are not a site and cost memory)."""
    if mm.backbone and has_attr(model, mm.backbone.split(".")[0]):
        base = get_attr(model, mm.backbone.split(".")[0])
        if isinstance(base, nn.Module) and base is not model and hasattr(base, "forward"):
            return base
    return model


@dataclass
class ProfileOptions:
    """How to profile.

    Args:
        level: ``basic|default|full`` (default ``default``).
        kinds: only sites of these kinds (any level's kinds, e.g. ``("linear_in",)``); None: the level's.
        batch_size: samples per forward (8).
        hist_stride: the histogram (quantiles), kurtosis and mean|x| use every ``hist_stride``-th valid
            token; everything else uses all tokens. ``None``: 8 at basic/default, 1 (exact) at full.
        massive_abs, massive_ratio: the massive-activation test (100, 1000).
        calib_fraction: share of samples that calibrates the INT8 thresholds; the rest evaluates them
            (1/3; 0 disables the check).
        checkpoint_every: save statistics every N batches (0: never).
    """

    level: str = "default"
    batch_size: int = 8
    hist_stride: int | None = None
    kinds: tuple[str, ...] | None = None
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    calib_fraction: float = 1 / 3
    checkpoint_every: int = 0


def int8_thresholds(stats: dict[str, SiteStats]) -> dict[str, dict[str, float]]:
    """Per site: T = calibration absmax, and T = 99.9th percentile of |x| (from the histogram)."""
    out = {}
    for name, st in stats.items():
        if st.count:
            out[name] = {"absmax": st.absmax, "p99.9": st.quantile_abs(0.999)}
    return out


@torch.no_grad()
def profile_model(
    model: nn.Module,
    mm: ModelMap,
    corpus: TokenCorpus,
    options: ProfileOptions | None = None,
    *,
    name: str = "model",
    checkpoint: Path | None = None,
    resume: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> ActivationProfile:
    """Profile ``model`` over ``corpus``.

    The first ``calib_fraction`` of samples calibrates the INT8 thresholds; the rest is evaluated
    against them. Every site's statistics cover all samples. With ``checkpoint``, statistics are
    saved every ``checkpoint_every`` batches and ``resume`` continues after the last saved batch.
    ``shard=(rank, world)`` profiles every ``world``-th batch (for distributed runs; merge after).
    """
    opt = options or ProfileOptions()
    if opt.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if not 0 <= opt.calib_fraction < 1:
        raise ConfigError("calib_fraction must be in [0, 1)")
    device = next(model.parameters()).device
    sites = discover_sites(model, mm, opt.level, opt.kinds)
    if not sites:
        raise ConfigError(f"no sites found at level {opt.level!r} for {mm.spec.name}")
    n_cal = int(len(corpus) * opt.calib_fraction) if opt.calib_fraction > 0 else 0
    if opt.calib_fraction > 0 and (n_cal < 1 or n_cal >= len(corpus)):
        raise DataError(f"the INT8 check needs calibration and evaluation samples; {len(corpus)} sample(s) is too "
                        "few: use --samples 3 or more (or --no-int8-check)")
    splits = [("calib", corpus.subset(range(n_cal)), 0), ("eval", corpus.subset(range(n_cal, len(corpus))), n_cal)]
    if n_cal == 0:
        splits = [("all", corpus, 0)]
    plan: list[tuple[str, Batch]] = []
    for split, sub, offset in splits:
        plan += [(split, b) for b in sub.batches(opt.batch_size, offset=offset)]
    rank, world = shard
    mine = [k for k in range(len(plan)) if k % world == rank]

    stride = opt.hist_stride if opt.hist_stride is not None else (1 if opt.level == "full" else 8)
    if stride < 1:
        raise ConfigError("--hist-stride must be at least 1")
    collector = Collector(model, mm, sites, massive_abs=opt.massive_abs, massive_ratio=opt.massive_ratio,
                          level=opt.level, hist_stride=stride)
    prof = ActivationProfile(model=name, model_type=mm.model_type, sites=sites, stats={})
    start = 0
    if resume and checkpoint is not None and checkpoint.with_suffix(".json").exists():
        prof = ActivationProfile.load(checkpoint)
        if [s.name for s in prof.sites] != [s.name for s in sites]:
            raise DataError(f"checkpoint {checkpoint} was written with other sites (level/model changed); "
                            "rerun without --resume")
        start = prof.batches_done
        collector.stats, collector.experts, collector.int8 = prof.stats, prof.experts, prof.int8
        log(f"{name}: resuming after {start} of {len(mine)} batches")
    # The profile shares the collector's dicts, so checkpoints always see the latest statistics.
    prof.stats, prof.experts, prof.int8 = collector.stats, collector.experts, collector.int8
    prof.shape_warnings = collector.shape_warnings
    runner = _base_model(model, mm)
    was_training = model.training
    model.eval()
    try:
        with HookSet() as hooks:
            collector.attach(hooks)
            for k in progress(range(start, len(mine)), total=len(mine) - start, description=f"profiling {name}"):
                split, batch = plan[mine[k]]
                if split == "eval" and not collector.thresholds:
                    collector.thresholds = int8_thresholds(collector.stats)
                collector.begin_batch(batch, device)
                runner(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
                prof.batches_done = k + 1
                prof.tokens += int(batch.attention_mask.sum())
                if checkpoint is not None and opt.checkpoint_every and (k + 1) % opt.checkpoint_every == 0:
                    prof.save(checkpoint)
    finally:
        model.train(was_training)
    # Sites that saw no tokens (e.g. a shape the hook could not map) get empty statistics.
    for s in sites:
        if s.name not in prof.stats:
            prof.stats[s.name] = SiteStats(channels=1)
    return prof


def merge_distributed(prof: ActivationProfile) -> ActivationProfile:
    """Merge profiles across ``torch.distributed`` ranks (gloo on CPU, nccl on GPU); every rank gets the sum.

    Statistics travel as their serialized state through ``all_gather_object`` and are merged in rank
    order, so every rank ends with identical numbers.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prof
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, _to_state(prof))
    merged = _from_state(states[0])
    for st in states[1:]:
        merged.merge(_from_state(st))
    return merged


def _to_state(prof: ActivationProfile) -> dict[str, Any]:
    return {"meta": {"model": prof.model, "model_type": prof.model_type, "batches_done": prof.batches_done,
                     "tokens": prof.tokens, "sites": [asdict(s) for s in prof.sites]},
            "stats": {k: v.state() for k, v in prof.stats.items()},
            "experts": {k: asdict(v) for k, v in prof.experts.items()},
            "int8": {k: {n: asdict(c) for n, c in v.items()} for k, v in prof.int8.items()}}


def _from_state(state: dict[str, Any]) -> ActivationProfile:
    m = state["meta"]
    return ActivationProfile(
        model=m["model"], model_type=m["model_type"], sites=[Site(**s) for s in m["sites"]],
        stats={k: SiteStats.from_state(*v) for k, v in state["stats"].items()},
        experts={k: ExpertStats(**v) for k, v in state["experts"].items()},
        int8={k: {n: Int8Check(**c) for n, c in v.items()} for k, v in state["int8"].items()},
        batches_done=m["batches_done"], tokens=m["tokens"])


def fmt_loc(loc: Loc, token_text: Callable[[int], str] | None) -> dict[str, Any]:
    tok = token_text(loc.token) if token_text is not None and loc.token >= 0 else None
    return {"sample": loc.sample, "pos": loc.pos, "channel": loc.channel, "token": tok}
