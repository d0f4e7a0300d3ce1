"""The bundled trained causal LM (``tinylm``): does it have outliers, and what do the quantizers do to its perplexity?

Three parts, each printed as Markdown (every number measured in this run):

* ``outliers``: per decoder layer, the largest |activation| of the residual stream and of each linear's input,
  its ratio to the median |activation| (Sun et al.'s massive-activation test: >= 100 and >= 1000x the median)
  and where it sits (token position, channel), for the trained model and for the same architecture at its
  random initialisation (what training added).
* ``w8w6``: held-out perplexity of bf16 (the deploy baseline), then RTN / SmoothQuant / OS+ / spike-aware MP at
  W8A8 per-tensor and W6A6 (asymmetric, per-tensor activations), on the evaluation protocol's held-out half.
* ``w4``: W4A16 (int4 groups of 128), W4A8 and W4A4: RTN vs GPTQ vs OS+ + GPTQ vs rotate + GPTQ vs spike-MP +
  GPTQ: perplexity, seconds to quantize and the size of the compressed-tensors export (where one exists).

    nice -n 10 .venv/bin/python bench/tinylm_quant.py                                  # all parts, built-in text
    nice -n 10 .venv/bin/python bench/tinylm_quant.py --parts w8w6 --data ../shared/data/text/kjv.txt

The model trained on the calibration half of each source (built-in corpus, KJV), so the held-out half that
``compare`` scores is text it never saw; calibration uses the calibration half (training text), as a user
calibrating on pretraining-like data would.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

W8W6 = {
    "W8A8 per-tensor": {"weight": "int8-channel", "act": "int8-tensor"},
    "W6A6": {"weight": {"bits": 6, "symmetric": False, "granularity": "channel"},
             "act": {"bits": 6, "symmetric": False, "granularity": "tensor"}},
}
METHODS = {
    "RTN": [{"rtn": {}}],
    "SmoothQuant": [{"smoothquant": {}}, {"rtn": {}}],
    "OS+": [{"os_plus": {}}, {"rtn": {}}],
    "spike-MP (ratio >= 100)": [{"spike_mp": {"select": "ratio", "threshold": 100}}],
    "spike-MP (top-2)": [{"spike_mp": {"select": "topk", "top_k": 2}}],
}
W4 = {"W4A16 g128": ("int4-g128", None), "W4A8": ("int4-channel", "int8-token"), "W4A4": ("int4-channel", "int4-token")}
W4_STEPS: dict[str, list[dict[str, Any]]] = {
    "RTN": [{"rtn": {}}],
    "GPTQ": [{"gptq": {}}],
    "OS+ + GPTQ": [{"os_plus": {}}, {"gptq": {}}],
    "rotate + GPTQ": [{"rotate": {}}, {"gptq": {}}],
    "rotate(online down) + GPTQ": [{"rotate": {"online_down": True}}, {"gptq": {}}],
    "spike-MP top-2 + GPTQ": [{"spike_mp": {"select": "topk", "top_k": 2, "quantize": False}}, {"gptq": {}}],
}


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    def f(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) >= 1000 or abs(v) < 0.01 else f"{v:.2f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(f(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


@torch.no_grad()
def outlier_rows(model: torch.nn.Module, batches: list[Any], label: str) -> list[dict[str, Any]]:
    """Per layer: residual-stream output and each linear input, max |x| over real tokens, median |x|, where."""
    from outlierkit.llm.calibrate import token_rows
    from outlierkit.llm.models import get_attr, resolve

    mm = resolve(model, warn=False)
    sites = {f"L{i}.resid": (name, "out") for i, name in enumerate(mm.layers)}
    for fqn, layer in mm.linears.items():
        rel = fqn.split(f"{mm.layers[layer]}.", 1)[1]
        if rel.endswith(("q_proj", "gate_proj")) or rel.endswith(("o_proj", "down_proj")):
            sites[f"L{layer}.{rel.split('.')[-1]}.in"] = (fqn, "in")
    acc: dict[str, dict[str, Any]] = {k: {"max": 0.0, "med": [], "where": None, "chan": None} for k in sites}
    state: dict[str, Any] = {}
    handles = []
    for key, (fqn, side) in sites.items():
        def hook(mod: Any, args: Any, out: Any, key: str = key, side: str = side) -> None:
            x = args[0] if side == "in" else (out[0] if isinstance(out, tuple) else out)
            rows = token_rows(x.float(), state["mask"]).abs()  # (N, C), pads removed
            a = acc[key]
            a["med"].append(rows.median())
            v, idx = rows.flatten().max(0)
            if float(v) > a["max"]:
                tok, ch = divmod(int(idx), rows.shape[1])
                pos = int(state["pos"][tok])
                a.update({"max": float(v), "where": pos, "chan": ch})
        handles.append(get_attr(model, fqn).register_forward_hook(hook))
    try:
        for b in batches:
            m = b.attention_mask.bool()
            state["mask"] = b.attention_mask
            state["pos"] = torch.arange(m.shape[1]).expand_as(m)[m]
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    finally:
        for h in handles:
            h.remove()
    out = []
    for key, a in acc.items():
        med = float(torch.stack(a["med"]).median())
        out.append({"model": label, "site": key, "max|x|": a["max"], "median|x|": med,
                    "ratio": a["max"] / max(med, 1e-12), "pos": a["where"], "channel": a["chan"]})
    return out


def part_outliers(lm: Any, docs: list[Any], args: argparse.Namespace) -> None:
    from outlierkit.llm.corpus import build_corpus
    from outlierkit.llm.train_lm import LMConfig, build_model

    batches = build_corpus(lm.tokenizer, docs, samples=32, seq_len=128, seed=0).batches(8)
    trained = outlier_rows(lm.model, batches, "trained")
    c = lm.model.config
    init = build_model(LMConfig(vocab_size=c.vocab_size, hidden=c.hidden_size, layers=c.num_hidden_layers,
                                heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                                intermediate=c.intermediate_size)).eval()
    random_rows = {r["site"]: r for r in outlier_rows(init, batches, "init")}
    rows = [{**r, "init max|x|": random_rows[r["site"]]["max|x|"], "init ratio": random_rows[r["site"]]["ratio"]}
            for r in trained]
    print("\n### Outliers: trained tinylm vs the same architecture at initialisation "
          f"({sum(int(b.attention_mask.sum()) for b in batches)} tokens of held-out text)\n")
    print(table(rows, ["site", "max|x|", "median|x|", "ratio", "pos", "channel", "init max|x|", "init ratio"]))
    massive = [r for r in rows if r["max|x|"] >= 100 and r["ratio"] >= 1000]
    print(f"\nmassive activations (>= 100 and >= 1000x the median): {len(massive)} site(s)"
          + (": " + ", ".join(f"{r['site']} {r['max|x|']:.0f} at pos {r['pos']} ch {r['channel']}" for r in massive)
             if massive else ""))


def part_w8w6(lm: Any, args: argparse.Namespace) -> None:
    from outlierkit.llm.evaluate import compare_recipes

    recipes: list[dict[str, Any]] = [{"name": "fp32", "weight": None, "act": None, "steps": [{"rtn": {}}]}]
    for fname, fmt in W8W6.items():
        for mname, steps in METHODS.items():
            recipes.append({"name": f"{mname}, {fname}", **fmt, "steps": steps})
    t0 = time.perf_counter()
    rows = compare_recipes(args.model, recipes, model=lm.model, tokenizer=lm.tokenizer, data=args.data,
                           calib_samples=args.calib_samples, eval_samples=args.samples, seq_len=args.seq_len,
                           max_windows=args.max_windows)
    bf16 = compare_recipes(args.model, recipes[:1], model=copy.deepcopy(lm.model).to(torch.bfloat16),
                           tokenizer=lm.tokenizer, data=args.data, eval_samples=args.samples, seq_len=args.seq_len,
                           max_windows=args.max_windows)[0]
    bf16["recipe"] = "bf16 (weights and activations)"
    bf16["quantize_s"] = None
    ref = bf16["ppl"]
    for r in [bf16, *rows]:
        r["ppl vs bf16"] = f"{100 * (r['ppl'] / ref - 1):+.1f}%"
        r["vs fp32, paired 95%"] = _rel(r) if r is not bf16 else ""
    print(f"\n### tinylm perplexity, W8A8 per-tensor and W6A6 ({args.data or 'built-in corpus'} held-out half; "
          f"{time.perf_counter() - t0:.0f} s)\n")
    print(table([bf16, *rows], ["recipe", "ppl", "ppl_lo", "ppl_hi", "ppl vs bf16", "vs fp32, paired 95%",
                                "top1_agree", "logit_sqnr_db", "max_in_absmax", "quantize_s"]))


def _rel(r: dict[str, Any]) -> str:
    """ppl / ppl_fp32 - 1 with its paired (same windows) bootstrap interval, in percent."""
    return f"{100 * r['ppl_rel']:+.2f}% [{100 * r['ppl_rel_lo']:+.2f}, {100 * r['ppl_rel_hi']:+.2f}]"


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def part_w4(lm: Any, args: argparse.Namespace) -> None:
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.evaluate import EvalData, evaluate_model, split_documents
    from outlierkit.llm.export import save_quantized
    from outlierkit.llm.recipe import quantize_

    calib_docs, held = split_documents(load_documents(args.data))
    calib = build_corpus(lm.tokenizer, calib_docs, samples=args.calib_samples, seq_len=args.seq_len, seed=0)
    ev_corpus = build_corpus(lm.tokenizer, held, samples=args.samples, seq_len=args.seq_len, seed=0)
    ev = EvalData(ev_corpus.batches(8), held, causal=True, window=args.seq_len, max_windows=args.max_windows)
    base = evaluate_model(lm.model, lm.tokenizer, ev)
    with tempfile.TemporaryDirectory() as tmp:
        lm.model.to(torch.bfloat16).save_pretrained(Path(tmp) / "bf16")
        lm.model.float()
        bf16_bytes = _dir_size(Path(tmp) / "bf16")
    print(f"\n### tinylm W4: perplexity, time to quantize, export size ({args.data or 'built-in corpus'} held-out; "
          f"fp32 ppl {base['ppl']:.2f}; bf16 checkpoint {bf16_bytes / 2**20:.2f} MiB)\n")
    rows = []
    for label, (w, act) in W4.items():
        for name, steps in W4_STEPS.items():
            m = copy.deepcopy(lm.model)
            t0 = time.perf_counter()
            quantize_(m, {"weight": w, "act": act, "steps": steps}, calib.batches(8), baseline=False,
                      target="transformers")
            secs = time.perf_counter() - t0
            met = evaluate_model(m, lm.tokenizer, ev)
            size: str = "-"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    fmt = save_quantized(m, lm.tokenizer, Path(tmp) / "q", target="transformers")
                    size = f"{_dir_size(Path(tmp) / 'q') / 2**20:.2f} MiB ({fmt})"
                except Exception as e:  # online rotations are refused by every target: say so
                    size = f"not exportable: {str(e).split(';')[0][:60]}"
            rows.append({"format": label, "recipe": name, "ppl": met["ppl"], "ppl vs fp32 (paired 95%)": _rel(met),
                         "top1_agree": met.get("top1_agree"), "quantize s": secs, "export": size})
            print(f"| {label} | {name} | {met['ppl']:.2f} | {_rel(met)} | {secs:.1f} | {size} |", flush=True)
    print()
    print(table(rows, ["format", "recipe", "ppl", "ppl vs fp32 (paired 95%)", "top1_agree", "quantize s", "export"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tinylm", help="a trained causal LM directory (default: the bundled tinylm)")
    p.add_argument("--parts", default="outliers,w8w6,w4")
    p.add_argument("--data", nargs="+", default=None, help="evaluation/calibration text (default: built-in corpus)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-windows", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # the build machine's 2 cores are shared
    from outlierkit.llm.corpus import load_documents
    from outlierkit.llm.evaluate import split_documents
    from outlierkit.llm.models import load_model

    lm = load_model(a.model, dtype="fp32", device="cpu")
    print(f"tinylm: {sum(p.numel() for p in lm.model.parameters()) / 1e6:.2f} M parameters, {torch.get_num_threads()} "
          "thread(s)")
    parts = a.parts.split(",")
    if "outliers" in parts:
        part_outliers(lm, split_documents(load_documents(a.data))[1], a)
    if "w8w6" in parts:
        part_w8w6(lm, a)
    if "w4" in parts:
        part_w4(lm, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
