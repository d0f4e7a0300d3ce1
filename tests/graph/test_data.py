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


def test_truncated_a_file_is_caught_by_edge_label_line_counts(tiny_tu):
    d = tiny_tu / "TINY"
    lines = (d / "TINY_A.txt").read_text().splitlines()
    (d / "TINY_edge_labels.txt").write_text("1\n" * len(lines))
    assert load_tu("TINY", tiny_tu).graphs.num_graphs == 40  # consistent files load
    (d / "TINY_A.txt").write_text("\n".join(lines[: len(lines) - 30]) + "\n")  # cut cleanly at a line end
    with pytest.raises(DataError, match=r"TINY_A.txt has \d+ edge lines but TINY_edge_labels.txt has \d+"):
        load_tu("TINY", tiny_tu)
    (d / "TINY_edge_labels.txt").unlink()
    (d / "TINY_edge_attributes.txt").write_text("0.5\n" * len(lines))
    with pytest.raises(DataError, match="TINY_edge_attributes.txt"):
        load_tu("TINY", tiny_tu)


def test_truncated_a_file_without_edge_files_warns_about_edgeless_graphs(tiny_tu):
    d = tiny_tu / "TINY"
    assert not any("no edge" in w for w in load_tu("TINY", tiny_tu).warnings)
    lines = (d / "TINY_A.txt").read_text().splitlines()
    (d / "TINY_A.txt").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    w = [m for m in load_tu("TINY", tiny_tu).warnings if "no edge" in m]
    assert len(w) == 1 and "1-based" in w[0] and "truncated" in w[0]


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_node_attributes_name_file_and_line(tmp_path, bad):
    d = write_tu(tmp_path, "ATT", [(0, [(0, 1)], [3, 5]), (1, [(0, 1), (1, 2)], [5, 5, 7])], attrs=True)
    rows = (d / "ATT_node_attributes.txt").read_text().splitlines()
    rows[3] = f"{bad}, 1.0"
    (d / "ATT_node_attributes.txt").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"ATT_node_attributes.txt line 4 \(node 4\): non-finite value"):
        load_tu("ATT", tmp_path, use_node_attr=True)
    assert load_tu("ATT", tmp_path).graphs.num_graphs == 2  # attributes unused: nothing to complain about


def test_edge_errors_use_the_files_1_based_ids(tiny_tu):
    break_file(tiny_tu, "TINY", "A", "1, 2\n2, 1\n1, 40\n")
    with pytest.raises(DataError, match=r"TINY_A.txt: line 3 joins node 1 \(graph 1\) and node 40 \(graph 2\)"):
        load_tu("TINY", tiny_tu)


def test_split_file_is_read_and_validated(tmp_path):
    import json

    from outlierkit.graph.data import load_split

    def write(doc) -> str:
        p = tmp_path / "split.json"
        p.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        return str(p)

    tr, va, te = load_split(write({"train": [0, 2, 4], "val": [1], "test": [3, 5]}), 6)
    assert tr.tolist() == [0, 2, 4] and va.tolist() == [1] and te.tolist() == [3, 5]
    for doc, match in [
        ({"train": [0, 1], "val": [1], "test": [2]}, "train and val overlap in 1 graph"),
        ({"train": [0], "val": [1], "test": [6]}, "position 6 is outside 0..5"),
        ({"train": [0], "val": [-1], "test": [2]}, "position -1 is outside"),
        ({"train": [0, 0], "val": [1], "test": [2]}, "lists position 0 twice"),
        ({"train": [0], "val": [1]}, "'test' must be a non-empty list"),
        ({"train": [0], "val": [1], "test": [2.5]}, "not an integer"),
        ("[1, 2]", "must hold an object"),
        ("{not json", "is not JSON"),
    ]:
        with pytest.raises(DataError, match=match):
            load_split(write(doc), 6)
    with pytest.raises(DataError, match="cannot read"):
        load_split(tmp_path / "missing.json", 6)


def test_make_task_with_a_split_file(tiny_tu, tmp_path):
    import json

    from outlierkit.errors import ConfigError
    from outlierkit.graph.data import DataConfig, make_task

    y = load_tu("TINY", tiny_tu).y
    pos, neg = np.nonzero(y == 1)[0], np.nonzero(y == 0)[0]
    split = {"train": [*pos[:6], *neg[:20]], "val": [*pos[6:8], *neg[20:25]], "test": [*pos[8:], *neg[25:]]}
    p = tmp_path / "s.json"
    p.write_text(json.dumps({k: [int(i) for i in v] for k, v in split.items()}))
    t1 = make_task(DataConfig("TINY", str(tiny_tu), seed=1, split_file=str(p)))
    t2 = make_task(DataConfig("TINY", str(tiny_tu), seed=2, split_file=str(p)))
    assert t1.train.tolist() == split["train"] and np.array_equal(t1.test, t2.test)  # the seed leaves it alone
    with pytest.raises(ConfigError, match="cannot be combined"):
        make_task(DataConfig("TINY", str(tiny_tu), anomaly_ratio=0.1, split_file=str(p)))
    p.write_text(json.dumps({"train": [int(i) for i in neg[:20]], "val": [int(pos[0])], "test": [int(pos[1])]}))
    with pytest.raises(DataError, match="train part holds a single class"):
        make_task(DataConfig("TINY", str(tiny_tu), split_file=str(p)))


@pytest.mark.slow
def test_shared_datasets_load_without_edge_warnings(shared_tu):
    for name in ("MUTAG", "NCI1", "AIDS", "COX2", "DHFR", "PROTEINS", "NCI1ds"):
        if (shared_tu / name).is_dir():
            assert not [w for w in load_tu(name, shared_tu).warnings if "no edge" in w], name
