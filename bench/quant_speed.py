"""Speed and accuracy of the OS+ scale search: successive halving vs the full loop over every candidate.

    .venv/bin/python bench/quant_speed.py [--families llama qwen3 ...] [--seeds 0 1 2] [--tokens 512]
                                         [--hidden 4096 --big-tokens 2048] [--loop-sample 3] [--skip-big]

1. Hit rate: on every fold group of the family fixtures (tiny models with planted outliers) and several
   seeds, does ``search_halving`` return the grid optimum of the exact loss, or a loss within 0.1% of it?
   Both are computed in one run (the grid = every candidate with the exact loss, the reference).
2. Speed at LLaMA-7B shapes (hidden 4096, intermediate 11008, 2048 tokens, 400 candidates, SwiGLU gate/up
   loss and a down_proj linear loss): halving is timed in full; the full loop's time is the measured time
   of ``--loop-sample`` candidates x 400 (one candidate costs the same whichever t it is). One thread;
   times are this process's CPU time (``time.process_time``), so that other work on a shared machine does
   not bias the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "phi3", "opt", "bloom", "gpt2", "bert",
            "qwen2_moe", "qwen3_moe", "mixtral"]


def hit_rate(families: list[str], seeds: list[int], tokens: int, seq_len: int) -> None:
    from outlierkit.llm.calibrate import collect_input_stats
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.formats import parse_format
    from outlierkit.llm.methods.base import resolve_groups
    from outlierkit.llm.methods.os_plus import OSPlus, candidates, search_halving, search_vectorized
    from outlierkit.llm.models import resolve

    tok = tokenizer()
    docs = load_documents(None)
    m = OSPlus()
    wf, af = parse_format("int8-channel"), parse_format("int8-tensor")
    rows = []
    print(f"\n### OS+ search hit rate: {len(families)} families x seeds {seeds}, {tokens} calibration tokens, "
          "W8 per-channel / A8 per-tensor loss, every fold group\n")
    print("| family | groups | hits (optimum or within 0.1%) | exact optimum | worst excess | exact evals / grid |")
    print("|---|---|---|---|---|---|")
    total = hits = exact_hits = 0
    for fam in families:
        f_groups = f_hits = f_exact = 0
        worst = 0.0
        evals = grid = 0
        for seed in seeds:
            model = tiny_model(fam, seed=seed)
            n = max(1, tokens // seq_len)
            batches = build_corpus(tok, docs, samples=n, seq_len=seq_len, seed=seed, min_tokens=seq_len).batches(n)
            mm = resolve(model, warn=False)
            groups = resolve_groups(model, mm, ("norm", "attn_v", "linear"))
            sites = sorted({g.linears[0] for g in groups})
            attn = {g.linears[0]: mm.fqn(g.layer, mm.spec.attn) for g in groups if g.spec.role == "qkv"}
            stats = collect_input_stats(model, sites, batches, cache=set(sites), context_sites=attn)
            for g in groups:
                p, _ = m.problem(model, mm, g, stats[g.linears[0]], wf, af)
                ts = candidates(p.c, 1.0, 400)
                i_grid, l_grid = search_vectorized(p, ts, 16, "grid")
                i_h, l_h = search_halving(p, ts, 16)
                best = float(l_grid.min())
                excess = float(l_grid[i_h]) / best - 1 if best > 0 else 0.0
                f_groups += 1
                f_hits += excess <= 1e-3
                f_exact += i_h == i_grid
                worst = max(worst, excess)
                evals += int((~l_h.isnan()).sum())
                grid += len(ts)
        total += f_groups
        hits += f_hits
        exact_hits += f_exact
        rows.append((fam, f_groups, f_hits))
        print(f"| {fam} | {f_groups} | {f_hits} | {f_exact} | {worst:.2%} | {evals / max(grid, 1):.2f} |",
              flush=True)
    print(f"| **all** | {total} | {hits} ({hits / max(total, 1):.1%}) | {exact_hits} | | |")


def big(hidden: int, inter: int, tokens: int, loop_sample: int, n_cand: int, roles: list[str]) -> None:
    from outlierkit.llm.formats import parse_format
    from outlierkit.llm.methods.os_plus import Problem, candidates, search_halving

    torch.manual_seed(0)
    x = torch.randn(1, tokens, hidden)
    x[..., torch.randperm(hidden)[:8]] *= 60  # outlier channels, as in LLaMA-7B's norm outputs
    x[0, 0] *= 20  # a massive-activation token
    wf, af = parse_format("int8-channel"), parse_format("int8-tensor")
    mask = torch.ones(1, tokens, dtype=torch.long)
    print(f"\n### OS+ search speed at LLaMA-7B shapes (hidden {hidden}, intermediate {inter}, {tokens} tokens, "
          f"{n_cand} candidates), 1 CPU thread\n")
    print("| loss | full loop CPU s (measured per candidate x candidates) | halving CPU s | speed-up | "
          "exact evals | halving loss / best loss seen by the loop sample |")
    print("|---|---|---|---|---|---|")
    for role in roles:
        if role == "swiglu":
            weights = [torch.randn(inter, hidden) * 0.02, torch.randn(inter, hidden) * 0.02]
            attn = {"act_fn": torch.nn.SiLU()}
            xin = x
        else:  # down_proj: input is the SwiGLU output (inter wide)
            weights = [torch.randn(hidden, inter) * 0.02]
            attn = {}
            xin = torch.randn(1, tokens, inter)
            xin[..., torch.randperm(inter)[:8]] *= 60
        c = xin.abs().amax((0, 1))
        p0 = Problem([], [mask], [], weights, [None] * len(weights), role, c, wf, af, attn)  # type: ignore[arg-type]
        target = p0.block(xin[None], [w[None] for w in weights], 0)[0]
        p = Problem([xin], [mask], [target], weights, [None] * len(weights), role, c, wf, af, attn)  # type: ignore[arg-type]
        ts = candidates(c, 1.0, n_cand)
        ts = ts[:n_cand]
        sample = torch.linspace(0, len(ts) - 1, loop_sample).round().long()
        t0 = time.process_time()
        l_sample = torch.stack([p.losses(ts[i:i + 1])[0] for i in sample])
        per = (time.process_time() - t0) / loop_sample
        t0 = time.process_time()
        i_h, l_h = search_halving(p, ts, 1)
        t_h = time.process_time() - t0
        n_exact = int((~l_h.isnan()).sum())
        ratio = float(l_h[i_h]) / float(l_sample.min())
        print(f"| {role} | {per * len(ts):.1f} ({per:.2f} x {len(ts)}) | {t_h:.1f} | {per * len(ts) / t_h:.1f}x | "
              f"{n_exact} | {ratio:.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens of the fixtures")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--big-tokens", type=int, default=2048)
    ap.add_argument("--candidates", type=int, default=400)
    ap.add_argument("--loop-sample", type=int, default=3, help="candidates timed for the full loop")
    ap.add_argument("--roles", nargs="+", default=["swiglu", "linear"], choices=["swiglu", "linear"])
    ap.add_argument("--skip-hits", action="store_true")
    ap.add_argument("--skip-big", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if not args.skip_hits:
        hit_rate(args.families, args.seeds, args.tokens, args.seq_len)
    if not args.skip_big:
        big(args.hidden, args.intermediate, args.big_tokens, args.loop_sample, args.candidates, args.roles)


if __name__ == "__main__":
    main()
