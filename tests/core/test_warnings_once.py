"""A warning reaches the console exactly once, however many parts echo it (Report.warn, the hex and graph CLIs)."""

from __future__ import annotations

from outlierkit._utils.log import reset_warnings
from outlierkit.report import Report


def test_report_warnings_echoed_by_commands_print_once(capsys):
    from outlierkit.diffusion.cli import _warn as hex_warn
    from outlierkit.graph.cli import _warn as graph_warn

    reset_warnings()
    rep = Report(kind="test")
    rep.warn("planted warning one")
    hex_warn("planted warning one")  # hex eval echoes the report's warnings after the run
    graph_warn(rep, "planted warning two")
    err = capsys.readouterr().err
    assert err.count("planted warning one") == 1 and err.count("planted warning two") == 1, err
    assert rep.warnings == ["planted warning one", "planted warning two"]
