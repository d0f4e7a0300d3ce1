"""``outlierkit compare MODEL --recipes A B C``: several recipes on the same data, one table and one plot."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from outlierkit.llm.evaluate import PROTOCOL as P

    parser.add_argument("model", nargs="?", default="minilm", help="model directory or 'minilm' (default)")
    parser.add_argument("--recipes", nargs="+", default=["fp32", "w8a8-rtn", "w8a8-smoothquant", "w8a8-osplus"],
                        help="recipe files or presets (default: fp32 w8a8-rtn w8a8-smoothquant w8a8-osplus)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text (default: built-in corpus); even documents calibrate, odd ones evaluate")
    parser.add_argument("--calib-samples", type=int, default=None,
                        help=f"calibration samples (default: the recipe's, {P.calib_samples})")
    parser.add_argument("--calib-seed", type=int, default=None,
                        help=f"calibration sampling seed (default: the recipe's, {P.calib_seed}; as quantize --seed)")
    parser.add_argument("--samples", type=int, default=P.samples, help=f"held-out samples (default: {P.samples})")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sample (default: {P.seq_len}; calibration: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=P.batch_size,
                        help=f"samples per forward (default: {P.batch_size})")
    parser.add_argument("--max-windows", type=int, default=P.max_windows,
                        help=f"perplexity windows, 0 = all (default: {P.max_windows})")
    parser.add_argument("--seed", type=int, default=P.seed,
                        help=f"held-out sampling seed (default: {P.seed}; as eval --seed)")
    parser.add_argument("--out", default="runs/compare", help="output directory (default: runs/compare)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit.errors import ConfigError
    from outlierkit.llm.evaluate import compare_recipes
    from outlierkit.llm.recipe import load_recipe
    from outlierkit.report import Report, new_figure, save_figure

    if ((args.calib_samples is not None and args.calib_samples < 1) or args.samples < 2
            or (args.seq_len is not None and args.seq_len < 2) or args.batch_size < 1 or args.max_windows < 0
            or (args.calib_seed is not None and args.calib_seed < 0) or args.seed < 0):
        raise ConfigError("--calib-samples/--batch-size must be >= 1, --samples >= 2, --seq-len >= 2, "
                          "--max-windows and the seeds >= 0")
    check_output(args.out, force=args.force)
    for r in args.recipes:  # fail on a bad recipe before any model work
        load_recipe(r)
    rows = compare_recipes(args.model, args.recipes, data=args.data, calib_samples=args.calib_samples,
                           eval_samples=args.samples, seq_len=args.seq_len, batch_size=args.batch_size,
                           seed=args.seed, calib_seed=args.calib_seed, max_windows=args.max_windows or None)
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
    """One row per recipe; a metric with a 95% interval prints as ``value [lo, hi]``."""
    from rich.table import Table

    from outlierkit._utils.log import stdout_console
    from outlierkit.report import _fmt

    table = Table(title="recipes on the same held-out data (95% intervals in brackets)")
    cols = [c for c in rows[0] if not c.endswith(("_lo", "_hi"))]
    for c in cols:
        table.add_column(c)
    for r in rows:
        cells = []
        for c in cols:
            text = _fmt(r.get(c, ""))
            if f"{c}_lo" in r:
                text += f" [{_fmt(r[f'{c}_lo'])}, {_fmt(r[f'{c}_hi'])}]"
            cells.append(text)
        table.add_row(*cells)
    stdout_console().print(table)
