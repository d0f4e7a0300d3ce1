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
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-model", action="store_true", help="skip the whole-model timing")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dev = torch.device(args.device)
    from outlierkit.llm.calibrate import collect_input_stats
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.formats import parse_format
    from outlierkit.llm.methods.base import resolve_groups
    from outlierkit.llm.methods.os_plus import OSPlus, budget_chunk, candidates, search_loop, search_vectorized
    from outlierkit.llm.models import resolve

    h = args.hidden
    model = tiny_model("llama", hidden_size=h, intermediate_size=int(h * 2.6875), num_attention_heads=h // 32,
                       num_key_value_heads=h // 64).to(dev)
    tok = tokenizer()
    n_samples = max(1, args.tokens // args.seq_len)
    corpus = build_corpus(tok, load_documents(None), samples=n_samples, seq_len=args.seq_len, seed=0,
                          min_tokens=args.seq_len)
    batches = corpus.batches(n_samples)
    mm = resolve(model, warn=False)
    m = OSPlus(device=args.device)
    rows = []
    for g in [x for x in resolve_groups(model, mm, ("norm", "linear", "attn_v")) if x.layer == 0]:
        site = g.linears[0]
        st = collect_input_stats(model, [site], batches, cache={site},
                                 context_sites={site: mm.fqn(0, "self_attn")})[site]
        p, _ = m.problem(model, mm, g, st, parse_format("int8-channel"), parse_format("int8-tensor"))
        ts = candidates(p.c, 1.0, 400)
        chunk = budget_chunk(p)

        def timed(fn, *a, **kw):  # type: ignore[no-untyped-def]
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return out, time.perf_counter() - t0

        timed(search_vectorized, p, ts[:4], chunk)  # warm-up
        (i_loop, l_loop), t_loop = timed(search_loop, p, ts)
        (i_vec, _), t_vec = timed(search_vectorized, p, ts, chunk)
        (i_c, _), t_c = timed(search_vectorized, p, ts, 1 if dev.type == "cpu" else chunk, how="coarse")
        rows.append({"group": g.name.replace("model.layers.0.", ""), "loss": p.role, "candidates": len(ts),
                     "loop_s": t_loop, "batched_s": t_vec, "chunk": chunk, "batched_speedup": t_loop / t_vec,
                     "same_scale": i_vec == i_loop, "coarse_s": t_c, "coarse_speedup": t_loop / t_c,
                     "coarse_same": i_c == i_loop,
                     "coarse_loss_excess": float(l_loop[i_c] / l_loop.min() - 1)})
    print(f"\n### OS+ scale search, Llama-style layer 0 at hidden {h} ({batches[0].input_ids.numel()} tokens, "
          f"W8 per-channel / A8 per-tensor loss), device {dev}, 1 CPU thread\n")
    if args.skip_model:
        _print(rows)
        return
    _print(rows)

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


def _print(rows: list[dict[str, object]]) -> None:
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
