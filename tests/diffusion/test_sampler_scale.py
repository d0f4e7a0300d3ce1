"""The sampler at scale: counter-based noise, block-only fp32 work, memory-chosen batch rows, LLaDA parity."""

from __future__ import annotations

import pytest
import torch
from hex_stubs import StubDenoiser
from torch.utils._python_dispatch import TorchDispatchMode

from outlierkit.diffusion.sampler import (
    CPU_MAX_ROWS,
    SamplerConfig,
    TokenSpec,
    auto_batch_rows,
    commit_counts,
    counter_keys,
    generate,
    parse_memory,
    uniform_noise,
)
from outlierkit.diffusion.tiny import TINY_TOKENS
from outlierkit.errors import ConfigError


def llada_reference_t0(model, prompt, mask_id, gen_length, steps, block_length):
    """LLaDA ``generate()`` at temperature 0 with low-confidence remasking, written block by block."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], gen_length), mask_id, dtype=torch.long)], 1)
    P = prompt.shape[1]
    num_blocks = gen_length // block_length
    spb = steps // num_blocks
    for nb in range(num_blocks):
        lo, hi = P + nb * block_length, P + (nb + 1) * block_length
        counts = commit_counts(int((x[:, lo:hi] == mask_id).sum(1)[0]), spb)
        for i in range(spb):
            mask_index = x == mask_id
            logits = model(x).float()
            logits[..., mask_id] = -torch.inf
            x0 = logits.argmax(-1)
            p = torch.softmax(logits, -1)
            conf = p.gather(-1, x0[..., None]).squeeze(-1)
            conf[:, hi:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.full_like(conf, -torch.inf))
            for r in range(x.shape[0]):
                idx = conf[r].topk(int(counts[i])).indices
                x[r, idx] = x0[r, idx]
    return x


@pytest.mark.parametrize("block", [2, 4, 8, 24])
def test_temperature_zero_matches_llada_exactly(random_tiny, block):
    G, steps = 24, 12
    prompts = torch.randint(4, 18, (3, 14), generator=torch.Generator().manual_seed(5))
    ref = llada_reference_t0(random_tiny, prompts, TINY_TOKENS.mask_id, G, steps, block)
    out = generate(random_tiny, prompts, TINY_TOKENS, SamplerConfig(gen_length=G, steps=steps, block_length=block))
    assert torch.equal(out.sequences, ref)


def test_noise_is_uniform_and_keyed_by_counter():
    seeds = torch.tensor([1, 1, 2, 1], dtype=torch.long)
    pos = torch.tensor([0, 1, 0, 0], dtype=torch.long)
    u = uniform_noise(counter_keys(seeds, 3, pos, 0), 50_000)  # (4, V)
    assert u.dtype == torch.float64 and u.shape == (4, 50_000) and 0 < u.min() and u.max() < 1
    assert torch.equal(u[0], u[3])  # same (seed, step, position): same draw
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert not torch.equal(u[0], uniform_noise(counter_keys(seeds[:1], 4, pos[:1], 0), 50_000)[0])  # step
    flat = u.flatten()
    assert abs(float(flat.mean()) - 0.5) < 0.005 and abs(float(flat.var()) - 1 / 12) < 0.002
    hist = torch.histc(flat.float(), bins=10, min=0, max=1) / flat.numel()
    assert (hist - 0.1).abs().max() < 0.005
    assert abs(float(torch.corrcoef(torch.stack([u[0], u[1]]))[0, 1])) < 0.02


def test_gumbel_max_samples_the_tempered_softmax():
    V, T, N = 12, 0.7, 6000
    logits = torch.full((1, V), -30.0)
    logits[0, :4] = torch.tensor([1.0, 0.5, 0.0, -0.5])
    stub = StubDenoiser(logits)
    cfg = SamplerConfig(gen_length=1, steps=1, block_length=1, temperature=T)
    out = generate(stub, torch.ones(N, 1, dtype=torch.long), TokenSpec(mask_id=11), cfg, seeds=list(range(N)))
    freq = torch.bincount(out.answers[:, 0], minlength=V)[:4].double() / N
    want = torch.softmax(logits[0, :4].double() / T, -1)
    assert (freq - want).abs().max() < 4 * (want * (1 - want) / N).sqrt().max()


def test_chunking_changes_nothing(random_tiny):
    cfg = SamplerConfig(gen_length=24, steps=12, block_length=6, temperature=0.9)
    prompts = torch.randint(4, 18, (4, 14), generator=torch.Generator().manual_seed(3))
    kw = dict(block_lengths=[2, 6, 12, 24], remasking=["low_confidence", "random", "margin", "entropy"],
              seeds=[7, 8, 9, 10])
    one = generate(random_tiny, prompts, TINY_TOKENS, cfg, work_bytes=1, **kw)  # one position per chunk
    all_ = generate(random_tiny, prompts, TINY_TOKENS, cfg, work_bytes=2**30, **kw)  # one chunk
    default = generate(random_tiny, prompts, TINY_TOKENS, cfg, **kw)
    assert torch.equal(one.sequences, all_.sequences) and torch.equal(one.sequences, default.sequences)


class _FloatRecorder(TorchDispatchMode):
    """Largest float32/float64 tensor any op creates (numel)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                self.largest = max(self.largest, t.numel())
        return out


def test_only_the_blocks_masked_positions_go_to_fp32():
    B, P, G, V, block = 2, 4, 16, 64, 4
    logits = torch.randn(G, V, generator=torch.Generator().manual_seed(0)).bfloat16()

    def model(ids, attention_mask=None):
        out = torch.zeros(ids.shape[0], ids.shape[1], V, dtype=torch.bfloat16)
        out[:, P:] = logits
        return out

    cfg = SamplerConfig(gen_length=G, steps=G // 2, block_length=block, temperature=0.9)
    prompts = torch.randint(1, 10, (B, P), generator=torch.Generator().manual_seed(1))
    rec = _FloatRecorder()
    with rec:
        out = generate(model, prompts, TokenSpec(mask_id=63), cfg, seeds=[1, 2], work_bytes=2**30)
    assert (out.answers != 63).all()
    assert rec.largest <= B * block * V < B * G * V  # never the whole answer (or canvas) in float


def test_auto_batch_rows_from_budget():
    # LLaDA-8B-like: 512 positions x 126,464 tokens in bf16 = 130 MB of logits per row
    per_row = 512 * 126_464 * 2 * 1.5
    assert auto_batch_rows(512, 126_464, 2, device="cpu", max_memory=int(10 * per_row)) == 10
    assert auto_batch_rows(32, 18, 4, device="cpu", max_memory=2**34) == CPU_MAX_ROWS
    assert auto_batch_rows(512, 126_464, 2, device="cpu", cfg=True, max_memory=int(10 * per_row)) == 5
    with pytest.raises(ConfigError, match="below one row"):
        auto_batch_rows(512, 126_464, 2, device="cpu", max_memory=2**20)
    assert auto_batch_rows(32, 18, 4, device="cpu") == CPU_MAX_ROWS  # the default budget on this machine


@pytest.mark.parametrize("text,want", [("8GiB", 8 * 2**30), ("512MB", 512 * 10**6), ("2G", 2 * 2**30),
                                       ("1e9", 10**9), ("1.5 GiB", int(1.5 * 2**30))])
def test_parse_memory(text, want):
    assert parse_memory(text) == want


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "8 parsecs"])
def test_parse_memory_rejects(text):
    with pytest.raises(ConfigError):
        parse_memory(text)
