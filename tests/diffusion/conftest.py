"""Fixtures for the diffusion tests: stub denoisers with hand-built logits and a tiny random model."""

from __future__ import annotations

import pytest
import torch

from outlierkit.diffusion.tiny import TinyConfig, TinyMDM


@pytest.fixture
def random_tiny() -> TinyMDM:
    """An untrained tiny model in float64: canvas-dependent, row-independent, deterministic."""
    torch.manual_seed(0)
    return TinyMDM(TinyConfig(max_len=38, d_model=32, n_layers=2, n_heads=2, d_ff=64)).double().eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests use tiny matrices: a second thread on the shared 2-core box only adds contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """An untrained tiny checkpoint directory (for CLI plumbing; says nothing about quality)."""
    from outlierkit.diffusion.tiny import make_task, save_tiny

    path = tmp_path_factory.mktemp("tiny") / "ck"
    torch.manual_seed(0)
    save_tiny(TinyMDM(), make_task("parity-chain"), path, {"command": "random init (test fixture)"})
    return path
