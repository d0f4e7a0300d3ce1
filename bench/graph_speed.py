"""RQGNN speed: packed/vectorised implementation vs a per-graph dense one (the released code's style).

Measured side by side in one run on the same weights and batches; prints the ratio.
    .venv/bin/python bench/graph_speed.py --data-root ../shared/data/tu --dataset NCI1 --out runs/graph_speed
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("OUTLIERKIT_TU_ROOT", "../shared/data/tu"))
    p.add_argument("--dataset", default="NCI1")
    p.add_argument("--out", default="runs/graph_speed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from outlierkit.cli import main as cli

    args = ["graph", "bench", "--mode", "speed", "--dataset", a.dataset, "--data-root", a.data_root,
            "--out", a.out]
    if a.force:
        args.append("--force")
    return cli(args)


if __name__ == "__main__":
    sys.exit(main())
