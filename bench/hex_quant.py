"""Quantized diffusion LM: profile the tiny MDM, quantize it (RTN/SmoothQuant/OS+/spike-MP), HEX vs float.

Usage:
    python bench/hex_quant.py --out runs/hex_quant [--n 500] [--steps 4] [--seeds 4] [--methods rtn,...]
        [--formats w8a8,w4a8] [--calib 64] [--threads 1] [--model DIR] [--force]

The bridge between the two halves of outlierkit lives here (the parts do not import each other):
:class:`TinyHFView` shows :class:`~outlierkit.diffusion.tiny.TinyMDM` to the LLM tooling as a model with a
``config.model_type`` ("tiny-mdm", an entry of ``outlierkit.llm.models.ARCHITECTURES``), so
``profile_model`` and ``quantize_`` work on it unchanged, and the quantized modules (fake-quant wrappers put
in place) are then decoded by the diffusion sampler and HEX. Every variant decodes the same held-out
problems with the same per-path seeds, so accuracies are paired.

Formats: weights symmetric per output channel (int8 or int4), input activations int8 per-tensor with a
static range calibrated on in-distribution denoiser inputs (training-split problems, answers masked with
a random ratio as in decoding). Static ranges keep a row's result independent of which rows share its
batch (a dynamic per-tensor range would be taken over the whole decode batch).

Prints Markdown tables (paste into BENCHMARKS.md) and writes report.json/report.md/accuracy.png to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

#: Recipe steps of each method (the formats are set per bit width in :func:`recipe_for`).
METHOD_STEPS: dict[str, list[dict[str, Any]]] = {
    "rtn": [{"rtn": {}}],
    "smoothquant": [{"smoothquant": {"alpha": 0.5, "folds": ["norm", "attn_v"]}}, {"rtn": {}}],
    "osplus": [{"os_plus": {"floor": 1.0, "search": "coarse"}}, {"rtn": {}}],
    # The anchors' rule (max/median >= 100) selects nothing in this model (its largest ratio is 45, see the
    # profile), which would make spike_mp plain RTN; keep the 3 spikiest of the 12 block linears instead.
    "spike_mp": [{"spike_mp": {"select": "topk", "top_k": 3, "keep": "float", "quantize": False}}, {"rtn": {}}],
}


class TinyHFView(nn.Module):
    """A Hugging Face-shaped view of a :class:`TinyMDM` for ``outlierkit.llm``: ``config.model_type`` is
    ``"tiny-mdm"`` (the architecture-table entry), with the head counts the fold helpers read; the tiny
    module itself sits under ``.mdm``, so wrappers that quantization puts in place act on it directly.

    Shapes: input_ids (B, T), optional attention_mask (B, T) -> logits (B, T, V).
    """

    def __init__(self, mdm: nn.Module) -> None:
        super().__init__()
        self.mdm = mdm
        c: Any = mdm.config  # a TinyConfig
        self.config = SimpleNamespace(model_type="tiny-mdm", num_attention_heads=c.n_heads, hidden_size=c.d_model,
                                      num_hidden_layers=c.n_layers, max_position_embeddings=c.max_len)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = self.mdm(input_ids, attention_mask)
        return out


def denoiser_batches(task: Any, n: int, batch_size: int, seed: int) -> list[Any]:
    """``n`` training-split sequences as the denoiser sees them while decoding: the prompt, then the answer
    with each token masked with probability t ~ U(0, 1) (one t per row). Shapes: batches of (B, P + G)."""
    from outlierkit.diffusion.tiny import MASK
    from outlierkit.llm.corpus import Batch

    gen = torch.Generator().manual_seed(seed)
    prompts, resps = task.sample_train(n, gen)  # (n, P), (n, G)
    t = torch.rand(n, 1, generator=gen)  # (n, 1)
    masked = torch.rand(resps.shape, generator=gen) < t  # (n, G)
    ids = torch.cat([prompts, torch.where(masked, torch.full_like(resps, MASK), resps)], dim=1)  # (n, P+G)
    return [Batch(ids[i:i + batch_size], torch.ones_like(ids[i:i + batch_size]), list(range(i, min(n, i + batch_size))))
            for i in range(0, n, batch_size)]


def profile_tiny(view: TinyHFView, batches: list[Any]) -> Any:
    """Full-level activation profile (every block site and every linear's input) over ``batches``."""
    from outlierkit.llm.corpus import TokenCorpus
    from outlierkit.llm.models import resolve
    from outlierkit.llm.profile import ProfileOptions, profile_model

    samples = [row.tolist() for b in batches for row in b.input_ids]
    corpus = TokenCorpus(samples, ["calib"] * len(samples), max(len(s) for s in samples), pad_id=0)
    opts = ProfileOptions(level="full", batch_size=batches[0].input_ids.shape[0], hist_stride=1)
    return profile_model(view, resolve(view), corpus, opts, name="tiny-mdm")


def profile_rows(prof: Any) -> list[dict[str, Any]]:
    """One row per site: absmax with its token position and channel, median |x|, spike ratio, kurtosis."""
    rows = []
    for site in prof.sites:
        st = prof.stats[site.name]
        if not st.count:
            continue
        loc = st.loc_absmax
        ch = st.ch_absmax
        top = ch.topk(min(2, ch.numel())).values if ch.numel() else torch.zeros(1)
        rows.append({"site": site.name, "kind": site.kind, "layer": site.layer, "absmax": st.absmax,
                     "pos": loc.pos, "channel": loc.channel, "median_abs": st.quantile_abs(0.5),
                     "spike_ratio": st.spike_ratio, "kurtosis": st.kurtosis,
                     "top_ch_over_2nd": float(top[0] / top[1]) if top.numel() > 1 and top[1] > 0 else float("nan"),
                     "massive_tokens": st.massive_tokens})
    return rows


def parse_bits(spec: str) -> tuple[int, int]:
    """``"w4a8"`` -> (4, 8)."""
    import re

    m = re.fullmatch(r"w(\d+)a(\d+)", spec.strip().lower())
    if not m:
        from outlierkit.errors import ConfigError
        raise ConfigError(f"formats are like w8a8 or w4a8, got {spec!r}")
    return int(m.group(1)), int(m.group(2))


def recipe_for(method: str, fmt: str) -> dict[str, Any]:
    """Recipe of ``method`` at ``fmt`` (``w8a8``): per-channel symmetric weights, static per-tensor activations."""
    wb, ab = parse_bits(fmt)
    return {"name": f"{fmt}-{method}", "weight": f"int{wb}-channel", "act": f"int{ab}-tensor-static",
            "steps": METHOD_STEPS[method], "calib": {"min_tokens": 256}}


def quantized_copy(mdm: nn.Module, method: str, fmt: str, calib: list[Any], eval_batches: list[Any]
                   ) -> tuple[nn.Module, Any]:
    """A fake-quantized copy of the tiny model (float weights untouched) and the ``quantize_`` report."""
    import copy

    from outlierkit.llm.recipe import quantize_

    view = TinyHFView(copy.deepcopy(mdm))
    rep = quantize_(view, recipe_for(method, fmt), calib, eval_batches=eval_batches)
    return view.mdm, rep


# ---------------------------------------------------------------------------------------------- decoding

def usable_schedules(task: Any, steps: int) -> list[str]:
    """The task's default HEX schedules that fit ``steps`` (equal steps per block: blocks must divide steps)."""
    out = [b for b in task.default_schedules if steps % (task.gen_length // int(b)) == 0]
    if not out:
        from outlierkit.errors import ConfigError
        raise ConfigError(f"no default schedule of {task.name} {task.default_schedules} fits {steps} steps")
    return out


def decode_all(model: nn.Module, task: Any, problems: list[Any], schedules: list[str], steps: int, seeds: int,
               temperature: float, seed: int) -> dict[str, np.ndarray]:
    """Greedy answers (N, J) and sampled answers (N, J, S) of every schedule, plus gold (N,), as str arrays."""
    from outlierkit.diffusion.hex import HexConfig, decode_paths
    from outlierkit.diffusion.tiny import TINY_TOKENS, decode

    prompts = [list(p.prompt_ids) for p in problems]
    max_len: int = getattr(model, "config").max_len  # noqa: B009  (TinyMDM's TinyConfig)
    sched = tuple(schedules)
    base = HexConfig(schedules=sched, seeds_per_block=1, temperature=0.0, gen_length=task.gen_length,
                     steps=steps, extractor="after_hash", seed=seed, batch_rows=512)
    out: dict[str, np.ndarray] = {}
    for key, cfg in (("greedy", base),
                     ("sampled", replace(base, seeds_per_block=seeds, temperature=temperature))):
        paths = decode_paths(model, prompts, TINY_TOKENS, cfg, decode, max_context=max_len)
        labels = [sc.label for sc in cfg.resolved_schedules()]
        arr = np.full((len(problems), len(sched), cfg.seeds_per_block), None, dtype=object)
        for p in paths:
            arr[p.prompt_index, labels.index(p.schedule), p.seed_index] = p.answer
        out[key] = arr
    out["gold"] = np.array([p.answer for p in problems], dtype=object)
    return out


def vote(answers: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """HEX majority vote per problem: answers (N, K), blocks (K,) -> voted answers (N,) (ties: smallest block)."""
    from outlierkit.diffusion.voting import VOTES, Ballot

    rule = VOTES.get("majority")
    return np.array([rule([Ballot(a, int(b), o) for o, (a, b) in enumerate(zip(row, blocks, strict=True))]).answer
                     for row in answers], dtype=object)


def accuracies(d: dict[str, np.ndarray], schedules: list[str]) -> dict[str, Any]:
    """Per-problem correctness of each single schedule, its same-compute vote, and HEX."""
    gold = d["gold"]
    g, s = d["greedy"][:, :, 0], d["sampled"]
    n, J, S = s.shape
    blocks = np.array([int(x) for x in schedules])
    ok = lambda a: np.array([x is not None and x == y for x, y in zip(a, gold, strict=True)])  # noqa: E731
    res: dict[str, Any] = {"greedy": {lab: ok(g[:, j]) for j, lab in enumerate(schedules)},
                           "path_acc": float(np.mean([[s[i, j, k] == gold[i] for j in range(J) for k in range(S)]
                                                      for i in range(n)]))}
    # same compute as HEX over J paths: J sampled paths of one schedule, voted
    res["single_vote"] = {lab: ok(vote(s[:, j, :J], np.full(J, blocks[j]))) for j, lab in enumerate(schedules)}
    res[f"hex{J}"] = ok(vote(s[:, :, 0], blocks))  # one sampled path per schedule: J paths
    res[f"hex{J * S}"] = ok(vote(s.reshape(n, J * S), np.repeat(blocks, S)))  # J * S paths
    return res


def summarize(name: str, acc: dict[str, Any], ref: dict[str, Any] | None, J: int, S: int, n_boot: int
              ) -> dict[str, Any]:
    from outlierkit.diffusion.hex import paired_bootstrap

    greedy = acc["greedy"]
    best_g = max(greedy, key=lambda k: greedy[k].mean())
    same = acc["single_vote"]
    hex_small, hex_big = acc[f"hex{J}"], acc[f"hex{J * S}"]
    row: dict[str, Any] = {"variant": name}
    for lab, v in greedy.items():
        row[f"greedy_b{lab}"] = 100 * v.mean()
    row["best_greedy"] = 100 * greedy[best_g].mean()
    row["mean_path"] = 100 * acc["path_acc"]
    row[f"best_single_vote{J}"] = 100 * max(v.mean() for v in same.values())
    row[f"hex{J}"] = 100 * hex_small.mean()
    row[f"hex{J * S}"] = 100 * hex_big.mean()
    d, lo, hi = paired_bootstrap(hex_big, greedy[best_g], n_boot)
    row["hex_minus_best_greedy"] = 100 * d
    row["ci"] = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
    if ref is not None:
        ref_best = max(ref["greedy"], key=lambda k: ref["greedy"][k].mean())
        loss = ref["greedy"][ref_best].mean() - greedy[best_g].mean()
        row["greedy_loss_vs_float"] = 100 * loss
        row[f"hex{J * S}_loss_vs_float_hex"] = 100 * (ref[f"hex{J * S}"].mean() - hex_big.mean())
        d2, lo2, hi2 = paired_bootstrap(hex_big, ref["greedy"][ref_best], n_boot)
        row["hex_minus_float_greedy"] = 100 * d2
        row["ci_vs_float"] = f"[{100 * lo2:+.1f}, {100 * hi2:+.1f}]"
    return row


# ------------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="tiny checkpoint dir (default: bundled pointer-chase-k)")
    ap.add_argument("--n", type=int, default=500, help="held-out problems")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps (gen 16 / 4 = 4 tokens per step)")
    ap.add_argument("--seeds", type=int, default=4, help="sampled paths per schedule")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--methods", default="rtn,smoothquant,osplus,spike_mp")
    ap.add_argument("--formats", default="w8a8,w4a8", help="weight/activation bit widths")
    ap.add_argument("--calib", type=int, default=64, help="calibration sequences (training split)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from outlierkit._utils import staged_output
    from outlierkit._utils.log import log
    from outlierkit.diffusion.tiny import load_tiny
    from outlierkit.report import Report, markdown_table, new_figure, save_figure

    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHOD_STEPS:
            from outlierkit.errors import ConfigError
            raise ConfigError(f"unknown method {m!r}; valid: {sorted(METHOD_STEPS)}")
    formats = [f.strip().lower() for f in args.formats.split(",") if f.strip()]
    for f in formats:
        parse_bits(f)
    mdm, task, meta = load_tiny(args.model)
    schedules = usable_schedules(task, args.steps)
    J, S = len(schedules), args.seeds
    if S < J:
        from outlierkit.errors import ConfigError
        raise ConfigError(f"--seeds must be >= the {J} schedules (the same-compute baseline votes {J} paths of one "
                          "schedule)")
    problems = task.heldout(args.n)
    calib = denoiser_batches(task, args.calib, 16, seed=args.seed)
    eval_b = denoiser_batches(task, 64, 16, seed=args.seed + 1)
    cmd = "python bench/hex_quant.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rep = Report(kind="bench.hex_quant", config={
        "command": cmd, "n": args.n, "steps": args.steps, "tokens_per_step": task.gen_length // args.steps,
        "schedules": schedules, "seeds_per_schedule": S, "temperature": args.temperature,
        "methods": methods, "formats": formats,
        "weight": "int-k per-channel symmetric", "act": "int-k per-tensor static (calibrated)",
        "calib_sequences": args.calib,
        "task": task.name, "checkpoint_meta": meta, "threads": args.threads})
    t0 = time.perf_counter()

    log("profiling the float tiny model")
    prof_rows = profile_rows(profile_tiny(TinyHFView(mdm), calib))
    rep.add_table("profile", prof_rows)
    top = max((r for r in prof_rows if r["kind"] in ("residual", "attn", "mlp", "embedding", "final_norm")),
              key=lambda r: r["absmax"])
    lin = [r for r in prof_rows if r["kind"] == "linear_in"]
    spiky = max(lin, key=lambda r: r["spike_ratio"])
    rep.metrics.update({"global_absmax": top["absmax"], "global_absmax_site": top["site"],
                        "max_linear_in_spike_ratio": spiky["spike_ratio"], "max_spike_linear": spiky["site"]})

    log(f"decoding float: {args.n} problems x {J} schedules x (1 greedy + {S} sampled)")
    float_acc = accuracies(decode_all(mdm, task, problems, schedules, args.steps, S, args.temperature, args.seed),
                           schedules)
    rows = [summarize("float", float_acc, None, J, S, args.n_boot)]
    rows[0]["output_sqnr_db"] = float("inf")
    quant_rows: list[dict[str, Any]] = []
    for fmt in formats:
        for m in methods:
            name = f"{fmt.upper()} {m}"
            log(f"quantizing {name}")
            qmodel, qrep = quantized_copy(mdm, m, fmt, calib, eval_b)
            for w in qrep.warnings:
                rep.warn(f"{name}: {w}")
            for t in qrep.tables.get("transforms", []):
                quant_rows.append({"variant": name, **{k: v for k, v in t.items() if not isinstance(v, (list, dict))}})
            log(f"decoding {name}")
            acc = accuracies(decode_all(qmodel, task, problems, schedules, args.steps, S, args.temperature, args.seed),
                             schedules)
            row = summarize(name, acc, float_acc, J, S, args.n_boot)
            row["output_sqnr_db"] = qrep.metrics["output_sqnr_db"]
            row["layer_sqnr_db_min"] = qrep.metrics.get("layer_sqnr_db_min")
            if m == "spike_mp":
                kept = [t["layer"] for t in qrep.tables.get("transforms", []) if t.get("selected")]
                row["kept_float"] = ",".join(k.split("mdm.")[-1] for k in kept) or "none"
            rows.append(row)
    rep.add_table("accuracy", rows)
    rep.add_table("transforms", quant_rows)
    rep.metrics["wall_seconds"] = time.perf_counter() - t0
    for r in rows:
        key = r["variant"].replace(" ", "_")
        rep.metrics[f"{key}.best_greedy"] = r["best_greedy"]
        rep.metrics[f"{key}.hex{J * S}"] = r[f"hex{J * S}"]

    with staged_output(args.out, force=args.force) as stage:
        fig, ax = new_figure(figsize=(9, 4))
        x = np.arange(len(rows))
        series = [("best greedy", "best_greedy", "tab:gray"), ("mean sampled path", "mean_path", "tab:olive"),
                  (f"best single schedule, {J}-path vote", f"best_single_vote{J}", "tab:blue"),
                  (f"HEX {J} paths", f"hex{J}", "tab:orange"), (f"HEX {J * S} paths", f"hex{J * S}", "tab:red")]
        w = 0.8 / len(series)
        for k, (label, col, color) in enumerate(series):
            ax.bar(x + (k - len(series) / 2 + 0.5) * w, [r[col] for r in rows], w, label=label, color=color)
        ax.set_xticks(x, [r["variant"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(max(0, min(r["mean_path"] for r in rows) - 10), 100)
        ax.legend(fontsize=7, ncols=3)
        ax.set_title(f"tiny {task.name}: n={args.n}, {task.gen_length // args.steps} tokens/step")
        save_figure(fig, stage, "accuracy", rep)
        rep.save(stage)

    print(f"## Quantized tiny MDM ({task.name}), n={args.n} held-out, gen {task.gen_length}, {args.steps} steps "
          f"({task.gen_length // args.steps} tokens/step), schedules {'/'.join(schedules)}, T={args.temperature}, "
          f"{S} seeds/schedule, {rep.metrics['wall_seconds']:.0f} s\n")
    print("### Where the outliers are (float model, calibration inputs)\n")
    print(markdown_table(sorted(prof_rows, key=lambda r: -r["absmax"])[:12]))
    print("### Accuracy (%) and the HEX gap\n")
    cols = ["variant", "output_sqnr_db", *[f"greedy_b{s}" for s in schedules], "best_greedy", "mean_path",
            f"best_single_vote{J}", f"hex{J}", f"hex{J * S}", "hex_minus_best_greedy", "ci",
            "greedy_loss_vs_float", f"hex{J * S}_loss_vs_float_hex", "hex_minus_float_greedy", "ci_vs_float",
            "kept_float"]
    print(markdown_table([{c: r.get(c, "") for c in cols} for r in rows]))
    for wmsg in rep.warnings:
        print(f"warning: {wmsg}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
