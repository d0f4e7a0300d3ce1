"""Measure activation outliers of a Hugging Face model: hooks over every site, streaming statistics.

``profile_model`` runs a model over a tokenized corpus with forward hooks (owned by ``HookSet``) on the
sites its architecture entry names, and returns an :class:`ActivationProfile`: per-site
:class:`~outlierkit.llm.stats.SiteStats`, per-expert routing statistics for fused MoE experts, and an
INT8 reconstruction check calibrated on one split and evaluated on another. Padding never enters a
statistic; whole activations are never stored. Hooks never read from the device: statistics accumulate on
each activation's device and are read back only at a checkpoint, the INT8 calibration and the end of the run.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from outlierkit._utils.hooks import HookSet, first_tensor
from outlierkit._utils.io import atomic_write_bytes, atomic_write_text
from outlierkit._utils.log import log, progress
from outlierkit.errors import ConfigError, DataError
from outlierkit.llm.corpus import Batch, TokenCorpus
from outlierkit.llm.models import ModelMap, get_attr, has_attr, is_fused_experts, is_linear
from outlierkit.llm.sequential import forward_each, layerwise_device
from outlierkit.llm.stats import (
    Chunk,
    Int8Check,
    Loc,
    SiteAccumulator,
    SiteStats,
    TokenInfo,
    chunk_rows,
    info_tensor,
    subsample_rows,
)

CHECKPOINT_FORMAT = "outlierkit.profile/2"

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

    def to_device(self, device: torch.device) -> None:
        """Accumulate on ``device`` (a host-to-device copy the first time; never a read)."""
        if self.tokens.device != device:
            for k in ("tokens", "in_absmax", "gated_absmax", "out_absmax"):
                setattr(self, k, getattr(self, k).to(device))

    def to_host(self) -> None:
        self.to_device(torch.device("cpu"))

    def merge(self, other: ExpertStats) -> ExpertStats:
        self.to_host()
        other.to_host()
        self.tokens = self.tokens + other.tokens
        self.in_absmax = torch.maximum(self.in_absmax, other.in_absmax)
        self.gated_absmax = torch.maximum(self.gated_absmax, other.gated_absmax)
        self.out_absmax = torch.maximum(self.out_absmax, other.out_absmax)
        return self


@dataclass
class ActivationProfile:
    """The result of profiling one model: statistics per site, per expert, and the INT8 check.

    ``massive_tokens`` counts distinct tokens that are massive at one or more per-token sites (embedding,
    residual, attention, MLP, final norm); each site's ``SiteStats.massive_tokens`` counts that site's own
    massive tokens, so the sum over sites (``massive_site_hits``) counts a token once per site where it is
    massive and is at least ``massive_tokens``.
    """

    model: str
    model_type: str
    sites: list[Site]
    stats: dict[str, SiteStats]
    experts: dict[str, ExpertStats] = field(default_factory=dict)
    int8: dict[str, dict[str, Int8Check]] = field(default_factory=dict)  # site -> {"absmax"|"p99.9": check}
    batches_done: int = 0
    tokens: int = 0
    shape_warnings: list[str] = field(default_factory=list)  # sites whose tensors did not fit the batch
    massive_tokens: int = 0  # distinct tokens massive at one or more per-token sites
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)  # INT8 thresholds, once calibrated
    warnings: list[str] = field(default_factory=list)  # things the user must see (also printed when they arise)
    inputs: dict[str, Any] = field(default_factory=dict)  # what the run depends on; a resume must match it

    def merge(self, other: ActivationProfile) -> ActivationProfile:
        """In place: statistics of both profiles' token sets (same model and sites)."""
        for name, st in other.stats.items():
            if name in self.stats:
                self.stats[name].merge(st)
            else:
                self.stats[name] = SiteStats.from_state(*st.state())
        for name, ex in other.experts.items():
            if name in self.experts:
                self.experts[name].merge(ex)
            else:
                self.experts[name] = ex
        for name, checks in other.int8.items():
            mine = self.int8.setdefault(name, {})
            for kind, chk in checks.items():
                if kind in mine:
                    mine[kind].merge(chk)
                else:
                    mine[kind] = chk
        self.batches_done += other.batches_done
        self.tokens += other.tokens
        self.massive_tokens += other.massive_tokens
        self.thresholds = self.thresholds or other.thresholds
        self.warnings += [w for w in other.warnings if w not in self.warnings]
        self.shape_warnings += [w for w in other.shape_warnings if w not in self.shape_warnings]
        return self

    @property
    def massive_site_hits(self) -> int:
        """Sum over per-token sites of each site's massive tokens (a token counts once per site)."""
        return sum(st.massive_tokens for st in self.stats.values() if st.per_token)

    def global_max(self) -> tuple[str, float, Loc] | None:
        """Largest |max| or |min| over embedding, residual, attention, MLP outputs and final norm."""
        best: tuple[str, float, Loc] | None = None
        for site in self.sites:
            st = self.stats[site.name]
            if site.kind in GLOBAL_KINDS and st.count and (best is None or st.absmax > abs(best[1])):
                best = (site.name, st.signed_absmax, st.loc_absmax)
        return best

    def problems(self) -> list[str]:
        """Why these statistics cannot be trusted (empty when they can): NaN/Inf in the forward, sites
        that saw no finite value, no token at all."""
        out: list[str] = []
        if not any(st.count for st in self.stats.values()):
            out.append(f"{self.model}: no finite activation reached any site")
        bad = [(s.name, self.stats[s.name]) for s in self.sites if self.stats[s.name].nonfinite_tokens]
        if bad:
            name, st = bad[0]
            loc = st.loc_nonfinite
            out.append(f"{self.model}: NaN/Inf in the forward at {len(bad)} site(s) (first: {name}, "
                       f"{st.nonfinite_tokens} token(s), sample {loc.sample}, pos {loc.pos}, channel "
                       f"{loc.channel}); those tokens are excluded from the statistics")
        empty = [s.name for s in self.sites if not self.stats[s.name].count and self.stats[s.name].nonfinite_tokens]
        if empty:
            out.append(f"{self.model}: {len(empty)} site(s) produced only NaN/Inf ({', '.join(empty[:5])})")
        return out

    @property
    def status(self) -> Literal["ok", "unusable"]:
        """``"unusable"`` when :meth:`problems` lists anything: the run must not look like a success."""
        return "unusable" if self.problems() else "ok"

    @property
    def unusable(self) -> bool:
        """True when the statistics must not be presented as a result (see :meth:`problems`)."""
        return bool(self.problems())

    # ------------------------------------------------------------------ checkpoints
    def _meta(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "model": self.model, "model_type": self.model_type,
                "batches_done": self.batches_done, "tokens": self.tokens, "massive_tokens": self.massive_tokens,
                "sites": [asdict(s) for s in self.sites], "stats": {}, "experts": {}, "int8": {},
                "thresholds": self.thresholds, "warnings": self.warnings, "shape_warnings": self.shape_warnings,
                "inputs": self.inputs}

    def save(self, path: str | Path) -> None:
        """Write every statistic into ONE file, ``path.safetensors``, atomically (temp file + rename).

        The file is self-validating: its header holds the metadata and the SHA-256 of its tensor data, so a
        truncated or altered file is refused by :meth:`load`, and statistics and batch count can never come
        from different writes. ``path.json`` is a small manifest (batches done, inputs, the file's SHA-256)
        written afterwards for people and tools; loading never depends on it.
        """
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        meta = self._meta()
        for name, st in self.stats.items():
            t, m = st.state()
            tensors.update({f"stats/{name}/{k}": v.detach().cpu().contiguous() for k, v in t.items()})
            meta["stats"][name] = m
        for name, ex in self.experts.items():
            for k in ("tokens", "in_absmax", "gated_absmax", "out_absmax"):
                tensors[f"experts/{name}/{k}"] = getattr(ex, k).detach().cpu().contiguous()
            meta["experts"][name] = {"layer": ex.layer, "module": ex.module, "n_experts": ex.n_experts}
        meta["int8"] = {name: {k: asdict(c) for k, c in checks.items()} for name, checks in self.int8.items()}
        text = json.dumps(meta, default=str)
        digest = hashlib.sha256(_data_section(save(tensors, metadata={"profile": text}))).hexdigest()
        data = save(tensors, metadata={"profile": text, "sha256": digest})
        p = Path(path)
        atomic_write_bytes(p.with_suffix(".safetensors"), data)
        manifest = {"format": CHECKPOINT_FORMAT, "file": p.with_suffix(".safetensors").name,
                    "sha256_file": hashlib.sha256(data).hexdigest(), "batches_done": self.batches_done,
                    "tokens": self.tokens, "inputs": self.inputs}
        atomic_write_text(p.with_suffix(".json"), json.dumps(manifest, indent=1, default=str))

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` holds a saved profile (its ``.safetensors`` file, the one :meth:`load` reads)."""
        return Path(path).with_suffix(".safetensors").exists()

    @classmethod
    def load(cls, path: str | Path) -> ActivationProfile:
        """Read a profile written by :meth:`save`; a truncated, altered or foreign file is a ``DataError``."""
        from safetensors.torch import load

        p = Path(path).with_suffix(".safetensors")
        hint = "delete it and run without --resume"
        try:
            data = p.read_bytes()
            header = _header(data)
            tensors = load(data)
        except Exception as e:  # OSError, and safetensors' own errors for truncated/corrupt files
            raise DataError(f"cannot read profile checkpoint {p}: {e}; {hint}") from None
        md = header.get("__metadata__") or {}
        if "profile" not in md or "sha256" not in md:
            raise DataError(f"{p} has no integrity record (written by an older outlierkit or not a profile); {hint}")
        if hashlib.sha256(_data_section(data)).hexdigest() != md["sha256"]:
            raise DataError(f"profile checkpoint {p} is corrupt (its tensor data does not match its SHA-256); {hint}")
        meta = json.loads(md["profile"])
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
                   int8=int8, batches_done=meta["batches_done"], tokens=meta["tokens"],
                   massive_tokens=meta.get("massive_tokens", 0), thresholds=meta.get("thresholds", {}),
                   warnings=meta.get("warnings", []), shape_warnings=meta.get("shape_warnings", []),
                   inputs=meta.get("inputs", {}))


def _header(data: bytes) -> dict[str, Any]:
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n:
        raise ValueError("file is truncated")
    out: dict[str, Any] = json.loads(data[8:8 + n])
    return out


def _data_section(data: bytes) -> bytes:
    """The tensor bytes of a safetensors file (after its 8-byte length and JSON header)."""
    return data[8 + int.from_bytes(data[:8], "little"):]


class BatchIndex:
    """Valid-token indices and token info of one batch, for every device the model's activations live on.

    Built once per batch on the host, from the batch's host attention mask (no device read); the first hook
    on a device copies what it needs there (``on``), so under a device map every hook indexes with tensors
    on its own activation's device. ``chunks`` cuts the valid tokens into chunks of token rows for one
    device and chunk size (cached: sites of equal width share them).
    """

    def __init__(self, batch: Batch, stride: int = 1) -> None:
        mask = batch.attention_mask.bool()  # (B, T)
        b, t = mask.shape
        self.bt = b * t
        valid = mask.flatten().nonzero().flatten()  # (N,)
        self.n = valid.numel()
        self.padded = self.n != self.bt
        sample = torch.tensor(batch.sample_ids, dtype=torch.long)[valid // t]
        self.info = TokenInfo(sample=sample, pos=valid % t, token=batch.input_ids.flatten()[valid])
        self.valid = valid
        keep = subsample_rows(self.info, stride)
        self._keep: list[int] | None = None if keep is None else keep.tolist()
        self._info = info_tensor(self.info)  # (N, 3)
        self._on: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._chunks: dict[tuple[torch.device, int], list[Chunk]] = {}
        self.massive_any: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``valid`` (N,) flat row indices and ``info`` (N, 3) on ``device`` (copied on first use)."""
        if device not in self._on:
            # copy=True: each device key owns its tensors, also the host's own (N longs per batch)
            self._on[device] = {"valid": self.valid.to(device, copy=True),
                                "info": self._info.to(device, copy=True)}
        return self._on[device]

    def chunks(self, device: torch.device, rows: int) -> list[Chunk]:
        """The valid tokens in chunks of at most ``rows`` rows, with indices on ``device``."""
        key = (device, rows)
        if key not in self._chunks:
            d = self.on(device)
            if device not in self.massive_any:
                self.massive_any[device] = torch.zeros(self.n, dtype=torch.bool, device=device)
            out = []
            for start in range(0, self.n, rows):
                stop = min(start + rows, self.n)
                keep = None
                if self._keep is not None:
                    lo, hi = bisect.bisect_left(self._keep, start), bisect.bisect_left(self._keep, stop)
                    keep = (torch.tensor(self._keep[lo:hi], dtype=torch.long) - start).to(device, copy=True)
                out.append(Chunk(start, stop, d["valid"][start:stop] if self.padded else None, keep,
                                 d["info"][start:stop], self.massive_any[device]))
            self._chunks[key] = out
        return self._chunks[key]

    def massive_count(self) -> torch.Tensor | None:
        """Distinct massive tokens of this batch over every device's sites (a device tensor, not read)."""
        masks = list(self.massive_any.values())
        if not masks:
            return None
        union = masks[0]
        for m in masks[1:]:
            union = union | m.to(union.device)
        return union.sum()


class Collector:
    """Hooks that stream every site's activations into statistics; one instance per model.

    Before each forward, ``begin_batch`` builds the batch's :class:`BatchIndex` so every hook keeps only real
    tokens. Hooks never read from the device: each site accumulates on its activation's device (one
    :class:`~outlierkit.llm.stats.SiteAccumulator` per site and device), and ``flush`` moves the totals into
    host :class:`~outlierkit.llm.stats.SiteStats` at the end of the run, at a checkpoint or when the INT8
    thresholds are calibrated. The one exception is ``full`` level on fused MoE experts: which experts got
    tokens is read once per MoE layer and batch, to recompute only those experts.
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
        self.index: BatchIndex | None = None
        self.shape_warnings: list[str] = []
        self.massive_tokens = 0  # distinct massive tokens, flushed
        self._acc: dict[str, dict[torch.device, SiteAccumulator]] = {}
        self._massive: torch.Tensor | None = None  # distinct massive tokens since the last flush (device)

    # -------------------------------------------------------------- batch context
    def begin_batch(self, batch: Batch, device: torch.device | None = None) -> None:
        """Index the batch's valid tokens (host work on the host mask; ``device`` is not needed: every hook
        gets the indices on its own activation's device)."""
        self.index = BatchIndex(batch, self.hist_stride)

    def end_batch(self) -> None:
        """Add this batch's distinct massive tokens (over all sites and devices) to a device counter."""
        if self.index is None:
            return
        cnt = self.index.massive_count()
        if cnt is not None:
            self._massive = cnt if self._massive is None else self._massive + cnt.to(self._massive.device)
        self.index = None

    def flush(self) -> None:
        """Move every device-side total into the host statistics (the only place values are read back)."""
        for name, accs in self._acc.items():
            th = self.thresholds.get(name, {})
            for acc in accs.values():
                acc.flush_into(self.stats[name], self.int8.setdefault(name, {}) if acc.thresholds else None,
                               tuple(th))
        self._acc.clear()
        for ex in self.experts.values():
            ex.to_host()
        if self._massive is not None:
            self.massive_tokens += int(self._massive.cpu())
            self._massive = None

    def device_of(self, site: Site, x: torch.Tensor) -> torch.device:
        """The device whose copy of the batch index and whose accumulator a site's activation uses: the
        activation's own device (a test can map sites to distinct device keys to drive a split model)."""
        return x.device

    def _record(self, site: Site, x: torch.Tensor) -> None:
        idx = self.index
        assert idx is not None, "begin_batch must run before the forward"
        if x.dim() < 2 or x.numel() // x.shape[-1] != idx.bt:
            if site.name not in self.shape_warnings:
                self.shape_warnings.append(site.name)
            return
        flat = x.detach().reshape(-1, x.shape[-1])  # (B*T, C), a view for contiguous activations
        if site.half:
            flat = flat[:, : flat.shape[1] // 2]
        c = flat.shape[1]
        st = self.stats.get(site.name)
        if st is None:
            st = self.stats[site.name] = SiteStats(channels=c, per_token=site.kind in PER_TOKEN_KINDS,
                                                   stride=self.hist_stride)
        dev = self.device_of(site, flat)
        accs = self._acc.setdefault(site.name, {})
        acc = accs.get(dev)
        if acc is None:
            th = tuple(self.thresholds.get(site.name, {}).values())
            acc = accs[dev] = SiteAccumulator(c, dev, per_token=st.per_token, thresholds=th)
        rows = chunk_rows(x.numel(), x.element_size(), c)
        for ch in idx.chunks(dev, rows):
            acc.update(flat if ch.rows is not None else flat[ch.start:ch.stop], ch,
                       massive_abs=self.massive_abs, massive_ratio=self.massive_ratio)
        d = idx.on(dev)
        acc.end_hook(flat, d["valid"] if idx.padded else None, d["info"])

    def _expert_hook(self, layer: int, fqn: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            vals = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
            if len(vals) < 2:
                return
            hidden, index = vals[0], vals[1]  # (B*T, C), (B*T, k)
            idx = self.index
            assert idx is not None
            if hidden.dim() < 2 or hidden.numel() // hidden.shape[-1] != idx.bt:
                if fqn + ":experts" not in self.shape_warnings:
                    self.shape_warnings.append(fqn + ":experts")
                return
            dev = hidden.device
            valid = idx.on(dev)["valid"]
            h = hidden.detach().reshape(-1, hidden.shape[-1])  # (B*T, C)
            # per-token max|x| from two reductions in the activation's dtype (no |x| temporary)
            tok_abs = torch.maximum(h.amax(dim=1), h.amin(dim=1).neg()).float().index_select(0, valid)  # (N,)
            sel = index.reshape(-1, index.shape[-1]).index_select(0, valid.to(index.device)).to(dev)  # (N, k)
            gate_up: torch.Tensor = module.gate_up_proj  # type: ignore[assignment]  # (E, 2I, C)
            down: torch.Tensor = module.down_proj  # type: ignore[assignment]  # (E, C, I)
            n_exp = int(gate_up.shape[0])
            ex = self.experts.get(fqn)
            if ex is None:
                ex = self.experts[fqn] = ExpertStats(layer, fqn, n_exp)
            ex.to_device(dev)
            flat = sel.flatten()
            # indices outside [0, E) (e.g. -1 for dropped slots) go to a spare bin E that is dropped
            e_idx = torch.where((flat >= 0) & (flat < n_exp), flat, n_exp)
            src = tok_abs.repeat_interleave(sel.shape[1])
            counts = torch.zeros(n_exp + 1, dtype=torch.float64, device=dev)
            counts.index_add_(0, e_idx, torch.ones((), dtype=torch.float64, device=dev).expand(e_idx.numel()))
            ex.tokens += counts[:n_exp]
            cur = torch.zeros(n_exp + 1, device=dev).scatter_reduce(0, e_idx, src, "amax")
            ex.in_absmax = torch.maximum(ex.in_absmax, cur[:n_exp])
            if self.experts_full:
                # Per-expert gated product and output, recomputed for the routed tokens (full level only:
                # it repeats the experts' work, and reads which experts got tokens once per layer and batch).
                act = getattr(module, "act_fn", torch.nn.functional.silu)
                xv = h.index_select(0, valid) if idx.padded else h
                for e in (counts[:n_exp] > 0).nonzero().flatten().tolist():
                    rows = (sel == e).any(dim=1)
                    he = xv[rows]
                    gate, up = torch.nn.functional.linear(he, gate_up[e]).chunk(2, dim=-1)
                    gated = act(gate) * up
                    out = torch.nn.functional.linear(gated, down[e])
                    ex.gated_absmax[e] = torch.maximum(ex.gated_absmax[e], gated.abs().max().float())
                    ex.out_absmax[e] = torch.maximum(ex.out_absmax[e], out.abs().max().float())

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
        hist_stride: the histogram (quantiles), kurtosis, mean|x| and the INT8 check's errors use every
            ``hist_stride``-th valid token (chosen by sample and position); everything else, the INT8
            thresholds' calibration maxima included, uses all tokens. ``None``: 8 at basic/default, 1 (exact) at full.
        massive_abs, massive_ratio: the massive-activation test (100, 1000).
        calib_fraction: share of samples that calibrates the INT8 thresholds; the rest evaluates them
            (1/3; 0 disables the check).
        checkpoint_every: save statistics every N batches (0: never).
        layerwise_batches: when the model runs layer by layer (:func:`outlierkit.llm.sequential.layerwise`,
            ``outlierkit profile --sequential``), how many batches share one pass through the layers (16):
            their layer inputs wait in host memory, and every layer moves to the device once per group.
    """

    level: str = "default"
    batch_size: int = 8
    hist_stride: int | None = None
    kinds: tuple[str, ...] | None = None
    massive_abs: float = 100.0
    massive_ratio: float = 1000.0
    calib_fraction: float = 1 / 3
    checkpoint_every: int = 0
    layerwise_batches: int = 16


def int8_thresholds(stats: dict[str, SiteStats]) -> dict[str, dict[str, float]]:
    """Per site: T = calibration absmax, and T = 99.9th percentile of |x| (from the histogram)."""
    out = {}
    for name, st in stats.items():
        if st.count:
            out[name] = {"absmax": st.absmax, "p99.9": st.quantile_abs(0.999)}
    return out


def _dist_world() -> tuple[Any, int]:
    """``(torch.distributed, world size)`` when a process group is up, else ``(None, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist, dist.get_world_size()
    return None, 1


def merged_int8_thresholds(stats: dict[str, SiteStats], sites: Sequence[Site]) -> dict[str, dict[str, float]]:
    """INT8 thresholds from the calibration statistics of every rank (one collective call per rank).

    Under ``torch.distributed`` the histograms are summed and the extremes maxed over ranks first, so the
    thresholds are those a single process would calibrate on all calibration batches; without a process
    group this is :func:`int8_thresholds`.
    """
    dist, world = _dist_world()
    if dist is None:
        return int8_thresholds(stats)
    from outlierkit.llm.stats import HIST_BINS

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    names = [s.name for s in sites]
    empty = SiteStats(channels=1)
    hist = torch.stack([stats.get(n, empty).hist.double() for n in names]).to(dev)  # (S, HIST_BINS)
    ext = torch.tensor([[stats.get(n, empty).vmax, -stats.get(n, empty).vmin] for n in names],
                       dtype=torch.float64, device=dev)  # (S, 2)
    count = torch.tensor([stats.get(n, empty).count for n in names], dtype=torch.float64, device=dev)
    dist.all_reduce(hist)
    dist.all_reduce(count)
    dist.all_reduce(ext, op=dist.ReduceOp.MAX)
    merged = {}
    for i, n in enumerate(names):
        st = SiteStats(channels=1)
        st.hist = hist[i].cpu().reshape(HIST_BINS)
        st.count = int(count[i])
        st.vmax, st.vmin = float(ext[i, 0]), -float(ext[i, 1])
        merged[n] = st
    return int8_thresholds(merged)


def _sync_thresholds(thresholds: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Under torch.distributed: thresholds any rank already holds (a resumed rank), for every rank."""
    dist, world = _dist_world()
    if dist is None:
        return thresholds
    got: list[Any] = [None] * world
    dist.all_gather_object(got, thresholds or None)
    return next((g for g in got if g), {})


def _model_inputs(model: nn.Module, mm: ModelMap, corpus: TokenCorpus, opt: ProfileOptions, name: str,
                  sites: Sequence[Site], shard: tuple[int, int], stride: int) -> dict[str, Any]:
    """What the statistics depend on; a checkpoint written for other inputs is refused on resume."""
    params = list(model.parameters())
    return {"model": name, "model_type": mm.model_type, "parameters": sum(p.numel() for p in params),
            "dtype": str(params[0].dtype) if params else "", "samples": len(corpus), "seq_len": corpus.seq_len,
            "corpus_sha256": corpus.fingerprint(), "level": opt.level,
            "kinds": list(opt.kinds) if opt.kinds else None, "sites": len(sites), "batch_size": opt.batch_size,
            "hist_stride": stride, "massive_abs": opt.massive_abs, "massive_ratio": opt.massive_ratio,
            "calib_fraction": opt.calib_fraction, "shard": list(shard)}


def checkpoint_path(checkpoint: Path, shard: tuple[int, int]) -> Path:
    """Each rank of a distributed run checkpoints to its own file: ``NAME-rank1of2``, unless the caller's
    name already names the rank (``checkpoint-0-rank1-of2``), which is then used as given."""
    rank, world = shard
    if world == 1 or re.search(rf"rank-?{rank}(\D|$)", checkpoint.name):
        return checkpoint
    return checkpoint.with_name(f"{checkpoint.name}-rank{rank}of{world}")


def _warn(message: str) -> None:
    """A warning the user must see: on the console (stderr) now, once per message (the shared mechanism, so
    the CLI's echo of the Python warning below does not print it twice), and through ``warnings`` for callers."""
    from outlierkit._utils.log import warning

    warning(message)
    warnings.warn(message, stacklevel=4)  # the caller of profile_model (past torch.no_grad's wrapper)


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
    against them (too few samples for both: the check is skipped with a warning). Every site's statistics
    cover all samples. With ``checkpoint``, statistics are saved every ``checkpoint_every`` batches
    (one self-validating file, per rank under ``shard``) and ``resume`` continues after the last saved
    batch, refusing a checkpoint written for other inputs. ``shard=(rank, world)`` profiles every
    ``world``-th batch (for distributed runs; merge after with :func:`merge_distributed`); under an
    initialized process group the INT8 thresholds are calibrated from all ranks' calibration statistics.
    """
    opt = options or ProfileOptions()
    if opt.batch_size < 1 or opt.layerwise_batches < 1:
        raise ConfigError("--batch-size and layerwise_batches must be at least 1")
    if not 0 <= opt.calib_fraction < 1:
        raise ConfigError("calib_fraction must be in [0, 1)")
    sites = discover_sites(model, mm, opt.level, opt.kinds)
    if not sites:
        raise ConfigError(f"no sites found at level {opt.level!r} for {mm.spec.name}")
    notes: list[str] = []
    n_cal = int(len(corpus) * opt.calib_fraction) if opt.calib_fraction > 0 else 0
    if opt.calib_fraction > 0 and (n_cal < 1 or n_cal >= len(corpus)):
        need = next(n for n in range(2, 1 << 20) if 1 <= int(n * opt.calib_fraction) < n)
        notes.append(f"{name}: INT8 check skipped: the INT8 check needs at least {need} samples (it calibrates on "
                     f"{opt.calib_fraction:.0%} of them and evaluates on the rest) and the data gave {len(corpus)}")
        _warn(notes[-1])
        n_cal = 0
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
    inputs = _model_inputs(model, mm, corpus, opt, name, sites, shard, stride)
    collector = Collector(model, mm, sites, massive_abs=opt.massive_abs, massive_ratio=opt.massive_ratio,
                          level=opt.level, hist_stride=stride)
    prof = ActivationProfile(model=name, model_type=mm.model_type, sites=sites, stats={}, inputs=inputs)
    start = 0
    ckpt = checkpoint_path(checkpoint, shard) if checkpoint is not None else None
    if resume and ckpt is not None and ActivationProfile.exists(ckpt):
        prof = ActivationProfile.load(ckpt)
        diff = [f"{k}: {prof.inputs.get(k)!r} -> {v!r}" for k, v in inputs.items() if prof.inputs.get(k) != v]
        if diff:
            raise DataError(f"checkpoint {ckpt.with_suffix('.safetensors')} was written for other inputs "
                            f"({'; '.join(diff)}); rerun with the same options or without --resume")
        start = prof.batches_done
        collector.stats, collector.experts, collector.int8 = prof.stats, prof.experts, prof.int8
        collector.thresholds = prof.thresholds
        collector.massive_tokens = prof.massive_tokens
        log(f"{name}: resuming after {start} of {len(mine)} batches")
    # The profile shares the collector's dicts, so checkpoints always see the latest statistics.
    prof.stats, prof.experts, prof.int8 = collector.stats, collector.experts, collector.int8
    prof.shape_warnings = collector.shape_warnings
    prof.warnings = list(dict.fromkeys(prof.warnings + notes))
    calibrate = n_cal > 0
    if calibrate and world > 1:
        # a resumed rank may already hold the (all-rank) thresholds: every rank adopts them, or none calibrates
        collector.thresholds = _sync_thresholds(collector.thresholds)
    if collector.thresholds:
        calibrate = False

    def calibrate_now() -> None:
        collector.flush()
        collector.thresholds = merged_int8_thresholds(collector.stats, sites) if world > 1 else \
            int8_thresholds(collector.stats)
        prof.thresholds = collector.thresholds

    runner = _base_model(model, mm)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Inside `layerwise` (sequential profiling of a model larger than the device) batches run in groups,
    # layer-major: every batch of a group through layer 0, then layer 1, ...; each keeps its own token index
    # until the group ends. Groups never span the calibration / evaluation boundary or a checkpoint.
    seq = layerwise_device(model) is not None
    group = opt.layerwise_batches if seq else 1
    try:
        with HookSet() as hooks:
            collector.attach(hooks)
            spans: list[tuple[int, int]] = []  # [k, end) of `mine`, one forward (group) each
            k = start
            while k < len(mine):
                end = k + 1
                while (end < len(mine) and end - k < group and plan[mine[end]][0] == plan[mine[k]][0]
                       and not (ckpt is not None and opt.checkpoint_every and end % opt.checkpoint_every == 0)):
                    end += 1
                spans.append((k, end))
                k = end
            for k, end in progress(spans, description=f"profiling {name}" + (" (batch groups)" if seq else "")):
                if plan[mine[k]][0] == "eval" and calibrate:
                    calibrate_now()
                    calibrate = False
                batches = [plan[mine[i]][1] for i in range(k, end)]
                indexes = []
                for b in batches:
                    collector.begin_batch(b, device)
                    indexes.append(collector.index)

                def use_index(j: int, _b: Any, ix: list[BatchIndex | None] = indexes) -> None:
                    collector.index = ix[j]

                forward_each(model, batches, module=runner, before=use_index)
                for idx in indexes:
                    assert idx is not None
                    collector.index = idx
                    prof.tokens += idx.n
                    collector.end_batch()
                k = prof.batches_done = end
                if ckpt is not None and opt.checkpoint_every and k % opt.checkpoint_every == 0:
                    collector.flush()
                    prof.massive_tokens = collector.massive_tokens
                    prof.save(ckpt)
            if calibrate and world > 1:
                calibrate_now()  # this rank had no evaluation batch: it still takes part in the collective
            collector.flush()
    finally:
        model.train(was_training)
    prof.massive_tokens = collector.massive_tokens
    # Sites that saw no tokens (e.g. a shape the hook could not map) get empty statistics.
    for s in sites:
        if s.name not in prof.stats:
            prof.stats[s.name] = SiteStats(channels=1, per_token=s.kind in PER_TOKEN_KINDS)
    for w in collector.shape_warnings:
        msg = f"{name}: site {w} produced a tensor whose shape does not match the batch; skipped"
        if msg not in prof.warnings:
            prof.warnings.append(msg)
            _warn(msg)
    for problem in prof.problems():
        _warn(problem)
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
                     "tokens": prof.tokens, "sites": [asdict(s) for s in prof.sites],
                     "massive_tokens": prof.massive_tokens, "thresholds": prof.thresholds,
                     "warnings": prof.warnings, "shape_warnings": prof.shape_warnings, "inputs": prof.inputs},
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
        batches_done=m["batches_done"], tokens=m["tokens"], massive_tokens=m["massive_tokens"],
        thresholds=m["thresholds"], warnings=m["warnings"], shape_warnings=m["shape_warnings"], inputs=m["inputs"])


def fmt_loc(loc: Loc, token_text: Callable[[int], str] | None) -> dict[str, Any]:
    tok = token_text(loc.token) if token_text is not None and loc.token >= 0 else None
    return {"sample": loc.sample, "pos": loc.pos, "channel": loc.channel, "token": tok}
