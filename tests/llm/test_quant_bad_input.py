"""Bad input to quantize / eval: exit 2, one line on stderr, nothing written (table-driven through ``main``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from outlierkit.cli import main

SMALL = ["--calib-samples", "8", "--seq-len", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tiny_llama_dir):
    """A quantized tiny LLaMA (outlierkit format, with INT8 layers; and compressed-tensors) and a tiny BERT."""
    from outlierkit.llm.fixtures import save_tiny

    root = tmp_path_factory.mktemp("bad")
    assert main(["quantize", str(tiny_llama_dir), "--recipe", "recipes/llm_int8.yaml", "--out",
                 str(root / "q_ok"), *SMALL]) == 0
    assert main(["quantize", str(tiny_llama_dir), "--recipe", "w8a8-rtn", "--out", str(root / "q_ct"), *SMALL]) == 0
    return {"root": root, "llama": tiny_llama_dir, "q_ok": root / "q_ok", "q_ct": root / "q_ct",
            "bert": save_tiny(root / "bert", "bert")}


def _recipe(root: Path, name: str, text: str) -> str:
    p = root / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def _truncated(src: Path, dst: Path, name: str) -> str:
    if not dst.exists():
        shutil.copytree(src, dst)
        f = dst / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return str(dst)


CASES = [
    # (id, argv builder, expected message fragment)
    ("vllm-per-tensor-dynamic", lambda d: ["quantize", str(d["llama"]), "--recipe", "w8a8-rtn", "--target", "vllm"],
     "per-token dynamic or per-tensor static"),
    ("vllm-llm-int8", lambda d: ["quantize", str(d["llama"]), "--recipe", "recipes/llm_int8.yaml", "--target",
                                 "vllm"], "LLM.int8()"),
    ("vllm-w4a8-asym", lambda d: ["quantize", str(d["llama"]), "--recipe", "recipes/w4a8-group.yaml", "--target",
                                  "vllm"], "symmetric"),
    ("vllm-w6a6", lambda d: ["quantize", str(d["llama"]), "--recipe", "recipes/w6a6-osplus-mixed.yaml", "--target",
                             "vllm"], "cannot be served by vLLM"),
    ("vllm-qkv-out", lambda d: ["quantize", str(d["llama"]), "--target", "vllm", "--recipe", _recipe(
        d["root"], "qkv", "weight: int8-channel\nact: int8-token\nqkv_out: int8-token\nsteps: [rtn]\n")], "qkv_out"),
    ("vllm-split-fused-shards", lambda d: ["quantize", str(d["llama"]), "--target", "vllm", "--recipe", _recipe(
        d["root"], "split", "weight: int8-channel\nact: int8-token\nsteps: [rtn]\noverrides:\n"
        "  're:.*\\.k_proj': skip\n")], "fused shards"),
    ("existing-out", lambda d: ["quantize", str(d["llama"]), "--recipe", "w8a8-rtn", "--out", str(d["q_ok"])],
     "--force"),
    ("unknown-override-key", lambda d: ["quantize", str(d["llama"]), "--recipe", _recipe(
        d["root"], "ov", "steps: [rtn]\noverrides:\n  're:.*o_proj': {wieght: int8}\n")], "unknown key(s) ['wieght']"),
    ("bad-format-string", lambda d: ["quantize", str(d["llama"]), "--recipe", _recipe(
        d["root"], "fmt", "act: int8-bogus\nsteps: [rtn]\n")], "unknown part 'bogus'"),
    ("transform-after-rtn", lambda d: ["quantize", str(d["llama"]), "--recipe", _recipe(
        d["root"], "order", "steps: [rtn, smoothquant]\n")], "must come before rtn"),
    ("no-such-recipe", lambda d: ["quantize", str(d["llama"]), "--recipe", "w9a9-magic"],
     "neither a file nor a preset"),
    ("quantized-from-another-model", lambda d: ["eval", str(d["bert"]), "--quantized", str(d["q_ok"])],
     "another model"),
    ("truncated-int8-tensors", lambda d: ["eval", str(d["llama"]), "--quantized",
                                          _truncated(d["q_ok"], d["root"] / "trunc8", "outlierkit_int8.safetensors")],
     "outlierkit_int8.safetensors"),
    ("truncated-model-weights", lambda d: ["eval", str(d["llama"]), "--quantized",
                                           _truncated(d["q_ct"], d["root"] / "truncw", "model.safetensors")],
     "model.safetensors"),
    ("not-a-quantized-dir", lambda d: ["eval", str(d["llama"]), "--quantized", str(d["llama"])],
     "written by `outlierkit quantize`"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_one_line_nothing_written(case, dirs, capsys, tmp_path):
    _, argv, message = case
    args = argv(dirs)
    out = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out)]
    if args[0] == "quantize":
        args += SMALL
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
