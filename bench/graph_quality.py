"""Graph anomaly quality grid: Macro-F1, AUC, AUPRC (mean ± std over seeds), RQGNN vs baselines.

Full grid (what BENCHMARKS.md reports):
    .venv/bin/python bench/graph_quality.py --data-root ../shared/data/tu --out runs/graph_quality
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("OUTLIERKIT_TU_ROOT", "../shared/data/tu"))
    p.add_argument("--out", default="runs/graph_quality")
    p.add_argument("--datasets", default=None)
    p.add_argument("--detectors", default=None)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=None, help="override GNN epochs (default: 100, the paper's)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # the build machine's 2 cores are shared
    from outlierkit.cli import main as cli

    args = ["graph", "bench", "--mode", "quality", "--data-root", a.data_root, "--out", a.out,
            "--seeds", str(a.seeds)]
    for flag, value in (("--datasets", a.datasets), ("--detectors", a.detectors), ("--epochs", a.epochs)):
        if value is not None:
            args += [flag, str(value)]
    if a.force:
        args.append("--force")
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
