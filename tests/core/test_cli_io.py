"""CLI plumbing shared by every command: staged outputs, one-line errors, warnings and tables on the console."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import warnings

import pytest

from outlierkit import ConfigError, Report
from outlierkit._utils import atomic_write_text, progress, stage, staged_output
from outlierkit._utils.args import finite_float, nonneg_int, positive_float, positive_int
from outlierkit._utils.log import PIPE_WIDTH, wide_pipes
from outlierkit.cli import main
from outlierkit.errors import DataError, OutputExistsError


def test_failed_run_leaves_no_empty_partial_dir(tmp_path):
    # regression: 25 of 48 failing `profile` runs left an empty OUT.partial/ (keep_on_error kept it)
    out = tmp_path / "deep" / "er" / "run"
    with pytest.raises(ValueError), staged_output(out, keep_on_error=True):
        raise ValueError("bad input found inside the run")
    assert not (tmp_path / "deep").exists()  # neither OUT.partial nor the parents this run created
    # ... while a stage holding checkpoints is kept for --resume
    with pytest.raises(KeyboardInterrupt), staged_output(out, keep_on_error=True) as stage:
        atomic_write_text(stage / "checkpoint-0.json", "{}")
        raise KeyboardInterrupt
    assert (tmp_path / "deep" / "er" / "run.partial" / "checkpoint-0.json").exists() and not out.exists()


def test_out_under_a_file_or_unwritable_dir_is_a_config_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"), staged_output(tmp_path / "file" / "sub" / "out"):
        pass
    with pytest.raises(ConfigError, match="cannot create output directory"), staged_output("/proc/outlierkit/out"):
        pass
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"), staged_output(ro / "out"):
            pass


def test_force_replaces_only_earlier_outputs(tmp_path, monkeypatch):
    # a typo in --out with --force must not delete a user's folder (or the working directory)
    mine = tmp_path / "papers"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not an outlierkit output"), staged_output(mine, force=True):
        pass
    assert (mine / "thesis.tex").exists() and not (tmp_path / "papers.partial").exists()
    monkeypatch.chdir(mine)
    for out in (".", "", "..", str(tmp_path)):
        with pytest.raises(OutputExistsError, match="working directory"), staged_output(out, force=True):
            pass
    (tmp_path / "empty").mkdir()
    with staged_output(tmp_path / "empty", force=True) as stage:
        atomic_write_text(stage / "report.json", "{}")
    with staged_output(tmp_path / "empty", force=True) as stage:  # now an earlier output: replaced
        atomic_write_text(stage / "report.json", "{}")


def test_argument_types_reject_values_that_would_misbehave():
    assert positive_int("3") == 3 and nonneg_int("0") == 0 and positive_float("0.5") == 0.5
    assert finite_float("-2") == -2.0
    for fn, bad in ((positive_int, "0"), (positive_int, "x"), (nonneg_int, "-1"), (positive_float, "nan"),
                    (positive_float, "inf"), (positive_float, "0"), (positive_float, "-3"), (finite_float, "-inf")):
        with pytest.raises(argparse.ArgumentTypeError, match="must be"):
            fn(bad)


def test_report_load_requires_kind_and_diff_refuses_mixed_kinds(tmp_path, capsys):
    (tmp_path / "nokind.json").write_text(json.dumps({"metrics": {"a": 1}}))
    with pytest.raises(DataError, match="no 'kind' field"):
        Report.load(tmp_path / "nokind.json")
    (tmp_path / "badtables.json").write_text(json.dumps({"kind": "x", "tables": [1]}))
    with pytest.raises(DataError, match="'tables' must be a JSON object"):
        Report.load(tmp_path / "badtables.json")
    a, b = Report(kind="llm.profile"), Report(kind="llm.eval")
    a.metrics["global_max"], b.metrics["global_max"] = 1.0, 2.0
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    assert main(["report", "diff", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "llm.profile report" in err and "--allow-mixed" in err and len(err.splitlines()) == 1
    assert main(["report", "diff", str(tmp_path / "a"), str(tmp_path / "b"), "--allow-mixed"]) == 0
    assert "different kinds" in capsys.readouterr().out


def test_warnings_reach_the_console_once(capsys):
    rep = Report(kind="t")
    rep.warn("the thing is off")
    rep.warn("the thing is off")
    assert capsys.readouterr().err.count("outlierkit: warning: the thing is off") == 1
    assert rep.warnings == ["the thing is off"]


@pytest.fixture
def fake_command(monkeypatch):
    """Install ``outlierkit fake`` whose ``run`` is the given function."""
    import outlierkit.cli as cli

    def install(run):
        mod = types.ModuleType("outlierkit_fake_cmd")
        mod.add_arguments = lambda parser: parser.add_argument("--n", type=positive_int, default=1)
        mod.run = run
        monkeypatch.setitem(sys.modules, "outlierkit_fake_cmd", mod)
        monkeypatch.setitem(cli.COMMANDS, "fake", ("outlierkit_fake_cmd", "a test command"))

    return install


def test_python_warnings_in_a_command_are_one_console_line(fake_command, capsys):
    def run(args):
        warnings.warn("architecture 'toy' is not in outlierkit's table", stacklevel=1)
        Report(kind="t").warn("architecture 'toy' is not in outlierkit's table")  # same text: shown once
        return 0

    fake_command(run)
    assert main(["fake"]) == 0
    err = capsys.readouterr().err
    assert err == "outlierkit: warning: architecture 'toy' is not in outlierkit's table\n"

    def third_party(args):
        warnings.warn_explicit("slow path", RuntimeWarning, "/venv/lib/site-packages/torch/nn/x.py", 1)
        return 0

    fake_command(third_party)
    assert main(["fake"]) == 0
    assert capsys.readouterr().err == "outlierkit: warning: slow path (RuntimeWarning from torch)\n"


def test_argparse_errors_are_one_line(fake_command, capsys):
    fake_command(lambda args: 0)
    for argv in (["fake", "--n", "-1"], ["fake", "--bogus"], ["report"], ["report", "show"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("outlierkit: error: outlierkit "), err
    assert main(["fake", "--n", "0"]) == 2
    assert "argument --n: must be an integer >= 1, got '0'" in capsys.readouterr().err


def _wide_table():
    from rich.table import Table

    table = Table()
    for i in range(8):
        table.add_column(f"column_number_{i}")
    table.add_row(*[f"recipe_value_{i}_long" for i in range(8)])
    return table


def test_tables_on_a_pipe_are_not_squeezed_to_80_columns(fake_command, capsys, monkeypatch):
    # regression: piped `compare` printed `rec… ste…`: rich squeezes non-terminal output to 80 columns
    from rich.console import Console

    monkeypatch.delenv("COLUMNS", raising=False)

    def run(args):
        Console().print(_wide_table())  # how commands print their tables
        return 0

    fake_command(run)
    assert main(["fake"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "recipe_value_7_long" in out and max(map(len, out.splitlines())) > 150
    assert "COLUMNS" not in os.environ  # restored after the command
    with wide_pipes():
        assert os.environ["COLUMNS"] == str(PIPE_WIDTH)
    monkeypatch.setenv("COLUMNS", "100")  # the user's COLUMNS wins
    with wide_pipes():
        assert os.environ["COLUMNS"] == "100"


def test_profile_summary_on_a_pipe_is_not_squeezed(capsys, tmp_path, monkeypatch):
    from outlierkit.llm.commands.profile import print_summary

    monkeypatch.delenv("COLUMNS", raising=False)
    row = {"model": "a-model-with-a-long-name-0123456789", "global_max": 1234.5,
           "where": "model.layers.17.post_attention_layernorm (max)", "token": "[unused0]", "massive_tokens": 48,
           "int8_absmax_sqnr_db_at_peak": 30.5, "int8_p99.9_sqnr_db_at_peak": 20.25}
    print_summary([row], tmp_path)  # outside main(): the console sizes itself
    out = capsys.readouterr().out
    assert "…" not in out and row["model"] in out and row["where"] in out
    assert "[unused0]" in out  # a token that looks like rich markup is printed, not swallowed


def test_progress_logs_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setenv("OUTLIERKIT_QUIET", "0")
    assert list(progress(range(20), description="batches")) == list(range(20))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 10 and lines[0] == "outlierkit: batches 2/20" and lines[-1] == "outlierkit: batches 20/20"
    assert list(progress(iter(range(3)), description="stage")) == [0, 1, 2]  # unknown length: a line each
    assert capsys.readouterr().err.strip().splitlines()[-1] == "outlierkit: stage 3/?"


def test_stage_logs_start_and_time_but_claims_nothing_on_failure(capsys, monkeypatch):
    monkeypatch.setenv("OUTLIERKIT_QUIET", "0")
    with stage("quantizing"):
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "outlierkit: quantizing ..." and lines[1].startswith("outlierkit: quantizing: done in ")
    with pytest.raises(RuntimeError), stage("fitting"):
        raise RuntimeError
    assert "done" not in capsys.readouterr().err
