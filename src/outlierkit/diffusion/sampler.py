"""Masked-diffusion sampling (LLaDA-style semi-autoregressive blocks) over any model that returns logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from outlierkit.errors import ConfigError, DataError
from outlierkit.registry import Registry

Remasking = Literal["low_confidence", "margin", "entropy", "random"]


class Denoiser(Protocol):
    """What the sampler needs: ``model(input_ids, attention_mask=...)`` returning logits or ``.logits``."""

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class TokenSpec:
    """Special token ids of a model family.

    LLaDA: mask 126336, eos 126081, eot 126348; Dream: mask 151666. ``pad_id`` pads prompts on the left
    (it must differ from ``mask_id``); ``eos_id``/``eot_id`` end a generation (text after them is cut).

    Args:
        mask_id: the mask token (required).
        eos_id: end of sequence (default: None).
        eot_id: end of turn (default: None).
        pad_id: left padding of prompts (default: None: prompts must have equal length).
    """

    mask_id: int
    eos_id: int | None = None
    eot_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if self.pad_id is not None and self.pad_id == self.mask_id:
            raise ConfigError(f"pad id equals mask id ({self.mask_id}); padding would be denoised")

    @property
    def stop_ids(self) -> tuple[int, ...]:
        return tuple(i for i in (self.eos_id, self.eot_id) if i is not None)


@dataclass(frozen=True)
class SamplerConfig:
    """LLaDA ``generate()`` settings (ML-GSAI/LLaDA ``generate.py``), validated like the reference.

    Nie et al., "Large Language Diffusion Models", arXiv 2502.09992. The answer span of length ``G`` is
    cut into ``G / block_length`` blocks decoded left to right; each block gets ``steps / num_blocks``
    steps, and a step commits the ``k`` masked in-block positions with the highest score, where ``k``
    splits the block's masked count evenly (remainder to the earliest steps). Candidates are
    ``argmax(logits / T + g)``, ``g ~ Gumbel(0, 1)`` in float64 (``T = 0``: plain argmax). Decoded tokens
    are never re-masked. Forward passes (NFE) = ``steps`` whatever the block size. The noise is
    counter-based (see :func:`uniform_noise`): a pure function of (row seed, step, position, token), drawn
    on the model's device, so a row decodes the same alone or in any batch.

    Args:
        gen_length: answer length G (default: 128).
        steps: total denoising steps (default: 128).
        block_length: semi-AR block size; G means one block (default: 32).
        temperature: Gumbel temperature T (default: 0.0).
        remasking: score used to pick positions: ``low_confidence`` (probability of the candidate),
            ``margin`` (top-1 minus top-2 probability, Kim et al. 2502.06768), ``entropy`` (negative
            entropy) or ``random`` (default: ``low_confidence``).
        cfg_scale: classifier-free guidance, ``uncond + (s + 1)(cond - uncond)`` with the prompt masked
            in the unconditional row; 0 disables it (default: 0.0).
        suppress_eos: never propose EOS/EoT as a candidate (LLaDA ``logits_eos_inf``) (default: False).
        eos_last: keep EOS/EoT candidates but give them the lowest score, so they commit only when nothing
            else is left in the block (LLaDA ``confidence_eos_eot_inf``, done on the score) (default: False).
        shift_logits: Dream/AR-initialised models predict token i from position i-1 (default: False).
    """

    gen_length: int = 128
    steps: int = 128
    block_length: int = 32
    temperature: float = 0.0
    remasking: Remasking = "low_confidence"
    cfg_scale: float = 0.0
    suppress_eos: bool = False
    eos_last: bool = False
    shift_logits: bool = False

    def __post_init__(self) -> None:
        if self.gen_length <= 0 or self.steps <= 0:
            raise ConfigError(f"gen_length and steps must be positive, got {self.gen_length}, {self.steps}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.remasking not in REMASKING:
            REMASKING.get(self.remasking)  # raises, listing the valid names
        check_schedule(self.gen_length, self.steps, self.block_length)


def check_schedule(gen_length: int, steps: int, block_length: int) -> int:
    """Validate LLaDA's divisibility rules; returns steps per block."""
    if block_length <= 0 or gen_length % block_length:
        raise ConfigError(f"block length {block_length} does not divide the generation length {gen_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ConfigError(f"steps {steps} is not divisible by the number of blocks {num_blocks} "
                          f"(gen_length {gen_length} / block_length {block_length})")
    if steps // num_blocks > block_length:
        raise ConfigError(f"{steps // num_blocks} steps per block exceed the block length {block_length}; "
                          "some steps would commit nothing")
    return steps // num_blocks


def commit_counts(block_length: int, steps_per_block: int) -> torch.Tensor:
    """Tokens committed at each step of a block: ``floor(n/s)``, +1 for the first ``n mod s`` steps."""
    base, rem = divmod(block_length, steps_per_block)
    counts = torch.full((steps_per_block,), base, dtype=torch.long)
    counts[:rem] += 1
    return counts


# --------------------------------------------------------------------------------------- score rules

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: Position scores for unmasking: ``fn(probs (N, V) float32, candidates (N,), u (N,) uniform) -> (N,)``,
#: over the N masked positions of the current blocks (``u`` is the row's counter-based uniform draw).
REMASKING: Registry[ScoreFn] = Registry("remasking rule")


@REMASKING.register("low_confidence")
def _score_low_confidence(probs: torch.Tensor, cand: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return probs.gather(-1, cand.unsqueeze(-1)).squeeze(-1)  # p(candidate) from un-noised logits


@REMASKING.register("margin")
def _score_margin(probs: torch.Tensor, cand: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    top2 = probs.topk(2, dim=-1).values  # (N, 2)
    return top2[..., 0] - top2[..., 1]


@REMASKING.register("entropy")
def _score_entropy(probs: torch.Tensor, cand: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return (probs * probs.clamp_min(1e-12).log()).sum(-1)  # negative entropy: peaked = high


@REMASKING.register("random")
def _score_random(probs: torch.Tensor, cand: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return u.to(device=cand.device, dtype=torch.float32)  # on the candidates' (the model's) device


# ---------------------------------------------------------------------------------- counter-based noise
#
# Why hand-written: torch has no counter-based generator that gives the same bits on CPU and CUDA, and a
# torch.Generator per row means a Python loop of per-row draws (LLaDA PR #124: a float64 (B, L, V) draw
# is too big, per row is too slow). A hash of (seed, step, position, token) gives every row its own
# stream, drawn in one vectorised call on the model's device, independent of batch composition and of
# how positions are chunked. The mixer is Wellons' two-round multiply-xorshift (hash-prospector); both
# multipliers are below 2**31, so a 32-bit value times a multiplier stays below 2**63: exact in int64.

_M32 = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97
_GOLDEN = 0x9E3779B9


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """In place: mix int64 values in [0, 2**32) to 32 well-spread bits (a bijection on 32-bit values)."""
    x.bitwise_xor_(x >> 16).mul_(_MUL1).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(_MUL2).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 15)


def counter_keys(seeds: torch.Tensor, step: int, pos: torch.Tensor, stream: int) -> torch.Tensor:
    """32-bit key per (row seed, step, answer position, stream). Shapes: seeds, pos (N,) int64 -> (N,)."""
    k = _hash32_((seeds >> 32) & _M32 ^ (stream * _GOLDEN & _M32))
    k = _hash32_(k ^ (seeds & _M32))
    k = _hash32_((k + step * _GOLDEN) & _M32)
    return _hash32_(k ^ _hash32_((pos + _GOLDEN) & _M32))


def uniform_noise(keys: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Uniform (0, 1) float64 from 32-bit keys: ``(hash(key ^ hash(v)) + 0.5) / 2**32``.

    Shapes: keys (N,) -> (N,) without ``vocab_size``; (N, V) with it (one draw per token). 32 bits of
    resolution keep the Gumbel tail to ``-log(-log(1 - 2**-33)) = 22.9``; LLaDA's concern is 16-bit noise.
    """
    if vocab_size is None:
        x = _hash32_(keys.clone())
    else:
        vk = _hash32_(torch.arange(vocab_size, device=keys.device, dtype=torch.long) ^ 0x5BD1E995)  # (V,)
        x = _hash32_(keys[:, None] ^ vk[None, :])  # (N, V)
    return x.double().add_(0.5).mul_(2.0 ** -32)


# ------------------------------------------------------------------------------------------- sampling


@dataclass
class GenerateOutput:
    """Result of :func:`generate`.

    Shapes: ``sequences`` (B, P + G) with the prompt unchanged; ``commit_step`` (B, G): step at which each
    answer position was committed; ``nfe``: forward passes of the model (2x per step with CFG).
    """

    sequences: torch.Tensor
    commit_step: torch.Tensor
    nfe: int
    prompt_length: int

    @property
    def answers(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length:]  # (B, G)


def logits_of(out: Any) -> torch.Tensor:
    """Model output -> logits tensor (accepts a tensor, ``.logits``, or a tuple whose first item is logits)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"model returned {type(out).__name__}; expected logits or an object with .logits")


def _per_row(value: int | Sequence[int] | torch.Tensor | None, default: int, B: int, what: str) -> list[int]:
    if value is None:
        return [default] * B
    if isinstance(value, int):
        return [value] * B
    vals = [int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]
    if len(vals) != B:
        raise ConfigError(f"{what} has {len(vals)} entries for {B} rows")
    return vals


@torch.no_grad()
def generate(
    model: Denoiser,
    prompt_ids: torch.Tensor,
    tokens: TokenSpec,
    config: SamplerConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    block_lengths: int | Sequence[int] | torch.Tensor | None = None,
    remasking: Sequence[str] | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
    seeds: Sequence[int] | None = None,
    max_context: int | None = None,
    work_bytes: int | None = None,
) -> GenerateOutput:
    """Decode ``G = config.gen_length`` tokens after each prompt with masked-diffusion denoising.

    Every row may have its own block length, remasking rule and random generator, so many prompts and
    many schedules run in one forward per step (what HEX needs). All rows share ``steps``, so they take
    the same number of forwards; with one schedule this is exactly LLaDA's ``generate``.

    Args:
        model: denoiser, see :class:`Denoiser`.
        prompt_ids: prompts, left-padded with ``tokens.pad_id`` when lengths differ.
        tokens: special ids.
        config: sampler settings (its ``block_length``/``remasking`` are the per-row defaults).
        attention_mask: 1 for real prompt tokens, 0 for left padding (default: None: all real).
        block_lengths: per-row block length (default: ``config.block_length``).
        remasking: per-row remasking rule (default: ``config.remasking``).
        generators: per-row ``torch.Generator``, each used once to draw the row's seed (default: None).
        seeds: per-row seeds of the counter-based noise, used when ``generators`` is None
            (default: 0 for every row).
        max_context: the model's context length; longer prompt + answer is an error (default: None).
        work_bytes: temporary memory for one chunk of positions in a step (default: None: half the bf16
            size of the step's masked in-block logits).

    Shapes:
        prompt_ids (B, P), attention_mask (B, P) -> :class:`GenerateOutput` with sequences (B, P + G).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] == 0:
        raise DataError(f"prompt_ids must be a non-empty (B, P) tensor, got shape {tuple(prompt_ids.shape)}")
    B, P = prompt_ids.shape
    G, steps = config.gen_length, config.steps
    if max_context is not None and P + G > max_context:
        raise DataError(f"prompt ({P} tokens) + answer ({G}) exceeds the model context {max_context}")
    if (prompt_ids == tokens.mask_id).any():
        raise DataError("a prompt contains the mask token; prompts must be fully observed")
    device = prompt_ids.device
    blocks = _per_row(block_lengths, config.block_length, B, "block_lengths")
    rules = list(remasking) if remasking is not None else [config.remasking] * B
    if len(rules) != B:
        raise ConfigError(f"remasking has {len(rules)} entries for {B} rows")
    rule_names = sorted(set(rules))
    score_fns = [REMASKING.get(r) for r in rule_names]
    if generators is not None:
        if len(generators) != B:
            raise ConfigError(f"generators has {len(generators)} entries for {B} rows")
        # A generator is used once, for the row's seed; the noise itself is counter-based.
        row_seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) if g is not None else 0 for g in generators]
    else:
        row_seeds = [int(s) for s in seeds] if seeds is not None else [0] * B
        if len(row_seeds) != B:
            raise ConfigError(f"seeds has {len(row_seeds)} entries for {B} rows")
    seed_t = torch.tensor([s % 2**62 for s in row_seeds], dtype=torch.long, device=device)  # (B,)
    rule_t = torch.tensor([rule_names.index(r) for r in rules], dtype=torch.long, device=device)  # (B,)

    # Per-row schedule tables: block bounds and commit count at every step.
    start = torch.empty(B, steps, dtype=torch.long)
    count = torch.empty(B, steps, dtype=torch.long)
    for r, b in enumerate(blocks):
        spb = check_schedule(G, steps, b)
        per_block = commit_counts(b, spb)  # (spb,)
        for nb in range(G // b):
            start[r, nb * spb:(nb + 1) * spb] = nb * b
            count[r, nb * spb:(nb + 1) * spb] = per_block
    blk = torch.tensor(blocks, dtype=torch.long)
    start, count, blk = start.to(device), count.to(device), blk.to(device)

    x = torch.cat([prompt_ids, torch.full((B, G), tokens.mask_id, dtype=prompt_ids.dtype, device=device)], 1)
    attn = None
    if attention_mask is not None:
        attn = torch.cat([attention_mask.to(device), torch.ones(B, G, dtype=attention_mask.dtype,
                                                                   device=device)], 1)  # (B, P + G)
    commit_step = torch.full((B, G), -1, dtype=torch.long, device=device)
    pos = torch.arange(G, device=device)
    stop = torch.tensor(tokens.stop_ids, dtype=torch.long, device=device)
    nfe = 0
    for s in range(steps):
        logits = _forward(model, x, attn, config, tokens)  # (B or 2B, P + G, V), the model's dtype
        nfe += 2 if config.cfg_scale > 0 else 1
        if s == 0 and not 0 <= tokens.mask_id < logits.shape[-1]:
            raise ConfigError(f"mask id {tokens.mask_id} is outside the model's vocabulary of "
                              f"{logits.shape[-1]} tokens; pass the model family's mask token")
        masked = x[:, P:] == tokens.mask_id  # (B, G)
        lo = start[:, s, None]
        live = masked & (pos >= lo) & (pos < lo + blk[:, None])  # (B, G): masked, in the current block
        k = torch.minimum(count[:, s], live.sum(1))  # (B,)
        rows, cols = live.nonzero(as_tuple=True)  # (M,), (M,): the only positions that need work
        if rows.numel() == 0:
            continue
        cand, score = step_scores(logits, rows, cols, P, config, tokens, stop, seed_t, rule_t, s,
                                  score_fns, work_bytes=work_bytes)  # (M,), (M,)
        full = torch.full((B, G), -torch.inf, device=device)
        full[rows, cols] = score
        kmax = int(k.max())
        top = full.topk(kmax, dim=1).indices  # (B, kmax)
        take = torch.arange(kmax, device=device)[None, :] < k[:, None]  # (B, kmax)
        sel = torch.zeros(B, G, dtype=torch.bool, device=device)
        sel.scatter_(1, top, take)
        cand_full = x[:, P:].clone()
        cand_full[rows, cols] = cand.to(x.dtype)
        x[:, P:] = torch.where(sel, cand_full, x[:, P:])
        commit_step[sel] = s
        del logits
    return GenerateOutput(sequences=x, commit_step=commit_step, nfe=nfe, prompt_length=P)


def _forward(model: Denoiser, x: torch.Tensor, attn: torch.Tensor | None, config: SamplerConfig,
             tokens: TokenSpec) -> torch.Tensor:
    """One denoiser call on the canvas (plus the prompt-masked rows for CFG); logits as the model gives them.

    Nothing is cast or sliced here: :func:`step_scores` reads only the positions it needs.
    """
    inp, am = x, attn
    if config.cfg_scale > 0:
        P = x.shape[1] - config.gen_length
        un = x.clone()
        un[:, :P] = tokens.mask_id  # LLaDA: the unconditional row masks the prompt
        inp = torch.cat([x, un], 0)  # (2B, P + G)
        am = torch.cat([attn, attn], 0) if attn is not None else None
    out = model(inp, attention_mask=am) if am is not None else model(inp)
    return logits_of(out)  # (B or 2B, P + G, V)


#: Bytes of temporaries per (position, token) element while a chunk is processed (fp32 logits and
#: probabilities, an int64 hash and its shifted copy); sizes chunks to the ``work_bytes`` budget.
_BYTES_PER_ELEMENT = 24


def step_scores(
    logits: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    prompt_length: int,
    config: SamplerConfig,
    tokens: TokenSpec,
    stop: torch.Tensor,
    seeds: torch.Tensor,
    rule_of_row: torch.Tensor,
    step: int,
    score_fns: Sequence[ScoreFn],
    *,
    work_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates and scores at the masked positions ``(rows, cols)`` of the current blocks.

    Only these positions are read from the model's logits and cast to float32, in chunks of positions
    whose temporaries fit ``work_bytes`` (default: half the bf16 size of these positions' logits, so the
    step's own memory stays near 1.5x its bf16 logits; at least one position per chunk). Each chunk is
    rule-homogeneous and draws its Gumbel noise in one vectorised call.

    Shapes: logits (B or 2B with CFG, P + G, V); rows, cols (M,) -> candidates (M,) long, scores (M,) float32.
    """
    B = seeds.shape[0]
    L, V = logits.shape[1], logits.shape[2]
    flat = logits.reshape(-1, V)  # a view: (B' * L, V)
    src = prompt_length + cols - (1 if config.shift_logits else 0)  # Dream: token i is read at i - 1
    src = src.clamp_min(0)
    M = rows.shape[0]
    budget = work_bytes if work_bytes is not None else M * V  # = half of M * V * 2 bytes (bf16)
    per_chunk = max(1, budget // (_BYTES_PER_ELEMENT * V))
    cand = torch.empty(M, dtype=torch.long, device=logits.device)
    score = torch.empty(M, dtype=torch.float32, device=logits.device)
    if len(score_fns) == 1:
        parts = [(0, torch.arange(M, device=logits.device))]
    else:  # chunks are rule-homogeneous: each rule scores its own positions
        rule = rule_of_row[rows]  # (M,)
        parts = [(i, (rule == i).nonzero(as_tuple=True)[0]) for i in range(len(score_fns))]
    for i, idx in parts:
        fn = score_fns[i]
        for c0 in range(0, idx.numel(), per_chunk):
            e = idx[c0:c0 + per_chunk]  # (c,) element indices
            r, col = rows[e], cols[e]
            lg = flat.index_select(0, r * L + src[e]).float()  # (c, V)
            if config.cfg_scale > 0:
                un = flat.index_select(0, (r + B) * L + src[e]).float()  # (c, V)
                lg.sub_(un).mul_(config.cfg_scale + 1).add_(un)  # uncond + (s + 1)(cond - uncond)
                del un
            lg[:, tokens.mask_id] = -torch.inf  # the mask token is never a candidate
            if config.suppress_eos and len(stop):
                lg[:, stop] = -torch.inf
            if config.temperature == 0:
                c_ = lg.argmax(-1)
            else:
                g = uniform_noise(counter_keys(seeds[r], step, col, stream=0), V)  # (c, V) float64
                g.log_().neg_().log_().mul_(-config.temperature).add_(lg)  # l - T log(-log u)
                c_ = g.argmax(-1)
                del g
            u = uniform_noise(counter_keys(seeds[r], step, col, stream=1))  # (c,) for `random`
            probs = torch.softmax(lg, dim=-1)  # (c, V) un-noised, as in LLaDA
            del lg
            sc = fn(probs, c_, u).float()
            del probs
            if config.eos_last and len(stop):
                # Held back by score, not by candidate: finite but below any real score, so an EOS is
                # committed only when the step's quota cannot be met otherwise.
                sc = torch.where(torch.isin(c_, stop), sc - 1e4, sc)
            cand[e] = c_
            score[e] = sc
    return cand, score


# ------------------------------------------------------------------------------------- memory budget

#: On CPU, rows per batched decode stop here: 128-256 rows ran fastest on this machine (larger batches
#: page-fault on tensors over 32 MB; see bench/scale_sampler.py and BENCHMARKS.md).
CPU_MAX_ROWS = 256
#: Headroom per row over the model's logits: the sampler's chunk work, activations, allocator slack.
ROW_OVERHEAD = 1.5
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20,
          "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str | int) -> int:
    """``"8GiB"``, ``"512MB"``, ``"2G"`` (binary), ``"1e9"`` -> bytes; a clear error otherwise."""
    import re

    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", text)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"memory size {text!r} not understood; write e.g. 8GiB, 512MiB, 2GB or bytes")
        value, unit = float(m.group(1)), m.group(2).lower()
    out = int(value * _UNITS[unit])
    if out <= 0:
        raise ConfigError(f"memory size must be positive, got {text!r}")
    return out


def memory_budget(device: torch.device | str) -> int:
    """Default budget for decoding: 80% of the free GPU memory, or half the available RAM on CPU."""
    import os

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.8)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 4 * 2**30


def auto_batch_rows(canvas_length: int, vocab_size: int, logit_bytes: int, *, device: torch.device | str,
                    cfg: bool = False, max_memory: int | None = None) -> int:
    """Rows per batched decode that fit ``max_memory`` (default: :func:`memory_budget`).

    A row costs its canvas logits (``(P + G) x V x bytes``, twice with CFG) times :data:`ROW_OVERHEAD`;
    on CPU at most :data:`CPU_MAX_ROWS`. A budget below one row is an error naming both sizes.
    """
    per_row = canvas_length * vocab_size * logit_bytes * (2 if cfg else 1) * ROW_OVERHEAD
    budget = max_memory if max_memory is not None else memory_budget(device)
    rows = int(budget // per_row)
    if rows < 1:
        raise ConfigError(f"a memory budget of {budget / 2**30:.2f} GiB is below one row's "
                          f"{per_row / 2**30:.2f} GiB of logits ({canvas_length} positions x {vocab_size} "
                          "tokens); raise --max-memory or shorten the prompt/answer")
    return min(rows, CPU_MAX_ROWS) if torch.device(device).type == "cpu" else rows


def truncate_at_stop(ids: Sequence[int], tokens: TokenSpec) -> list[int]:
    """Answer ids up to (not including) the first EOS/EoT."""
    out = []
    for i in ids:
        if i in tokens.stop_ids:
            break
        out.append(int(i))
    return out
