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
    q = None
    if args.quantized:  # validate the quantized directory before any evaluation runs
        _check_same_model(args.model, args.quantized)
        q = load_quantized(args.quantized)
    docs = held_out(load_documents(args.data))  # the protocol's split: `quantize` calibrates on the other half
    lm = load_model(args.model)
    corpus = build_corpus(lm.tokenizer, docs, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                          max_length=lm.max_length)
    data = EvalData(corpus.batches(args.batch_size), docs, causal=lm.map.spec.causal, window=args.seq_len,
                    max_windows=args.max_windows or None)
    rows = [{"model": lm.name, **evaluate_model(lm.model, lm.tokenizer, data)}]
    report = Report(kind="llm.eval", config={k: v for k, v in vars(args).items()})
    if q is not None:
        rows.append({"model": f"{q.name} (quantized)", **evaluate_model(q.model, lm.tokenizer, data)})
        _reproduce_quantize_fidelity(args.quantized, lm, q.model, report)
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


def _reproduce_quantize_fidelity(quantized: str, lm: Any, qmodel: Any, report: Any) -> None:
    """Re-measure ``quantize``'s output SQNR on its own calibration data (recipe.yaml + report.json of the
    quantized directory) with the reloaded model: the saved artifact must give what ``quantize`` reported."""
    import json
    import math
    from pathlib import Path

    import yaml

    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.evaluate import calibration_half
    from outlierkit.llm.recipe import model_outputs, output_sqnr

    d = Path(quantized)
    try:
        qrep = json.loads((d / "report.json").read_text(encoding="utf-8"))
        calib = (yaml.safe_load((d / "recipe.yaml").read_text(encoding="utf-8")) or {}).get("calib") or {}
    except (OSError, json.JSONDecodeError, yaml.YAMLError):
        report.warn(f"{d} has no readable report.json/recipe.yaml: quantize's fidelity is not re-checked")
        return
    reported = qrep.get("metrics", {}).get("output_sqnr_db")
    if reported is None or not calib:
        return
    docs = calibration_half(load_documents(qrep.get("config", {}).get("data")))  # what quantize calibrated on
    corpus = build_corpus(lm.tokenizer, docs,
                          samples=calib.get("samples", 32), seq_len=calib.get("seq_len", 128),
                          seed=calib.get("seed", 0), max_length=lm.max_length)
    batches = corpus.batches(calib.get("batch_size", 8))
    got = output_sqnr(model_outputs(lm.model, batches), model_outputs(qmodel, batches), batches)
    report.metrics["quantize_output_sqnr_db"] = reported
    report.metrics["reloaded_output_sqnr_db"] = got
    same = (math.isinf(got) and math.isinf(reported)) or abs(got - reported) <= 0.01
    print(f"output SQNR on quantize's calibration data: reported {reported:.2f} dB, reloaded {got:.2f} dB"
          + ("" if same else "  <- DIFFERS"))
    if not same:
        report.warn(f"the saved model gives {got:.2f} dB where quantize reported {reported:.2f} dB")


def _check_same_model(model: str, quantized: str) -> None:
    """A quantized directory made from another model is a one-line error (not a meaningless comparison)."""
    import json
    from pathlib import Path

    from outlierkit.errors import ConfigError, ModelLoadError
    from outlierkit.llm.models import resolve_source

    try:
        qcfg = json.loads((Path(quantized) / "config.json").read_text(encoding="utf-8"))
        fcfg = json.loads((resolve_source(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read config.json of {quantized} or {model} ({e})") from None
    keys = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
    diff = [k for k in keys if qcfg.get(k) != fcfg.get(k)]
    if diff:
        raise ConfigError(f"{quantized} was quantized from another model than {model}: "
                          + ", ".join(f"{k} {qcfg.get(k)} vs {fcfg.get(k)}" for k in diff))


def _print(rows: list[dict[str, Any]], metrics: Mapping[str, Any]) -> None:
    from rich.table import Table

    from outlierkit._utils.log import stdout_console
    from outlierkit.report import _fmt

    cols = [k for k in rows[-1] if k != "eval_tokens"]
    table = Table()
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[_fmt(r.get(c, "")) for c in cols])
    console = stdout_console()
    console.print(table)
    if "layer_sqnr_db_min" in metrics:
        console.print(f"per-layer SQNR: min {_fmt(metrics['layer_sqnr_db_min'])} dB, "
                      f"mean {_fmt(metrics['layer_sqnr_db_mean'])} dB")
