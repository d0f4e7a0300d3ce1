"""Every `outlierkit hex` command runs on its own defaults with the bundled model; options are honoured or refused."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from outlierkit.cli import main
from outlierkit.diffusion import cli as hex_cli
from outlierkit.diffusion.tiny import BUNDLED, TASKS, TrainConfig, load_tiny

pytestmark = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="no bundled checkpoint")
PROMPT = "3817450926;4+6="


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    hex_cli.add_arguments(p)
    return p.parse_args(argv)


def test_generate_defaults(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["hex", "generate", "--prompt", PROMPT, "--out", str(out)]) == 0
    assert json.loads((out / "report.json").read_text())["kind"] == "diffusion.hex_generate"
    assert "vote:" in capsys.readouterr().out


def test_eval_defaults_but_n(tmp_path, capsys, monkeypatch):
    """The defaults used to ask for HEX k=5 of the bundled task's 4 schedules ("cannot pick 5 of 4")."""
    monkeypatch.setenv("OUTLIERKIT_QUIET", "0")
    out = tmp_path / "e"
    assert main(["hex", "eval", "-n", "4", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert [r["k"] for r in rep["tables"]["hex"]] == [3, 4]
    err = capsys.readouterr().err
    assert "paths" in err and "decoding 4 problems" in err  # progress on the console


def test_bundled_exit_walk_by_name(capsys):
    """Issue 12's testbed ships next to the default checkpoint and is picked by name."""
    model, task, meta = load_tiny(BUNDLED.parent / "exit-walk")
    assert task.name == "exit-walk" and "command" in meta and sum(p.numel() for p in model.parameters()) < 750_000
    assert main(["hex", "generate", "--model", "exit-walk", "--prompt", "3817450926;4=", "--temperature", "0"]) == 0
    assert "vote:" in capsys.readouterr().out


def test_eval_dev_split(tmp_path):
    out = tmp_path / "d"
    assert main(["hex", "eval", "-n", "3", "--dev", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["metrics"]["n_problems"] == 3 and rep["metrics"]["n_dev"] == 2
    assert {r["best_chosen_on"] for r in rep["tables"]["hex"]} == {"dev"}


def test_default_ks_fit_any_pool():
    assert hex_cli.default_ks(4) == (3, 4) and hex_cli.default_ks(5) == (3, 5) and hex_cli.default_ks(2) == (2,)


def test_train_tiny_defaults_to_the_unambiguous_task(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OUTLIERKIT_QUIET", "0")
    assert TrainConfig().task == "pointer-chase-k" and _parse(["train-tiny", "--out", "x"]).task == "pointer-chase-k"
    out = tmp_path / "t"
    assert main(["hex", "train-tiny", "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    assert load_tiny(out)[1].name == "pointer-chase-k"
    assert "training the tiny model on pointer-chase-k" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["eval"], ["train-tiny"]])
def test_defaults_with_only_out(argv, tmp_path):
    """The full default runs (minutes on CPU): eval of 1000 problems, 2000 training steps."""
    assert main(["hex", *argv, "--out", str(tmp_path / "o")]) == 0


def test_prompt_formats_in_help_match_the_tasks():
    assert set(hex_cli.PROMPT_FORMATS) == set(TASKS.names())
    for name, form in hex_cli.PROMPT_FORMATS.items():
        assert form == TASKS.get(name)().prompt_format()
    p = argparse.ArgumentParser()
    hex_cli.add_arguments(p)
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    help_text = " ".join(sub.choices["generate"].format_help().split())
    assert "pointer-chase-k: '3817450926;4+6='" in help_text


def test_tiny_model_honours_device_and_dtype():
    m = hex_cli._Loaded(_parse(["eval", "--out", "x", "--dtype", "fp64", "--device", "cpu"]))
    assert next(m.model.parameters()).dtype == torch.float64 and m.device == torch.device("cpu")


def test_trust_remote_code_on_tiny_warns_on_console(capsys):
    hex_cli._Loaded(_parse(["eval", "--out", "x", "--trust-remote-code"]))
    assert "warning:" in capsys.readouterr().err
