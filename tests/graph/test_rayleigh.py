"""Rayleigh quotient: dense reference, isolated nodes, permutation invariance, batched equals separate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlierkit.graph.data import pack
from outlierkit.graph.rayleigh import dense_laplacian, dense_rayleigh_quotient, rayleigh_quotient


def random_graph(n: int, p: float, f: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    upper = torch.triu((torch.rand(n, n, generator=g) < p).float(), 1)
    adj = upper + upper.t()
    x = torch.rand(n, f, generator=g)
    x[:, 0] = 0.0  # a channel absent from the graph: x^T x = 0 must give 0, not NaN
    return x, adj, adj.nonzero().t()


def test_dense_laplacian_matches_scipy():
    scipy_csgraph = pytest.importorskip("scipy.sparse.csgraph")
    _, adj, _ = random_graph(9, 0.3, 3, 1)
    adj[0] = 0
    adj[:, 0] = 0  # isolated node: scipy puts 0 on its diagonal
    ref = scipy_csgraph.laplacian(adj.double().numpy(), normed=True)
    assert np.allclose(dense_laplacian(adj.double()).numpy(), ref, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 14), p=st.floats(0.0, 1.0), f=st.integers(1, 5), seed=st.integers(0, 10_000),
       normalize=st.booleans())
def test_rq_matches_dense_reference(n, p, f, seed, normalize):
    x, adj, ei = random_graph(n, p, f, seed)
    got = rayleigh_quotient(x, ei, normalize=normalize)[0]
    ref = dense_rayleigh_quotient(x.double(), adj.double(), normalize=normalize).float()
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref, atol=1e-5), (got, ref)
    assert got[0] == 0.0
    if normalize:  # eigenvalues of the normalized Laplacian lie in [0, 2]
        assert bool((got > -1e-5).all() and (got < 2 + 1e-5).all())


def test_rq_no_edges_and_isolated_nodes_give_zero_not_nan():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    empty = torch.zeros(2, 0, dtype=torch.long)
    for normalize in (True, False):
        out = rayleigh_quotient(x, empty, normalize=normalize)
        assert torch.equal(out, torch.zeros(1, 2))


def test_rq_known_values():
    # path 0-1: L = [[1,-1],[-1,1]]; x = (1,-1) is the top eigenvector (lambda 2), x = (1,1) has lambda 0
    ei = torch.tensor([[0, 1], [1, 0]])
    x = torch.tensor([[1.0, 1.0], [-1.0, 1.0]])
    assert torch.allclose(rayleigh_quotient(x, ei), torch.tensor([[2.0, 0.0]]))
    assert torch.allclose(rayleigh_quotient(x, ei, normalize=False), torch.tensor([[4.0, 0.0]]))


def test_rq_permutation_invariant():
    x, _, ei = random_graph(12, 0.3, 4, 7)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(12)
    out = rayleigh_quotient(x[perm], inv[ei])
    assert torch.allclose(out, rayleigh_quotient(x, ei), atol=1e-6)


def test_rq_batched_equals_separate(planted):
    graphs, _ = planted
    packed = pack(graphs)
    batched = rayleigh_quotient(packed.x, packed.edge_index, packed.batch_vector(), packed.num_graphs)
    separate = torch.cat([rayleigh_quotient(g.x, pack([g]).edge_index) for g in graphs])
    assert torch.allclose(batched, separate, atol=1e-6)


def test_planted_anomalies_have_higher_rq(planted):
    graphs, y = planted
    packed = pack(graphs)
    rq = rayleigh_quotient(packed.x, packed.edge_index, packed.batch_vector(), packed.num_graphs).mean(1)
    assert rq[y == 1].min() > rq[y == 0].max()


def test_sums_run_in_float64_where_float32_cancels():
    """x^T L x is a difference of two sums of similar size; with a large offset float32 loses every digit."""
    n = 64
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    ei = torch.cat([ring, ring.flip(0)], 1)
    x = (1000.0 + 0.1 * torch.sin(torch.arange(n, dtype=torch.float64) / 3)).unsqueeze(1).float()  # (n, 1)
    adj = torch.zeros(n, n, dtype=torch.float64)
    adj[ei[0], ei[1]] = 1.0
    for normalize in (False, True):
        ref = dense_rayleigh_quotient(x.double(), adj, normalize=normalize)
        got = rayleigh_quotient(x, ei, normalize=normalize)
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=0), (normalize, got, ref)
