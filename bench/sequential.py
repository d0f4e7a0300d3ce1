"""Sequential (layer-by-layer) execution against all-at-once, measured side by side in one run.

    python bench/sequential.py [--model tinylm] [--device cpu|cuda] [--samples 32] [--seq-len 128] [--repeats 3]

For each pass (the float outputs over the calibration batches, held-out perplexity, a profile at the default
level with the INT8 check, and ``quantize_`` with SmoothQuant + static W8A8 and its report), each repeat times
the all-at-once run and the ``layerwise`` run back to back on the same data (a paired ratio), and checks
that they agree. Also counted: how often each decoder layer is moved to the compute device (once per
layer-wise pass over all batches is the design, so this is the number of passes the step makes; moving per
batch would multiply it by the number of batches) and the largest number of layers on the device at once.
With ``--device cpu`` the model's home is the compute device, so moves are free and the ratio is the cost of
the layer-major bookkeeping (caching every batch's hidden states, replaying the head); on a GPU with the
model in CPU memory it includes the host-to-device weight traffic.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Any

import torch

os.environ.setdefault("OUTLIERKIT_QUIET", "1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tinylm")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from outlierkit.llm import sequential
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.evaluate import calibration_half, held_out, window_nll
    from outlierkit.llm.models import load_model
    from outlierkit.llm.profile import ProfileOptions, profile_model
    from outlierkit.llm.recipe import model_outputs, quantize_

    lm = load_model(args.model, device="cpu")
    docs = load_documents(None)
    calib = build_corpus(lm.tokenizer, calibration_half(docs), samples=args.samples, seq_len=args.seq_len, seed=0)
    batches = calib.batches(args.batch_size)
    held = held_out(docs)
    recipe = {"weight": "int8-channel", "act": "int8-tensor-static", "steps": ["smoothquant", "rtn"],
              "calib": {"min_tokens": 1}}
    layers = [sequential.get_attr(lm.model, n) for n in lm.map.layers]
    moves = {"n": 0, "on": 0, "max_on": 0}
    parity: dict[int, int] = {}
    layer_type = type(layers[0])
    real_move = sequential._move_
    dev = torch.device(args.device)

    def counting_move(module: torch.nn.Module, device: Any, skip: Any = None) -> None:
        if type(module) is layer_type and not (skip and id(module) in skip):  # also the layers of copies
            # a layer goes to the device, then back home (on CPU both are the CPU): odd moves bring it in
            moves["n"] += 1
            parity[id(module)] = parity.get(id(module), 0) + 1
            moves["on"] += 1 if parity[id(module)] % 2 else -1
            moves["max_on"] = max(moves["max_on"], moves["on"])
        real_move(module, device, skip)

    sequential._move_ = counting_move

    def outputs(m: torch.nn.Module) -> Any:
        return model_outputs(m, batches)

    def ppl(m: torch.nn.Module) -> Any:
        return window_nll(m, lm.tokenizer, held, window=args.seq_len, max_windows=16)[0]

    def profile(m: torch.nn.Module) -> Any:
        return profile_model(m, lm.map, calib, ProfileOptions(batch_size=args.batch_size)).global_max()

    def quantize(m: torch.nn.Module) -> Any:
        m = copy.deepcopy(m)
        return quantize_(m, recipe, batches, sequential=sequential.layerwise_device(m) is not None,
                         device=args.device).metrics["output_sqnr_db"]

    print(f"# bench/sequential.py: {lm.name} ({len(layers)} layers), {args.samples} samples x <= {args.seq_len} "
          f"tokens, batch {args.batch_size}, compute device {dev}, {args.threads} thread(s), "
          f"{args.repeats} paired repeat(s)")
    print("| pass | all at once (s) | layer by layer (s) | ratio (median, min-max) | layer moves to the device "
          "(per layer) | most layers on the device at once | same result |")
    print("|---|---|---|---|---|---|---|")
    for name, fn in (("float outputs", outputs), ("perplexity (16 windows)", ppl),
                     ("profile, default + INT8", profile), ("quantize_ smoothquant W8A8-static + report", quantize)):
        ratios, ta, tb = [], [], []
        same = True
        moves.update(n=0, on=0, max_on=0)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            a = fn(lm.model)
            t1 = time.perf_counter()
            with sequential.layerwise(lm.model, dev):
                b = fn(lm.model)
            t2 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            ta.append(t1 - t0)
            tb.append(t2 - t1)
            same &= _close(a, b)
        n_moves = moves["n"] // 2  # to the device and back
        print(f"| {name} | {statistics.median(ta):.2f} | {statistics.median(tb):.2f} | "
              f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{n_moves / len(layers) / args.repeats:.1f} | {moves['max_on']} | {same} |", flush=True)
    sequential._move_ = real_move
    return 0


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, list):
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4))
    if isinstance(a, tuple):
        return all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return bool(a == b)


if __name__ == "__main__":
    raise SystemExit(main())
