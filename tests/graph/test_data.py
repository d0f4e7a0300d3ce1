"""TU reading (real and broken files), packing, anomaly labelling, downsampling and splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graph_fixtures import tiny_tu_graphs, write_tu

from outlierkit.errors import DataError
from outlierkit.graph.data import downsample_anomalies, load_tu, pack, stratified_split
from outlierkit.graph.rayleigh import rayleigh_quotient


def test_tiny_tu_roundtrip(tiny_tu):
    data = load_tu("TINY", tiny_tu)
    triples = tiny_tu_graphs()
    assert data.graphs.num_graphs == 40 and data.spec["anomaly_label"] == 2
    assert data.y.tolist() == [int(t[0] == 2) for t in triples]
    assert data.spec["label_categories"] == [0, 1] and data.graphs.num_features == 2
    first = data.graphs.to_data_list()[0]
    assert first.x.argmax(1).tolist() == triples[0][2]
    # reading from NAME/raw/ works too (PyG's layout)
    raw = tiny_tu / "RAWSET" / "raw"
    write_tu(raw.parent, "raw", [])  # make the folder
    for f in (tiny_tu / "TINY").iterdir():
        (raw / f.name.replace("TINY", "RAWSET")).write_bytes(f.read_bytes())
    assert load_tu("RAWSET", tiny_tu).graphs.num_graphs == 40


def test_node_attributes_and_categories(tmp_path):
    write_tu(tmp_path, "ATT", [(0, [(0, 1)], [3, 5]), (1, [(0, 1), (1, 2)], [5, 5, 7])], attrs=True)
    d = load_tu("ATT", tmp_path, use_node_attr=True)
    assert d.graphs.num_features == 2 + 3  # attributes first, then one-hot over {3, 5, 7}
    assert d.graphs.x[0].tolist() == [1.5, 1.0, 1.0, 0.0, 0.0]
    d2 = load_tu("ATT", tmp_path, label_categories=[5, 7])  # scoring with training categories
    assert d2.graphs.x[0].tolist() == [0.0, 0.0] and d2.warnings
    with pytest.raises(DataError, match="anomaly_label 4"):
        load_tu("ATT", tmp_path, anomaly_label=4)


def break_file(d, name, part, text):
    (d / name / f"{name}_{part}.txt").write_text(text)


@pytest.mark.parametrize(
    ("part", "text", "match"),
    [
        ("graph_indicator", None, "lacks TINY_graph_indicator.txt"),
        ("A", "1, 2\n2, x\n", "line 2 is not a row of 2 number"),
        ("node_labels", "1\n" * 5 + "1, 2\n", "line 6 is not a row of 1 number"),
        ("A", "1, 2\n2, 999999\n", "points outside nodes"),
        ("A", "1, 2\n1, 40\n", "edges must stay inside one graph"),
        ("graph_labels", "1\n" * 40, "single graph class"),
        ("graph_labels", "1\n2\n", "graph ids must be 1..2"),
        ("node_labels", "1\n", "rows for"),
    ],
)
def test_broken_tu_files_raise_clear_errors(tiny_tu, part, text, match):
    if text is None:
        (tiny_tu / "TINY" / f"TINY_{part}.txt").unlink()
    else:
        break_file(tiny_tu, "TINY", part, text)
    with pytest.raises(DataError, match=match):
        load_tu("TINY", tiny_tu)


def test_unsorted_graph_indicator(tiny_tu):
    p = tiny_tu / "TINY" / "TINY_graph_indicator.txt"
    lines = p.read_text().split()
    lines[0], lines[-1] = lines[-1], lines[0]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="not sorted"):
        load_tu("TINY", tiny_tu)


def test_missing_dataset_and_root(tmp_path):
    with pytest.raises(DataError, match="not found under"):
        load_tu("NOPE", tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tu("NOPE", tmp_path / "missing")


def test_graphs_without_edges_and_isolated_nodes(tmp_path):
    write_tu(tmp_path, "ISO", [(0, [], [1, 2]), (1, [(0, 1)], [1, 2, 2]), (0, [(0, 1)], [1, 2])])
    d = load_tu("ISO", tmp_path)
    g = d.graphs
    rq = rayleigh_quotient(g.x, g.edge_index, g.batch_vector(), g.num_graphs)
    assert torch.isfinite(rq).all()
    assert rq[0].tolist() == [0.0, 0.0]  # no edges: x^T L x = 0 (isolated nodes have L_ii = 0)
    # edge 0-1 with labels (1, 2), node 2 (label 2) isolated: label 1 -> (1 - 0)^2 / 1 = 1;
    # label 2 -> (0 - 1)^2 / (1 + 1) = 0.5, the isolated node counts in x^T x only
    assert rq[1].tolist() == [1.0, 0.5]
    assert rq[2].tolist() == [1.0, 1.0]


def test_pack_validates_and_cleans():
    x = torch.ones(3, 1)
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 1, 2]])  # duplicates + self-loops
    p = pack([type("G", (), {"x": x, "edge_index": ei})()])
    assert p.edge_index.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(DataError, match="outside"):
        pack([type("G", (), {"x": x, "edge_index": torch.tensor([[0], [3]])})()])
    with pytest.raises(DataError, match="labels for"):
        pack([type("G", (), {"x": x, "edge_index": ei})()], y=[0, 1])


def test_select_equals_subset_of_data_list(planted):
    packed = pack(planted[0])
    idx = [5, 0, 17, 3]
    sub = packed.select(idx).to_data_list()
    for k, i in enumerate(idx):
        ref = pack([planted[0][i]])
        assert torch.equal(sub[k].x, ref.x) and torch.equal(sub[k].edge_index, ref.edge_index)


def test_split_and_downsample_are_stratified_and_seeded():
    y = np.array([0] * 900 + [1] * 100)
    tr, va, te = stratified_split(y, seed=3)
    assert (len(tr), len(va), len(te)) == (700, 150, 150)
    assert y[tr].sum() == 70 and y[va].sum() == 15 and y[te].sum() == 15
    assert len(set(tr) | set(va) | set(te)) == 1000
    assert np.array_equal(stratified_split(y, seed=3)[0], tr) and not np.array_equal(stratified_split(y, 4)[0], tr)
    keep = downsample_anomalies(y, 0.05, seed=0)
    assert (y[keep] == 0).sum() == 900 and (y[keep] == 1).sum() == round(0.05 * 900 / 0.95)
    assert not np.array_equal(keep, downsample_anomalies(y, 0.05, seed=1))
    with pytest.raises(DataError):
        downsample_anomalies(y, 1.5, 0)


@pytest.mark.parametrize(("name", "graphs", "anomalies", "label", "features"),
                         [("MUTAG", 188, 63, -1, 7), ("AIDS", 2000, 400, 0, 38), ("PROTEINS", 1113, 450, 2, 3)])
def test_shared_datasets(shared_tu, name, graphs, anomalies, label, features):
    d = load_tu(name, shared_tu)
    assert d.graphs.num_graphs == graphs and int(d.y.sum()) == anomalies
    assert d.spec["anomaly_label"] == label and d.graphs.num_features == features
    assert torch.equal(d.graphs.x.sum(1), torch.ones(d.graphs.x.size(0)))  # one-hot
