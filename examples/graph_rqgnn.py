"""RQGNN where its mechanism applies (scale-free spectral anomalies), and where it does not (MUTAG).

    .venv/bin/python examples/graph_rqgnn.py --data-root ../shared/data/tu

Part 1 builds graphs whose anomalies differ from normal graphs only in the *frequency* of their node signal
(smooth vs. smooth plus a high-frequency part), each graph at a random scale between 0.1x and 10x. RQGNN's
normalised Rayleigh quotient x^T L x / x^T x measures exactly that and ignores the scale; a GIN, which sums
raw features, has to learn the ratio from few examples. Part 2 runs the same detectors on MUTAG, where the
anomalies (the minority class) are a chemistry question: there GIN does better. Numbers printed are from one
seed; a few minutes on one CPU thread.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch_geometric.data import Data

from outlierkit.graph import DataConfig, GINDetector, RQForestDetector, RQGNNDetector, make_task
from outlierkit.graph.metrics import evaluate


def spectral_anomalies(num: int, share: float, seed: int) -> tuple[list[Data], np.ndarray]:
    """Rings with random chords carrying a 2-channel node signal at a random scale (log-uniform 0.1-10).

    Normal: two slowly varying waves around the ring. Anomaly: the same plus an alternating and a random
    part (high graph frequency). Sizes, degrees and the signal's range overlap between the classes.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random(num) < share).astype(np.int64)
    y[:2] = [1, 0]  # both classes present in every split
    graphs = []
    for g in range(num):
        n = int(rng.integers(16, 33))
        ring = np.stack([np.arange(n), (np.arange(n) + 1) % n])
        chords = rng.integers(0, n, size=(2, int(rng.integers(0, 3))))
        ei = np.concatenate([ring, chords], 1)
        ei = ei[:, ei[0] != ei[1]]
        t = 2 * np.pi * np.arange(n) / n
        x = np.stack([np.cos(t + 6 * rng.random()), np.sin(2 * t + 6 * rng.random())], 1) + 1.5  # (n, 2)
        if y[g]:
            x = x + 0.6 * np.stack([(-1.0) ** np.arange(n), rng.normal(size=n)], 1)
        x = x * 10 ** rng.uniform(-1, 1)
        graphs.append(Data(x=torch.tensor(x, dtype=torch.float32),
                           edge_index=torch.from_numpy(np.concatenate([ei, ei[::-1]], 1)).long()))
    return graphs, y


def report(name: str, det, test, y_test) -> None:  # type: ignore[no-untyped-def]
    scores = det.decision_function(test)  # p(anomaly), higher = more anomalous
    m = evaluate(y_test, scores, det.predict(test))
    print(f"  {name:34s} AUC {m['auc']:.3f}  AUPRC {m['auprc']:.3f}  Macro-F1 {m['macro_f1']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="../shared/data/tu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(1)

    print("1. spectral anomalies at random scales (100 train / 60 val / 400 test graphs, 15% anomalies)")
    train, y_tr = spectral_anomalies(100, 0.15, a.seed)
    val, y_va = spectral_anomalies(60, 0.15, a.seed + 1)
    test, y_te = spectral_anomalies(400, 0.15, a.seed + 2)
    fast = {"epochs": 60, "batch_size": 32, "seed": a.seed}
    for name, det in [("RQGNN, paper (normalised RQ)", RQGNNDetector.behaviour("paper", **fast)),
                      ("RQGNN, default (numerator-only RQ)", RQGNNDetector(**fast)),
                      ("GIN", GINDetector(**fast))]:
        det.fit(train, y_tr, val_graphs=val, val_y=y_va)
        report(name, det, test, y_te)
    report("random forest on RQ features", RQForestDetector(seed=a.seed).fit(train, y_tr), test, y_te)
    print("  -> the normalised Rayleigh quotient is what separates them: without the division by x^T x\n"
          "     (the released code's numerator, outlierkit's default) RQGNN loses scale invariance; the\n"
          "     forest on the same quotients does as well, so the gain is the quotient, not the GNN.")

    print("2. MUTAG (anomaly = minority class, stratified 70/15/15, 100 epochs)")
    task = make_task(DataConfig("MUTAG", a.data_root, seed=a.seed))
    g, y = task.data.graphs, task.data.y
    for name, det in [("RQGNN (default)", RQGNNDetector(seed=a.seed)),
                      ("RQGNN (paper)", RQGNNDetector.behaviour("paper", seed=a.seed)),
                      ("GIN", GINDetector(seed=a.seed))]:
        det.fit(g.select(task.train), y[task.train], val_graphs=g.select(task.val), val_y=y[task.val])
        report(name, det, g.select(task.test), y[task.test])
    print("  -> RQGNN does not help here: mutagenicity is decided by substructures (nitro groups, rings),\n"
          "     which GIN's message passing counts; the spectral energy of atom labels carries little of it.")


if __name__ == "__main__":
    main()
