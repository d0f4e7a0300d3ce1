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


class LayerwiseRunner:
    """The decoder layers' inputs for a list of batches, advanced one layer at a time.

    On construction everything outside the decoder layers goes to ``device`` and each batch runs until
    layer 0, whose inputs (hidden states + keyword arguments: mask, position embeddings) are cached on
    ``cache_device`` (default: the CPU, so that only one layer's activations are on ``device``). Then
    :meth:`run` ``(i)`` puts layer ``i`` on ``device``, runs every cached input through it and, with
    ``advance=True``, replaces the cache by its outputs (the inputs of layer ``i + 1``). Running a layer
    twice (once to calibrate, once after changing its weights, to advance) is how GPTQ quantizes a model in
    2 x L layer forwards instead of replaying the earlier layers for every layer (L^2 / 2).
    """

    def __init__(self, model: nn.Module, batches: list[Batch], *, device: torch.device | str | None = None,
                 cache_device: torch.device | str = "cpu", mm: ModelMap | None = None) -> None:
        self.model, self.batches = model, batches
        self.mm = mm or resolve(model, warn=False)
        check_sequential(model, self.mm)
        self.layers = [get_attr(model, n) for n in self.mm.layers]
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.cache_device = torch.device(cache_device)
        self.next_layer = 0
        self._skip = {id(m) for m in self.layers}
        self.cached: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        _move_(model, self.device, self._skip)
        try:
            self._capture()
        finally:
            _move_(model, self.home, self._skip)

    @torch.no_grad()
    def _capture(self) -> None:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.cached.append((_to(args, self.cache_device), _to(kwargs, self.cache_device)))
            raise _Captured

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for b in self.batches:
                try:
                    self.model(input_ids=b.input_ids.to(self.device), attention_mask=b.attention_mask.to(self.device),
                               use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()
        if len(self.cached) != len(self.batches):
            raise ConfigError("sequential calibration could not capture the inputs of the first decoder layer")

    @torch.no_grad()
    def run(self, i: int, *, advance: bool = True,
            before_batch: Callable[[int, Batch], None] | None = None) -> None:
        """Run layer ``i`` (which must be the next one) on every cached input; ``advance``: keep its outputs."""
        if i != self.next_layer:
            raise ValueError(f"layer {i} run out of order: the cached inputs are those of layer {self.next_layer}")
        layer = self.layers[i]
        layer_home = next(layer.parameters()).device
        _move_(layer, self.device)
        try:
            for j, (b, (args, kwargs)) in enumerate(zip(self.batches, self.cached, strict=True)):
                if before_batch is not None:
                    before_batch(j, b)
                out = layer(*_to(args, self.device), **_to(kwargs, self.device))
                h = first_tensor(out)
                assert h is not None
                if advance:
                    if args:
                        self.cached[j] = ((h.to(self.cache_device), *args[1:]), kwargs)
                    else:  # hidden states passed by keyword
                        self.cached[j] = (args, {**kwargs, "hidden_states": h.to(self.cache_device)})
        finally:
            _move_(layer, layer_home)
        if advance:
            self.next_layer += 1


@torch.no_grad()
def forward_layer_by_layer(model: nn.Module, batches: list[Batch], *, device: torch.device | str | None = None,
                           before_batch: Callable[[int, Batch], None] | None = None,
                           last_layer: int | None = None, mm: ModelMap | None = None) -> None:
    """Run ``batches`` through the model one decoder layer at a time (hooks on the layers fire as usual).

    Only one layer's weights and one batch's activations are on ``device`` at any time (the cached layer
    inputs wait on the CPU; see :class:`LayerwiseRunner`). The results are those of the full forward: each
    layer sees exactly the inputs it would see there.
    """
    runner = LayerwiseRunner(model, batches, device=device, mm=mm)
    last = len(runner.layers) - 1 if last_layer is None else last_layer
    for i in range(last + 1):
        runner.run(i, advance=i < last, before_batch=before_batch)


def layer_of(mm: ModelMap, fqn: str) -> int:
    """Index of the decoder layer that holds module ``fqn``."""
    for i, name in enumerate(mm.layers):
        if fqn.startswith(name + "."):
            return i
    raise ConfigError(f"sequential calibration: {fqn} is not inside a decoder layer")
