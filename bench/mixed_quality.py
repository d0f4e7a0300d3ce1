"""Quality: spike-aware mixed precision, LLM.int8() and the planner against uniform recipes.

    .venv/bin/python bench/mixed_quality.py [--model minilm|llama|...] [--act int8-tensor] [--max-loss X]

One model per run: the bundled MiniLM (real weights; metric: embedding cosine / neighbour agreement) or a
tiny causal fixture (random weights with planted outlier channels and a residual spike; metric: next-token
agreement with the float model and logit SQNR; its perplexity is about the vocabulary size, so relative
perplexity says little). Every recipe runs on a fresh copy of the same float model, calibrated on one half
of the built-in corpus and evaluated on the other half. "float layers" counts block linears kept in float,
"fp8 layers" those kept in FP8; the planner's target is --max-loss in the model's metric.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

W8 = "int8-channel"


def recipes(act: str, weight: str) -> list[tuple[str, dict[str, Any]]]:
    base = {"weight": weight, "act": act}
    sq = {"smoothquant": {"folds": ["norm", "attn_v"]}}
    return [
        ("float", {"weight": None, "act": None, "steps": ["rtn"]}),
        ("RTN", {**base, "steps": ["rtn"]}),
        ("SmoothQuant", {**base, "steps": [sq, "rtn"]}),
        ("OS+", {**base, "steps": [{"os_plus": {}}, "rtn"]}),
        ("spike_mp (float/BF16 spikes)", {**base, "steps": [{"spike_mp": {}}]}),
        ("spike_mp (FP8 E4M3 spikes)", {**base, "steps": [{"spike_mp": {"keep": "fp8"}}]}),
        ("spike_mp (FP8 E5M2 cast)", {**base, "steps": [{"spike_mp": {"keep": "fp8-e5m2"}}]}),
        ("spike_mp random ablation", {**base, "steps": [{"spike_mp": {"select": "random", "seed": 0}}]}),
        ("SmoothQuant + spike_mp", {**base, "steps": [sq, {"spike_mp": {}}]}),
        ("LLM.int8() (t=6, real INT8)", {"steps": [{"llm_int8": {}}]}),
    ]


def count_layers(model: torch.nn.Module) -> dict[str, int]:
    from outlierkit.llm.formats import FP8Format
    from outlierkit.llm.int8 import Int8Linear
    from outlierkit.llm.layers import QuantLinear

    out = {"float": 0, "fp8": 0, "outlier_cols": 0}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if m.is_float:
                out["float"] += 1
            elif isinstance(m.weight_format, FP8Format):
                out["fp8"] += 1
        if isinstance(m, Int8Linear):
            out["outlier_cols"] = max(out["outlier_cols"], m.last_outlier_columns)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", help="minilm or a tiny fixture family (llama, opt, ...)")
    ap.add_argument("--act", default="int8-tensor", help="activation format (headline: per-tensor dynamic)")
    ap.add_argument("--weight", default=W8)
    ap.add_argument("--max-loss", type=float, default=None, help="planner target (minilm 0.002, fixtures 0.05)")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-plan", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from outlierkit._utils.seed import seed_everything
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.evaluate import EvalData, evaluate_model, split_documents
    from outlierkit.llm.formats import parse_format
    from outlierkit.llm.models import resolve
    from outlierkit.llm.plan import Planner, PlanTarget, quality_loss
    from outlierkit.llm.recipe import CalibConfig, Recipe, quantize_

    seed_everything(0)
    if args.model == "minilm":
        from outlierkit.llm.models import load_model

        lm = load_model("minilm")
        model, tok = lm.model, lm.tokenizer
    else:
        from outlierkit.llm.fixtures import tiny_model, tokenizer

        model, tok = tiny_model(args.model), tokenizer()
    mm = resolve(model, warn=False)
    causal = mm.spec.causal
    metric = "top1" if causal else "cos"
    max_loss = args.max_loss if args.max_loss is not None else (0.05 if causal else 0.002)
    cal_docs, held_docs = split_documents(load_documents(None))
    max_len = getattr(model.config, "max_position_embeddings", None)
    calib = build_corpus(tok, cal_docs, samples=args.calib_samples, seq_len=args.seq_len, seed=0, max_length=max_len)
    held = build_corpus(tok, held_docs, samples=args.samples, seq_len=args.seq_len, seed=1, max_length=max_len)
    cb = calib.batches(8)
    ev = EvalData(held.batches(8), held_docs, causal=causal, window=args.seq_len, max_windows=16)
    ref = evaluate_model(model, tok, ev)
    n_lin = sum(1 for n in mm.linears)
    print(f"model {args.model}: {n_lin} block linears, weight {args.weight}, act {args.act}, metric {metric}, "
          f"calib {calib.n_tokens} tokens, held-out {held.n_tokens} tokens")
    cols = ["recipe", "float layers", "fp8 layers", "loss (" + metric + ")"]
    cols += ["ppl", "top1_agree", "logit_sqnr_db"] if causal else ["cos_mean", "top1_agree", "emb_sqnr_db"]
    cols += ["quantize s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))

    def row(name: str, m: torch.nn.Module, dt: float) -> None:
        met = evaluate_model(m, tok, ev)
        c = count_layers(m)
        vals = [name, str(c["float"]), str(c["fp8"]), f"{quality_loss(met, ref, metric):.4f}"]
        keys = ["ppl", "top1_agree", "logit_sqnr_db"] if causal else ["cos_mean", "top1_agree", "emb_sqnr_db"]
        vals += [f"{met[k]:.4f}" if k != "ppl" else f"{met[k]:.1f}" for k in keys]
        if c["outlier_cols"]:
            vals[0] += f" [max {c['outlier_cols']} float outlier cols]"
        vals.append(f"{dt:.1f}")
        print("| " + " | ".join(vals) + " |", flush=True)

    for name, spec in recipes(args.act, args.weight):
        r = Recipe.from_dict(spec)
        r.calib = CalibConfig(min_tokens=1)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        quantize_(m, r, cb, baseline=False)
        row(name, m, time.perf_counter() - t0)
        del m
    if args.no_plan:
        return
    t0 = time.perf_counter()
    ev_plan = EvalData(ev.batches, ev.documents, causal=causal, window=ev.window, max_windows=ev.max_windows)
    plan = Planner(model, tok, cb, ev_plan, weight=parse_format(args.weight), act=parse_format(args.act),
                   target=PlanTarget(max_loss=max_loss), metric=metric, calib_config=CalibConfig(min_tokens=1)).run()
    dt = time.perf_counter() - t0
    m = copy.deepcopy(model)
    quantize_(m, plan.recipe, cb, baseline=False)
    row(f"planned ({plan.transform} + {len(plan.kept)} float; target loss <= {max_loss:g})", m, dt)
    print(f"\nplanner: {len(plan.probes)} evaluations, {dt:.0f} s; uniform alternatives ({plan.transform}):")
    print("| uniform recipe | float layers | loss | meets |")
    print("|---|---|---|---|")
    for u in plan.uniform:
        print(f"| {u['uniform']} | {u['kept_float']} | {u['loss']:.4f} | {u['meets']} |")
    print(f"| planned: {plan.transform} + per-layer | {len(plan.kept)} | {plan.loss:.4f} | {plan.meets_target} |")
    print("kept float: " + ", ".join(plan.kept))


if __name__ == "__main__":
    main()
