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
# Temporary memory of one site's update: the activation is processed in chunks of token rows so that the
# float32 copies and temporaries (at most TEMP_BYTES_PER_ELEM bytes per element of a chunk: the fp32 copy and
# at most two fp32 temporaries, |x| and the clamped copy of the INT8 check) stay within 1x the activation's own
# size (measured peak: 0.76x with the INT8 check, tests/llm/test_profile_scale.py); chunks never go below
# MIN_CHUNK_ELEMS elements (1 MiB of fp32): below that, per-chunk kernel launches cost more time than the memory.
TEMP_BYTES_PER_ELEM = 16
MIN_CHUNK_ELEMS = 1 << 18


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
               massive_ratio: float = 1000.0) -> None:
        """Add the valid tokens ``x`` ``(N, C)`` of one batch (padding already removed) and flush.

        A convenience over :class:`SiteAccumulator` (which the profiler uses, flushing only at the end of
        the run): exact over every token for count, mean, rms, min/max and absmax with locations,
        per-channel min/max, top-k and the massive-activation test; the histogram (quantiles), the higher
        power sums (kurtosis) and mean |x| use one token in ``stride``, chosen by (sample, position).
        """
        if x.numel() == 0:
            return
        acc = SiteAccumulator(self.channels, x.device, per_token=self.per_token)
        idx = info_tensor(info).to(x.device)
        keep = subsample_rows(info, self.stride)
        acc.update(x, Chunk(0, x.shape[0], None, None if keep is None else keep.to(x.device), idx),
                   massive_abs=massive_abs, massive_ratio=massive_ratio)
        acc.end_hook(x, None, idx)
        acc.flush_into(self)

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



# ---------------------------------------------------------------------- device-side accumulation
# Layout of SiteAccumulator.sums (float64, on the activation's device).
_TOKENS, _S1, _S2, _DCOUNT, _D1, _D2, _D3, _D4, _DABS, _MASSIVE, _NONFINITE = range(11)
# Layout of one row of SiteAccumulator.int8 (one row per threshold).
_I8_FIELDS = ("count", "sx2", "se2", "sabs", "sabs_err", "clipped")


def info_tensor(info: TokenInfo) -> torch.Tensor:
    """``(N, 3)`` long: sample, position and token id of each valid token."""
    return torch.stack([info.sample, info.pos, info.token], dim=1)


def subsample_rows(info: TokenInfo, stride: int) -> torch.Tensor | None:
    """Rows of the distribution subsample, chosen by token identity (sample, position) so that it does not
    depend on batching, sharding or resuming; None when every row is used (``stride == 1``)."""
    if stride <= 1:
        return None
    return ((info.sample * 7919 + info.pos) % stride == 0).nonzero().flatten()


def chunk_rows(numel: int, element_size: int, channels: int) -> int:
    """Token rows per chunk so that an update's temporaries stay within 1x the activation (see
    ``TEMP_BYTES_PER_ELEM``)."""
    elems = max(MIN_CHUNK_ELEMS, numel * element_size // TEMP_BYTES_PER_ELEM)
    return max(1, elems // max(channels, 1))


@dataclass
class Chunk:
    """Rows ``start:stop`` of one batch's valid tokens, with everything a site update needs on one device.

    Args:
        start, stop: the chunk's rows among the batch's N valid tokens.
        rows: ``(n,)`` indices of these tokens in the flat ``(B*T, C)`` activation; None when the batch has
            no padding (the activation's rows ``start:stop`` are the tokens: a view, no copy).
        keep: ``(n_sub,)`` chunk-relative rows of the distribution subsample; None: every row.
        info: ``(n, 3)`` sample, position, token id.
        massive_any: ``(N,)`` bool of the whole batch, OR-ed with the massive tokens of every per-token site
            (distinct massive tokens across sites); None: not tracked.
    """

    start: int
    stop: int
    rows: torch.Tensor | None
    keep: torch.Tensor | None
    info: torch.Tensor
    massive_any: torch.Tensor | None = None


def _at(t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """``t[i]`` for a 0-d index tensor without a host read (indexing with a 0-d tensor reads it)."""
    return t.index_select(0, i.reshape(1))[0]


def _loc(info: torch.Tensor, row: torch.Tensor, channel: torch.Tensor) -> torch.Tensor:
    """``(4,)`` long location (sample, pos, channel, token) from 0-d device tensors (no host read)."""
    r = info.index_select(0, row.reshape(1))[0]  # (3,)
    return torch.cat([r[:2], channel.reshape(1).to(torch.long), r[2:]])


class SiteAccumulator:
    """Partial statistics of one site on one device since the last flush.

    Every update is a fixed sequence of reductions on the activation's device, in chunks of token rows:
    nothing is read back to the host (no ``.item()``, ``nonzero``, ``unique``, boolean indexing or bincount,
    which all wait for the device), and temporaries stay within 1x the activation (``chunk_rows``).
    Extremes, per-channel min/max and the integer comparisons run in the activation's own dtype, where they
    are exact; sums use a float32 copy of one chunk, accumulated in float64. ``flush_into`` moves the totals
    into a host :class:`SiteStats` (a handful of reads per site, at the end of the run or at a checkpoint).

    The massive-activation test max|x| > ratio x median|x| is evaluated for every token without sorting:
    the (lower) median is below ``max|x| / ratio`` iff at least ``(C - 1) // 2 + 1`` values are.
    """

    def __init__(self, channels: int, device: torch.device, *, per_token: bool = True,
                 thresholds: tuple[float, ...] = ()) -> None:
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        f32: dict[str, Any] = {"dtype": torch.float32, "device": device}
        i64: dict[str, Any] = {"dtype": torch.long, "device": device}
        self.channels, self.device, self.per_token, self.thresholds = channels, device, per_token, thresholds
        self.sums = torch.zeros(11, **f64)
        self.vmin = torch.tensor(math.inf, **f32)
        self.vmax = torch.tensor(-math.inf, **f32)
        self.loc_min = torch.full((4,), -1, **i64)
        self.loc_max = torch.full((4,), -1, **i64)
        self.loc_nonfinite = torch.full((4,), -1, **i64)
        self.ch_min = torch.full((channels,), math.inf, **f32)
        self.ch_max = torch.full((channels,), -math.inf, **f32)
        self.top_vals = torch.full((TOPK,), math.nan, **f32)
        self.top_locs = torch.full((TOPK, 4), -1, **i64)
        self.hist = torch.zeros(HIST_BINS, **i64)
        self.max_ratio = torch.tensor(0.0, **f32)
        self.loc_ratio = torch.full((4,), -1, **i64)
        self.mass_vals = torch.full((MAX_MASSIVE_RECORDS,), -math.inf, **f32)
        self.mass_ratio = torch.zeros(MAX_MASSIVE_RECORDS, **f32)
        self.mass_locs = torch.full((MAX_MASSIVE_RECORDS, 4), -1, **i64)
        self.int8 = torch.zeros(len(thresholds), len(_I8_FIELDS), **f64)
        self.empty = True
        self._mass_count = torch.zeros((), dtype=torch.long, device=device)
        self._cand: list[tuple[torch.Tensor, ...]] = []  # per chunk: massive-test candidates (end_hook)
        self._powers = torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0], **f64)  # of d1, d2, d3, d4, dabs (made once)
        self._ones = torch.ones(channels, **f32)  # row sums by matrix-vector product
        # constants of every update, made once (each small tensor op costs about 10 us on CPU, a large share
        # of a hook at small widths): the histogram increment, the int64 zero, and the float64 scales that
        # turn the float32 per-chunk sums into SiteAccumulator.sums / .int8 rows (row counts times C, power
        # sums of the rescaled copy times 2**(e * power))
        self._one = torch.ones((), **i64)
        self._zero = torch.zeros((), **i64)
        self._scale = torch.ones(11, **f64)
        self._scale[_DCOUNT] = channels
        self._pow = torch.zeros(11, **f64)
        self._pow[_D1:_DABS + 1] = self._powers
        self._i8_scale = torch.tensor([float(channels), 1, 1, 1, 1, 1], **f64)

    @torch.no_grad()
    def update(self, x: torch.Tensor, chunk: Chunk, *, massive_abs: float = 100.0,
               massive_ratio: float = 1000.0) -> None:
        """Add one chunk: ``x`` is the flat ``(B*T, C)`` activation (``chunk.rows`` given) or the chunk's own
        ``(n, C)`` rows (``chunk.rows`` None)."""
        xc = x if chunk.rows is None else x.index_select(0, chunk.rows)  # (n, C), activation dtype
        n, c = xc.shape
        if n == 0:
            return
        self.empty = False
        info = chunk.info
        # per-token max|x| in the activation's dtype (exact); NaN/Inf here iff the row has one
        tmax = torch.maximum(xc.amax(dim=1), xc.amin(dim=1).neg()).float()  # (n,)
        fin = torch.isfinite(tmax)
        bad = ~fin
        nbad = bad.sum()
        # first non-finite value of the run: its row and channel (no host read: where-updates)
        j = bad.to(torch.int8).argmax()
        ch = (~torch.isfinite(xc.index_select(0, j.reshape(1))[0])).to(torch.int8).argmax()
        first = (self.sums[_NONFINITE] == 0) & (nbad > 0)
        self.loc_nonfinite = torch.where(first, _loc(info, j, ch), self.loc_nonfinite)
        # float32 copy of the chunk (a copy even if x is float32: it is modified in place below)
        xs = xc.to(torch.float32, copy=chunk.rows is None)  # (n, C)
        del xc
        # Non-finite rows are excluded by zeroing them (for the sums); for the extremes they hold a copy of
        # the first finite row r0 (whose values are present anyway), added and taken out again with a
        # rank-1 update. Hand-written instead of masked_fill_ with a (n, 1) row mask: on CPU that costs
        # about 7x these three elementwise passes (bench/profile_overhead.py, BENCHMARKS.md section 1).
        xs.nan_to_num_(0.0, 0.0, 0.0)
        xs.mul_(fin.to(torch.float32)[:, None])
        anyfin = fin.any()
        r0 = fin.to(torch.int8).argmax()
        badf = bad.to(torch.float32)
        g = xs.index_select(0, r0.reshape(1))[0]  # (C,) a copy of row r0 (zeros if no row is finite)
        xs.addr_(badf, g)
        # signed extremes with locations: channel from the per-channel extremes, then the token in it (a
        # bad row that ties is a copy of r0, the first finite row: the location is r0's)
        cmax = xs.amax(dim=0).masked_fill_(~anyfin, -math.inf)  # (C,)
        jmax = cmax.argmax()
        tm = xs.index_select(1, jmax.reshape(1)).argmax()
        tm = torch.where(_at(bad, tm), r0, tm)
        vmax = _at(cmax, jmax)
        better = vmax > self.vmax
        self.loc_max = torch.where(better, _loc(info, tm, jmax), self.loc_max)
        self.vmax = torch.where(better, vmax, self.vmax)
        cmin = xs.amin(dim=0).masked_fill_(~anyfin, math.inf)
        jmin = cmin.argmin()
        tn = xs.index_select(1, jmin.reshape(1)).argmin()
        tn = torch.where(_at(bad, tn), r0, tn)
        vmin = _at(cmin, jmin)
        better = vmin < self.vmin
        self.loc_min = torch.where(better, _loc(info, tn, jmin), self.loc_min)
        self.vmin = torch.where(better, vmin, self.vmin)
        self.ch_min = torch.minimum(self.ch_min, cmin)
        self.ch_max = torch.maximum(self.ch_max, cmax)
        xs.addr_(badf, g, alpha=-1)  # bad rows back to exact zeros (g - g)
        del g
        n_fin = n - nbad  # 0-d tensor
        flat = xs.reshape(-1)
        s1 = xs.sum()
        s2 = flat @ flat  # BLAS dot: no temporary
        # Top-k |x|: the global top-k elements all lie in the k tokens with the largest per-token max
        key = tmax.masked_fill(bad, -1.0)
        k = min(TOPK, n)
        _, rows = key.topk(k)
        cand = xs.index_select(0, rows)  # (k, C)
        m = min(TOPK, cand.numel())
        _, idx = cand.abs().flatten().topk(m)
        r = rows.gather(0, idx // c)
        vals = cand.flatten().gather(0, idx).masked_fill(bad.gather(0, r), math.nan)
        locs = torch.stack([info[r, 0], info[r, 1], idx % c, info[r, 2]], dim=1)
        allv, alll = torch.cat([self.top_vals, vals]), torch.cat([self.top_locs, locs])
        _, order = allv.abs().nan_to_num(-1.0).topk(TOPK)
        self.top_vals, self.top_locs = allv[order], alll[order]
        del cand  # temporaries are released as soon as they are used: the peak stays within the budget
        if self.per_token:
            self._massive(xs, tmax, fin, rows, info, chunk, massive_abs, massive_ratio)
        # distribution statistics over the token subsample: the INT8 reconstruction error, histogram of |x|
        # on the float32 bit pattern, power sums for kurtosis, mean |x|
        if chunk.keep is None:
            sub, fsub = xs, fin
        else:
            sub, fsub = xs.index_select(0, chunk.keep), fin.index_select(0, chunk.keep)
        drows = fsub.sum()  # finite rows of the subsample (the others are zeros)
        if self.thresholds:
            self._int8(sub, drows)
        bins = (sub.view(torch.int32) & 0x7FFFFFFF).bitwise_right_shift_(HIST_SHIFT).reshape(-1)  # (n_sub*C,)
        self.hist.index_add_(0, bins, self._one.expand(bins.numel()))
        del bins
        # non-finite rows were filled with zeros: take their elements out of bin 0 again
        self.hist[0] -= (sub.shape[0] - drows) * c
        # power sums in float32 on a power-of-two rescaled copy (exact scaling: x^4 cannot overflow), then
        # scaled back in float64
        amax = tmax.masked_fill(bad, 0.0).max()
        e = torch.frexp(amax).exponent.to(torch.float64)
        sub.mul_(torch.ldexp(torch.ones((), device=xs.device), -e.to(torch.int32)))
        sflat = sub.reshape(-1)
        sq = sflat * sflat
        d3, d4 = sq @ sflat, sq @ sq
        del sq
        mass = self._mass_count if self.per_token else self._zero
        # one float32 vector in _TOKENS.._NONFINITE order (counts are rows of this chunk: exact in float32),
        # to float64 once, then scaled there (dcount rows x C; power sums back from the rescaled copy)
        v = torch.stack([n_fin.float(), s1, s2, drows.float(), sflat.sum(), sflat @ sflat, d3, d4,
                         sflat.abs().sum(), mass.float(), nbad.float()]).double()
        self.sums += v * (self._scale * torch.exp2(e * self._pow))

    def _int8(self, xs: torch.Tensor, fin_rows: torch.Tensor) -> None:
        """INT8 reconstruction error per threshold T, over the rows ``xs`` (the distribution subsample:
        every ``hist_stride``-th token; its ``fin_rows`` finite rows count, the others are zeros):
        err = round(clamp(x, -T, T) / s) * s - x with s = T / 127 (the outer clamp of the reference formula
        is a no-op since |clamp(x) / s| <= 127)."""
        # |x| once for every threshold: sum |x| (abs + sum: linalg.vector_norm(ord=1) is about 4x slower
        # on CPU) and the clip counts
        a = xs.abs()
        sabs = a.sum()
        flat = xs.reshape(-1)
        sx2 = flat @ flat
        i8 = []
        rows = fin_rows.float()  # exact: at most the chunk's rows
        for t in self.thresholds:
            if not t > 0:
                i8.append(torch.zeros(len(_I8_FIELDS), dtype=torch.float64, device=xs.device))
                continue
            s = t / 127.0
            cl = xs.clamp(-t, t)
            err = cl.div_(s).round_().mul_(s).sub_(xs).reshape(-1)
            se2 = err @ err
            sae = err.abs_().sum()
            del err
            # |x| > T as 0/1 floats into the free buffer, counted per row by a matrix-vector product
            # (exact: at most C per row) and summed in float64: about 5x faster on CPU than a bool
            # comparison and its sum
            clipped = (torch.gt(a, t, out=cl) @ self._ones).sum(dtype=torch.float64)
            del cl
            i8.append(torch.cat([torch.stack([rows, sx2, se2, sabs, sae]).double(), clipped.reshape(1)]))
        del a
        self.int8 += torch.stack(i8) * self._i8_scale  # count: rows x C

    def _massive(self, xs: torch.Tensor, tmax: torch.Tensor, fin: torch.Tensor, top_rows: torch.Tensor,
                 info: torch.Tensor, chunk: Chunk, massive_abs: float, massive_ratio: float) -> None:
        """Massive activations (Sun et al. 2024): max|x| > massive_abs and > massive_ratio x median|x|.

        Counted exactly for every token here; the ratios (which need the median itself) are computed once
        per hook in :meth:`end_hook`, for a fixed number of candidate tokens kept from every chunk.
        """
        n, c = xs.shape
        thr = (tmax / massive_ratio)[:, None]  # (n, 1)
        # values with |x| < thr per token, as a 0/1 float matrix times ones (exact below 2**24 channels):
        # one fp32 temporary and a BLAS product, about 10x faster on CPU than comparisons and a bool sum
        below = xs.abs().lt_(thr) @ self._ones  # (n,)
        hits = (tmax > massive_abs) & (below >= (c - 1) // 2 + 1) & fin  # (n,)
        self._mass_count = hits.sum()
        if chunk.massive_any is not None:
            chunk.massive_any[chunk.start:chunk.stop] |= hits
        # candidates: the top-k tokens by max|x| (for max_token_ratio) and the largest massive tokens (records)
        q = min(TOPK, n)
        hkey, hrows = tmax.masked_fill(~hits, -math.inf).topk(q)
        tkey = tmax.masked_fill(~fin, -math.inf).gather(0, top_rows)
        self._cand.append((tkey, top_rows + chunk.start, hkey, hrows + chunk.start))

    @torch.no_grad()
    def end_hook(self, x: torch.Tensor, valid: torch.Tensor | None, info: torch.Tensor) -> None:
        """After a hook's chunks: per-token median of the candidate tokens (one median over at most
        ``2 * TOPK`` rows per hook, not per chunk), for ``max_token_ratio`` and the massive-token records.

        ``x`` is the flat activation, ``valid`` the batch's valid-row indices into it (None: rows are the
        valid tokens), ``info`` ``(N, 3)`` of the batch.
        """
        if not self._cand:
            return
        tk, tr, hk, hr = (torch.cat(parts) for parts in zip(*self._cand, strict=True))
        self._cand = []
        tk, j1 = tk.topk(min(TOPK, tk.numel()))
        hk, j2 = hk.topk(min(TOPK, hk.numel()))
        rows = torch.cat([tr.gather(0, j1), hr.gather(0, j2)])  # (m,) rows among the batch's valid tokens
        key = torch.cat([tk, hk])
        # |x|, max and median are exact in the activation's dtype: no float32 copy of the candidates
        a = x.index_select(0, rows if valid is None else valid.index_select(0, rows)).abs_()  # (m, C)
        tmax = a.amax(dim=1).float()
        med = a.median(dim=1).values.float()
        ratio = (tmax / med.clamp_min(1e-12)).masked_fill(key == -math.inf, 0.0)
        ratio = ratio.nan_to_num(0.0)
        chan = a.argmax(dim=1)
        locs = torch.stack([info[rows, 0], info[rows, 1], chan, info[rows, 2]], dim=1)  # (m, 4)
        j = ratio.argmax()
        best = _at(ratio, j)
        better = best > self.max_ratio
        self.loc_ratio = torch.where(better, _at(locs, j), self.loc_ratio)
        self.max_ratio = torch.where(better, best, self.max_ratio)
        k = tk.numel()
        allv = torch.cat([self.mass_vals, hk])
        _, order = allv.topk(MAX_MASSIVE_RECORDS)
        self.mass_vals = allv[order]
        self.mass_ratio = torch.cat([self.mass_ratio, ratio[k:]])[order]
        self.mass_locs = torch.cat([self.mass_locs, locs[k:]])[order]

    def flush_into(self, st: SiteStats, checks: dict[str, Int8Check] | None = None,
                   names: tuple[str, ...] = ()) -> None:
        """Merge these totals into the host statistics ``st`` (and the INT8 checks named ``names``)."""
        if self.empty:
            return
        sums = self.sums.cpu().tolist()
        c = self.channels
        part = SiteStats(channels=c, per_token=st.per_token, stride=st.stride)
        part.tokens = int(sums[_TOKENS])
        part.count = part.tokens * c
        part.s1, part.s2 = sums[_S1], sums[_S2]
        part.dcount = int(sums[_DCOUNT])
        part.d1, part.d2, part.d3, part.d4, part.dabs = sums[_D1:_DABS + 1]
        part.massive_tokens = int(sums[_MASSIVE])
        part.nonfinite_tokens = int(sums[_NONFINITE])
        part.vmin, part.vmax = float(self.vmin.cpu()), float(self.vmax.cpu())
        locs = torch.stack([self.loc_min, self.loc_max, self.loc_nonfinite, self.loc_ratio]).cpu().tolist()
        part.loc_min, part.loc_max, part.loc_nonfinite, part.loc_max_ratio = (Loc(*v) for v in locs)
        part.ch_min, part.ch_max = self.ch_min.cpu(), self.ch_max.cpu()
        tv, tl = self.top_vals.cpu(), self.top_locs.cpu()
        ok = ~torch.isnan(tv)
        part.top_vals, part.top_locs = tv[ok], tl[ok]
        part.hist = self.hist.cpu().double()
        part.max_token_ratio = float(self.max_ratio.cpu())
        mv, mr, ml = self.mass_vals.cpu().tolist(), self.mass_ratio.cpu().tolist(), self.mass_locs.cpu().tolist()
        part.massive = [(v, r, Loc(*loc)) for v, r, loc in zip(mv, mr, ml, strict=True) if v > -math.inf]
        st.merge(part)
        if checks is not None and self.thresholds:
            for name, t, row in zip(names, self.thresholds, self.int8.cpu().tolist(), strict=True):
                chk = Int8Check(t, int(row[0]), row[1], row[2], row[3], row[4], int(row[5]))
                if name in checks:
                    checks[name].merge(chk)
                else:
                    checks[name] = chk
