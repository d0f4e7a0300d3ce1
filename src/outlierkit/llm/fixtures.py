"""Tiny models of every family in the architecture table, built from configs, with planted outliers.

Used by the tests, benchmarks and examples (no model can be downloaded here). The tokenizer is the real
WordPiece tokenizer of the bundled MiniLM, so tiny models read real text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierkit.llm.models import get_attr, has_attr, is_fused_experts, linear_weight, resolve

VOCAB = 30522  # MiniLM's WordPiece vocabulary
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=101, eos_token_id=102)
_MOE = dict(num_experts_per_tok=2)

# family -> (config.model_type, config overrides)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16}),
    "gemma3_text": ("gemma3_text", {"head_dim": 16}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "phi3": ("phi3", {}),
    "mixtral": ("mixtral", {"num_local_experts": 4, **_MOE}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 64, **_MOE}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "moe_intermediate_size": 32, "head_dim": 16, **_MOE}),
    "olmoe": ("olmoe", {"num_experts": 4, **_MOE}),
    "opt": ("opt", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0,
                        bos_token_id=101, eos_token_id=102)),
    "bloom": ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB, pad_token_id=0,
                            bos_token_id=101, eos_token_id=102)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256, bos_token_id=101,
                          eos_token_id=102)),
    "bert": ("bert", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=VOCAB, max_position_embeddings=256)),
}
_NON_LLAMA = {"opt", "bloom", "gpt2", "bert"}
OUTLIER_CHANNELS = (5, 17)


def tiny_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    model_type, extra = FAMILIES[family]
    kw: dict[str, Any] = {} if family in _NON_LLAMA else dict(_DECODER)
    kw.update(extra)
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(family: str, *, seed: int = 0, plant: bool = True, **overrides: Any) -> nn.Module:
    """A randomly initialised 2-layer, hidden-64 model of ``family`` (with an LM head unless BERT)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(cfg)
    model.eval()
    if plant:
        plant_outliers(model)
    return model


@torch.no_grad()
def plant_outliers(model: nn.Module, channels: tuple[int, ...] = OUTLIER_CHANNELS, norm_scale: float = 25.0,
                   spike_scale: float = 60.0) -> None:
    """Plant the two outlier kinds seen in real LLMs.

    * outlier *channels* in the inputs of the projections after each norm (norm weight x ``norm_scale``
      on ``channels``, plus an offset in LayerNorm biases: the asymmetry OS+ shifting removes);
    * a residual *spike* (massive activation): layer 0's down projection writes ``spike_scale`` x larger
      values into ``channels[0]`` of the residual stream.
    """
    mm = resolve(model, warn=False)
    idx = torch.tensor(channels)
    norms = {g.prev for g in mm.spec.folds if g.kind == "norm"} or {"input_layernorm", "post_attention_layernorm"}
    if mm.spec.post_ln:
        norms = {"attention.output.LayerNorm", "output.LayerNorm"}
    for i in range(len(mm.layers)):
        for rel in norms:
            path = mm.fqn(i, rel)
            if not has_attr(model, path):
                continue
            norm = get_attr(model, path)
            w = getattr(norm, "weight", None)
            if w is None:  # OLMo's non-parametric LayerNorm
                continue
            # Gemma's RMSNorm multiplies by (1 + weight): plant on the effective scale.
            if type(norm).__name__.startswith("Gemma"):
                w[idx] = (1 + w[idx]) * norm_scale - 1
            else:
                w[idx] = w[idx] * norm_scale
            if getattr(norm, "bias", None) is not None:
                norm.bias[idx] += torch.tensor([3.0, -2.0][: len(idx)]) * norm_scale / 5
    down = mm.spec.down
    if down and has_attr(model, mm.fqn(0, down)):
        w = linear_weight(get_attr(model, mm.fqn(0, down)))  # (out, in) view
        w[channels[0]] *= spike_scale
    elif mm.spec.experts and has_attr(model, mm.fqn(0, mm.spec.experts)):
        ex = get_attr(model, mm.fqn(0, mm.spec.experts))
        if is_fused_experts(ex):
            ex.down_proj[:, channels[0], :] *= spike_scale


def tokenizer() -> Any:
    """The bundled MiniLM tokenizer (real WordPiece, vocab 30522), loaded offline."""
    from transformers import AutoTokenizer

    from outlierkit.llm.models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


def save_tiny(directory: str | Path, family: str, *, seed: int = 0, plant: bool = True) -> Path:
    """Save a tiny model + tokenizer as a regular HF model directory (loadable by ``load_model``)."""
    d = Path(directory)
    model = tiny_model(family, seed=seed, plant=plant)
    model.save_pretrained(d)  # type: ignore[operator]
    tokenizer().save_pretrained(d)
    return d
