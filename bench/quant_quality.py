"""Quantization quality: RTN / SmoothQuant / OS+ on the real MiniLM (held-out embedding fidelity) and on a
causal tiny Llama with planted outliers (perplexity, next-token agreement, logit SQNR).

    .venv/bin/python bench/quant_quality.py [--calib-samples 32] [--samples 64] [--seq-len 128]

Prints Markdown tables (one row per method x format); every recipe sees the same calibration and held-out
data (the built-in corpus split into even / odd documents).
"""

from __future__ import annotations

import argparse
import time

import torch

FORMATS = {
    "W8A8 per-tensor": {"weight": "int8-channel", "act": "int8-tensor"},
    "W8A8 per-token": {"weight": "int8-channel", "act": "int8-token"},
    "W6A6": {"weight": {"bits": 6, "symmetric": False, "granularity": "channel"},
             "act": {"bits": 6, "symmetric": False, "granularity": "tensor"}},
    "W4A8-group": {"weight": {"bits": 4, "symmetric": False, "granularity": "group", "group_size": 32},
                   "act": "int8-token"},
}
METHODS = {
    "RTN": [{"rtn": {}}],
    "SmoothQuant": [{"smoothquant": {"folds": ["norm", "attn_v"]}}, {"rtn": {}}],
    "OS+": [{"os_plus": {}}, {"rtn": {}}],
}


def recipes() -> list[dict[str, object]]:
    out: list[dict[str, object]] = [{"name": "FP32", "weight": None, "act": None, "steps": [{"rtn": {}}]}]
    for fname, fmt in FORMATS.items():
        for mname, steps in METHODS.items():
            out.append({"name": f"{mname}, {fname}", **fmt, "steps": steps})
    return out


def table(rows: list[dict[str, object]], cols: list[str]) -> str:
    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) and abs(v) < 10 else (f"{v:.2f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-causal", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from outlierkit.llm.evaluate import compare_recipes
    from outlierkit.llm.fixtures import tiny_model, tokenizer

    if not args.skip_minilm:
        t0 = time.perf_counter()
        rows = compare_recipes("minilm", recipes(), calib_samples=args.calib_samples, eval_samples=args.samples,
                               seq_len=args.seq_len)
        print(f"\n### MiniLM-L6 (real, bundled), {args.samples} held-out samples x <= {args.seq_len} tokens, "
              f"{args.calib_samples} calibration samples ({time.perf_counter() - t0:.0f} s)\n")
        print(table(rows, ["recipe", "cos_mean", "cos_min", "top1_agree", "emb_sqnr_db", "layer_sqnr_db_min",
                           "max_in_absmax", "quantize_s"]))
    if not args.skip_causal:
        t0 = time.perf_counter()
        rows = compare_recipes("tiny-llama", recipes(), model=tiny_model("llama"), tokenizer=tokenizer(),
                               calib_samples=args.calib_samples, eval_samples=args.samples, seq_len=args.seq_len)
        print(f"\n### Tiny Llama (2 layers, hidden 64, planted outlier channels and a x60 residual spike; random "
              f"weights, so perplexity is near the vocabulary size) ({time.perf_counter() - t0:.0f} s)\n")
        print(table(rows, ["recipe", "ppl", "top1_agree", "logit_sqnr_db", "layer_sqnr_db_min", "max_in_absmax",
                           "quantize_s"]))


if __name__ == "__main__":
    main()
