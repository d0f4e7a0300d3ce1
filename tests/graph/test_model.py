"""Chebyshev bank vs PyG ChebConv, RQGNN vs the dense per-graph reference, invariances, frozen filters."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import ChebConv

from outlierkit.graph.data import pack
from outlierkit.graph.dense import dense_forward
from outlierkit.graph.layers import ChebWavelet
from outlierkit.graph.model import RQGNN, GINNet
from outlierkit.graph.rayleigh import rayleigh_quotient


def inputs(graphs):
    p = pack(graphs)
    b = p.batch_vector()
    return p, (p.x, p.edge_index, b, rayleigh_quotient(p.x, p.edge_index, b, p.num_graphs))


def test_cheb_wavelet_equals_pyg_chebconvs(planted):
    p, (x, ei, _, _) = inputs(planted[0][:7])
    x = torch.randn(x.size(0), 5, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    convs = [ChebConv(5, 3, K=6) for _ in range(4)]
    for c in convs:
        torch.nn.init.normal_(c.bias)
    bank = ChebWavelet(5, 3, width=4, depth=6)
    bank.load_chebconvs(convs)
    ref = torch.cat([c(x, ei) for c in convs], -1)
    assert torch.allclose(bank(x, ei), ref, atol=1e-5)


def test_cheb_wavelet_isolated_node_is_order_zero_only():
    bank = ChebWavelet(2, 2, width=1, depth=3)
    x = torch.tensor([[1.0, 2.0]])
    out = bank(x, torch.zeros(2, 0, dtype=torch.long))
    # T1 = L_hat x = 0, T2 = -x on an isolated node
    w = bank.weight[0]
    assert torch.allclose(out, x @ w[0] - x @ w[2] + bank.bias[0])


@pytest.mark.parametrize("normalize", [True, False])
def test_rqgnn_equals_dense_per_graph_reference(planted, normalize):
    p, (x, ei, b, _) = inputs(planted[0][:12])
    torch.manual_seed(1)
    model = RQGNN(2, hidden=16).eval()
    rq = rayleigh_quotient(x, ei, b, p.num_graphs, normalize=normalize)
    assert torch.allclose(model(x, ei, b, rq), dense_forward(model, p, normalize=normalize), atol=1e-5)


def test_rqgnn_batched_equals_separate_and_permutation_invariant(planted):
    graphs = planted[0][:10]
    torch.manual_seed(2)
    model = RQGNN(2, hidden=16).eval()
    _, args = inputs(graphs)
    batched = model(*args)
    separate = torch.cat([model(*inputs([g])[1]) for g in graphs])
    assert torch.allclose(batched, separate, atol=1e-5)
    g = graphs[3]
    perm = torch.randperm(g.num_nodes, generator=torch.Generator().manual_seed(3))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(g.num_nodes)
    permuted = type(g)(x=g.x[perm], edge_index=inv[g.edge_index])
    assert torch.allclose(model(*inputs([permuted])[1]), separate[3:4], atol=1e-5)


def test_gin_batched_equals_separate(planted):
    graphs = planted[0][:6]
    torch.manual_seed(0)
    model = GINNet(2, hidden=8).eval()
    separate = torch.cat([model(*inputs([g])[1]) for g in graphs])
    assert torch.allclose(model(*inputs(graphs)[1]), separate, atol=1e-5)


def test_frozen_chebyshev_filters_get_no_gradient_but_are_saved(planted):
    _, args = inputs(planted[0][:8])
    model = RQGNN(2, hidden=8, train_cheb=False)
    model(*args).sum().backward()
    assert model.cheb.weight.grad is None and model.cheb.bias.grad is None
    assert model.enc1.weight.grad is not None
    assert "cheb.weight" in model.state_dict()
    trainable = RQGNN(2, hidden=8, train_cheb=True)
    trainable(*args).sum().backward()
    assert trainable.cheb.weight.grad is not None and trainable.cheb.weight.grad.abs().sum() > 0
