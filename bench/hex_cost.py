"""HEX cost: k schedules batched in one decode vs one decode vs k sequential decodes, timed side by side.

Usage:
    python bench/hex_cost.py [--prompts 128] [--schedules 2,4,6,12,24] [--repeats 3] [--threads 1]
        [--model DIR | --random-size d_model,n_layers]

Each variant decodes the same prompts with equal steps; the table gives median wall seconds and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="tiny checkpoint dir (default: bundled)")
    ap.add_argument("--random-size", default=None,
                    help="time an untrained TinyMDM of this size instead, e.g. 256,6 (d_model,n_layers)")
    ap.add_argument("--prompts", type=int, default=128)
    ap.add_argument("--schedules", default="2,4,6,12,24")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=None,
                    help="also time HEX batched in chunks of this many rows per forward (default: --prompts)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from outlierkit.diffusion.hex import HexConfig, decode_paths
    from outlierkit.diffusion.sampler import SamplerConfig, generate
    from outlierkit.diffusion.tiny import TINY_TOKENS, TinyConfig, TinyMDM, decode, load_tiny

    model, task, _ = load_tiny(args.model)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    label = f"tiny {task.name} model {args.model or '(bundled)'} ({n_params:.2f}M params)"
    if args.random_size:
        d, L = (int(v) for v in args.random_size.split(","))
        torch.manual_seed(0)
        model = TinyMDM(TinyConfig(d_model=d, n_layers=L, n_heads=max(1, d // 64), d_ff=4 * d)).eval()
        label = f"random TinyMDM d={d} L={L} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    prompts = [list(p.prompt_ids) for p in task.heldout(args.prompts, seed=99)]
    ids = torch.tensor(prompts)
    blocks = [int(b) for b in args.schedules.split(",")]
    k = len(blocks)
    G = task.gen_length
    hc = HexConfig(schedules=tuple(args.schedules.split(",")), seeds_per_block=1, temperature=0.9,
                   gen_length=G, steps=args.steps, extractor="after_hash", batch_rows=10**9)

    def one() -> None:
        generate(model, ids, TINY_TOKENS, SamplerConfig(gen_length=G, steps=args.steps, block_length=blocks[0],
                                                         temperature=0.9), seeds=list(range(len(ids))))

    def sequential() -> None:
        for b in blocks:
            generate(model, ids, TINY_TOKENS, SamplerConfig(gen_length=G, steps=args.steps, block_length=b,
                                                             temperature=0.9), seeds=list(range(len(ids))))

    def batched() -> None:
        decode_paths(model, prompts, TINY_TOKENS, hc, decode)

    chunk = args.chunk or len(ids)

    def chunked() -> None:
        decode_paths(model, prompts, TINY_TOKENS, replace(hc, batch_rows=chunk), decode)

    names = ["one decode", f"{k} sequential decodes", f"HEX k={k} batched", f"HEX k={k} batched, {chunk}-row chunks"]
    times: dict[str, list[float]] = {n: [] for n in names}
    fns = list(zip(names, (one, sequential, batched, chunked), strict=True))
    one()  # warm-up
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, fn in fns:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    base = med["one decode"]
    seq = med[f"{k} sequential decodes"]
    print(f"## HEX cost: {label}, {len(ids)} prompts, gen {G}, {args.steps} steps, schedules {blocks}, "
          f"{args.threads} thread(s), median of {args.repeats}\n")
    print("| variant | rows per forward | forwards | wall s (median) | vs one decode | vs k sequential |")
    print("|---|---|---|---|---|---|")
    n_chunks = -(-k * len(ids) // chunk)
    rows = {names[0]: (len(ids), args.steps), names[1]: (len(ids), k * args.steps),
            names[2]: (k * len(ids), args.steps), names[3]: (min(chunk, k * len(ids)), n_chunks * args.steps)}
    for n, v in med.items():
        print(f"| {n} | {rows[n][0]} | {rows[n][1]} | {v:.3f} | {v / base:.2f}x | {v / seq:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
