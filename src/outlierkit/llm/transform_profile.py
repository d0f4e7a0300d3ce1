"""What an equivalence transform does to the activations: per-site max|x|, kurtosis and INT8/INT4 SQNR before/after."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from outlierkit._utils import HookSet
from outlierkit.errors import ConfigError
from outlierkit.llm.corpus import Batch
from outlierkit.llm.formats import Format, IntFormat, fake_quant, parse_format
from outlierkit.llm.hadamard import OnlineQuantLinear
from outlierkit.llm.layers import QuantLinear, unwrapped_fqn
from outlierkit.llm.methods import METHODS, QuantContext
from outlierkit.llm.models import get_attr, is_linear, resolve

_INT8 = IntFormat(8, True, "token")
_INT4 = IntFormat(4, True, "token")


@dataclass
class InputStats:
    """Streaming statistics of one linear's input over the non-pad calibration tokens (float64 sums)."""

    n: int = 0
    absmax: float = 0.0
    s1: float = 0.0
    s2: float = 0.0
    s3: float = 0.0
    s4: float = 0.0
    noise8: float = 0.0
    noise4: float = 0.0

    def update(self, x: torch.Tensor) -> None:
        xd = x.double()
        self.n += xd.numel()
        self.absmax = max(self.absmax, float(xd.abs().max()))
        self.s1 += float(xd.sum())
        self.s2 += float(xd.pow(2).sum())
        self.s3 += float(xd.pow(3).sum())
        self.s4 += float(xd.pow(4).sum())
        xf = x.float()
        self.noise8 += float((fake_quant(xf, _INT8).double() - xd).pow(2).sum())
        self.noise4 += float((fake_quant(xf, _INT4).double() - xd).pow(2).sum())

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis E[(x - m)^4] / var^2 - 3 over all values of the site."""
        n = max(self.n, 1)
        m, e2, e3, e4 = self.s1 / n, self.s2 / n, self.s3 / n, self.s4 / n
        var = e2 - m * m
        if var <= 0:
            return math.nan
        return (e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m**4) / var**2 - 3

    def sqnr(self, bits: int) -> float:
        noise = self.noise8 if bits == 8 else self.noise4
        return math.inf if noise == 0 else 10 * math.log10(max(self.s2, 1e-300) / noise)


@torch.no_grad()
def linear_input_stats(model: nn.Module, batches: list[Batch]) -> dict[str, InputStats]:
    """Statistics of every block linear's input, as its weight sees it (after an online rotation), per-token
    INT8/INT4 symmetric fake-quantization SQNR included. Fused MoE experts are not measured."""
    mm = resolve(model, warn=False)
    stats: dict[str, InputStats] = {}
    current: dict[str, Any] = {"mask": None}

    def grab(name: str) -> Any:
        def fn(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            if isinstance(module, OnlineQuantLinear):
                x = module.transform_input(x)
            flat = x.detach().reshape(-1, x.shape[-1])
            mask = current["mask"]
            if mask is not None and flat.shape[0] == mask.numel():
                flat = flat[mask.reshape(-1).to(flat.device).bool()]
            if flat.numel():
                stats.setdefault(name, InputStats()).update(flat)
        return fn

    from outlierkit.llm.sequential import forward_each

    with HookSet() as hooks:
        for fqn in dict.fromkeys(unwrapped_fqn(f) for f in mm.linears):  # a wrapper's .inner is the same site
            mod = get_attr(model, fqn)
            if is_linear(mod) or isinstance(mod, QuantLinear) and mod.kind != "experts":
                hooks.forward_pre(mod, grab(fqn))
        forward_each(model, batches, before=lambda j, b: current.__setitem__("mask", b.attention_mask))
    return stats


def compare_transforms(model: nn.Module, batches: list[Batch], methods: list[str],
                       params: dict[str, dict[str, Any]] | None = None, weight: Format | None = None,
                       act: Format | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Apply each transform to a copy of ``model`` and tabulate every linear input before and after.

    ``weight`` / ``act`` are the formats the transforms are told they prepare for (OS+ searches its scales
    for them; default int8 per channel / int8 per tensor, the W8A8 setting).

    Returns (rows, notes): one row per (method, site) with ``absmax``, ``kurtosis``, ``sqnr_int8_db`` and
    ``sqnr_int4_db`` before and after, and the methods' notes (e.g. a refused family).
    """
    params = params or {}
    for m in methods:
        cls = METHODS.get(m)
        if not cls.transform:
            raise ConfigError(f"{m} is not an equivalence transform; choose from "
                              f"{sorted(n for n, c in METHODS.items() if c.transform)}")
    before = linear_input_stats(model, batches)
    mm = resolve(model, warn=False)
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for m in methods:
        work = copy.deepcopy(model)
        ctx = QuantContext(batches, weight if weight is not None else parse_format("int8-channel"),
                           act if act is not None else parse_format("int8-tensor"))
        recs = METHODS.get(m)(**params.get(m, {})).apply(work, ctx)
        notes += ctx.notes
        applied = any(r.info.get("applied", True) for r in recs)
        after = linear_input_stats(work, batches)
        for site, b in before.items():
            a = after[site]
            rows.append({"method": m, "site": site, "layer": mm.linears.get(site, -1), "applied": applied,
                         "absmax_before": b.absmax, "absmax_after": a.absmax,
                         "kurtosis_before": b.kurtosis, "kurtosis_after": a.kurtosis,
                         "sqnr_int8_db_before": b.sqnr(8), "sqnr_int8_db_after": a.sqnr(8),
                         "sqnr_int4_db_before": b.sqnr(4), "sqnr_int4_db_after": a.sqnr(4)})
        del work
    return rows, notes


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: sites, median max|x| ratio after/before, mean INT8/INT4 SQNR before and after."""
    out = []
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        ratios = sorted(r["absmax_after"] / r["absmax_before"] for r in rs if r["absmax_before"] > 0)

        def mean(key: str, rs: list[dict[str, Any]] = rs) -> float:
            vals = [r[key] for r in rs if math.isfinite(r[key])]
            return sum(vals) / len(vals) if vals else math.nan

        row: dict[str, Any] = {"method": m, "applied": rs[0]["applied"], "sites": len(rs),
                               "absmax_ratio_median": ratios[len(ratios) // 2] if ratios else math.nan}
        for key in ("sqnr_int8_db", "sqnr_int4_db", "kurtosis"):
            row[f"{key}_before"], row[f"{key}_after"] = mean(f"{key}_before"), mean(f"{key}_after")
        out.append(row)
    return out


def plot_layer_max(rows: list[dict[str, Any]], title: str) -> Any:
    """One figure: per-layer max|x| over the layer's linear inputs, before and after each transform."""
    from outlierkit.report import new_figure

    fig, ax = new_figure(figsize=(7, 3.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    first = [r for r in rows if r["method"] == methods[0]]
    ax.plot(layers, [max(r["absmax_before"] for r in first if r["layer"] == i) for i in layers], "k-o",
            label="before")
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        ax.plot(layers, [max(r["absmax_after"] for r in rs if r["layer"] == i) for i in layers], "--o", label=m)
    ax.set_yscale("log")
    ax.set_xticks(layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("max |x| of linear inputs")
    ax.set_title(title)
    ax.legend()
    return fig
