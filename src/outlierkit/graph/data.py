"""TU-format graph datasets read offline, packed graph storage, anomaly labelling and stratified splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from outlierkit.errors import DataError

# Files a TU dataset must have; node labels / attributes are optional (see ``load_tu``).
_REQUIRED = ("A", "graph_indicator", "graph_labels")


@dataclass
class PackedGraphs:
    """Many small graphs stored as one block-diagonal graph, with vectorised sub-selection.

    Node ids are global; the nodes of graph ``g`` are ``node_ptr[g]:node_ptr[g+1]`` and its edges are
    ``edge_ptr[g]:edge_ptr[g+1]`` (edges are sorted by source node, hence grouped by graph). Edges are
    undirected (both directions stored), without self-loops and without duplicates.

    Shapes:
        x: (N, F) node features; edge_index: (2, E); node_ptr, edge_ptr: (G + 1,); y: (G,) or None.
    """

    x: Tensor
    edge_index: Tensor
    node_ptr: Tensor
    edge_ptr: Tensor
    y: Tensor | None = None

    @property
    def num_graphs(self) -> int:
        return int(self.node_ptr.numel() - 1)

    @property
    def num_features(self) -> int:
        return int(self.x.size(1))

    def __len__(self) -> int:
        return self.num_graphs

    def graph_sizes(self) -> Tensor:
        """Nodes per graph, shape (G,)."""
        return self.node_ptr[1:] - self.node_ptr[:-1]

    def edge_counts(self) -> Tensor:
        """Directed edges per graph (twice the undirected count), shape (G,)."""
        return self.edge_ptr[1:] - self.edge_ptr[:-1]

    def batch_vector(self) -> Tensor:
        """Graph id of every node, shape (N,)."""
        return torch.repeat_interleave(torch.arange(self.num_graphs), self.graph_sizes())

    def select(self, index: Tensor | Sequence[int] | np.ndarray) -> PackedGraphs:
        """The graphs ``index`` (in that order), renumbered consecutively; no Python loop over graphs."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long).reshape(-1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_graphs):
            raise IndexError(f"graph index out of range for {self.num_graphs} graphs")
        n_cnt = self.node_ptr[idx + 1] - self.node_ptr[idx]  # (B,)
        e_cnt = self.edge_ptr[idx + 1] - self.edge_ptr[idx]  # (B,)
        new_nptr = torch.zeros(idx.numel() + 1, dtype=torch.long)
        new_nptr[1:] = torch.cumsum(n_cnt, 0)
        new_eptr = torch.zeros(idx.numel() + 1, dtype=torch.long)
        new_eptr[1:] = torch.cumsum(e_cnt, 0)
        node_shift = self.node_ptr[idx] - new_nptr[:-1]  # old id - new id, per selected graph
        nodes = torch.arange(int(new_nptr[-1])) + torch.repeat_interleave(node_shift, n_cnt)
        edge_shift = self.edge_ptr[idx] - new_eptr[:-1]
        edges = torch.arange(int(new_eptr[-1])) + torch.repeat_interleave(edge_shift, e_cnt)
        ei = self.edge_index[:, edges] - torch.repeat_interleave(node_shift, e_cnt)  # (2, E_sel)
        y = None if self.y is None else self.y[idx]
        return PackedGraphs(self.x[nodes], ei, new_nptr, new_eptr, y)

    def to_data_list(self) -> list[Any]:
        """One ``torch_geometric.data.Data`` per graph (with ``y`` when labels are known)."""
        from torch_geometric.data import Data

        out = []
        for g in range(self.num_graphs):
            a, b = int(self.node_ptr[g]), int(self.node_ptr[g + 1])
            ea, eb = int(self.edge_ptr[g]), int(self.edge_ptr[g + 1])
            d = Data(x=self.x[a:b], edge_index=self.edge_index[:, ea:eb] - a, num_nodes=b - a)
            if self.y is not None:
                d.y = self.y[g : g + 1]
            out.append(d)
        return out


def pack_edges(
    x: Tensor, edge_index: Tensor, node_ptr: Tensor, y: Tensor | None = None, *, where: str = "graphs"
) -> PackedGraphs:
    """Build ``PackedGraphs`` from global edges: drop self-loops, symmetrise, deduplicate, check locality.

    Raises:
        DataError: an edge points outside ``[0, N)`` or joins two different graphs.
    """
    n = int(x.size(0))
    ei = edge_index.long()
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        bad = int(((ei < 0) | (ei >= n)).any(0).nonzero()[0])
        raise DataError(f"{where}: edge {bad} ({int(ei[0, bad])}, {int(ei[1, bad])}) points to a node "
                        f"outside 0..{n - 1}")
    g_of = torch.repeat_interleave(torch.arange(node_ptr.numel() - 1), node_ptr[1:] - node_ptr[:-1])
    if ei.numel():
        cross = g_of[ei[0]] != g_of[ei[1]]
        if bool(cross.any()):
            k = int(cross.nonzero()[0])
            raise DataError(
                f"{where}: edge {k} joins node {int(ei[0, k])} (graph {int(g_of[ei[0, k]])}) and node "
                f"{int(ei[1, k])} (graph {int(g_of[ei[1, k]])}); edges must stay inside one graph"
            )
    ei = ei[:, ei[0] != ei[1]]  # self-loops carry no Laplacian information; the code's L ignores them
    ei = torch.cat([ei, ei.flip(0)], 1)  # undirected: both directions, whatever the file listed
    key = torch.unique(ei[0] * max(n, 1) + ei[1])  # sorted, so edges come grouped by source graph
    ei = torch.stack([key // max(n, 1), key % max(n, 1)])  # (2, E)
    e_cnt = torch.bincount(g_of[ei[0]], minlength=node_ptr.numel() - 1) if ei.numel() else torch.zeros(
        node_ptr.numel() - 1, dtype=torch.long)
    edge_ptr = torch.zeros(node_ptr.numel(), dtype=torch.long)
    edge_ptr[1:] = torch.cumsum(e_cnt, 0)
    return PackedGraphs(x, ei, node_ptr.long(), edge_ptr, y)


def pack(graphs: PackedGraphs | Sequence[Any], y: Any = None) -> PackedGraphs:
    """Accept ``PackedGraphs`` or a sequence of PyG-like graphs (``.x``, ``.edge_index``); attach ``y``."""
    if isinstance(graphs, PackedGraphs):
        packed = graphs
    else:
        if len(graphs) == 0:
            raise DataError("no graphs given")
        xs, eis, sizes = [], [], []
        offset = 0
        for i, g in enumerate(graphs):
            x = getattr(g, "x", None)
            ei = getattr(g, "edge_index", None)
            if x is None or ei is None:
                raise DataError(f"graph {i} has no .x node features or no .edge_index")
            x = torch.as_tensor(x, dtype=torch.float32)
            if x.dim() != 2:
                raise DataError(f"graph {i}: x must be (num_nodes, num_features), got shape {tuple(x.shape)}")
            ei = torch.as_tensor(ei, dtype=torch.long).reshape(2, -1)
            if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= x.size(0)):
                raise DataError(f"graph {i}: edge_index points outside its {x.size(0)} nodes")
            xs.append(x)
            eis.append(ei + offset)
            sizes.append(x.size(0))
            offset += x.size(0)
        widths = {x.size(1) for x in xs}
        if len(widths) != 1:
            raise DataError(f"graphs have different feature widths {sorted(widths)}")
        node_ptr = torch.zeros(len(xs) + 1, dtype=torch.long)
        node_ptr[1:] = torch.cumsum(torch.tensor(sizes), 0)
        packed = pack_edges(torch.cat(xs), torch.cat(eis, 1), node_ptr)
    if y is not None:
        yt = torch.as_tensor(np.asarray(y)).long().reshape(-1)
        if yt.numel() != packed.num_graphs:
            raise DataError(f"{yt.numel()} labels for {packed.num_graphs} graphs")
        packed = PackedGraphs(packed.x, packed.edge_index, packed.node_ptr, packed.edge_ptr, yt)
    return packed


@dataclass
class TUData:
    """A TU dataset with explicit anomaly labelling: ``graphs.y`` is 1 for anomalies, 0 for normal graphs.

    ``spec`` holds what scoring new data needs to encode it identically (node-label categories,
    attribute use, the anomaly label).
    """

    name: str
    graphs: PackedGraphs
    raw_labels: np.ndarray
    spec: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def y(self) -> np.ndarray:
        assert self.graphs.y is not None
        return self.graphs.y.numpy()


def _find_dir(root: Path, name: str) -> Path:
    for d in (root / name / "raw", root / name, root):
        if (d / f"{name}_A.txt").is_file() or (d / f"{name}_graph_indicator.txt").is_file():
            return d
    raise DataError(
        f"TU dataset {name!r} not found under {root}: expected {root / name / (name + '_A.txt')} "
        f"(or in {root / name / 'raw'}); pass --data-root pointing at the folder that holds {name}/"
    )


def _read(path: Path, *, dtype: Any, ncols: int | None = None) -> np.ndarray:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    lines = [ln for ln in text.replace(",", " ").splitlines() if ln.strip()]
    try:
        arr = np.array([ln.split() for ln in lines], dtype=dtype) if lines else np.zeros((0, ncols or 1), dtype)
    except ValueError:
        width = ncols if ncols is not None else len(lines[0].split())
        bad = next((i for i, ln in enumerate(lines) if not _parses(ln, dtype, width)), 0)
        raise DataError(f"{path}: line {bad + 1} is not a row of {width} number(s): {lines[bad]!r}") from None
    if arr.ndim == 1:  # ragged rows make numpy build an object array or fail above
        arr = arr.reshape(-1, 1)
    if ncols is not None and arr.shape[1] != ncols:
        raise DataError(f"{path}: expected {ncols} value(s) per line, found {arr.shape[1]}")
    return arr


def _parses(line: str, dtype: Any, ncols: int | None) -> bool:
    parts = line.split()
    if ncols is not None and len(parts) != ncols:
        return False
    try:
        [dtype(p) for p in parts]
    except ValueError:
        return False
    return True


def load_tu(
    name: str,
    root: str | Path,
    *,
    anomaly_label: int | None = None,
    use_node_attr: bool = False,
    use_node_labels: bool = True,
    label_categories: Sequence[int] | None = None,
) -> TUData:
    """Read TU files ``root/NAME/[raw/]NAME_*.txt`` offline (nothing is written anywhere).

    Node features are the one-hot node labels over the sorted unique labels of the whole dataset (the
    RQGNN code's encoding), preceded by the real node attributes when ``use_node_attr``. Graph labels are
    mapped to anomaly (1) / normal (0): ``anomaly_label`` names the raw label of the anomaly class, and by
    default the minority class is the anomaly (ties: the smaller label).

    Args:
        name: dataset name, e.g. ``"MUTAG"``.
        root: folder holding ``NAME/`` (or ``NAME/raw/``).
        anomaly_label: raw graph label of the anomalies (default: None = minority class).
        use_node_attr: prepend ``NAME_node_attributes.txt`` columns to the features (default: False).
        use_node_labels: one-hot ``NAME_node_labels.txt`` (default: True).
        label_categories: node-label categories to encode with (default: None = this dataset's own);
            scoring reuses the training categories, unknown labels become an all-zero row.

    Raises:
        DataError: missing files, malformed lines, inconsistent graph indicator, edges pointing outside a
            graph or between graphs, fewer than two graph classes, or an unknown ``anomaly_label``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data root {root} does not exist or is not a folder")
    d = _find_dir(root, name)
    for part in _REQUIRED:
        if not (d / f"{name}_{part}.txt").is_file():
            raise DataError(f"TU dataset {name!r} in {d} lacks {name}_{part}.txt")
    warnings: list[str] = []
    gi = _read(d / f"{name}_graph_indicator.txt", dtype=np.int64, ncols=1)[:, 0]
    labels = _read(d / f"{name}_graph_labels.txt", dtype=np.int64, ncols=1)[:, 0]
    n, num_graphs = gi.size, labels.size
    if n == 0 or num_graphs == 0:
        raise DataError(f"TU dataset {name!r} in {d} has no nodes or no graphs")
    if np.any(np.diff(gi) < 0):
        k = int(np.nonzero(np.diff(gi) < 0)[0][0]) + 2
        raise DataError(f"{name}_graph_indicator.txt is not sorted (line {k}); the nodes of each graph must be "
                        "consecutive")
    present = np.unique(gi)
    if gi[0] != 1 or gi[-1] != num_graphs or present.size != num_graphs:
        raise DataError(
            f"{name}_graph_indicator.txt names graphs {gi[0]}..{gi[-1]} ({present.size} distinct) but "
            f"{name}_graph_labels.txt has {num_graphs} labels; graph ids must be 1..{num_graphs} without gaps"
        )
    node_ptr = np.zeros(num_graphs + 1, dtype=np.int64)
    node_ptr[1:] = np.cumsum(np.bincount(gi - 1, minlength=num_graphs))
    a = _read(d / f"{name}_A.txt", dtype=np.int64, ncols=2)
    if a.size and (a.min() < 1 or a.max() > n):
        k = int(np.nonzero((a < 1).any(1) | (a > n).any(1))[0][0])
        raise DataError(f"{name}_A.txt line {k + 1}: edge {tuple(a[k])} points outside nodes 1..{n}")
    feats: list[np.ndarray] = []
    if use_node_attr:
        p = d / f"{name}_node_attributes.txt"
        if not p.is_file():
            raise DataError(f"use_node_attr is set but {p} does not exist")
        attr = _read(p, dtype=np.float64)
        if attr.shape[0] != n:
            raise DataError(f"{p.name} has {attr.shape[0]} rows for {n} nodes")
        feats.append(attr.astype(np.float32))
    cats: list[int] = []
    if use_node_labels:
        p = d / f"{name}_node_labels.txt"
        if p.is_file():
            nl = _read(p, dtype=np.int64)[:, 0]
            if nl.size != n:
                raise DataError(f"{p.name} has {nl.size} rows for {n} nodes")
            cats = sorted(int(v) for v in np.unique(nl)) if label_categories is None else [
                int(c) for c in label_categories]
            lookup = {c: i for i, c in enumerate(cats)}
            col = np.array([lookup.get(int(v), -1) for v in nl], dtype=np.int64)
            unknown = int((col < 0).sum())
            if unknown:
                warnings.append(f"{unknown} node(s) carry labels unseen in training; encoded as all-zero rows")
            onehot = np.zeros((n, len(cats)), dtype=np.float32)
            onehot[np.nonzero(col >= 0)[0], col[col >= 0]] = 1.0
            feats.append(onehot)
        else:
            warnings.append(f"{name} has no node labels; using a constant feature")
    if not feats:
        feats.append(np.ones((n, 1), dtype=np.float32))
    x = torch.from_numpy(np.concatenate(feats, axis=1))
    classes, counts = np.unique(labels, return_counts=True)
    if classes.size < 2 and anomaly_label is None:
        raise DataError(f"{name} has a single graph class ({int(classes[0])}); anomaly labelling needs two classes "
                        "or an explicit anomaly_label")
    if anomaly_label is None:
        anomaly = int(classes[np.argmin(counts)])
    else:
        anomaly = int(anomaly_label)
        if anomaly not in classes and label_categories is None:
            raise DataError(f"anomaly_label {anomaly} is not a graph label of {name}; labels are "
                            f"{[int(c) for c in classes]}")
    y = torch.from_numpy((labels == anomaly).astype(np.int64))
    packed = pack_edges(x, torch.from_numpy(a.T - 1), torch.from_numpy(node_ptr), y, where=f"{name}_A.txt")
    spec = {
        "dataset": name,
        "anomaly_label": anomaly,
        "use_node_attr": use_node_attr,
        "use_node_labels": use_node_labels,
        "label_categories": cats,
        "num_features": int(x.size(1)),
    }
    return TUData(name, packed, labels, spec, warnings)


def downsample_anomalies(y: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Indices keeping every normal graph and a seeded random subset of anomalies.

    The subset size is ``round(ratio * n_normal / (1 - ratio))`` (at least 2), so anomalies make up about
    ``ratio`` of the result; with fewer anomalies available, all are kept. Returns sorted indices.
    """
    if not 0.0 < ratio < 1.0:
        raise DataError(f"anomaly ratio must be in (0, 1), got {ratio}")
    y = np.asarray(y)
    normal, anom = np.nonzero(y == 0)[0], np.nonzero(y == 1)[0]
    k = min(anom.size, max(2, int(round(ratio * normal.size / (1.0 - ratio)))))
    rng = np.random.default_rng(seed)
    keep = rng.choice(anom, size=k, replace=False)
    return np.sort(np.concatenate([normal, keep]))


def stratified_split(
    y: np.ndarray, seed: int, fractions: tuple[float, float] = (0.7, 0.85)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RQGNN's split: shuffle each class, cut at 70% and 85%, shuffle each part again (seeded).

    Returns (train, val, test) index arrays; every part keeps the normal:anomalous ratio.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        a, b = int(len(idx) * fractions[0]), int(len(idx) * fractions[1])
        for part, chunk in zip(parts, (idx[:a], idx[a:b], idx[b:]), strict=True):
            part.append(chunk)
    train, val, test = (rng.permutation(np.concatenate(p)) for p in parts)
    return train, val, test
