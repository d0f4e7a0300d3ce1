"""compressed-tensors export: round trip through the compressed-tensors library and transformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from outlierkit.errors import ConfigError
from outlierkit.llm.export_ct import export_compressed_tensors
from outlierkit.llm.fixtures import tiny_model
from outlierkit.llm.formats import IntFormat
from outlierkit.llm.layers import QuantLinear
from outlierkit.llm.recipe import quantize_

CAL = {"min_tokens": 64}
SPIKE_FP8 = {"spike_mp": {"select": "topk", "top_k": 2, "keep": "fp8"}}



def _logits(m, batches):
    with torch.no_grad():
        return torch.cat([m(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in batches])


def _quantized(llama, batches, **recipe):
    m = copy.deepcopy(llama)
    rep = quantize_(m, {"calib": CAL, **recipe}, batches, baseline=False)
    return m, rep


def _ct_library_load(d):
    """Load with compressed-tensors alone: float model from config, schemes applied, strict state dict, decompress."""
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(d)
    qcfg = QuantizationConfig.model_validate(cfg.quantization_config)
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg).eval()
    apply_quantization_config(model, qcfg)
    compressor = ModelCompressor(quantization_config=qcfg)
    compressor.compress_model(model)  # the compressed parameter layout (weight_packed for packed groups)
    model.load_state_dict(load_file(d / "model.safetensors"), strict=True)
    compressor.decompress_model(model)
    return model


def test_weight_only_mixed_int8_fp8_round_trip_is_exact(llama, batches, tok, tmp_path):
    m, rep = _quantized(llama, batches, weight="int8-channel", act=None, steps=[SPIKE_FP8])
    spikes = [r["layer"] for r in rep.tables["transforms"] if r.get("selected")]
    summary = export_compressed_tensors(m, tok, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "mixed-precision"
    groups = {g["format"]: g for g in cfg["config_groups"].values()}
    assert sorted(groups["float-quantized"]["targets"]) == sorted(spikes)
    # weight-only INT is written pack-quantized: the only form vLLM serves W8A16/W4A16 in
    assert len(groups["pack-quantized"]["targets"]) == 12
    assert groups["pack-quantized"]["weights"]["strategy"] == "channel"
    assert cfg["ignore"] == ["lm_head"] and summary["ignore"] == ["lm_head"]
    ours = _logits(m, batches)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert hf.model.layers[0].mlp.up_proj.quantization_scheme is not None
    assert torch.equal(_logits(hf, batches), ours)  # weights on the same grids: bit-identical outputs
    lib = _ct_library_load(tmp_path)
    assert torch.equal(_logits(lib, batches), ours)


def test_int8_weights_are_stored_as_int8(llama, batches, tok, tmp_path):
    from safetensors.torch import load_file

    m, _ = _quantized(llama, batches, weight="int8-channel", act="int8-token", steps=["rtn"])
    export_compressed_tensors(m, tok, tmp_path / "fake")
    real, _ = _quantized(llama, batches, weight="int8-channel", act="int8-token", steps=["rtn", "real_int8"])
    export_compressed_tensors(real, tok, tmp_path / "real")
    a, b = load_file(tmp_path / "fake" / "model.safetensors"), load_file(tmp_path / "real" / "model.safetensors")
    w = "model.layers.1.mlp.down_proj.weight"
    assert a[w].dtype == torch.int8 and torch.equal(a[w], b[w])
    assert torch.allclose(a[w + "_scale"], b[w + "_scale"], rtol=1e-6)
    # the saved file shrinks by ~3 bytes per block-linear weight (fp32 -> int8, plus one scale per row)
    llama.save_pretrained(tmp_path / "float")
    n = sum(v.numel() for k, v in a.items() if v.dtype == torch.int8)
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("float", "fake")}
    saved = size["float"] - size["fake"]
    assert 3 * n - 4 * 14 * 256 <= saved <= 3 * n


def _ct_grid_reference(m):
    """Our model with each dynamic per-token INT8 input quantized on compressed-tensors' grid
    (s = max|x| / 127.5, codes in [-128, 127]) instead of outlierkit's (max|x| / 127, [-127, 127])."""
    ref = copy.deepcopy(m)
    for q in ref.modules():
        if isinstance(q, QuantLinear) and isinstance(q.act_format, IntFormat):
            q.act_format = None

            def pre(mod, args):
                x = args[0]
                s = x.abs().amax(dim=-1, keepdim=True) / 127.5
                s = torch.where(s > 0, s, torch.ones_like(s))
                return (torch.clamp(torch.round(x / s), -128, 127) * s,)

            q.register_forward_pre_hook(pre)
    return ref


def test_w8a8_dynamic_round_trip_matches_the_engine_grid(llama, batches, tok, tmp_path):
    m, _ = _quantized(llama, batches, weight="int8-channel", act="int8-token", steps=[SPIKE_FP8])
    export_compressed_tensors(m, tok, tmp_path)
    from transformers import AutoModelForCausalLM

    hf = _logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), batches)
    ref = _logits(_ct_grid_reference(m), batches)
    ours = _logits(m, batches)
    err = float((hf - ref).abs().max())
    assert err < 1e-3 * float(ref.abs().max())
    # and the grids really differ (so the reference above is what makes the comparison exact)
    assert float((hf - ours).abs().max()) > 100 * err


def test_static_per_tensor_scales_are_ours(llama, batches, tok, tmp_path):
    m, _ = _quantized(llama, batches, weight="int8-channel", act="int8-static", steps=["rtn"])
    export_compressed_tensors(m, tok, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    (group,) = cfg["config_groups"].values()
    assert group["input_activations"]["dynamic"] is False and group["input_activations"]["strategy"] == "tensor"
    from transformers import AutoModelForCausalLM

    hf = _logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), batches)
    ours, f = _logits(m, batches), _logits(llama, batches)
    # identical grids on the calibration range (the batches calibrated it): only float rounding differs
    assert float((hf - ours).abs().max()) < 0.01 * float((ours - f).abs().max())


def test_unexportable_models_say_why(llama, batches, tok, tmp_path):
    m, _ = _quantized(llama, batches, weight="int8-channel", act="int8-tensor",
                      steps=[{"spike_mp": {"select": "topk", "top_k": 1, "keep": "fp8-e5m2"}}])
    with pytest.raises(ConfigError, match="E4M3"):
        export_compressed_tensors(m, tok, tmp_path / "a")
    from outlierkit.llm.methods import QuantContext
    from outlierkit.llm.methods.llm_int8 import LLMInt8
    from outlierkit.llm.methods.rtn import RTN

    m = copy.deepcopy(llama)
    LLMInt8().apply(m, QuantContext([]))
    with pytest.raises(ConfigError, match="LLM.int8"):
        export_compressed_tensors(m, tok, tmp_path / "b")
    g = tiny_model("gpt2")
    RTN().apply(g, QuantContext([], IntFormat(8, granularity="channel"), IntFormat(8, granularity="token")))
    with pytest.raises(ConfigError, match="Conv1D"):
        export_compressed_tensors(g, tok, tmp_path / "c")
    with pytest.raises(ConfigError, match="no quantized layer"):
        export_compressed_tensors(copy.deepcopy(llama), tok, tmp_path / "d")
