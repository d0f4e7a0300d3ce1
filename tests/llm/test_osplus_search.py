"""OS+ scale search: the exact-range quantizer of the proxies, the proxies themselves, and the halving search
against the full grid (the reference)."""

from __future__ import annotations

import pytest
import torch

from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import fake_quant, parse_format
from outlierkit.llm.methods.os_plus import (
    OSPlus,
    _quant_k,
    candidates,
    search_halving,
    search_loop,
    search_vectorized,
)


@pytest.fixture(scope="module")
def batches(tok):
    from outlierkit.llm.corpus import build_corpus, load_documents

    return build_corpus(tok, load_documents(None), samples=4, seq_len=96, seed=2, min_tokens=96).batches(4)


_CACHE: dict = {}


def _problems(family, batches, kinds=("norm", "attn_v", "linear")):
    key = (family, kinds, id(batches))
    if key not in _CACHE:
        _CACHE[key] = _build(family, batches, kinds)
    return _CACHE[key]


def _build(family, batches, kinds):
    from outlierkit.llm.calibrate import collect_input_stats
    from outlierkit.llm.methods.base import resolve_groups
    from outlierkit.llm.models import resolve

    model = tiny_model(family)
    mm = resolve(model, warn=False)
    groups = resolve_groups(model, mm, kinds)
    sites = sorted({g.linears[0] for g in groups})
    attn = {g.linears[0]: mm.fqn(g.layer, mm.spec.attn) for g in groups if g.spec.role == "qkv"}
    stats = collect_input_stats(model, sites, batches, cache=set(sites), context_sites=attn)
    wf, af = parse_format("int8-channel"), parse_format("int8-tensor")
    return [OSPlus().problem(model, mm, g, stats[g.linears[0]], wf, af)[0] for g in groups]


@pytest.mark.parametrize("fmt", ["int8-tensor", "int4-tensor-asym", "fp8", "int8-token", "int8-channel"])
def test_explicit_range_quantizer_equals_dynamic(fmt):
    """Per-tensor ranges given from per-channel min/max reproduce the dynamic per-candidate quantizer exactly."""
    f = parse_format(fmt)
    torch.manual_seed(0)
    x = torch.randn(2, 7, 16) * torch.linspace(0.1, 30, 16)
    s = torch.rand(3, 16) + 1
    xs = x[None] / s[:, None, None, :]  # (K, B, T, C): one input, K candidate scales
    lo = (x.amin((0, 1))[None] / s).amin(-1)  # per candidate, from per-channel minima
    hi = (x.amax((0, 1))[None] / s).amax(-1)
    want = torch.stack([fake_quant(xs[k], f) for k in range(3)])
    assert torch.equal(_quant_k(xs, f, lo, hi), want)


def test_proxies_are_skipped_when_small_and_estimate_the_loss(batches):
    """No proxy when it would keep (nearly) everything; a 3/4 proxy estimates the full loss (importance
    weights, full quantizer ranges)."""
    for p in _problems("llama", batches):
        ts = candidates(p.c, 1.0, 40)[:5]
        q = p.subsample(1.0, 1.0, min_tokens=0, min_rows=0)
        assert q is None  # nothing to gain: the search skips it
        if p.role == "attn":
            continue
        q = p.subsample(0.74, 0.74, min_tokens=0, min_rows=0)
        assert q is not None
        full, proxy = p.losses(ts), q.losses(ts)
        assert torch.allclose(proxy, full, rtol=0.5)  # an estimate of the same loss, not another loss


@pytest.mark.parametrize("family", ["llama", pytest.param("opt", marks=pytest.mark.slow),
                                    pytest.param("qwen2_moe", marks=pytest.mark.slow)])
def test_halving_finds_the_grid_optimum(family, batches):
    """Within 0.1% of the grid's best loss on every fold group, with a fraction of the exact evaluations."""
    evals = grid = 0
    for p in _problems(family, batches):
        ts = candidates(p.c, 1.0, 200)
        i_grid, l_grid = search_vectorized(p, ts, 32, "grid")
        i_h, l_h = search_halving(p, ts, 32)
        assert float(l_grid[i_h]) <= float(l_grid.min()) * 1.001 + 1e-12, (p.role, i_h, i_grid)
        assert torch.allclose(l_h[~l_h.isnan()], l_grid[~l_h.isnan()], rtol=1e-4)  # exact where scored
        evals += int((~l_h.isnan()).sum())
        grid += len(ts)
    assert evals < 0.35 * grid


def test_halving_on_a_small_problem_is_the_grid(batches):
    p = _problems("llama", batches[:1], kinds=("linear",))[0]
    ts = candidates(p.c, 1.0, 60)
    i_loop, l_loop = search_loop(p, ts)
    i_h, l_h = search_halving(p, ts, 8, stages=())
    assert i_h == i_loop and torch.allclose(l_h, l_loop.double(), rtol=1e-5)


def test_os_plus_search_option_is_checked():
    from outlierkit.errors import ConfigError

    with pytest.raises(ConfigError, match="halving, grid or coarse"):
        OSPlus(search="bisect")  # type: ignore[arg-type]
