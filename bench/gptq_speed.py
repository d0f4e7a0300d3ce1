"""GPTQ speed: seconds per (R x C) layer, lazy-batched solve vs a straightforward column-by-column loop.

Both variants get the same weight, Hessian and inverse-Hessian factor and must give the same weights; the
script prints the factorization time (shared), each solve's time, their ratio and the largest difference.

    nice -n 10 .venv/bin/python bench/gptq_speed.py --rows 4096 --cols 4096 --tokens 4608
    nice -n 10 .venv/bin/python bench/gptq_speed.py --calib-layers 16 --rows 512 --cols 512   # + calibration
"""

from __future__ import annotations

import argparse
import time

import torch


@torch.no_grad()
def column_loop(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, pins: torch.Tensor, bits: int) -> torch.Tensor:
    """The reference: after each column, update every remaining column at once (no lazy batch)."""
    from outlierkit.llm.formats import int_fake_quant

    W = w.clone()
    Q = torch.zeros_like(W)
    zero = torch.zeros_like(scale[:, 0])
    for j in range(W.shape[1]):
        q = int_fake_quant(W[:, j], scale[:, j], zero, bits, True)
        q = torch.where(torch.isnan(pins[:, j]), q, pins[:, j])
        Q[:, j] = q
        err = (W[:, j] - q) / u[j, j]
        W[:, j:] -= err[:, None] * u[j, j:][None, :]
    return Q


@torch.no_grad()
def calibration(layers: int, hidden: int, samples: int, seq_len: int) -> None:
    """GPTQ on a whole model: each layer on cached inputs (2 layer forwards per layer) vs replaying the model
    from the embeddings for every layer (the reference; L(L+1)/2 layer forwards). Same weights required."""
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.recipe import quantize_

    batches = build_corpus(tokenizer(), load_documents(None), samples=samples, seq_len=seq_len, seed=0).batches(8)
    times, weights = {}, {}
    for cache in (True, False):
        model = tiny_model("llama", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 2,
                           num_attention_heads=8, num_key_value_heads=8)
        rep = quantize_(model, {"weight": "int4-channel", "act": None,
                                "steps": [{"gptq": {"cache_inputs": cache}}]}, batches, baseline=False)
        times[cache] = rep.metrics["time_gptq_s"]  # the GPTQ step only, not quantize_'s report passes
        weights[cache] = {n: p.detach().clone() for n, p in model.named_parameters()}
    diff = max(float((weights[True][n] - w).abs().max()) for n, w in weights[False].items())
    print(f"GPTQ calibration, {layers}-layer LLaMA (hidden {hidden}), {samples} x {seq_len} tokens: "
          f"cached layer inputs "
          f"{times[True]:.1f} s, replay {times[False]:.1f} s, ratio {times[False] / times[True]:.2f}x; "
          f"max weight difference {diff:.2g}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-layers", type=int, default=0,
                   help="also time whole-model GPTQ calibration (cached vs replay) on an N-layer tiny LLaMA")
    p.add_argument("--calib-hidden", type=int, default=256)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4608)
    p.add_argument("--format", default="int4-channel", help="weight format (symmetric int; default int4-channel)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # the build machine's 2 cores are shared
    from outlierkit.llm.formats import IntFormat, parse_format
    from outlierkit.llm.methods.gptq import damped_inverse_factor, gptq_quantize, pin_values, weight_qparams

    if a.calib_layers:
        calibration(a.calib_layers, a.calib_hidden, samples=64, seq_len=128)
    fmt = parse_format(a.format)
    assert isinstance(fmt, IntFormat) and fmt.symmetric, "the reference loop here is written for symmetric formats"
    g = torch.Generator().manual_seed(0)
    r, c, n = a.rows, a.cols, a.tokens
    # activations with a low-rank shared part and a few outlier channels, like an LLM layer input
    x = torch.randn(n, c, generator=g) + torch.randn(n, 32, generator=g) @ torch.randn(32, c, generator=g) / 4
    x[:, :8] *= 30
    w = torch.randn(r, c, generator=g) / c**0.5
    t0 = time.perf_counter()
    h = (x.t() @ x).double() * (2.0 / n)
    t_hess = time.perf_counter() - t0
    t0 = time.perf_counter()
    u = damped_inverse_factor(h, 0.01, "bench").float()
    t_factor = time.perf_counter() - t0
    t0 = time.perf_counter()
    lazy = gptq_quantize(w, h, fmt, block_size=a.block_size)  # includes its own factorization
    t_lazy_total = time.perf_counter() - t0
    t_lazy = t_lazy_total - t_factor
    scale, _ = weight_qparams(w, fmt)
    pins = pin_values(w, fmt, scale, torch.zeros_like(scale))
    t0 = time.perf_counter()
    ref = column_loop(w, u, scale, pins, fmt.bits)
    t_loop = time.perf_counter() - t0
    diff = float((lazy - ref).abs().max())
    step = float(scale.max())
    print(f"layer {r}x{c}, {n} tokens, {fmt.label()}, block {a.block_size}, {torch.get_num_threads()} thread(s)")
    print(f"hessian 2/N X^T X: {t_hess:.2f} s   damped inverse Cholesky factor (float64): {t_factor:.2f} s")
    print(f"solve: lazy batch {t_lazy:.2f} s   column loop {t_loop:.2f} s   ratio {t_loop / t_lazy:.1f}x")
    print(f"per layer (factor + solve): lazy {t_lazy_total:.2f} s   loop {t_factor + t_loop:.2f} s   "
          f"ratio {(t_factor + t_loop) / t_lazy_total:.1f}x")
    print(f"max |lazy - loop| = {diff:.3g} (grid step up to {step:.3g}); "
          f"weights differing by a step: {int(((lazy - ref).abs() > step / 2).sum())} of {r * c}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
