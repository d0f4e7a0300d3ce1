"""Table-driven bad input for `outlierkit hex`: exit code 2, one line on stderr, nothing written in --out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from outlierkit.cli import main
from outlierkit.diffusion.tiny import BUNDLED

PROMPT = "3817450926;4+6="


def _corrupt_weights(tmp: Path) -> Path:
    d = tmp / "bad_weights"
    d.mkdir()
    shutil.copy(BUNDLED / "config.json", d / "config.json")
    (d / "model.safetensors").write_bytes((BUNDLED / "model.safetensors").read_bytes()[:1000])
    return d


def _corrupt_config(tmp: Path) -> Path:
    d = tmp / "bad_config"
    d.mkdir()
    (d / "config.json").write_text((BUNDLED / "config.json").read_text()[:200])  # truncated JSON
    shutil.copy(BUNDLED / "model.safetensors", d / "model.safetensors")
    return d


def _wrong_shapes(tmp: Path) -> Path:
    d = tmp / "wrong_shapes"
    d.mkdir()
    cfg = json.loads((BUNDLED / "config.json").read_text())
    cfg["model"]["d_model"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(BUNDLED / "model.safetensors", d / "model.safetensors")
    return d


def _missing_jsonl(tmp: Path) -> Path:
    return tmp / "missing.jsonl"


def _bad_jsonl(tmp: Path) -> Path:
    p = tmp / "bad.jsonl"
    p.write_text('{"prompt": "1"}\n')
    return p


def _regular_file(tmp: Path) -> Path:
    p = tmp / "a_file"
    p.write_text("x")
    return p


# (argv with {OUT} and {X} placeholders, message fragment, fixture builder for {X})
CASES = [
    (["eval", "--threads", "0"], "--threads: must be an integer >= 1", None),
    (["eval", "--steps", "0"], "--steps: must be an integer >= 1", None),
    (["generate", "--prompt", PROMPT, "--steps", "0"], "--steps: must be an integer >= 1", None),
    (["eval", "-n", "0"], "must be an integer >= 1", None),
    (["eval", "-n", "100000000"], "more than this machine's memory", None),
    (["eval", "--task", "parity-chain"], "does not match the checkpoint", None),
    (["eval", "--chat"], "--chat needs a tokenizer", None),
    (["generate", "--prompt", PROMPT, "--mask-id", "7"], "--mask-id 7 does not apply", None),
    (["eval", "--model", "{X}"], "model.safetensors (corrupt", _corrupt_weights),
    (["generate", "--prompt", PROMPT, "--model", "{X}"], "config.json", _corrupt_config),
    (["eval", "--model", "{X}"], "model.safetensors (corrupt", _wrong_shapes),
    (["generate", "--prompt", "0110="], "pointer-chase-k prompts look like", None),
    (["eval", "--ks", "5"], "k=5 exceeds the 4 schedules", None),
    (["eval", "--ks", "0"], "positive integers", None),
    (["eval", "--temperature", "nan"], "--temperature: must be a finite number", None),
    (["eval", "--gen-length", "8"], "trained with gen-length 16", None),
    (["eval", "--schedules", "5"], "does not divide", None),
    (["eval", "--device", "tpu9"], "unknown device", None),
    (["eval", "--dtype", "int3"], "unknown dtype", None),
    (["eval", "--data", "{X}"], "does not exist", _missing_jsonl),
    (["eval", "--data", "{X}"], "expected a JSON object", _bad_jsonl),
    (["eval", "--baselines", "nope"], "nope", None),
    (["eval", "--max-memory", "lots"], "not understood", None),
    (["eval", "--dev", "-1"], "--dev must be >= 0", None),
    (["eval", "--max-memory", "1KiB"], "below one row", None),
    (["generate", "--prompt", PROMPT, "--batch-rows", "0"], "--batch-rows: must be an integer >= 1", None),
    (["train-tiny", "--task", "nope"], "nope", None),
    (["train-tiny", "--steps", "0"], "--steps: must be an integer >= 1", None),
    (["train-tiny", "--lr", "-1"], "--lr: must be a finite number >= 0", None),
    (["train-tiny", "--init-from", "{X}"], "another task or model size", None),
]


@pytest.mark.parametrize("argv,msg,make", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_hex_bad_input(argv, msg, make, tmp_path, capsys, tiny_ckpt):
    out = tmp_path / "out"
    x = make(tmp_path) if make is not None else tiny_ckpt
    argv = [a.replace("{X}", str(x)) for a in argv]
    if argv[0] == "train-tiny" and "--steps" not in argv:
        argv += ["--steps", "2", "--batch-size", "4"]
    rc = main(["hex", *argv, "--out", str(out)])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert len(lines) == 1 and lines[0].startswith("outlierkit: error:"), cap.err
    assert msg in lines[0]
    assert not out.exists() and not out.with_name("out.partial").exists()


@pytest.mark.parametrize("action", [["eval"], ["generate", "--prompt", PROMPT], ["train-tiny"]])
def test_out_under_a_regular_file_is_one_line(action, tmp_path, capsys):
    f = _regular_file(tmp_path)
    assert main(["hex", *action, "--out", str(f / "sub")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a directory" in err[0]
