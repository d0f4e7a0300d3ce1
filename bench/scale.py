"""Profiler at 7B / 70B widths: overhead per level against a bare forward, peak extra memory per hook, host
reads per batch, measured side by side in one run (and the sampler's scale bench when present).

    python bench/scale.py [--quick] [--device cpu|cuda] [--tokens 2048 8192] [--repeats 3]

Models: one LLaMA layer at 7B widths (hidden 4096, intermediate 11008, 32 heads) and one at 70B widths
(8192 / 28672, 64 heads, GQA with 8 KV heads), random weights, bf16 on a GPU. On a CPU without bf16 matrix
units (this machine: a 256-token bf16 linear of 7B width takes 47 s) the layers run in fp32 and at fewer
tokens; the profiler's cost per token and channel does not depend on the token count, the forward's
neither (attention aside), so the ratio is representative, and the script prints what it ran.

Per level (basic, default, default+INT8, full), each repeat times a bare forward of the same batch and the
profiled forward (hooks, the statistics and the end-of-batch bookkeeping) back to back: the ratio is paired.
Memory: the peak of the bytes each hook allocates while it runs (tracked per allocation on CPU with a
TorchDispatchMode, ``max_memory_allocated`` on a GPU), in units of the hook's own activation and of the
largest activation of the layer (the MLP intermediate). Host reads: device-to-host reads per batch
(``.item``/``.tolist``/``.cpu``/``float()``/``nonzero``/``unique``/``bincount``/bool or 0-d indexing ...),
counted with a TorchFunctionMode during the profiled forward, minus those of the bare forward (the model's own).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("OUTLIERKIT_QUIET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

WIDTHS = {"7B": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
          "70B": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)}
_READS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "nonzero",
          "argwhere", "unique", "unique_consecutive", "bincount", "masked_select"}


class HostReads(TorchFunctionMode):
    """Counts calls that read a device value on the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        hit = name in _READS
        if name == "repeat_interleave":
            hit = isinstance(args[1] if len(args) > 1 else (kwargs or {}).get("repeats"), torch.Tensor)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(isinstance(i, torch.Tensor) and (i.dtype == torch.bool or i.dim() == 0) for i in idx)
        self.count += hit
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors allocated (and alive) while active, on CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and all(r.alias_info is None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    n = t.untyped_storage().nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, n)
        return out

    def _free(self, n: int) -> None:
        self.live -= n


def build(width: str, dtype: torch.dtype, device: torch.device, tokens: int) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=1, vocab_size=4096, max_position_embeddings=max(tokens, 2048),
                      **WIDTHS[width])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    with torch.no_grad():  # a planted outlier channel in the residual stream, as real models have
        model.model.embed_tokens.weight[:, 7] *= 200
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(width: str, tokens: int, repeats: int, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    from outlierkit._utils.hooks import HookSet
    from outlierkit.llm.corpus import Batch
    from outlierkit.llm.models import resolve
    from outlierkit.llm.profile import Collector, _base_model, discover_sites, int8_thresholds

    model = build(width, dtype, device, tokens)
    mm = resolve(model)
    runner = _base_model(model, mm)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 4096, (1, tokens), generator=g)
    batch = Batch(ids, torch.ones_like(ids), [0])
    inputs = {"input_ids": ids.to(device), "attention_mask": batch.attention_mask.to(device)}
    largest = tokens * WIDTHS[width]["intermediate_size"] * torch.finfo(dtype).bits // 8

    def bare() -> None:
        with torch.no_grad():
            runner(**inputs)

    configs = {"basic": ("basic", False), "default": ("default", False), "default+INT8": ("default", True),
               "full": ("full", False)}
    collectors = {}
    for name, (level, int8) in configs.items():
        col = Collector(model, mm, discover_sites(model, mm, level), level=level, hist_stride=1 if level == "full"
                        else 8)
        if int8:  # thresholds calibrated on this batch (what the evaluation split then runs with)
            with HookSet() as hooks, torch.no_grad():
                col.attach(hooks)
                col.begin_batch(batch)
                runner(**inputs)
                col.end_batch()
            col.flush()
            col.thresholds = int8_thresholds(col.stats)
            col.stats.clear()
            col.int8.clear()
        collectors[name] = col

    def profiled(col: Collector, count: HostReads | None = None) -> None:
        with HookSet() as hooks, torch.no_grad():
            col.attach(hooks)
            col.begin_batch(batch)  # host work on the host mask (not counted)
            if count is not None:
                with count:
                    runner(**inputs)
                    col.end_batch()
            else:
                runner(**inputs)
                col.end_batch()

    bare()  # warm-up
    bare_reads = HostReads()
    with bare_reads:
        bare()
    rows = []
    for name, col in collectors.items():
        ratios, t_bare = [], []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            bare()
            sync(device)
            t1 = time.perf_counter()
            profiled(col)
            sync(device)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            t_bare.append(t1 - t0)
        reads = HostReads()
        profiled(col, reads)
        # peak extra memory of each hook while it runs
        peaks: list[tuple[int, int]] = []
        real = col._record

        def record(site: Any, x: torch.Tensor, real: Any = real, peaks: list[tuple[int, int]] = peaks) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                real(site, x)
                peaks.append((torch.cuda.max_memory_allocated() - base, x.numel() * x.element_size()))
            else:
                with LiveBytes() as mem:
                    real(site, x)
                peaks.append((mem.peak, x.numel() * x.element_size()))

        col._record = record  # type: ignore[method-assign]
        profiled(col)
        del col._record
        col.flush()
        rows.append({"width": width, "tokens": tokens, "dtype": str(dtype).replace("torch.", ""),
                     "level": name, "sites": len(col.sites), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "bare_s": statistics.median(t_bare),
                     "peak_per_hook_x_own": max(p / a for p, a in peaks),
                     "peak_per_hook_x_largest": max(p for p, _ in peaks) / largest,
                     "host_reads_per_batch": reads.count - bare_reads.count})
    del model, collectors
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="7B width only, few tokens, 1 repeat (about a minute)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=None,
                    help="tokens per batch (default: 2048 8192 on a GPU; on CPU 256 at 7B width, 128 at 70B)")
    ap.add_argument("--repeats", type=int, default=None, help="paired repeats (default: 5 GPU, 2 CPU)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--widths", nargs="+", default=None, choices=sorted(WIDTHS))
    ap.add_argument("--no-sampler", action="store_true", help="skip bench/scale_sampler.py")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    widths = args.widths or (["7B"] if args.quick else ["7B", "70B"])
    repeats = args.repeats or (1 if args.quick else 5 if gpu else 2)
    print(f"# bench/scale.py: device {device}, {dtype}, {args.threads} thread(s), {repeats} paired repeat(s)"
          + ("" if gpu else "; CPU: fp32 and fewer tokens (bf16 matmuls are ~50x slower here)"))
    cols = ["width", "tokens", "dtype", "level", "sites", "ratio", "ratio_min", "ratio_max", "bare_s",
            "peak_per_hook_x_own", "peak_per_hook_x_largest", "host_reads_per_batch"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols), flush=True)
    for width in widths:
        tokens = args.tokens or ([128] if args.quick else [2048, 8192] if gpu else [256] if width == "7B"
                                 else [128])
        for t in tokens:
            for r in measure(width, t, repeats, device, dtype):  # printed as measured
                print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols)
                      + " |", flush=True)
    if not args.no_sampler:
        try:
            import scale_sampler
        except ImportError as e:
            print(f"# sampler scale bench not run: bench/scale_sampler.py is not importable ({e})")
        else:
            srows = scale_sampler.run(quick=args.quick, threads=args.threads)
            keys = list(dict.fromkeys(k for r in srows for k in r))
            print("\n# sampler step (bench/scale_sampler.py)")
            print("| " + " | ".join(keys) + " |")
            print("|" + "---|" * len(keys))
            for r in srows:
                print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, ""))
                                        for k in keys) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
