"""Sequential (layer-by-layer) execution: one decoder layer and one layer's activations on the compute
device at a time, for models larger than the device (as llm-compressor's sequential onloading).

Two ways in:

- calibration code that knows it wants layer-major order uses :class:`LayerwiseRunner` /
  :func:`forward_layer_by_layer` directly (GPTQ, the transforms' statistics);
- every other forward over a list of inputs (evaluation, the report's SQNR passes, range observers, the
  planner's probes) goes through :func:`forward_each`, which runs the plain batch loop, or, inside
  ``with layerwise(model, device)``, the same inputs layer by layer followed by the model's own head.

Why not ``accelerate.cpu_offload``: it moves every parameter to the meta device and streams weights per
leaf module and per call, so each batch re-sends the whole model and in-place weight edits (folds, GPTQ)
no longer reach the stored weights. Here weights stay real tensors in host memory and move once per layer
per pass.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from outlierkit._utils.hooks import first_tensor
from outlierkit.errors import ConfigError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.models import ModelMap, get_attr, resolve

Item = Batch | Mapping[str, torch.Tensor]  # a Batch, or the keyword arguments of one model call
_ATTR = "_outlierkit_layerwise"


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
    """Move parameters and buffers in place, except those of the modules whose id is in ``skip``; also the
    quantized-weight cache of fake-quant wrappers (a plain attribute, else it would stay behind)."""
    if skip and id(module) in skip:
        return
    for p in module._parameters.values():
        if p is not None and p.device != torch.device(device):
            p.data = p.data.to(device)
    for name, b in module._buffers.items():
        if b is not None:
            module._buffers[name] = b.to(device)
    cached = getattr(module, "_wq", None)
    if isinstance(cached, list):
        module.__dict__["_wq"] = [t.to(device) for t in cached]
    for child in module.children():
        _move_(child, device, skip)


def _kwargs(item: Item) -> dict[str, torch.Tensor]:
    if isinstance(item, Batch):
        return {"input_ids": item.input_ids, "attention_mask": item.attention_mask}
    return dict(item)


class _Replay(nn.Module):
    """Stands in for the whole stack of decoder layers: returns the last layer's output already computed."""

    def __init__(self) -> None:
        super().__init__()
        self.out: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.out


def check_sequential(model: nn.Module, mm: ModelMap) -> None:
    """Layers that need different attention masks (sliding-window / full alternation) cannot share the
    inputs captured at layer 0: refuse rather than calibrate with the wrong mask."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if types and len(set(types)) > 1:
        raise ConfigError(f"sequential execution: {mm.model_type} alternates layer types {sorted(set(types))} "
                          "with different attention masks; run it all at once (without --sequential / "
                          "sequential: false)")


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

    def __init__(self, model: nn.Module, batches: Sequence[Item], *, device: torch.device | str | None = None,
                 cache_device: torch.device | str = "cpu", mm: ModelMap | None = None,
                 before_batch: Callable[[int, Any], None] | None = None) -> None:
        self.model, self.batches = model, list(batches)
        self.mm = mm or resolve(model, warn=False)
        check_sequential(model, self.mm)
        self.layers = [get_attr(model, n) for n in self.mm.layers]
        self.home = next(model.parameters()).device
        self.device = torch.device(device) if device is not None else self.home
        self.cache_device = torch.device(cache_device)
        self.next_layer = 0
        self._skip = {id(m) for m in self.layers}
        self.cached: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._rest: list[tuple[Any, ...] | None] = []  # the last layer's outputs after the hidden states
        self._before_layers: list[nn.Module] = []  # modules that ran before layer 0 (embeddings, rotary, ...)
        _move_(model, self.device, self._skip)
        try:
            self._capture(before_batch)
        finally:
            _move_(model, self.home, self._skip)

    @torch.no_grad()
    def _capture(self, before_batch: Callable[[int, Any], None] | None) -> None:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.cached.append((_to(args, self.cache_device), _to(kwargs, self.cache_device)))
            raise _Captured

        # the modules that contain the layer stack run around it, not before it
        parts = self.mm.layers[0].split(".")
        around = {id(get_attr(self.model, ".".join(parts[:k]))) if k else id(self.model) for k in range(len(parts))}
        ran: dict[int, nn.Module] = {}

        def seen(module: nn.Module, args: Any) -> None:
            if id(module) not in around and id(module) not in self._skip:
                ran.setdefault(id(module), module)

        handle = self.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
        watch = torch.nn.modules.module.register_module_forward_pre_hook(seen)
        try:
            for j, b in enumerate(self.batches):
                if before_batch is not None:
                    before_batch(j, b)
                try:
                    self.model(**_to(_kwargs(b), self.device), use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()
            watch.remove()
        self._before_layers = list(ran.values())
        if len(self.cached) != len(self.batches):
            raise ConfigError("sequential execution could not capture the inputs of the first decoder layer; run the "
                              "model all at once (without --sequential)")

    @torch.no_grad()
    def run(self, i: int, *, advance: bool = True,
            before_batch: Callable[[int, Any], None] | None = None) -> None:
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
                if advance and i == len(self.layers) - 1:  # kept for the head (see finish)
                    self._rest.append(_to(tuple(out[1:]), self.cache_device) if isinstance(out, tuple) else None)
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
    def finish(self, consume: Callable[[int, Any], None] | None = None,
               before_batch: Callable[[int, Any], None] | None = None, *, module: nn.Module | None = None) -> None:
        """After the last layer: the model's own forward with the layer stack replaced by a replay of the
        cached outputs, so that everything after the layers (final norm, head, soft-capping, pooling) is the
        model's code; ``consume(j, output)`` gets the model's output for input ``j``. ``module``: call this
        submodule instead of the whole model (e.g. the backbone, to skip the LM head)."""
        if self.next_layer != len(self.layers):
            raise ValueError(f"finish() after layer {self.next_layer - 1} of {len(self.layers)}: run every layer first")
        owner_name, _, attr = self.mm.layers[0].rpartition(".")
        stack = get_attr(self.model, owner_name)
        owner_of_stack, _, stack_attr = owner_name.rpartition(".")
        if not isinstance(stack, nn.ModuleList) or attr != "0" or any(
                n != f"{owner_name}.{k}" for k, n in enumerate(self.mm.layers)):
            raise ConfigError(f"sequential execution: the decoder layers of {self.mm.model_type} are not one "
                              "ModuleList; run it all at once")
        parent = get_attr(self.model, owner_of_stack) if owner_of_stack else self.model
        replay = _Replay()
        parent._modules[stack_attr] = nn.ModuleList([replay])
        _move_(self.model, self.device, self._skip)
        # The head pass re-runs what came before layer 0 (embeddings): that already ran, with its hooks, at
        # capture; here its hooks are off so that nothing is recorded twice.
        saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in self._before_layers]
        for m, _, _ in saved:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
        try:
            for j, (b, (args, kwargs)) in enumerate(zip(self.batches, self.cached, strict=True)):
                if before_batch is not None:
                    before_batch(j, b)
                h = (args[0] if args else kwargs["hidden_states"]).to(self.device)
                rest = self._rest[j]
                replay.out = h if rest is None else (h, *_to(rest, self.device))
                out = (module or self.model)(**_to(_kwargs(b), self.device), use_cache=False)
                replay.out = None
                if consume is not None:
                    consume(j, out)
        finally:
            for m, pre, post in saved:
                m._forward_pre_hooks, m._forward_hooks = pre, post
            parent._modules[stack_attr] = stack
            _move_(self.model, self.home, self._skip)


@contextmanager
def layerwise(model: nn.Module, device: torch.device | str | None) -> Iterator[nn.Module]:
    """Inside the block, :func:`forward_each` runs ``model`` one decoder layer at a time on ``device`` (the
    weights stay where they are, e.g. in CPU memory). ``device=None`` changes nothing. Copies made inside the
    block (``copy.deepcopy``) keep the setting."""
    if device is None:
        yield model
        return
    prev = getattr(model, _ATTR, None)
    setattr(model, _ATTR, torch.device(device))
    try:
        yield model
    finally:
        if prev is None:
            delattr(model, _ATTR)
        else:
            setattr(model, _ATTR, prev)


def layerwise_device(model: nn.Module) -> torch.device | None:
    """The device ``model`` runs on layer by layer (:func:`layerwise`), or None when it runs all at once."""
    dev = getattr(model, _ATTR, None)
    return dev if isinstance(dev, torch.device) else None


@torch.no_grad()
def forward_each(model: nn.Module, inputs: Sequence[Item], consume: Callable[[int, Any], None] | None = None,
                 *, before: Callable[[int, Any], None] | None = None, module: nn.Module | None = None) -> None:
    """Run the model on each input (a :class:`Batch` or a dict of keyword arguments); ``consume(j, output)``
    gets each output, ``before(j, input)`` runs before input ``j`` enters (hooks read it to know the batch).

    Plain loop, or (inside :func:`layerwise`) layer-major: every input through layer 0, then every input
    through layer 1, ..., then the model's head per input; the outputs are those of the plain loop, and
    ``before`` runs once per input and layer. ``module``: call this submodule of ``model`` (e.g. its
    backbone) instead of the whole model.
    """
    dev = layerwise_device(model)
    if dev is None:
        device = next(model.parameters()).device
        for j, item in enumerate(inputs):
            if before is not None:
                before(j, item)
            out = (module or model)(**_to(_kwargs(item), device))
            if consume is not None:
                consume(j, out)
        return
    if not inputs:
        return
    runner = LayerwiseRunner(model, inputs, device=dev, mm=resolve(model, warn=False), before_batch=before)
    for i in range(len(runner.layers)):
        runner.run(i, advance=True, before_batch=before)
    runner.finish(consume, before, module=module)


@torch.no_grad()
def forward_layer_by_layer(model: nn.Module, batches: Sequence[Item], *, device: torch.device | str | None = None,
                           before_batch: Callable[[int, Any], None] | None = None,
                           last_layer: int | None = None, mm: ModelMap | None = None) -> None:
    """Run ``batches`` through the model one decoder layer at a time (hooks on the layers fire as usual).

    Only one layer's weights and one batch's activations are on ``device`` at any time (the cached layer
    inputs wait on the CPU; see :class:`LayerwiseRunner`). The results are those of the full forward: each
    layer sees exactly the inputs it would see there.
    """
    runner = LayerwiseRunner(model, batches, device=device, mm=mm, before_batch=before_batch)
    last = len(runner.layers) - 1 if last_layer is None else last_layer
    for i in range(last + 1):
        runner.run(i, advance=i < last, before_batch=before_batch)


def layer_of(mm: ModelMap, fqn: str) -> int:
    """Index of the decoder layer that holds module ``fqn``."""
    for i, name in enumerate(mm.layers):
        if fqn.startswith(name + "."):
            return i
    raise ConfigError(f"sequential calibration: {fqn} is not inside a decoder layer")
