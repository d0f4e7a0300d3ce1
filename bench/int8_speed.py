"""Speed: real INT8 linear (``Int8Linear``: int8 weights, per-token dynamic activation quantization,
``torch._int_mm``) against the float linear at LLM shapes, measured side by side in one run.

    .venv/bin/python bench/int8_speed.py [--shapes 4096x4096 4096x11008] [--tokens 1 16 256] [--reps 20]

CPU: fp32 ``F.linear`` vs ``Int8Linear`` (whole forward: activation quantization + int GEMM + rescale) and
vs the integer GEMM alone; one thread. GPU (only when CUDA is present): bf16 ``F.linear`` vs the same.
Timings interleave the variants (A, B, C, A, B, C, ...) and report medians; the ratio is float / int8.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F


def _median_time(fns: dict[str, Callable[[], object]], reps: int, sync: Callable[[], None]) -> dict[str, float]:
    for f in fns.values():  # warm-up
        f()
        f()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="IN x OUT")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from outlierkit.llm.int8 import Int8Linear, int8_matmul, int_mm_available, quantize_rows

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, _int_mm on cpu: {int_mm_available('cpu')}")
    print("| device | shape (in x out) | tokens | float ms | Int8Linear ms | int GEMM only ms | float / Int8Linear "
          "| float / GEMM | weight MB float -> int8 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dev in devices:
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        fdt = torch.bfloat16 if dev == "cuda" else torch.float32
        for shape in args.shapes:
            k, n = (int(v) for v in shape.lower().split("x"))
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, n, bias=False).to(dev, fdt)
            q = Int8Linear.from_float(lin, real=True)
            w_mb = lin.weight.numel() * lin.weight.element_size() / 2**20
            q_mb = (q.weight_int8.numel() + 4 * q.weight_scale.numel()) / 2**20
            wt = q.weight_int8.t()
            for m in args.tokens:
                x = torch.randn(m, k, device=dev, dtype=fdt)
                xq, _ = quantize_rows(x)
                with torch.no_grad():
                    fns: dict[str, Callable[[], object]] = {
                        "float": lambda x=x, w=lin.weight: F.linear(x, w),
                        "int8": lambda x=x, q=q: q(x),
                        "gemm": lambda xq=xq, wt=wt: int8_matmul(xq, wt)}
                    t = _median_time(fns, args.reps, sync)
                print(f"| {dev} ({str(fdt).split('.')[-1]}) | {k}x{n} | {m} | {t['float'] * 1e3:.3f} | "
                      f"{t['int8'] * 1e3:.3f} | {t['gemm'] * 1e3:.3f} | {t['float'] / t['int8']:.2f}x | "
                      f"{t['float'] / t['gemm']:.2f}x | {w_mb:.1f} -> {q_mb:.1f} |", flush=True)
    if len(devices) == 1:
        print("\n(no CUDA device here: the bf16 GPU comparison was not run)")


if __name__ == "__main__":
    main()
