"""Real INT8 execution: a W8A8 linear that stores INT8 weights and multiplies with ``torch._int_mm``,
and the LLM.int8() mixed-precision decomposition on top of it.

torch ships the integer GEMM (``torch._int_mm``: int8 x int8 -> int32, CPU and CUDA) but no module that
quantizes activations on the fly around it, keeps per-channel weight scales and splits off outlier
columns; that is what is written here. Where ``_int_mm`` is unavailable or the shape is not supported,
the same integer arithmetic runs as an int32 (CPU) or float64 (GPU) matmul, exact as well, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from outlierkit.llm.models import is_linear, linear_weight

QMAX = 127
_INT_MM_OK: dict[str, bool] = {}


def int_mm_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch._int_mm`` runs on this device type (probed once per device type)."""
    dev = torch.device(device)
    key = dev.type
    if key not in _INT_MM_OK:
        try:
            a = torch.ones(32, 32, dtype=torch.int8, device=dev)
            _INT_MM_OK[key] = bool(torch._int_mm(a, a)[0, 0] == 32)
        except (RuntimeError, AttributeError, NotImplementedError):
            _INT_MM_OK[key] = False
    return _INT_MM_OK[key]


def quantize_rows(x: torch.Tensor, qmax: int = QMAX, grid: str = "vllm") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax quantization per row: (int8 codes, float32 scales (rows, 1)).

    ``grid`` vllm: s = absmax / 127 (vLLM's dynamic INT8 kernel); ct: s = absmax / 127.5 with codes in
    [-128, 127] (compressed-tensors, what transformers computes on reload).
    """
    div = qmax + 0.5 if grid == "ct" else qmax
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-8) / div  # (R, 1)
    q = torch.round(x.float() / scale).clamp_(-(qmax + 1), qmax).to(torch.int8)
    return q, scale


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t`` for int8 ``a`` (M, K) and int8 ``b_t`` (K, N), accumulated exactly in int32."""
    if int_mm_available(a.device):
        m, k = a.shape
        n = b_t.shape[1]
        # CUDA's kernel wants M > 16 and K, N multiples of 8; CPU takes any shape.
        if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and n % 8 == 0):
            return torch._int_mm(a.contiguous(), b_t)
    if a.device.type == "cpu":
        return a.to(torch.int32) @ b_t.to(torch.int32)
    # float64 holds every int32 partial sum of int8 products exactly (|sum| <= 127^2 K < 2^53).
    return (a.double() @ b_t.double()).to(torch.int32)


class Int8Linear(nn.Module):
    """W8A8 linear with INT8 weights: ``y = (s_x s_w^T) * (Q(x) Q(W)^T) + b`` in integer arithmetic.

    Weights are quantized once, symmetric per output channel (absmax / 127) and stored as int8 with
    float32 scales; activations are quantized per token at run time. With ``threshold`` set it is
    LLM.int8() (Dettmers et al., 2022, arXiv 2208.07339): input columns whose max |x| reaches the
    threshold in the current batch stay in floating point,

        Y = X[:, O] W[:, O]^T  +  dequant(Q(X[:, ~O]) Q(W[:, ~O])^T),   O = {j : max_t |X_tj| >= threshold}

    where the float part uses the dequantized weight columns (the weights are stored only once, as int8).

    Args:
        weight: float weight (out, in).
        bias: optional bias (out,).
        threshold: LLM.int8() outlier threshold (default None: plain W8A8; the paper uses 6.0).
        real: run the integer GEMM (default True); False computes the same quantized math in float
            (fake quantization), for devices without an int8 kernel or for checking.
        name: fully-qualified name, for reports.

    Shapes:
        x (..., in) -> (..., out).
    """

    weight_int8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, threshold: float | None = None,
                 real: bool = True, name: str = "", grid: str = "vllm") -> None:
        super().__init__()
        self.grid = grid  # scale rule of weights and activations (see quantize_rows)
        q, scale = quantize_rows(weight.detach(), grid=grid)
        self.register_buffer("weight_int8", q)  # (out, in) int8
        self.register_buffer("weight_scale", scale.squeeze(1))  # (out,) float32
        if bias is not None:
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.threshold = threshold
        self.real = real
        self.name = name
        self.conv1d = False  # replaced a GPT-2 Conv1D (weight stored (in, out)): saved back in that layout
        self.last_outlier_columns = 0
        if real and not int_mm_available(weight.device):
            warnings.warn(f"torch._int_mm is unavailable on {weight.device.type}; {name or 'Int8Linear'} computes "
                          "the same integer products through a slower exact fallback", stacklevel=2)

    @classmethod
    def from_float(cls, module: nn.Module, **kwargs: Any) -> Int8Linear:
        """From ``nn.Linear`` or GPT-2 ``Conv1D`` (whose weight is stored (in, out))."""
        if not is_linear(module):
            raise TypeError(f"{type(module).__name__} is not nn.Linear or Conv1D")
        bias = getattr(module, "bias", None)
        out = cls(linear_weight(module), bias if isinstance(bias, torch.Tensor) else None, **kwargs)
        out.conv1d = type(module).__name__ == "Conv1D"
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # (M, in)
        outliers = None
        if self.threshold is not None:
            cols = x2.abs().amax(dim=0) >= self.threshold  # (in,)
            self.last_outlier_columns = int(cols.sum())
            if self.last_outlier_columns:
                outliers = cols
                x_in = x2.masked_fill(cols, 0.0)  # the int8 part sees no outlier column
            else:
                x_in = x2
        else:
            x_in = x2
        xq, sx = quantize_rows(x_in, grid=self.grid)  # (M, in) int8, (M, 1)
        if self.real:
            acc = int8_matmul(xq, self.weight_int8.t())  # (M, out) int32
            y = acc.float() * sx * self.weight_scale[None, :]
        else:
            y = F.linear(xq.float() * sx, self.dequantized_weight())
        if outliers is not None:
            idx = outliers.nonzero().flatten()
            y = y + x2[:, idx] @ self.dequantized_weight()[:, idx].t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        thr = f", threshold={self.threshold}" if self.threshold is not None else ""
        return f"in={self.in_features}, out={self.out_features}, real={self.real}{thr}"


def naive_llm_int8(x: torch.Tensor, w: torch.Tensor, threshold: float) -> torch.Tensor:
    """The decomposition written out directly (reference for tests): float outlier part + vector-wise
    INT8 rest, both with the int8-rounded weight."""
    cols = x.abs().amax(dim=0) >= threshold
    wq, sw = quantize_rows(w)
    w_hat = wq.float() * sw
    x_rest = torch.where(cols[None, :], torch.zeros_like(x), x)
    xq, sx = quantize_rows(x_rest)
    return (xq.float() * sx) @ w_hat.t() + x[:, cols] @ w_hat[:, cols].t()
