"""A small masked-diffusion transformer, synthetic reasoning tasks, and its training loop (CPU, minutes)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlierkit.diffusion.sampler import TokenSpec
from outlierkit.errors import ConfigError, ModelLoadError
from outlierkit.registry import Registry

# ---------------------------------------------------------------------------------------------- vocabulary

#: The tiny vocabulary. Special tokens first; ``#`` spells the ``####`` answer marker.
TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>", "=", "#", ";", "+",
                           "0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
PAD, BOS, EOS, MASK = 0, 1, 2, 3
_INDEX = {t: i for i, t in enumerate(TOKENS)}
TINY_TOKENS = TokenSpec(mask_id=MASK, eos_id=EOS, pad_id=PAD)


def encode(text: str) -> list[int]:
    """Characters of ``text`` -> token ids (special tokens are not parsed from text)."""
    try:
        return [_INDEX[ch] for ch in text]
    except KeyError as e:
        raise ConfigError(f"character {e.args[0]!r} is not in the tiny vocabulary {TOKENS[4:]}") from None


def decode(ids: list[int] | torch.Tensor) -> str:
    """Token ids -> text: stops at the first ``<eos>``, drops ``<pad>``/``<bos>``, shows masks as ``_``."""
    out = []
    for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
        if i == EOS:
            break
        if i in (PAD, BOS):
            continue
        out.append("_" if i == MASK else TOKENS[i])
    return "".join(out)


# ------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Problem:
    """One task instance: the prompt ids (fixed length), the gold answer string and the prompt text."""

    prompt_ids: tuple[int, ...]
    answer: str
    text: str


class Task:
    """A synthetic task: fixed-length prompts and responses ``<chain> #### <answer> <eos>...``."""

    name: str = "task"
    prompt_len: int = 0
    gen_length: int = 0
    #: block sizes that divide ``gen_length`` with ``gen_length / 2`` steps (2 tokens per step)
    default_schedules: tuple[str, ...] = ()

    def sample_train(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` training pairs drawn from the training split: prompts (n, P) and responses (n, G)."""
        raise NotImplementedError

    def heldout(self, n: int, seed: int = 1234) -> list[Problem]:
        """``n`` distinct problems from the held-out split (never produced by ``sample_train``)."""
        raise NotImplementedError

    def prompt_from_text(self, text: str) -> tuple[int, ...]:
        """Encode a user prompt for this task (used by ``outlierkit hex generate``)."""
        raise NotImplementedError

    def prompt_format(self) -> str:
        """How a prompt for ``outlierkit hex generate --prompt`` is written, with an example."""
        raise NotImplementedError


TASKS: Registry[type[Task]] = Registry("tiny task")


@TASKS.register("parity-chain")
@dataclass(frozen=True)
class ParityChain(Task):
    """Running XOR of k random bits, then the final parity after ``####``.

    Prompt ``<bos> b1..bk = <pad>...``; response ``x1..xk #### xk <eos>...`` with ``xi = b1 ^ ... ^ bi``.
    Every chain step depends on its left neighbour, so committing several dependent tokens in one step
    (large blocks, few steps) can go wrong in a way small blocks do not, and vice versa.
    A problem (the bit string) is held out when ``crc32(bits) % holdout_mod == 0``; training never sees it.

    Args:
        min_bits: shortest chain (default: 4).
        max_bits: longest chain (default: 12).
        prompt_len: prompt length incl. ``<bos>`` and ``=`` (default: 14).
        gen_length: response length, EOS-padded (default: 24).
        holdout_mod: one in ``holdout_mod`` bit strings is held out (default: 4).
    """

    name: str = "parity-chain"
    min_bits: int = 4
    max_bits: int = 12
    prompt_len: int = 14
    gen_length: int = 24
    holdout_mod: int = 4
    default_schedules: tuple[str, ...] = ("2", "4", "6", "12", "24")

    def __post_init__(self) -> None:
        if not 1 <= self.min_bits <= self.max_bits or self.prompt_len < self.max_bits + 2:
            raise ConfigError(f"parity-chain: need 1 <= min_bits <= max_bits <= prompt_len - 2, got {self}")
        if self.gen_length < self.max_bits + 5:
            raise ConfigError(f"parity-chain: gen_length must be >= max_bits + 5, got {self.gen_length}")

    def is_heldout(self, bits: str) -> bool:
        return bool(_holdout_hash(torch.tensor([len(bits)]), torch.tensor([int(bits, 2)]))[0]
                    % self.holdout_mod == 0)

    def _pair(self, bits: str) -> tuple[list[int], list[int], str]:
        acc, chain = 0, []
        for b in bits:
            acc ^= int(b)
            chain.append(str(acc))
        answer = str(acc)
        prompt = [BOS] + encode(bits + "=")
        prompt += [PAD] * (self.prompt_len - len(prompt))
        resp = encode("".join(chain) + "####" + answer)
        resp += [EOS] * (self.gen_length - len(resp))
        return prompt, resp, answer

    def _random_bits(self, gen: torch.Generator) -> str:
        k = int(torch.randint(self.min_bits, self.max_bits + 1, (1,), generator=gen))
        return "".join(str(int(b)) for b in torch.randint(0, 2, (k,), generator=gen))

    def sample_train(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        K = self.max_bits
        m = 2 * n + 16  # oversample, then drop held-out problems (about 1 in holdout_mod)
        k = torch.randint(self.min_bits, K + 1, (m,), generator=generator)  # (m,)
        bits = torch.randint(0, 2, (m, K), generator=generator)  # (m, K)
        live = torch.arange(K)[None, :] < k[:, None]  # (m, K)
        bits = bits * live
        value = (bits * (2 ** (k[:, None] - 1 - torch.arange(K)[None, :])).clamp_min(0)).sum(1)  # (m,)
        keep = (_holdout_hash(k, value) % self.holdout_mod != 0).nonzero().squeeze(1)[:n]
        if len(keep) < n:  # astronomically unlikely; fall back to another draw
            return self.sample_train(n, generator)
        k, bits, live = k[keep], bits[keep], live[keep]
        chain = bits.cumsum(1) % 2  # (n, K) running XOR
        digit = lambda t: t + _INDEX["0"]
        prompts = torch.full((n, self.prompt_len), PAD)
        prompts[:, 0] = BOS
        prompts[:, 1:K + 1] = torch.where(live, digit(bits), PAD)
        prompts[torch.arange(n), k + 1] = _INDEX["="]
        resps = torch.full((n, self.gen_length), EOS)
        resps[:, :K] = torch.where(live, digit(chain), EOS)
        rows = torch.arange(n)
        for j in range(4):
            resps[rows, k + j] = _INDEX["#"]
        resps[rows, k + 4] = digit(chain[rows, k - 1])
        return prompts, resps  # (n, P), (n, G)

    def heldout(self, n: int, seed: int = 1234) -> list[Problem]:
        gen = torch.Generator().manual_seed(seed)
        total = sum(
            1 for k in range(self.min_bits, self.max_bits + 1) for v in range(2**k)
            if self.is_heldout(format(v, f"0{k}b"))
        )
        if n > total:
            raise ConfigError(f"parity-chain has only {total} held-out problems; asked for {n}")
        seen: set[str] = set()
        out: list[Problem] = []
        while len(out) < n:
            bits = self._random_bits(gen)
            if bits in seen or not self.is_heldout(bits):
                continue
            seen.add(bits)
            p, _, ans = self._pair(bits)
            out.append(Problem(tuple(p), ans, bits + "="))
        return out

    def prompt_from_text(self, text: str) -> tuple[int, ...]:
        bits = text.strip().rstrip("=")
        if not bits or set(bits) - {"0", "1"} or not self.min_bits <= len(bits) <= self.max_bits:
            raise ConfigError(f"parity-chain prompts are {self.prompt_format()}, got {text!r}")
        return tuple(self._pair(bits)[0])

    def prompt_format(self) -> str:
        return f"{self.min_bits}..{self.max_bits} bits then '=', e.g. '0110='"


@TASKS.register("pointer-chase")
@dataclass(frozen=True)
class PointerChase(Task):
    """Follow a random function on digits: ``s1 = f(s), s2 = f(s1), ...``, then the last node after ``####``.

    Prompt ``<bos> f(0)..f(9) ; s =``; response ``s1..sk #### sk <eos>...``. Each step is a lookup that needs
    the previous node, so decoding a node before its left neighbour is a guess. A problem is held out when a
    fixed hash of its prompt is divisible by ``holdout_mod``; training never sees it.

    Args:
        min_hops: shortest chain (default: 4). max_hops: longest chain (default: 8).
        gen_length: response length, EOS-padded (default: 16). holdout_mod (default: 4).
    """

    name: str = "pointer-chase"
    min_hops: int = 4
    max_hops: int = 8
    prompt_len: int = 14
    gen_length: int = 16
    holdout_mod: int = 4
    default_schedules: tuple[str, ...] = ("2", "4", "8", "16")

    def __post_init__(self) -> None:
        if not 1 <= self.min_hops <= self.max_hops or self.gen_length < self.max_hops + 5:
            raise ConfigError(f"pointer-chase: need 1 <= min_hops <= max_hops <= gen_length - 5, got {self}")

    def _draw(self, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = torch.randint(0, 10, (m, 10), generator=gen)  # (m, 10)
        start = torch.randint(0, 10, (m,), generator=gen)
        k = torch.randint(self.min_hops, self.max_hops + 1, (m,), generator=gen)
        return f, start, k

    show_hops: bool = False

    def _encode(self, f: torch.Tensor, start: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, d0 = f.shape[0], _INDEX["0"]
        prompts = torch.full((m, self.prompt_len), PAD)
        prompts[:, 0] = BOS
        prompts[:, 1:11] = f + d0
        prompts[:, 11] = _INDEX[";"]
        prompts[:, 12] = start + d0
        if self.show_hops:  # "... ; s + k =": the hop count is given, so the answer is unambiguous
            prompts[:, 13] = _INDEX["+"]
            prompts[:, 14] = k + d0
            prompts[:, 15] = _INDEX["="]
        else:
            prompts[:, 13] = _INDEX["="]
        nodes, resps = _walk_answers(f, start, k, self.max_hops, self.gen_length)
        resps[torch.arange(m), k + 4] = nodes[torch.arange(m), k - 1] + d0
        return prompts, resps

    def _held(self, prompts: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(prompts.shape[0], dtype=torch.long)
        for j in range(prompts.shape[1]):
            h = (h * 1_000_003 + prompts[:, j] * 7919 + j) % 2_147_483_647
        return h % self.holdout_mod == 0

    def sample_train(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        f, start, k = self._draw(2 * n + 16, generator)
        prompts, resps = self._encode(f, start, k)
        keep = (~self._held(prompts)).nonzero().squeeze(1)[:n]
        if len(keep) < n:
            return self.sample_train(n, generator)
        return prompts[keep], resps[keep]

    def heldout(self, n: int, seed: int = 1234) -> list[Problem]:
        gen = torch.Generator().manual_seed(seed)
        out: list[Problem] = []
        seen: set[tuple[int, ...]] = set()
        while len(out) < n:
            # Draw in bounded chunks: memory follows the problems kept, not 4x a huge request.
            f, start, k = self._draw(min(4 * n, 1 << 16), gen)
            prompts, resps = self._encode(f, start, k)
            for i in self._held(prompts).nonzero().squeeze(1).tolist():
                key = tuple(prompts[i].tolist())
                if key in seen or len(out) >= n:
                    continue
                seen.add(key)
                out.append(Problem(key, decode(resps[i]).split("####")[1], decode(prompts[i])))
        return out

    def prompt_from_text(self, text: str) -> tuple[int, ...]:
        t = text.strip().rstrip("=")
        fs, _, st = t.partition(";")
        st, _, hops = st.partition("+")
        ok = len(fs) == 10 and fs.isdigit() and len(st) == 1 and st.isdigit()
        if self.show_hops:
            ok = ok and hops.isdigit() and self.min_hops <= int(hops) <= self.max_hops
        if not ok:
            raise ConfigError(f"{self.name} prompts look like {self.prompt_format()}, got {text!r}")
        prompt = [BOS] + encode(fs + ";" + st + (f"+{hops}" if self.show_hops else "") + "=")
        return tuple(prompt + [PAD] * (self.prompt_len - len(prompt)))

    def prompt_format(self) -> str:
        if self.show_hops:
            return (f"'3817450926;4+6=' (f(0)..f(9) as 10 digits ';' start digit '+' hops "
                    f"{self.min_hops}..{self.max_hops} '=')")
        return "'3817450926;4=' (f(0)..f(9) as 10 digits ';' start digit '=')"


@TASKS.register("pointer-chase-k")
@dataclass(frozen=True)
class PointerChaseK(PointerChase):
    """:class:`PointerChase` with the hop count in the prompt (``<bos> f(0..9) ; s + k =``): unambiguous."""

    name: str = "pointer-chase-k"
    prompt_len: int = 16
    show_hops: bool = True


@TASKS.register("exit-walk")
@dataclass(frozen=True)
class ExitWalk(PointerChase):
    """Walk a random function on digits from ``s`` until the walk reaches the exit node 0; answer = hops.

    Prompt ``<bos> f(0..9) ; s =``; response ``s1 .. sj #### j <eos>...`` where ``sj = 0`` is the walk's first
    visit to 0 and ``j`` is drawn uniformly from ``min_hops..max_hops`` (the walk is planted through distinct
    non-zero digits; the other entries of ``f`` are random). Unlike :class:`PointerChaseK`, the answer's
    length (``j + 5`` tokens, then EOS padding) is not stated in the prompt: it is decided by the
    computation, so a decoder that commits ``####``, the count or EOS before the walk is done (large blocks,
    several tokens per step) gets the length, and so the answer, wrong - the variable-length/EOS failure mode
    of the HEX paper, which fixed-length answers cannot show. Built for issue 12's HEX testbed.

    Args:
        min_hops: shortest walk (default: 2). max_hops: longest walk, at most 9 (default: 9).
        gen_length: response length, EOS-padded (default: 16). holdout_mod (default: 4).
    """

    name: str = "exit-walk"
    min_hops: int = 2
    max_hops: int = 9
    prompt_len: int = 14
    gen_length: int = 16
    holdout_mod: int = 4
    default_schedules: tuple[str, ...] = ("2", "4", "8", "16")
    show_hops: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.min_hops <= self.max_hops <= 9 or self.gen_length < self.max_hops + 5:
            raise ConfigError(f"exit-walk: need 1 <= min_hops <= max_hops <= 9 and gen_length >= max_hops + 5, "
                              f"got {self}")

    def _draw(self, m: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = torch.randint(0, 10, (m, 10), generator=gen)  # (m, 10)
        k = torch.randint(self.min_hops, self.max_hops + 1, (m,), generator=gen)  # (m,) hops to the exit
        walk = torch.rand(m, 9, generator=gen).argsort(1) + 1  # (m, 9) distinct non-zero digits
        rows = torch.arange(m)
        for i in range(self.max_hops):  # plant s=walk[0] -> walk[1] -> ... -> walk[k-1] -> 0
            live = i < k
            nxt = torch.where(i + 1 < k, walk[:, min(i + 1, 8)], 0)
            f[rows[live], walk[live, i]] = nxt[live]
        return f, walk[:, 0], k

    def _encode(self, f: torch.Tensor, start: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, d0 = f.shape[0], _INDEX["0"]
        prompts = torch.full((m, self.prompt_len), PAD)
        prompts[:, 0] = BOS
        prompts[:, 1:11] = f + d0
        prompts[:, 11] = _INDEX[";"]
        prompts[:, 12] = start + d0
        prompts[:, 13] = _INDEX["="]
        _, resps = _walk_answers(f, start, k, self.max_hops, self.gen_length)
        resps[torch.arange(m), k + 4] = k + d0  # the hop count
        return prompts, resps


def _walk_answers(f: torch.Tensor, start: torch.Tensor, k: torch.Tensor, max_hops: int,
                  gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The walk ``start -> f(start) -> ...`` (m, max_hops) and the answer canvas both walk tasks share: the first
    ``k`` nodes as digits, EOS after them, ``####`` at positions k..k+3; position k+4 is the task's to fill."""
    m, d0 = f.shape[0], _INDEX["0"]
    nodes = torch.empty(m, max_hops, dtype=torch.long)
    cur = start
    for j in range(max_hops):
        cur = f.gather(1, cur[:, None]).squeeze(1)
        nodes[:, j] = cur
    rows = torch.arange(m)
    live = torch.arange(max_hops)[None, :] < k[:, None]
    resps = torch.full((m, gen_length), EOS)
    resps[:, :max_hops] = torch.where(live, nodes + d0, EOS)
    for j in range(4):
        resps[rows, k + j] = _INDEX["#"]
    return nodes, resps


def _holdout_hash(k: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A fixed integer hash of (length, bit value) deciding the held-out split (vectorised)."""
    h = (value * 0x9E3779B1 + k * 0x85EBCA6B) & 0xFFFFFFFF
    h = h ^ (h >> 15)
    return (h * 0x2C1B3C6D) & 0xFFFFFFFF ^ ((h * 0x2C1B3C6D) & 0xFFFFFFFF) >> 12


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task by name (``TASKS.names()`` lists them)."""
    return TASKS.get(name)(**kwargs)


# ------------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class TinyConfig:
    """Size of :class:`TinyMDM`. Defaults give ~0.35M parameters (1.4 MB in fp32)."""

    vocab_size: int = len(TOKENS)
    max_len: int = 38
    d_model: int = 96
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 384


class _Block(nn.Module):
    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_ff), nn.GELU(), nn.Linear(cfg.d_ff, cfg.d_model))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))  # (B,h,T,hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # bidirectional: no causal mask
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.ff(self.ln2(x))


class TinyMDM(nn.Module):
    """A bidirectional pre-LN transformer denoiser for masked diffusion (no time input, as in RADD/LLaDA).

    Trained with the LLaDA SFT objective (Nie et al., arXiv 2502.09992): prompt never masked, each
    response token masked with probability ``t ~ U(eps, 1)``,
    ``L = E_t [ 1/t * sum_{i masked} -log p(x_i | x_t) ] / (B * G)``.

    Args:
        config: sizes (default: :class:`TinyConfig`).

    Shapes:
        input_ids (B, T) with T <= max_len; optional attention_mask (B, T) of 0/1 (keys to attend);
        returns logits (B, T, V).
    """

    def __init__(self, config: TinyConfig | None = None) -> None:
        super().__init__()
        self.config = config or TinyConfig()
        c = self.config
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.max_len, c.d_model)
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        if T > self.config.max_len:
            raise ConfigError(f"sequence length {T} exceeds the tiny model's context {self.config.max_len}")
        x = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))  # (B, T, C)
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T) keys
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.ln_f(x))  # (B, T, V)


# -------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Training recipe for :func:`train_tiny` (LLaDA SFT loss; AdamW, warm-up then cosine).

    Args:
        task: registered task name (default: ``"pointer-chase-k"``; plain ``pointer-chase`` hides the hop
            count, so its answers are ambiguous: kept only to reproduce that finding).
        steps: optimizer steps (default: 2000). batch_size (default: 128). lr (default: 2e-3).
        warmup: linear warm-up steps (default: 200). weight_decay (default: 0.01). clip (default: 1.0).
        eps: smallest masking ratio t (default: 1e-3). seed (default: 0). threads: torch threads (default: 1).
        model: sizes (default: :class:`TinyConfig`).
        init_from: continue from this tiny checkpoint's weights (fresh optimizer) (default: None).
        prefix_frac: share of each batch masked "semi-AR style": a random answer prefix stays visible and
            the rest is masked with probability t. Not in the LLaDA recipe; it teaches left-to-right rules
            that uniform masking leaves unlearned on the parity chain in a short budget (default: 0.0).
    """

    task: str = "pointer-chase-k"
    steps: int = 2000
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    clip: float = 1.0
    eps: float = 1e-3
    seed: int = 0
    threads: int = 1
    model: TinyConfig = field(default_factory=TinyConfig)
    init_from: str | None = None
    prefix_frac: float = 0.0


def masked_diffusion_loss(model: nn.Module, prompts: torch.Tensor, resps: torch.Tensor,
                          generator: torch.Generator, eps: float = 1e-3, prefix_frac: float = 0.0) -> torch.Tensor:
    """LLaDA SFT loss: mask each response token w.p. t, weight CE by 1/t, normalise by B x G.

    With ``prefix_frac > 0`` that share of rows keeps a random answer prefix visible (masking only after it).
    Shapes: prompts (B, P), resps (B, G) -> scalar.
    """
    B, G = resps.shape
    t = eps + (1 - eps) * torch.rand(B, 1, generator=generator)  # (B, 1)
    masked = torch.rand(B, G, generator=generator) < t  # (B, G)
    if prefix_frac > 0:
        cut = torch.randint(0, G, (B, 1), generator=generator)  # (B, 1)
        semi = torch.rand(B, 1, generator=generator) < prefix_frac  # (B, 1)
        masked = masked & (~semi | (torch.arange(G)[None, :] >= cut))
    noisy = torch.where(masked, torch.full_like(resps, MASK), resps)
    logits = model(torch.cat([prompts, noisy], dim=1))[:, prompts.shape[1]:]  # (B, G, V)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), resps.reshape(-1), reduction="none")
    return (ce.view(B, G) * masked / t).sum() / (B * G)


def check_init_from(cfg: TrainConfig) -> TinyMDM | None:
    """The checkpoint ``cfg.init_from`` (None if unset), refused when its task or model size differ."""
    if cfg.init_from is None:
        return None
    parent, parent_task, _ = load_tiny(cfg.init_from)
    if parent_task != make_task(cfg.task) or parent.config != cfg.model:
        raise ConfigError(f"--init-from {cfg.init_from} has another task or model size than requested "
                          f"({parent_task.name} vs {cfg.task})")
    return parent


def train_tiny(cfg: TrainConfig, on_log: Callable[[int, float], None] | None = None,
               log_every: int = 100) -> tuple[TinyMDM, Task, list[dict[str, float]]]:
    """Train a :class:`TinyMDM` on ``cfg.task``; returns the model (eval mode), the task and a loss log."""
    from outlierkit._utils import seed_everything
    from outlierkit._utils.train import optimizer_step, warmup_cosine

    task = make_task(cfg.task)
    parent = check_init_from(cfg)
    need = task.prompt_len + task.gen_length
    if cfg.model.max_len < need:
        raise ConfigError(f"model.max_len {cfg.model.max_len} < prompt + answer length {need}")
    torch.set_num_threads(cfg.threads)
    gen = seed_everything(cfg.seed)
    model = TinyMDM(cfg.model)
    if parent is not None:
        model.load_state_dict(parent.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps))
    history: list[dict[str, float]] = []
    running, t0 = 0.0, time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        prompts, resps = task.sample_train(cfg.batch_size, gen)
        loss = masked_diffusion_loss(model, prompts, resps, gen, cfg.eps, cfg.prefix_frac)
        running += optimizer_step(loss, opt, sched, model.parameters(), cfg.clip)
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            n = (step % log_every) + 1
            row = {"step": step + 1, "loss": running / n, "seconds": time.perf_counter() - t0}
            history.append(row)
            running = 0.0
            if on_log is not None:
                on_log(step + 1, row["loss"])
    model.eval()
    return model, task, history


# ----------------------------------------------------------------------------------------- save / load

CHECKPOINTS = Path(__file__).parent / "checkpoints"
#: The default checkpoint; ``exit-walk`` (issue 12's HEX testbed) is bundled next to it.
BUNDLED = CHECKPOINTS / "pointer-chase-k"


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A directory as given, or a bundled checkpoint by name (``pointer-chase-k``, ``exit-walk``) when no such
    path exists."""
    p = Path(path_or_name)
    if not p.exists() and (CHECKPOINTS / str(path_or_name) / "config.json").is_file():
        return CHECKPOINTS / str(path_or_name)
    return p


def save_tiny(model: TinyMDM, task: Task, out_dir: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` (model sizes, task, token ids, provenance)."""
    from safetensors.torch import save_file

    from outlierkit._utils import atomic_write_text
    from outlierkit.config import to_dict

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    cfg = {
        "format": "outlierkit-tiny-mdm",
        "model": asdict(model.config),
        "task": {"name": task.name, **{k: v for k, v in to_dict(task).items() if k != "name"}},
        "tokens": {"mask_id": MASK, "eos_id": EOS, "pad_id": PAD, "vocab": list(TOKENS)},
        "meta": meta or {},
    }
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2) + "\n")


def is_tiny_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a tiny checkpoint; a damaged tiny ``config.json`` still counts (so that
    :func:`load_tiny` names the damage instead of the Hugging Face loader failing on it)."""
    p = Path(path) / "config.json"
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    try:
        cfg = json.loads(text)
    except ValueError:
        return "outlierkit-tiny-mdm" in text
    return isinstance(cfg, dict) and cfg.get("format") == "outlierkit-tiny-mdm"


def load_tiny(path: str | Path | None = None) -> tuple[TinyMDM, Task, dict[str, Any]]:
    """Load a tiny checkpoint directory (default: the bundled pointer-chase-k model)."""
    from safetensors.torch import load_file

    p = Path(path) if path is not None else BUNDLED
    if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
        raise ModelLoadError(f"{p} is not a tiny checkpoint (needs config.json and model.safetensors); "
                             "create one with `outlierkit hex train-tiny --out DIR`")
    from safetensors import SafetensorError

    try:
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {p / 'config.json'}: {e}") from None
    try:
        model = TinyMDM(TinyConfig(**cfg["model"]))
        task_cfg = dict(cfg["task"])
        task = make_task(task_cfg.pop("name"), **task_cfg)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{p / 'config.json'} is not a valid tiny checkpoint config "
                             f"({type(e).__name__}: {e})") from None
    try:
        model.load_state_dict(load_file(str(p / "model.safetensors")))
    except (SafetensorError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {p / 'model.safetensors'} (corrupt, truncated or another "
                             f"model's weights): {first}") from None
    model.eval()
    return model, task, cfg.get("meta", {})
