"""train-lm: the split never trains on held-out text, the saved directory reloads the trained model exactly,
and the bundled tinylm is a working causal LM."""

from __future__ import annotations

import json
import math

import pytest
import torch

from outlierkit.llm.train_lm import LMConfig, save_lm, train_lm, training_documents

TINY = dict(vocab_size=320, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64, seq_len=32, batch_size=8,
            steps=30, warmup=5, lr=5e-3, threads=1)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "lines.txt"
    # one paragraph per line, no blank lines (the layout of ../shared/data/text/kjv.txt)
    p.write_text("\n".join(f"Line {i}: the quick brown fox number {i} jumps over the lazy dog {i % 7} times, "
                           "and the dog does not mind at all." * 3 for i in range(40)) + "\n")
    return p


def test_split_never_trains_on_the_held_out_half(text_file):
    from outlierkit.llm.corpus import default_documents, load_documents
    from outlierkit.llm.evaluate import held_out

    train, test = training_documents([str(text_file)])
    assert not {d.text for d in train} & {d.text for d in test}
    # exactly what `eval` / `compare` score, per source
    expected = held_out(default_documents()) + held_out(load_documents([text_file]))
    assert [d.text for d in test] == [d.text for d in expected]
    assert len(load_documents([text_file])) > 2  # one-paragraph-per-line text is split into documents


def test_trained_model_learns_and_reloads_exactly(text_file, tmp_path):
    from outlierkit.llm.models import load_model

    cfg = LMConfig(**TINY, data=[str(text_file)])
    model, tok, hist, summary = train_lm(cfg)
    assert hist[-1]["val_loss"] < math.log(cfg.vocab_size) - 0.5  # learned something beyond uniform
    assert summary["params"] == sum(p.numel() for p in model.parameters())
    text = "def f(x):\n    return x  # ünïcode ok"
    ids = tok(text)["input_ids"]
    assert ids[0] == 0 and tok.decode(ids[1:]) == text  # <s> in front; byte-level BPE round-trips any text
    out = save_lm(model, tok, tmp_path / "lm", cfg, {"command": "test"})
    lm = load_model(str(out), dtype="fp32", device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.tokenizer(text)["input_ids"] == ids
    x = torch.tensor([ids])
    for p in model.parameters():  # the saved weights are bf16
        p.data = p.data.to(torch.bfloat16).float()
    ref = model(input_ids=x).logits
    torch.testing.assert_close(lm.model(input_ids=x).logits, ref, rtol=0, atol=0)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the tied LM head is stored once
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    rec = json.loads((out / "outlierkit_train.json").read_text())
    assert rec["config"]["hidden"] == 32 and rec["command"] == "test"


def test_bad_shapes_are_one_line_errors(tmp_path, capsys):
    from outlierkit.cli import main

    assert main(["train-lm", "--out", str(tmp_path / "x"), "--hidden", "100", "--heads", "8"]) == 2
    err = capsys.readouterr().err
    assert "hidden 100 must divide by heads 8" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_bundled_tinylm_is_a_working_causal_lm():
    from outlierkit.llm.corpus import default_documents
    from outlierkit.llm.evaluate import held_out, perplexity
    from outlierkit.llm.models import TINYLM, load_model

    lm = load_model("tinylm", dtype="fp32", device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    rec = json.loads((TINYLM / "outlierkit_train.json").read_text())
    assert rec["command"].startswith("outlierkit train-lm ")
    report = json.loads((TINYLM / "report.json").read_text())
    ppl = perplexity(lm.model, lm.tokenizer, held_out(default_documents()), window=128, max_windows=64)
    # what train-lm measured on the reloaded artifact, on text it never trained on
    assert ppl["ppl"] == pytest.approx(report["metrics"]["heldout_ppl[built-in]"], rel=1e-4)
    assert ppl["ppl"] < 0.05 * lm.model.config.vocab_size


def test_keep_best_returns_the_weights_of_the_lowest_validation_loss(text_file, monkeypatch):
    import outlierkit.llm.train_lm as tl

    scripted, seen = iter([5.0, 3.0, 4.0]), []

    def fake_val(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return next(scripted)

    monkeypatch.setattr(tl, "_mean_loss", fake_val)
    cfg = LMConfig(**{**TINY, "steps": 30}, data=[str(text_file)], keep_best=True)
    model, _, hist, summary = train_lm(cfg, log_every=10)
    assert [h["val_loss"] for h in hist] == [5.0, 3.0, 4.0]
    assert summary["kept_step"] == 20 and summary["kept_val_loss"] == 3.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, seen[1][k]), k
    assert not all(torch.equal(v, seen[2][k]) for k, v in model.state_dict().items())


def test_cli_trains_saves_and_scores_the_reloaded_model(text_file, tmp_path):
    from outlierkit.cli import main
    from outlierkit.llm.models import load_model

    out = tmp_path / "lm"
    assert main(["train-lm", "--out", str(out), "--data", str(text_file), "--steps", "4", "--warmup", "1",
                 "--hidden", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--intermediate", "64",
                 "--vocab-size", "320", "--seq-len", "32", "--batch-size", "4", "--threads", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(k for k in rep["metrics"] if k.startswith("heldout_ppl")) == \
        {"heldout_ppl[built-in]", "heldout_ppl[lines.txt]"}
    assert all(math.isfinite(v) and v > 1 for k, v in rep["metrics"].items() if k.startswith("heldout_ppl"))
    assert (out / "loss.png").is_file() and not (tmp_path / "lm.partial").exists()
    assert type(load_model(str(out), dtype="fp32", device="cpu").model).__name__ == "LlamaForCausalLM"
