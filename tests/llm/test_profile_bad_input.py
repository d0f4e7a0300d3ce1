"""Table-driven bad input for ``profile`` and ``report``: exit 2, exactly one line on stderr, nothing written."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from outlierkit.cli import main


@pytest.fixture(scope="module")
def models(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Broken model directories derived from the tiny LLaMA (built once per module)."""
    from safetensors.torch import save_file
    from transformers import T5Config

    root = tmp_path_factory.mktemp("bad_models")
    bert = root / "bert_no_vocab"  # its BERT WordPiece tokenizer lost the vocabulary: 5 special tokens left
    shutil.copytree(tiny_llama_dir, bert)
    (bert / "tokenizer.json").unlink()
    assert not (bert / "vocab.txt").exists()
    trunc = root / "truncated"
    shutil.copytree(tiny_llama_dir, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = root / "garbage"
    shutil.copytree(tiny_llama_dir, garbage)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    t5 = root / "t5"  # encoder-decoder: refused from its config, before any weight is read
    T5Config(vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2).save_pretrained(t5)
    import torch

    save_file({"shared.weight": torch.zeros(128, 16)}, str(t5 / "model.safetensors"))
    from outlierkit.llm.fixtures import tiny_model, tokenizer

    small = root / "small_vocab"  # a 1000-row embedding with the 30522-token MiniLM tokenizer
    tiny_model("llama", vocab_size=1000, plant=False).save_pretrained(small)
    tokenizer().save_pretrained(small)
    reports = root / "reports"
    reports.mkdir()
    (reports / "nokind.json").write_text(json.dumps({"metrics": {"a": 1.0}}))
    (reports / "list.json").write_text("[1, 2]")
    (reports / "broken.json").write_text("{not json")
    for kind in ("llm.profile", "llm.eval"):
        (reports / f"{kind}.json").write_text(json.dumps({"kind": kind, "metrics": {"x": 1.0}}))
    (root / "a_file").write_text("x")
    return {"llama": tiny_llama_dir, "small_vocab": small, "bert_no_vocab": bert, "truncated": trunc,
            "garbage": garbage, "t5": t5, "reports": reports, "a_file": root / "a_file"}


P = "profile"
# (id, argv builder given (models, out), expected text in the one stderr line)
CASES: list[tuple[str, Callable[[dict[str, Path], str], list[str]], str]] = [
    ("checkpoint-every-negative", lambda m, o: [P, str(m["llama"]), "--checkpoint-every", "-1", "--out", o],
     "--checkpoint-every: must be an integer >= 0"),
    ("massive-ratio-nan", lambda m, o: [P, str(m["llama"]), "--massive-ratio", "nan", "--out", o],
     "--massive-ratio: must be a finite number"),
    ("massive-ratio-inf", lambda m, o: [P, str(m["llama"]), "--massive-ratio", "inf", "--out", o],
     "--massive-ratio: must be a finite number"),
    ("massive-ratio-zero", lambda m, o: [P, str(m["llama"]), "--massive-ratio", "0", "--out", o], "> 0"),
    ("massive-abs-negative", lambda m, o: [P, str(m["llama"]), "--massive-abs", "-5", "--out", o], "> 0"),
    ("samples-zero", lambda m, o: [P, str(m["llama"]), "--samples", "0", "--out", o], "--samples"),
    ("samples-not-int", lambda m, o: [P, str(m["llama"]), "--samples", "many", "--out", o], "--samples"),
    ("batch-size-zero", lambda m, o: [P, str(m["llama"]), "--batch-size", "0", "--out", o], "--batch-size"),
    ("hist-stride-zero", lambda m, o: [P, str(m["llama"]), "--hist-stride", "0", "--out", o], "--hist-stride"),
    ("seq-len-one", lambda m, o: [P, str(m["llama"]), "--seq-len", "1", "--out", o], "--seq-len"),
    ("unknown-level", lambda m, o: [P, str(m["llama"]), "--level", "max", "--out", o], "invalid choice"),
    ("unknown-option", lambda m, o: [P, str(m["llama"]), "--smaples", "3", "--out", o], "unrecognized"),
    ("unknown-dtype", lambda m, o: [P, str(m["llama"]), "--dtype", "int3", "--out", o], "unknown dtype"),
    ("unknown-device", lambda m, o: [P, str(m["llama"]), "--device", "tpu9", "--out", o], "device"),
    ("out-under-a-file", lambda m, o: [P, str(m["llama"]), "--out", str(m["a_file"] / "out")], "is a file"),
    ("out-is-a-file", lambda m, o: [P, str(m["llama"]), "--out", str(m["a_file"])], "is not a directory"),
    ("force-on-a-user-folder", lambda m, o: [P, str(m["llama"]), "--out", str(m["a_file"].parent), "--force"],
     "not an outlierkit output"),
    ("out-unwritable", lambda m, o: [P, str(m["llama"]), "--out", "/proc/outlierkit-test/out"],
     "cannot create output directory"),
    ("missing-model", lambda m, o: [P, str(m["a_file"].parent / "nope"), "--out", o], "neither a local directory"),
    ("missing-data", lambda m, o: [P, str(m["llama"]), "--data", str(m["a_file"].parent / "no.txt"), "--out", o],
     "does not exist"),
    ("bert-tokenizer-without-vocab", lambda m, o: [P, str(m["bert_no_vocab"]), "--out", o],
     "vocabulary files are missing"),
    ("tokenizer-of-another-model", lambda m, o: [P, str(m["small_vocab"]), "--out", o],
     "embedding has 1000 rows"),
    ("truncated-safetensors", lambda m, o: [P, str(m["truncated"]), "--out", o], "model.safetensors is corrupt"),
    ("garbage-safetensors", lambda m, o: [P, str(m["garbage"]), "--out", o], "model.safetensors is corrupt"),
    ("encoder-decoder", lambda m, o: [P, str(m["t5"]), "--out", o], "encoder-decoder model (t5)"),
    ("report-show-without-kind", lambda m, o: ["report", "show", str(m["reports"] / "nokind.json")], "'kind'"),
    ("report-show-not-an-object", lambda m, o: ["report", "show", str(m["reports"] / "list.json")], "'kind'"),
    ("report-show-broken-json", lambda m, o: ["report", "show", str(m["reports"] / "broken.json")],
     "cannot read report"),
    ("report-show-missing", lambda m, o: ["report", "show", str(m["reports"] / "none.json")], "cannot read report"),
    ("report-diff-mixed-kinds", lambda m, o: ["report", "diff", str(m["reports"] / "llm.profile.json"),
                                              str(m["reports"] / "llm.eval.json")], "--allow-mixed"),
    ("report-no-action", lambda m, o: ["report"], "required"),
]


@pytest.mark.parametrize("argv, needle", [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(argv, needle, models, tmp_path, capsys):
    out = tmp_path / "sub" / "out"
    rc = main(argv(models, str(out)))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("outlierkit: error: "), err
    assert needle in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not out.with_name("out.partial").exists() and not (tmp_path / "sub").exists()
    assert not (models["a_file"].parent / "a_file.partial").exists()


def test_the_table_is_large_enough():
    assert len(CASES) >= 14 and len({c[0] for c in CASES}) == len(CASES)
