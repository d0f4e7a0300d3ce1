"""HEX quality on the tiny parity-chain testbed: each schedule, same-compute single-schedule votes, HEX(k, s).

Usage:
    python bench/hex_quality.py --out runs/hex_quality [--n 1000] [--steps 12] [--schedules 2,4,6,12,24]
        [--seeds-per-block 10] [--ks 3,5] [--hex-seeds 1,2] [--threads 1] [--model DIR] [--dev 0]

With ``--dev N`` the best single schedule is chosen on N separate held-out problems and every figure is
reported on the ``--n`` test problems only.

Prints Markdown tables (paste into BENCHMARKS.md) and writes report.json/report.md/accuracy.png to --out.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="tiny checkpoint dir (default: bundled)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--dev", type=int, default=0, help="dev problems for choosing the best single (default: 0)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--schedules", default="2,4,6,12,24")
    ap.add_argument("--seeds-per-block", type=int, default=10)
    ap.add_argument("--ks", default="3,5")
    ap.add_argument("--hex-seeds", default="1,2")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--baselines", default="topk_margin,random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from outlierkit._utils import staged_output
    from outlierkit.diffusion.cli import _plot_eval
    from outlierkit.diffusion.hex import EvalConfig, HexConfig, evaluate_hex
    from outlierkit.diffusion.tiny import TINY_TOKENS, decode, load_tiny
    from outlierkit.report import markdown_table

    model, task, meta = load_tiny(args.model)
    probs = task.heldout(args.dev + args.n)  # the first --dev are the dev split
    hc = HexConfig(schedules=tuple(args.schedules.split(",")), seeds_per_block=args.seeds_per_block,
                   temperature=args.temperature, gen_length=task.gen_length, steps=args.steps,
                   extractor="after_hash", seed=args.seed, batch_rows=256)
    cfg = EvalConfig(hex=hc, ks=tuple(int(k) for k in args.ks.split(",")),
                     seeds_per_schedule=tuple(int(s) for s in args.hex_seeds.split(",")),
                     baselines=tuple(b for b in args.baselines.split(",") if b), dev_size=args.dev)
    t0 = time.perf_counter()
    rep = evaluate_hex(model, [list(p.prompt_ids) for p in probs], [p.answer for p in probs], TINY_TOKENS, cfg,
                       decode, max_context=model.config.max_len)
    rep.kind = "diffusion.bench_hex_quality"
    rep.metrics["wall_seconds"] = time.perf_counter() - t0
    rep.metrics["threads"] = args.threads
    rep.config["checkpoint_meta"] = meta
    rep.config["command"] = "python bench/hex_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    with staged_output(args.out, force=args.force) as stage:
        _plot_eval(rep, stage)
        rep.save(stage)
    tok_per_step = task.gen_length // args.steps
    print(f"## HEX quality: tiny {task.name}, n={args.n} held-out test (+{args.dev} dev), "
          f"gen {task.gen_length}, {args.steps} steps "
          f"({tok_per_step} tokens/step), T={args.temperature}, {args.threads} thread(s), "
          f"{rep.metrics['wall_seconds']:.0f} s\n")
    print("### Each schedule (accuracy %)\n")
    print(markdown_table(rep.tables["schedules"]))
    print("### HEX(k schedules x s seeds) vs the best single schedule with the same number of paths\n")
    print(markdown_table(rep.tables["hex"]))
    print("### Jaccard overlap of greedy error sets\n")
    print(markdown_table(rep.tables["greedy_error_jaccard"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
