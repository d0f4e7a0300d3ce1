"""``outlierkit graph fit|score|bench``: train, score and benchmark graph-level anomaly detectors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from outlierkit.errors import ConfigError

PAPER_VS_CODE = (
    "RQGNN switches: train_cheb={train_cheb} (paper: true; released code: false, its Chebyshev filters stay "
    "at initialisation), rq_normalize={rq_normalize} (paper: true = x^T L x / x^T x; code: false = numerator)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{fit,score,bench}")

    def data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--dataset", required=required, help="TU dataset name, e.g. AIDS, NCI1, MUTAG")
        p.add_argument("--data-root", default=None,
                       help="folder holding NAME/ in TU format (default: $OUTLIERKIT_TU_ROOT)")

    fit = sub.add_parser("fit", help="train a detector on a TU dataset, evaluate it on the test split")
    data_args(fit)
    fit.add_argument("--out", required=True, help="output folder (report + model)")
    fit.add_argument("--detector", default="rqgnn", help="registered detector (default: rqgnn)")
    fit.add_argument("--seed", type=int, default=0, help="split, downsampling and model seed (default: 0)")
    fit.add_argument("--anomaly-label", type=int, default=None,
                     help="raw graph label of the anomaly class (default: minority class)")
    fit.add_argument("--anomaly-ratio", type=float, default=None,
                     help="downsample anomalies to this share, e.g. 0.06 (default: keep all)")
    fit.add_argument("--use-node-attr", action="store_true", help="prepend real node attributes")
    fit.add_argument("--code-behaviour", action="store_true",
                     help="RQGNN as the released code runs: train_cheb=false, rq_normalize=false")
    fit.add_argument("--config", default=None, help="YAML/JSON file of detector hyperparameters")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a detector hyperparameter, e.g. --set epochs=50 (repeatable)")
    fit.add_argument("--force", action="store_true", help="replace an existing --out")

    score = sub.add_parser("score", help="score a TU dataset with a saved detector")
    data_args(score, required=False)
    score.add_argument("--model", required=True, help="the --out folder of `outlierkit graph fit`")
    score.add_argument("--out", required=True, help="output folder for the report")
    score.add_argument("--split", choices=("test", "all"), default="test",
                       help="test: the fit run's test split (same dataset); all: every graph (default: test)")
    score.add_argument("--force", action="store_true", help="replace an existing --out")

    bench = sub.add_parser("bench", help="quality grid (Macro-F1/AUC/AUPRC over seeds) or speed comparison")
    bench.add_argument("--mode", choices=("quality", "speed"), default="quality")
    bench.add_argument("--datasets", default=None, help="comma list (default: AIDS,NCI1,COX2,DHFR,PROTEINS,MUTAG)")
    bench.add_argument("--dataset", default=None, help="speed mode: dataset (default: NCI1)")
    bench.add_argument("--data-root", default=None, help="folder holding the TU datasets")
    bench.add_argument("--detectors", default=None,
                       help="comma list (default: rqgnn,rqgnn-code,gin,rq_forest,rq_iforest)")
    bench.add_argument("--seeds", type=int, default=5, help="number of seeds 0..N-1 (default: 5)")
    bench.add_argument("--epochs", type=int, default=None, help="override epochs of the GNN detectors")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--out", required=True, help="output folder for the report")
    bench.add_argument("--force", action="store_true", help="replace an existing --out")


def _data_root(value: str | None) -> str:
    root = value or os.environ.get("OUTLIERKIT_TU_ROOT")
    if not root:
        raise ConfigError("no data root: pass --data-root DIR (the folder holding NAME/) or set OUTLIERKIT_TU_ROOT")
    return root


def _overrides(items: list[str]) -> dict[str, Any]:
    from outlierkit.config import parse_override

    out: dict[str, Any] = {}
    for text in items:
        path, value = parse_override(text)
        if len(path) != 1:
            raise ConfigError(f"detector overrides are flat keys, got {text!r}")
        out[path[0]] = value
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    if os.environ.get("OUTLIERKIT_THREADS"):
        torch.set_num_threads(int(os.environ["OUTLIERKIT_THREADS"]))
    if args.action == "fit":
        return _fit(args)
    if args.action == "score":
        return _score(args)
    return _bench(args)


def _fit(args: argparse.Namespace) -> int:
    import numpy as np

    from outlierkit._utils import log, staged_output
    from outlierkit._utils.io import check_output
    from outlierkit.config import apply_overrides, load_mapping
    from outlierkit.graph.bench import DataConfig, make_task, run_one
    from outlierkit.graph.detector import TorchGraphDetector, make_detector
    from outlierkit.report import Report

    check_output(args.out, force=args.force)
    params: dict[str, Any] = load_mapping(args.config) if args.config else {}
    params.setdefault("seed", args.seed)
    if args.code_behaviour:
        if args.detector != "rqgnn":
            raise ConfigError("--code-behaviour applies to --detector rqgnn only")
        params.update(train_cheb=False, rq_normalize=False)
    det = make_detector(args.detector, **params)
    det = apply_overrides(det, args.overrides)
    cfg = DataConfig(args.dataset, _data_root(args.data_root), args.anomaly_label, args.anomaly_ratio,
                     args.use_node_attr, args.seed)
    task = make_task(cfg)
    log(f"{cfg.dataset}: {task.info['graphs']} graphs, {task.info['anomalies']} anomalies "
        f"(label {task.info['anomaly_label']}), {task.info['features']} features; fitting {args.detector}")
    row = run_one(task, det)
    scores = row.pop("scores")
    report = Report(kind="graph.fit", config={"data": cfg, "detector": args.detector, "params": det.params(),
                                               "data_spec": task.data.spec})
    for w in task.data.warnings:
        report.warn(w)
    if args.detector == "rqgnn":
        report.notes.append(PAPER_VS_CODE.format(**det.params()))
    report.notes.append("AUC/AUPRC: best-validation-AUC checkpoint; Macro-F1: best-validation-F1 checkpoint "
                        "(argmax, threshold 0.5); the saved model scores with its `checkpoint` parameter.")
    report.metrics.update({f"test_{k}": v for k, v in row.items()})
    report.metrics.update({f"data_{k}": v for k, v in task.info.items()})
    yt = task.data.y[task.test]
    if isinstance(det, TorchGraphDetector):
        det.use_checkpoint(det.checkpoint)
        report.add_table("history", det.history_)
    preds = (scores > det.threshold_).astype(np.int64)
    report.add_table("graphs", [{"graph_id": int(i) + 1, "label": int(lbl), "score": float(s), "pred": int(p)}
                                for i, lbl, s, p in zip(task.test, yt, scores, preds, strict=True)])
    with staged_output(args.out, force=args.force) as stage:
        _plots(stage, report, yt, scores, getattr(det, "history_", None))
        if det.supports_save:
            assert isinstance(det, TorchGraphDetector)
            det.save(stage / "model", extra={"data": _asdict(cfg), "data_spec": task.data.spec})
            report.artifacts["model"] = "model/"
        else:
            report.warn(f"detector {args.detector!r} cannot be saved; only the report was written")
        report.save(stage)
    print(f"test AUC {row['auc']:.4f}  AUPRC {row['auprc']:.4f}  Macro-F1 {row['macro_f1']:.4f}  -> {args.out}")
    return 0


def _asdict(cfg: Any) -> dict[str, Any]:
    from outlierkit.config import to_dict

    out: dict[str, Any] = to_dict(cfg)
    return out


def _plots(out: Path, report: Any, y: Any, scores: Any, history: list[dict[str, float]] | None) -> None:
    import numpy as np
    from sklearn.metrics import roc_curve

    from outlierkit.graph.metrics import roc_auc
    from outlierkit.report import new_figure, save_figure

    if np.unique(y).size == 2:
        fig, ax = new_figure(figsize=(4.5, 4.2))
        fpr, tpr, _ = roc_curve(y, scores)
        ax.plot(fpr, tpr, label=f"AUC {roc_auc(y, scores):.3f}")
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5, ls="--")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        ax.legend(loc="lower right")
        save_figure(fig, out, "roc", report)
    if history:
        fig, ax = new_figure(figsize=(5.5, 3.8))
        ep = [h["epoch"] for h in history]
        ax.plot(ep, [h["val_auc"] for h in history], label="val AUC")
        ax.plot(ep, [h["val_f1"] for h in history], label="val Macro-F1")
        ax2 = ax.twinx()
        ax2.plot(ep, [h["loss"] for h in history], color="grey", lw=0.8, label="train loss")
        ax.set(xlabel="epoch", title="training")
        ax.legend(loc="lower right")
        save_figure(fig, out, "training", report)


def _score(args: argparse.Namespace) -> int:
    import numpy as np

    from outlierkit._utils import staged_output
    from outlierkit._utils.io import check_output
    from outlierkit.graph.bench import DataConfig, make_task
    from outlierkit.graph.data import load_tu
    from outlierkit.graph.detector import load_detector
    from outlierkit.graph.metrics import evaluate
    from outlierkit.report import Report

    check_output(args.out, force=args.force)
    det = load_detector(Path(args.model) / "model" if (Path(args.model) / "model").is_dir() else args.model)
    meta = det.load_meta(Path(args.model) / "model" if (Path(args.model) / "model").is_dir() else args.model)
    spec, dcfg = meta["extra"].get("data_spec", {}), meta["extra"].get("data", {})
    name = args.dataset or spec.get("dataset")
    if not name:
        raise ConfigError("pass --dataset NAME")
    root = args.data_root or dcfg.get("data_root") or _data_root(None)
    data = load_tu(name, root, anomaly_label=spec.get("anomaly_label"),
                   use_node_attr=bool(spec.get("use_node_attr", False)),
                   label_categories=spec.get("label_categories"))
    if args.split == "test":
        if name != spec.get("dataset"):
            raise ConfigError(f"--split test needs the training dataset {spec.get('dataset')!r}; use --split all")
        cfg = DataConfig(name, root, dcfg.get("anomaly_label"), dcfg.get("anomaly_ratio"),
                         bool(dcfg.get("use_node_attr", False)), int(dcfg.get("seed", 0)))
        idx = make_task(cfg, data).test
    else:
        idx = np.arange(data.graphs.num_graphs)
    graphs, y = data.graphs.select(idx), data.y[idx]
    scores = det.decision_function(graphs)
    preds = det.predict(graphs)
    report = Report(kind="graph.score", config={"model": str(args.model), "dataset": name, "data_root": root,
                                                 "split": args.split, "detector": meta["detector"],
                                                 "params": meta["params"]})
    for w in data.warnings:
        report.warn(w)
    report.metrics.update(evaluate(y, scores, preds))
    report.metrics["graphs"] = int(idx.size)
    report.metrics["predicted_anomalies"] = int(preds.sum())
    report.add_table("graphs", [{"graph_id": int(i) + 1, "label": int(lbl), "score": float(s), "pred": int(p)}
                                for i, lbl, s, p in zip(idx, y, scores, preds, strict=True)])
    with staged_output(args.out, force=args.force) as stage:
        _plots(stage, report, y, scores, None)
        report.save(stage)
    m = report.metrics
    print(f"{idx.size} graphs scored; AUC {m['auc']:.4f}  Macro-F1 {m['macro_f1']:.4f}  -> {args.out}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from outlierkit._utils import staged_output
    from outlierkit._utils.io import check_output
    from outlierkit.graph import bench

    check_output(args.out, force=args.force)
    root = _data_root(args.data_root)
    overrides = _overrides(args.overrides)
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.mode == "speed":
        report = bench.speed(args.dataset or "NCI1", root)
        with staged_output(args.out, force=args.force) as stage:
            report.save(stage)
        for row in report.tables["speed"]:
            print(f"{row['measure']}: packed {row['packed']:.4g}, dense {row['dense per-graph']:.4g}, "
                  f"speed-up {row['speed-up']:.1f}x")
        return 0
    if args.seeds < 1:
        raise ConfigError("--seeds must be at least 1")
    datasets = bench.parse_list(args.datasets, bench.DEFAULT_DATASETS)
    detectors = bench.parse_list(args.detectors, bench.DEFAULT_DETECTORS)
    with staged_output(args.out, force=args.force) as stage:
        report = bench.quality(datasets, detectors, list(range(args.seeds)), root, overrides=overrides,
                               out_dir=stage)
        report.save(stage)
    from outlierkit.report import markdown_table

    print(markdown_table(report.tables["summary"]))
    return 0
