"""The RQGNN network and the GIN baseline network; both map a batch of graphs to two logits per graph."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from outlierkit.graph.layers import ChebWavelet, RQPooling
from outlierkit.graph.rayleigh import sym_norm_weights


class RQGNN(nn.Module):
    r"""Rayleigh Quotient Graph Neural Network (Dong et al., ICLR 2024, arXiv:2310.02861).

    Two branches over a graph with features ``X`` and precomputed Rayleigh-quotient vector ``r_G``:

    .. math::
        h &= \sigma(W_2 \sigma(W_1 x)),\quad H = \sigma(W_4 \sigma(W_3 [\mathrm{Cheb}_1(h) \| \dots \|
             \mathrm{Cheb}_q(h)])),\quad g_G = \mathrm{RQPool}(H, r_G),\\
        z_G &= \sigma(W_6 W_5 r_G),\qquad \text{logits} = W_o\, \mathrm{Dropout}(\mathrm{BN}([g_G \| z_G])),

    with :math:`\sigma` = LeakyReLU(0.01) and no activation between :math:`W_5` and :math:`W_6` (as in the
    released code).

    Args:
        in_channels: node feature width ``F`` (also the RQ vector length).
        hidden: width of the graph embeddings (default: 64).
        width: number of Chebyshev filters ``q`` (default: 4).
        depth: Chebyshev terms per filter ``K`` (default: 6).
        dropout: dropout before the output layer (default: 0.4).
        batch_norm: BatchNorm1d on the concatenated embedding (default: True, the code's ``normalize=1``).
        train_cheb: learn the Chebyshev filters (default: True, the paper; False = released code).

    Shapes:
        x: (N, F); edge_index: (2, E); batch: (N,); rq: (G, F) -> logits (G, 2).
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int = 64,
        width: int = 4,
        depth: int = 6,
        dropout: float = 0.4,
        batch_norm: bool = True,
        train_cheb: bool = True,
    ) -> None:
        super().__init__()
        f = in_channels
        self.enc1, self.enc2 = nn.Linear(f, f), nn.Linear(f, f)
        self.cheb = ChebWavelet(f, f, width=width, depth=depth, trainable=train_cheb)
        self.mix1, self.mix2 = nn.Linear(width * f, hidden), nn.Linear(hidden, hidden)
        self.pool = RQPooling(f, hidden)
        self.rql1, self.rql2 = nn.Linear(f, hidden), nn.Linear(hidden, hidden)
        self.norm: nn.Module = nn.BatchNorm1d(2 * hidden) if batch_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden, 2)

    def node_embed(self, x: Tensor, edge_index: Tensor, weight: Tensor | None = None) -> Tensor:
        """``H_v`` for every node, shape (N, hidden)."""
        h = F.leaky_relu(self.enc2(F.leaky_relu(self.enc1(x))))  # (N, F)
        h = self.cheb(h, edge_index, weight)  # (N, q * F)
        return F.leaky_relu(self.mix2(F.leaky_relu(self.mix1(h))))  # (N, hidden)

    def head(self, g: Tensor, rq: Tensor) -> Tensor:
        """Logits from the pooled embedding ``g`` (G, hidden) and the RQ vectors (G, F)."""
        z = F.leaky_relu(self.rql2(self.rql1(rq)))  # (G, hidden)
        return self.out(self.dropout(self.norm(torch.cat([g, z], dim=-1))))  # (G, 2)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, rq: Tensor) -> Tensor:
        _, w = sym_norm_weights(edge_index, x.size(0))
        hv = self.node_embed(x, edge_index, w)
        return self.head(self.pool(hv, rq, batch), rq)


class GINNet(nn.Module):
    r"""GIN graph classifier (Xu et al., ICLR 2019, arXiv:1810.00826), the supervised GNN baseline.

    .. math::
        h_v^{(l)} = \mathrm{MLP}^{(l)}\big((1+\epsilon) h_v^{(l-1)} + \textstyle\sum_{u\in N(v)} h_u^{(l-1)}\big),
        \qquad g_G = \big\|_{l} \textstyle\sum_{v\in G} h_v^{(l)},

    followed by the same head as RQGNN (BatchNorm, dropout, linear to two logits).

    Args:
        in_channels: node feature width.
        hidden: layer width (default: 64).
        layers: GIN layers (default: 3).
        dropout: dropout before the output layer (default: 0.4).
        batch_norm: BatchNorm1d on the pooled embedding (default: True).

    Shapes:
        x: (N, F); edge_index: (2, E); batch: (N,); rq: ignored -> logits (G, 2).
    """

    def __init__(
        self, in_channels: int, hidden: int = 64, layers: int = 3, dropout: float = 0.4, batch_norm: bool = True
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GINConv

        self.convs = nn.ModuleList()
        dims = [in_channels] + [hidden] * layers
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            mlp = nn.Sequential(nn.Linear(a, b), nn.LeakyReLU(), nn.Linear(b, b), nn.LeakyReLU())
            self.convs.append(GINConv(mlp, train_eps=True))
        self.norm: nn.Module = nn.BatchNorm1d(layers * hidden) if batch_norm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(layers * hidden, 2)

    def forward(self, x: Tensor, edge_index: Tensor, batch: Tensor, rq: Tensor) -> Tensor:
        pooled = []
        h = x
        for conv in self.convs:
            h = conv(h, edge_index)
            pooled.append(h.new_zeros(rq.size(0), h.size(1)).index_add_(0, batch, h))  # (G, hidden)
        return self.out(self.dropout(self.norm(torch.cat(pooled, -1))))
