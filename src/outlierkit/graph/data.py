"""TU-format graph datasets read offline, packed graph storage, anomaly labelling and stratified splits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from outlierkit.errors import ConfigError, DataError

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
    x: Tensor, edge_index: Tensor, node_ptr: Tensor, y: Tensor | None = None, *, where: str = "graphs",
    base: int = 0,
) -> PackedGraphs:
    """Build ``PackedGraphs`` from global edges: drop self-loops, symmetrise, deduplicate, check locality.

    ``base`` is added to every id in messages: 1 for TU files (their lines, nodes and graphs count from
    1, so "line 7, node 12" points at the file), 0 for Python positions.

    Raises:
        DataError: an edge points outside ``[0, N)`` or joins two different graphs.
    """
    n = int(x.size(0))
    ei = edge_index.long()
    what = "line" if base else "edge"
    if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= n):
        bad = int(((ei < 0) | (ei >= n)).any(0).nonzero()[0])
        raise DataError(f"{where}: {what} {bad + base} ({int(ei[0, bad]) + base}, {int(ei[1, bad]) + base}) "
                        f"points to a node outside {base}..{n - 1 + base}")
    g_of = torch.repeat_interleave(torch.arange(node_ptr.numel() - 1), node_ptr[1:] - node_ptr[:-1])
    if ei.numel():
        cross = g_of[ei[0]] != g_of[ei[1]]
        if bool(cross.any()):
            k = int(cross.nonzero()[0])
            raise DataError(
                f"{where}: {what} {k + base} joins node {int(ei[0, k]) + base} (graph "
                f"{int(g_of[ei[0, k]]) + base}) and node {int(ei[1, k]) + base} (graph "
                f"{int(g_of[ei[1, k]]) + base}); edges must stay inside one graph"
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


def as_graph_list(graphs: Any) -> list[Any]:
    """The single graphs in a sequence of ``Data``, a PyG ``Batch``, a ``Dataset`` or a ``DataLoader``.

    A ``Batch`` (and every mini-batch a ``DataLoader`` yields) is split back into its graphs, so each
    graph gets its own score, whatever the batching.
    """
    if _is_batch(graphs):
        return list(graphs.to_data_list())
    if isinstance(graphs, (str, bytes)) or not hasattr(graphs, "__iter__"):
        raise DataError(f"expected graphs (PackedGraphs, a list of PyG Data, a Batch, a Dataset or a "
                        f"DataLoader), got {type(graphs).__name__}")
    out: list[Any] = []
    for item in graphs:
        if _is_batch(item):
            out.extend(item.to_data_list())
        else:
            out.append(item)
    return out


def _is_batch(obj: Any) -> bool:
    return hasattr(obj, "to_data_list") and hasattr(obj, "num_graphs") and hasattr(obj, "batch")


def pack(graphs: Any, y: Any = None) -> PackedGraphs:
    """Pack ``PackedGraphs``, a sequence of PyG-like graphs (``.x``, ``.edge_index``), a PyG ``Batch``,
    ``Dataset`` or ``DataLoader`` into one ``PackedGraphs``; attach ``y`` (default: each graph's own ``.y``
    when every graph carries a single label).

    Raises:
        DataError: no graphs, missing ``.x``/``.edge_index``, mixed feature widths, edges outside a graph,
            non-finite node features, or a label count that does not match.
    """
    if isinstance(graphs, PackedGraphs):
        packed = graphs
    else:
        graphs = as_graph_list(graphs)
        if len(graphs) == 0:
            raise DataError("no graphs given")
        xs, eis, sizes = [], [], []
        offset = 0
        own_y: list[int] | None = []
        for i, g in enumerate(graphs):
            x = getattr(g, "x", None)
            ei = getattr(g, "edge_index", None)
            if x is None or ei is None:
                raise DataError(f"graph {i} has no .x node features or no .edge_index")
            x = torch.as_tensor(x, dtype=torch.float32)
            if x.dim() != 2:
                raise DataError(f"graph {i}: x must be (num_nodes, num_features), got shape {tuple(x.shape)}")
            if not bool(torch.isfinite(x).all()):
                node = int((~torch.isfinite(x)).any(1).nonzero()[0])
                raise DataError(f"graph {i}: node {node} has a non-finite feature (NaN or inf); clean the node "
                                "features first")
            ei = torch.as_tensor(ei, dtype=torch.long).reshape(2, -1)
            if ei.numel() and (int(ei.min()) < 0 or int(ei.max()) >= x.size(0)):
                raise DataError(f"graph {i}: edge_index points outside its {x.size(0)} nodes")
            gy = getattr(g, "y", None)
            if own_y is not None and gy is not None and torch.as_tensor(gy).numel() == 1:
                own_y.append(int(torch.as_tensor(gy).reshape(-1)[0]))
            else:
                own_y = None
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
        if y is None and own_y:
            y = own_y
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


def _count_lines(path: Path) -> int:
    """Non-blank lines of a text file."""
    try:
        with path.open("rb") as fh:
            return sum(1 for ln in fh if ln.strip())
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None


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
        raise DataError(f"{name}_A.txt line {k + 1}: edge {tuple(int(v) for v in a[k])} points outside nodes "
                        f"1..{n}")
    # A cleanly truncated _A.txt parses fine and silently drops the edges of the last graphs: the edge
    # label/attribute files have one line per A line, so their line counts expose it.
    for part in ("edge_labels", "edge_attributes"):
        p = d / f"{name}_{part}.txt"
        if p.is_file():
            lines = _count_lines(p)
            if lines != a.shape[0]:
                raise DataError(f"{name}_A.txt has {a.shape[0]} edge lines but {p.name} has {lines}; one of them "
                                "is truncated or padded (they must have one line per edge)")
    feats: list[np.ndarray] = []
    if use_node_attr:
        p = d / f"{name}_node_attributes.txt"
        if not p.is_file():
            raise DataError(f"use_node_attr is set but {p} does not exist")
        attr = _read(p, dtype=np.float64)
        if attr.shape[0] != n:
            raise DataError(f"{p.name} has {attr.shape[0]} rows for {n} nodes")
        if not np.isfinite(attr).all():
            k = int(np.nonzero(~np.isfinite(attr).all(1))[0][0])
            raise DataError(f"{p} line {k + 1} (node {k + 1}): non-finite value "
                            f"{attr[k][~np.isfinite(attr[k])][0]}; node attributes must be finite numbers")
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
    packed = pack_edges(x, torch.from_numpy(a.T - 1), torch.from_numpy(node_ptr), y, where=f"{name}_A.txt",
                        base=1)
    edgeless = ((packed.edge_counts() == 0) & (packed.graph_sizes() > 1)).nonzero().reshape(-1)
    if edgeless.numel() and packed.edge_index.numel():
        ids = [int(g) + 1 for g in edgeless[:5]]
        warnings.append(f"{edgeless.numel()} graph(s) of {name} have several nodes but no edge (graph ids "
                        f"{ids}{' ...' if edgeless.numel() > 5 else ''}, 1-based) although the set has edges: "
                        f"is {name}_A.txt truncated?")
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


def load_split(path: str | Path, num_graphs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A given split: JSON ``{"train": [...], "val": [...], "test": [...]}`` of 0-based graph positions.

    Raises:
        DataError: unreadable file, missing or non-integer lists, a position outside ``0..num_graphs-1``,
            a graph listed twice, or an empty train/val/test part.
    """
    import json

    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"cannot read split file {p}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"split file {p} is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise DataError(f"split file {p} must hold an object with train, val and test lists")
    parts: list[np.ndarray] = []
    for key in ("train", "val", "test"):
        items = doc.get(key)
        if not isinstance(items, list) or not items:
            raise DataError(f"split file {p}: {key!r} must be a non-empty list of 0-based graph positions")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise DataError(f"split file {p}: {key!r} holds a value that is not an integer position")
        arr = np.asarray(items, dtype=np.int64)
        out = arr[(arr < 0) | (arr >= num_graphs)]
        if out.size:
            raise DataError(f"split file {p}: {key!r} position {int(out[0])} is outside 0..{num_graphs - 1} "
                            f"(the dataset has {num_graphs} graphs; positions are 0-based)")
        vals, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"split file {p}: {key!r} lists position {int(vals[counts > 1][0])} twice")
        parts.append(arr)
    for (a, ka), (b, kb) in (((parts[0], "train"), (parts[1], "val")), ((parts[0], "train"), (parts[2], "test")),
                             ((parts[1], "val"), (parts[2], "test"))):
        both = np.intersect1d(a, b)
        if both.size:
            raise DataError(f"split file {p}: {ka} and {kb} overlap in {both.size} graph(s), e.g. position "
                            f"{int(both[0])}")
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class DataConfig:
    """How a TU dataset becomes an anomaly-detection task.

    Args:
        dataset: TU name (e.g. ``"AIDS"``).
        data_root: folder holding ``NAME/`` in TU format.
        anomaly_label: raw graph label of the anomaly class (default: None = minority class).
        anomaly_ratio: downsample anomalies to this share, seeded (default: None = keep all).
        use_node_attr: prepend real node attributes to the one-hot labels (default: False).
        seed: seeds downsampling and the stratified 70/15/15 split (default: 0); unused with ``split_file``.
        split_file: JSON ``{"train": [...], "val": [...], "test": [...]}`` of 0-based graph positions, a
            given split such as a paper's (default: None = the seeded stratified split).
    """

    dataset: str
    data_root: str
    anomaly_label: int | None = None
    anomaly_ratio: float | None = None
    use_node_attr: bool = False
    seed: int = 0
    split_file: str | None = None


@dataclass
class Task:
    """A loaded dataset with its (downsampled) index set and train/val/test indices into ``data.graphs``."""

    data: TUData
    keep: np.ndarray
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    cfg: DataConfig
    info: dict[str, Any] = field(default_factory=dict)


def make_task(cfg: DataConfig, data: TUData | None = None) -> Task:
    """Load (or reuse) the dataset, then take the split of ``split_file`` or downsample anomalies if asked
    and split 70/15/15 stratified (seeded).

    Raises:
        DataError: a bad split file (see ``load_split``) or a training part without both classes.
        ConfigError: ``split_file`` together with ``anomaly_ratio`` (the file names positions as read).
    """
    if cfg.split_file is not None and cfg.anomaly_ratio is not None:
        raise ConfigError("a split file and an anomaly ratio cannot be combined: the split names graph positions "
                          "of the dataset as read; downsample when building the split instead")
    if data is None:
        data = load_tu(cfg.dataset, cfg.data_root, anomaly_label=cfg.anomaly_label,
                       use_node_attr=cfg.use_node_attr)
    y = data.y
    if cfg.split_file is not None:
        tr, va, te = load_split(cfg.split_file, y.size)
        keep = np.sort(np.concatenate([tr, va, te]))
        for part, idx in (("train", tr), ("val", va)):
            if np.unique(y[idx]).size < 2:
                raise DataError(f"split file {cfg.split_file}: the {part} part holds a single class; it needs "
                                "normal and anomalous graphs")
        info = {"graphs": int(keep.size), "anomalies": int(y[keep].sum()),
                "anomaly_share": float(y[keep].mean()), "anomaly_label": data.spec["anomaly_label"],
                "features": data.graphs.num_features, "split": f"file {cfg.split_file}"}
        return Task(data, keep, tr, va, te, cfg, info)
    keep = np.arange(y.size)
    if cfg.anomaly_ratio is not None:
        keep = downsample_anomalies(y, cfg.anomaly_ratio, cfg.seed)
    tr, va, te = stratified_split(y[keep], cfg.seed)
    info = {"graphs": int(keep.size), "anomalies": int(y[keep].sum()),
            "anomaly_share": float(y[keep].mean()), "anomaly_label": data.spec["anomaly_label"],
            "features": data.graphs.num_features, "split": f"stratified 70/15/15, seed {cfg.seed}"}
    return Task(data, keep, keep[tr], keep[va], keep[te], cfg, info)
