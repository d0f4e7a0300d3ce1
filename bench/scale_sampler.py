"""One masked-diffusion sampler step at LLaDA-8B widths: old vs new code path, batched vs sequential.

Usage:
    python bench/scale_sampler.py [--quick] [--threads 1]

A one-layer LLaMA-architecture model with LLaDA-8B widths (vocab 126,464, hidden 4096, intermediate
12,288, 32 heads; random weights, embeddings tied to the head to halve host memory) produces the logits
of R rows once; then one sampler step (the first step of block 0: every block position masked,
temperature 0.9, low-confidence) runs on them with

- ``old``: the code path before this change (kept below as ``_old_step``): the whole canvas' logits cast
  to fp32, the answer sliced, float64 Gumbel noise drawn per row on the CPU over the whole answer, a
  full-vocabulary softmax over the whole answer;
- ``new``: ``outlierkit.diffusion.sampler.step_scores`` (counter-based noise on the logits' device, only
  the current block's masked positions read and cast to fp32, in memory-bounded chunks);

each ``batched`` (all R rows in one step) and ``sequential`` (one row at a time). Reported: sampler-step
milliseconds per row (the forward excluded; it is the same for both paths and timed separately), and the
step's peak extra memory per row, in MiB and in units of the block's own bf16 logits (b x V x 2 bytes per
row; target <= 1.5). Memory on CPU: each variant runs in a subprocess with glibc's mmap threshold fixed at
64 KiB (so every large buffer is fresh pages), the RSS high-water mark reset through
``/proc/self/clear_refs`` after the logits are loaded, and read from ``/proc/self/status`` (VmHWM) after the
step. On CUDA: ``torch.cuda.max_memory_allocated`` in process. Model dtype: bf16 on CUDA and on CPUs with
native bf16 (AVX512-BF16 / AMX), else fp32 (the script says which).

``run(quick)`` returns the rows as dicts (for ``bench/scale.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VOCAB, HIDDEN, INTER, HEADS = 126_464, 4096, 12_288, 32
MASK_ID = 126_336  # LLaDA's mask token
TEMPERATURE = 0.9


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _sizes(quick: bool) -> dict[str, int]:
    # rows, prompt length, answer length, block length
    return ({"rows": 4, "prompt": 16, "gen": 64, "block": 32} if quick
            else {"rows": 8, "prompt": 32, "gen": 128, "block": 32})


def _make_logits(sz: dict[str, int], device: Any, dtype: Any) -> tuple[Any, float]:
    """Logits (R, P + G, V) of a one-layer LLaDA-width model on a canvas whose answer is all masks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=1,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 126_000, (sz["rows"], sz["prompt"]), generator=g)
    x = torch.cat([prompt, torch.full((sz["rows"], sz["gen"]), MASK_ID)], 1).to(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        logits = model(x).logits  # (R, P + G, V)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    del model
    return logits, seconds


# ------------------------------------------------------------------------------ the old code path (copy)


def _old_candidates(logits: Any, temperature: float, gens: list[Any]) -> Any:
    """The pre-change ``_candidates``: float64 Gumbel noise per row, drawn on the CPU, copied over."""
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    out = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
    for r, g in enumerate(gens):
        u = torch.rand(logits.shape[1:], generator=g, dtype=torch.float64)  # (G, V), on CPU
        u = u.clamp_min(1e-300).to(logits.device)
        out[r] = (logits[r].double() - temperature * torch.log(-torch.log(u))).argmax(-1)
    return out


def _old_step(logits_full: Any, x: Any, P: int, block: int, seeds: list[int]) -> Any:
    """The pre-change step body of ``generate`` (low confidence, first step of block 0)."""
    import torch

    G = x.shape[1] - P
    logits = logits_full.float()[:, P:].contiguous()  # (B, G, V): the whole canvas went to fp32
    logits[..., MASK_ID] = -torch.inf
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    cand = _old_candidates(logits, TEMPERATURE, gens)
    probs = torch.softmax(logits, dim=-1)  # (B, G, V)
    score = probs.gather(-1, cand.unsqueeze(-1)).squeeze(-1)
    pos = torch.arange(G, device=x.device)
    masked = x[:, P:] == MASK_ID
    score = torch.where(masked & (pos < block), score, torch.full_like(score, -torch.inf))
    top = score.topk(2, dim=1).indices  # 2 tokens per step, as LLaDA 256/128
    return cand.gather(1, top)


def _new_step(logits_full: Any, x: Any, P: int, block: int, seeds: list[int]) -> Any:
    """The current step body of ``generate`` (low confidence, first step of block 0)."""
    import torch

    from outlierkit.diffusion.sampler import REMASKING, SamplerConfig, TokenSpec, step_scores

    B, G = x.shape[0], x.shape[1] - P
    cfg = SamplerConfig(gen_length=G, steps=G // 2, block_length=block, temperature=TEMPERATURE)
    pos = torch.arange(G, device=x.device)
    live = (x[:, P:] == MASK_ID) & (pos < block)
    rows, cols = live.nonzero(as_tuple=True)
    seed_t = torch.tensor(seeds, dtype=torch.long, device=x.device)
    stop = torch.zeros(0, dtype=torch.long, device=x.device)
    cand, score = step_scores(logits_full, rows, cols, P, cfg, TokenSpec(mask_id=MASK_ID), stop, seed_t,
                              torch.zeros(B, dtype=torch.long, device=x.device), 0,
                              [REMASKING.get("low_confidence")])
    full = torch.full((B, G), -torch.inf, device=x.device)
    full[rows, cols] = score
    top = full.topk(2, dim=1).indices
    cand_full = torch.zeros(B, G, dtype=torch.long, device=x.device)
    cand_full[rows, cols] = cand
    return cand_full.gather(1, top)


# ---------------------------------------------------------------------------------------- measuring


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _measure(path: str, mode: str, logits: Any, P: int, block: int) -> dict[str, float]:
    """Time (s) and peak extra memory (bytes) of one step over all rows, batched or one row at a time."""
    import torch

    fn = _old_step if path == "old" else _new_step
    R = logits.shape[0]
    dev = logits.device
    x = torch.cat([torch.zeros(R, P, dtype=torch.long, device=dev),
                   torch.full((R, logits.shape[1] - P), MASK_ID, dtype=torch.long, device=dev)], 1)
    seeds = list(range(R))
    parts = [slice(0, R)] if mode == "batched" else [slice(r, r + 1) for r in range(R)]
    fn(logits[:1], x[:1], P, block, seeds[:1])  # warm-up (kernels, allocator, lazy imports)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the RSS high-water mark
        base = _vm("VmRSS")
    t0 = time.perf_counter()
    for sl in parts:
        fn(logits[sl], x[sl], P, block, seeds[sl])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda" else _vm("VmHWM")) - base
    return {"seconds": seconds, "peak_bytes": float(max(0, peak))}


def _child(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    logits = torch.load(args.logits, weights_only=True)
    print(json.dumps(_measure(args.path, args.mode, logits, args.prompt_len, args.block)))
    return 0


def run(quick: bool = True, threads: int = 1) -> list[dict[str, Any]]:
    """Measure old/new x batched/sequential; one dict per variant plus one per ratio."""
    import torch

    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if (cuda or _cpu_has_bf16()) else torch.float32
    sz = _sizes(quick)
    R, P, G, b = sz["rows"], sz["prompt"], sz["gen"], sz["block"]
    logits, fwd = _make_logits(sz, device, dtype)
    block_bf16 = b * VOCAB * 2  # the block's own bf16 logits, per row
    common = {"bench": "sampler_step", "device": device.type, "model_dtype": str(dtype).replace("torch.", ""),
              "rows": R, "prompt": P, "gen": G, "block": b, "vocab": VOCAB, "hidden": HIDDEN,
              "forward_s_per_row": fwd / R}
    out: list[dict[str, Any]] = []
    res: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not cuda:
            lpath = Path(tmp) / "logits.pt"
            torch.save(logits, lpath)
            del logits
        for path in ("old", "new"):
            for mode in ("batched", "sequential"):
                if cuda:
                    m = _measure(path, mode, logits, P, b)
                else:
                    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
                    cmd = [sys.executable, __file__, "--child", "--path", path, "--mode", mode, "--logits",
                           str(lpath), "--prompt-len", str(P), "--block", str(b), "--threads", str(threads)]
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                    m = json.loads(proc.stdout.strip().splitlines()[-1])
                res[(path, mode)] = m
                per_row_peak = m["peak_bytes"] / (R if mode == "batched" else 1)
                out.append({**common, "path": path, "mode": mode, "ms_per_row": 1e3 * m["seconds"] / R,
                            "peak_mib_per_row": per_row_peak / 2**20,
                            "peak_over_block_bf16": per_row_peak / block_bf16})
    for mode in ("batched", "sequential"):
        o, n = res[("old", mode)], res[("new", mode)]
        out.append({**common, "path": "old/new", "mode": mode, "time_ratio": o["seconds"] / n["seconds"],
                    "memory_ratio": o["peak_bytes"] / max(1.0, n["peak_bytes"])})
    for path in ("old", "new"):
        s_, b_ = res[(path, "sequential")], res[(path, "batched")]
        out.append({**common, "path": path, "mode": "sequential/batched", "time_ratio": s_["seconds"] / b_["seconds"]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4 rows, 16 + 64 positions (default: 8 rows, 32 + 128)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="new", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="batched", help=argparse.SUPPRESS)
    ap.add_argument("--logits", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prompt-len", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--block", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)
    rows = run(args.quick, args.threads)
    c = rows[0]
    print(f"one sampler step, {c['device']}, model dtype {c['model_dtype']}"
          f"{'' if c['model_dtype'] == 'bfloat16' else ' (this CPU has no native bf16)'}: {c['rows']} rows, "
          f"prompt {c['prompt']} + answer {c['gen']}, block {c['block']}, vocab {c['vocab']}, hidden {c['hidden']}, "
          f"one layer; forward {c['forward_s_per_row']:.2f} s/row (not in the step times)")
    print(f"{'path':<8} {'mode':<19} {'ms/row':>9} {'peak MiB/row':>13} {'x block bf16':>13}")
    for r in rows:
        if "ms_per_row" in r:
            print(f"{r['path']:<8} {r['mode']:<19} {r['ms_per_row']:>9.1f} {r['peak_mib_per_row']:>13.1f} "
                  f"{r['peak_over_block_bf16']:>13.2f}")
    for r in rows:
        if "time_ratio" in r:
            extra = f", memory {r['memory_ratio']:.1f}x" if "memory_ratio" in r else ""
            print(f"ratio {r['path']} {r['mode']}: time {r['time_ratio']:.2f}x{extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
