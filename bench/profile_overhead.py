"""Profiling overhead over a plain forward pass, measured side by side in one run.

    python bench/profile_overhead.py [--model minilm] [--samples 64] [--seq-len 128] [--repeats 5]

Each repeat times a plain forward over the same batches, then the profiler at each level on the same
batches; the ratio per repeat is paired (same machine state), and the median ratio is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("OUTLIERKIT_QUIET", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.models import load_model
    from outlierkit.llm.profile import ProfileOptions, _base_model, profile_model

    lm = load_model(args.model)
    corpus = build_corpus(lm.tokenizer, load_documents(None), samples=args.samples, seq_len=args.seq_len, seed=0)
    batches = corpus.batches(args.batch_size)
    runner = _base_model(lm.model, lm.map)

    def plain() -> None:
        with torch.no_grad():
            for b in batches:
                runner(input_ids=b.input_ids, attention_mask=b.attention_mask)

    configs = {
        "basic": ProfileOptions(level="basic", batch_size=args.batch_size, calib_fraction=0.0),
        "default": ProfileOptions(level="default", batch_size=args.batch_size, calib_fraction=0.0),
        "default+int8": ProfileOptions(level="default", batch_size=args.batch_size),
        "full": ProfileOptions(level="full", batch_size=args.batch_size, calib_fraction=0.0),
    }
    plain()  # warm-up
    ratios: dict[str, list[float]] = {k: [] for k in configs}
    base_times = []
    for _ in range(args.repeats):
        for name, opt in configs.items():
            t0 = time.perf_counter()
            plain()
            t_plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            profile_model(lm.model, lm.map, corpus, opt)
            t_prof = time.perf_counter() - t0
            ratios[name].append(t_prof / t_plain)
            base_times.append(t_plain)
    tokens = corpus.n_tokens
    print(f"model {lm.name} ({lm.map.spec.name}), {len(corpus)} samples, {tokens} tokens, "
          f"batch {args.batch_size}, {args.threads} thread(s), {args.repeats} paired repeats")
    print(f"plain forward: {tokens / statistics.median(base_times):,.0f} tokens/s")
    print("| level | sites | profile / plain forward (median) | min | max | tokens/s (profiled) |")
    print("|---|---|---|---|---|---|")
    from outlierkit.llm.profile import discover_sites

    for name, rs in ratios.items():
        level = configs[name].level
        n_sites = len(discover_sites(lm.model, lm.map, level))
        med = statistics.median(rs)
        tps = tokens / (statistics.median(base_times) * med)
        print(f"| {name} | {n_sites} | {med:.3f}x | {min(rs):.3f}x | {max(rs):.3f}x | {tps:,.0f} |")


if __name__ == "__main__":
    main()
