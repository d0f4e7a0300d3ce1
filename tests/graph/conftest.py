"""Graph test fixtures (data built in code; shared TU data when present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from graph_fixtures import SHARED_TU, planted_graphs, tiny_tu_graphs, write_tu
from torch_geometric.data import Data


@pytest.fixture(autouse=True)
def one_thread():
    """Graph tests run single-threaded: their tensors are tiny, and on the shared 2-core machine
    intra-op threads spin against other processes (a 60-graph forward took 20x longer with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def planted() -> tuple[list[Data], np.ndarray]:
    return planted_graphs()


@pytest.fixture
def tiny_tu(tmp_path: Path) -> Path:
    write_tu(tmp_path, "TINY", tiny_tu_graphs())
    return tmp_path


@pytest.fixture
def shared_tu() -> Path:
    if not (SHARED_TU / "MUTAG" / "MUTAG_A.txt").is_file():
        pytest.skip(f"shared TU data not found at {SHARED_TU} (expected ../shared/data/tu beside the repo)")
    return SHARED_TU
