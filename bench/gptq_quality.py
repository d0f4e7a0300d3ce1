"""GPTQ / rotation quality grid: output SQNR and time to quantize, RTN vs GPTQ vs OS+ / rotate / spike-MP + GPTQ.

Models: the tiny LLaMA fixture (planted outlier channels and a residual spike; random weights) and the
bundled pretrained MiniLM-L6 (BERT; rotation is refused there: post-LN). Formats: W4A16 (int4 groups of 128;
32 on the tiny LLaMA, whose hidden size is 64), W4A8 (int4 per channel, int8 per token) and W4A4 (int4 per
channel, int4 per token). Calibration and evaluation use different samples of the bundled corpus.

    nice -n 10 .venv/bin/python bench/gptq_quality.py            # both models (a few minutes on one thread)
    nice -n 10 .venv/bin/python bench/gptq_quality.py --models llama
    nice -n 10 .venv/bin/python bench/gptq_quality.py --models minilm --formats W4A16,W4A8 \
        --recipes rtn,gptq,os_plus+gptq,rotate+gptq,spike_mp+gptq
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

STEPS: dict[str, list[dict[str, Any]]] = {
    "rtn": [{"rtn": {}}],
    "gptq": [{"gptq": {}}],
    "os_plus+gptq": [{"os_plus": {"batches": 1}}, {"gptq": {}}],
    "rotate+rtn": [{"rotate": {"online_down": True}}, {"rtn": {}}],
    "rotate+gptq": [{"rotate": {"online_down": True}}, {"gptq": {}}],
    "spike_mp+gptq": [{"spike_mp": {"quantize": False, "select": "topk", "top_k": 1}}, {"gptq": {}}],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama,minilm")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--recipes", default=",".join(STEPS), help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--formats", default="W4A16,W4A8,W4A4", help="comma-separated subset of W4A16,W4A8,W4A4")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # the build machine's 2 cores are shared
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.models import load_model
    from outlierkit.llm.recipe import quantize_

    tok = tokenizer()
    docs = load_documents(None)
    calib = build_corpus(tok, docs, samples=a.calib_samples, seq_len=a.seq_len, seed=0).batches(8)
    ev = build_corpus(tok, docs, samples=a.eval_samples, seq_len=a.seq_len, seed=7).batches(8)
    print(f"calibration tokens {sum(int(b.attention_mask.sum()) for b in calib)}, "
          f"evaluation tokens {sum(int(b.attention_mask.sum()) for b in ev)}, {torch.get_num_threads()} thread(s)")
    print("| model | format | recipe | output SQNR dB | quantize s | note |")
    print("|---|---|---|---|---|---|")
    for name in a.models.split(","):
        def build(name: str = name) -> torch.nn.Module:
            return tiny_model("llama") if name == "llama" else load_model("minilm", need_tokenizer=False).model

        group = 32 if name == "llama" else 128
        formats = {f"W4A16 g{group}": (f"int4-g{group}", None), "W4A8": ("int4-channel", "int8-token"),
                   "W4A4": ("int4-channel", "int4-token")}
        for label, (w, act) in formats.items():
            if label.split()[0] not in a.formats.split(","):
                continue
            for recipe in a.recipes.split(","):
                steps = STEPS[recipe]
                model = build()
                rep = quantize_(model, {"weight": w, "act": act, "steps": steps}, calib, eval_batches=ev,
                                baseline=False)
                secs = sum(v for k, v in rep.metrics.items() if k.startswith("time_"))
                note = "; ".join(x.split(":", 1)[1].split(";")[0].strip()[:70] for x in rep.warnings
                                 if "refused" in x or "selects no" in x)
                print(f"| {name} | {label} | {recipe} | {rep.metrics['output_sqnr_db']:.2f} | {secs:.2f} | "
                      f"{note} |", flush=True)
                del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
