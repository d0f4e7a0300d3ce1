"""``os_plus``: Outlier Suppression+ channel-wise shifting and scaling (Wei et al., EMNLP 2023)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from outlierkit._utils import progress
from outlierkit.errors import ConfigError
from outlierkit.llm.calibrate import ChannelStats, collect_input_stats
from outlierkit.llm.formats import (
    FP8_MAX,
    Format,
    FP8Format,
    IntFormat,
    fake_quant,
    int_fake_quant,
    int_qparams,
    parse_format,
)
from outlierkit.llm.methods.base import (
    METHODS,
    Group,
    LayerRecord,
    QuantContext,
    QuantMethod,
    _heads,
    can_shift,
    float_module,
    fold_,
    in_weight,
    nothing_to_fold,
    resolve_groups,
    select_groups,
    tie_expand,
    tie_reduce,
)
from outlierkit.llm.models import ModelMap, get_attr, has_attr


def _quant_k(x: torch.Tensor, fmt: Format | None, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Fake-quantize a stack of K candidates (K, ...). Per-tensor formats use the given per-candidate range
    (lo, hi) (K,), the exact min/max of the full candidate tensor, so that a subsampled proxy quantizes each
    kept element as the full problem does; other granularities are per row (token / output channel / group).
    """
    if fmt is None:
        return x
    if fmt.granularity != "tensor":
        return fake_quant(x, fmt)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    lo, hi = lo.reshape(shape).float(), hi.reshape(shape).float()
    if isinstance(fmt, FP8Format):
        fmax = FP8_MAX[fmt.fp8]
        dt = torch.float8_e4m3fn if fmt.fp8 == "e4m3" else torch.float8_e5m2
        if not fmt.scaled:
            return x.clamp(-fmax, fmax).to(dt).to(x.dtype)
        scale = torch.maximum(lo.abs(), hi.abs()) / fmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return (x / scale).clamp(-fmax, fmax).to(dt).to(x.dtype) * scale
    assert isinstance(fmt, IntFormat)
    scale, zp = int_qparams(lo, hi, fmt.bits, fmt.symmetric)
    return int_fake_quant(x, scale, zp, fmt.bits, fmt.symmetric)


def _float_copy(norm: Any) -> nn.Module:
    """An fp32 copy of a q/k norm: the loss runs in fp32 whatever the model's dtype (fp64, bf16) or device,
    and the model's own module must not be moved or cast."""
    return copy.deepcopy(norm).float()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


@dataclass
class Problem:
    """Everything the OS+ loss of one fold group needs (float tensors on CPU).

    ``xs[b]`` is the shifted input X~ of cached batch b, (B, T, C); ``targets[b]`` the float output of the
    downstream block on the unshifted input; ``weights`` the consumers' (O, C) weights, ``biases`` their
    biases with the shift already absorbed (b + W z).
    """

    xs: list[torch.Tensor]
    masks: list[torch.Tensor]
    targets: list[torch.Tensor]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    role: Literal["attn", "swiglu", "linear"]
    c: torch.Tensor  # (C,) max |X~_j| per consumer channel (tied over GQA groups)
    wfmt: Format | None
    afmt: Format | None
    attn: dict[str, Any] = field(default_factory=dict)
    # Per-tensor quantizer ranges of the FULL problem, so that a subsampled proxy quantizes exactly as the
    # full problem does: per input channel min/max of X~ over every cached position (pads included, as the
    # dynamic range of the reference loss), and per weight the column min/max over all output rows.
    xmin: torch.Tensor | None = None  # (C,)
    xmax: torch.Tensor | None = None  # (C,)
    wcols: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per weight ((C,), (C,))
    tok_w: list[torch.Tensor] | None = None  # (B, T) per batch: token weights of a subsample (None = mask)
    col_w: torch.Tensor | None = None  # (O',) output-column weights of a subsample (None = 1)

    def __post_init__(self) -> None:
        if self.xs and self.xmin is None:
            self.xmin = torch.stack([x.reshape(-1, x.shape[-1]).amin(0) for x in self.xs]).amin(0)
            self.xmax = torch.stack([x.reshape(-1, x.shape[-1]).amax(0) for x in self.xs]).amax(0)
        if self.wcols is None:
            self.wcols = [(w.amin(0), w.amax(0)) for w in self.weights]

    def block(self, xq: torch.Tensor, ws: list[torch.Tensor], b: int) -> torch.Tensor:
        """Downstream block output. xq (K, B, T, C), ws[i] (K, O_i, C) -> (K, B, T, O')."""
        outs = []
        for w, bias in zip(ws, self.biases, strict=True):
            y = torch.matmul(xq, w.transpose(-1, -2).unsqueeze(1))  # (K, B, T, O)
            outs.append(y if bias is None else y + bias)
        if self.role == "linear":
            return torch.cat(outs, dim=-1)
        if self.role == "swiglu":
            act = self.attn["act_fn"]
            if len(outs) == 1:  # fused gate_up (Phi-3)
                g, u = outs[0].chunk(2, dim=-1)
            else:
                g, u = outs
            return act(g) * u
        return self._attention(outs, b)

    def _attention(self, qkv: list[torch.Tensor], b: int) -> torch.Tensor:
        """softmax(q k^T * scaling + mask) v with RoPE, q/k norms and GQA repeat; (K, B, T, H*D)."""
        a = self.attn
        h, kv, d = a["heads"], a["kv_heads"], a["head_dim"]
        k_, bsz, t, _ = qkv[0].shape
        q = qkv[0].reshape(k_, bsz, t, h, d)
        k = qkv[1].reshape(k_, bsz, t, kv, d)
        v = qkv[2].reshape(k_, bsz, t, kv, d)
        if a.get("q_norm") is not None:
            q, k = a["q_norm"](q), a["k_norm"](k)
        q, k, v = (x.permute(0, 1, 3, 2, 4) for x in (q, k, v))  # (K, B, heads, T, D)
        pe = a["pe"][b] if a.get("pe") else None
        if pe:
            cos, sin = (p[:, None, :, :] for p in pe)  # (B, 1, T, D)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if kv != h:
            k = k.repeat_interleave(h // kv, dim=2)
            v = v.repeat_interleave(h // kv, dim=2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * a["scaling"]  # (K, B, H, T, T)
        keep = self.masks[b].bool()[:, None, None, :]  # (B, 1, 1, T) keys
        if a["causal"]:
            keep = keep & torch.ones(t, t, dtype=torch.bool, device=keep.device).tril()
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(dim=-1), v)  # (K, B, H, T, D)
        return out.permute(0, 1, 3, 2, 4).reshape(k_, bsz, t, h * d)

    @torch.no_grad()
    def losses(self, ts: torch.Tensor) -> torch.Tensor:
        """Loss of each candidate clip threshold in ``ts`` (K,): mean over tokens of sum_out err^2."""
        ts = ts.to(self.c.device)
        s = torch.clamp(self.c[None, :] / ts[:, None], min=1.0)  # (K, C) = max(1, max|X~_j| / t)
        assert self.wcols is not None and self.xmin is not None and self.xmax is not None
        ws = [_quant_k(w[None] * s[:, None, :], self.wfmt, (lo[None] * s).amin(-1), (hi[None] * s).amax(-1))
              for w, (lo, hi) in zip(self.weights, self.wcols, strict=True)]  # (K, O, C)
        alo, ahi = (self.xmin[None] / s).amin(-1), (self.xmax[None] / s).amax(-1)  # (K,) per-tensor range
        total = torch.zeros(len(ts), dtype=torch.float64, device=self.c.device)
        n = 0.0
        for b, x in enumerate(self.xs):
            xq = _quant_k(x[None] / s[:, None, None, :], self.afmt, alo, ahi)  # (K, B, T, C)
            sq = (self.block(xq, ws, b) - self.targets[b]).pow(2)  # (K, B, T, O')
            err = sq.sum(-1) if self.col_w is None else (sq * self.col_w).sum(-1)  # (K, B, T)
            if self.tok_w is None:
                m = self.masks[b].bool()
                total += err[:, m].double().sum(-1)
                n += int(m.sum())
            else:
                total += (err.double() * self.tok_w[b]).sum((-1, -2))
                n += float(self.tok_w[b].sum())
        return (total / max(n, 1)).cpu()

    def subsample(self, tok_frac: float, row_frac: float, seed: int = 0, min_tokens: int = 128,
                  min_rows: int = 64) -> Problem | None:
        """A cheaper proxy of this problem on a subset of tokens (whole sequences for attention) and of
        output rows (KV-head groups for attention); None when it would not be much smaller.

        Kept: the token (sequence) holding each of the largest activations, the rest drawn uniformly with
        importance weights so that the proxy loss estimates the full one. Quantizer ranges stay those of
        the full problem (``xmin``/``xmax``/``wcols``), so each kept row is quantized exactly as in full.
        """
        g = torch.Generator().manual_seed(seed)
        if self.role == "attn":
            return self._subsample_attn(tok_frac, row_frac, g, min_tokens, min_rows)
        dev = self.c.device
        xs = torch.cat([x[m.bool()] for x, m in zip(self.xs, self.masks, strict=True)])  # (N, C)
        tg = torch.cat([t[m.bool()] for t, m in zip(self.targets, self.masks, strict=True)])  # (N, O')
        n = xs.shape[0]
        k = max(min_tokens, int(n * tok_frac))
        widths = [w.shape[0] for w in self.weights]
        fused = self.role == "swiglu" and len(self.weights) == 1  # gate_up stacked in one weight
        o_units = widths[0] // 2 if fused else widths[0] if self.role == "swiglu" else sum(widths)
        r = max(min_rows, int(o_units * row_frac))
        if k >= 0.75 * n and r >= 0.75 * o_units:
            return None
        # tokens: those holding the per-channel maxima of |X~| (at most k/4 of them), the rest at random
        top = torch.unique((xs.abs() / self.c.clamp(min=1e-30)).argmax(0))
        top = top[xs.abs().amax(1)[top].argsort(descending=True)][: max(1, k // 4)]
        rest = torch.ones(n, dtype=torch.bool)
        rest[top] = False
        pool = rest.nonzero().flatten()
        draw = pool[torch.randperm(len(pool), generator=g)[: max(0, k - len(top))]]
        keep = torch.cat([top, draw.to(top.device)])
        tw = torch.ones(len(keep), dtype=torch.float64)
        if len(draw):
            tw[len(top):] = len(pool) / len(draw)
        if r < o_units:
            rows = torch.randperm(o_units, generator=g)[:r].sort().values
            cw = torch.full((r,), o_units / r)
        else:
            rows, cw = torch.arange(o_units), torch.ones(o_units)
        if self.role == "swiglu":
            if fused:
                half = widths[0] // 2
                weights = [self.weights[0][torch.cat([rows, rows + half]).to(dev)]]
                biases = [b[torch.cat([rows, rows + half]).to(dev)] if b is not None else None for b in self.biases]
            else:
                weights = [w[rows.to(dev)] for w in self.weights]
                biases = [b[rows.to(dev)] if b is not None else None for b in self.biases]
            cols = rows
        else:  # linear: rows are drawn over the concatenated outputs
            offsets = torch.tensor([0, *widths]).cumsum(0)
            weights, biases, cols = [], [], rows
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                mine = rows[(rows >= offsets[i]) & (rows < offsets[i + 1])] - offsets[i]
                weights.append(w[mine.to(dev)])
                biases.append(b[mine.to(dev)] if b is not None else None)
        x_sub = xs[keep.to(dev)][None]  # (1, k, C)
        t_sub = tg[keep.to(dev)][:, cols.to(dev)][None]  # (1, k, O'')
        mask = torch.ones(1, len(keep), dtype=torch.long, device=dev)
        return Problem([x_sub], [mask], [t_sub], weights, biases, self.role, self.c, self.wfmt, self.afmt,
                       self.attn, self.xmin, self.xmax, self.wcols, [tw[None].to(dev)], cw.to(dev).float())

    def _subsample_attn(self, tok_frac: float, row_frac: float, g: torch.Generator, min_tokens: int,
                        min_rows: int) -> Problem | None:
        a = self.attn
        h, kv, d = a["heads"], a["kv_heads"], a["head_dim"]
        seqs = [(b, i) for b, x in enumerate(self.xs) for i in range(x.shape[0])]
        n_seq = len(seqs)
        k = max(1, math.ceil(min_tokens / self.xs[0].shape[1]), int(round(n_seq * tok_frac)))
        r = max(1, math.ceil(min_rows / (h // kv * d)), int(round(kv * row_frac)))
        if k >= 0.75 * n_seq and r >= 0.75 * kv:
            return None
        peak = [float((self.xs[b][i].abs() * self.masks[b][i, :, None]).amax()) for b, i in seqs]
        first = max(range(n_seq), key=lambda j: peak[j])  # the sequence with the largest activation
        others = [j for j in torch.randperm(n_seq, generator=g).tolist() if j != first][: k - 1]
        chosen = [first, *others]
        sw = (n_seq - 1) / max(1, len(others))
        dev = self.c.device
        groups = torch.randperm(kv, generator=g)[:r].sort().values
        q_heads = torch.cat([torch.arange(int(j) * (h // kv), (int(j) + 1) * (h // kv)) for j in groups])
        q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten().to(dev)
        kv_rows = (groups[:, None] * d + torch.arange(d)).flatten().to(dev)
        sel = [q_rows, kv_rows, kv_rows]
        weights = [w[i] for w, i in zip(self.weights, sel, strict=True)]
        biases = [b[i] if b is not None else None for b, i in zip(self.biases, sel, strict=True)]
        xs, masks, targets, tws, pes = [], [], [], [], []
        for j in chosen:
            b, i = seqs[j]
            xs.append(self.xs[b][i:i + 1])
            masks.append(self.masks[b][i:i + 1])
            targets.append(self.targets[b][i:i + 1][..., q_rows])
            tws.append(self.masks[b][i:i + 1].double() * (1.0 if j == first else sw))
            pe = a["pe"][b] if a.get("pe") else None
            pes.append(tuple(p_[i:i + 1] if p_.shape[0] > 1 else p_ for p_ in pe) if pe else None)  # (1, T, D)
        attn = dict(a, heads=len(q_heads), kv_heads=r, pe=pes)
        return Problem(xs, masks, targets, weights, biases, self.role, self.c, self.wfmt, self.afmt, attn,
                       self.xmin, self.xmax, self.wcols, tws, torch.full((len(q_rows),), kv / r, device=dev))

    def scales(self, t: float) -> torch.Tensor:
        return torch.clamp(self.c / t, min=1.0)


def budget_chunk(p: Problem, budget: int = 1 << 24) -> int:
    """Candidates per batched call so that the largest stacked tensor stays under ``budget`` elements."""
    bt = max(x.shape[0] * x.shape[1] for x in p.xs)
    width = max(p.xs[0].shape[-1], sum(w.shape[0] for w in p.weights))
    if p.role == "attn":
        width = max(width, p.attn["heads"] * max(x.shape[1] for x in p.xs))
    return max(1, min(64, budget // max(1, bt * width)))


def candidates(c: torch.Tensor, floor: float, max_candidates: int) -> torch.Tensor:
    """t from T = max c down to ``floor`` in uniform steps of (T - floor) / n, n = max(100, T / 0.5)."""
    big_t = float(c.max())
    if big_t <= floor:
        return torch.tensor([big_t])
    n = min(max(100, int(big_t / 0.5)), max_candidates)
    step = (big_t - floor) / n
    return torch.tensor([big_t - i * step for i in range(n)], dtype=torch.float32)


def search_vectorized(p: Problem, ts: torch.Tensor, chunk: int, how: str = "grid",
                      stride: int = 8) -> tuple[int, torch.Tensor]:
    """Index of the best candidate; ``grid`` evaluates all (``chunk`` at a time), ``coarse`` every
    ``stride``-th then the full grid around the coarse best (the loss is smooth in t)."""
    def run(idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.losses(ts[idx[i:i + chunk]]) for i in range(0, len(idx), chunk)])

    if how == "coarse" and len(ts) > 4 * stride:
        coarse = torch.arange(0, len(ts), stride)
        lc = run(coarse)
        best = int(coarse[int(lc.argmin())])
        fine = torch.arange(max(0, best - stride + 1), min(len(ts), best + stride))
        lf = run(fine)
        return int(fine[int(lf.argmin())]), lf
    losses = run(torch.arange(len(ts)))
    return int(losses.argmin()), losses


# Successive halving over proxies: (token fraction, row fraction, share of candidates kept after the stage).
HALVING_STAGES: tuple[tuple[float, float, float], ...] = ((1 / 8, 1 / 8, 0.1), (1 / 2, 1 / 2, 0.2))


def search_halving(p: Problem, ts: torch.Tensor, chunk: int = 1, *, seed: int = 0, min_keep: int = 8,
                   stages: tuple[tuple[float, float, float], ...] = HALVING_STAGES,
                   descents: int = 3) -> tuple[int, torch.Tensor]:
    """Index of the best candidate by successive halving with exact verification.

    Every candidate is scored on a cheap proxy (``p.subsample``: 1/8 of the tokens x 1/8 of the output
    rows, with the full problem's quantizer ranges), the best 10% go on to a 1/2 x 1/2 proxy, the best 20%
    of those (at least ``min_keep``) are scored with the exact loss, and a local descent on the exact loss
    over grid neighbours (+-2) from each of the ``descents`` best verifies the winner (it moves while a
    neighbour is better). Proxies that would not be much smaller than the problem (or hold fewer than 128
    tokens / 64 output rows) are skipped, so small problems get the full grid.

    Returns the index and the exact losses of the candidates scored exactly (NaN elsewhere).
    """
    def run(q: Problem, idx: torch.Tensor) -> torch.Tensor:
        return torch.cat([q.losses(ts[idx[i:i + chunk]]) for i in range(0, len(idx), chunk)])

    n = len(ts)
    idx = torch.arange(n)
    for tok_frac, row_frac, keep in stages:
        if len(idx) <= min_keep:
            break
        q = p.subsample(tok_frac, row_frac, seed=seed)
        if q is None:
            continue
        proxy = run(q, idx)
        idx = idx[proxy.argsort()[: max(min_keep, math.ceil(len(idx) * keep))]]
    exact = torch.full((n,), math.nan, dtype=torch.float64)
    exact[idx] = run(p, idx).double()
    starts = idx[exact[idx].argsort()[:descents]].tolist()
    for best in starts:  # verification: from each of the best few, walk downhill while a neighbour is better
        while True:
            nbrs = torch.tensor([j for j in (best - 2, best - 1, best + 1, best + 2)
                                 if 0 <= j < n and math.isnan(float(exact[j]))], dtype=torch.long)
            if len(nbrs):
                exact[nbrs] = run(p, nbrs).double()
            near = [j for j in range(max(0, best - 2), min(n, best + 3)) if not math.isnan(float(exact[j]))]
            nxt = min(near, key=lambda j: float(exact[j]))
            if nxt == best:
                break
            best = nxt
    scored = (~exact.isnan()).nonzero().flatten()
    return int(scored[int(exact[scored].argmin())]), exact


def search_loop(p: Problem, ts: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The straightforward reference: one candidate at a time (for tests and the speed benchmark)."""
    losses = torch.stack([p.losses(ts[i:i + 1])[0] for i in range(len(ts))])
    return int(losses.argmin()), losses


@METHODS.register("os_plus")
@dataclass
class OSPlus(QuantMethod):
    """Outlier Suppression+ (Wei et al., "Outlier Suppression+: Accurate quantization of large language
    models by equivalent and effective shifting and scaling", EMNLP 2023).

    For each fold group with input X (tokens x C) and consumer weights W::

        z_j = (max_t X_tj + min_t X_tj) / 2                   (only where biases absorb it)
        s_j(t) = max(1, max_t |X_tj - z_j| / t),   t* = argmin_t E|| f(Q(X~/s), Q(W s)) - f(X, W) ||^2
        producer: y -> (y - z) / s;   consumers: b -> b + W z,  W[:, j] -> W[:, j] s_j

    where f is the downstream block: attention output for q/k/v, act(gate)*up for gate/up, the linear
    output otherwise. t runs from T = max_j max|X~_j| down to ``floor`` in n = max(100, T / 0.5) steps.

    Args:
        folds: fold kinds to transform (default all: ``norm``, ``attn_v``, ``linear`` (up -> down)).
        groups: only the fold groups whose first consumer linear matches one of these FQNs or ``re:`` regexes
            (default None: all; the planner's per-group choice writes them).
        shift: apply the channel shift where a bias can absorb it (default True; never for RMSNorm or
            up -> down, where no bias exists or the shift would not be exact).
        floor: lowest clip threshold (default 1.0 as in the OPT code and llmc; the LLaMA code uses 0.1).
        max_candidates: cap on n (default 400) for models with 1e5 peaks.
        batches: calibration batches the search runs on (default None = all).
        max_tokens: cap on tokens used by the search (default 2048; whole batches are kept).
        search: ``halving`` (default: every candidate on a cheap proxy, the best on finer proxies, the last
            few exactly, verified by a local descent; see :func:`search_halving`), ``grid`` (every candidate
            with the exact loss, as the reference code) or ``coarse`` (every 8th candidate, then every one
            around the best; kept for comparison: the loss is not smooth enough for it to find the optimum).
        chunk: candidates evaluated in one batched call (default 0 = 1 on CPU, where batching measured
            slower, and a memory budget on GPU).
        device: where the search runs (default: the model's device; in sequential mode the compute device,
            so that a model kept in CPU memory still searches on the accelerator).
        weight / act: formats assumed in the loss (default: the recipe's).

    Shapes:
        cached X: (B, T, C) per batch; candidate stacks (K, B, T, C) and (K, O, C).
    """

    folds: tuple[str, ...] = ("norm", "attn_v", "linear")
    groups: list[str] | None = None
    shift: bool = True
    floor: float = 1.0
    max_candidates: int = 400
    batches: int | None = None
    max_tokens: int = 2048
    search: Literal["halving", "grid", "coarse"] = "halving"
    chunk: int = 0
    device: str | None = None
    weight: str | None = None
    act: str | None = None
    transform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        bad = set(self.folds) - {"norm", "attn_v", "linear"}
        if bad:
            raise ConfigError(f"os_plus.folds: unknown kind(s) {sorted(bad)}; valid: norm, attn_v, linear")
        if self.floor <= 0:
            raise ConfigError(f"os_plus.floor must be positive, got {self.floor}")
        if self.max_candidates < 1:
            raise ConfigError("os_plus.max_candidates must be at least 1")
        if self.search not in ("halving", "grid", "coarse"):
            raise ConfigError(f"os_plus.search must be halving, grid or coarse, got {self.search!r}")

    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        groups = select_groups(resolve_groups(model, mm, tuple(self.folds), "os_plus"), self.groups, "os_plus")
        if not groups:
            return nothing_to_fold(ctx, mm, "os_plus", self.folds, "transformed")
        wfmt = parse_format(self.weight, "os_plus.weight") if self.weight else ctx.weight
        afmt = parse_format(self.act, "os_plus.act") if self.act else ctx.act
        n_batches = self._n_batches(ctx)
        # Norm groups first, then v -> o and up -> down (their producers are consumers of norm groups).
        groups.sort(key=lambda g: (g.layer, g.spec.kind != "norm"))
        records = []
        sites = sorted({g.linears[0] for g in groups})
        attn_sites = {g.linears[0]: mm.fqn(g.layer, mm.spec.attn) for g in groups
                      if g.spec.role == "qkv" and has_attr(model, mm.fqn(g.layer, mm.spec.attn))}
        stats = collect_input_stats(model, sites, ctx.batches, cache=set(sites), cache_batches=n_batches,
                                    context_sites=attn_sites, sequential=ctx.sequential, device=ctx.device)
        search_on = self.device or (str(ctx.device) if ctx.sequential and ctx.device is not None else None)
        for g in progress(groups, description="os_plus: scale search, fold group"):
            records.append(self._fold_group(model, mm, g, stats[g.linears[0]], wfmt, afmt, device=search_on))
        return records

    def _n_batches(self, ctx: QuantContext) -> int:
        n = len(ctx.batches) if self.batches is None else min(self.batches, len(ctx.batches))
        tokens, keep = 0, 0
        for b in ctx.batches[:n]:
            if keep and tokens + int(b.attention_mask.sum()) > self.max_tokens:
                break
            tokens += int(b.attention_mask.sum())
            keep += 1
        return max(keep, 1)

    @torch.no_grad()
    def problem(self, model: nn.Module, mm: ModelMap, g: Group, st: ChannelStats, wfmt: Format | None,
                afmt: Format | None, *, device: str | None = None) -> tuple[Problem, torch.Tensor | None]:
        """Build the loss problem of group ``g`` (before folding); returns it and the shift z (R,).
        ``device``: where the search runs (default: ``self.device``, else the model's device)."""
        shift = self.shift and g.spec.kind in ("norm", "attn_v") and can_shift(model, g)
        z = None
        if shift:
            hi = tie_reduce(st.max.double(), g, "amax")
            lo = tie_reduce(st.min.double(), g, "amin")
            z = ((hi + lo) / 2).float()  # (R,)
        z_cols = tie_expand(z, g) if z is not None else torch.zeros_like(st.max)
        c_cols = torch.maximum((st.max - z_cols).abs(), (st.min - z_cols).abs())
        c = tie_expand(tie_reduce(c_cols.double(), g, "amax"), g).float()  # (C,)
        mods = [float_module(model, n) for n in g.linears]
        weights = [in_weight(m).detach().float().cpu().reshape(-1, in_weight(m).shape[-1]) for m in mods]
        biases: list[torch.Tensor | None] = []
        for m, _w in zip(mods, weights, strict=True):
            b = getattr(m, "bias", None)
            b = b.detach().float().cpu() if isinstance(b, torch.Tensor) else None
            biases.append(b)
        role: Literal["attn", "swiglu", "linear"] = "linear"
        attn: dict[str, Any] = {}
        names = [n.rsplit(".", 1)[-1] for n in g.linears]
        if g.spec.role == "qkv" and len(mods) == 3 and has_attr(model, mm.fqn(g.layer, mm.spec.attn)):
            am = get_attr(model, mm.fqn(g.layer, mm.spec.attn))
            h, kv, d = _heads(model)
            if weights[0].shape[0] == h * d and weights[1].shape[0] == kv * d:
                role = "attn"
                qn, kn = getattr(am, "q_norm", None), getattr(am, "k_norm", None)
                per_head = qn is not None and qn.weight.numel() == d
                attn = dict(heads=h, kv_heads=kv, head_dim=d, causal=mm.spec.causal,
                            scaling=float(getattr(am, "scaling", d**-0.5)),
                            q_norm=_float_copy(qn) if per_head else None,
                            k_norm=_float_copy(kn) if per_head else None,
                            pe=[c_.get("position_embeddings") for c_ in st.context])
        elif g.spec.role == "mlp_in" and (len(mods) == 2 or "gate_up_proj" in names):
            mlp = get_attr(model, mm.fqn(g.layer, "mlp"))
            act_fn = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
            if act_fn is not None and (len(mods) == 1 or names[0].startswith("gate")):
                role, attn = "swiglu", {"act_fn": act_fn}
        where = device or self.device
        dev = torch.device(where) if where else next(model.parameters()).device
        for key in ("q_norm", "k_norm"):
            if attn.get(key) is not None:
                attn[key] = attn[key].to(dev)
        weights = [w.to(dev) for w in weights]
        biases = [b.to(dev) if b is not None else None for b in biases]
        c, z_cols = c.to(dev), z_cols.to(dev)
        masks = [m_.to(dev) for m_ in st.masks]
        if attn.get("pe"):
            attn["pe"] = [tuple(t_.to(dev) for t_ in pe) if pe else None for pe in attn["pe"]]
        xs, targets = [], []
        p0 = Problem([], masks, [], weights, biases, role, c, wfmt, afmt, attn)
        for b, x in enumerate(st.cached):
            x = x.to(dev)
            targets.append(p0.block(x[None], [w[None] for w in weights], b)[0])  # (B, T, O')
            xs.append(x - z_cols)
        if z is not None:  # the consumers' biases absorb W z
            biases = [bb + w @ z_cols if bb is not None else None for bb, w in zip(biases, weights, strict=True)]
        return Problem(xs, masks, targets, weights, biases, role, c, wfmt, afmt, attn), z

    def _chunk(self, p: Problem) -> int:
        if self.chunk:
            return self.chunk
        if p.c.device.type == "cpu":  # measured: batching candidates is slower than one at a time on CPU
            return 1
        return budget_chunk(p)

    @torch.no_grad()
    def _fold_group(self, model: nn.Module, mm: ModelMap, g: Group, st: ChannelStats, wfmt: Format | None,
                    afmt: Format | None, *, device: str | None = None) -> LayerRecord:
        p, z = self.problem(model, mm, g, st, wfmt, afmt, device=device)
        ts = candidates(p.c, self.floor, self.max_candidates)
        if self.search == "halving":
            best, losses = search_halving(p, ts, self._chunk(p))
            losses = losses[~losses.isnan()]
        else:
            best, losses = search_vectorized(p, ts, self._chunk(p), self.search)
        t = float(ts[best])
        s_rows = tie_reduce(p.scales(t).double().cpu(), g, "amax")
        fold_(model, g, s_rows, z)
        return LayerRecord(g.name, "os_plus", {
            "loss": p.role, "shift": z is not None, "candidates": len(ts), "t": t, "T": float(ts[0]),
            "s_max": float(s_rows.max()), "channels_scaled": int((s_rows > 1).sum()),
            "absmax_before": float(torch.maximum(st.max.abs(), st.min.abs()).max()),
            "absmax_after": float((p.c / p.scales(t)).max()), "search": self.search,
            "best_loss": float(losses.min()) if math.isfinite(float(losses.min())) else None})
