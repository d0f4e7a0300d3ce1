"""The public API of ``outlierkit.llm``: every exported name resolves, lazily, and the verbs work together."""

from __future__ import annotations

import subprocess
import sys

import pytest

import outlierkit.llm as llm


@pytest.mark.parametrize("name", llm.__all__)
def test_every_exported_name_resolves(name):
    obj = getattr(llm, name)
    assert obj is not None
    if callable(obj) and hasattr(obj, "__module__"):
        assert obj.__module__.startswith("outlierkit.llm")


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        llm.nope  # noqa: B018


def test_import_is_lazy():
    code = "import sys, outlierkit.llm; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
def test_verbs_end_to_end(tmp_path, tok):
    """load -> quantize_ (plain strings) -> evaluate -> save -> load_quantized, through the package names."""
    import copy

    import torch

    from outlierkit.llm.fixtures import save_tiny

    lm = llm.load_model(str(save_tiny(tmp_path / "m", "llama")))
    texts = [d.text for d in llm.load_documents(None)[:16]]
    recipe = {"weight": "int8-channel", "act": "int8-tensor", "steps": ["rtn"], "calib": {"samples": 8, "seq_len": 48}}
    other = copy.deepcopy(lm.model)
    report = llm.quantize_(lm.model, recipe, texts, tokenizer=lm.tokenizer, target="transformers")
    assert report.metrics["layers_quantized"] > 0
    llm.save_quantized(lm.model, lm.tokenizer, tmp_path / "q")
    # without a target the activations are simulated on vLLM's grid: saving that for transformers says so
    llm.quantize_(other, recipe, texts, tokenizer=lm.tokenizer)
    with pytest.warns(UserWarning, match="vLLM's grid"):
        llm.save_quantized(other, lm.tokenizer, tmp_path / "q2")
    q = llm.load_quantized(tmp_path / "q")
    batch = llm.build_corpus(lm.tokenizer, llm.load_documents(None), samples=2, seq_len=16).batches(2)
    data = llm.EvalData(batch, [], causal=False)
    ref = llm.evaluate_model(lm.model, lm.tokenizer, data)
    assert ref["cos_mean"] == pytest.approx(1.0)
    got = llm.evaluate_model(q.model, lm.tokenizer, data)
    assert got["cos_mean"] == pytest.approx(1.0, abs=1e-6)  # the reloaded model is the quantized one
    assert isinstance(q.model, torch.nn.Module)
