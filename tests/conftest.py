"""Shared test set-up: deterministic, quiet, offline, and a deliberate thread count (2 cores here)."""

from __future__ import annotations

import os

os.environ.setdefault("OUTLIERKIT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OUTLIERKIT_TEST_THREADS", "2")))
