"""Recipes (ordered method steps + per-layer overrides, YAML or Python) and ``quantize_(model, recipe, calib)``."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from outlierkit.config import from_dict, load_mapping, to_dict
from outlierkit.errors import ConfigError, DataError
from outlierkit.llm.corpus import Batch, TokenCorpus
from outlierkit.llm.formats import Format, format_to_dict, parse_format
from outlierkit.llm.layers import quant_layers, set_recording_, unwrap_, unwrapped_fqn
from outlierkit.llm.methods import METHODS, LayerRecord, QuantContext, QuantMethod
from outlierkit.llm.methods.base import Override
from outlierkit.report import Report


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data of a recipe.

    Args:
        samples: calibration samples (default 32). seq_len: tokens per sample (default 128).
        batch_size: default 8. seed: sample order (default 0).
        min_tokens: fewer non-pad calibration tokens than this is an error (default 256).
    """

    samples: int = 32
    seq_len: int = 128
    batch_size: int = 8
    seed: int = 0
    min_tokens: int = 256


@dataclass
class Step:
    method: str
    params: dict[str, Any] = field(default_factory=dict)

    def build(self, where: str) -> QuantMethod:
        cls = METHODS.get(self.method)
        return from_dict(cls, self.params, where=where)  # type: ignore[arg-type, no-any-return]


@dataclass
class Recipe:
    """An ordered list of method steps, default formats and per-layer overrides.

    Args:
        name: shown in reports and tables.
        weight: default weight format (default ``int8-channel``); ``None`` keeps weights float.
        act: default input-activation format (default ``int8-token``).
        qkv_out: optional format of q/k/v outputs (the attention matmul inputs; default None).
        steps: ordered steps, e.g. ``[Step("smoothquant", {"alpha": 0.5}), Step("rtn")]``; equivalence
            transforms must come before ``rtn``.
        overrides: per-layer: FQN or ``re:`` regex -> ``skip`` or ``{weight: ..., act: ...}``.
        calib: calibration data (:class:`CalibConfig`).
        target: who loads the result, ``transformers`` / ``vllm`` / ``outlierkit`` (default None: the
            ``quantize --target`` default, transformers); ``--target`` on the command line wins.

    YAML::

        name: w8a8-smoothquant
        weight: int8-channel
        act: int8-tensor
        steps:
          - smoothquant: {alpha: 0.5}
          - rtn: {}
        overrides:
          "re:.*\\.0\\.mlp\\.down_proj": skip
          "re:.*o_proj": {act: fp8}
    """

    name: str = "recipe"
    weight: Format | None = field(default_factory=lambda: parse_format("int8-channel"))
    act: Format | None = field(default_factory=lambda: parse_format("int8-token"))
    qkv_out: Format | None = None
    steps: list[Step] = field(default_factory=lambda: [Step("rtn")])
    overrides: list[Override] = field(default_factory=list)
    calib: CalibConfig = field(default_factory=CalibConfig)
    target: str | None = None

    def __post_init__(self) -> None:
        names = [s.method for s in self.steps]
        for i, s in enumerate(self.steps):
            cls = METHODS.get(s.method)
            if cls.transform and "rtn" in names[:i]:
                raise ConfigError(f"recipe step {i} ({s.method}) is a transform and must come before rtn")
        self.methods()  # validate parameters now, not halfway through a run

    def methods(self) -> list[QuantMethod]:
        return [s.build(f"recipe.steps[{i}].{s.method}") for i, s in enumerate(self.steps)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "recipe") -> Recipe:
        valid = {"name", "weight", "act", "qkv_out", "steps", "overrides", "calib", "target"}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: {sorted(valid)}")
        kw: dict[str, Any] = {}
        if "name" in data:
            kw["name"] = str(data["name"])
        for key in ("weight", "act", "qkv_out"):
            if key in data:
                kw[key] = parse_format(data[key], f"{where}.{key}")
        steps = []
        for i, raw in enumerate(data.get("steps") or []):
            if isinstance(raw, str):
                raw = {raw: {}}
            if not isinstance(raw, dict) or len(raw) != 1:
                raise ConfigError(f"{where}.steps[{i}] must be a method name or {{name: {{params}}}}, got {raw!r}")
            (name, params), = raw.items()
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise ConfigError(f"{where}.steps[{i}].{name} parameters must be a mapping")
            METHODS.get(str(name))
            steps.append(Step(str(name), dict(params)))
        if "steps" in data:
            if not steps:
                raise ConfigError(f"{where}.steps is empty; add at least `- rtn: {{}}`")
            kw["steps"] = steps
        ovs = []
        for pattern, spec in (data.get("overrides") or {}).items():
            ovs.append(_override(str(pattern), spec, f"{where}.overrides[{pattern!r}]"))
        kw["overrides"] = ovs
        if data.get("target") is not None:
            from outlierkit.llm.export import check_target

            kw["target"] = check_target(str(data["target"]))
        if "calib" in data:
            kw["calib"] = from_dict(CalibConfig, data["calib"] or {}, where=f"{where}.calib")
        return cls(**kw)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        data = load_mapping(path)
        r = cls.from_dict(data, where=str(path))
        if "name" not in data:
            r.name = Path(path).stem
        return r

    def to_dict(self) -> dict[str, Any]:
        ovs: dict[str, Any] = {}
        for o in self.overrides:
            if o.skip:
                ovs[o.pattern] = "skip"
            else:
                d: dict[str, Any] = {}
                if o.set_weight:
                    d["weight"] = format_to_dict(o.weight)
                if o.set_act:
                    d["act"] = format_to_dict(o.act)
                ovs[o.pattern] = d
        return {"name": self.name, "weight": format_to_dict(self.weight), "act": format_to_dict(self.act),
                "qkv_out": format_to_dict(self.qkv_out),
                "steps": [{s.method: dict(s.params)} for s in self.steps], "overrides": ovs,
                "calib": to_dict(self.calib), **({"target": self.target} if self.target else {})}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _override(pattern: str, spec: Any, where: str) -> Override:
    if pattern.startswith("re:"):
        import re

        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise ConfigError(f"{where}: bad regex ({e})") from None
    if spec in ("skip", None, False):
        return Override(pattern, skip=True)
    if isinstance(spec, str):  # a format for both weight and activation? only for fp8 / none
        fmt = parse_format(spec, where)
        return Override(pattern, weight=fmt, act=fmt, set_weight=True, set_act=True)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be 'skip', a format string or {{weight: ..., act: ...}}")
    unknown = sorted(set(spec) - {"weight", "act", "skip"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys: ['act', 'skip', 'weight']")
    if spec.get("skip"):
        return Override(pattern, skip=True)
    return Override(pattern, weight=parse_format(spec.get("weight"), f"{where}.weight"),
                    act=parse_format(spec.get("act"), f"{where}.act"),
                    set_weight="weight" in spec, set_act="act" in spec)


def load_recipe(spec: str | Path | dict[str, Any] | Recipe) -> Recipe:
    """A recipe from a YAML/JSON path, a mapping, or a bundled name (``recipes/<name>.yaml``)."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    p = Path(spec)
    if p.is_file():
        return Recipe.load(p)
    if str(spec) in PRESETS:
        r = Recipe.from_dict(PRESETS[str(spec)])
        r.name = str(spec)
        return r
    raise ConfigError(f"recipe {str(spec)!r} is neither a file nor a preset; presets: {sorted(PRESETS)}")


# Built-in presets (the same as the files in recipes/).
PRESETS: dict[str, dict[str, Any]] = {
    "fp32": {"weight": None, "act": None, "steps": [{"rtn": {}}]},
    "w8a8-rtn": {"weight": "int8-channel", "act": "int8-tensor", "steps": [{"rtn": {}}]},
    "w8a8-smoothquant": {"weight": "int8-channel", "act": "int8-tensor",
                         "steps": [{"smoothquant": {"folds": ["norm", "attn_v"]}}, {"rtn": {}}]},
    "w8a8-osplus": {"weight": "int8-channel", "act": "int8-tensor", "steps": [{"os_plus": {}}, {"rtn": {}}]},
}


# ---------------------------------------------------------------------------------------------- quantize_

CalibData = Any  # str | Sequence[str] | datasets.Dataset | TokenCorpus | Sequence[Batch] | Batch | dict


def calib_batches(calib: CalibData, recipe: Recipe, *, tokenizer: Any = None, model: nn.Module | None = None,
                  text_field: str = "text") -> list[Batch]:
    """Calibration batches from what a user has at hand (as llm-compressor's ``oneshot`` takes a dataset).

    Accepted: a :class:`TokenCorpus`; prepared :class:`Batch` objects (one or a list); a tokenized mapping
    (``{"input_ids": (B, T), "attention_mask": (B, T)}``, e.g. a tokenizer's output); a string, a list of
    strings or a ``datasets.Dataset`` with a text column ``text_field`` (or an ``input_ids`` column). Text is
    tokenized with ``tokenizer`` (default: the tokenizer saved next to the model, ``config._name_or_path``),
    one sample per string truncated to ``recipe.calib.seq_len`` tokens, at most ``recipe.calib.samples``
    samples in ``recipe.calib.seed`` order (the CLI's protocol).
    """
    cfg = recipe.calib
    if isinstance(calib, (list, tuple)) and not calib:
        raise DataError("calibration data is empty; pass text, a dataset, a TokenCorpus or batches")
    if isinstance(calib, TokenCorpus):
        batches = calib.batches(cfg.batch_size)
    elif isinstance(calib, Batch):
        batches = [calib]
    elif isinstance(calib, dict) or type(calib).__name__ == "BatchEncoding":
        batches = [_mapping_batch(calib)]
    elif isinstance(calib, str) or _is_text_list(calib):
        texts = [calib] if isinstance(calib, str) else list(calib)
        batches = _text_corpus(texts, cfg, tokenizer, model).batches(cfg.batch_size)
    elif hasattr(calib, "column_names") and hasattr(calib, "__getitem__"):
        batches = _dataset_batches(calib, cfg, tokenizer, model, text_field)
    elif isinstance(calib, (list, tuple)) and calib and all(isinstance(b, Batch) for b in calib):
        batches = list(calib)
    else:
        raise DataError(f"calibration data of type {type(calib).__name__} is not understood; pass a string, a "
                        "list of strings, a datasets.Dataset with a text column, a TokenCorpus, Batch objects or "
                        "a tokenized {'input_ids', 'attention_mask'} mapping")
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    if tokens < cfg.min_tokens:
        raise DataError(f"calibration data has {tokens} tokens, fewer than calib.min_tokens="
                        f"{cfg.min_tokens}; pass more text or lower calib.min_tokens")
    return batches


def _is_text_list(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, str) for t in x)


def _mapping_batch(enc: Any) -> Batch:
    if "input_ids" not in enc:
        raise DataError(f"calibration mapping has no 'input_ids' (keys: {sorted(enc)})")
    ids = torch.as_tensor(enc["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    mask = torch.as_tensor(enc["attention_mask"]) if "attention_mask" in enc else torch.ones_like(ids)
    mask = mask.reshape(ids.shape).long()
    return Batch(ids.long(), mask, list(range(ids.shape[0])))


def _tokenizer_for(tokenizer: Any, model: nn.Module | None) -> Any:
    if tokenizer is not None:
        return tokenizer
    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if path and Path(path).is_dir():
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise DataError("calibration text needs a tokenizer: pass quantize_(..., tokenizer=tok) (none was found "
                    f"next to the model{' at ' + path if path else ''})")


def _text_corpus(texts: list[str], cfg: CalibConfig, tokenizer: Any, model: nn.Module | None) -> TokenCorpus:
    from outlierkit.llm.corpus import Document, build_corpus

    docs = [Document(t, f"calib[{i}]") for i, t in enumerate(texts) if t.strip()]
    if not docs:
        raise DataError("calibration text is empty")
    max_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return build_corpus(_tokenizer_for(tokenizer, model), docs, samples=cfg.samples,
                        seq_len=min(cfg.seq_len, max_len) if isinstance(max_len, int) else cfg.seq_len,
                        seed=cfg.seed, min_tokens=1)


def _dataset_batches(ds: Any, cfg: CalibConfig, tokenizer: Any, model: nn.Module | None,
                     text_field: str) -> list[Batch]:
    cols = list(ds.column_names)
    if isinstance(ds.column_names, dict):  # a DatasetDict: column names per split
        raise DataError(f"calibration data is a DatasetDict with splits {sorted(cols)}; pass one split, "
                        f"e.g. ds[{sorted(cols)[0]!r}]")
    if text_field in cols:
        texts = [t for t in ds[text_field] if isinstance(t, str)]
        return _text_corpus(texts, cfg, tokenizer, model).batches(cfg.batch_size)
    if "input_ids" in cols:  # already tokenized: one sample per row, truncated to seq_len
        rows = [list(map(int, r))[: cfg.seq_len] for r in ds["input_ids"]][: cfg.samples]
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return TokenCorpus([r for r in rows if r], [f"calib[{i}]" for i in range(len(rows))], cfg.seq_len,
                  int(pad or 0)).batches(cfg.batch_size)
    raise DataError(f"calibration dataset has no column {text_field!r} or 'input_ids' (columns: {cols})")


@torch.no_grad()
def model_outputs(model: nn.Module, batches: list[Batch]) -> list[torch.Tensor]:
    """Main output (logits or last hidden state) per batch, on CPU (layer by layer inside
    :func:`~outlierkit.llm.sequential.layerwise`)."""
    from outlierkit._utils.hooks import first_tensor
    from outlierkit.llm.sequential import forward_each

    outs: list[torch.Tensor] = []

    def keep(j: int, out: Any) -> None:
        y = first_tensor(out)
        assert y is not None
        outs.append(y.float().cpu())

    forward_each(model, batches, keep)
    return outs


def _sqnr_sums(r: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, bool, bool]:
    """(signal, noise, ref finite, test finite) over the non-pad tokens of one batch.

    Per-token norms in float32 (``vector_norm`` reduces without a squared copy; a 128k-vocabulary batch of
    logits is large), summed in float64: one temporary (the difference) instead of several float64 copies.
    """
    m = mask.to(r.device).bool()
    sig_tok = torch.linalg.vector_norm(r, dim=-1)[m].double().pow(2)
    noise_tok = torch.linalg.vector_norm(r - t.to(r.device), dim=-1)[m].double().pow(2)
    ref_ok = bool(torch.isfinite(sig_tok).all())
    test_ok = bool(torch.isfinite(noise_tok).all()) or not ref_ok
    return float(sig_tok.sum()), float(noise_tok.sum()), ref_ok, test_ok


def _db(sig: float, noise: float) -> float:
    import math

    if not (math.isfinite(sig) and math.isfinite(noise)):
        return math.nan
    return math.inf if noise == 0 else 10 * math.log10(sig / noise)


def output_sqnr(ref: list[torch.Tensor], test: list[torch.Tensor], batches: list[Batch]) -> float:
    """Model-output SQNR in dB over the non-pad tokens (NaN when an output is not finite)."""
    sig = noise = 0.0
    for r, t, b in zip(ref, test, batches, strict=True):
        s_, n_, _, _ = _sqnr_sums(r, t, b.attention_mask)
        sig, noise = sig + s_, noise + n_
    return _db(sig, noise)


@torch.no_grad()
def model_output_sqnr(model: nn.Module, ref: list[torch.Tensor], batches: list[Batch]) -> tuple[float, bool]:
    """Output SQNR of ``model`` against stored reference outputs, batch by batch (the model's outputs are never
    all held at once); also whether the model produced NaN/Inf where the reference is finite."""
    from outlierkit._utils.hooks import first_tensor
    from outlierkit.llm.sequential import forward_each

    if len(ref) != len(batches):
        raise ValueError(f"{len(ref)} reference outputs for {len(batches)} batches")
    acc = {"sig": 0.0, "noise": 0.0, "new_nonfinite": False}

    def add(j: int, out: Any) -> None:
        y = first_tensor(out)
        assert y is not None
        s_, n_, ref_ok, test_ok = _sqnr_sums(ref[j], y.float().cpu(), batches[j].attention_mask)
        acc["sig"], acc["noise"] = acc["sig"] + s_, acc["noise"] + n_
        acc["new_nonfinite"] = bool(acc["new_nonfinite"]) or (ref_ok and not test_ok)

    forward_each(model, batches, add)
    return _db(acc["sig"], acc["noise"]), bool(acc["new_nonfinite"])


@torch.no_grad()
def layer_sqnr(model: nn.Module, batches: list[Batch]) -> dict[str, dict[str, float]]:
    """Per wrapped layer: SQNR of its output against the float output of the same input, input absmax."""
    set_recording_(model, True)
    try:
        model_outputs(model, batches)
        return {unwrapped_fqn(n): {"sqnr_db": q.sqnr_db(), "in_absmax": q.in_absmax}
                for n, q in quant_layers(model) if not q.is_float}
    finally:
        set_recording_(model, False)


def for_target(recipe: Recipe, target: str) -> Recipe:
    """The recipe with its symmetric INT formats on the grid the target computes with: ``transformers``
    -> compressed-tensors' (absmax / 127.5), so that ``from_pretrained`` of the export reproduces the
    quantized model bit for bit; ``vllm`` / ``outlierkit`` -> vLLM's kernel rule (absmax / 127)."""
    import dataclasses

    from outlierkit.llm.export import check_target
    from outlierkit.llm.formats import Grid, IntFormat

    grid: Grid = "ct" if check_target(target) == "transformers" else "vllm"

    def g(f: Format | None) -> Format | None:
        return dataclasses.replace(f, grid=grid) if isinstance(f, IntFormat) else f

    out = copy.deepcopy(recipe)
    out.weight, out.act, out.qkv_out = g(recipe.weight), g(recipe.act), g(recipe.qkv_out)
    out.overrides = [dataclasses.replace(o, weight=g(o.weight), act=g(o.act)) for o in recipe.overrides]
    if target == "vllm":  # spike layers bring their fused siblings (q/k/v, gate/up share one scheme in vLLM)
        for s in out.steps:
            if s.method == "spike_mp":
                s.params = {**s.params, "fused": True}
    return out


def quantize_(model: nn.Module, recipe: Recipe | str | dict[str, Any], calib: CalibData, *,
              eval_batches: list[Batch] | None = None, baseline: bool = True, tokenizer: Any = None,
              sequential: bool = False, device: str | None = None, target: str | None = None) -> Report:
    """Apply ``recipe`` to ``model`` in place (transforms, then fake-quantized wrappers); return a Report.

    Args:
        calib: text (a string, a list of strings, a ``datasets.Dataset``), a TokenCorpus or prepared
            batches (see :func:`calib_batches`).
        tokenizer: tokenizes text calibration data (default: the one saved next to the model).
        sequential: run every pass (calibration, transforms, GPTQ, range observers and the report's SQNR
            passes) one decoder layer at a time (``outlierkit.llm.sequential``): the model may stay on the CPU
            while each layer and its activations move to ``device`` in turn (models larger than the device).
        device: where sequential passes compute (default: the model's device).
        eval_batches: batches for the SQNR measurements (default: the calibration batches).
        baseline: also measure plain RTN with the same formats before the transforms ("before").
        target: ``transformers``, ``vllm`` or ``outlierkit``: put the formats on that target's grid
            (:func:`for_target`); default None keeps the recipe's formats as written.

    Afterwards ``model.save_pretrained(dir)`` writes what ``outlierkit quantize`` writes (never wrapper keys).
    """
    from outlierkit.llm.sequential import layerwise

    recipe = load_recipe(recipe)
    if target is not None:
        recipe = for_target(recipe, target)
    if sequential and device is None:
        device = str(next(model.parameters()).device)
    with layerwise(model, device if sequential else None):
        return _quantize(model, recipe, calib, eval_batches=eval_batches, baseline=baseline, tokenizer=tokenizer,
                         sequential=sequential, device=device)


def _quantize(model: nn.Module, recipe: Recipe, calib: CalibData, *, eval_batches: list[Batch] | None,
              baseline: bool, tokenizer: Any, sequential: bool, device: str | None) -> Report:
    methods = recipe.methods()
    batches = calib_batches(calib, recipe, tokenizer=tokenizer, model=model)
    ev = eval_batches or batches
    ctx = QuantContext(batches, recipe.weight, recipe.act, recipe.qkv_out, list(recipe.overrides),
                       sequential=sequential, device=device)
    ctx.model_map(model)
    report = Report(kind="llm.quantize", config={"recipe": recipe.to_dict()})
    float_out = model_outputs(model, ev)
    before: dict[str, dict[str, float]] = {}
    if baseline and any(m.transform for m in methods):
        from outlierkit.llm.methods.rtn import RTN

        RTN().apply(model, ctx)
        before = layer_sqnr(model, ev)
        report.metrics["output_sqnr_db_rtn"] = model_output_sqnr(model, float_out, ev)[0]
        unwrap_(model)
    records: list[LayerRecord] = []
    timings: dict[str, float] = {}
    from outlierkit._utils import log

    for i, (step, method) in enumerate(zip(recipe.steps, methods, strict=True), 1):
        log(f"quantize: step {i}/{len(methods)} {step.method}")
        t0 = time.perf_counter()
        records += method.apply(model, ctx)
        timings[f"time_{step.method}_s"] = time.perf_counter() - t0
    after = layer_sqnr(model, ev)
    report.metrics["output_sqnr_db"], new_nonfinite = model_output_sqnr(model, float_out, ev)
    report.metrics.update(timings)
    report.metrics["calib_tokens"] = sum(int(b.attention_mask.sum()) for b in batches)
    report.metrics["layers_quantized"] = len(after)
    finite = [v["sqnr_db"] for v in after.values() if v["sqnr_db"] != float("inf")]
    if finite:
        report.metrics["layer_sqnr_db_min"] = min(finite)
        report.metrics["layer_sqnr_db_mean"] = sum(finite) / len(finite)
    rows = []
    for name, a in after.items():
        row: dict[str, Any] = {"layer": name, "sqnr_db": a["sqnr_db"], "in_absmax": a["in_absmax"]}
        if name in before:
            row["sqnr_db_rtn"] = before[name]["sqnr_db"]
            row["in_absmax_rtn"] = before[name]["in_absmax"]
        rows.append(row)
    report.add_table("layer_sqnr", rows)
    report.add_table("transforms", [r.row() for r in records if r.method != "rtn"])
    report.add_table("formats", [r.row() for r in records if r.method == "rtn"])
    for note in ctx.notes:
        report.warn(note)
    if new_nonfinite:
        report.warn("the quantized model produces NaN/Inf where the float model does not (a NaN or Inf in a "
                    "weight or activation granule makes the whole granule non-finite); output_sqnr_db is not usable")
    from outlierkit.llm.export import guard_save_pretrained

    guard_save_pretrained(model)
    return report


def copy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
