"""The masked-diffusion sampler on stub denoisers (known order) and a random tiny model."""

from __future__ import annotations

import pytest
import torch
from hex_stubs import StubDenoiser

from outlierkit.diffusion.sampler import REMASKING, SamplerConfig, TokenSpec, commit_counts, generate
from outlierkit.diffusion.tiny import TINY_TOKENS
from outlierkit.errors import ConfigError, DataError

V, MASK, EOS, PAD = 12, 11, 10, 0
TOK = TokenSpec(mask_id=MASK, eos_id=EOS, pad_id=PAD)


def ordered_stub(G: int, seed: int = 0) -> tuple[StubDenoiser, torch.Tensor, torch.Tensor]:
    """Position j proposes token tgt[j] with confidence rising in strength[j] (a known order)."""
    g = torch.Generator().manual_seed(seed)
    strength = torch.randperm(G, generator=g).double() + 1.0  # distinct
    tgt = torch.randint(1, 10, (G,), generator=g)
    logits = torch.zeros(G, V)
    logits[torch.arange(G), tgt] = strength.float()
    return StubDenoiser(logits), tgt, strength


def test_commit_counts_split_evenly_remainder_first():
    assert commit_counts(5, 2).tolist() == [3, 2]
    assert commit_counts(8, 8).tolist() == [1] * 8
    assert commit_counts(7, 3).tolist() == [3, 2, 2]


def test_known_unmasking_order_single_block():
    G = 8
    stub, tgt, strength = ordered_stub(G)
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(stub, prompt, TOK, SamplerConfig(gen_length=G, steps=G, block_length=G))
    # one token per step, most confident first: commit step = rank of the strength
    rank = torch.argsort(torch.argsort(-strength))
    assert out.commit_step[0].tolist() == rank.tolist()
    assert out.answers[0].tolist() == tgt.tolist()  # T=0 is the argmax
    assert out.nfe == G == stub.calls


@pytest.mark.parametrize("block,steps", [(2, 8), (4, 8), (8, 8), (4, 4), (16, 8)])
def test_per_step_counts_and_block_confinement(block, steps):
    G = 16
    stub, _, _ = ordered_stub(G, seed=block)
    out = generate(stub, torch.tensor([[1, 2]]), TOK, SamplerConfig(gen_length=G, steps=steps, block_length=block))
    cs = out.commit_step[0]
    assert (cs >= 0).all()  # everything committed
    spb = steps // (G // block)
    expected = commit_counts(block, spb).tolist() * (G // block)
    assert [(cs == s).sum().item() for s in range(steps)] == expected
    for pos in range(G):  # a position commits only during its own block's steps
        nb = pos // block
        assert nb * spb <= cs[pos].item() < (nb + 1) * spb


def test_prompt_untouched_and_mask_never_emitted():
    G = 6
    logits = torch.zeros(G, V)
    logits[:, MASK] = 50.0  # the model "prefers" the mask token everywhere
    logits[:, 3] = 1.0
    stub = StubDenoiser(logits)
    prompt = torch.tensor([[4, 5, 6, 7], [7, 6, 5, 4]])
    for T in (0.0, 1.0):
        out = generate(stub, prompt, TOK, SamplerConfig(gen_length=G, steps=3, block_length=2, temperature=T),
                       seeds=[0, 1])
        assert torch.equal(out.sequences[:, :4], prompt)
        assert not (out.answers == MASK).any()
    # the denoiser always saw the original prompt
    assert all(torch.equal(x[:, :4], prompt) for x in stub.inputs)


def test_batched_equals_separate_mixed_schedules(random_tiny):
    G, steps = 24, 12
    cfg = SamplerConfig(gen_length=G, steps=steps, block_length=4, temperature=0.9)
    prompts = torch.randint(4, 18, (5, 14), generator=torch.Generator().manual_seed(1))
    blocks = [2, 4, 6, 12, 24]
    rules = ["low_confidence", "margin", "entropy", "random", "low_confidence"]
    seeds = [11, 12, 13, 14, 15]
    batched = generate(random_tiny, prompts, TINY_TOKENS, cfg, block_lengths=blocks, remasking=rules, seeds=seeds)
    for r in range(5):
        alone = generate(random_tiny, prompts[r:r + 1], TINY_TOKENS, cfg, block_lengths=[blocks[r]],
                         remasking=[rules[r]], seeds=[seeds[r]])
        assert torch.equal(batched.sequences[r], alone.sequences[0]), r
        assert torch.equal(batched.commit_step[r], alone.commit_step[0]), r


def test_seeded_reproducibility(random_tiny):
    cfg = SamplerConfig(gen_length=24, steps=12, block_length=6, temperature=1.0, remasking="random")
    prompts = torch.randint(4, 18, (3, 14), generator=torch.Generator().manual_seed(2))
    a = generate(random_tiny, prompts, TINY_TOKENS, cfg, seeds=[1, 2, 3])
    b = generate(random_tiny, prompts, TINY_TOKENS, cfg, seeds=[1, 2, 3])
    c = generate(random_tiny, prompts, TINY_TOKENS, cfg, seeds=[4, 5, 6])
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.commit_step, b.commit_step)
    assert not torch.equal(a.sequences, c.sequences)


def test_temperature_zero_is_argmax_and_high_temperature_samples():
    G = 4
    logits = torch.tensor([[2.0, 1.9] + [0.0] * (V - 2)] * G)
    stub = StubDenoiser(logits)
    p = torch.tensor([[1]])
    out0 = generate(stub, p, TOK, SamplerConfig(gen_length=G, steps=G, block_length=G))
    assert out0.answers.tolist() == [[0] * G]
    outs = {tuple(generate(stub, p, TOK, SamplerConfig(gen_length=G, steps=G, block_length=G, temperature=1.0),
                           seeds=[s]).answers[0].tolist()) for s in range(20)}
    assert len(outs) > 1  # Gumbel noise changes candidates


def eos_stub(G: int) -> StubDenoiser:
    """EOS is the argmax at the last positions, and the most confident of all."""
    logits = torch.zeros(G, V)
    logits[:, 5] = 2.0
    logits[G - 3:, EOS] = 8.0
    return StubDenoiser(logits)


def test_eos_held_back_by_score_not_candidate():
    G = 6
    cfg = dict(gen_length=G, steps=G, block_length=G)
    plain = generate(eos_stub(G), torch.tensor([[1]]), TOK, SamplerConfig(**cfg))
    late = generate(eos_stub(G), torch.tensor([[1]]), TOK, SamplerConfig(**cfg, eos_last=True))
    # without it the confident EOS tail commits first
    assert sorted(plain.commit_step[0, G - 3:].tolist()) == [0, 1, 2]
    # with it EOS commits last, but the EOS candidate itself is kept
    assert sorted(late.commit_step[0, G - 3:].tolist()) == [3, 4, 5]
    assert late.answers[0, G - 3:].tolist() == [EOS] * 3
    assert torch.equal(plain.answers, late.answers)
    gone = generate(eos_stub(G), torch.tensor([[1]]), TOK, SamplerConfig(**cfg, suppress_eos=True))
    assert not (gone.answers == EOS).any()


def test_score_rules_on_hand_built_probs():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])  # (N, V)
    cand = torch.tensor([0, 1])
    u = torch.tensor([0.3, 0.9], dtype=torch.float64)
    lc = REMASKING.get("low_confidence")(probs, cand, u)
    mg = REMASKING.get("margin")(probs, cand, u)
    en = REMASKING.get("entropy")(probs, cand, u)
    assert torch.allclose(lc, torch.tensor([0.7, 0.35]))
    assert torch.allclose(mg, torch.tensor([0.5, 0.05]))
    h = -(probs * probs.log()).sum(-1)
    assert torch.allclose(en, -h)
    r = REMASKING.get("random")(probs, cand, u)
    assert r.dtype == torch.float32 and r.device == cand.device and torch.allclose(r, u.float())


def test_margin_rule_picks_a_different_order_than_confidence():
    # pos0: p = (.5,.5) -> conf .5 margin 0; pos1: p ~ (.45,.1,.1,...) -> conf .45 margin .35
    logits = torch.full((2, V), -30.0)
    logits[0, 1] = logits[0, 2] = 0.0
    logits[1, 3] = 1.5
    logits[1, 4:9] = 0.0
    stub = StubDenoiser(logits)
    lc = generate(stub, torch.tensor([[1]]), TOK, SamplerConfig(gen_length=2, steps=2, block_length=2))
    mg = generate(stub, torch.tensor([[1]]), TOK, SamplerConfig(gen_length=2, steps=2, block_length=2,
                                                               remasking="margin"))
    assert lc.commit_step[0].tolist() == [0, 1] and mg.commit_step[0].tolist() == [1, 0]


def test_classifier_free_guidance_formula_and_nfe():
    G = 2

    def model(ids, attention_mask=None):
        B, T = ids.shape
        out = torch.zeros(B, T, V)
        cond = ids[:, 0] != MASK  # unconditional rows have the prompt masked
        out[cond, :, 1] = 1.0
        out[cond, :, 2] = 0.9
        out[~cond, :, 1] = 1.0  # uncond prefers 1 more strongly relative to 2
        out[~cond, :, 2] = 0.0
        return out

    # guided: u + 2(c - u): token1 = 1, token2 = 0 + 2 * 0.9 = 1.8 -> token 2 wins
    out = generate(model, torch.tensor([[4, 5]]), TOK, SamplerConfig(gen_length=G, steps=G, block_length=G,
                                                                     cfg_scale=1.0))
    assert out.answers.tolist() == [[2, 2]] and out.nfe == 2 * G
    plain = generate(model, torch.tensor([[4, 5]]), TOK, SamplerConfig(gen_length=G, steps=G, block_length=G))
    assert plain.answers.tolist() == [[1, 1]]


def test_shift_logits_reads_previous_position():
    G = 3
    logits = torch.zeros(G, V)
    logits[0, 7] = logits[1, 8] = logits[2, 9] = 5.0
    stub = StubDenoiser(logits)

    def model(ids, attention_mask=None):  # the stub places logits at the answer span; shift them one left
        out = stub(ids)
        return torch.cat([out[:, 1:], out[:, :1]], 1)

    out = generate(model, torch.tensor([[1, 1]]), TOK, SamplerConfig(gen_length=G, steps=G, block_length=G,
                                                                     shift_logits=True))
    assert out.answers.tolist() == [[7, 8, 9]]


def test_outputs_with_dot_logits_and_tuple():
    stub, tgt, _ = ordered_stub(4)

    class Out:
        def __init__(self, logits):
            self.logits = logits

    cfg = SamplerConfig(gen_length=4, steps=4, block_length=4)
    a = generate(lambda ids: Out(stub(ids)), torch.tensor([[1]]), TOK, cfg)
    b = generate(lambda ids: (stub(ids),), torch.tensor([[1]]), TOK, cfg)
    assert a.answers.tolist() == b.answers.tolist() == [tgt.tolist()]


def test_bad_input_errors():
    stub, _, _ = ordered_stub(8)
    p = torch.tensor([[1, 2]])
    with pytest.raises(ConfigError, match="does not divide"):
        SamplerConfig(gen_length=8, steps=8, block_length=3)
    with pytest.raises(ConfigError, match="not divisible by the number of blocks"):
        SamplerConfig(gen_length=8, steps=6, block_length=2)
    with pytest.raises(ConfigError, match="valid names"):
        SamplerConfig(gen_length=8, steps=8, block_length=8, remasking="bogus")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="pad id equals mask id"):
        TokenSpec(mask_id=3, pad_id=3)
    with pytest.raises(ConfigError, match="outside the model's vocabulary"):
        generate(stub, p, TokenSpec(mask_id=99), SamplerConfig(gen_length=8, steps=8, block_length=8))
    with pytest.raises(DataError, match="exceeds the model context"):
        generate(stub, p, TOK, SamplerConfig(gen_length=8, steps=8, block_length=8), max_context=9)
    with pytest.raises(DataError, match="contains the mask token"):
        generate(stub, torch.tensor([[1, MASK]]), TOK, SamplerConfig(gen_length=8, steps=8, block_length=8))
    with pytest.raises(ConfigError, match="block_lengths has 2 entries"):
        generate(stub, p, TOK, SamplerConfig(gen_length=8, steps=8, block_length=8), block_lengths=[2, 4])
