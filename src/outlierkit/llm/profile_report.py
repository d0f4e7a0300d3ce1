"""Turn :class:`ActivationProfile` results into the report format: flat tables, metrics and plots."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from outlierkit.llm.profile import GLOBAL_KINDS, ActivationProfile, fmt_loc
from outlierkit.report import Report, new_figure, save_figure

TokenText = Callable[[int], str] | None


def _num(v: float) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def site_rows(prof: ActivationProfile, token_text: TokenText) -> list[dict[str, Any]]:
    """One row per site: moments, extremes with location, quantiles, kurtosis, spike ratio.

    Every site has a row, also one that saw no finite value (all NaN/Inf: its statistics are empty and
    ``nonfinite_tokens`` says why). ``massive_tokens`` is this site's own count of massive tokens.
    """
    rows = []
    for site in prof.sites:
        st = prof.stats[site.name]
        row: dict[str, Any] = {"model": prof.model, "site": site.name, "kind": site.kind, "layer": site.layer,
                               "module": site.module, "count": st.count}
        if not st.count:
            stat_cols = ("mean", "std", "rms", "min", "max", "absmax", "absmax_sample", "absmax_pos", "absmax_token",
                         "absmax_channel", "kurtosis", "p50_abs", "p99_abs", "p99.9_abs", "p99.99_abs", "spike_ratio",
                         "top_channels", "channel_ratio", "massive_tokens", "max_token_ratio")
            rows.append({**row, **dict.fromkeys(stat_cols), "nonfinite_tokens": st.nonfinite_tokens})
            continue
        loc = fmt_loc(st.loc_absmax, token_text)
        ch = st.ch_absmax
        top_ch = torch.topk(ch, min(3, ch.numel()))
        med_ch = float(ch.median()) if ch.numel() else float("nan")
        rows.append({
            **row, "mean": st.mean, "std": st.std, "rms": st.rms, "min": st.vmin, "max": st.vmax,
            "absmax": st.absmax, "absmax_sample": loc["sample"], "absmax_pos": loc["pos"],
            "absmax_token": loc["token"], "absmax_channel": loc["channel"],
            "kurtosis": _num(st.kurtosis), "p50_abs": st.quantile_abs(0.5), "p99_abs": st.quantile_abs(0.99),
            "p99.9_abs": st.quantile_abs(0.999), "p99.99_abs": st.quantile_abs(0.9999),
            "spike_ratio": _num(st.spike_ratio),
            "top_channels": " ".join(str(int(i)) for i in top_ch.indices),
            "channel_ratio": _num(float(top_ch.values[0]) / med_ch) if med_ch > 0 else None,
            "massive_tokens": st.massive_tokens if st.per_token else None,
            "max_token_ratio": _num(st.max_token_ratio) if st.per_token else None,
            "nonfinite_tokens": st.nonfinite_tokens,
        })
    return rows


def top_value_rows(prof: ActivationProfile, token_text: TokenText, per_site: int = 5) -> list[dict[str, Any]]:
    rows = []
    for site in prof.sites:
        st = prof.stats[site.name]
        for rank, (v, loc) in enumerate(zip(st.top_vals.tolist(), st.top_locs, strict=False)):
            if rank >= per_site:
                break
            from outlierkit.llm.stats import Loc

            rows.append({"model": prof.model, "site": site.name, "rank": rank + 1, "value": v,
                         **fmt_loc(Loc.from_tensor(loc), token_text)})
    return rows


def channel_rows(prof: ActivationProfile, per_site: int = 5) -> list[dict[str, Any]]:
    """The top outlier channels of the global-max site kinds: per-channel absmax vs the median channel."""
    rows = []
    for site in prof.sites:
        st = prof.stats[site.name]
        if site.kind not in GLOBAL_KINDS + ("down_in", "gate") or not st.count:
            continue
        ch = st.ch_absmax
        med = float(ch.median())
        vals, idx = torch.topk(ch, min(per_site, ch.numel()))
        for v, i in zip(vals.tolist(), idx.tolist(), strict=True):
            rows.append({"model": prof.model, "site": site.name, "channel": i, "absmax": v,
                         "min": float(st.ch_min[i]), "max": float(st.ch_max[i]),
                         "x_median_channel": v / med if med > 0 else None})
    return rows


def massive_rows(prof: ActivationProfile, token_text: TokenText, limit: int = 50) -> list[dict[str, Any]]:
    rows = []
    for site in prof.sites:
        st = prof.stats[site.name]
        for tmax, ratio, loc in st.massive:
            rows.append({"model": prof.model, "site": site.name, "token_max": tmax, "ratio": ratio,
                         **fmt_loc(loc, token_text)})
    rows.sort(key=lambda r: -r["token_max"])
    return rows[:limit]


def int8_rows(prof: ActivationProfile) -> list[dict[str, Any]]:
    rows = []
    for site in prof.sites:
        checks = prof.int8.get(site.name, {})
        for kind, chk in checks.items():
            if chk.count:
                rows.append({"model": prof.model, "site": site.name, "kind": site.kind, "threshold": kind,
                             "T": chk.threshold, "sqnr_db": _num(chk.sqnr_db), "rel_rmse": _num(chk.rel_rmse),
                             "rel_mae": _num(chk.rel_mae), "clip_rate": chk.clip_rate,
                             "eval_max": prof.stats[site.name].absmax})
    return rows


def expert_rows(prof: ActivationProfile) -> list[dict[str, Any]]:
    rows = []
    for ex in prof.experts.values():
        total = float(ex.tokens.sum()) or 1.0
        for e in range(ex.n_experts):
            rows.append({"model": prof.model, "layer": ex.layer, "module": ex.module, "expert": e,
                         "tokens": int(ex.tokens[e]), "share": float(ex.tokens[e]) / total,
                         "in_absmax": float(ex.in_absmax[e]),
                         "gated_absmax": float(ex.gated_absmax[e]) or None,
                         "out_absmax": float(ex.out_absmax[e]) or None})
    return rows


def int8_summary(prof: ActivationProfile) -> dict[str, float | None]:
    """Count-weighted mean SQNR over sites, and the SQNR at the global-peak site, per threshold."""
    out: dict[str, float | None] = {}
    g = prof.global_max()
    for kind in ("absmax", "p99.9"):
        checks = [c[kind] for c in prof.int8.values() if kind in c and c[kind].count]
        if checks:
            w = sum(c.count for c in checks)
            vals = [(c.sqnr_db, c.count) for c in checks if math.isfinite(c.sqnr_db)]
            out[f"int8_{kind}_sqnr_db_mean"] = sum(v * n for v, n in vals) / w if vals else None
        if g and g[0] in prof.int8 and kind in prof.int8[g[0]]:
            out[f"int8_{kind}_sqnr_db_at_peak"] = _num(prof.int8[g[0]][kind].sqnr_db)
    return out


def summary_row(prof: ActivationProfile, token_text: TokenText) -> dict[str, Any]:
    g = prof.global_max()
    row: dict[str, Any] = {"model": prof.model, "model_type": prof.model_type, "tokens": prof.tokens,
                           "sites": len(prof.sites)}
    if g:
        loc = fmt_loc(g[2], token_text)
        kind = "max" if g[1] >= 0 else "min"
        row.update({"global_max": g[1], "where": f"{g[0]} ({kind})", "token": loc["token"], "pos": loc["pos"],
                    "channel": loc["channel"], "sample": loc["sample"]})
    resid = [prof.stats[s.name] for s in prof.sites if s.kind == "residual" and prof.stats[s.name].count]
    # distinct tokens massive at one or more per-token sites, and token-site pairs (the sum of the sites
    # table's massive_tokens column): a token massive at 5 sites counts 1 and 5
    row["massive_tokens"] = prof.massive_tokens
    row["massive_site_hits"] = prof.massive_site_hits
    row["status"] = prof.status
    row["max_residual_kurtosis"] = max((_num(st.kurtosis) or 0.0 for st in resid), default=None)
    row.update(int8_summary(prof))
    return row


def build_profile_report(
    profiles: Sequence[ActivationProfile],
    token_texts: Sequence[TokenText],
    out_dir: str | Path,
    config: dict[str, Any],
    warnings: Sequence[str] = (),
) -> Report:
    """The ``llm.profile`` report: tables over all models, metrics of the first, plots into ``out_dir``."""
    rep = Report(kind="llm.profile", config=config)
    for w in warnings:
        rep.warn(w)
    summaries = [summary_row(p, t) for p, t in zip(profiles, token_texts, strict=True)]
    rep.add_table("summary", summaries)
    for p, t in zip(profiles, token_texts, strict=True):
        prefix = "" if len(profiles) == 1 else f"{p.model}."
        s = summary_row(p, t)
        for k in ("global_max", "where", "token", "massive_tokens", "massive_site_hits", "tokens", "status",
                  "int8_absmax_sqnr_db_at_peak",
                  "int8_p99.9_sqnr_db_at_peak", "int8_absmax_sqnr_db_mean", "int8_p99.9_sqnr_db_mean"):
            if k in s:
                rep.metrics[prefix + k] = s[k]
        for w in p.warnings:
            rep.warn(w)
        for problem in p.problems():
            rep.warn(problem)
        for st_name, st in p.stats.items():
            if st.nonfinite_tokens:
                loc = fmt_loc(st.loc_nonfinite, t)
                rep.warn(f"{p.model}: {st.nonfinite_tokens} token(s) with NaN/Inf at {st_name} (first: sample "
                         f"{loc['sample']}, pos {loc['pos']}, channel {loc['channel']}, token {loc['token']!r}); "
                         "they are excluded from that site's statistics")
        for sw in p.shape_warnings:
            msg = f"{p.model}: site {sw} produced a tensor whose shape does not match the batch; skipped"
            if msg not in p.warnings:
                rep.warn(msg)
    # one verdict for the run: "unusable" if any model's statistics are (NaN/Inf in the forward, ...)
    rep.metrics["status"] = "unusable" if any(p.unusable for p in profiles) else "ok"
    rep.metrics["unusable"] = rep.metrics["status"] == "unusable"
    rep.add_table("sites", [r for p, t in zip(profiles, token_texts, strict=True) for r in site_rows(p, t)])
    rep.add_table("top_values", [r for p, t in zip(profiles, token_texts, strict=True)
                                 for r in top_value_rows(p, t)])
    rep.add_table("channels", [r for p in profiles for r in channel_rows(p)])
    rep.add_table("massive_tokens", [r for p, t in zip(profiles, token_texts, strict=True)
                                     for r in massive_rows(p, t)])
    rep.add_table("int8", [r for p in profiles for r in int8_rows(p)])
    experts = [r for p in profiles for r in expert_rows(p)]
    if experts:
        rep.add_table("experts", experts)
    plot_layerwise(profiles, out_dir, rep)
    plot_channels(profiles[0], out_dir, rep)
    if any(p.int8 for p in profiles):
        plot_sqnr(profiles, out_dir, rep)
    return rep


def plot_layerwise(profiles: Sequence[ActivationProfile], out_dir: str | Path, rep: Report) -> None:
    """Layerwise max|x| per site kind, log scale (one line per kind and model)."""
    fig, ax = new_figure(figsize=(8, 4.5))
    styles = ["-", "--", ":", "-."]
    for mi, prof in enumerate(profiles):
        kinds: dict[str, list[tuple[int, float]]] = {}
        for site in prof.sites:
            st = prof.stats[site.name]
            if site.layer >= 0 and st.count and site.kind in ("residual", "attn", "mlp", "gate", "down_in", "router"):
                kinds.setdefault(site.kind, []).append((site.layer, st.absmax))
        for kind, pts in sorted(kinds.items()):
            pts.sort()
            label = kind if len(profiles) == 1 else f"{prof.model}: {kind}"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles[mi % 4], marker="o", ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation|")
    ax.set_title("Layerwise maximum activation by site")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, out_dir, "layerwise_max", rep)


def plot_channels(prof: ActivationProfile, out_dir: str | Path, rep: Report) -> None:
    """Per-channel max|x| at the global-peak site: the outlier channels stand out."""
    g = prof.global_max()
    if g is None:
        return
    st = prof.stats[g[0]]
    ch = st.ch_absmax.numpy()
    fig, ax = new_figure(figsize=(8, 3.5))
    ax.bar(range(len(ch)), ch, width=1.0)
    top = ch.argsort()[-3:]
    for i in top:
        ax.annotate(str(int(i)), (i, ch[i]), fontsize=7, ha="center", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("channel")
    ax.set_ylabel("max |activation|")
    ax.set_title(f"{prof.model}: per-channel max at {g[0]} (global peak)")
    save_figure(fig, out_dir, "top_channels", rep)


def plot_sqnr(profiles: Sequence[ActivationProfile], out_dir: str | Path, rep: Report) -> None:
    """INT8 SQNR (absmax threshold) versus the site's max: larger peaks, worse per-tensor INT8."""
    fig, ax = new_figure(figsize=(6, 4))
    for prof in profiles:
        for kind, marker in (("absmax", "o"), ("p99.9", "x")):
            xs, ys = [], []
            for site in prof.sites:
                chk = prof.int8.get(site.name, {}).get(kind)
                if chk and chk.count and math.isfinite(chk.sqnr_db):
                    xs.append(prof.stats[site.name].absmax)
                    ys.append(chk.sqnr_db)
            label = f"T = {kind}" if len(profiles) == 1 else f"{prof.model}, T = {kind}"
            ax.scatter(xs, ys, marker=marker, s=14, label=label)
    ax.axhline(20, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("site max |activation|")
    ax.set_ylabel("INT8 per-tensor SQNR (dB)")
    ax.set_title("INT8 reconstruction vs activation max (20 dB = acceptable)")
    ax.legend(fontsize=7)
    save_figure(fig, out_dir, "sqnr_vs_max", rep)
