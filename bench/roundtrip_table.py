"""Round trip of every recipe file and preset: quantize -> save -> reload -> output SQNR, measured side by side.

    .venv/bin/python bench/roundtrip_table.py [--models llama minilm] [--samples 16] [--seq-len 64] [--recipes ...]

Per model and recipe: the output SQNR that ``quantize_`` reports (against the float model, on the calibration
batches), the output SQNR of the model reloaded from the saved directory (transformers for compressed-tensors,
``load_quantized`` for outlierkit's format) on the same batches, the format written, whether vLLM's
compressed-tensors scheme matching accepts the export (restated in ``export_ct.vllm_scheme``, fused shards
included), and the bytes of the saved weights. ``llama`` is the tiny LLaMA fixture (planted outliers; its
weights are dominated by a 30522 x 64 embedding and LM head), ``minilm`` the bundled MiniLM-L6.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama", "minilm"])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--recipes", nargs="+", default=None, help="recipe files / presets (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.export import load_quantized, save_quantized
    from outlierkit.llm.export_ct import vllm_problems
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.models import load_model
    from outlierkit.llm.recipe import PRESETS, CalibConfig, load_recipe, model_outputs, output_sqnr, quantize_

    specs = args.recipes or [*sorted(str(p) for p in Path("recipes").glob("*.yaml")), *sorted(PRESETS)]
    print("| model | recipe | target | reported SQNR dB | reloaded SQNR dB | format | vLLM-servable | weights MB |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        if name == "minilm":
            lm = load_model("minilm")
            model, tok = lm.model, lm.tokenizer
        else:
            model, tok = tiny_model(name), tokenizer()
        batches = build_corpus(tok, load_documents(None), samples=args.samples, seq_len=args.seq_len,
                               seed=0).batches(8)
        ref = model_outputs(model, batches)
        for spec in specs:
            recipe = load_recipe(spec)
            recipe.calib = CalibConfig(min_tokens=1)
            target = recipe.target or "transformers"
            m = copy.deepcopy(model)
            rep = quantize_(m, recipe, batches, baseline=False, target=target)
            try:
                servable = "yes" if not vllm_problems(m) else "no"
            except Exception:  # not expressible in compressed-tensors at all
                servable = "no"
            with tempfile.TemporaryDirectory() as d:
                fmt = save_quantized(m, tok, Path(d) / "q", target="vllm" if servable == "yes" and
                                     target == "vllm" else "transformers")
                size = sum(f.stat().st_size for f in (Path(d) / "q").glob("*.safetensors"))
                back = load_quantized(Path(d) / "q").model
                got = output_sqnr(ref, model_outputs(back, batches), batches)
            print(f"| {name} | {Path(spec).stem} | {target} | {rep.metrics['output_sqnr_db']:.2f} | {got:.2f} | "
                  f"{fmt} | {servable} | {size / 1e6:.2f} |", flush=True)


if __name__ == "__main__":
    main()
