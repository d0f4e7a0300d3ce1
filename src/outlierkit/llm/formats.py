"""Pure fake-quantization functions: integer k-bit (sym/asym, tensor/channel/token/group) and FP8 E4M3/E5M2.

Every function here maps a float tensor to a float tensor on the quantization grid ("quantize then
dequantize"), so a quantized model runs with ordinary float kernels and its error can be measured exactly.

Integer grid (the anchors' quantizer, quant-anchors 2.6, with the serving engines' clamp range)::

    symmetric:  s = max|x| / d,   q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1),  x^ = s q
                d = 2^(b-1) - 1 (grid "vllm", default: vLLM's INT8 kernels, scale absmax / 127)
                d = 2^(b-1) - 1/2 (grid "ct": compressed-tensors' calculate_qparams, absmax / 127.5)
    asymmetric: s = (max+ - min-) / (2^b - 1),     z = clamp(-round(min- / s), 0, 2^b - 1)
                q = clamp(round(x / s) + z, 0, 2^b - 1),  x^ = s (q - z)
    with min- = min(min x, 0), max+ = max(max x, 0); an element equal to min- (max+) takes code 0
    (2^b - 1): in exact arithmetic it does anyway, and forcing it keeps fake quantization idempotent where
    float rounding would otherwise leave the top code unused (``[9998, -9998]`` at int3).

Where the engines differ (written down, see docs/quantization.md "Simulated = deployed"): vLLM quantizes
dynamic INT8 activations with s = absmax / 127 and round-to-nearest-even saturated to [-128, 127];
transformers + compressed-tensors recompute s = absmax / 127.5 on reload. Stored weights and static input
scales are read back as written, so they are exact for both. A zero scale becomes 1 (the value is 0
anyway); a NaN in a granule makes the scale NaN, so the whole granule is NaN, as in both engines,
never silently quantized with another scale.

FP8 (llm-compressor / torchao): s = amax / 448 (E4M3) or amax / 57344 (E5M2), x^ = s cast_fp8(clamp(x / s)).

Granularity says over which axis min/max are taken for a 2-D view (rows, C) of the tensor: ``tensor``
(everything), ``channel`` (per output row of a weight), ``token`` (per activation row), ``group``
(contiguous blocks of ``group_size`` along the last, input dimension).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from outlierkit.errors import ConfigError

Granularity = Literal["tensor", "channel", "token", "group"]
Observer = Literal["minmax", "avg_minmax", "percentile", "mse"]
Grid = Literal["vllm", "ct"]
FP8Kind = Literal["e4m3", "e5m2"]

FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
_FP8_DTYPE = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class IntFormat:
    """Integer k-bit fake quantization.

    Args:
        bits: 2..8 (default 8).
        symmetric: symmetric grid around 0 (default True) or asymmetric with a zero point.
        granularity: ``tensor`` (default), ``channel`` (weight rows), ``token`` (activation rows) or
            ``group`` (blocks of ``group_size`` along the input dimension).
        group_size: required for ``group``; must divide the input dimension of every quantized tensor.
        dynamic: activations only: range computed on every forward (default True); False uses the range
            calibrated by ``observer`` (per-tensor only).
        observer: static range estimator: ``minmax`` (running min/max), ``avg_minmax`` (mean of per-batch
            min/max), ``percentile`` (``percentile`` of |x| per batch, averaged) or ``mse`` (clip ratio
            minimizing the quantization MSE on the collected samples). Weights use ``minmax`` or ``mse``.
        percentile: for ``observer="percentile"`` (default 99.99).
        grid: ``vllm`` (default: symmetric scale absmax / (2^(b-1) - 1) and asymmetric round(x/s) + z, what
            vLLM's INT8 kernels compute) or ``ct`` (absmax / (2^(b-1) - 1/2) and round(x/s + z) with signed
            codes: what compressed-tensors computes when transformers reloads an export).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "tensor"
    group_size: int | None = None
    dynamic: bool = True
    observer: Observer = "minmax"
    percentile: float = 99.99
    grid: Grid = "vllm"
    kind: Literal["int"] = "int"

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "token", "group"):
            raise ConfigError(f"granularity must be tensor, channel, token or group, got {self.granularity!r}")
        if self.granularity == "group" and (self.group_size is None or self.group_size < 1):
            raise ConfigError("granularity 'group' needs a positive group_size (e.g. group_size: 32)")
        if self.observer not in ("minmax", "avg_minmax", "percentile", "mse"):
            raise ConfigError(f"observer must be minmax, avg_minmax, percentile or mse, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.grid not in ("vllm", "ct"):
            raise ConfigError(f"grid must be vllm or ct, got {self.grid!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise ConfigError("static (calibrated) activation ranges are per-tensor; use dynamic: true for "
                              f"granularity {self.granularity!r}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def label(self) -> str:
        g = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        return (f"int{self.bits}-{'sym' if self.symmetric else 'asym'}-{g}" + ("" if self.dynamic else "-static")
                + ("-ct" if self.grid == "ct" else ""))


@dataclass(frozen=True)
class FP8Format:
    """FP8 fake quantization; torch's float8 dtypes do the rounding (round to nearest even).

    Args:
        fp8: ``e4m3`` (default, max 448) or ``e5m2`` (max 57344).
        granularity: ``tensor`` (default), ``channel`` or ``token`` (one scale per row).
        scaled: scale so that amax maps to the format's max (default True); False is the plain cast
            (values beyond the max saturate).
    """

    fp8: FP8Kind = "e4m3"
    granularity: Literal["tensor", "channel", "token"] = "tensor"
    scaled: bool = True
    kind: Literal["fp8"] = "fp8"

    def __post_init__(self) -> None:
        if self.fp8 not in FP8_MAX:
            raise ConfigError(f"fp8 must be e4m3 or e5m2, got {self.fp8!r}")
        if self.granularity not in ("tensor", "channel", "token"):
            raise ConfigError(f"fp8 granularity must be tensor, channel or token, got {self.granularity!r}")

    @property
    def dynamic(self) -> bool:
        return True

    def label(self) -> str:
        return f"fp8-{self.fp8}-{self.granularity}" + ("" if self.scaled else "-unscaled")


Format = IntFormat | FP8Format


def parse_format(spec: Any, where: str = "format") -> Format | None:
    """A format from a mapping (``{bits: 8, granularity: token}``), a short string or None (= keep float).

    Short strings: ``int8`` / ``int6-asym`` / ``int8-token`` / ``int4-g32`` / ``fp8`` / ``fp8-e5m2-channel``
    / ``none``.
    """
    from outlierkit.config import from_dict

    if spec is None or isinstance(spec, (IntFormat, FP8Format)):
        return spec
    if isinstance(spec, str):
        return _parse_short(spec, where)
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a mapping or a string like 'int8-token', got {spec!r}")
    data = dict(spec)
    kind = data.pop("kind", "fp8" if "fp8" in data else "int")
    if kind == "int":
        return from_dict(IntFormat, data, where=where)
    if kind == "fp8":
        return from_dict(FP8Format, data, where=where)
    raise ConfigError(f"{where}.kind must be int or fp8, got {kind!r}")


def _parse_short(text: str, where: str) -> Format | None:
    parts = text.lower().strip().split("-")
    if parts[0] in ("none", "fp32", "float", "bf16", "fp16"):
        return None
    if parts[0] == "fp8":
        kw: dict[str, Any] = {}
        for p in parts[1:]:
            if p in FP8_MAX:
                kw["fp8"] = p
            elif p in ("tensor", "channel", "token"):
                kw["granularity"] = p
            elif p == "unscaled":
                kw["scaled"] = False
            else:
                raise ConfigError(f"{where}: unknown part {p!r} in {text!r}")
        return FP8Format(**kw)
    if not parts[0].startswith("int") or not parts[0][3:].isdigit():
        raise ConfigError(f"{where}: cannot read {text!r}; examples: int8, int8-token, int6-asym, int4-g128, fp8")
    ikw: dict[str, Any] = {"bits": int(parts[0][3:])}
    for p in parts[1:]:
        if p in ("sym", "asym"):
            ikw["symmetric"] = p == "sym"
        elif p in ("tensor", "channel", "token"):
            ikw["granularity"] = p
        elif p.startswith("g") and p[1:].isdigit():
            ikw["granularity"], ikw["group_size"] = "group", int(p[1:])
        elif p == "static":
            ikw["dynamic"] = False
        elif p in ("ct", "vllm"):
            ikw["grid"] = p
        else:
            raise ConfigError(f"{where}: unknown part {p!r} in {text!r}")
    return IntFormat(**ikw)


def format_to_dict(fmt: Format | None) -> dict[str, Any] | None:
    return None if fmt is None else asdict(fmt)


# ------------------------------------------------------------------------------------------- ranges

def _rows(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The 2-D (or 3-D for groups) view whose last axis is reduced for ``fmt.granularity``."""
    if fmt.granularity == "tensor":
        return x.reshape(1, -1)  # (1, N)
    if fmt.granularity in ("channel", "token"):
        return x.reshape(-1, x.shape[-1])  # (rows, C)
    assert isinstance(fmt, IntFormat) and fmt.group_size is not None
    c = x.shape[-1]
    if c % fmt.group_size:
        raise ConfigError(f"group_size {fmt.group_size} does not divide the input dimension {c}")
    return x.reshape(-1, c // fmt.group_size, fmt.group_size)  # (rows, C/G, G)


def minmax(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule (min, max), shaped to broadcast against ``_rows(x, fmt)``."""
    r = _rows(x, fmt)
    return r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)


def int_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                grid: Grid = "vllm") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) from a range; a zero-width range gets scale 1 so nothing divides by 0.

    The zero point is unsigned (codes in [0, 2^b - 1]); compressed-tensors stores it minus 2^(b-1).
    A NaN range gives a NaN scale (the granule becomes NaN, as in the engines), not scale 1.
    """
    lo_, hi_ = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        amax = torch.maximum(lo_.abs(), hi_.abs())
        scale = amax / ((2 ** (bits - 1) - 1) + (0.5 if grid == "ct" else 0.0))
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.zeros_like(scale)
    scale = (hi_ - lo_) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = (-torch.round(lo_ / scale)).clamp(0, 2**bits - 1)
    return scale, zp


def int_codes(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool,
              ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Integer codes (as floats) of ``x`` on the grid (scale, zp): signed for symmetric grids, in
    [0, 2^b - 1] for asymmetric ones. ``ends`` = the (lo, hi) the asymmetric grid was made from:
    elements equal to min(lo, 0) / max(hi, 0) take the end codes (see the module docstring)."""
    if symmetric:
        return torch.clamp(torch.round(x / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    top = 2**bits - 1
    q = torch.clamp(torch.round(x / scale) + zp, 0, top)
    if ends is not None:
        lo, hi = ends[0].clamp(max=0), ends[1].clamp(min=0)
        q = torch.where((x == lo) & (lo < 0), torch.zeros_like(q), q)
        q = torch.where((x == hi) & (hi > 0), torch.full_like(q, top), q)
    return q


def int_fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int, symmetric: bool,
                   ends: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid (scale, zp); shapes broadcast."""
    q = int_codes(x, scale, zp, bits, symmetric, ends)
    return q * scale if symmetric else (q - zp) * scale


def fake_quant(x: torch.Tensor, fmt: Format | None,
               rng: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Fake-quantize ``x`` with ``fmt``; ``rng`` = a static (lo, hi) range (per-tensor), else dynamic.

    Shapes:
        x: (..., C); group granularity needs ``C % group_size == 0``. Output: same shape and dtype.
    """
    if fmt is None:
        return x
    dtype = x.dtype
    xf = x.float()
    if isinstance(fmt, FP8Format):
        return fp8_fake_quant(xf, fmt).to(dtype)
    r = _rows(xf, fmt)
    if rng is not None:
        lo, hi = rng[0].float().reshape(1, 1), rng[1].float().reshape(1, 1)
    else:
        lo, hi = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
    if fmt.grid == "ct" and not fmt.symmetric:
        return _ct_asym_fake_quant(r, lo, hi, fmt.bits).reshape(x.shape).to(dtype)
    scale, zp = int_qparams(lo, hi, fmt.bits, fmt.symmetric, fmt.grid)
    return int_fake_quant(r, scale, zp, fmt.bits, fmt.symmetric, (lo, hi)).reshape(x.shape).to(dtype)


def _ct_asym_fake_quant(r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' asymmetric quantizer in its own order of operations (signed codes, the zero point
    added before rounding: ``round(clamp(x / s + z))``), so a transformers reload computes the same values.
    Mathematically the grid of :func:`int_fake_quant`; in float it differs at near-ties."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo_, hi_ = lo.clamp(max=0), hi.clamp(min=0)
    scale = (hi_ - lo_) / (2**bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round(torch.clamp(qmin - lo_ / scale, qmin, qmax))
    q = torch.round(torch.clamp(r / scale + zp, qmin, qmax))
    return (q - zp) * scale


def fp8_fake_quant(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """x^ = s cast_fp8(clamp(x / s, -max, max)) with s = amax / max per tensor or row; plain cast if unscaled."""
    fmax = FP8_MAX[fmt.fp8]
    dt = _FP8_DTYPE[fmt.fp8]
    if not fmt.scaled:
        return x.clamp(-fmax, fmax).to(dt).to(x.dtype)
    r = _rows(x, fmt)
    amax = r.abs().amax(dim=-1, keepdim=True)
    scale = amax / fmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # NaN stays NaN
    return ((r / scale).clamp(-fmax, fmax).to(dt).to(x.dtype) * scale).reshape(x.shape)


def quant_step(x: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
    """Scale (grid step) per granule for dynamic int quantization of ``x`` (for tests and reports)."""
    lo, hi = minmax(x.float(), fmt)
    return int_qparams(lo, hi, fmt.bits, fmt.symmetric, fmt.grid)[0]


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum ref^2 / sum (ref - test)^2), in dB (inf if exact)."""
    signal = ref.double().pow(2).sum().item()
    noise = (ref.double() - test.double()).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)


# ------------------------------------------------------------------------------------- static observers

class RangeObserver:
    """Accumulates a per-tensor activation range over calibration batches with ``fmt.observer``.

    ``minmax``: running min/max; ``avg_minmax``: mean of per-batch min/max; ``percentile``: mean over
    batches of the ``fmt.percentile`` quantiles of x (low tail and high tail); ``mse``: min-max range,
    then the symmetric clip ratio in [0.3, 1] minimizing the quantization MSE over (a sample of) the seen values.
    """

    def __init__(self, fmt: IntFormat, max_samples: int = 1 << 16) -> None:
        self.fmt = fmt
        self.max_samples = max_samples
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        v = x.detach().float().reshape(-1)
        if v.numel() == 0:
            return
        if self.fmt.observer == "percentile":
            q = torch.tensor([1 - self.fmt.percentile / 100, self.fmt.percentile / 100])
            vv = v if v.numel() <= 1 << 24 else v[torch.randperm(v.numel())[: 1 << 24]]
            lo, hi = torch.quantile(vv, q.to(vv.device)).tolist()
        else:
            lo, hi = v.min().item(), v.max().item()
        self.lo.append(lo)
        self.hi.append(hi)
        if self.fmt.observer == "mse":
            step = max(1, v.numel() // max(1, self.max_samples // 8))
            self.samples.append(v[::step].cpu())

    def range(self) -> tuple[float, float]:
        if not self.lo:
            raise RuntimeError("observer saw no data")
        if self.fmt.observer in ("avg_minmax", "percentile"):
            return sum(self.lo) / len(self.lo), sum(self.hi) / len(self.hi)
        lo, hi = min(self.lo), max(self.hi)
        if self.fmt.observer == "mse":
            return mse_clip(torch.cat(self.samples)[: self.max_samples], lo, hi, self.fmt)
        return lo, hi


def mse_clip(v: torch.Tensor, lo: float, hi: float, fmt: IntFormat, n: int = 50) -> tuple[float, float]:
    """The range (r lo, r hi), r in [0.3, 1], with the lowest fake-quantization MSE on ``v`` (vectorized)."""
    ratios = torch.linspace(0.3, 1.0, n)  # (n,)
    los, his = (ratios * lo).reshape(n, 1), (ratios * hi).reshape(n, 1)
    scale, zp = int_qparams(los, his, fmt.bits, fmt.symmetric, fmt.grid)  # (n, 1)
    err = (int_fake_quant(v.reshape(1, -1), scale, zp, fmt.bits, fmt.symmetric, (los, his)) - v).pow(2).mean(dim=1)
    best = int(err.argmin())
    return float(los[best]), float(his[best])


def weight_qparams(w: torch.Tensor, fmt: IntFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The integer grid of a weight: (codes, scale, zero point) on the ``_rows`` view of ``w``.

    Min-max per granule, or (``observer: mse``) the clip ratio in [0.3, 1] with the lowest squared error
    per granule. The exporter writes exactly these codes and scales, so a reloaded weight equals the
    fake-quantized one bit for bit.
    """
    r = _rows(w.float(), fmt)  # (rows, C) or (rows, C/G, G) or (1, N)
    lo, hi = r.amin(dim=-1, keepdim=True), r.amax(dim=-1, keepdim=True)
    if fmt.observer != "mse":
        scale, zp = int_qparams(lo, hi, fmt.bits, fmt.symmetric, fmt.grid)
        return int_codes(r, scale, zp, fmt.bits, fmt.symmetric, (lo, hi)), scale, zp
    best = torch.full_like(lo, math.inf)
    codes, b_scale, b_zp = torch.empty_like(r), torch.ones_like(lo), torch.zeros_like(lo)
    for ratio in torch.linspace(0.3, 1.0, 36).tolist():  # loop over 36 ratios, vectorized over granules
        ends = (lo * ratio, hi * ratio)
        scale, zp = int_qparams(*ends, fmt.bits, fmt.symmetric, fmt.grid)
        q = int_codes(r, scale, zp, fmt.bits, fmt.symmetric, ends)
        err = ((q - zp) * scale - r).pow(2).sum(dim=-1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        codes, b_scale, b_zp = torch.where(better, q, codes), torch.where(better, scale, b_scale), \
            torch.where(better, zp, b_zp)
    return codes, b_scale, b_zp


def weight_fake_quant(w: torch.Tensor, fmt: Format | None) -> torch.Tensor:
    """Fake-quantize a weight (out, in) [or (E, out, in)]: min-max per granule, or the MSE-optimal clip.

    ``token`` granularity on a weight means per output row, the same as ``channel``.
    """
    if fmt is None or isinstance(fmt, FP8Format):
        return fake_quant(w, fmt)
    codes, scale, zp = weight_qparams(w, fmt)
    return ((codes - zp) * scale).reshape(w.shape).to(w.dtype)
