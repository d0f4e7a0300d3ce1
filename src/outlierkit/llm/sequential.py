"""Sequential (layer-by-layer) calibration: one decoder layer and one layer's activations on the compute
device at a time, for models larger than the device (as llm-compressor's sequential onloading)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from outlierkit._utils.hooks import first_tensor
from outlierkit.errors import ConfigError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.models import ModelMap, get_attr, resolve


class _Captured(Exception):
    """Raised by the layer-0 hook once the layer's inputs are captured: nothing after it needs to run."""


def _to(obj: Any, device: torch.device | str) -> Any:
    """Tensors inside tuples / lists / dicts moved to ``device`` (other objects unchanged)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_(module: nn.Module, device: torch.device | str, skip: set[int] | None = None) -> None:
    """Move parameters and buffers in place, except those of the modules whose id is in ``skip``."""
    if skip and id(module) in skip:
        return
    for p in module._parameters.values():
        if p is not None and p.device != torch.device(device):
            p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(device)
    for child in module.children():
        _move_(child, device, skip)


def check_sequential(model: nn.Module, mm: ModelMap) -> None:
    """Layers that need different attention masks (sliding-window / full alternation) cannot share the
    inputs captured at layer 0: refuse rather than calibrate with the wrong mask."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if types and len(set(types)) > 1:
        raise ConfigError(f"sequential calibration: {mm.model_type} alternates layer types {sorted(set(types))} "
                          "with different attention masks; calibrate all at once (sequential: false)")


@torch.no_grad()
def forward_layer_by_layer(model: nn.Module, batches: list[Batch], *, device: torch.device | str | None = None,
                           before_batch: Callable[[int, Batch], None] | None = None,
                           last_layer: int | None = None, mm: ModelMap | None = None) -> None:
    """Run ``batches`` through the model one decoder layer at a time (hooks on the layers fire as usual).

    1. Everything outside the decoder layers goes to ``device``; each batch runs until layer 0, whose
       inputs (hidden states + keyword arguments: mask, position embeddings) are kept on the CPU.
    2. For each layer up to ``last_layer``: the layer goes to ``device``, every batch's cached input runs
       through it (``before_batch(i, batch)`` first, so hooks know the batch), the outputs replace the
       cached inputs on the CPU, and the layer goes back to where it was.

    Only one layer's weights and one batch's activations are on ``device`` at any time. The results are
    those of the full forward: each layer sees exactly the inputs it would see there.
    """
    mm = mm or resolve(model, warn=False)
    check_sequential(model, mm)
    layers = [get_attr(model, n) for n in mm.layers]
    home = next(model.parameters()).device
    dev = torch.device(device) if device is not None else home
    last = len(layers) - 1 if last_layer is None else last_layer
    skip = {id(m) for m in layers}
    _move_(model, dev, skip)
    cached: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cached.append((_to(args, "cpu"), _to(kwargs, "cpu")))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(input_ids=b.input_ids.to(dev), attention_mask=b.attention_mask.to(dev), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(cached) != len(batches):
        raise ConfigError("sequential calibration could not capture the inputs of the first decoder layer")
    for i, layer in enumerate(layers[: last + 1]):
        layer_home = next(layer.parameters()).device
        _move_(layer, dev)
        try:
            for j, (b, (args, kwargs)) in enumerate(zip(batches, cached, strict=True)):
                if before_batch is not None:
                    before_batch(j, b)
                out = layer(*_to(args, dev), **_to(kwargs, dev))
                h = first_tensor(out)
                assert h is not None
                if i < last:
                    if args:
                        cached[j] = ((h.to("cpu"), *args[1:]), kwargs)
                    else:  # hidden states passed by keyword
                        cached[j] = (args, {**kwargs, "hidden_states": h.to("cpu")})
        finally:
            _move_(layer, layer_home)
    _move_(model, home, skip)


def layer_of(mm: ModelMap, fqn: str) -> int:
    """Index of the decoder layer that holds module ``fqn``."""
    for i, name in enumerate(mm.layers):
        if fqn.startswith(name + "."):
            return i
    raise ConfigError(f"sequential calibration: {fqn} is not inside a decoder layer")
