"""``outlierkit compare MODEL --recipes A B C``: several recipes on the same data, one table and one plot."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="minilm", help="model directory or 'minilm' (default)")
    parser.add_argument("--recipes", nargs="+", default=["fp32", "w8a8-rtn", "w8a8-smoothquant", "w8a8-osplus"],
                        help="recipe files or presets (default: fp32 w8a8-rtn w8a8-smoothquant w8a8-osplus)")
    parser.add_argument("--data", nargs="+", default=None, help="text (default: built-in corpus), split in halves")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration samples (default: 32)")
    parser.add_argument("--samples", type=int, default=64, help="held-out samples (default: 64)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit.errors import ConfigError
    from outlierkit.llm.evaluate import compare_recipes
    from outlierkit.llm.recipe import load_recipe
    from outlierkit.report import Report, new_figure, save_figure

    if args.calib_samples < 1 or args.samples < 2 or args.seq_len < 2 or args.batch_size < 1:
        raise ConfigError("--calib-samples/--batch-size must be >= 1, --samples >= 2, --seq-len >= 2")
    check_output(args.out, force=args.force)
    for r in args.recipes:  # fail on a bad recipe before any model work
        load_recipe(r)
    rows = compare_recipes(args.model, args.recipes, data=args.data, calib_samples=args.calib_samples,
                           eval_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                           seed=args.seed)
    report = Report(kind="llm.compare", config={k: v for k, v in vars(args).items()})
    report.add_table("compare", rows)
    print_table(rows)
    with staged_output(args.out, force=args.force) as stage:
        key = "cos_mean" if "cos_mean" in rows[0] else "top1_agree"
        fig, ax = new_figure(figsize=(7, 3.5))
        ax.bar([r["recipe"] for r in rows], [r[key] for r in rows], color="tab:blue")
        ax.set_ylabel(key)
        ax.set_title(f"{args.model}: quality per recipe (held-out data)")
        lo = min(r[key] for r in rows)
        ax.set_ylim(max(0.0, lo - (1 - lo) * 0.5 - 1e-3), 1.0)
        ax.tick_params(axis="x", rotation=20)
        save_figure(fig, stage, "compare", report)
        report.save(stage)
    return 0


def print_table(rows: list[dict[str, object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from outlierkit.report import _fmt

    table = Table(title="recipes on the same held-out data")
    cols = list(rows[0])
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in cols])
    Console().print(table)
