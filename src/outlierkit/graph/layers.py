"""RQGNN building blocks: the Chebyshev wavelet bank (CWGNN) and Rayleigh-quotient pooling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outlierkit.graph.rayleigh import sym_norm_weights


def scaled_laplacian_matmul(h: Tensor, edge_index: Tensor, weight: Tensor) -> Tensor:
    r"""``\hat L h`` with :math:`\hat L = L - I = -D^{-1/2} A D^{-1/2}` (PyG ChebConv, ``sym``, λ_max = 2).

    Shapes:
        h: (N, C); edge_index: (2, E); weight: (E,) = 1/sqrt(d_i d_j) -> (N, C).
    """
    out = torch.zeros_like(h)
    if edge_index.numel():
        out.index_add_(0, edge_index[1], h[edge_index[0]] * weight.unsqueeze(1), alpha=-1.0)
    return out


class ChebWavelet(nn.Module):
    r"""A bank of ``width`` Chebyshev graph filters of orders ``0..depth-1`` sharing one recursion.

    The CWGNN of RQGNN (Dong et al., ICLR 2024, arXiv:2310.02861), equal to ``width`` parallel PyG
    ``ChebConv(F_in, F_out, K=depth)`` layers whose outputs are concatenated:

    .. math::
        \text{out}_j = \sum_{k=0}^{K-1} T_k(\hat L)\, h\, \Theta_{j,k} + b_j,\qquad
        T_0 = h,\; T_1 = \hat L h,\; T_k = 2 \hat L T_{k-1} - T_{k-2},

    with :math:`\hat L = -D^{-1/2} A D^{-1/2}`. The polynomials :math:`T_k(\hat L) h` do not depend on the
    filter, so they are computed once and all filters are applied in one matmul.

    Args:
        in_channels: input width ``F_in``.
        out_channels: width of each filter's output ``F_out``.
        width: number of filters ``q`` (default: 4).
        depth: number of Chebyshev terms ``K`` (default: 6, i.e. orders 0..5).
        trainable: learn :math:`\Theta, b` (default: True, the paper). False freezes them at their glorot
            initialisation, as the released code does by accident (its filters sit in a plain list); they
            are still saved, so a reloaded model scores the same.

    Shapes:
        x: (N, F_in); edge_index: (2, E); weight: (E,) -> (N, width * F_out).
    """

    def __init__(
        self, in_channels: int, out_channels: int, width: int = 4, depth: int = 6, trainable: bool = True
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError("ChebWavelet needs depth >= 1 and width >= 1")
        self.in_channels, self.out_channels, self.width, self.depth = in_channels, out_channels, width, depth
        self.weight = nn.Parameter(torch.empty(width, depth, in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(width, out_channels))
        self.reset_parameters()
        self.trainable = trainable
        self.weight.requires_grad_(trainable)
        self.bias.requires_grad_(trainable)

    def reset_parameters(self) -> None:
        bound = math.sqrt(6.0 / (self.in_channels + self.out_channels))  # glorot, as PyG's ChebConv lins
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.zero_()

    def forward(self, x: Tensor, edge_index: Tensor, weight: Tensor | None = None) -> Tensor:
        if weight is None:
            _, weight = sym_norm_weights(edge_index, x.size(0))
        terms = [x]
        if self.depth > 1:
            terms.append(scaled_laplacian_matmul(x, edge_index, weight))
        for _ in range(2, self.depth):
            terms.append(2.0 * scaled_laplacian_matmul(terms[-1], edge_index, weight) - terms[-2])
        t = torch.stack(terms, dim=1).reshape(x.size(0), -1)  # (N, K * F_in)
        w = self.weight.permute(1, 2, 0, 3).reshape(self.depth * self.in_channels, -1)  # (K*F_in, q*F_out)
        return t @ w + self.bias.reshape(-1)  # (N, q * F_out)

    @torch.no_grad()
    def load_chebconvs(self, convs: list[nn.Module]) -> None:
        """Copy the weights of ``width`` PyG ``ChebConv`` layers (tests check both compute the same)."""
        for j, conv in enumerate(convs):
            for k, lin in enumerate(conv.lins):  # type: ignore[union-attr,arg-type]
                self.weight[j, k].copy_(lin.weight.t())
            self.bias[j].copy_(conv.bias)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, width={self.width}, depth={self.depth}, "
                f"trainable={self.trainable}")


class RQPooling(nn.Module):
    r"""Rayleigh-quotient pooling: node weights from the graph's RQ vector, then a weighted sum.

    RQGNN (arXiv:2310.02861), as the released code computes it (no softmax on the weights):

    .. math::
        t_G = \sigma(W_9\, \sigma(W_8 r_G)),\qquad s_v = H_v \cdot t_G,\qquad g_G = \sum_{v\in G} s_v H_v,

    with :math:`\sigma` = LeakyReLU(0.01).

    Args:
        rq_channels: length ``F`` of the RQ vector.
        hidden: width of ``H_v`` and ``t_G`` (default: 64).

    Shapes:
        h: (N, hidden); rq: (G, F); batch: (N,) -> (G, hidden).
    """

    def __init__(self, rq_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.lin1 = nn.Linear(rq_channels, hidden)
        self.lin2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, rq: Tensor, batch: Tensor) -> Tensor:
        t = F.leaky_relu(self.lin2(F.leaky_relu(self.lin1(rq))))  # (G, hidden)
        s = (h * t[batch]).sum(-1, keepdim=True)  # (N, 1)
        return h.new_zeros(rq.size(0), h.size(1)).index_add_(0, batch, s * h)  # (G, hidden)
