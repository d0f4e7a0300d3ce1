"""``outlierkit transforms MODEL --methods smoothquant os_plus rotate``: what each transform does to the outliers."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="minilm", help="model directory or 'minilm' (default)")
    parser.add_argument("--methods", nargs="+", default=["smoothquant", "os_plus", "rotate"],
                        help="equivalence transforms to compare (default: smoothquant os_plus rotate)")
    parser.add_argument("--online-down", action="store_true",
                        help="rotate with an online Hadamard before each down projection (not exportable)")
    parser.add_argument("--data", nargs="+", default=None, help="text files/dirs/JSONL (default: built-in corpus)")
    parser.add_argument("--samples", type=int, default=16, help="calibration samples (default: 16)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--out", default="runs/transforms", help="output directory (default: runs/transforms)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit.errors import ConfigError
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.methods import METHODS
    from outlierkit.llm.models import load_model
    from outlierkit.llm.transform_profile import compare_transforms, plot_layer_max, summarize
    from outlierkit.report import Report, save_figure

    if args.samples < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise ConfigError("--samples/--batch-size must be >= 1 and --seq-len >= 2")
    for m in args.methods:
        if not METHODS.get(m).transform:
            raise ConfigError(f"{m} is not an equivalence transform; choose from "
                              f"{sorted(n for n, c in METHODS.items() if c.transform)}")
    check_output(args.out, force=args.force)
    docs = load_documents(args.data)
    lm = load_model(args.model, dtype="fp32", device=args.device)
    batches = build_corpus(lm.tokenizer, docs, samples=args.samples, seq_len=args.seq_len,
                           seed=args.seed).batches(args.batch_size)
    params = {"rotate": {"online_down": True}} if args.online_down else {}
    rows, notes = compare_transforms(lm.model, batches, list(args.methods), params)
    summary = summarize(rows)
    report = Report(kind="llm.transforms", config={k: v for k, v in vars(args).items()})
    report.add_table("summary", summary)
    report.add_table("sites", rows)
    for s in summary:
        for key in ("absmax_ratio_median", "sqnr_int8_db_after", "sqnr_int4_db_after"):
            report.metrics[f"{s['method']}.{key}"] = s[key]
    for n in notes:
        report.warn(n)
    with staged_output(args.out, force=args.force) as stage:
        save_figure(plot_layer_max(rows, f"{lm.name}: per-layer max|x| before / after"), stage, "layer_max", report)
        report.save(stage)
    print(f"{lm.name}: {len(rows) // max(len(summary), 1)} linear inputs -> {args.out}")
    print("method        applied  median max|x| after/before  INT8 SQNR dB before->after  INT4 SQNR dB before->after")
    for s in summary:
        print(f"{s['method']:<13} {str(s['applied']):<8} {s['absmax_ratio_median']:>10.3f}"
              f"{s['sqnr_int8_db_before']:>24.2f} -> {s['sqnr_int8_db_after']:<6.2f}"
              f"{s['sqnr_int4_db_before']:>20.2f} -> {s['sqnr_int4_db_after']:.2f}")
    for n in notes:
        print(f"note: {n}")
    return 0
