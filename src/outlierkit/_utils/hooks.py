"""``HookSet``: the only way outlierkit registers hooks; it keeps the handles and always removes them."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class HookSet:
    """Owns forward (pre-)hooks; removing them is guaranteed on ``remove()`` or context exit, even on error.

    Example::

        with HookSet() as hooks:
            hooks.forward(model.layers[0], lambda m, args, out: seen.append(out))
            model(x)
        # every hook is gone here, also if model(x) raised
    """

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """Register ``fn(module, args, output)`` (or ``(module, args, kwargs, output)`` with kwargs)."""
        self._handles.append(module.register_forward_hook(fn, with_kwargs=with_kwargs))

    def forward_pre(self, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False) -> None:
        """Register ``fn(module, args)`` (or ``(module, args, kwargs)`` with kwargs) before forward."""
        self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=with_kwargs))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a module produced: itself, the first element of a tuple, or ``.last_hidden_state``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    for name in ("last_hidden_state", "hidden_states", "logits"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return None


def count_hooks(model: nn.Module) -> int:
    """Number of forward (pre-)hooks registered anywhere in ``model`` (tests check it returns to 0)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
