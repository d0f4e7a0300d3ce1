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
    are never re-masked. Forward passes (NFE) = ``steps`` whatever the block size.

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

ScoreFn = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Generator | None]], torch.Tensor]
#: Position scores for unmasking: ``fn(probs (R, G, V) float32, candidates (R, G), generators) -> (R, G)``.
REMASKING: Registry[ScoreFn] = Registry("remasking rule")


@REMASKING.register("low_confidence")
def _score_low_confidence(probs: torch.Tensor, cand: torch.Tensor, gens: Sequence[Any]) -> torch.Tensor:
    return probs.gather(-1, cand.unsqueeze(-1)).squeeze(-1)  # p(candidate) from un-noised logits


@REMASKING.register("margin")
def _score_margin(probs: torch.Tensor, cand: torch.Tensor, gens: Sequence[Any]) -> torch.Tensor:
    top2 = probs.topk(2, dim=-1).values  # (R, G, 2)
    return top2[..., 0] - top2[..., 1]


@REMASKING.register("entropy")
def _score_entropy(probs: torch.Tensor, cand: torch.Tensor, gens: Sequence[Any]) -> torch.Tensor:
    return (probs * probs.clamp_min(1e-12).log()).sum(-1)  # negative entropy: peaked = high


@REMASKING.register("random")
def _score_random(probs: torch.Tensor, cand: torch.Tensor, gens: Sequence[Any]) -> torch.Tensor:
    R, G = cand.shape
    return torch.stack([torch.rand(G, generator=g) for g in gens]) if R else probs.new_zeros(R, G)


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
        generators: per-row ``torch.Generator`` for Gumbel noise and random scores (default: from ``seeds``).
        seeds: per-row seeds, used when ``generators`` is None (default: 0 for every row).
        max_context: the model's context length; longer prompt + answer is an error (default: None).

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
    score_fns = {r: REMASKING.get(r) for r in set(rules)}
    if generators is None:
        row_seeds = list(seeds) if seeds is not None else [0] * B
        if len(row_seeds) != B:
            raise ConfigError(f"seeds has {len(row_seeds)} entries for {B} rows")
        generators = [torch.Generator().manual_seed(int(s)) for s in row_seeds]
    elif len(generators) != B:
        raise ConfigError(f"generators has {len(generators)} entries for {B} rows")

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
        logits = _forward(model, x, attn, config, tokens, P)  # (B, G, V) float32
        nfe += 2 if config.cfg_scale > 0 else 1
        if s == 0 and not 0 <= tokens.mask_id < logits.shape[-1]:
            raise ConfigError(f"mask id {tokens.mask_id} is outside the model's vocabulary of "
                              f"{logits.shape[-1]} tokens; pass the model family's mask token")
        logits[..., tokens.mask_id] = -torch.inf  # the mask token is never a candidate
        if config.suppress_eos and len(stop):
            logits[..., stop] = -torch.inf
        cand = _candidates(logits, config.temperature, generators)  # (B, G)
        probs = torch.softmax(logits, dim=-1)  # (B, G, V) un-noised, as in LLaDA
        score = torch.empty(B, G, device=device)
        for rule, fn in score_fns.items():
            rows = [i for i, r in enumerate(rules) if r == rule]
            score[rows] = fn(probs[rows], cand[rows], [generators[i] for i in rows]).float()
        if config.eos_last and len(stop):
            # Held back by score, not by candidate: finite but below any real score, so an EOS is
            # committed only when the step's quota cannot be met otherwise.
            is_stop = torch.isin(cand, stop)
            score = torch.where(is_stop, score - 1e4, score)
        masked = x[:, P:] == tokens.mask_id  # (B, G)
        lo = start[:, s, None]
        in_block = (pos >= lo) & (pos < lo + blk[:, None])  # (B, G)
        score = torch.where(masked & in_block, score, torch.full_like(score, -torch.inf))
        k = torch.minimum(count[:, s], (masked & in_block).sum(1))  # (B,)
        kmax = int(k.max())
        if kmax == 0:
            continue
        top = score.topk(kmax, dim=1).indices  # (B, kmax)
        take = torch.arange(kmax, device=device)[None, :] < k[:, None]  # (B, kmax)
        sel = torch.zeros(B, G, dtype=torch.bool, device=device)
        sel.scatter_(1, top, take)
        x[:, P:] = torch.where(sel, cand, x[:, P:])
        commit_step[sel] = s
    return GenerateOutput(sequences=x, commit_step=commit_step, nfe=nfe, prompt_length=P)


def _forward(model: Denoiser, x: torch.Tensor, attn: torch.Tensor | None, config: SamplerConfig,
             tokens: TokenSpec, P: int) -> torch.Tensor:
    """One denoiser call on the canvas (plus the prompt-masked row for CFG); returns answer logits."""
    inp, am = x, attn
    if config.cfg_scale > 0:
        un = x.clone()
        un[:, :P] = tokens.mask_id  # LLaDA: the unconditional row masks the prompt
        inp = torch.cat([x, un], 0)  # (2B, P + G)
        am = torch.cat([attn, attn], 0) if attn is not None else None
    out = model(inp, attention_mask=am) if am is not None else model(inp)
    logits = logits_of(out).float()  # (B or 2B, P + G, V)
    if config.shift_logits:  # position i is predicted from hidden state i-1
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)
    if config.cfg_scale > 0:
        cond, uncond = logits.chunk(2, 0)
        logits = uncond + (config.cfg_scale + 1) * (cond - uncond)
    return logits[:, P:].contiguous()  # (B, G, V)


def _candidates(logits: torch.Tensor, temperature: float, gens: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Gumbel-max sampling at temperature T, row by row in float64 (never a (B, G, V) float64 at once).

    LLaDA computes ``argmax exp(l) / (-log u)^T``; its log is ``l - T log(-log u)``, same argmax, no
    overflow. Shapes: logits (B, G, V) -> (B, G).
    """
    if temperature == 0:
        return logits.argmax(-1)
    out = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
    for r, g in enumerate(gens):
        u = torch.rand(logits.shape[1:], generator=g, dtype=torch.float64)  # (G, V), on CPU
        u = u.clamp_min(1e-300).to(logits.device)
        out[r] = (logits[r].double() - temperature * torch.log(-torch.log(u))).argmax(-1)
    return out


def truncate_at_stop(ids: Sequence[int], tokens: TokenSpec) -> list[int]:
    """Answer ids up to (not including) the first EOS/EoT."""
    out = []
    for i in ids:
        if i in tokens.stop_ids:
            break
        out.append(int(i))
    return out
