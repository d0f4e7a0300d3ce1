"""``rotate``: orthogonal (Hadamard) rotations folded into the weights, QuaRot-style (Ashkboos et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from outlierkit.errors import ConfigError
from outlierkit.llm.hadamard import OnlineQuantLinear, rotation
from outlierkit.llm.layers import QuantLinear, quant_layers, set_module
from outlierkit.llm.methods.base import (
    METHODS,
    LayerRecord,
    QuantContext,
    QuantMethod,
    float_module,
    in_weight,
    norm_is_offset,
    out_weight,
)
from outlierkit.llm.models import ModelMap, get_attr, has_attr, is_fused_experts

# Families (ArchSpec names) whose residual stream can be rotated exactly: pre-norm RMSNorm blocks whose
# norm outputs feed only the table's fold-group linears, and whose branches write through o_proj / down.
SUPPORTED = {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe",
             "olmoe", "llada-hf"}
REFUSED = {
    "gemma2": "Gemma-2/3 normalize the attention and MLP outputs (post_attention_layernorm, "
              "post_feedforward_layernorm) before the residual add; an RMSNorm with a weight does not commute "
              "with a rotation of its input",
    "olmo": "OLMo's LayerNorm subtracts the mean (a rotation does not commute with mean subtraction) and OLMo-2 "
            "normalizes branch outputs before the residual add",
    "opt": "LayerNorm subtracts the mean and adds a bias (QuaRot's LayerNorm -> RMSNorm conversion is not "
           "implemented)",
    "bloom": "LayerNorm subtracts the mean and adds a bias (QuaRot's LayerNorm -> RMSNorm conversion is not "
             "implemented)",
    "gpt2": "LayerNorm subtracts the mean and adds a bias (QuaRot's LayerNorm -> RMSNorm conversion is not "
            "implemented)",
    "bert": "post-LN: the LayerNorm output is the residual stream itself and LayerNorm subtracts the mean",
    "tiny-mdm": "LayerNorm subtracts the mean and adds a bias (QuaRot's LayerNorm -> RMSNorm conversion is not "
                "implemented)",
    "llada": "the remote-code LLaDA layout is not verified for rotation (its transformers port, llada-hf, is)",
}


def refusal(model: nn.Module, mm: ModelMap) -> str | None:
    """Why ``model`` cannot be rotated exactly (None if it can)."""
    if mm.generic:
        return f"model_type {mm.model_type!r} has no architecture table entry (outlierkit/llm/models.py)"
    if mm.spec.name not in SUPPORTED:
        return REFUSED.get(mm.spec.name, f"family {mm.spec.name!r} is not verified for rotation")
    out = getattr(model, "get_output_embeddings", lambda: None)()
    if out is None or not isinstance(getattr(out, "weight", None), torch.Tensor):
        return "the model has no LM head to absorb the final rotation (load it with its head)"
    return None


@METHODS.register("rotate")
@dataclass
class Rotate(QuantMethod):
    """Rotate the residual stream (QuaRot, Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated
    LLMs", NeurIPS 2024, arXiv:2404.00456; SpinQuant, Liu et al. 2024, learns the rotation instead).

    With an orthogonal Q (d, d), after absorbing every RMSNorm weight gamma into the linears that read the
    norm (W <- W diag(gamma), gamma <- 1, which RMSNorm(x Q) = RMSNorm(x) Q needs)::

        embeddings E <- E Q;  readers (q/k/v, gate/up, router, experts, LM head) W <- W Q
        writers (o_proj, down_proj, experts' down) W <- Q^T W, b <- b Q

    so every block reads and writes the rotated stream x Q and the float model is unchanged. Rotated
    activations have their outlier channels spread over all channels, which helps low-bit activation
    formats. With ``online_down: true`` the input h of each dense down projection is also rotated at run time,
    h <- h H (W_down <- W_down H): H cannot be folded (SwiGLU's product is elementwise), so the layer
    becomes an :class:`~outlierkit.llm.hadamard.OnlineQuantLinear`. vLLM and transformers do not run that
    online rotation; a model exported without it is not the same model.

    Tied embeddings are untied when the final norm's weight is absorbed into the LM head. Families where a
    fold is not exact (LayerNorm with mean subtraction, post-LN BERT, Gemma-2/3 branch norms) are refused:
    nothing is changed and the reason is reported.

    Args:
        kind: ``hadamard`` (default) or ``random`` (Haar-random orthogonal, the ablation).
        random_signs: randomized Hadamard diag(+-1) H as in QuaRot (default True).
        online_down: online Hadamard before every dense down projection (default False: the saved model
            would need it at run time, which the exporters and serving engines do not provide).
        seed: for random signs / random rotations (default 0).
    """

    kind: Literal["hadamard", "random"] = "hadamard"
    random_signs: bool = True
    online_down: bool = False
    seed: int = 0
    transform: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.kind not in ("hadamard", "random"):
            raise ConfigError(f"rotate.kind must be hadamard or random, got {self.kind!r}")

    @torch.no_grad()
    def apply(self, model: nn.Module, ctx: QuantContext) -> list[LayerRecord]:
        mm = ctx.model_map(model)
        why = refusal(model, mm)
        if why is not None:
            note = (f"rotate: refused for model_type {mm.model_type!r} (family {mm.spec.name!r}): {why}; "
                    "nothing was rotated")
            ctx.notes.append(note)
            return [LayerRecord(mm.spec.name, "rotate", {"applied": False, "note": note})]
        for name, q in quant_layers(model):
            if not q.is_float:
                raise ConfigError(f"rotate must come before rtn/gptq in the recipe; {name} is already quantized")
            if isinstance(q, OnlineQuantLinear) and q.rotation is not None:
                raise ConfigError(f"rotate was already applied ({name} has an online rotation)")
        emb = model.get_input_embeddings()  # type: ignore[operator]
        head = model.get_output_embeddings()  # type: ignore[operator]
        d = int(emb.weight.shape[1])
        Q, label = rotation(d, self.kind, self.seed, self.random_signs)
        records: list[LayerRecord] = []
        untied = False
        if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
            head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
            cfg: Any = getattr(model, "config", None)
            if cfg is not None:
                cfg.tie_word_embeddings = False
            untied = True
        # 1. absorb the norms into their readers; the residual stream's readers get W <- W Q
        readers: list[nn.Module] = [head]
        for i, g in mm.fold_groups(model):
            if g.kind != "norm":
                continue
            norm = get_attr(model, mm.fqn(i, g.prev))
            mods = [float_module(model, mm.fqn(i, n)) for n in g.linears]
            _absorb_norm(norm, mods)
            readers += mods
        if mm.final_norm is None or not has_attr(model, mm.final_norm):
            raise ConfigError(f"rotate: {mm.spec.name} has no final norm in the table")
        _absorb_norm(get_attr(model, mm.final_norm), [head])
        for mod in readers:
            w = in_weight(mod)  # (..., C) input channels last
            w.copy_((w.double() @ Q.to(w.device)).to(w.dtype))
        # 2. the stream's writers: embeddings, attention output, MLP / experts output
        emb.weight.copy_((emb.weight.double() @ Q.to(emb.weight.device)).to(emb.weight.dtype))
        writers = _writers(model, mm)
        for mod in writers:
            _rotate_output(mod, Q)
        records.append(LayerRecord(mm.spec.name, "rotate", {
            "site": "residual", "rotation": label, "dim": d, "readers": len(readers), "writers": len(writers),
            "untied_embeddings": untied}))
        # 3. online rotation of the down projections' inputs
        if self.online_down and mm.spec.down:
            for i in range(len(mm.layers)):
                fqn = mm.fqn(i, mm.spec.down)
                if not has_attr(model, fqn):
                    continue
                records.append(self._online(model, fqn))
        elif self.online_down and mm.spec.experts:
            ctx.notes.append("rotate: fused MoE experts get no online Hadamard before their down projection "
                             "(only the residual stream is rotated)")
        return records

    def _online(self, model: nn.Module, fqn: str) -> LayerRecord:
        mod = get_attr(model, fqn)
        inner = mod.inner if isinstance(mod, QuantLinear) else mod
        w = out_weight(inner)  # (out, in)
        n = int(w.shape[1])
        H, label = rotation(n, self.kind, self.seed + 1, self.random_signs)
        w.copy_((w.double() @ H.to(w.device)).to(w.dtype))
        ql = OnlineQuantLinear(inner, rotation=H.to(w.dtype).to(w.device), name=fqn)
        ql.rotation_label = label
        set_module(model, fqn, ql)
        return LayerRecord(fqn, "rotate", {"site": "online down input", "rotation": label, "dim": n,
                                           "serving": "online rotation: vLLM/transformers do not run it"})


def _absorb_norm(norm: nn.Module, readers: list[nn.Module]) -> None:
    """W <- W diag(gamma) for every reader, gamma <- 1 (Gemma: weight <- 0, it multiplies by 1 + weight)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return
    if getattr(norm, "bias", None) is not None:
        raise ConfigError(f"rotate: {type(norm).__name__} has a bias; a rotation cannot absorb it")
    gamma = (1 + weight.double()) if norm_is_offset(norm) else weight.double()
    for mod in readers:
        w = in_weight(mod)
        w.copy_((w.double() * gamma.to(w.device)).to(w.dtype))
    weight.fill_(0.0 if norm_is_offset(norm) else 1.0)


def _writers(model: nn.Module, mm: ModelMap) -> list[nn.Module]:
    """Modules whose output is added to the residual stream: attention output and MLP/experts output."""
    rels: list[str] = [n for g in mm.spec.folds if g.kind == "attn_v" for n in g.linears]
    if mm.spec.down:
        rels.append(mm.spec.down)
    if mm.spec.experts:
        rels += [mm.spec.experts, "mlp.shared_expert.down_proj"]
    out = []
    for i in range(len(mm.layers)):
        for rel in dict.fromkeys(rels):
            if has_attr(model, mm.fqn(i, rel)):
                out.append(float_module(model, mm.fqn(i, rel)))
    return out


def _rotate_output(mod: nn.Module, Q: torch.Tensor) -> None:
    """y <- y Q for the module's output: W <- Q^T W (rows), b <- b Q."""
    if is_fused_experts(mod):
        w: torch.Tensor = getattr(mod, "down_proj")  # noqa: B009  (E, C, I)
        w.copy_((Q.t().to(w.device) @ w.double()).to(w.dtype))
        b = getattr(mod, "down_proj_bias", None)
    else:
        w = out_weight(mod)  # (out, in)
        w.copy_((Q.t().to(w.device) @ w.double()).to(w.dtype))
        b = getattr(mod, "bias", None)
    if isinstance(b, torch.Tensor):
        b.copy_((b.double() @ Q.to(b.device)).to(b.dtype))
