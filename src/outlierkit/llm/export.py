"""Save a quantized model (transformed float weights as safetensors + config, reloadable with transformers)
with the recipe and the quantization state, and load it back with the same fake-quantized outputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierkit._utils import atomic_write_text
from outlierkit.errors import ConfigError, ModelLoadError
from outlierkit.llm.formats import parse_format
from outlierkit.llm.layers import quant_layers, unwrap_, unwrapped_fqn, wrap_

STATE_FILE = "outlierkit_quant.json"


def quant_state(model: nn.Module) -> dict[str, Any]:
    """Per wrapped layer: formats and static activation ranges (JSON-ready)."""
    from outlierkit.llm.formats import format_to_dict

    layers = {}
    for name, q in quant_layers(model):
        rng: list[list[float]] = q.act_range.tolist()
        layers[unwrapped_fqn(name)] = {
            "weight": format_to_dict(q.weight_format), "act": format_to_dict(q.act_format),
            "out": format_to_dict(q.out_format),
            "act_range": [[None if v != v else v for v in r] for r in rng]}
    return {"format": "outlierkit.fakequant/1", "layers": layers}


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: str | Path, *, recipe_yaml: str | None = None) -> None:
    """Write ``model.safetensors`` + ``config.json`` (the float weights after every equivalence transform,
    so plain transformers reproduces the float model), the tokenizer, ``recipe.yaml`` and the quantization
    state (formats, static ranges) that :func:`load_quantized` re-applies."""
    out = Path(out_dir)
    online = [n for n, q in quant_layers(model) if getattr(q, "rotation", None) is not None]  # rotate's online H
    if online:
        raise ConfigError(f"{online[0]} has an online rotation (rotate with online_down: true) that a saved "
                          "checkpoint cannot carry; quantize with online_down: false to save the model")
    state = quant_state(model)
    wrappers = {n: q for n, q in quant_layers(model)}
    unwrap_(model)
    try:
        model.save_pretrained(out, safe_serialization=True)  # type: ignore[operator]
    finally:
        from outlierkit.llm.layers import set_module

        for name, q in wrappers.items():
            set_module(model, name, q)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    atomic_write_text(out / STATE_FILE, json.dumps(state, indent=1) + "\n")
    if recipe_yaml is not None:
        atomic_write_text(out / "recipe.yaml", recipe_yaml)


def apply_quant_state(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Re-wrap ``model``'s layers with the saved formats and static ranges."""
    if state.get("format") != "outlierkit.fakequant/1":
        raise ModelLoadError(f"unknown quantization state format {state.get('format')!r}")
    for fqn, spec in state["layers"].items():
        q = wrap_(model, fqn, weight=parse_format(spec["weight"]), act=parse_format(spec["act"]),
                               out=parse_format(spec["out"]))
        rng = torch.tensor([[float("nan") if v is None else v for v in r] for r in spec["act_range"]])
        q.act_range.copy_(rng)  # static ranges
    return model


def load_quantized(directory: str | Path, **load_kwargs: Any) -> Any:
    """``load_model`` on a ``quantize`` output directory, then re-apply its quantization state."""
    from outlierkit.llm.models import load_model

    d = Path(directory)
    f = d / STATE_FILE
    if not f.is_file():
        raise ModelLoadError(f"{d} has no {STATE_FILE}; pass a directory written by `outlierkit quantize`")
    lm = load_model(str(d), **load_kwargs)
    apply_quant_state(lm.model, json.loads(f.read_text(encoding="utf-8")))
    return lm
