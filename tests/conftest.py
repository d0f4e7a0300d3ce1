"""Shared test set-up: deterministic, quiet, offline, and a deliberate thread count (2 cores here)."""

from __future__ import annotations

import os

os.environ.setdefault("OUTLIERKIT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# One thread by default: the fixtures are small tensors, where a second thread costs more than it gives,
# and CI machines have 2 cores shared with other processes.
torch.set_num_threads(int(os.environ.get("OUTLIERKIT_TEST_THREADS", "1")))
