"""quantize / eval / compare through ``outlierkit.cli.main``; bad input exits 2 and writes nothing."""

from __future__ import annotations

import json

import pytest

from outlierkit.cli import main

SMALL = ["--calib-samples", "8", "--seq-len", "32", "--batch-size", "4"]


def test_quantize_then_eval(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("weight: int8-channel\nact: int8-tensor\nsteps:\n  - smoothquant: {alpha: 0.8}\n  - rtn: {}\n"
                      "overrides:\n  're:.*\\.0\\.mlp\\.down_proj': skip\n")
    assert main(["quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out), *SMALL]) == 0
    for name in ("model.safetensors", "config.json", "recipe.yaml", "report.json", "report.md", "tokenizer.json"):
        assert (out / name).is_file(), name
    # compressed-tensors by default: plain transformers loads the quantized model
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "llm.quantize"
    assert rep["metrics"]["output_sqnr_db"] > rep["metrics"]["output_sqnr_db_rtn"]
    assert rep["metrics"]["layers_quantized"] == 13
    assert "output SQNR" in capsys.readouterr().out
    ev = tmp_path / "ev"
    assert main(["eval", str(tiny_llama_dir), "--quantized", str(out), "--samples", "4", "--seq-len", "32",
                 "--max-windows", "2", "--out", str(ev)]) == 0
    erep = json.loads((ev / "report.json").read_text())
    rows = erep["tables"]["eval"]
    assert rows[0]["top1_agree"] == 1.0 and 0 < rows[1]["top1_agree"] < 1.0
    assert rows[0]["ppl"] > 1 and rows[1]["ppl"] > 1
    # the saved artifact reproduces the fidelity quantize reported, on quantize's own calibration data
    assert erep["metrics"]["reloaded_output_sqnr_db"] == pytest.approx(rep["metrics"]["output_sqnr_db"], abs=1e-9)
    # existing output without --force: error, one line, exit 2, nothing replaced
    before = (out / "report.json").read_text()
    assert main(["quantize", str(tiny_llama_dir), "--recipe", "w8a8-rtn", "--out", str(out), *SMALL]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.json").read_text() == before


@pytest.mark.parametrize("recipe_text,message", [
    ("steps: [rtn]\nbitz: 8\n", "unknown key(s) ['bitz']"),
    ("weight: {bits: 9}\nsteps: [rtn]\n", "2..8"),
    ("weight: int4-g48\nsteps: [rtn]\n", "does not divide"),
    ("steps: [{os_plus: {flor: 1}}, rtn]\n", "unknown key(s) ['flor']"),
])
def test_bad_recipes_exit_2_and_leave_nothing(tiny_llama_dir, tmp_path, capsys, recipe_text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(recipe_text)
    out = tmp_path / "never"
    assert main(["quantize", str(tiny_llama_dir), "--recipe", str(recipe), "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() and not (tmp_path / "never.partial").exists()


def test_too_little_calibration_data_exits_2(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_llama_dir), "--recipe", "w8a8-rtn", "--out", str(out),
                 "--calib-samples", "1", "--seq-len", "16"]) == 2
    assert "min_tokens" in capsys.readouterr().err
    assert not out.exists()


def test_transform_on_unsupported_architecture_names_the_mapping():
    """A model_type outside the table resolves generically: a fold transform says which mapping is missing."""
    from outlierkit.errors import UnsupportedArchitectureError
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.fixtures import tiny_model, tokenizer
    from outlierkit.llm.recipe import quantize_

    model = tiny_model("llama")
    model.config.model_type = "mystery"
    corpus = build_corpus(tokenizer(), load_documents(None), samples=8, seq_len=32)
    with pytest.raises(UnsupportedArchitectureError, match="'mystery'.*ArchSpec"):
        quantize_(model, "w8a8-smoothquant", corpus, baseline=False)


def test_compare_two_recipes_on_bert(tmp_path, capsys):
    from outlierkit.llm.fixtures import save_tiny

    d = save_tiny(tmp_path / "bert", "bert")
    out = tmp_path / "cmp"
    assert main(["compare", str(d), "--recipes", "fp32", "w8a8-rtn", "w8a8-osplus", "--calib-samples", "8",
                 "--samples", "8", "--seq-len", "32", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = {r["recipe"]: r for r in rep["tables"]["compare"]}
    assert rows["fp32"]["cos_mean"] == pytest.approx(1.0, abs=1e-9) and rows["fp32"]["top1_agree"] == 1.0
    assert rows["w8a8-rtn"]["cos_mean"] < 1.0
    assert (out / "compare.png").is_file()
    assert "recipes on the same held-out data" in capsys.readouterr().out
