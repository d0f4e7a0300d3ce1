"""One argparse CLI: ``main(argv) -> int``; each subcommand lives in its own module, imported lazily."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from outlierkit.errors import OutlierkitError

# name -> (module defining add_arguments(parser) and run(args) -> int, one-line help).
# Only the chosen subcommand's module is imported, so `outlierkit graph` never imports transformers.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("outlierkit.llm.commands.demo", "profile the bundled pretrained MiniLM and show its outliers"),
    "profile": ("outlierkit.llm.commands.profile", "measure activation outliers of Hugging Face models"),
    "quantize": ("outlierkit.llm.commands.quantize", "quantize a model with a recipe (RTN, SmoothQuant, OS+, ...)"),
    "eval": ("outlierkit.llm.commands.eval", "perplexity / embedding fidelity of a float or quantized model"),
    "compare": ("outlierkit.llm.commands.compare", "evaluate several recipes on the same data in one table"),
    "plan": ("outlierkit.llm.commands.plan", "choose per-layer method and precision for a target, verified"),
    "transforms": ("outlierkit.llm.commands.transforms", "max|x|, kurtosis, INT8/INT4 SQNR before/after transforms"),
    "graph": ("outlierkit.graph.cli", "graph-level anomaly detection with RQGNN (fit, score, bench)"),
    "hex": ("outlierkit.diffusion.cli", "masked-diffusion sampling and HEX test-time scaling"),
    "report": ("outlierkit.commands_report", "show a report.json or compare the metrics of two reports"),
}


def _top_help() -> str:
    from outlierkit import __version__

    width = max(len(n) for n in COMMANDS)
    lines = [
        f"outlierkit {__version__}: find outliers and put them to work",
        "",
        "usage: outlierkit COMMAND [options]   (outlierkit COMMAND --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _error(message: str) -> None:
    print(f"outlierkit: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns 0 on success, 1 on failure, 2 on bad usage or bad input, 130 on Ctrl-C."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from outlierkit import __version__

        print(f"outlierkit {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        _error(f"unknown command {name!r}; valid commands: {', '.join(COMMANDS)}")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"outlierkit {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    try:
        ns = parser.parse_args(rest)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        return int(module.run(ns) or 0)
    except OutlierkitError as e:
        _error(str(e))
        return 2
    except KeyboardInterrupt:
        _error("interrupted; finished work was kept where the command supports --resume")
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
