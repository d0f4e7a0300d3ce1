"""RQGNN on NCI1ds with the released code's split: ablation of training differences vs the released code.

Usage: python bench/graph_nci1ds.py [--variants paper,code,...] [--seeds 10-15] [--set KEY=JSON] [--log FILE]
       python bench/graph_nci1ds.py --summary FILE   (table of a log: mean +- std per variant, Welch t vs released)
Prints one JSON line per (variant, seed) and a mean +- std summary; the released code scores test AUC
0.793 +- 0.041 (seeds 10-15, best-validation-AUC checkpoint) on this split (see NCI1ds/README.md).
Test AUC comes from the best-validation-AUC checkpoint, Macro-F1 from the best-validation-F1 one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from outlierkit.graph.bench import build
from outlierkit.graph.data import load_split, load_tu
from outlierkit.graph.metrics import macro_f1, roc_auc

ROOT = Path(os.environ.get("OUTLIERKIT_TU_ROOT", Path(__file__).resolve().parents[1] / ".." / "shared/data/tu"))
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "paper": ("rqgnn", {"train_cheb": True, "rq_normalize": True}),
    "code": ("rqgnn", {"train_cheb": False, "rq_normalize": False}),
    "frozen_cheb": ("rqgnn", {"train_cheb": False, "rq_normalize": True}),
    "raw_rq": ("rqgnn", {"train_cheb": True, "rq_normalize": False}),
    "gin": ("gin", {}),
    "rq_forest": ("rq_forest", {}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="paper,code,frozen_cheb,raw_rq")
    ap.add_argument("--seeds", default="10-15")
    ap.add_argument("--dataset", default="NCI1ds")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra KEY=JSON for every variant")
    ap.add_argument("--log", default=None)
    ap.add_argument("--summary", default=None, metavar="FILE", help="summarise a --log file and exit")
    args = ap.parse_args()
    if args.summary:
        summarise(Path(args.summary))
        return
    torch.set_num_threads(1)
    a, b = (int(v) for v in args.seeds.split("-")) if "-" in args.seeds else (int(args.seeds),) * 2
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.sets)}
    data = load_tu(args.dataset, ROOT, anomaly_label=1)
    tr, va, te = load_split(ROOT / args.dataset / "split-released.json", data.graphs.num_graphs)
    g, y = data.graphs, data.y
    log = open(args.log, "a") if args.log else None  # noqa: SIM115
    results: dict[str, list[tuple[float, float]]] = {}
    for name in args.variants.split(","):
        det_name, params = VARIANTS.get(name, (name, {}))
        for seed in range(a, b + 1):
            det = build(det_name, {**params, **extra, "seed": seed})
            t0 = time.perf_counter()
            det.fit(g.select(tr), y[tr], val_graphs=g.select(va), val_y=y[va])
            fit_s = time.perf_counter() - t0
            test = g.select(te)
            if hasattr(det, "use_checkpoint"):
                det.use_checkpoint("auc")
                auc = roc_auc(y[te], det.decision_function(test))
                det.use_checkpoint("f1")
            else:
                auc = roc_auc(y[te], det.decision_function(test))
            f1 = macro_f1(y[te], det.predict(test))
            row = {"variant": name, "extra": extra, "seed": seed, "test_auc": auc, "test_f1": f1,
                   "epochs": len(getattr(det, "history_", [])), "best_epoch": getattr(det, "best_epoch_", {}),
                   "fit_s": round(fit_s, 1)}
            line = json.dumps(row)
            print(line, flush=True)
            if log:
                log.write(line + "\n")
                log.flush()
            results.setdefault(name, []).append((auc, f1))
    for name, rs in results.items():
        arr = np.array(rs)
        sd = arr.std(0, ddof=1) if len(rs) > 1 else np.zeros(2)
        print(f"{name} {extra}: test AUC {arr[:, 0].mean():.3f} +- {sd[0]:.3f}  Macro-F1 "
              f"{arr[:, 1].mean():.3f} +- {sd[1]:.3f}  (n={len(rs)})", file=sys.stderr)


RELEASED = (0.793, 0.041, 6)  # test AUC mean, sample std, runs (NCI1ds/README.md)


def summarise(path: Path) -> None:
    """Markdown table: per variant (and --set), seeds, test AUC and Macro-F1 mean +- std, Welch t vs released."""
    rows: dict[str, list[dict[str, object]]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = r["variant"] + ("" if not r["extra"] else " " + json.dumps(r["extra"], sort_keys=True))
        same = [o for o in rows.get(key, []) if o["seed"] == r["seed"]]
        if same:  # a seed run twice (parallel processes): it must repeat exactly; keep one
            if same[0]["test_auc"] != r["test_auc"]:
                print(f"warning: {key} seed {r['seed']} did not repeat: {same[0]['test_auc']} vs {r['test_auc']}",
                      file=sys.stderr)
            continue
        rows.setdefault(key, []).append(r)
    print("| variant | seeds | test AUC | test Macro-F1 | AUC - released | Welch t |")
    print("|---|---|---|---|---|---|")
    m0, s0, n0 = RELEASED
    for key, rs in rows.items():
        auc = np.array([float(r["test_auc"]) for r in rs])  # type: ignore[arg-type]
        f1 = np.array([float(r["test_f1"]) for r in rs])  # type: ignore[arg-type]
        sd = auc.std(ddof=1) if auc.size > 1 else float("nan")
        t = (auc.mean() - m0) / np.sqrt(s0**2 / n0 + sd**2 / auc.size) if auc.size > 1 else float("nan")
        seeds = ",".join(str(r["seed"]) for r in rs)
        print(f"| {key} | {seeds} | {auc.mean():.3f} +- {sd:.3f} | {f1.mean():.3f} +- "
              f"{(f1.std(ddof=1) if f1.size > 1 else float('nan')):.3f} | {auc.mean() - m0:+.3f} | {t:+.2f} |")


if __name__ == "__main__":
    main()
