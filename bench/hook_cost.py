"""Cost of one profiler hook update, with and without the INT8 check, at 7B widths (no model forward).

    python bench/hook_cost.py [--tokens 512] [--channels 4096 11008] [--repeats 15] [--stride 8]

Times ``Collector._record`` on a random ``(1, tokens, C)`` fp32 activation (the median of ``--repeats``
calls after a warm-up), for the default statistics alone and with the two INT8 thresholds, in one run;
the difference is what the INT8 check costs per hook.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

os.environ.setdefault("OUTLIERKIT_QUIET", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--channels", type=int, nargs="+", default=[4096, 11008])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--stride", type=int, default=8, help="hist_stride (8: default level; 1: exact)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from outlierkit.llm.corpus import Batch
    from outlierkit.llm.fixtures import tiny_model
    from outlierkit.llm.models import resolve
    from outlierkit.llm.profile import Collector, Site

    model = tiny_model("llama")
    mm = resolve(model)
    print(f"# bench/hook_cost.py: {args.tokens} tokens, hist_stride {args.stride}, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print("| channels | statistics (ms) | + INT8 check (ms) | INT8 check alone (ms) | INT8 share of the hook |")
    print("|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for c in args.channels:
        x = torch.randn(1, args.tokens, c, generator=g)
        times = {}
        for int8 in (False, True):
            site = Site("s", "down_in", 0, "model.norm")
            col = Collector(model, mm, [site], hist_stride=args.stride)
            if int8:
                col.thresholds = {"s": {"absmax": 3.0, "p99.9": 2.0}}
            ones = torch.ones(1, args.tokens, dtype=torch.long)
            col.begin_batch(Batch(ones, ones, [0]))
            col._record(site, x)  # warm-up: index chunks and accumulators are built lazily
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                col._record(site, x)
                ts.append(time.perf_counter() - t0)
            times[int8] = statistics.median(ts)
        extra = times[True] - times[False]
        print(f"| {c} | {times[False] * 1e3:.1f} | {times[True] * 1e3:.1f} | {extra * 1e3:.1f} | "
              f"{extra / times[True]:.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
