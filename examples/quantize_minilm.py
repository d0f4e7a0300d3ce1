"""Quantize the bundled MiniLM with OS+ then W8A8 RTN, save it, reload it, and compare embeddings.

    .venv/bin/python examples/quantize_minilm.py [OUT_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from outlierkit.llm.corpus import build_corpus, load_documents
from outlierkit.llm.evaluate import embeddings, fidelity, split_documents
from outlierkit.llm.export import load_quantized, save_quantized
from outlierkit.llm.formats import parse_format
from outlierkit.llm.models import load_model
from outlierkit.llm.recipe import Recipe, Step, quantize_


def main() -> None:
    torch.set_num_threads(1)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "minilm-w8a8-osplus"
    lm = load_model("minilm")
    calib_docs, held_docs = split_documents(load_documents(None))
    calib = build_corpus(lm.tokenizer, calib_docs, samples=32, seq_len=128)
    held = build_corpus(lm.tokenizer, held_docs, samples=32, seq_len=128, seed=1).batches(8)
    ref = embeddings(lm.model, held)

    # The same recipe as recipes/w8a8-osplus.yaml, written in Python.
    recipe = Recipe(name="w8a8-osplus", weight=parse_format("int8-channel"), act=parse_format("int8-tensor"),
                    steps=[Step("os_plus"), Step("rtn")])
    report = quantize_(lm.model, recipe, calib)
    print(f"output SQNR {report.metrics['output_sqnr_db']:.2f} dB "
          f"(plain RTN: {report.metrics['output_sqnr_db_rtn']:.2f} dB)")
    print("held-out fidelity:", fidelity(ref, embeddings(lm.model, held)))

    save_quantized(lm.model, lm.tokenizer, out, recipe_yaml=recipe.to_yaml())
    again = load_quantized(out)
    same = torch.equal(embeddings(again.model, held), embeddings(lm.model, held))
    print(f"saved to {out}; reloaded model reproduces the quantized embeddings exactly: {same}")


if __name__ == "__main__":
    main()
