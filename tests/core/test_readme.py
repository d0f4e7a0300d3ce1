"""The README's commands, read top to bottom, parse with the real CLI and write to distinct output folders."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

from outlierkit.cli import COMMANDS, OneLineParser

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_commands() -> list[list[str]]:
    """Every ``outlierkit ...`` line inside the README's bash blocks, as argv (comments stripped)."""
    text = README.read_text(encoding="utf-8")
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            words = shlex.split(line, comments=True)
            if "outlierkit" in words and words[0] in ("outlierkit", "torchrun"):
                argv = words[words.index("outlierkit") + 1:]
                if argv and argv[0] in COMMANDS:
                    cmds.append(argv)
    return cmds


def _out(argv: list[str]) -> str | None:
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = OneLineParser(prog=f"outlierkit {argv[0]}")
    module.add_arguments(parser)
    ns = parser.parse_args(argv[1:])
    return getattr(ns, "out", None)


def test_readme_commands_parse_and_do_not_collide() -> None:
    cmds = _readme_commands()
    assert len(cmds) >= 8, "the README lost its quick-start commands"
    outs: dict[str, list[str]] = {}
    for argv in cmds:
        out = _out(argv)  # raises SystemExit(2) if the README shows an option the CLI does not have
        if out is not None:
            outs.setdefault(str(out), []).append(" ".join(argv))
    clashes = {o: c for o, c in outs.items() if len(c) > 1}
    assert not clashes, f"README commands share an output folder: {clashes}"
