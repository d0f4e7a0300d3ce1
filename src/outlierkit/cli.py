"""One argparse CLI: ``main(argv) -> int``; each subcommand lives in its own module, imported lazily."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

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
    "train-lm": ("outlierkit.llm.commands.train_lm", "train a small LLaMA causal LM on offline text"),
    "graph": ("outlierkit.graph.cli", "graph-level anomaly detection with RQGNN (fit, score, bench)"),
    "hex": ("outlierkit.diffusion.cli", "masked-diffusion sampling and HEX test-time scaling"),
    "report": ("outlierkit.commands_report", "show a report.json or compare the metrics of two reports"),
}


# Exit codes, the same for every command.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_UNUSABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "exit codes: 0 ok; 2 bad usage or bad input (one line on stderr, nothing written); "
    "3 the run finished but its results are unusable (e.g. NaN/Inf statistics; the report is kept to "
    "diagnose it); 130 interrupted"
)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line errors (``outlierkit: error: ...``) instead of a usage block, like every
    other outlierkit error; subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: {message} (see {self.prog} --help)")
        raise SystemExit(EXIT_USAGE)


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
    lines += ["", EXIT_CODES]
    return "\n".join(lines)


def print_error(message: str) -> None:
    print(f"outlierkit: error: {' '.join(str(message).split())}", file=sys.stderr)


def _show_warning(message: warnings.WarningMessage | Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: object = None, line: str | None = None) -> None:
    """Python warnings raised during a command reach the console as one ``outlierkit: warning:`` line,
    naming the package that raised them when it is not outlierkit."""
    from outlierkit._utils.log import warning

    parts = filename.replace("\\", "/").split("/")
    origin = parts[parts.index("site-packages") + 1] if "site-packages" in parts[:-1] else None
    if "outlierkit" in parts or origin is None or origin == "outlierkit":
        warning(str(message) if category is UserWarning else f"{message} ({category.__name__})")
    else:
        warning(f"{message} ({category.__name__} from {origin})")


@contextlib.contextmanager
def _console_setup() -> Iterator[None]:
    """For one command: Python warnings reach the console once each; results on a pipe are not squeezed."""
    from outlierkit._utils.log import reset_warnings, wide_pipes

    reset_warnings()
    saved = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        with wide_pipes():
            yield
    finally:
        warnings.showwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns 0 on success, 2 on bad usage or bad input, 3 when the run finished but its
    results are unusable (NaN/Inf statistics), 130 on Ctrl-C (see :data:`EXIT_CODES`)."""
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
        print_error(f"unknown command {name!r}; valid commands: {', '.join(COMMANDS)}")
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = OneLineParser(prog=f"outlierkit {name}", description=COMMANDS[name][1], epilog=EXIT_CODES)
    module.add_arguments(parser)
    try:
        ns = parser.parse_args(rest)
    except SystemExit as e:  # --help (0), or OneLineParser already printed its one-line error (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    with _console_setup():
        try:
            return int(module.run(ns) or 0)
        except OutlierkitError as e:
            print_error(str(e))
            return EXIT_USAGE
        except KeyboardInterrupt:
            print_error("interrupted; finished work was kept where the command supports --resume")
            return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
