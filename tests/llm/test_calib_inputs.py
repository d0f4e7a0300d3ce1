"""``quantize_`` accepts calibration data as a user has it: text, a list of texts, a dataset, a corpus, batches."""

from __future__ import annotations

import pytest
import torch

from outlierkit.errors import DataError
from outlierkit.llm.corpus import load_documents
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.recipe import Recipe, calib_batches, quantize_

TEXTS = [d.text for d in load_documents(None)[:12]]


def _recipe(**calib):
    from outlierkit.llm.recipe import CalibConfig

    return Recipe(calib=CalibConfig(**{"samples": 8, "seq_len": 32, "batch_size": 4, **calib}))


class FakeDataset:
    """The two members of ``datasets.Dataset`` that calibration reads (the package is not installed here)."""

    def __init__(self, columns: dict[str, list]):
        self._cols = columns
        self.column_names = list(columns)

    def __getitem__(self, key: str) -> list:
        return self._cols[key]


def test_list_of_strings_equals_the_same_text_as_a_corpus(tok):
    from outlierkit.llm.corpus import Document, build_corpus

    r = _recipe(min_tokens=8)
    got = calib_batches(TEXTS, r, tokenizer=tok)
    ref = build_corpus(tok, [Document(t, "") for t in TEXTS], samples=8, seq_len=32, seed=0, min_tokens=1)
    want = calib_batches(ref, r)
    assert len(got) == len(want) == 2
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)


def test_single_string_and_dataset_and_mapping(tok):
    r = _recipe(min_tokens=8)
    one = calib_batches(TEXTS[0], r, tokenizer=tok)
    assert len(one) == 1 and one[0].input_ids.shape[0] == 1
    ds = calib_batches(FakeDataset({"text": TEXTS, "label": [0] * len(TEXTS)}), r, tokenizer=tok)
    assert sum(b.input_ids.shape[0] for b in ds) == 8
    enc = tok(TEXTS[:3], padding=True, truncation=True, max_length=16, return_tensors="pt")
    (b,) = calib_batches(enc, r)
    assert torch.equal(b.input_ids, enc["input_ids"])
    assert int(b.attention_mask.sum()) == int(enc["attention_mask"].sum())
    toks = FakeDataset({"input_ids": [[101, 7, 8, 9, 102]] * 4})
    assert sum(int(x.attention_mask.sum()) for x in calib_batches(toks, r)) == 20


@pytest.mark.parametrize("bad, match", [
    (["some text"], "fewer than calib.min_tokens"),
    (42, "not understood"),
    ([], "empty"),
    ([1, 2, 3], "not understood"),
    (FakeDataset({"body": ["x"]}), "no column 'text'"),
])
def test_bad_calibration_data_is_a_clear_error(tok, bad, match):
    with pytest.raises(DataError, match=match):
        calib_batches(bad, _recipe(), tokenizer=tok)


def test_text_without_tokenizer_says_what_to_pass():
    with pytest.raises(DataError, match="tokenizer"):
        calib_batches(TEXTS, _recipe(), model=tiny_model("llama"))


def test_quantize_with_plain_strings_uses_the_tokenizer_saved_next_to_the_model(tmp_path):
    """Regression: quantize_(model, recipe, ["text"]) raised a bare AttributeError."""
    from transformers import AutoModelForCausalLM

    from outlierkit.llm.fixtures import save_tiny

    model = AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path, "llama"))
    recipe = {"weight": "int8-channel", "act": "int8-tensor", "steps": ["rtn"],
              "calib": {"samples": 8, "seq_len": 64}}
    report = quantize_(model, recipe, TEXTS)
    assert report.metrics["calib_tokens"] >= 256 and report.metrics["layers_quantized"] > 0
