"""``outlierkit transforms``: per-site statistics before/after equivalence transforms, and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from outlierkit.cli import main
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import fake_quant, parse_format, sqnr_db
from outlierkit.llm.transform_profile import InputStats, compare_transforms, linear_input_stats, summarize


def test_input_stats_match_direct_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g) ** 3 + 0.5
    st = InputStats()
    st.update(x[:100])
    st.update(x[100:])
    v = x.double().reshape(-1)
    m = v.mean()
    assert st.kurtosis == pytest.approx(float(((v - m) ** 4).mean() / ((v - m) ** 2).mean() ** 2 - 3), rel=1e-9)
    assert st.absmax == pytest.approx(float(v.abs().max()))
    assert st.sqnr(4) == pytest.approx(sqnr_db(x, fake_quant(x, parse_format("int4-token"))), rel=1e-6)
    assert st.sqnr(8) == pytest.approx(sqnr_db(x, fake_quant(x, parse_format("int8-token"))), rel=1e-6)


def test_rotation_lowers_kurtosis_and_is_measured_after_the_online_rotation(batches):
    model = tiny_model("llama")
    rows, notes = compare_transforms(model, batches, ["rotate"], {"rotate": {"online_down": True}})
    assert len(rows) == 14 and not notes
    by = {r["site"]: r for r in rows}
    q = by["model.layers.1.self_attn.q_proj"]
    assert q["kurtosis_after"] < q["kurtosis_before"] / 2 and q["absmax_after"] < q["absmax_before"] / 2
    # the down projection's input is measured as its weight sees it (h H), so its statistics change too
    d = by["model.layers.0.mlp.down_proj"]
    assert d["kurtosis_after"] != pytest.approx(d["kurtosis_before"])
    assert linear_input_stats(model, batches)  # the original model is untouched (transforms work on copies)
    s = summarize(rows)[0]
    assert s["method"] == "rotate" and s["applied"] and math.isfinite(s["sqnr_int8_db_after"])


def test_transforms_cli(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "tr"
    assert main(["transforms", str(tiny_llama_dir), "--methods", "smoothquant", "rotate", "--samples", "2",
                 "--seq-len", "16", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["kind"] == "llm.transforms" and {r["method"] for r in rep["tables"]["summary"]} == {"smoothquant",
                                                                                                 "rotate"}
    assert (out / "layer_max.png").is_file()
    assert "INT4 SQNR" in capsys.readouterr().out
    assert main(["transforms", str(tiny_llama_dir), "--methods", "rtn", "--out", str(tmp_path / "bad")]) == 2
    assert "not an equivalence transform" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
