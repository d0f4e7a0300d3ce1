"""Speed: real INT8 linear (``Int8Linear``: int8 weights, per-token dynamic activation quantization,
``torch._int_mm``) against the float linear at LLM shapes, measured side by side in one run.

    .venv/bin/python bench/int8_speed.py [--shapes 4096x4096 4096x11008] [--tokens 1 16 256 2048] [--reps 15]

CPU, one thread: fp32 and bf16 ``F.linear``, per-tensor FP8 E4M3 ``torch._scaled_mm`` (where this CPU build
runs it; input quantization included), ``Int8Linear`` (whole forward: activation quantization + int GEMM +
rescale) and the integer GEMM alone, at 1 / 16 / 256 / 2048 tokens. Timings interleave the variants
(A, B, C, A, B, C, ...) and report medians; a ratio X / Int8Linear above 1 means INT8 is faster than X.
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


def _fp8_linear() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Per-tensor scaled FP8 E4M3 GEMM (``torch._scaled_mm``) if this CPU build runs it, else None."""
    try:
        a = torch.ones(32, 32).to(torch.float8_e4m3fn)
        one = torch.ones((), dtype=torch.float32)
        torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None

    def run(x: torch.Tensor, w8_t: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
        sx = x.abs().amax().float().clamp_min(1e-12) / 448.0
        x8 = (x / sx).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, w8_t, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096x4096", "4096x11008"], help="IN x OUT")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 256, 2048])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--big-reps", type=int, default=5, help="repetitions for >= 1024 tokens (default 5)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from outlierkit.llm.int8 import Int8Linear, int8_matmul, int_mm_available, quantize_rows

    fp8 = _fp8_linear()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, _int_mm on cpu: {int_mm_available('cpu')}, "
          f"fp8 _scaled_mm on cpu: {fp8 is not None}")
    print("| shape (in x out) | tokens | fp32 ms | bf16 ms | fp8 ms | Int8Linear ms | int GEMM ms | fp32 / Int8Linear "
          "| bf16 / Int8Linear | fp8 / Int8Linear | bf16 / GEMM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n, bias=False)
        w16 = lin.weight.detach().to(torch.bfloat16)
        q = Int8Linear.from_float(lin, real=True)
        wt = q.weight_int8.t()
        sw8 = lin.weight.detach().abs().amax().float() / 448.0
        w8_t = (lin.weight.detach() / sw8).to(torch.float8_e4m3fn).t()
        for m in args.tokens:
            x = torch.randn(m, k)
            x16 = x.to(torch.bfloat16)
            xq, _ = quantize_rows(x)
            with torch.no_grad():
                fns: dict[str, Callable[[], object]] = {
                    "fp32": lambda x=x, w=lin.weight: F.linear(x, w),
                    "bf16": lambda x=x16, w=w16: F.linear(x, w),
                    "int8": lambda x=x, q=q: q(x),
                    "gemm": lambda xq=xq, wt=wt: int8_matmul(xq, wt)}
                if fp8 is not None:
                    fns["fp8"] = lambda x=x16, w=w8_t, s=sw8, f=fp8: f(x, w, s)
                t = _median_time(fns, args.big_reps if m >= 1024 else args.reps, lambda: None)
            f8 = f"{t['fp8'] * 1e3:.3f}" if "fp8" in t else "n/a"
            r8 = f"{t['fp8'] / t['int8']:.2f}x" if "fp8" in t else "n/a"
            print(f"| {k}x{n} | {m} | {t['fp32'] * 1e3:.3f} | {t['bf16'] * 1e3:.3f} | {f8} | {t['int8'] * 1e3:.3f} | "
                  f"{t['gemm'] * 1e3:.3f} | {t['fp32'] / t['int8']:.2f}x | {t['bf16'] / t['int8']:.2f}x | {r8} | "
                  f"{t['bf16'] / t['gemm']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
