"""A per-graph dense re-statement of RQGNN in the released code's style (reference for tests and speed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from outlierkit.graph.data import PackedGraphs
from outlierkit.graph.model import RQGNN
from outlierkit.graph.rayleigh import dense_laplacian


def dense_adjacency(graphs: PackedGraphs, g: int) -> tuple[Tensor, Tensor]:
    """Node features (n, F) and dense 0/1 adjacency (n, n) of graph ``g``, built edge by edge."""
    a, b = int(graphs.node_ptr[g]), int(graphs.node_ptr[g + 1])
    ea, eb = int(graphs.edge_ptr[g]), int(graphs.edge_ptr[g + 1])
    adj = torch.zeros(b - a, b - a)
    for i, j in (graphs.edge_index[:, ea:eb] - a).t().tolist():  # a Python loop, like the code's lil_matrix
        adj[i, j] = 1.0
    return graphs.x[a:b], adj


def dense_forward(model: RQGNN, graphs: PackedGraphs, *, normalize: bool = True) -> Tensor:
    r"""RQGNN logits computed graph by graph with dense matrices, from the same ``model`` weights.

    Per graph: dense :math:`L`, the RQ vector :math:`\mathrm{diag}(X^\top L X)/\mathrm{diag}(X^\top X)`
    computed at batching time (as the released code does), then each of the ``width`` Chebyshev filters
    runs its own recursion :math:`T_k = 2\hat L T_{k-1} - T_{k-2}` with the dense :math:`\hat L = L - I`
    and its own ``depth`` matrix products; RQ-pooling per graph; finally the shared head on the stack.
    Mathematically identical to ``model(x, edge_index, batch, rq)``; only the execution differs.

    Shapes:
        graphs: G graphs -> logits (G, 2).
    """
    cheb = model.cheb
    pooled, rqs = [], []
    for g in range(graphs.num_graphs):
        x, adj = dense_adjacency(graphs, g)
        lap = dense_laplacian(adj)
        num = ((lap @ x) * x).sum(0)  # (F,)
        den = (x * x).sum(0)
        rq = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num)) if normalize else num
        deg = adj.sum(1)
        inv = torch.where(deg > 0, deg.clamp_min(1e-12).rsqrt(), torch.zeros_like(deg))
        lhat = -(inv.unsqueeze(1) * adj * inv.unsqueeze(0))  # (n, n): L - I with PyG's lambda_max = 2
        h = F.leaky_relu(model.enc2(F.leaky_relu(model.enc1(x))))  # (n, F)
        outs = []
        for j in range(cheb.width):
            t_prev, t_cur = h, lhat @ h
            out = t_prev @ cheb.weight[j, 0]
            if cheb.depth > 1:
                out = out + t_cur @ cheb.weight[j, 1]
            for k in range(2, cheb.depth):
                t_prev, t_cur = t_cur, 2.0 * (lhat @ t_cur) - t_prev
                out = out + t_cur @ cheb.weight[j, k]
            outs.append(out + cheb.bias[j])
        hv = F.leaky_relu(model.mix2(F.leaky_relu(model.mix1(torch.cat(outs, -1)))))  # (n, hidden)
        t = F.leaky_relu(model.pool.lin2(F.leaky_relu(model.pool.lin1(rq))))  # (hidden,)
        pooled.append(((hv @ t).unsqueeze(1) * hv).sum(0))
        rqs.append(rq)
    return model.head(torch.stack(pooled), torch.stack(rqs))  # (G, 2)
