"""Speed: OS+ scale search, vectorized over candidates vs a straightforward loop over the same candidates
(same loss, same chosen scale), plus whole-model quantization time per recipe.

    .venv/bin/python bench/quant_speed.py [--hidden 256] [--tokens 512]

One thread; the loop and the vectorized search run side by side in one process, and the ratio is printed.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens used by the search")
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from outlierkit.llm.calibrate import collect_input_stats
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.formats import parse_format
    from outlierkit.llm.methods.base import resolve_groups
    from outlierkit.llm.methods.os_plus import OSPlus, candidates, search_loop, search_vectorized
    from outlierkit.llm.models import resolve

    h = args.hidden
    model = tiny_model("llama", hidden_size=h, intermediate_size=int(h * 2.6875), num_attention_heads=h // 32,
                       num_key_value_heads=h // 64)
    tok = tokenizer()
    n_samples = max(1, args.tokens // args.seq_len)
    corpus = build_corpus(tok, load_documents(None), samples=n_samples, seq_len=args.seq_len, seed=0,
                          min_tokens=args.seq_len)
    batches = corpus.batches(n_samples)
    mm = resolve(model, warn=False)
    m = OSPlus()
    rows = []
    for g in [x for x in resolve_groups(model, mm, ("norm", "linear", "attn_v")) if x.layer == 0]:
        site = g.linears[0]
        st = collect_input_stats(model, [site], batches, cache={site},
                                 context_sites={site: mm.fqn(0, "self_attn")})[site]
        p, _ = m.problem(model, mm, g, st, parse_format("int8-channel"), parse_format("int8-tensor"))
        ts = candidates(p.c, 1.0, 400)
        chunk = m._chunk(p)
        t0 = time.perf_counter()
        i_loop, l_loop = search_loop(p, ts)
        t_loop = time.perf_counter() - t0
        t0 = time.perf_counter()
        i_vec, _ = search_vectorized(p, ts, chunk)
        t_vec = time.perf_counter() - t0
        t0 = time.perf_counter()
        i_c, _ = search_vectorized(p, ts, chunk, how="coarse")
        t_c = time.perf_counter() - t0
        rows.append({"group": g.name.replace("model.layers.0.", ""), "loss": p.role, "candidates": len(ts),
                     "loop_s": t_loop, "vectorized_s": t_vec, "speedup": t_loop / t_vec,
                     "same_scale": i_vec == i_loop, "coarse_s": t_c, "coarse_speedup": t_loop / t_c,
                     "coarse_same": i_c == i_loop,
                     "coarse_loss_excess": float(l_loop[i_c] / l_loop.min() - 1)})
    print(f"\n### OS+ scale search, Llama-style layer 0 at hidden {h} ({batches[0].input_ids.numel()} tokens, "
          "W8 per-channel / A8 per-tensor loss), 1 thread\n")
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")

    # whole-model quantization time (calibration + transforms + wrapping + SQNR bookkeeping)
    from outlierkit.llm.models import load_model
    from outlierkit.llm.recipe import quantize_

    lm = load_model("minilm")
    calib = build_corpus(lm.tokenizer, load_documents(None), samples=32, seq_len=128, seed=0)
    print("\n### Whole-model quantization time, MiniLM-L6, 32 x 128-token calibration samples, 1 thread\n")
    print("| recipe | quantize_ s (incl. float + RTN baseline SQNR passes) | transform step s |\n|---|---|---|")
    import copy

    for name in ("w8a8-rtn", "w8a8-smoothquant", "w8a8-osplus"):
        mdl = copy.deepcopy(lm.model)
        t0 = time.perf_counter()
        rep = quantize_(mdl, name, calib)
        dt = time.perf_counter() - t0
        step = [v for k, v in rep.metrics.items() if k.startswith("time_") and "rtn" not in k]
        print(f"| {name} | {dt:.2f} | {step[0]:.2f} |" if step else f"| {name} | {dt:.2f} | - |")


if __name__ == "__main__":
    main()
