"""``outlierkit graph fit|score|bench``: train, score and benchmark graph-level anomaly detectors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

from outlierkit.errors import ConfigError

# Listed here so that `outlierkit graph fit --help` does not import torch; a test keeps it equal to the registry.
DETECTOR_NAMES = ("gin", "rq_forest", "rq_iforest", "rqgnn")

PAPER_VS_CODE = (
    "RQGNN switches: train_cheb={train_cheb} (paper: true; released code: false, its Chebyshev filters stay "
    "at initialisation), rq_normalize={rq_normalize} (paper: true = x^T L x / x^T x; code: false = numerator), "
    "batch_size={batch_size} (paper and code: 512)."
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
    fit.add_argument("--detector", default="rqgnn",
                     help=f"detector: one of {', '.join(DETECTOR_NAMES)} (default: rqgnn)")
    fit.add_argument("--seed", type=int, default=0,
                     help="model seed; also the split and downsampling seed unless --split-file (default: 0)")
    fit.add_argument("--split-file", default=None, metavar="FILE",
                     help='JSON {"train": [...], "val": [...], "test": [...]} of 0-based graph positions, e.g. '
                          "a paper's published split (default: stratified 70/15/15 drawn with --seed)")
    fit.add_argument("--anomaly-label", type=int, default=None,
                     help="raw graph label of the anomaly class (default: minority class)")
    fit.add_argument("--anomaly-ratio", type=float, default=None,
                     help="downsample anomalies to this share, e.g. 0.06 (default: keep all)")
    fit.add_argument("--use-node-attr", action="store_true", help="prepend real node attributes")
    fit.add_argument("--code-behaviour", action="store_true",
                     help="RQGNN as the released code runs: train_cheb=false, rq_normalize=false, batch_size=512")
    fit.add_argument("--paper-behaviour", action="store_true",
                     help="RQGNN as the paper describes it: train_cheb=true, rq_normalize=true, batch_size=512")
    fit.add_argument("--config", default=None, help="YAML/JSON file of detector hyperparameters")
    fit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a detector hyperparameter, e.g. --set epochs=50 (repeatable)")
    fit.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    fit.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: picked from the work size; 1 for molecule-sized graphs)")
    fit.add_argument("--quiet", action="store_true", help="no per-epoch progress lines")
    fit.add_argument("--force", action="store_true", help="replace an existing --out")

    score = sub.add_parser("score", help="score a TU dataset with a saved detector")
    data_args(score, required=False)
    score.add_argument("--model", required=True, help="the --out folder of `outlierkit graph fit`")
    score.add_argument("--out", required=True, help="output folder for the report")
    score.add_argument("--split", choices=("test", "all"), default="test",
                       help="test: the fit run's test split (same dataset); all: every graph (default: test)")
    score.add_argument("--checkpoint", choices=("paper", "auc", "f1"), default="paper",
                       help="paper: AUC/AUPRC from the best-validation-AUC checkpoint and Macro-F1 from the "
                            "best-validation-F1 one, as `graph fit` reports; auc/f1: every number from that one "
                            "(default: paper)")
    score.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    score.add_argument("--force", action="store_true", help="replace an existing --out")

    bench = sub.add_parser("bench", help="quality grid (Macro-F1/AUC/AUPRC over seeds) or speed comparison")
    bench.add_argument("--mode", choices=("quality", "speed"), default="quality")
    bench.add_argument("--datasets", default=None, help="comma list (default: AIDS,NCI1,COX2,DHFR,PROTEINS,MUTAG)")
    bench.add_argument("--dataset", default=None, help="speed mode: dataset (default: NCI1)")
    bench.add_argument("--data-root", default=None, help="folder holding the TU datasets")
    bench.add_argument("--detectors", default=None,
                       help=f"comma list of {', '.join(DETECTOR_NAMES)}, rqgnn-paper or rqgnn-code "
                            "(default: rqgnn,rqgnn-paper,rqgnn-code,gin,rq_forest,rq_iforest)")
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


def _warn(report: Any, message: str) -> None:
    """A warning goes to the report and to the console (stderr; Report.warn prints it once)."""
    report.warn(message)


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
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    if args.action == "fit":
        return _fit(args)
    if args.action == "score":
        return _score(args)
    return _bench(args)


def _fit(args: argparse.Namespace) -> int:
    from outlierkit._utils import log, staged_output
    from outlierkit._utils.io import check_output
    from outlierkit.config import load_mapping
    from outlierkit.graph.bench import run_one
    from outlierkit.graph.data import DataConfig, make_task
    from outlierkit.graph.detector import TorchGraphDetector
    from outlierkit.graph.detectors import make_detector
    from outlierkit.report import Report

    check_output(args.out, force=args.force)
    params: dict[str, Any] = load_mapping(args.config) if args.config else {}
    params.setdefault("seed", args.seed)
    for flag, which in (("code_behaviour", "code"), ("paper_behaviour", "paper")):
        if getattr(args, flag):
            opt = "--" + flag.replace("_", "-")
            if args.detector != "rqgnn":
                raise ConfigError(f"{opt} applies to --detector rqgnn only")
            if args.code_behaviour and args.paper_behaviour:
                raise ConfigError("--code-behaviour and --paper-behaviour exclude each other")
            from outlierkit.graph.detector import RQGNN_BEHAVIOURS

            params.update(RQGNN_BEHAVIOURS[which])
    params.update(_overrides(args.overrides))
    if args.detector in ("rqgnn", "gin"):
        params.setdefault("device", args.device)
        params.setdefault("verbose", not args.quiet)
        if args.threads is not None:
            params.setdefault("threads", args.threads)
        elif os.environ.get("OUTLIERKIT_THREADS"):  # an explicit choice beats the work-size rule
            params.setdefault("threads", int(os.environ["OUTLIERKIT_THREADS"]))
    elif args.device != "cpu":
        raise ConfigError(f"--device applies to the GNN detectors (rqgnn, gin), not {args.detector!r}")
    det = make_detector(args.detector, **params)
    if isinstance(det, TorchGraphDetector):
        det._validate_params()
        det._device()  # an unavailable device fails here, before the data are read
    cfg = DataConfig(args.dataset, _data_root(args.data_root), args.anomaly_label, args.anomaly_ratio,
                     args.use_node_attr, args.seed, args.split_file)
    task = make_task(cfg)
    report = Report(kind="graph.fit", config={"data": cfg, "detector": args.detector, "params": det.params(),
                                               "data_spec": task.data.spec})
    for w in task.data.warnings:
        _warn(report, w)
    log(f"{cfg.dataset}: {task.info['graphs']} graphs, {task.info['anomalies']} anomalies "
        f"(label {task.info['anomaly_label']}), {task.info['features']} features; split: {task.info['split']} "
        f"({task.train.size}/{task.val.size}/{task.test.size}); fitting {args.detector}")
    row = run_one(task, det)
    scores, preds = row.pop("scores"), row.pop("preds")
    if args.detector == "rqgnn":
        report.notes.append(PAPER_VS_CODE.format(**det.params()))
    ck = ""
    if isinstance(det, TorchGraphDetector):
        ck_auc = f"best-validation-AUC checkpoint, epoch {det.best_epoch_['auc'] + 1}"
        ck_f1 = f"best-validation-F1 checkpoint, epoch {det.best_epoch_['f1'] + 1}"
        report.notes.append(f"AUC/AUPRC and the graphs table's scores: {ck_auc}; Macro-F1 and the predictions: "
                            f"{ck_f1} (argmax, threshold {det.threshold_:g}). The saved model scores with the "
                            f"{det.checkpoint!r} checkpoint; `outlierkit graph score` on this split reproduces "
                            "these numbers (its default --checkpoint paper uses the same two).")
        report.metrics["threads"] = det.threads_
        report.add_table("history", det.history_)
        ck = f" ({ck_auc}; F1: {ck_f1})"
    report.metrics.update({f"test_{k}": v for k, v in row.items()})
    report.metrics.update({f"data_{k}": v for k, v in task.info.items()})
    yt = task.data.y[task.test]
    report.add_table("graphs", [{"graph_id": int(i) + 1, "label": int(lbl), "score": float(s), "pred": int(p)}
                                for i, lbl, s, p in zip(task.test, yt, scores, preds, strict=True)])
    with staged_output(args.out, force=args.force) as stage:
        _plots(stage, report, yt, scores, getattr(det, "history_", None))
        if det.supports_save:
            assert isinstance(det, TorchGraphDetector)
            det.save(stage / "model", extra={"data": _asdict(cfg), "data_spec": task.data.spec,
                                             "test_positions": [int(i) for i in task.test]})
            report.artifacts["model"] = "model/"
        else:
            _warn(report, f"detector {args.detector!r} cannot be saved; only the report was written")
        report.save(stage)
    print(f"test AUC {row['auc']:.4f}  AUPRC {row['auprc']:.4f}  Macro-F1 {row['macro_f1']:.4f}{ck}  -> {args.out}")
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
    from outlierkit.graph.data import load_tu
    from outlierkit.graph.detector import load_detector
    from outlierkit.graph.metrics import auprc, macro_f1, roc_auc
    from outlierkit.report import Report

    check_output(args.out, force=args.force)
    mdir = Path(args.model) / "model" if (Path(args.model) / "model").is_dir() else Path(args.model)
    det = load_detector(mdir)
    meta = det.load_meta(mdir)
    if args.device != "cpu":
        det.device = args.device
        assert det.model_ is not None
        det.model_.to(det._device())
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
        if "test_positions" in meta["extra"]:
            idx = np.asarray(meta["extra"]["test_positions"], dtype=np.int64)
        else:  # models saved before the test positions were stored: redraw the seeded split
            from outlierkit.graph.data import DataConfig, make_task

            cfg = DataConfig(name, root, dcfg.get("anomaly_label"), dcfg.get("anomaly_ratio"),
                             bool(dcfg.get("use_node_attr", False)), int(dcfg.get("seed", 0)), dcfg.get("split_file"))
            idx = make_task(cfg, data).test
        if idx.size and int(idx.max()) >= data.graphs.num_graphs:
            raise ConfigError(f"the saved test split names graph position {int(idx.max())} but {name} now has "
                              f"{data.graphs.num_graphs} graphs; the data changed since `graph fit`")
    else:
        idx = np.arange(data.graphs.num_graphs)
    graphs, y = data.graphs.select(idx), data.y[idx]
    pairs: dict[str, tuple[Literal["auc", "f1"], Literal["auc", "f1"]]] = {
        "paper": ("auc", "f1"), "auc": ("auc", "auc"), "f1": ("f1", "f1")}
    which = pairs[args.checkpoint]
    missing = sorted(set(which) - set(det.states_))
    if missing:
        raise ConfigError(f"the saved model has no {missing[0]!r} checkpoint; available: {sorted(det.states_)}")
    det.use_checkpoint(which[0])
    scores = det.decision_function(graphs)
    det.use_checkpoint(which[1])
    preds = det.predict(graphs)
    report = Report(kind="graph.score", config={"model": str(args.model), "dataset": name, "data_root": root,
                                                 "split": args.split, "checkpoint": args.checkpoint,
                                                 "detector": meta["detector"], "params": meta["params"]})
    for w in data.warnings:
        _warn(report, w)
    report.metrics.update({"auc": roc_auc(y, scores), "auprc": auprc(y, scores), "macro_f1": macro_f1(y, preds)})
    report.metrics["graphs"] = int(idx.size)
    report.metrics["predicted_anomalies"] = int(preds.sum())
    ck_auc = f"{which[0]} checkpoint, epoch {det.best_epoch_.get(which[0], -1) + 1}"
    ck_f1 = f"{which[1]} checkpoint, epoch {det.best_epoch_.get(which[1], -1) + 1}"
    report.notes.append(f"AUC/AUPRC and scores: the best-validation-{which[0].upper()} checkpoint; Macro-F1 and "
                        f"predictions: the best-validation-{which[1].upper()} checkpoint.")
    report.add_table("graphs", [{"graph_id": int(i) + 1, "label": int(lbl), "score": float(s), "pred": int(p)}
                                for i, lbl, s, p in zip(idx, y, scores, preds, strict=True)])
    with staged_output(args.out, force=args.force) as stage:
        _plots(stage, report, y, scores, None)
        report.save(stage)
    m = report.metrics
    print(f"{idx.size} graphs scored; AUC {m['auc']:.4f}  Macro-F1 {m['macro_f1']:.4f} ({ck_auc}; F1: {ck_f1})"
          f"  -> {args.out}")
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
