"""Export a quantized model in the compressed-tensors format (vLLM, transformers, llm-compressor).

The quantized block linears are written compressed (INT weights as int8 codes + scales
[+ zero points], FP8 weights as float8_e4m3fn + scales) and described in ``config.json`` by a
``quantization_config`` with one config group per distinct (weight, input activation) scheme, the
group's layers named exactly, and an ``ignore`` list of every ``nn.Linear`` kept in high precision
(spike layers, the LM head). With INT and FP8 groups together the format is ``mixed-precision``
(quant-anchors 5: "a spike-aware mixed INT8 + FP16/FP8 model is expressible as a mixed-precision format
config"). Weights are stored on outlierkit's grids exactly; activations are quantized by the serving
engine at run time with *its* grid (see :func:`export_compressed_tensors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierkit._utils import atomic_write_text
from outlierkit.errors import ConfigError
from outlierkit.llm.formats import FP8_MAX, Format, FP8Format, IntFormat, fp8_fake_quant, int_qparams, weight_qparams
from outlierkit.llm.int8 import Int8Linear
from outlierkit.llm.layers import QuantLinear, set_module, unwrapped_fqn

CT_FORMAT_INT = "int-quantized"
CT_FORMAT_FP8 = "float-quantized"
CT_FORMAT_PACK = "pack-quantized"

# per exported layer: (compressed-tensors format, scheme mapping, compressed tensors)
LayerExport = tuple[str, dict[str, Any], dict[str, torch.Tensor]]


def _strategy(fmt: Format, role: str) -> str:
    g = fmt.granularity
    if role == "weights" and g == "token":
        return "channel"  # per output row of a weight
    return g


def ct_args(fmt: Format, role: str, *, where: str) -> dict[str, Any]:
    """compressed-tensors ``QuantizationArgs`` (as a dict) for an outlierkit format.

    Args:
        role: ``weights`` or ``input_activations``.
        where: layer name for error messages.
    """
    if isinstance(fmt, FP8Format):
        if fmt.fp8 != "e4m3" or not fmt.scaled:
            raise ConfigError(f"{where}: {fmt.label()} has no compressed-tensors form (serving engines take scaled "
                              "FP8 E4M3); use keep: fp8 (E4M3 with scale) or keep: float for these layers")
        return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": _strategy(fmt, role),
                "dynamic": role != "weights"}
    if fmt.granularity == "group" and role != "weights":
        raise ConfigError(f"{where}: group-wise activation quantization has no compressed-tensors form")
    args: dict[str, Any] = {"num_bits": fmt.bits, "type": "int", "symmetric": fmt.symmetric,
                            "strategy": _strategy(fmt, role), "dynamic": role != "weights" and fmt.dynamic}
    if fmt.granularity == "group":
        args["group_size"] = fmt.group_size
    if role == "weights" and not fmt.symmetric and fmt.observer != "minmax":
        raise ConfigError(f"{where}: asymmetric {fmt.observer} weights are not exported (their zero points are "
                          "not kept); use observer minmax or symmetric weights")
    return args


def _scale_shape(scale: torch.Tensor, w: torch.Tensor, fmt: Format) -> torch.Tensor:
    if fmt.granularity == "tensor":
        return scale.reshape(1)
    if fmt.granularity == "group":
        return scale.reshape(w.shape[0], -1)  # (out, in / G)
    return scale.reshape(w.shape[0], 1)  # (out, 1)


def ct_format(w_fmt: Format, a_fmt: Format | None) -> str:
    """The compressed-tensors format of a layer: ``float-quantized`` for FP8 weights, ``pack-quantized`` for
    symmetric INT weights of <= 4 bits and for symmetric weight-only INT (vLLM serves W4A16/W8A16 only
    packed), ``int-quantized`` for the rest (W8A8 INT, and asymmetric weights: compressed-tensors 0.20.1
    packs their zero points along the output dimension, which transformers 5.24 then refuses to load)."""
    if isinstance(w_fmt, FP8Format):
        return CT_FORMAT_FP8
    if w_fmt.symmetric and (w_fmt.bits <= 4 or a_fmt is None):
        return CT_FORMAT_PACK
    return CT_FORMAT_INT


@torch.no_grad()
def compress_weight(w: torch.Tensor, fmt: Format, scheme: dict[str, Any], ct_fmt: str,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Compressed tensors of one weight (out, in), written by compressed-tensors' own compressor for
    ``ct_fmt`` from outlierkit's grid (:func:`~outlierkit.llm.formats.weight_qparams`: the codes and
    scales the fake-quantized model computes with), so the reloaded weight is bit-identical.

    ``dtype``: the dtype of the scales (the model's float dtype).
    """
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    qscheme = QuantizationScheme.model_validate({"targets": ["Linear"], **scheme})
    if isinstance(fmt, FP8Format):
        w_hat = fp8_fake_quant(w.float(), fmt)
        r = w.float() if fmt.granularity == "tensor" else w.float().reshape(w.shape[0], -1)
        amax = (r.abs().amax() if fmt.granularity == "tensor" else r.abs().amax(dim=-1, keepdim=True))
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX["e4m3"])
        sd = {"weight": w_hat.to(dtype), "weight_scale": _scale_shape(scale, w, fmt).to(dtype)}
    else:
        assert isinstance(fmt, IntFormat)
        codes, scale, zp = weight_qparams(w, fmt)
        w_hat = ((codes - zp) * scale).reshape(w.shape)
        sd = {"weight": w_hat.to(dtype), "weight_scale": _scale_shape(scale, w, fmt).to(dtype)}
        if not fmt.symmetric:  # compressed-tensors' zero points are signed: zp - 2^(b-1)
            sd["weight_zero_point"] = _scale_shape(zp - 2 ** (fmt.bits - 1), w, fmt).to(torch.int8)
    compressor = BaseCompressor.load_from_registry(ct_fmt)
    out: dict[str, torch.Tensor] = compressor.compress(sd, qscheme)
    return out


def _static_input(q: QuantLinear, fmt: IntFormat, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    lo, hi = q.act_range[0]
    if torch.isnan(lo):
        raise ConfigError(f"{q.name}: static activation range not calibrated")
    scale, zp = int_qparams(lo.reshape(1), hi.reshape(1), fmt.bits, fmt.symmetric, fmt.grid)
    out = {"input_scale": scale.to(dtype)}
    if not fmt.symmetric:
        out["input_zero_point"] = (zp - 2 ** (fmt.bits - 1)).to(torch.int8)
    return out


def _collect(model: nn.Module) -> tuple[dict[str, LayerExport], dict[str, nn.Module]]:
    """Per quantized linear: (ct format, scheme dict, compressed tensors); and the float stand-ins to save."""
    layers: dict[str, LayerExport] = {}
    standins: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, Int8Linear):
            if mod.threshold is not None:
                raise ConfigError(f"{name}: LLM.int8() outlier decomposition has no compressed-tensors form; "
                                  "export a W8A8 recipe (rtn / real_int8) instead")
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(mod.dequantized_weight())
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            standins[name] = lin
            scheme = {"weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                                  "dynamic": False},
                      "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                            "dynamic": True}}
            tensors = {"weight": mod.weight_int8.clone(), "weight_scale": mod.weight_scale.reshape(-1, 1).clone()}
            layers[name] = (CT_FORMAT_INT, scheme, tensors)
        elif isinstance(mod, QuantLinear):
            fqn = unwrapped_fqn(name)
            standins[name] = mod.inner
            if mod.is_float:
                continue
            if mod.kind != "linear":
                what = "fused MoE experts (3-D weights)" if mod.kind == "experts" else "GPT-2 Conv1D layers"
                raise ConfigError(f"{fqn}: {what} have no compressed-tensors form (serving engines expect "
                                  "nn.Linear); keep them in float with an override or export with `outlierkit "
                                  "quantize` (fake-quantization state)")
            if mod.out_format is not None:
                raise ConfigError(f"{fqn}: quantized q/k/v outputs (qkv_out) are not exported; remove qkv_out")
            w_fmt, a_fmt = mod.weight_format, mod.act_format
            scheme = {}
            w = mod.weight_matrices()[0].detach()
            dtype = w.dtype
            if w_fmt is None:
                raise ConfigError(f"{fqn}: activation-only quantization (float weights) has no compressed-tensors "
                                  "form; quantize the weights too or keep the layer float")
            scheme["weights"] = ct_args(w_fmt, "weights", where=fqn)
            if a_fmt is not None:
                scheme["input_activations"] = ct_args(a_fmt, "input_activations", where=fqn)
            fmt = ct_format(w_fmt, a_fmt)
            tensors = compress_weight(w, w_fmt, scheme, fmt, dtype)
            if isinstance(a_fmt, IntFormat) and not a_fmt.dynamic:
                tensors.update(_static_input(mod, a_fmt, dtype))
            layers[fqn] = (fmt, scheme, tensors)
    return layers, standins


def quantization_config(layers: dict[str, LayerExport], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` mapping: one config group per distinct scheme, exact layer names."""
    from compressed_tensors.quantization import QuantizationConfig

    groups: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    for fqn, (fmt, scheme, _) in layers.items():
        key = json.dumps([fmt, scheme], sort_keys=True)
        if key not in keys:
            keys[key] = f"group_{len(keys)}"
            groups[keys[key]] = {"targets": [], **scheme, "format": fmt}
        groups[keys[key]]["targets"].append(fqn)
    formats = {g["format"] for g in groups.values()}
    # Every group names its format: compressed-tensors otherwise infers one per scheme (pack-quantized
    # for weight-only INT), which would not match the tensors written here.
    top = formats.pop() if len(formats) == 1 else "mixed-precision"
    cfg = QuantizationConfig.model_validate({"config_groups": groups, "ignore": ignore, "format": top,
                                             "quantization_status": "compressed"})
    out: dict[str, Any] = cfg.model_dump(exclude_none=True, mode="json")
    return out


@torch.no_grad()
def export_compressed_tensors(model: nn.Module, tokenizer: Any, out_dir: str | Path, *,
                              recipe_yaml: str | None = None) -> dict[str, Any]:
    """Write ``model`` (after ``quantize_``) as a compressed-tensors checkpoint that transformers and vLLM load.

    Quantized ``QuantLinear`` layers (``nn.Linear`` with int or scaled-E4M3 weights) and real
    ``Int8Linear`` layers are compressed; float wrappers (spike layers kept in high precision, skipped
    layers) and the LM head go to ``ignore``. Not expressible (``ConfigError``): LLM.int8() decomposition,
    plain-cast E5M2, q/k/v output quantization, GPT-2 Conv1D and fused-expert layers, activation-only
    quantization.

    Activation grids: compressed-tensors (and vLLM) quantize dynamic INT8 inputs with s = max|x| / 127.5 on
    [-128, 127]; outlierkit's fake quantization uses s = max|x| / 127 on [-127, 127]. Weights (and static
    input scales) are identical; dynamic activations are rounded on grids that differ by 0.4 % in step.

    Returns a summary: config groups, ignore list, bytes of the weights file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers, standins = _collect(model)
    if not layers:
        raise ConfigError("the model has no quantized layer to export; run a recipe first")
    originals = {name: model.get_submodule(name) for name in standins}
    for name, m in standins.items():
        set_module(model, name, m)
    try:
        ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers)
        qcfg = quantization_config(layers, ignore)
        from outlierkit.llm.export import hf_save

        hf_save(model, out)
    finally:
        for name, m in originals.items():
            set_module(model, name, m)
    from safetensors.torch import load_file, save_file

    files = sorted(out.glob("model*.safetensors"))
    if len(files) != 1:
        raise ConfigError(f"expected one model.safetensors in {out}, found {[f.name for f in files]} (sharded "
                          "checkpoints are not supported by this exporter yet)")
    sd = load_file(files[0])
    for fqn, (_, _, tensors) in layers.items():
        if f"{fqn}.weight" not in sd:
            raise ConfigError(f"{fqn}.weight is not in the saved state dict; cannot export this model")
        del sd[f"{fqn}.weight"]  # the compressor's tensors replace it (weight, or weight_packed + weight_shape)
        for k, v in tensors.items():
            sd[f"{fqn}.{k}"] = v.contiguous()
    save_file(sd, files[0], metadata={"format": "pt"})
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["quantization_config"] = qcfg
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if recipe_yaml is not None:
        atomic_write_text(out / "recipe.yaml", recipe_yaml)
    return {"config_groups": {k: {"targets": len(g["targets"]), "format": g.get("format", qcfg["format"])}
                              for k, g in qcfg["config_groups"].items()},
            "ignore": ignore, "format": qcfg["format"], "weights_bytes": files[0].stat().st_size}


# ------------------------------------------------------------------------------------- vLLM's scheme matching

# vLLM loads these projections as one fused layer; its compressed-tensors loader requires one scheme per fused
# layer ("vLLM requires all to use the same scheme").
FUSED_SHARDS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                            ("query", "key", "value"))


def vllm_scheme(ct_fmt: str, scheme: dict[str, Any]) -> tuple[str | None, str]:
    """(vLLM scheme class, "") for a layer's compressed-tensors format and scheme, or (None, the rule it breaks).

    Restates ``CompressedTensorsConfig._get_scheme_from_parts`` (vllm/model_executor/layers/quantization/
    compressed_tensors/compressed_tensors.py) for the schemes outlierkit writes:
    W8A8 INT8 = symmetric per-channel/per-tensor INT8 weights with INT8 inputs per-token dynamic or per-tensor
    static (``int-quantized``); W8A8 FP8 = symmetric per-channel/per-tensor FP8 weights with FP8 inputs dynamic
    (per tensor or token) or static per tensor; W8A16 FP8 = FP8 weights alone; WNA16 = 4- or 8-bit INT
    weights alone, per channel or group, ``pack-quantized``; W4A8 INT = 4-bit per-channel/group INT weights
    with per-token dynamic symmetric INT8 inputs.
    """
    w, a = scheme.get("weights") or {}, scheme.get("input_activations")
    wt, wb, ws = w.get("type"), w.get("num_bits"), w.get("strategy")
    if a is None:
        if wt == "int":
            if wb in (4, 8) and ws in ("channel", "group") and ct_fmt == CT_FORMAT_PACK:
                return "CompressedTensorsWNA16", ""
            return None, ("weight-only INT must be 4 or 8 bits, per channel or group, pack-quantized (WNA16); got "
                          f"{wb}-bit {ws} {ct_fmt}")
        if wt == "float" and w.get("symmetric") and ws in ("tensor", "channel"):
            return "CompressedTensorsW8A16Fp8", ""
        return None, f"FP8 weight-only must be symmetric per tensor or channel; got {ws}"
    at, ab, ast, adyn = a.get("type"), a.get("num_bits"), a.get("strategy"), a.get("dynamic")
    if wt == "float" and at == "float":
        if not (w.get("symmetric") and ws in ("tensor", "channel") and a.get("symmetric")):
            return None, "FP8 W8A8 needs symmetric per-tensor/per-channel weights and symmetric inputs"
        if (adyn and ast in ("tensor", "token")) or (not adyn and ast == "tensor"):
            return "CompressedTensorsW8A8Fp8", ""
        return None, f"FP8 inputs must be dynamic (tensor/token) or static per tensor; got {ast}"
    if wt == "int" and at == "int" and ab == 8:
        if wb == 4 and w.get("symmetric") and ws in ("channel", "group") and adyn and ast == "token" \
                and a.get("symmetric"):
            return "CompressedTensorsW4A8Int", ""
        if wb != 8 or not w.get("symmetric") or ws not in ("channel", "tensor"):
            return None, f"INT8 W8A8 needs symmetric per-channel/per-tensor 8-bit weights; got {wb}-bit {ws}" + \
                ("" if w.get("symmetric") else " asymmetric")
        if ct_fmt not in (CT_FORMAT_INT, "naive-quantized"):
            return None, f"INT8 W8A8 is read from int-quantized checkpoints, not {ct_fmt}"
        if adyn and ast == "token":
            return "CompressedTensorsW8A8Int8 (dynamic per-token)", ""
        if not adyn and ast == "tensor":
            return "CompressedTensorsW8A8Int8 (static per-tensor)", ""
        return None, (f"INT8 inputs must be per-token dynamic or per-tensor static; got {ast} "
                      f"{'dynamic' if adyn else 'static'}")
    return None, f"no vLLM scheme for {wb}-bit {wt} weights with {ab}-bit {at} inputs"


def fused_groups(names: list[str]) -> dict[str, list[str]]:
    """Fused-layer key (parent + shard family) -> the present shard FQNs."""
    out: dict[str, list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        for fam in FUSED_SHARDS:
            if leaf in fam:
                out.setdefault(f"{parent}.{'+'.join(fam)}", []).append(n)
    return out


def vllm_problems(model: nn.Module) -> list[str]:
    """Why vLLM cannot serve ``model``'s compressed-tensors export (empty if it can), naming layers and rules."""
    layers, _ = _collect(model)
    problems = []
    for fqn, (fmt, scheme, _) in layers.items():
        cls, why = vllm_scheme(fmt, scheme)
        if cls is None:
            problems.append(f"{fqn}: {why}")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".inner" not in n]
    names = sorted({*linears, *layers, *(unwrapped_fqn(n) for n, _ in _quant_wrappers(model))})
    for key, shards in fused_groups(names).items():
        kinds = {json.dumps([layers[s][0], layers[s][1]], sort_keys=True) if s in layers else "float" for s in shards}
        if len(kinds) > 1:
            problems.append(f"{key}: fused shards {', '.join(s.rpartition('.')[2] for s in shards)} have different "
                            "schemes; vLLM loads them as one layer and requires one scheme")
    return problems


def _quant_wrappers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def recipe_vllm_problems(recipe: Any) -> list[str]:
    """vLLM's rules checked on a recipe's formats alone (default formats and each override), before any work."""
    from outlierkit.llm.methods import METHODS

    problems: list[str] = []
    combos: list[tuple[str, Format | None, Format | None]] = [("default formats", recipe.weight, recipe.act)]
    for o in recipe.overrides:
        if not o.skip:
            combos.append((f"override {o.pattern!r}", o.weight if o.set_weight else recipe.weight,
                           o.act if o.set_act else recipe.act))
    for step in recipe.steps:
        if step.method in ("llm_int8",):
            problems.append("llm_int8: the LLM.int8() outlier split has no compressed-tensors form (use "
                            "--target transformers or outlierkit)")
        keep = step.params.get("keep") if step.method == "spike_mp" else None
        if keep is not None and keep not in ("float", "bf16", "fp16"):
            from outlierkit.llm.methods.spike_mp import KEEP_FORMATS

            combos.append((f"spike_mp keep {keep}", KEEP_FORMATS.get(keep), KEEP_FORMATS.get(keep)))
        METHODS.get(step.method)
    if recipe.qkv_out is not None:
        problems.append("qkv_out: quantized q/k/v outputs have no compressed-tensors form")
    for where, w, a in combos:
        if w is None and a is None:
            continue
        if w is None:
            problems.append(f"{where}: activation-only quantization has no compressed-tensors form")
            continue
        try:
            scheme = {"weights": ct_args(w, "weights", where=where)}
            if a is not None:
                scheme["input_activations"] = ct_args(a, "input_activations", where=where)
        except ConfigError as e:
            problems.append(str(e))
            continue
        cls, why = vllm_scheme(ct_format(w, a), scheme)
        if cls is None:
            problems.append(f"{where}: {why}")
    return problems
