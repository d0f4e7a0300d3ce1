"""The Hugging Face loading path, on a tiny BERT masked LM built from a config (no download)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from outlierkit.cli import main  # noqa: E402
from outlierkit.diffusion.hex import HexConfig, hex_generate, pad_prompts  # noqa: E402
from outlierkit.diffusion.hf import hf_forward, load_hf_model  # noqa: E402
from outlierkit.diffusion.sampler import SamplerConfig, generate  # noqa: E402
from outlierkit.errors import ConfigError, ModelLoadError  # noqa: E402

WORDS = ["the", "answer", "is", "1", "2", "3", "4", "5", "cat", "dog", "plus", "equals"]


def make_bert(path, with_mask: bool = True):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + (["[MASK]"] if with_mask else [])
    vocab = specials + WORDS
    path.mkdir(parents=True, exist_ok=True)
    kw = {"mask_token": "[MASK]"} if with_mask else {"mask_token": None}
    tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, **kw)
    assert len(tok.get_vocab()) == len(vocab)
    tok.save_pretrained(path)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():  # make the random model propose words, not special tokens
        bias = model.cls.predictions.decoder.bias
        bias[:len(specials)] = -20.0
        bias[len(specials):] = torch.randn(len(WORDS))
        model.cls.predictions.decoder.weight.mul_(20.0)  # position-dependent, seed-sensitive choices
    model.save_pretrained(path)
    return path


def test_load_local_masked_lm_and_sample(tmp_path):
    lm = load_hf_model(make_bert(tmp_path / "bert"))
    assert lm.tokens.mask_id == lm.tokenizer.mask_token_id and lm.tokens.pad_id == 0
    assert lm.max_context == 64 and lm.model_type == "bert" and not lm.shift_logits
    prompts = [lm.encode("the cat plus the dog equals"), lm.encode("the answer")]
    f = hf_forward(lm.model)
    cfg = HexConfig(schedules=("4", "8"), seeds_per_block=2, gen_length=8, steps=4, temperature=0.9)
    seen = []

    def spy(ids, attention_mask=None):
        seen.append(attention_mask)
        return f(ids, attention_mask=attention_mask)

    res = hex_generate(spy, prompts, lm.tokens, cfg, lm.decode, max_context=lm.max_context)
    assert len(res.paths) == 2 * 2 * 2
    assert all(len(p.text.split()) == 8 and set(p.text.split()) <= set(WORDS) for p in res.paths)
    assert len({p.text for p in res.paths}) > 1  # seeds and schedules matter
    pad = len(prompts[0]) - len(prompts[1])
    assert seen[-1] is not None and seen[-1][-1, :pad].eq(0).all() and seen[-1][-1, pad:].eq(1).all()
    # rows stay independent under left padding: the padded row alone gives the same tokens
    ids, mask = pad_prompts(prompts, lm.tokens)
    cfg0 = SamplerConfig(gen_length=8, steps=4, block_length=4)
    both = generate(f, ids, lm.tokens, cfg0, attention_mask=mask)
    one = generate(f, ids[1:], lm.tokens, cfg0, attention_mask=mask[1:])
    assert torch.equal(both.sequences[1], one.sequences[0])
    out = generate(f, torch.tensor([prompts[0]]), lm.tokens, SamplerConfig(gen_length=8, steps=8, block_length=8))
    assert not (out.answers == lm.tokens.mask_id).any()


def test_hf_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf_model(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no mask token"):
        load_hf_model(make_bert(tmp_path / "nomask", with_mask=False))
    p = make_bert(tmp_path / "bert")
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        load_hf_model(p, mask_id=10_000)


def test_cli_eval_on_hf_model_with_jsonl(tmp_path, capsys):
    p = make_bert(tmp_path / "bert")
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"the cat {i}", "answer": str(i)}) for i in range(1, 4)))
    out = tmp_path / "run"
    rc = main(["hex", "eval", "--model", str(p), "--data", str(data), "--gen-length", "8", "--steps", "4",
               "--schedules", "4,8", "--seeds-per-block", "2", "--ks", "2", "--hex-seeds", "1",
               "--baselines", "topk_margin", "--out", str(out)])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "diffusion.hex_eval" and rep["metrics"]["n_problems"] == 3
    rc = main(["hex", "eval", "--model", str(p), "--out", str(tmp_path / "x")])
    assert rc == 2 and "needs --data" in capsys.readouterr().err
