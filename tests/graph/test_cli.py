"""``outlierkit graph fit|score|bench`` through ``main([...])``: outputs, reports, errors (exit 2, one line)."""

from __future__ import annotations

import json

import pytest

from outlierkit.cli import main


def test_fit_then_score(tiny_tu, tmp_path, capsys):
    out = tmp_path / "fit"
    args = ["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(out),
            "--set", "epochs=8", "--set", "batch_size=16"]
    assert main(args) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "graph.fit" and rep["config"]["params"]["epochs"] == 8
    assert rep["config"]["params"]["train_cheb"] is False and rep["config"]["params"]["rq_normalize"] is False
    assert {"test_auc", "test_auprc", "test_macro_f1"} <= set(rep["metrics"])
    assert len(rep["tables"]["graphs"]) == 7 and len(rep["tables"]["history"]) == 8
    assert (out / "roc.png").stat().st_size > 1000 and (out / "model" / "model.safetensors").is_file()
    assert "train_cheb=False" in (out / "report.md").read_text()
    assert main(args) == 2 and "--force" in capsys.readouterr().err  # existing output is kept
    sc = tmp_path / "score"
    assert main(["graph", "score", "--model", str(out), "--out", str(sc)]) == 0
    srep = json.loads((sc / "report.json").read_text())
    fit_scores = {r["graph_id"]: r["score"] for r in rep["tables"]["graphs"]}
    assert {r["graph_id"]: r["score"] for r in srep["tables"]["graphs"]} == pytest.approx(fit_scores)
    sc_all = tmp_path / "score_all"
    assert main(["graph", "score", "--model", str(out), "--out", str(sc_all), "--split", "all"]) == 0
    assert json.loads((sc_all / "report.json").read_text())["metrics"]["graphs"] == 40


def test_fit_code_behaviour_and_baseline(tiny_tu, tmp_path):
    out = tmp_path / "code"
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(out),
                 "--code-behaviour", "--set", "epochs=3"]) == 0
    params = json.loads((out / "report.json").read_text())["config"]["params"]
    assert (params["train_cheb"], params["rq_normalize"], params["batch_size"]) == (False, False, 512)
    out3 = tmp_path / "paper"
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(out3),
                 "--paper-behaviour", "--set", "epochs=2"]) == 0
    params = json.loads((out3 / "report.json").read_text())["config"]["params"]
    assert (params["train_cheb"], params["rq_normalize"], params["batch_size"]) == (True, True, 512)
    out2 = tmp_path / "forest"
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(out2),
                 "--detector", "rq_forest", "--set", "n_estimators=20"]) == 0
    rep = json.loads((out2 / "report.json").read_text())
    assert rep["warnings"] and not (out2 / "model").exists()


def test_bench_quality_and_speed(tiny_tu, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["graph", "bench", "--datasets", "TINY", "--data-root", str(tiny_tu), "--out", str(out),
                 "--detectors", "rqgnn,rq_iforest", "--seeds", "2", "--epochs", "3",
                 "--set", "batch_size=16"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["tables"]["runs"]) == 4 and len(rep["tables"]["summary"]) == 2
    assert "±" in rep["tables"]["summary"][0]["auc"] and (out / "roc.png").is_file()
    assert "TINY.rqgnn.auc_mean" in rep["metrics"]
    assert "| TINY | rqgnn |" in capsys.readouterr().out
    sp = tmp_path / "speed"
    assert main(["graph", "bench", "--mode", "speed", "--dataset", "TINY", "--data-root", str(tiny_tu),
                 "--out", str(sp)]) == 0
    rows = json.loads((sp / "report.json").read_text())["tables"]["speed"]
    assert rows[0]["packed"] > 0 and rows[1]["speed-up"] > 0


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--detector", "rqgnm"], "valid names: gin, rq_forest, rq_iforest, rqgnn"),
        (["--set", "epocs=3"], "unknown key 'epocs'"),
        (["--set", "epochs=abc"], "must be an integer"),
        (["--dataset", "NOPE"], "not found under"),
        (["--anomaly-ratio", "2"], "anomaly ratio"),
        (["--detector", "gin", "--code-behaviour"], "--code-behaviour"),
    ],
)
def test_fit_errors_are_one_line_exit_2(tiny_tu, tmp_path, capsys, extra, match):
    args = ["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(tmp_path / "o")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and err.count("\n") == 0 and err.startswith("outlierkit: error:")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_score_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OUTLIERKIT_TU_ROOT", raising=False)
    assert main(["graph", "score", "--model", str(tmp_path), "--out", str(tmp_path / "s")]) == 2
    assert "detector.json" in capsys.readouterr().err
    assert main(["graph", "bench", "--out", str(tmp_path / "b")]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert main(["graph"]) == 2  # argparse: a subcommand is required


def test_config_file_and_scoring_another_dataset(tiny_tu, tmp_path):
    from graph_fixtures import tiny_tu_graphs, write_tu

    cfg = tmp_path / "det.yaml"
    cfg.write_text("epochs: 2\nbatch_size: 16\nhidden: 8\n")
    out = tmp_path / "fit"
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(out),
                 "--config", str(cfg), "--set", "hidden=16"]) == 0
    params = json.loads((out / "report.json").read_text())["config"]["params"]
    assert (params["epochs"], params["batch_size"], params["hidden"]) == (2, 16, 16)
    other = [(lab, edges, [v + 1 for v in nodes]) for lab, edges, nodes in tiny_tu_graphs(12, seed=9)]
    write_tu(tmp_path / "other", "OTHER", other)  # node label 2 was never seen in training
    sc = tmp_path / "score"
    assert main(["graph", "score", "--model", str(out), "--dataset", "OTHER", "--data-root",
                 str(tmp_path / "other"), "--split", "all", "--out", str(sc)]) == 0
    rep = json.loads((sc / "report.json").read_text())
    assert rep["metrics"]["graphs"] == 12 and any("unseen" in w for w in rep["warnings"])
    assert main(["graph", "score", "--model", str(out), "--dataset", "OTHER", "--data-root",
                 str(tmp_path / "other"), "--out", str(tmp_path / "s2")]) == 2  # --split test needs TINY


def _split_for_tiny(tiny_tu, path):
    from outlierkit.graph.data import load_tu

    y = load_tu("TINY", tiny_tu).y
    pos, neg = [int(i) for i in (y == 1).nonzero()[0]], [int(i) for i in (y == 0).nonzero()[0]]
    split = {"train": pos[:6] + neg[:20], "val": pos[6:8] + neg[20:25], "test": pos[8:] + neg[25:]}
    path.write_text(json.dumps(split))
    return split


def test_fit_with_split_file_and_score_reproduces_fit(tiny_tu, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUTLIERKIT_QUIET", "0")  # the test suite is quiet by default; a user's console is not
    split = _split_for_tiny(tiny_tu, tmp_path / "split.json")
    out = tmp_path / "fit"
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(out),
                 "--split-file", str(tmp_path / "split.json"), "--seed", "3", "--set", "epochs=12",
                 "--set", "batch_size=16"]) == 0
    err = capsys.readouterr()
    assert "epoch 1/12" in err.err and "epoch 12/12" in err.err  # per-epoch progress by default
    assert "best-validation-AUC checkpoint, epoch" in err.out and "best-validation-F1 checkpoint" in err.out
    rep = json.loads((out / "report.json").read_text())
    assert [r["graph_id"] - 1 for r in rep["tables"]["graphs"]] == split["test"]
    assert rep["config"]["params"]["seed"] == 3 and rep["metrics"]["threads"] == 1
    sc = tmp_path / "score"
    assert main(["graph", "score", "--model", str(out), "--out", str(sc)]) == 0
    m = json.loads((sc / "report.json").read_text())["metrics"]
    for k in ("auc", "auprc", "macro_f1"):
        assert m[k] == pytest.approx(rep["metrics"][f"test_{k}"], abs=1e-12), k
    assert main(["graph", "score", "--model", str(out), "--out", str(tmp_path / "s2"), "--checkpoint", "f1"]) == 0
    m2 = json.loads((tmp_path / "s2" / "report.json").read_text())["metrics"]
    assert m2["auc"] == pytest.approx(rep["metrics"]["test_auc_f1ckpt"], abs=1e-12)
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(tmp_path / "q"),
                 "--split-file", str(tmp_path / "split.json"), "--set", "epochs=2", "--quiet"]) == 0
    assert "epoch 1/2" not in capsys.readouterr().err


def test_detector_help_lists_the_registered_choices(capsys):
    from outlierkit.graph.cli import DETECTOR_NAMES
    from outlierkit.graph.detectors import detector_names

    assert list(DETECTOR_NAMES) == detector_names()
    assert main(["graph", "fit", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "one of gin, rq_forest, rq_iforest, rqgnn" in text and "--split-file" in text and "--device" in text


def test_set_fitted_attribute_is_a_clean_error(tiny_tu, tmp_path, capsys):
    args = ["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(tmp_path / "o")]
    assert main(args + ["--set", "threshold_=0.9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'threshold_' is a fitted attribute" in err and err.count("\n") == 0
    keys = err.split("valid keys:")[1]
    assert "epochs" in keys and not any(k in keys for k in ("threshold_", "model_", "states_", "history_"))
    assert main(["graph", "bench", "--datasets", "TINY", "--data-root", str(tiny_tu), "--out", str(tmp_path / "b"),
                 "--set", "thresold=1"]) == 2
    assert "unknown key 'thresold'" in capsys.readouterr().err


def test_cuda_error_names_a_flag_that_exists(tiny_tu, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["graph", "fit", "--dataset", "TINY", "--data-root", str(tiny_tu), "--out", str(tmp_path / "o"),
                 "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cpu" in err and not (tmp_path / "o").exists()
