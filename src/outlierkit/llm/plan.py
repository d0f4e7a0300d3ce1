"""The precision planner: per layer, which layers keep high precision and which transform runs, for a target.

Given a model, calibration and held-out data, the recipe's formats and a target (a maximum loss of
quality, or an average weight-bit budget), the planner

1. profiles the linear inputs (spike ratio max|x| / median|x|, as ``spike_mp``),
2. applies each candidate transform (``rtn`` = none, ``smoothquant``, ``os_plus``, ``rotate``) once to a
   copy of the float model, quantizes it with the recipe's formats and ranks the block linears by their
   measured output SQNR (lowest first: the layers the format hurts most; ties broken by the spike ratio);
   with ``gptq`` among the candidates, each transform also gets a ``+gptq`` candidate: GPTQ runs once on
   the transformed copy and every layer takes GPTQ's weights only where its measured layer SQNR beats
   round-to-nearest (else RTN, written as ``gptq.rtn_layers``),
3. finds, per transform, the fewest top-ranked layers to keep in float that meet the loss target
   (binary search on the ranked prefix, every probe evaluated on held-out data), or the lowest loss
   within the bit budget,
4. with ``per_group`` among the candidates, also builds a mixed candidate: for every fold group (norm -> q/k/v,
   norm -> gate/up, v -> o, up -> down) the transform among ``rtn`` / ``smoothquant`` / ``os_plus`` under which
   the group's consumer linears measured the best worst-layer SQNR in step 2 (groups are independent: each
   fold leaves the float model unchanged and touches only its own consumers' inputs), written as
   ``smoothquant`` / ``os_plus`` steps restricted to their ``groups``; it is ranked and searched like the others,
5. picks the transform that needs the fewest high-precision layers (then the lower loss), and
6. verifies the written recipe end to end with ``quantize_`` on a fresh copy and evaluates it.

``rotate`` is planned only as the folded rotation (``online_down: false``): the online Hadamard cannot be
saved or served, and a plan is a recipe to save. Families that cannot fold a rotation drop the candidate
with the reason as a warning (a plan of only ``rotate`` on such a family is an error).

It also measures the *uniform* alternatives: the plain recipe (no layer kept) and keeping whole
projection types (all ``down_proj``, all ``o_proj``, ...) in float, worst type first, until the target
is met, so that the report shows how many high-precision layers the per-layer plan saves.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlierkit._utils.log import log
from outlierkit.errors import ConfigError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.evaluate import EvalData
from outlierkit.llm.formats import Format
from outlierkit.llm.layers import unwrap_
from outlierkit.llm.recipe import CalibConfig, Recipe, Step, layer_sqnr, quantize_
from outlierkit.llm.sequential import layerwise

TRANSFORMS = ("rtn", "smoothquant", "os_plus", "rotate")
ROUNDING = "gptq"  # not a transform: a per-layer weight-rounding choice (gptq or rtn) on top of each transform
PER_GROUP = "per_group"  # the mixed candidate: per fold group, the best of FOLD_CHOICES
FOLD_CHOICES = ("rtn", "smoothquant", "os_plus")
FLOAT_BITS = 16.0  # a kept layer is served in BF16/FP16


@dataclass(frozen=True)
class PlanTarget:
    """What the plan must achieve (exactly one of the two).

    Args:
        max_loss: maximum loss of quality against the float model on held-out data, in the planner's
            metric: ``ppl`` the relative perplexity increase ppl_q / ppl_f - 1 (0.01 = +1 %), ``top1``
            1 - agreement with the float model's predictions, ``cos`` 1 - mean embedding cosine
            (0.001 = cos >= 0.999).
        bits: average bits per block-linear weight (quantized layers count the weight format's bits,
            kept layers 16), e.g. 8.5 for W8 with a few BF16 layers.
    """

    max_loss: float | None = None
    bits: float | None = None

    def __post_init__(self) -> None:
        if (self.max_loss is None) == (self.bits is None):
            raise ConfigError("give exactly one target: --max-loss or --bits")
        if self.max_loss is not None and not self.max_loss >= 0:
            raise ConfigError(f"--max-loss must be >= 0, got {self.max_loss}")
        if self.bits is not None and not 1 <= self.bits <= FLOAT_BITS:
            raise ConfigError(f"--bits must be in [1, 16], got {self.bits}")

    def label(self) -> str:
        return f"loss <= {self.max_loss:g}" if self.max_loss is not None else f"avg weight bits <= {self.bits:g}"


@dataclass
class Probe:
    """One evaluated configuration."""

    transform: str
    kept: list[str]
    loss: float
    metrics: dict[str, float]
    bits: float

    def row(self) -> dict[str, Any]:
        return {"transform": self.transform, "kept_float": len(self.kept), "loss": self.loss,
                "avg_weight_bits": self.bits, **{k: v for k, v in self.metrics.items() if k != "eval_tokens"}}


@dataclass
class Plan:
    """The planner's result: the recipe, per-layer choices and every evaluation made."""

    recipe: Recipe
    transform: str
    kept: list[str]
    loss: float
    meets_target: bool
    layers: list[dict[str, Any]]
    probes: list[Probe] = field(default_factory=list)
    uniform: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    groups: list[dict[str, Any]] = field(default_factory=list)  # the per_group candidate's choice per fold group


METRICS = ("auto", "ppl", "top1", "cos")


def quality_loss(metrics: dict[str, float], ref: dict[str, float], metric: str) -> float:
    """``ppl``: relative perplexity increase; ``top1``: 1 - next-token (causal) or neighbour (encoder)
    agreement with the float model; ``cos``: 1 - mean cosine of the embeddings."""
    if metric == "ppl":
        return metrics["ppl"] / ref["ppl"] - 1.0
    if metric == "top1":
        return 1.0 - metrics["top1_agree"]
    return 1.0 - metrics["cos_mean"]


@torch.no_grad()
def measure(model: nn.Module, tokenizer: Any, data: EvalData, metric: str) -> dict[str, float]:
    """Only what ``metric`` needs (perplexity, or agreement with the float logits, or embedding fidelity)."""
    from outlierkit.llm.evaluate import embeddings, fidelity, perplexity, token_agreement
    from outlierkit.llm.recipe import model_outputs

    if metric == "ppl":
        return {k: v for k, v in perplexity(model, tokenizer, data.documents, window=data.window,
                                            max_windows=data.max_windows).items() if k != "eval_tokens"}
    if data.causal:
        if data.reference is None:
            data.reference = model_outputs(model, data.batches)
        assert isinstance(data.reference, list)
        return token_agreement(model, data.reference, data.batches)
    emb = embeddings(model, data.batches)
    if data.reference is None:
        data.reference = emb
    assert isinstance(data.reference, torch.Tensor)
    return fidelity(data.reference, emb)


def _transform_step(name: str, params: dict[str, Any] | None = None) -> list[Step]:
    if name == "rtn":
        return []
    if name in ("rotate_online", "online_down"):
        raise ConfigError("the planner does not plan rotate's online Hadamard (online_down): the planned model is "
                          "saved and vLLM/transformers cannot run it; use the folded 'rotate'")
    if name not in TRANSFORMS:
        raise ConfigError(f"unknown transform {name!r}; valid: {', '.join((*TRANSFORMS, PER_GROUP, ROUNDING))}")
    if params is None:
        params = ({"folds": ["norm", "attn_v"]} if name == "smoothquant" else
                  {"online_down": False} if name == "rotate" else {})
    return [Step(name, dict(params))]


def _split(candidate: str) -> tuple[str, bool]:
    """``os_plus+gptq`` -> (``os_plus``, True)."""
    base, _, rounding = candidate.partition("+")
    return base, rounding == ROUNDING


def _bits(fmt_bits: int, params: dict[str, int], kept: Sequence[str]) -> float:
    total = sum(params.values())
    kept_p = sum(params[n] for n in kept)
    return (kept_p * FLOAT_BITS + (total - kept_p) * fmt_bits) / total


def _weight(model: nn.Module, fqn: str) -> torch.Tensor:
    mod = model.get_submodule(fqn)
    w = getattr(mod, "gate_up_proj", None) if getattr(mod, "weight", None) is None else mod.weight
    assert isinstance(w, torch.Tensor), fqn
    return w


def _proj_type(fqn: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``mlp.down_proj`` (the name without the block index)."""
    return re.sub(r"^.*?\.\d+\.", "", fqn)


class Planner:
    """Plan a mixed-precision recipe (see the module docstring).

    Args:
        model: the float model (left unchanged; every probe runs on a copy).
        tokenizer: for perplexity.
        calib: calibration batches. eval_data: held-out data (its float reference is filled here).
        weight / act: formats of the quantized layers (default W8A8: int8-channel / int8-tensor).
        target: :class:`PlanTarget`.
        transforms: candidate transforms (default rtn, smoothquant, os_plus; also ``rotate``, folded only) and
            ``gptq`` (each transform is then also tried with GPTQ, chosen per layer where it measures better).
        metric: ``auto`` (default: ``ppl`` for causal LMs, ``cos`` for encoders), ``ppl``, ``top1`` or ``cos``.
        calib_config: the recipe's calibration settings (written into the recipe).
        profile: a saved activation profile with linear-input sites (default: profile ``calib`` now); only
            the spike ratios shown in the report and used to break SQNR ties come from it.
        fused: decide per fused group (q/k/v, gate/up: one layer in vLLM, which needs one scheme per fused
            layer): a group is kept or quantized as a whole, ranked by its worst member (default False;
            ``plan --target vllm`` sets it).
        sequential: models larger than the device: every forward (profile, transforms, GPTQ, probes, the
            verification) runs one decoder layer at a time on ``device`` while the weights of the model and
            of its copies stay where they are (CPU memory); the plan is the all-at-once plan.
        device: where sequential passes compute (default: the model's device).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, calib: list[Batch], eval_data: EvalData, *,
                 weight: Format | None, act: Format | None, target: PlanTarget,
                 transforms: Sequence[str] = ("rtn", "smoothquant", "os_plus"), metric: str = "auto",
                 calib_config: CalibConfig | None = None, name: str = "planned",
                 profile: str | None = None, fused: bool = False, sequential: bool = False,
                 device: str | None = None) -> None:
        if metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if metric == "auto":
            metric = "ppl" if eval_data.causal else "cos"
        if metric == "ppl" and not eval_data.causal:
            raise ConfigError("perplexity needs a causal LM; use --metric cos or top1 for encoders")
        if metric == "cos" and eval_data.causal:
            raise ConfigError("cos compares embeddings (encoders); use --metric ppl or top1 for causal LMs")
        self.metric = metric
        self.profile = profile
        if not transforms:
            raise ConfigError("give at least one transform (rtn, smoothquant, os_plus, rotate; per_group; gptq)")
        self.gptq = ROUNDING in transforms
        bases = list(dict.fromkeys(t for t in transforms if t not in (ROUNDING, PER_GROUP))) or ["rtn"]
        self._steps: dict[str, list[Step]] = {t: _transform_step(t) for t in bases}
        if PER_GROUP in transforms:
            if sum(t in bases for t in FOLD_CHOICES) < 2:
                raise ConfigError(f"{PER_GROUP} chooses per fold group among {', '.join(FOLD_CHOICES)}: give at "
                                  "least two of them as well")
            bases.append(PER_GROUP)
        self.group_choice: list[dict[str, Any]] = []
        self._layer_choice: dict[str, str] = {}
        if self.gptq:
            from outlierkit.llm.formats import IntFormat

            if not isinstance(weight, IntFormat):
                raise ConfigError(f"gptq rounds integer weights; the planned weight format is "
                                  f"{weight.label() if weight is not None else 'float'}")
        if weight is None and act is None:
            raise ConfigError("the planned formats keep everything float; give --weight and/or --act")
        self.model, self.tokenizer, self.calib, self.ev = model, tokenizer, calib, eval_data
        self.weight, self.act, self.target = weight, act, target
        # candidates: each transform with RTN, and (gptq) with GPTQ where it measures better per layer
        self.transforms = [*bases, *([f"{t}+{ROUNDING}" for t in bases] if self.gptq else [])]
        self.notes: list[str] = []
        self.calib_config = calib_config or CalibConfig(min_tokens=1)
        self.name = name
        self.fused = fused
        self.probes: list[Probe] = []
        self.sequential = sequential
        self.device = (device or str(next(model.parameters()).device)) if sequential else None
        with layerwise(model, self.device):
            self.ref = measure(model, tokenizer, eval_data, self.metric)  # also fills the float reference
        self.fmt_bits = weight.bits if weight is not None and hasattr(weight, "bits") else (8 if weight else 16)

    # ------------------------------------------------------------------------------------ helpers
    def recipe(self, transform: str, kept: Sequence[str], rtn_layers: Sequence[str] = ()) -> Recipe:
        base, gptq = _split(transform)
        last: dict[str, Any] = {"gptq": {"rtn_layers": sorted(set(rtn_layers) - set(kept))}} if gptq else {"rtn": {}}
        data: dict[str, Any] = {"name": self.name, "weight": self.weight, "act": self.act,
                                "steps": [{s.method: s.params} for s in self._steps[base]] + [last],
                                "overrides": {n: "skip" for n in kept}}
        r = Recipe.from_dict({k: v for k, v in data.items() if k not in ("weight", "act")})
        r.weight, r.act, r.calib = self.weight, self.act, self.calib_config
        return r

    def _evaluate(self, transformed: nn.Module, transform: str, kept: Sequence[str],
                  params: dict[str, int], float_src: nn.Module | None = None) -> Probe:
        """Quantize ``transformed`` in place (fake-quant wrappers; the kept layers' float weights swapped in
        when GPTQ's are there), measure, and put everything back: no copy of the model per probe (a 70B
        model's copy is 140 GB and minutes of memcpy)."""
        saved: dict[str, torch.Tensor] = {}
        if float_src is not None:  # kept layers are float: undo GPTQ's weights there
            for n in kept:
                saved[n] = _weight(transformed, n).detach().clone()
                _weight(transformed, n).copy_(_weight(float_src, n))
        try:
            self._rtn(transformed, kept)
            metrics = measure(transformed, self.tokenizer, self.ev, self.metric)
        finally:
            unwrap_(transformed)
            for n, w in saved.items():
                _weight(transformed, n).copy_(w)
        p = Probe(transform, list(kept), quality_loss(metrics, self.ref, self.metric), metrics,
                  _bits(self.fmt_bits, params, kept))
        self.probes.append(p)
        return p

    def _rtn(self, m: nn.Module, kept: Sequence[str]) -> None:
        from outlierkit.llm.methods.base import Override
        from outlierkit.llm.methods.rtn import RTN

        skips = [Override(n, skip=True) for n in kept]
        RTN().apply(m, self._ctx(overrides=skips))

    def _ctx(self, **kw: Any) -> Any:
        from outlierkit.llm.methods import QuantContext

        return QuantContext(self.calib, self.weight, self.act, sequential=self.sequential, device=self.device, **kw)

    def meets(self, loss: float) -> bool:
        return self.target.max_loss is None or loss <= self.target.max_loss

    # ------------------------------------------------------------------------------------ planning
    @torch.no_grad()
    def run(self) -> Plan:
        with layerwise(self.model, self.device):  # copies made while planning inherit the setting
            return self._run()

    def _key(self, per: dict[str, dict[str, Any]], t: str) -> tuple[int, int, float, int]:
        """Candidate order: fewest kept layers meeting the target, then the lowest loss, then the cheaper."""
        b: Probe = per[t]["best"]
        return (0 if self.meets(b.loss) else 1, len(b.kept), b.loss, self.transforms.index(t))

    def _release(self, per: dict[str, dict[str, Any]], pending: Sequence[str]) -> None:
        """Drop the transformed copies no later step needs (all but the best so far and the bases of pending
        ``+gptq`` candidates): with a large model every copy is a model's worth of memory."""
        done = [t for t in per if "best" in per[t]]
        best = min(done, key=lambda t: self._key(per, t))
        keep = {best, *(_split(t)[0] for t in pending if _split(t)[1])}
        for t in done:
            if t not in keep:
                per[t]["model"] = per[t]["float_src"] = None

    def _run(self) -> Plan:
        from outlierkit.llm.methods.spike_mp import linear_input_spikes
        from outlierkit.llm.models import resolve

        mm = resolve(self.model, warn=False)
        spikes = linear_input_spikes(self.model, mm, self.calib, profile=self.profile)
        names = [n for n in mm.linears if n in spikes]
        params = {n: int(_weight(self.model, n).numel()) for n in names}
        per_transform: dict[str, dict[str, Any]] = {}
        refused: set[str] = set()
        # each `+gptq` candidate right after its base, so that a base's transformed copy can be released
        # before the next transform makes another (the choice below uses the order of self.transforms)
        order = [c for t in self.transforms if not _split(t)[1] for c in (t, f"{t}+{ROUNDING}")
                 if c in self.transforms]
        for k, t in enumerate(order):
            base, gptq = _split(t)
            if base in refused:
                continue
            float_src: nn.Module | None = None
            if base == PER_GROUP and base not in self._steps:
                self._steps[PER_GROUP] = self._choose_groups(mm, names, per_transform)
            if gptq:  # the transformed float model is the base candidate's
                tm, touched = per_transform[base]["model"], per_transform[base]["touched"]
            else:
                log(f"plan: {t}: transform, per-layer SQNR")
                tm = copy.deepcopy(self.model)
                touched = self._transform(tm, t, names)
                if touched is None:
                    refused.add(t)
                    continue
            rounding: dict[str, str] = {}
            sqnr_rtn: dict[str, float] = {}
            if gptq:
                float_src = tm
                sqnr_rtn = per_transform[base]["sqnr"]
                tm, rounding, sqnr_gptq = self._gptq(tm, names, t, sqnr_rtn)
                sqnr = {n: max(v, sqnr_gptq.get(n, -math.inf)) for n, v in sqnr_rtn.items()}
            else:
                self._rtn(tm, [])  # wrapped in place and unwrapped after: the weights are not touched
                try:
                    sqnr = {n: float(v["sqnr_db"]) for n, v in layer_sqnr(tm, self.calib).items()}
                finally:
                    unwrap_(tm)
            units = self._units(names)
            units.sort(key=lambda u: (min(sqnr.get(n, math.inf) for n in u), -max(spikes[n].ratio for n in u)))
            ranked = [n for u in units for n in u]
            per_transform[t] = {"model": tm, "sqnr": sqnr, "ranked": ranked, "touched": touched,
                                "rounding": rounding, "sqnr_rtn": sqnr_rtn, "float_src": float_src}
            per_transform[t]["best"] = self._search(t, tm, units, params, float_src)
            self._release(per_transform, order[k + 1:])
        candidates = [t for t in self.transforms if t in per_transform]
        if not candidates:
            raise ConfigError("; ".join(self.notes) + " (no other candidate transform was given)")
        best_t = min(candidates, key=lambda t: self._key(per_transform, t))
        best: Probe = per_transform[best_t]["best"]
        # Verify the written recipe end to end (the transform now sees the skip overrides too; GPTQ's Hessians
        # now see the kept float layers, so its weights can differ slightly from the searched ones).
        rtn_layers = [n for n, r in per_transform[best_t]["rounding"].items() if r == "rtn"]
        recipe = self.recipe(best_t, best.kept, rtn_layers)
        log(f"plan: verifying {best_t} with {len(best.kept)} layer(s) kept float")
        m = copy.deepcopy(self.model)
        check = copy.deepcopy(recipe)
        check.calib = CalibConfig(min_tokens=1)  # the search already ran on these batches
        rep = quantize_(m, check, self.calib, baseline=False, sequential=self.sequential, device=self.device)
        final_metrics = measure(m, self.tokenizer, self.ev, self.metric)
        final_loss = quality_loss(final_metrics, self.ref, self.metric)
        del m
        uniform = self._uniform(per_transform[best_t]["model"], best_t, names, per_transform[best_t]["sqnr"],
                                params, per_transform[best_t]["float_src"])
        layers = self._explain(names, spikes, per_transform, best_t, best, params)
        plan = Plan(recipe, best_t, best.kept, final_loss, self.meets(final_loss)
                    and (self.target.bits is None or best.bits <= self.target.bits + 1e-9),
                    layers, self.probes, uniform, notes=list(self.notes), groups=self.group_choice)
        plan.metrics = {"loss": final_loss, "metric": self.metric, "loss_search": best.loss,
                        "kept_float": float(len(best.kept)), "layers": float(len(names)),
                        "avg_weight_bits": best.bits, "output_sqnr_db": rep.metrics["output_sqnr_db"],
                        **{f"float_{k}": v for k, v in self.ref.items() if k != "eval_tokens"},
                        **{f"planned_{k}": v for k, v in final_metrics.items() if k != "eval_tokens"}}
        return plan

    def _choose_groups(self, mm: Any, names: list[str], per: dict[str, dict[str, Any]]) -> list[Step]:
        """Per fold group, the transform of FOLD_CHOICES under which its consumers' worst layer SQNR is highest
        (ties: the cheaper one, in FOLD_CHOICES order); the steps that apply exactly those choices."""
        from outlierkit.llm.methods.base import resolve_groups

        choices = [t for t in FOLD_CHOICES if t in per]
        kinds = {t: tuple(s.params.get("folds", ("norm", "attn_v", "linear")))
                 for t in choices for s in self._steps[t]}
        picked: dict[str, list[str]] = {t: [] for t in choices}
        for g in resolve_groups(self.model, mm, ("norm", "attn_v", "linear"), "plan"):
            consumers = [n for n in g.linears if n in names]
            if not consumers:
                continue
            row: dict[str, Any] = {"group": g.linears[0], "kind": g.spec.kind, "consumers": len(consumers)}
            best, best_db = "rtn", -math.inf
            for t in choices:
                if t != "rtn" and g.spec.kind not in kinds[t]:
                    continue
                db = min(per[t]["sqnr"].get(n, -math.inf) for n in consumers)
                row[f"min_sqnr_db_{t}"] = db
                if db > best_db + 1e-9:
                    best, best_db = t, db
            row["chosen"] = best
            picked.setdefault(best, []).append(g.linears[0])
            self._layer_choice.update(dict.fromkeys(consumers, best))
            self.group_choice.append(row)
        steps = [Step(t, {**self._steps[t][0].params, "groups": picked[t]}) for t in FOLD_CHOICES
                 if t != "rtn" and picked.get(t)]
        counts = ", ".join(f"{t} {len(v)}" for t, v in picked.items())
        log(f"plan: {PER_GROUP}: fold groups by best measured SQNR: {counts}")
        return steps

    def _transform(self, tm: nn.Module, t: str, names: list[str]) -> set[str] | None:
        """Apply transform ``t`` in place; the layers whose weights it changed (None: the family refused it)."""
        steps = self._steps[t]
        if not steps:
            return set()
        before = {n: _weight(tm, n).detach().clone() for n in names}
        ctx = self._ctx()
        records = [r for i, st in enumerate(steps) for r in st.build(f"plan.{t}[{i}]").apply(tm, ctx)]
        if t == "rotate" and any(r.info.get("applied") is False for r in records):
            # shown once, as a report warning (console and report.json)
            self.notes.append(f"plan: candidate 'rotate' dropped: {ctx.notes[-1] if ctx.notes else 'refused'}")
            return None
        return {n for n in names if not torch.equal(before[n], _weight(tm, n))}

    @torch.no_grad()
    def _gptq(self, tm: nn.Module, names: list[str], t: str,
              sqnr_r: dict[str, float]) -> tuple[nn.Module, dict[str, str], dict[str, float]]:
        """GPTQ once on a copy of the transformed model; per layer, GPTQ's weights where its measured layer SQNR
        (calibration inputs, the recipe's formats) beats round-to-nearest, else the float weight (RTN).

        Returns the float model holding the chosen GPTQ weights (they lie on the weight grid, so the probes'
        RTN pass leaves them unchanged), the choice per layer and GPTQ's layer SQNRs.
        """
        from outlierkit.llm.methods.base import float_module, out_weight
        from outlierkit.llm.methods.gptq import GPTQ

        log(f"plan: {t}: GPTQ on every layer, per-layer SQNR against RTN")
        gm = copy.deepcopy(tm)
        GPTQ().apply(gm, self._ctx())
        sqnr_g = {n: float(v["sqnr_db"]) for n, v in layer_sqnr(gm, self.calib).items()}
        out = copy.deepcopy(tm)
        rounding: dict[str, str] = {}
        for n in names:
            if n not in sqnr_g or not sqnr_g[n] > sqnr_r.get(n, -math.inf):
                rounding[n] = "rtn"
                continue
            rounding[n] = "gptq"
            _weight(out, n).copy_(out_weight(float_module(gm, n)))
        del gm
        return out, rounding, sqnr_g

    def _units(self, names: list[str]) -> list[list[str]]:
        """What is kept or quantized together: single layers, or (``fused``) whole fused groups."""
        if not self.fused:
            return [[n] for n in names]
        from outlierkit.llm.export_ct import fused_groups

        groups = fused_groups(names)
        member = {n: key for key, ns in groups.items() for n in ns}
        units: list[list[str]] = []
        seen: set[str] = set()
        for n in names:
            if n in member:
                if member[n] not in seen:
                    seen.add(member[n])
                    units.append(groups[member[n]])
            else:
                units.append([n])
        return units

    def _search(self, t: str, tm: nn.Module, units: list[list[str]], params: dict[str, int],
                float_src: nn.Module | None = None) -> Probe:
        """Per transform: fewest ranked units kept that meet the loss target, or the best set within bits."""
        def flat(us: list[list[str]]) -> list[str]:
            return [n for u in us for n in u]

        if self.target.bits is not None:
            kept: list[str] = []
            for u in units:  # greedy in rank order: take a unit if it still fits in the budget
                if _bits(self.fmt_bits, params, [*kept, *u]) <= self.target.bits + 1e-9:
                    kept.extend(u)
            return self._evaluate(tm, t, kept, params, float_src)
        p0 = self._evaluate(tm, t, [], params, float_src)
        if self.meets(p0.loss):
            return p0
        lo, hi = 0, len(units)  # lo fails, hi meets (everything float = the float model)
        best: Probe | None = None
        while hi - lo > 1:
            mid = (lo + hi) // 2
            p = self._evaluate(tm, t, flat(units[:mid]), params, float_src)
            if self.meets(p.loss):
                hi, best = mid, p
            else:
                lo = mid
        if best is None:
            best = self._evaluate(tm, t, flat(units[:hi]), params, float_src)
        return best

    def _uniform(self, tm: nn.Module, t: str, names: list[str], sqnr: dict[str, float],
                 params: dict[str, int], float_src: nn.Module | None = None) -> list[dict[str, Any]]:
        """Uniform alternatives: nothing kept; whole projection types kept (worst mean SQNR first)."""
        rows = []
        p0 = next((p for p in self.probes if p.transform == t and not p.kept), None) or \
            self._evaluate(tm, t, [], params, float_src)
        rows.append({"uniform": f"{t}, every layer quantized", **p0.row(), "meets": self.meets(p0.loss)})
        if self.target.max_loss is None:
            return rows
        types: dict[str, list[str]] = {}
        for n in names:
            types.setdefault(_proj_type(n), []).append(n)
        order = sorted(types, key=lambda ty: sum(min(sqnr.get(n, 1e9), 1e9) for n in types[ty]) / len(types[ty]))
        kept: list[str] = []
        chosen: list[str] = []
        for ty in order:
            if self.meets(rows[-1]["loss"]):
                break
            kept += types[ty]
            chosen.append(ty)
            p = self._evaluate(tm, t, kept, params, float_src)
            rows.append({"uniform": f"{t}, keep all {' + '.join(chosen)}", **p.row(), "meets": self.meets(p.loss)})
        return rows

    def _explain(self, names: list[str], spikes: dict[str, Any], per: dict[str, dict[str, Any]], t: str,
                 best: Probe, params: dict[str, int]) -> list[dict[str, Any]]:
        kept = set(best.kept)
        ranked = per[t]["ranked"]
        rows = []
        for n in names:
            rank = ranked.index(n) + 1
            row: dict[str, Any] = {"layer": n, "spike_ratio": spikes[n].ratio, "in_absmax": spikes[n].absmax}
            for tt in per:
                row[f"sqnr_db_{tt}"] = per[tt]["sqnr"].get(n)
            fmt = f"{self.weight.label() if self.weight else 'float'} / {self.act.label() if self.act else 'float'}"
            if n in kept:
                row["precision"] = "float (BF16/FP16 when served)"
                row["method"] = "keep"
                row["reason"] = (f"rank {rank}/{len(names)} by layer SQNR under {t} "
                                 f"({per[t]['sqnr'].get(n, float('nan')):.1f} dB, spike ratio {spikes[n].ratio:.0f});"
                                 f" the target needs the top {len(best.kept)}")
            else:
                base, _ = _split(t)
                if base == PER_GROUP:  # the transform chosen for this layer's fold group
                    base = self._layer_choice.get(n, "rtn")
                rounding = per[t]["rounding"].get(n, "rtn")
                row["precision"] = fmt
                touched = n in per[t]["touched"]
                row["method"] = (f"{base}+gptq" if touched and rounding == "gptq" else base if touched else rounding)
                how = (f"{'rotated' if base == 'rotate' else 'scaled'} by {base}" if n in per[t]["touched"] else
                       "no fold reaches it" if base != "rtn" else "no transform")
                db = per[t]["sqnr"].get(n, float("nan"))
                if per[t]["rounding"]:
                    g, r = per[t]["sqnr"].get(n, float("nan")), per[t]["sqnr_rtn"].get(n, float("nan"))
                    how += (f"; GPTQ {g:.1f} dB beats RTN {r:.1f} dB" if rounding == "gptq"
                            else f"; RTN {r:.1f} dB, GPTQ measured no better")
                row["reason"] = f"quantized ({how}); rank {rank}/{len(names)}, {db:.1f} dB"
            row["params"] = params[n]
            rows.append(row)
        return rows


def plan_report(plan: Plan, target: PlanTarget, config: dict[str, Any]) -> Any:
    """A :class:`~outlierkit.report.Report` with the plan, per-layer reasons and every evaluation."""
    from outlierkit.report import Report

    rep = Report(kind="llm.plan", config={**config, "target": target.label(), "recipe": plan.recipe.to_dict()})
    rep.metrics.update(plan.metrics)
    rep.metrics["meets_target"] = float(plan.meets_target)
    rep.add_table("layers", plan.layers)
    rep.add_table("uniform", plan.uniform)
    rep.add_table("probes", [p.row() for p in plan.probes])
    if plan.groups:
        rep.add_table("fold_groups", plan.groups)
    for note in plan.notes:
        rep.warn(note)
    if not plan.meets_target:
        rep.warn(f"the planned recipe misses the target ({target.label()}): loss {plan.loss:.4g}")
    return rep
