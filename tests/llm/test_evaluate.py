"""Evaluation protocol against naive references; save -> reload -> identical outputs."""

from __future__ import annotations

import math

import torch

from outlierkit.llm.corpus import load_documents
from outlierkit.llm.evaluate import fidelity, perplexity
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.recipe import model_outputs, quantize_


def test_perplexity_matches_naive(tok):
    model = tiny_model("llama")
    docs = load_documents(None)[:3]
    got = perplexity(model, tok, docs, window=32, max_windows=3)
    ids = tok("\n\n".join(d.text for d in docs), add_special_tokens=False)["input_ids"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(3):
            w = torch.tensor(ids[k * 32:(k + 1) * 32])
            logp = model(input_ids=w[None]).logits[0].log_softmax(-1)
            for t in range(31):
                nll -= float(logp[t, w[t + 1]])
                n += 1
    assert got["eval_tokens"] == n
    assert math.isclose(got["ppl"], math.exp(nll / n), rel_tol=1e-5)


def test_fidelity_metrics():
    torch.manual_seed(0)
    ref = torch.randn(20, 16)
    same = fidelity(ref, ref.clone())
    assert same["cos_mean"] > 1 - 1e-12 and same["top1_agree"] == 1.0 and same["emb_sqnr_db"] == math.inf
    noisy = fidelity(ref, ref + 0.5 * torch.randn(20, 16))
    assert 0.5 < noisy["cos_mean"] < 0.99 and noisy["top1_agree"] < 1.0


def test_save_reload_with_transformers_and_quant_state(tmp_path, corpus, tok):
    from transformers import AutoModelForCausalLM

    from outlierkit.llm.export import load_quantized, save_quantized

    model = tiny_model("opt")
    batches = corpus.batches(4)
    float_ref = model_outputs(model, batches)
    quantize_(model, {"weight": "int6-channel", "act": "int8-static", "steps": [{"os_plus": {"batches": 1}}, "rtn"]},
              corpus, baseline=False)
    quant_ref = model_outputs(model, batches)
    save_quantized(model, tok, tmp_path / "q", recipe_yaml="steps: [rtn]\n", target="outlierkit")  # float + state
    assert quant_ref[0].shape == model_outputs(model, batches)[0].shape  # still wrapped after saving
    # plain transformers: the transformed float model (same outputs as the original float model)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    out = model_outputs(plain, batches)
    for a, b in zip(out, float_ref, strict=True):
        assert (a - b).norm() / b.norm() < 1e-5
    # with the quantization state re-applied: identical fake-quantized outputs
    lm = load_quantized(tmp_path / "q")
    for a, b in zip(model_outputs(lm.model, batches), quant_ref, strict=True):
        assert torch.equal(a, b)
