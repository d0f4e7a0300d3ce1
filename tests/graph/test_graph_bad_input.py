"""Table-driven bad input for the graph CLI: exit code 2, one line on stderr, nothing written in --out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from graph_fixtures import write_tu

from outlierkit.cli import main


def _fit(root: Path, out: Path, *extra: str) -> list[str]:
    return ["graph", "fit", "--dataset", "TINY", "--data-root", str(root), "--out", str(out), *extra]


def _split(root: Path, doc: dict) -> str:
    p = root / "split.json"
    p.write_text(json.dumps(doc))
    return str(p)


def _truncated(root: Path) -> None:
    d = root / "TINY"
    lines = (d / "TINY_A.txt").read_text().splitlines()
    (d / "TINY_edge_labels.txt").write_text("1\n" * len(lines))
    (d / "TINY_A.txt").write_text("\n".join(lines[:-10]) + "\n")


def _nan_attr(root: Path) -> None:
    write_tu(root, "TINY", [(0, [(0, 1)], [3, 5]), (1, [(0, 1), (1, 2)], [5, 5, 7])] * 4, attrs=True)
    p = root / "TINY" / "TINY_node_attributes.txt"
    rows = p.read_text().splitlines()
    rows[2] = "nan, 1.0"
    p.write_text("\n".join(rows) + "\n")


CASES = [  # (id, argv builder (root, out) -> argv, set-up or None, text the one line must hold)
    ("unknown detector", lambda r, o: _fit(r, o, "--detector", "rqgnm"), None, "valid names"),
    ("unknown --set key", lambda r, o: _fit(r, o, "--set", "epocs=3"), None, "unknown key 'epocs'"),
    ("--set bad type", lambda r, o: _fit(r, o, "--set", "epochs=abc"), None, "must be an integer"),
    ("--set fitted attribute", lambda r, o: _fit(r, o, "--set", "threshold_=0.9"), None, "fitted attribute"),
    ("--set epochs=0", lambda r, o: _fit(r, o, "--set", "epochs=0"), None, "at least 1"),
    ("--set contamination", lambda r, o: _fit(r, o, "--set", "contamination=0.9"), None, "contamination"),
    ("--threads 0", lambda r, o: _fit(r, o, "--threads", "0"), None, "--threads must be at least 1"),
    ("unknown dataset", lambda r, o: _fit(r, o, "--dataset", "NOPE"), None, "not found under"),
    ("missing data root", lambda r, o: _fit(r / "missing", o), None, "does not exist"),
    ("anomaly ratio 2", lambda r, o: _fit(r, o, "--anomaly-ratio", "2"), None, "anomaly ratio"),
    ("code behaviour with gin", lambda r, o: _fit(r, o, "--detector", "gin", "--code-behaviour"), None,
     "--code-behaviour"),
    ("code and paper behaviour", lambda r, o: _fit(r, o, "--code-behaviour", "--paper-behaviour"), None,
     "exclude each other"),
    ("missing config", lambda r, o: _fit(r, o, "--config", str(r / "nope.yaml")), None, "nope.yaml"),
    ("missing split file", lambda r, o: _fit(r, o, "--split-file", str(r / "nope.json")), None, "cannot read"),
    ("overlapping split", lambda r, o: _fit(r, o, "--split-file", _split(r, {"train": [0, 1, 2], "val": [2, 3],
                                                                             "test": [4]})), None, "overlap"),
    ("split out of range", lambda r, o: _fit(r, o, "--split-file", _split(r, {"train": [0, 1], "val": [2],
                                                                              "test": [40]})), None,
     "outside 0..39"),
    ("split + anomaly ratio", lambda r, o: _fit(r, o, "--anomaly-ratio", "0.1", "--split-file",
                                                _split(r, {"train": [0], "val": [1], "test": [2]})), None,
     "cannot be combined"),
    ("truncated A", lambda r, o: _fit(r, o), _truncated, "TINY_edge_labels.txt"),
    ("NaN node attribute", lambda r, o: _fit(r, o, "--use-node-attr"), _nan_attr, "line 3 (node 3): non-finite"),
    ("score: no model", lambda r, o: ["graph", "score", "--model", str(r / "none"), "--out", str(o)], None,
     "detector.json"),
    ("bench: unknown detector", lambda r, o: ["graph", "bench", "--datasets", "TINY", "--data-root", str(r),
                                              "--detectors", "nope", "--out", str(o)], None, "valid names"),
    ("bench: --seeds 0", lambda r, o: ["graph", "bench", "--datasets", "TINY", "--data-root", str(r),
                                       "--seeds", "0", "--out", str(o)], None, "--seeds"),
    ("bench: unknown --set", lambda r, o: ["graph", "bench", "--datasets", "TINY", "--data-root", str(r),
                                           "--set", "thresold=1", "--out", str(o)], None, "unknown key"),
]
if not torch.cuda.is_available():
    CASES.append(("cuda without CUDA", lambda r, o: _fit(r, o, "--device", "cuda"), None, "--device cpu"))


@pytest.mark.parametrize(("argv", "setup", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(tiny_tu, tmp_path, capsys, argv, setup, match):
    if setup is not None:
        setup(tiny_tu)
    out = tmp_path / "out"
    assert main(argv(tiny_tu, out)) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.count("\n") == 0 and err.startswith("outlierkit: error:"), err
    assert match in err, err
    assert not out.exists() and not Path(str(out) + ".partial").exists()
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
