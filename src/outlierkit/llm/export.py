"""Save a quantized model and load it back: compressed-tensors (what transformers and vLLM load) where it can
express the model, outlierkit's own format (float weights + quantization state + INT8 tensors) for the rest."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from outlierkit._utils import atomic_write_text
from outlierkit.errors import ConfigError, ModelLoadError
from outlierkit.llm.formats import parse_format
from outlierkit.llm.int8 import Int8Linear
from outlierkit.llm.layers import quant_layers, set_module, unwrap_, unwrapped_fqn, wrap_

STATE_FILE = "outlierkit_quant.json"
INT8_FILE = "outlierkit_int8.safetensors"
Target = Literal["transformers", "vllm", "outlierkit"]
TARGETS: tuple[str, ...] = ("transformers", "vllm", "outlierkit")


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    return target


def quant_state(model: nn.Module) -> dict[str, Any]:
    """Per wrapped layer: formats and static activation ranges; per ``Int8Linear``: threshold (JSON-ready)."""
    from outlierkit.llm.formats import format_to_dict

    layers: dict[str, Any] = {}
    for name, q in quant_layers(model):
        rng: list[list[float]] = q.act_range.tolist()
        layers[unwrapped_fqn(name)] = {
            "weight": format_to_dict(q.weight_format), "act": format_to_dict(q.act_format),
            "out": format_to_dict(q.out_format),
            "act_range": [[None if v != v else v for v in r] for r in rng]}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            layers[name] = {"int8": {"threshold": m.threshold, "real": m.real, "conv1d": m.conv1d, "grid": m.grid}}
    return {"format": "outlierkit.fakequant/2", "layers": layers}


def hf_save(model: nn.Module, out: Path) -> None:
    """transformers' own ``save_pretrained`` (bypassing the guard that :func:`guard_save_pretrained` installs)."""
    type(model).save_pretrained(model, out, safe_serialization=True)  # type: ignore[attr-defined]


def _int8_standin(m: Int8Linear) -> nn.Module:
    """A float module with the dequantized INT8 weight, in the layout of the module it replaced."""
    w = m.dequantized_weight()  # (out, in)
    if m.conv1d:
        from transformers.pytorch_utils import Conv1D

        c = Conv1D(m.out_features, m.in_features)
        with torch.no_grad():
            c.weight.copy_(w.t())
            c.bias.copy_(m.bias if m.bias is not None else torch.zeros(m.out_features))
        return c
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias)
    return lin


def _refuse_online_rotation(model: nn.Module) -> None:
    """No saved format carries rotate's online Hadamard: saving without it would be another model."""
    online = [n for n, q in quant_layers(model) if getattr(q, "rotation", None) is not None]
    if online:
        raise ConfigError(f"{online[0]} has an online rotation (rotate with online_down: true) that a saved "
                          "checkpoint cannot carry; quantize with online_down: false to save the model")


def save_outlierkit(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, recipe_yaml: str | None = None) -> None:
    """outlierkit's format: ``model.safetensors`` + ``config.json`` (the float weights after every equivalence
    transform; INT8 layers as their dequantized weights, so plain transformers loads a faithful float model),
    ``outlierkit_quant.json`` (formats, static ranges, INT8 layers) and ``outlierkit_int8.safetensors`` (the
    INT8 codes and scales, read back exactly)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    _refuse_online_rotation(model)
    state = quant_state(model)
    wrappers = dict(quant_layers(model))
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    unwrap_(model)
    try:
        for name, m in int8.items():
            set_module(model, name, _int8_standin(m))
        hf_save(model, out)
    finally:
        for name, q in wrappers.items():
            set_module(model, name, q)
        for name, m in int8.items():
            set_module(model, name, m)
    if int8:
        tensors: dict[str, torch.Tensor] = {}
        for name, m in int8.items():
            tensors[f"{name}.weight_int8"] = m.weight_int8.contiguous()
            tensors[f"{name}.weight_scale"] = m.weight_scale.contiguous()
            if m.bias is not None:
                tensors[f"{name}.bias"] = m.bias.contiguous()
        save_file(tensors, str(out / INT8_FILE), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=1) + "\n")
    if recipe_yaml is not None:
        atomic_write_text(out / "recipe.yaml", recipe_yaml)


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, recipe_yaml: str | None = None,
                   target: str = "transformers") -> str:
    """Save ``model`` (after ``quantize_``) for ``target``; return the format written.

    ``transformers`` (default): compressed-tensors when it can express every quantized layer, else
    outlierkit's format (LLM.int8() outlier split, GPT-2 Conv1D, fused experts, q/k/v output quantization,
    plain-cast E5M2, activation-only quantization). ``vllm``: compressed-tensors, refused (``ConfigError``
    naming the layers and vLLM's rule) when vLLM cannot serve it. ``outlierkit``: always outlierkit's format.
    """
    from outlierkit.llm.export_ct import export_compressed_tensors, vllm_problems

    check_target(target)
    _refuse_online_rotation(model)  # before any format is tried, so nothing is written
    if target != "outlierkit":
        try:
            if target == "vllm":
                problems = vllm_problems(model)
                if problems:
                    raise ConfigError("vLLM cannot serve this model: " + "; ".join(problems[:6])
                                      + (" ..." if len(problems) > 6 else ""))
            export_compressed_tensors(model, tokenizer, out_dir, recipe_yaml=recipe_yaml)
            if target == "transformers":
                _warn_grid_mismatch(model)
            return "compressed-tensors"
        except ConfigError:
            if target == "vllm":
                raise
    save_outlierkit(model, tokenizer, out_dir, recipe_yaml=recipe_yaml)
    return "outlierkit"


def _warn_grid_mismatch(model: nn.Module) -> None:
    """Dynamic INT activations simulated on vLLM's grid (absmax / 127, the default of a recipe quantized without
    a target) are recomputed by transformers on compressed-tensors' grid (absmax / 127.5): the reloaded model's
    outputs then differ slightly from the ones measured. Say so instead of letting the reload look wrong."""
    from outlierkit.llm.formats import IntFormat
    from outlierkit.llm.layers import quant_layers

    names = [n for n, q in quant_layers(model) if isinstance(q.act_format, IntFormat) and q.act_format.dynamic
             and q.act_format.symmetric and q.act_format.grid == "vllm"]
    if names:
        import warnings

        warnings.warn(f"{len(names)} layer(s) (first: {names[0]}) quantize activations dynamically on vLLM's grid "
                "(absmax / 127) but transformers recomputes them on compressed-tensors' grid (absmax / 127.5): the "
                "reloaded model's outputs will differ slightly from the ones measured; quantize with "
                "target='transformers' (quantize_(..., target='transformers'), as `outlierkit quantize` does) to "
                "measure exactly what transformers runs", stacklevel=3)


def apply_quant_state(model: nn.Module, state: dict[str, Any], directory: Path | None = None) -> nn.Module:
    """Re-wrap ``model``'s layers with the saved formats and static ranges; rebuild the INT8 layers."""
    if state.get("format") not in ("outlierkit.fakequant/1", "outlierkit.fakequant/2"):
        raise ModelLoadError(f"unknown quantization state format {state.get('format')!r}")
    int8_tensors: dict[str, torch.Tensor] | None = None
    for fqn, spec in state["layers"].items():
        try:
            mod = model.get_submodule(fqn)
        except AttributeError:
            raise ModelLoadError(f"the quantization state names {fqn}, which this model does not have; the "
                                 "quantized directory was made from another model") from None
        if "int8" in spec:
            if int8_tensors is None:
                int8_tensors = _load_int8(directory)
            i8 = spec["int8"]
            q8 = Int8Linear.from_float(mod, threshold=i8["threshold"], real=i8["real"], name=fqn,
                                       grid=i8.get("grid", "vllm"))
            w, s = int8_tensors.get(f"{fqn}.weight_int8"), int8_tensors.get(f"{fqn}.weight_scale")
            if w is None or s is None or w.shape != q8.weight_int8.shape:
                raise ModelLoadError(f"{INT8_FILE} has no INT8 weight of shape {tuple(q8.weight_int8.shape)} for {fqn}")
            q8.weight_int8.copy_(w)
            q8.weight_scale.copy_(s)
            if q8.bias is not None and f"{fqn}.bias" in int8_tensors:
                q8.bias.copy_(int8_tensors[f"{fqn}.bias"])
            set_module(model, fqn, q8)
            continue
        q = wrap_(model, fqn, weight=parse_format(spec["weight"]), act=parse_format(spec["act"]),
                  out=parse_format(spec["out"]))
        rng = torch.tensor([[float("nan") if v is None else v for v in r] for r in spec["act_range"]])
        q.act_range.copy_(rng)  # static ranges
    guard_save_pretrained(model)
    return model


def _load_int8(directory: Path | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if directory is None or not (directory / INT8_FILE).is_file():
        raise ModelLoadError(f"the quantization state has INT8 layers but {INT8_FILE} is missing")
    try:
        return load_file(str(directory / INT8_FILE))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"{directory / INT8_FILE} is unreadable or truncated ({e})") from None


def is_ct_dir(directory: str | Path) -> bool:
    try:
        cfg = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg.get("quantization_config"), dict) and \
        cfg["quantization_config"].get("quant_method") == "compressed-tensors"


def load_quantized(directory: str | Path, **load_kwargs: Any) -> Any:
    """Load a ``quantize`` output directory: a compressed-tensors checkpoint through transformers (the
    deployed model), or outlierkit's format through ``load_model`` plus its quantization state."""
    from outlierkit.llm.models import load_model

    d = Path(directory)
    _check_safetensors(d)
    if is_ct_dir(d):
        return load_model(str(d), **load_kwargs)
    f = d / STATE_FILE
    if not f.is_file():
        raise ModelLoadError(f"{d} has neither {STATE_FILE} nor a compressed-tensors quantization_config; pass a "
                             "directory written by `outlierkit quantize`")
    try:
        state = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{f} is corrupt ({e})") from None
    lm = load_model(str(d), **load_kwargs)
    apply_quant_state(lm.model, state, d)
    return lm


def _check_safetensors(d: Path) -> None:
    """A truncated or corrupt safetensors file is a one-line error, not a traceback from deep in transformers."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(d.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f"{f} is unreadable or truncated ({str(e).splitlines()[0][:120]}); quantize again") \
                from None


def _guarded_save_pretrained(self: nn.Module, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
    """``save_pretrained`` on a model holding outlierkit layers: writes what ``outlierkit quantize`` writes
    (compressed-tensors, or outlierkit's format), never ``*.inner.weight`` keys that reload as random weights."""
    if args or set(kwargs) - {"safe_serialization"}:
        raise ConfigError("this model holds outlierkit quantization layers; save it with "
                          "outlierkit.llm.export.save_quantized(model, tokenizer, dir) (extra save_pretrained "
                          f"options {sorted(kwargs)} are not supported)")
    if not any(True for _ in quant_layers(self)) and not any(isinstance(m, Int8Linear) for m in self.modules()):
        hf_save(self, Path(save_directory))
        return
    save_quantized(self, None, save_directory)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write a loadable quantized checkpoint (a bound method, so that
    ``copy.deepcopy`` binds it to the copy)."""
    if hasattr(type(model), "save_pretrained"):
        object.__setattr__(model, "save_pretrained", types.MethodType(_guarded_save_pretrained, model))
