"""Calibration statistics for the quantization methods: per-channel absmax / min / max of layer inputs
(padding masked) and, for OS+, cached layer inputs with their attention context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlierkit._utils import HookSet
from outlierkit.errors import DataError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.models import get_attr


@dataclass
class ChannelStats:
    """Per-input-channel statistics of one site over the non-pad calibration tokens.

    Shapes:
        absmax, min, max: (C,).
    """

    absmax: torch.Tensor
    min: torch.Tensor
    max: torch.Tensor
    tokens: int = 0
    cached: list[torch.Tensor] = field(default_factory=list)  # (B, T, C) per batch, when asked
    masks: list[torch.Tensor] = field(default_factory=list)  # (B, T) per cached batch
    context: list[dict[str, Any]] = field(default_factory=list)  # attention kwargs per cached batch


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``x`` (..., C) that are real tokens, as float32: (N, C) on ``x``'s device."""
    flat = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and flat.shape[0] == mask.numel():
        flat = flat[mask.reshape(-1).to(flat.device).bool()]
    return flat.float()


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    sites: list[str],
    batches: list[Batch],
    *,
    cache: set[str] | None = None,
    cache_batches: int | None = None,
    context_sites: dict[str, str] | None = None,
    sequential: bool = False,
    device: str | torch.device | None = None,
) -> dict[str, ChannelStats]:
    """Run ``batches`` through ``model`` and record the input statistics of each module in ``sites``.

    Args:
        sites: FQNs of modules whose first positional input is measured.
        cache: sites whose raw inputs are also kept (as (B, T, C) with the batch's attention mask).
        cache_batches: keep inputs of only the first N batches (default: all).
        context_sites: site -> FQN of an attention module whose forward kwargs (``position_embeddings``)
            are kept next to the cached inputs (OS+'s attention-output loss needs RoPE).
        sequential: run the model one decoder layer at a time (:mod:`outlierkit.llm.sequential`), on
            ``device`` (default: the model's), stopping after the last layer that holds a site; the
            statistics are those of the all-at-once forward.
    """
    if not batches:
        raise DataError("no calibration batches; pass more text with --data or raise --calib-samples")
    cache = cache or set()
    context_sites = context_sites or {}
    stats: dict[str, ChannelStats] = {}
    current: dict[str, Any] = {"mask": None, "batch": 0}
    contexts: dict[str, dict[str, Any]] = {}

    def stat_hook(name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return
            rows = token_rows(x, current["mask"])
            if rows.numel() == 0:
                return
            st = stats.get(name)
            amax, lo, hi = rows.abs().amax(0).cpu(), rows.amin(0).cpu(), rows.amax(0).cpu()
            if st is None:
                st = stats[name] = ChannelStats(amax, lo, hi)
            else:
                st.absmax = torch.maximum(st.absmax, amax)
                st.min = torch.minimum(st.min, lo)
                st.max = torch.maximum(st.max, hi)
            st.tokens += rows.shape[0]
            if name in cache and (cache_batches is None or current["batch"] < cache_batches):
                xc = x.detach().float().cpu()
                mask = current["mask"]
                if xc.shape[:-1].numel() == mask.numel():
                    xc = xc.reshape(*mask.shape, xc.shape[-1])  # (B, T, C) also for flattened inputs
                st.cached.append(xc)
                st.masks.append(current["mask"].cpu())
                st.context.append(contexts.get(context_sites.get(name, ""), {}))
        return fn

    def ctx_hook(name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            pe = kwargs.get("position_embeddings")
            contexts[name] = {"position_embeddings": tuple(t.detach().float().cpu() for t in pe)} if pe else {}
        return fn

    with HookSet() as hooks:
        for name in sites:
            hooks.forward_pre(get_attr(model, name), stat_hook(name))
        for ctx in set(context_sites.values()):
            hooks.forward_pre(get_attr(model, ctx), ctx_hook(ctx), with_kwargs=True)
        from outlierkit.llm.sequential import forward_each, layerwise_device

        if sequential or layerwise_device(model) is not None:
            from outlierkit.llm.models import resolve
            from outlierkit.llm.sequential import forward_layer_by_layer, layer_of

            mm = resolve(model, warn=False)

            def before(i: int, b: Batch) -> None:
                current["mask"], current["batch"] = b.attention_mask, i

            forward_layer_by_layer(model, batches, device=device or layerwise_device(model), before_batch=before,
                                   mm=mm, last_layer=max(layer_of(mm, s) for s in sites))
        else:
            forward_each(model, batches, before=lambda i, b: current.update(mask=b.attention_mask, batch=i))
    missing = [s for s in sites if s not in stats]
    if missing:
        raise DataError(f"calibration never reached {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                        "with MoE models pass more calibration text so every expert sees tokens")
    return stats
