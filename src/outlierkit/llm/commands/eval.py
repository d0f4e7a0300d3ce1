"""``outlierkit eval MODEL [--quantized DIR]``: perplexity (causal LMs) or embedding fidelity (encoders)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from outlierkit.llm.evaluate import PROTOCOL as P  # the defaults `compare` uses too

    parser.add_argument("model", help="the float model: directory, cached hub name or 'minilm'")
    parser.add_argument("--quantized", default=None, help="a directory written by `outlierkit quantize`")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text (default: built-in corpus); its held-out half (odd documents) is evaluated")
    parser.add_argument("--samples", type=int, default=P.samples, help=f"evaluation samples (default: {P.samples})")
    parser.add_argument("--seq-len", type=int, default=P.seq_len,
                        help=f"tokens per sample / perplexity window ({P.seq_len})")
    parser.add_argument("--batch-size", type=int, default=P.batch_size,
                        help=f"samples per forward (default: {P.batch_size})")
    parser.add_argument("--max-windows", type=int, default=P.max_windows,
                        help=f"perplexity windows, 0 = all (default: {P.max_windows})")
    parser.add_argument("--seed", type=int, default=P.seed, help=f"sampling seed (default: {P.seed})")
    parser.add_argument("--out", default=None, help="write report.json/report.md here (optional)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit.errors import ConfigError
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.evaluate import EvalData, evaluate_model, held_out
    from outlierkit.llm.export import load_quantized
    from outlierkit.llm.models import load_model
    from outlierkit.llm.recipe import layer_sqnr
    from outlierkit.report import Report

    if args.samples < 1 or args.seq_len < 2 or args.batch_size < 1 or args.max_windows < 0:
        raise ConfigError("--samples/--batch-size must be >= 1, --seq-len >= 2, --max-windows >= 0")
    if args.out:
        check_output(args.out, force=args.force)
    docs = held_out(load_documents(args.data))  # the protocol's split: `quantize` calibrates on the other half
    lm = load_model(args.model)
    corpus = build_corpus(lm.tokenizer, docs, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                          max_length=lm.max_length)
    data = EvalData(corpus.batches(args.batch_size), docs, causal=lm.map.spec.causal, window=args.seq_len,
                    max_windows=args.max_windows or None)
    rows = [{"model": lm.name, **evaluate_model(lm.model, lm.tokenizer, data)}]
    report = Report(kind="llm.eval", config={k: v for k, v in vars(args).items()})
    if args.quantized:
        q = load_quantized(args.quantized)
        rows.append({"model": f"{q.name} (quantized)", **evaluate_model(q.model, lm.tokenizer, data)})
        per_layer = layer_sqnr(q.model, data.batches)
        report.add_table("layer_sqnr", [{"layer": k, **v} for k, v in per_layer.items()])
        finite = [v["sqnr_db"] for v in per_layer.values() if v["sqnr_db"] != float("inf")]
        if finite:
            report.metrics["layer_sqnr_db_min"] = min(finite)
            report.metrics["layer_sqnr_db_mean"] = sum(finite) / len(finite)
    report.add_table("eval", rows)
    for k, v in rows[-1].items():
        if isinstance(v, float):
            report.metrics[k] = v
    _print(rows, report.metrics)
    if args.out:
        with staged_output(args.out, force=args.force) as stage:
            report.save(stage)
    return 0


def _print(rows: list[dict[str, Any]], metrics: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from outlierkit.report import _fmt

    cols = [k for k in rows[-1] if k != "eval_tokens"]
    table = Table()
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in cols])
    console = Console()
    console.print(table)
    if "layer_sqnr_db_min" in metrics:
        console.print(f"per-layer SQNR: min {_fmt(metrics['layer_sqnr_db_min'])} dB, "
                      f"mean {_fmt(metrics['layer_sqnr_db_mean'])} dB")
