"""Orthogonal rotation matrices (Hadamard, randomized Hadamard, random orthogonal) and the online-rotation layer.

Hadamard matrices of order n (H H^T = n I), returned normalized (H / sqrt(n)) in float64:

* n a power of two: Sylvester's construction, ``scipy.linalg.hadamard``.
* n = 2^k (q + 1) with q a prime, q = 3 (mod 4): Paley's first construction of order q + 1 (from the
  Jacobsthal matrix of GF(q)), Kronecker-multiplied with Sylvester's of order 2^k. This covers e.g.
  12 (MiniLM's 1536 = 128 x 12), 20, 24, 44, 48, 60, 68, 72, 80, 84.
* otherwise: block-diagonal Sylvester blocks of the largest power of two dividing n. Orthogonal (so every
  fold stays exact) but it only mixes channels within blocks of that size; the label says so.
  (QuaRot ships hand-made tables for orders such as 172 and 156; those are not included here.)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from outlierkit.errors import ConfigError
from outlierkit.llm.layers import QuantLinear


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, math.isqrt(q) + 1))


def _paley(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix of order q + 1 (q prime, q = 3 mod 4), entries +-1.

    Jacobsthal Q_ij = chi(j - i) (Legendre symbol, chi(0) = 0); S = [[0, 1^T], [-1, Q]]; H = I + S.
    """
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jac = chi[(idx[None, :] - idx[:, None]) % q]  # (q, q)
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = jac
    return torch.eye(q + 1, dtype=torch.float64) + s


def hadamard(n: int) -> tuple[torch.Tensor, str]:
    """An orthonormal Hadamard-type matrix of order ``n`` (float64) and the name of its construction."""
    if n < 1:
        raise ConfigError(f"hadamard order must be positive, got {n}")
    from scipy.linalg import hadamard as sylvester

    pow2 = n & -n  # largest power of two dividing n
    if pow2 == n:
        h = torch.from_numpy(sylvester(n).astype("float64"))
        return h / math.sqrt(n), f"sylvester-{n}"
    m = n // pow2
    # n = 2^j (q + 1): try every split with q + 1 a multiple of 4 (Paley I needs q = 3 mod 4).
    k = pow2
    while k >= 1:
        q = n // k - 1
        if n % k == 0 and q % 4 == 3 and _is_prime(q):
            h = torch.kron(torch.from_numpy(sylvester(k).astype("float64")), _paley(q))
            return h / math.sqrt(n), f"sylvester-{k} x paley-{q + 1}"
        k //= 2
    if pow2 == 1:
        raise ConfigError(f"no Hadamard construction for odd order {n}; use kind: random")
    block = torch.from_numpy(sylvester(pow2).astype("float64")) / math.sqrt(pow2)
    return torch.block_diag(*([block] * m)), f"block-diagonal {m} x sylvester-{pow2} (no full Hadamard of order {n})"


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix), float64."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotation(n: int, kind: str, seed: int = 0, random_signs: bool = True) -> tuple[torch.Tensor, str]:
    """(Q, label): an orthogonal (n, n) float64 matrix of ``kind`` ``hadamard`` or ``random``.

    ``random_signs`` multiplies a Hadamard matrix by a random +-1 diagonal on the left (QuaRot's
    randomized Hadamard); it stays orthogonal.
    """
    if kind == "random":
        return random_orthogonal(n, seed), "random-orthogonal"
    h, label = hadamard(n)
    if random_signs:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        h = signs[:, None] * h
        label = "randomized " + label
    return h, label


class OnlineQuantLinear(QuantLinear):
    """A :class:`QuantLinear` with an optional online input rotation and an optional float reference weight.

    ``rotation`` R (C, C), orthogonal: the layer computes Q(x R) Q(W')^T + b with W' = W R stored in the
    wrapped module, so with no formats it equals the original layer exactly. Serving engines (vLLM,
    transformers) do not run this rotation unless they implement it (QuaRot's online Hadamard); it is
    part of this module only.

    ``ref_weight`` (out, in): the weight before a lossy weight update (GPTQ writes its quantized weights
    into the wrapped module); per-layer SQNR recording then measures against it, so it shows the whole
    quantization error, not only the part added after GPTQ.
    """

    rotation: torch.Tensor | None
    ref_weight: torch.Tensor | None

    def __init__(self, inner: nn.Module, *, rotation: torch.Tensor | None = None, **kw: Any) -> None:
        super().__init__(inner, **kw)
        if self.kind == "experts":
            raise TypeError(f"{self.name}: online rotations and reference weights support linear layers only")
        self.register_buffer("rotation", rotation, persistent=False)
        self.register_buffer("ref_weight", None, persistent=False)
        self.rotation_label = ""

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x R (the input the wrapped weight expects)."""
        if self.rotation is None:
            return x
        return (x.to(self.rotation.dtype) @ self.rotation).to(x.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = self.transform_input(x)
        if self.ref_weight is None or not self.recording or self.observing:
            return super().forward(x, *args, **kwargs)
        self.recording = False
        try:
            y = super().forward(x, *args, **kwargs)
        finally:
            self.recording = True
        with torch.no_grad():
            self.in_absmax = max(self.in_absmax, float(x.detach().abs().max())) if x.numel() else 0.0
            ref = nn.functional.linear(x, self.ref_weight.to(x.dtype), self.inner.bias).double()
            self.signal += ref.pow(2).sum().item()
            self.noise += (ref - y.detach().double()).pow(2).sum().item()
        return y

    def extra_repr(self) -> str:
        extra = f", online rotation {self.rotation_label}" if self.rotation is not None else ""
        return super().extra_repr() + extra + (", gptq" if self.ref_weight is not None else "")
