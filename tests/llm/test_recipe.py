"""Recipes: YAML/dict parsing, overrides, validation errors, quantize_ report."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from outlierkit.errors import ConfigError, DataError, UnknownNameError
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import FP8Format, IntFormat
from outlierkit.llm.layers import QuantLinear, quant_layers
from outlierkit.llm.methods import METHODS
from outlierkit.llm.recipe import PRESETS, Recipe, load_recipe, quantize_

REPO = Path(__file__).resolve().parents[2]


def test_bundled_recipe_files_and_presets_parse():
    files = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        r = Recipe.load(f)
        # a recipe ends with a step that quantizes (rtn, llm_int8, real_int8 after rtn), not a transform
        assert r.steps and not METHODS.get(r.steps[-1].method).transform, f.name
        assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()  # round trip
    for name in PRESETS:
        assert load_recipe(name).name == name


def test_unknown_keys_and_bad_values_are_clear_errors():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stepz'\]"):
        Recipe.from_dict({"stepz": []})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['alpah'\].*valid keys"):
        Recipe.from_dict({"steps": [{"smoothquant": {"alpah": 0.5}}, "rtn"]})
    with pytest.raises(UnknownNameError, match="valid names: .*os_plus.*rtn.*smoothquant"):
        Recipe.from_dict({"steps": ["awq"]})
    with pytest.raises(ConfigError, match="2..8"):
        Recipe.from_dict({"weight": {"bits": 9}})
    with pytest.raises(ConfigError, match="2..8"):
        Recipe.from_dict({"act": "int1"})
    with pytest.raises(ConfigError, match="must come before rtn"):
        Recipe.from_dict({"steps": ["rtn", "smoothquant"]})
    with pytest.raises(ConfigError, match="alpha"):
        Recipe.from_dict({"steps": [{"smoothquant": {"alpha": 1.5}}, "rtn"]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bitz'\]"):
        Recipe.from_dict({"overrides": {"re:.*": {"bitz": 4}}})
    with pytest.raises(ConfigError, match="bad regex"):
        Recipe.from_dict({"overrides": {"re:(": "skip"}})
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_recipe("no-such-recipe")


def test_overrides_skip_regex_and_fp8(corpus):
    model = tiny_model("llama")
    r = Recipe.from_dict({
        "weight": "int8-channel", "act": "int8-token", "qkv_out": "int8-token", "steps": ["rtn"],
        "overrides": {"model.layers.0.mlp.down_proj": "skip",
                      "re:.*o_proj": {"act": "fp8"},
                      "re:.*\\.1\\.mlp\\.(gate|up)_proj": {"weight": {"bits": 4, "granularity": "group",
                                                                        "group_size": 16}}}})
    quantize_(model, r, corpus, baseline=False)
    layers = dict(quant_layers(model))
    assert layers["model.layers.0.mlp.down_proj"].is_float
    assert isinstance(layers["model.layers.1.self_attn.o_proj"].act_format, FP8Format)
    assert layers["model.layers.1.self_attn.o_proj"].weight_format == IntFormat(8, granularity="channel")
    assert layers["model.layers.1.mlp.up_proj"].weight_format == IntFormat(4, True, "group", 16)
    assert layers["model.layers.0.self_attn.k_proj"].out_format == IntFormat(8, granularity="token")
    assert layers["model.layers.0.self_attn.o_proj"].out_format is None


def test_group_size_not_dividing_dimension_names_the_layer(corpus):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\..*group_size 48 does not divide"):
        quantize_(model, {"weight": "int4-g48", "steps": ["rtn"]}, corpus, baseline=False)


def test_too_little_calibration_data(corpus):
    tiny = corpus.subset([0])
    with pytest.raises(DataError, match="calibration data has .* tokens, fewer than calib.min_tokens=256"):
        quantize_(tiny_model("llama"), {"steps": ["rtn"]}, tiny)


def test_quantize_report_and_static_ranges(corpus):
    model = tiny_model("opt")
    rep = quantize_(model, {"weight": "int8-channel", "act": "int8-static", "steps": [{"smoothquant": {}}, "rtn"]},
                    corpus)
    assert {"output_sqnr_db", "output_sqnr_db_rtn", "layer_sqnr_db_min", "time_smoothquant_s"} <= set(rep.metrics)
    rows = rep.tables["layer_sqnr"]
    assert len(rows) == 12 and all("sqnr_db_rtn" in r and math.isfinite(r["sqnr_db"]) for r in rows)
    # smoothing lowers what q/k/v see; RTN alone sees the planted outlier channels
    qkv = [r for r in rows if r["layer"].endswith("q_proj")]
    assert all(r["in_absmax"] < r["in_absmax_rtn"] for r in qkv)
    static = [r for r in rep.tables["formats"] if "act_lo" in r]
    assert len(static) == 12 and all(r["act_lo"] <= 0 < r["act_hi"] for r in static)
    assert all(isinstance(m, QuantLinear) for _, m in quant_layers(model))
    assert torch.isfinite(torch.tensor([r["sqnr_db"] for r in rows])).all()
