"""Graph test data built in code: planted spectral anomalies and tiny TU folders."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data

# ../shared/data/tu beside the repository; OUTLIERKIT_TEST_TU points elsewhere (e.g. from a git worktree).
SHARED_TU = Path(os.environ.get("OUTLIERKIT_TEST_TU",
                               Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tu"))


def planted_graphs(num: int = 60, anomaly_share: float = 0.25, seed: int = 0) -> tuple[list[Data], np.ndarray]:
    """Rings with random chords and two node labels in equal numbers.

    Normal graphs carry the labels in two contiguous arcs (smooth, low Rayleigh quotient); anomalies
    alternate them around the ring (high frequency). Label counts, sizes and degrees have the same
    distribution in both classes, so only the spectral arrangement tells them apart.
    """
    rng = np.random.default_rng(seed)
    graphs, y = [], np.zeros(num, dtype=np.int64)
    y[rng.permutation(num)[: max(2, int(round(num * anomaly_share)))]] = 1
    for g in range(num):
        n = int(rng.integers(6, 12)) * 2
        ring = np.stack([np.arange(n), (np.arange(n) + 1) % n])
        chords = rng.integers(0, n, size=(2, int(rng.integers(0, 3))))
        ei = np.concatenate([ring, chords], 1)
        ei = ei[:, ei[0] != ei[1]]
        ei = np.concatenate([ei, ei[::-1]], 1)
        lab = (np.arange(n) % 2) if y[g] else (np.arange(n) >= n // 2).astype(np.int64)
        x = torch.nn.functional.one_hot(torch.from_numpy(lab), 2).float()
        graphs.append(Data(x=x, edge_index=torch.from_numpy(ei).long()))
    return graphs, y



def write_tu(root: Path, name: str, graphs: list[tuple[int, list[tuple[int, int]], list[int]]],
             *, attrs: bool = False) -> Path:
    """Write a TU folder ``root/name`` from (graph label, local 0-based edges, node labels) triples."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    a, gi, nl, gl, at = [], [], [], [], []
    offset = 0
    for g, (label, edges, labels) in enumerate(graphs, 1):
        for i, j in edges:
            a.append(f"{i + offset + 1}, {j + offset + 1}")
            a.append(f"{j + offset + 1}, {i + offset + 1}")
        gi += [str(g)] * len(labels)
        nl += [str(v) for v in labels]
        at += [f"{v * 0.5}, 1.0" for v in labels]
        gl.append(str(label))
        offset += len(labels)
    (d / f"{name}_A.txt").write_text("\n".join(a) + "\n")
    (d / f"{name}_graph_indicator.txt").write_text("\n".join(gi) + "\n")
    (d / f"{name}_node_labels.txt").write_text("\n".join(nl) + "\n")
    (d / f"{name}_graph_labels.txt").write_text("\n".join(gl) + "\n")
    if attrs:
        (d / f"{name}_node_attributes.txt").write_text("\n".join(at) + "\n")
    return d


def tiny_tu_graphs(num: int = 40, seed: int = 0) -> list[tuple[int, list[tuple[int, int]], list[int]]]:
    """Planted graphs as TU triples (label 2 = anomaly, the minority; label 1 = normal)."""
    graphs, y = planted_graphs(num, 0.25, seed)
    out = []
    for g, lab in zip(graphs, y, strict=True):
        ei = g.edge_index.numpy()
        half = ei[:, : ei.shape[1] // 2]
        out.append((2 if lab else 1, [(int(i), int(j)) for i, j in half.T], g.x.argmax(1).tolist()))
    return out
