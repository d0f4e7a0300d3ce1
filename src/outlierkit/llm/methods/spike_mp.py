"""``spike_mp``: spike-aware mixed precision (keep the linears that read activation spikes in high precision).

Maisonnave et al. (lucasmaisonnave/Gradual-Binary-Search, ``PWIM``) keep a hard-coded table of down/o
projections in FP16 or FP8 and quantize everything else; here the table is chosen from a profile of the
linear inputs instead (quant-anchors 2.4): the spike ratio max|x| / median|x| of each linear's input over
the calibration tokens (pads masked), with the anchors' threshold 100 as default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from outlierkit.errors import ConfigError, DataError
from outlierkit.llm.corpus import Batch, TokenCorpus
from outlierkit.llm.formats import Format, FP8Format
from outlierkit.llm.layers import quant_layers
from outlierkit.llm.methods.base import METHODS, LayerRecord, Override, QuantContext, QuantMethod
from outlierkit.llm.models import ModelMap

Select = Literal["ratio", "absmax", "topk", "list", "random"]
Keep = Literal["float", "bf16", "fp16", "fp8", "fp8-e4m3", "fp8-e5m2"]

# What each ``keep`` value does to a selected layer's weight and input activation.
KEEP_FORMATS: dict[str, Format | None] = {
    "float": None, "bf16": None, "fp16": None,  # kept in the model's float dtype (see the class docstring)
    "fp8": FP8Format("e4m3", "tensor", scaled=True),
    "fp8-e4m3": FP8Format("e4m3", "tensor", scaled=True),
    "fp8-e5m2": FP8Format("e5m2", "tensor", scaled=False),  # the reference code's plain cast
}


@dataclass
class LinearSpike:
    """Input statistics of one block linear (from a profile)."""

    fqn: str
    layer: int
    absmax: float
    median: float

    @property
    def ratio(self) -> float:
        return self.absmax / self.median if self.median > 0 else float("inf")


def batches_to_corpus(batches: list[Batch]) -> TokenCorpus:
    """The calibration batches as a corpus (each row's real tokens), for the profiler."""
    samples: list[list[int]] = []
    for b in batches:
        for row, m in zip(b.input_ids, b.attention_mask, strict=True):
            samples.append(row[m.bool()].tolist())
    pad = int(batches[0].input_ids[batches[0].attention_mask == 0][0]) if bool((batches[0].attention_mask == 0).any()) \
        else 0
    width = max(len(s) for s in samples)
    return TokenCorpus(samples, ["calib"] * len(samples), width, pad)


@torch.no_grad()
def linear_input_spikes(model: nn.Module, mm: ModelMap, batches: list[Batch] | None = None, *,
                        profile: str | None = None) -> dict[str, LinearSpike]:
    """Per block linear: input absmax and median |x| from ``outlierkit.llm.profile`` (``linear_in`` sites).

    Args:
        batches: calibration batches to profile (used when ``profile`` is None).
        profile: path of a saved :class:`~outlierkit.llm.profile.ActivationProfile` (``outlierkit profile
            --level full`` or one with ``linear_in`` sites) instead of profiling now.
    """
    from outlierkit.llm.profile import ActivationProfile, ProfileOptions, profile_model

    if profile is not None:
        prof = ActivationProfile.load(profile)
    else:
        if not batches:
            raise DataError("spike_mp needs calibration batches (or a saved profile) to find the spikes")
        corpus = batches_to_corpus(batches)
        # hist_stride 1: exact medians over every calibration token (the corpus is small).
        opts = ProfileOptions(kinds=("linear_in",), calib_fraction=0.0, hist_stride=1,
                              batch_size=max(1, batches[0].input_ids.shape[0]))
        prof = profile_model(model, mm, corpus, opts, name="spike_mp")
    out: dict[str, LinearSpike] = {}
    for site in prof.sites:
        if site.kind != "linear_in":
            continue
        st = prof.stats[site.name]
        if not st.count:
            continue
        fqn = site.name[: -len(":in")] if site.name.endswith(":in") else site.module
        out[fqn] = LinearSpike(fqn, site.layer, float(st.absmax), float(st.quantile_abs(0.5)))
    if not out:
        raise DataError("the profile has no linear-input (linear_in) statistics; profile with --level full")
    return out


@METHODS.register("spike_mp")
@dataclass
class SpikeMP(QuantMethod):
    """Spike-aware mixed precision (Maisonnave et al., PWIM; selection automated as in QFeM, Yang et al. 2024).

    Selection on the calibration profile of every block linear's input X (non-pad tokens)::

        ratio(l) = max|X_l| / median|X_l|      select l  iff  ratio(l) >= threshold      (select: ratio)
                                               or max|X_l| >= threshold                  (select: absmax)
                                               or l in top_k by ratio                    (select: topk)
                                               or l matches ``layers``                   (select: list)
        random ablation: the same number of layers (or ``top_k``) drawn uniformly with ``seed``.

    Selected layers keep ``keep`` precision; all others get the recipe's formats (W8A8 per-tensor in the
    paper's headline setting, also per-token and W6A6) and are fake-quantized by the ``rtn`` step run
    inside this step (``quantize: true``). Equivalence transforms (smoothquant, os_plus) placed before
    ``spike_mp`` in the same recipe are profiled after they ran, so the selection sees the inputs the
    quantizers will see.

    ``keep: float`` (aliases ``bf16``/``fp16``, the paper's "FP16" layers) keeps the layer in the model's
    own float dtype: this fake-quantization simulation runs in fp32, so the BF16/FP16 rounding of those
    layers (relative error <= 2^-8 / 2^-11) is not simulated. ``fp8``/``fp8-e4m3``: E4M3 with a per-tensor
    scale s = amax / 448 for weight and input; ``fp8-e5m2``: the reference code's direct cast to E5M2 and
    back, no scale (values beyond 57344 saturate).

    Candidates are the block linears with a ``linear_in`` profile site (``nn.Linear`` and GPT-2 ``Conv1D``);
    fused MoE experts (3-D weights) are never selected and get the recipe's formats. A ``profile`` loaded
    from disk describes the model it was taken on: with a transform earlier in the recipe, profile now
    (the default) instead.

    Args:
        select: ``ratio`` (default), ``absmax``, ``topk``, ``list`` or ``random``.
        threshold: for ``ratio``/``absmax`` and for sizing ``random`` (default 100, the anchors' TRSH).
        top_k: for ``topk``; for ``random`` the number of layers (default: as many as ``ratio`` selects).
        layers: for ``list``: FQNs or ``re:`` regexes.
        keep: precision of selected layers (default ``float``).
        seed: for ``random`` (default 0).
        profile: path of a saved activation profile to select from (default None: profile the calibration
            batches now, after any earlier transform).
        quantize: run ``rtn`` on the rest within this step (default True).
        fused: select whole fused groups (q/k/v, gate/up): a selected shard brings its siblings, since vLLM
            loads each group as one layer with one scheme (default False; ``--target vllm`` sets it).
    """

    select: Select = "ratio"
    threshold: float = 100.0
    top_k: int | None = None
    layers: list[str] = field(default_factory=list)
    keep: Keep = "float"
    seed: int = 0
    profile: str | None = None
    quantize: bool = True
    fused: bool = False

    def __post_init__(self) -> None:
        if self.select not in ("ratio", "absmax", "topk", "list", "random"):
            raise ConfigError(f"spike_mp.select must be ratio, absmax, topk, list or random, got {self.select!r}")
        if self.keep not in KEEP_FORMATS:
            raise ConfigError(f"spike_mp.keep must be one of {sorted(KEEP_FORMATS)}, got {self.keep!r}")
        if not self.threshold > 0:
            raise ConfigError(f"spike_mp.threshold must be positive, got {self.threshold}")
        if self.top_k is not None and self.top_k < 0:
            raise ConfigError(f"spike_mp.top_k must be >= 0, got {self.top_k}")
        if self.select == "topk" and self.top_k is None:
            raise ConfigError("spike_mp.select: topk needs top_k (e.g. top_k: 2)")
        if self.select == "list" and not self.layers:
            raise ConfigError("spike_mp.select: list needs layers (FQNs or 're:' regexes)")
        if isinstance(self.layers, str):
            self.layers = [self.layers]

    # ------------------------------------------------------------------------------------ selection
    def choose(self, spikes: dict[str, LinearSpike]) -> tuple[list[str], dict[str, str], list[str]]:
        """(selected FQNs, reason per selected FQN, notes) for the statistics ``spikes``."""
        names = list(spikes)
        ranked = sorted(names, key=lambda n: -spikes[n].ratio)
        notes: list[str] = []
        reasons: dict[str, str] = {}
        if self.select == "ratio":
            sel = [n for n in ranked if spikes[n].ratio >= self.threshold]
            for n in sel:
                reasons[n] = f"max/median {spikes[n].ratio:.1f} >= {self.threshold:g}"
        elif self.select == "absmax":
            sel = [n for n in sorted(names, key=lambda n: -spikes[n].absmax) if spikes[n].absmax >= self.threshold]
            for n in sel:
                reasons[n] = f"max|x| {spikes[n].absmax:.4g} >= {self.threshold:g}"
        elif self.select == "topk":
            assert self.top_k is not None
            sel = ranked[: self.top_k]
            for i, n in enumerate(sel):
                reasons[n] = f"rank {i + 1} by max/median ({spikes[n].ratio:.1f})"
        elif self.select == "list":
            probe = [Override(p) for p in self.layers]
            sel = [n for n in names if any(o.matches(n) for o in probe)]
            unmatched = [p for p, o in zip(self.layers, probe, strict=True) if not any(o.matches(n) for n in names)]
            if unmatched:
                raise ConfigError(f"spike_mp.layers: {unmatched} match no block linear; names look like {names[0]!r}")
            for n in sel:
                reasons[n] = f"listed (max/median {spikes[n].ratio:.1f})"
        else:
            if self.top_k is not None:
                count, why = self.top_k, f"top_k={self.top_k}"
            else:
                count = sum(1 for n in names if spikes[n].ratio >= self.threshold)
                why = f"as many as max/median >= {self.threshold:g} selects"
            if count > len(names):
                raise ConfigError(f"spike_mp: random selection of {count} layers, but the model has {len(names)}")
            sel = sorted(random.Random(self.seed).sample(names, count), key=names.index)
            spike_set = {n for n in names if spikes[n].ratio >= self.threshold}
            for n in sel:
                reasons[n] = (f"random (seed {self.seed}, {count} = {why}); max/median {spikes[n].ratio:.1f}"
                              + (" (also a spike layer)" if n in spike_set else ""))
        if not sel:
            top = ranked[0]
            notes.append(f"spike_mp: the {self.select} rule selects no layer (largest max/median "
                         f"{spikes[top].ratio:.1f} at {top}, largest max|x| "
                         f"{max(s.absmax for s in spikes.values()):.4g}); every layer is quantized. "
                         "Lower the threshold or use select: topk.")
        elif len(sel) == len(names):
            notes.append(f"spike_mp: the {self.select} rule selects all {len(names)} block linears; nothing is "
                         "quantized to the recipe's formats. Raise the threshold or use select: topk.")
        return sel, reasons, notes

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        if any(not q.is_float for _, q in quant_layers(model)):
            raise ConfigError("spike_mp must come before rtn in the recipe (it decides which layers rtn quantizes)")
        spikes = linear_input_spikes(model, mm, ctx.batches, profile=self.profile)
        sel, reasons, notes = self.choose(spikes)
        if self.fused:
            from outlierkit.llm.export_ct import fused_groups

            for shards in fused_groups(list(spikes)).values():
                hit = [n for n in shards if n in sel]
                for n in shards:
                    if hit and n not in sel:
                        sel.append(n)
                        reasons[n] = f"fused with {', '.join(hit)} (one layer in vLLM)"
        ctx.notes.extend(notes)
        fmt = KEEP_FORMATS[self.keep]
        keep_label = fmt.label() if fmt is not None else "float (model dtype)"
        new = [Override(n, skip=True) if fmt is None else Override(n, weight=fmt, act=fmt, set_weight=True,
                                                                      set_act=True) for n in sel]
        ctx.overrides[:0] = new
        chosen = set(sel)
        records = []
        for n, s in sorted(spikes.items(), key=lambda kv: -kv[1].ratio):
            info: dict[str, Any] = {"selected": n in chosen, "precision": keep_label if n in chosen else "recipe",
                                    "in_absmax": s.absmax, "in_median": s.median, "spike_ratio": s.ratio,
                                    "reason": reasons.get(n, "")}
            records.append(LayerRecord(n, "spike_mp", info))
        if self.quantize:
            from outlierkit.llm.methods.rtn import RTN

            records += RTN().apply(model, ctx)
        return records
