"""Streaming, mergeable per-site activation statistics (moments, extremes with locations, histograms).

Every statistic is a reduction that can be merged: two ``SiteStats`` built on disjoint token sets merge
into the statistics of their union (associative, order-independent within float tolerance), which is
what lets runs be split across processes (``torch.distributed``) and resumed from checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

# Histogram of |x| binned on the float32 bit pattern: shifting out 17 of the 23 mantissa bits leaves 8
# exponent + 6 mantissa bits, i.e. 16,384 bins with 1.6% relative resolution over the whole float range.
# One shift and one bincount per batch, far cheaper than log10 + histc, and nothing is ever clamped.
HIST_SHIFT = 17
HIST_BINS = 1 << (31 - HIST_SHIFT)
TOPK = 16
MAX_MASSIVE_RECORDS = 64


@dataclass
class Loc:
    """Where a value occurred: corpus sample, token position, channel, token id (-1 = unknown)."""

    sample: int = -1
    pos: int = -1
    channel: int = -1
    token: int = -1

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([self.sample, self.pos, self.channel, self.token], dtype=torch.long)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Loc:
        a = [int(v) for v in t.tolist()]
        return cls(*a)


@dataclass
class TokenInfo:
    """Per-batch token metadata the collector passes to every site: flat (B*T) -> sample/pos/token."""

    sample: torch.Tensor  # (N,) corpus sample id of each valid token
    pos: torch.Tensor  # (N,) position in its sample
    token: torch.Tensor  # (N,) token id


@dataclass
class SiteStats:
    """Statistics of one activation site over all valid (non-padding, finite) tokens seen so far.

    Shapes: per-channel tensors are ``(C,)``; ``top_vals`` ``(k,)`` signed values with ``top_locs``
    ``(k, 4)``; ``hist`` ``(HIST_BINS,)`` counts of |x| by float32 bit pattern.
    """

    channels: int
    per_token: bool = True
    stride: int = 1  # distribution statistics use every ``stride``-th token
    count: int = 0  # elements
    tokens: int = 0
    s1: float = 0.0
    s2: float = 0.0
    # distribution statistics (histogram, power sums for kurtosis, mean |x|) over the token subsample
    dcount: int = 0
    d1: float = 0.0
    d2: float = 0.0
    d3: float = 0.0
    d4: float = 0.0
    dabs: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf
    loc_min: Loc = field(default_factory=Loc)
    loc_max: Loc = field(default_factory=Loc)
    ch_min: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    ch_max: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    top_vals: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    top_locs: torch.Tensor = field(default_factory=lambda: torch.empty(0, 4, dtype=torch.long))
    hist: torch.Tensor = field(default_factory=lambda: torch.zeros(HIST_BINS, dtype=torch.float64))
    massive_tokens: int = 0
    max_token_ratio: float = 0.0
    loc_max_ratio: Loc = field(default_factory=Loc)
    massive: list[tuple[float, float, Loc]] = field(default_factory=list)  # (token max, ratio, loc)
    nonfinite_tokens: int = 0
    loc_nonfinite: Loc = field(default_factory=Loc)

    def __post_init__(self) -> None:
        if self.ch_min.numel() == 0:
            self.ch_min = torch.full((self.channels,), math.inf)
            self.ch_max = torch.full((self.channels,), -math.inf)

    # ------------------------------------------------------------------ update from one batch
    @torch.no_grad()
    def update(self, x: torch.Tensor, info: TokenInfo, *, massive_abs: float = 100.0,
               massive_ratio: float = 1000.0) -> torch.Tensor | None:
        """Add the valid tokens ``x`` ``(N, C)`` of one batch (padding already removed).

        Exact over every token: count, mean, rms, min/max and absmax with locations, per-channel
        min/max, top-k, the massive-activation test. The histogram (quantiles), the higher power sums
        (kurtosis) and mean |x| use one token in ``stride``, chosen by (sample, position) so the subsample
        is deterministic and independent of batching (``stride=1``: all tokens). The per-token median
        (the costly part of the massive test) is computed only for candidates: tokens whose max|x|
        exceeds ``massive_abs`` (every massive token is one) and the ``TOPK`` tokens with the largest
        max|x| (for ``max_token_ratio``).

        Returns the rows that entered the statistics (finite, float32), or None if none did.
        """
        if x.numel() == 0:
            return None
        x = x.float()
        # per-token max|x| from two reductions (no |x| temporary); NaN/Inf here iff the row has one
        tok_max = torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_())  # (N,)
        finite_rows = torch.isfinite(tok_max)
        if not bool(finite_rows.all()):
            bad = (~finite_rows).nonzero().flatten()
            if self.nonfinite_tokens == 0:
                j = int(bad[0])
                ch = int((~torch.isfinite(x[j])).nonzero()[0])
                self.loc_nonfinite = Loc(int(info.sample[j]), int(info.pos[j]), ch, int(info.token[j]))
            self.nonfinite_tokens += int(bad.numel())
            x, tok_max = x[finite_rows], tok_max[finite_rows]
            info = TokenInfo(info.sample[finite_rows], info.pos[finite_rows], info.token[finite_rows])
            if x.numel() == 0:
                return None
        n, c = x.shape
        self.count += n * c
        self.tokens += n
        # Power sums through BLAS (gemv/dot, no temporaries): several times faster than Tensor.sum on
        # CPU; float64 when values are large enough for x^4 to lose range in float32.
        big = float(tok_max.max()) > 1e8
        xs = x.double() if big else x
        flat = xs.reshape(-1)
        self.s1 += float((torch.ones(n, dtype=xs.dtype, device=x.device) @ xs).sum())
        self.s2 += float(flat @ flat)
        if self.stride > 1:
            # The subsample is chosen by token identity (sample, position), not by row, so it does not
            # depend on batching, sharding or resuming.
            keep = ((info.sample * 7919 + info.pos) % self.stride == 0).nonzero().flatten()
            sub = xs.index_select(0, keep)  # (n_sub, C)
        else:
            sub = xs
        a_sub = sub.abs()
        sflat, aflat = sub.reshape(-1), a_sub.reshape(-1)
        sq = sflat * sflat
        self.dcount += sflat.numel()
        self.d1 += float(sflat.sum())
        self.d2 += float(sflat @ sflat)
        self.d3 += float(sq @ sflat)
        self.d4 += float(sq @ sq)
        self.dabs += float(aflat.sum())
        bins = torch.bincount((a_sub.float().view(torch.int32) >> HIST_SHIFT).reshape(-1), minlength=HIST_BINS)
        self.hist += bins.cpu().double()
        cmin, cmax = x.amin(dim=0), x.amax(dim=0)  # (C,) each
        self.ch_min = torch.minimum(self.ch_min, cmin.cpu())
        self.ch_max = torch.maximum(self.ch_max, cmax.cpu())
        # Signed extremes with locations: channel from the per-channel extremes, then the token in it.
        jmin, jmax = int(cmin.argmin()), int(cmax.argmax())
        if float(cmin[jmin]) < self.vmin:
            t = int(x[:, jmin].argmin())
            self.vmin = float(cmin[jmin])
            self.loc_min = Loc(int(info.sample[t]), int(info.pos[t]), jmin, int(info.token[t]))
        if float(cmax[jmax]) > self.vmax:
            t = int(x[:, jmax].argmax())
            self.vmax = float(cmax[jmax])
            self.loc_max = Loc(int(info.sample[t]), int(info.pos[t]), jmax, int(info.token[t]))
        # Top-k |x|: the global top-k elements all lie in the k tokens with the largest per-token max,
        # so a top-k over those k rows is exact and avoids a top-k over all N*C elements.
        k = min(TOPK, n)
        _, rows = tok_max.topk(k)
        cand = x[rows]  # (k, C)
        _, idx = cand.abs().flatten().topk(min(TOPK, cand.numel()))
        r, chan = rows[idx // c], idx % c
        locs = torch.stack([info.sample[r], info.pos[r], chan, info.token[r]], dim=1).cpu()
        self._merge_top(cand.flatten()[idx].cpu(), locs)
        if self.per_token:
            # Massive activations (Sun et al. 2024): max|x| > massive_abs and > massive_ratio x median|x|.
            cand_rows = torch.unique(torch.cat([rows, (tok_max > massive_abs).nonzero().flatten()]))
            a = x[cand_rows].abs()  # (M, C)
            ratio = tok_max[cand_rows] / a.median(dim=1).values.clamp_min(1e-12)
            cmax_tok = tok_max[cand_rows]
            j = int(ratio.argmax())
            if float(ratio[j]) > self.max_token_ratio:
                row = int(cand_rows[j])
                self.max_token_ratio = float(ratio[j])
                self.loc_max_ratio = Loc(int(info.sample[row]), int(info.pos[row]), int(a[j].argmax()),
                                         int(info.token[row]))
            hits = ((cmax_tok > massive_abs) & (ratio > massive_ratio)).nonzero().flatten()
            self.massive_tokens += int(hits.numel())
            if hits.numel():
                top_hits = hits[cmax_tok[hits].argsort(descending=True)[:MAX_MASSIVE_RECORDS]]
                for j in top_hits.tolist():
                    row = int(cand_rows[j])
                    self.massive.append((float(cmax_tok[j]), float(ratio[j]), Loc(
                        int(info.sample[row]), int(info.pos[row]), int(a[j].argmax()), int(info.token[row]))))
                self._trim_massive()
        return x

    def _merge_top(self, vals: torch.Tensor, locs: torch.Tensor) -> None:
        allv = torch.cat([self.top_vals, vals])
        alll = torch.cat([self.top_locs, locs])
        # Order by |value| descending, ties by location ascending, so merging is order-independent:
        # sort by location first, then a stable sort by |value|.
        key = (alll[:, 0] * (1 << 20) + alll[:, 1]) * (1 << 20) + alll[:, 2]
        order = key.argsort(stable=True)
        order = order[allv[order].abs().argsort(descending=True, stable=True)][:TOPK]
        self.top_vals, self.top_locs = allv[order], alll[order]

    def _trim_massive(self) -> None:
        self.massive.sort(key=lambda m: (-m[0], m[2].sample, m[2].pos))
        del self.massive[MAX_MASSIVE_RECORDS:]

    # ------------------------------------------------------------------ merge
    def merge(self, other: SiteStats) -> SiteStats:
        """In place: the statistics of the union of both token sets. Returns ``self``."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge sites with {self.channels} and {other.channels} channels")
        if other.stride != self.stride:
            raise ValueError(f"cannot merge statistics with token strides {self.stride} and {other.stride}")
        for name in ("count", "tokens", "s1", "s2", "dcount", "d1", "d2", "d3", "d4", "dabs", "massive_tokens",
                     "nonfinite_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.vmin < self.vmin:
            self.vmin, self.loc_min = other.vmin, other.loc_min
        if other.vmax > self.vmax:
            self.vmax, self.loc_max = other.vmax, other.loc_max
        if other.max_token_ratio > self.max_token_ratio:
            self.max_token_ratio, self.loc_max_ratio = other.max_token_ratio, other.loc_max_ratio
        if self.loc_nonfinite.sample < 0:
            self.loc_nonfinite = other.loc_nonfinite
        self.ch_min = torch.minimum(self.ch_min, other.ch_min)
        self.ch_max = torch.maximum(self.ch_max, other.ch_max)
        self.hist = self.hist + other.hist
        self._merge_top(other.top_vals, other.top_locs)
        self.massive.extend(other.massive)
        self._trim_massive()
        return self

    # ------------------------------------------------------------------ derived values
    @property
    def mean(self) -> float:
        return self.s1 / self.count if self.count else float("nan")

    @property
    def var(self) -> float:
        if not self.count:
            return float("nan")
        return max(self.s2 / self.count - self.mean**2, 0.0)

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    @property
    def rms(self) -> float:
        return math.sqrt(self.s2 / self.count) if self.count else float("nan")

    @property
    def absmax(self) -> float:
        return max(abs(self.vmin), abs(self.vmax)) if self.count else float("nan")

    @property
    def loc_absmax(self) -> Loc:
        return self.loc_max if abs(self.vmax) >= abs(self.vmin) else self.loc_min

    @property
    def signed_absmax(self) -> float:
        return self.vmax if abs(self.vmax) >= abs(self.vmin) else self.vmin

    @property
    def kurtosis(self) -> float:
        """Excess kurtosis E[(x-m)^4]/var^2 - 3 from raw power sums (over the token subsample)."""
        if not self.dcount:
            return float("nan")
        n = self.dcount
        m = self.d1 / n
        var = self.d2 / n - m * m
        if var <= 0:
            return float("nan")
        m4 = self.d4 / n - 4 * m * self.d3 / n + 6 * m * m * self.d2 / n - 3 * m**4
        return m4 / var**2 - 3.0

    @property
    def mean_abs(self) -> float:
        return self.dabs / self.dcount if self.dcount else float("nan")

    @property
    def ch_absmax(self) -> torch.Tensor:
        return torch.maximum(self.ch_max.abs(), self.ch_min.abs())

    def quantile_abs(self, q: float) -> float:
        """Quantile of |x| from the bit-pattern histogram (linear interpolation inside the bin)."""
        if not self.count:
            return float("nan")
        cum = torch.cumsum(self.hist, 0)
        need = q * float(cum[-1])
        i = int(torch.searchsorted(cum, torch.tensor([need], dtype=torch.float64)).clamp_max(HIST_BINS - 1))
        prev = float(cum[i - 1]) if i > 0 else 0.0
        inbin = float(self.hist[i])
        frac = (need - prev) / inbin if inbin > 0 else 0.5
        if i == 0:
            return 0.0  # zeros (and float32 denormals below 2**-126)
        bits = torch.tensor([int((i + frac) * (1 << HIST_SHIFT))], dtype=torch.int32)
        return min(float(bits.view(torch.float32)), self.absmax)

    @property
    def spike_ratio(self) -> float:
        """max|x| / median|x| over the whole site (the spike criterion of the spike-aware papers)."""
        med = self.quantile_abs(0.5)
        return self.absmax / med if med and med > 0 else float("inf")

    # ------------------------------------------------------------------ (de)serialization
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        """Tensors (for safetensors) and JSON-able scalars; ``from_state`` inverts it exactly."""
        tensors = {"ch_min": self.ch_min, "ch_max": self.ch_max, "top_vals": self.top_vals,
                   "top_locs": self.top_locs, "hist": self.hist}
        meta: dict[str, object] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in tensors:
                continue
            if isinstance(v, Loc):
                meta[f.name] = [v.sample, v.pos, v.channel, v.token]
            elif f.name == "massive":
                meta[f.name] = [[m[0], m[1], [m[2].sample, m[2].pos, m[2].channel, m[2].token]] for m in v]
            elif isinstance(v, float) and not math.isfinite(v):
                meta[f.name] = str(v)
            else:
                meta[f.name] = v
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: dict[str, object]) -> SiteStats:
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in tensors:
                kw[f.name] = tensors[f.name].clone()
            elif f.name in meta:
                v: Any = meta[f.name]
                if f.name.startswith("loc"):
                    kw[f.name] = Loc(*v)
                elif f.name == "massive":
                    kw[f.name] = [(m[0], m[1], Loc(*m[2])) for m in v]
                elif isinstance(v, str) and f.name in ("vmin", "vmax"):
                    kw[f.name] = float(v)
                else:
                    kw[f.name] = v
        return cls(**kw)


@dataclass
class Int8Check:
    """Symmetric per-tensor INT8 reconstruction error against a fixed threshold ``T`` (calibrated).

    ``x_hat = s * clamp(round(clamp(x, -T, T) / s), -127, 127)`` with ``s = T / 127``; accumulates what
    SQNR dB = 10 log10(sum x^2 / sum (x_hat - x)^2), relative RMSE and the clip rate need.
    """

    threshold: float
    count: int = 0
    sx2: float = 0.0
    se2: float = 0.0
    sabs: float = 0.0
    sabs_err: float = 0.0
    clipped: int = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add finite float32 rows ``x`` ``(N, C)``."""
        update_int8_checks([self], x)

    def merge(self, other: Int8Check) -> Int8Check:
        for name in ("count", "sx2", "se2", "sabs", "sabs_err", "clipped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    @property
    def sqnr_db(self) -> float:
        if self.se2 == 0:
            return float("inf")
        return 10 * math.log10(self.sx2 / self.se2) if self.sx2 > 0 else float("nan")

    @property
    def rel_rmse(self) -> float:
        return math.sqrt(self.se2 / self.sx2) if self.sx2 > 0 else float("nan")

    @property
    def rel_mae(self) -> float:
        return self.sabs_err / self.sabs if self.sabs > 0 else float("nan")

    @property
    def clip_rate(self) -> float:
        return self.clipped / self.count if self.count else float("nan")


@torch.no_grad()
def update_int8_checks(checks: list[Int8Check], x: torch.Tensor) -> None:
    """Update several INT8 checks (thresholds) on the same finite rows ``x`` ``(N, C)``.

    The threshold-free sums (sum x^2, sum |x|) are computed once and shared; per threshold T the error
    is ``round(clamp(x, -T, T) / s) * s - x`` (the outer clamp of the reference formula is a no-op,
    since |clamp(x)/s| <= 127).
    """
    if x.numel() == 0:
        return
    flat = x.reshape(-1)
    a = flat.abs()
    sx2 = float(flat @ flat)
    sabs = float(a.sum())
    for chk in checks:
        t = chk.threshold
        if not t > 0:
            continue
        s = t / 127.0
        err = torch.round(flat.clamp(-t, t) / s).mul_(s).sub_(flat)
        chk.count += flat.numel()
        chk.sx2 += sx2
        chk.sabs += sabs
        chk.se2 += float(err @ err)
        chk.sabs_err += float(err.abs_().sum())
        chk.clipped += int(torch.count_nonzero(a > t))
