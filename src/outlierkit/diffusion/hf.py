"""Load a LLaDA/Dream-style masked-diffusion model (or any masked LM) from a local directory, offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from outlierkit.diffusion.sampler import TokenSpec
from outlierkit.errors import ConfigError, ModelLoadError

#: Mask tokens by name, tried when the tokenizer has no ``mask_token`` (LLaDA ``<|mdm_mask|>``, Dream ``<|mask|>``).
MASK_TOKEN_NAMES: tuple[str, ...] = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")
EOT_TOKEN_NAMES: tuple[str, ...] = ("<|eot_id|>", "<|im_end|>")
#: Families whose logits must be shifted right by one (AR-initialised: token i predicted at i-1).
SHIFTED_FAMILIES: tuple[str, ...] = ("dream",)


@dataclass
class LoadedModel:
    """A denoiser with its tokenizer and token ids.

    Args:
        model: the torch module (``model(input_ids, attention_mask=...).logits``).
        tokenizer: the Hugging Face tokenizer.
        tokens: mask / eos / eot / pad ids.
        max_context: the context length from the config, if it names one.
        model_type: ``config.model_type``.
        shift_logits: whether sampling should shift logits right by one (Dream).
    """

    model: Any
    tokenizer: Any
    tokens: TokenSpec
    max_context: int | None
    model_type: str
    shift_logits: bool

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt text -> ids; ``chat`` applies the tokenizer's chat template with a generation prompt."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigError("--chat was given but the tokenizer has no chat template")
            msgs = [{"role": "user", "content": text}]
            out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(map(int, ids))
        return list(map(int, self.tokenizer(text)["input_ids"]))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _token_id(tokenizer: Any, names: tuple[str, ...]) -> int | None:
    vocab = tokenizer.get_vocab()
    for name in names:
        if name in vocab:
            return int(vocab[name])
    return None


def load_hf_model(
    path: str | Path,
    *,
    trust_remote_code: bool = False,
    dtype: str | None = None,
    device: str | None = "cpu",
    mask_id: int | None = None,
    shift_logits: bool | None = None,
) -> LoadedModel:
    """Load model + tokenizer from a local directory with ``local_files_only=True`` (never the network).

    Tries ``AutoModelForMaskedLM`` then ``AutoModel`` (LLaDA registers ``AutoModel`` via remote code, which
    needs ``trust_remote_code=True``; it stays off unless asked). The mask id comes from ``mask_id``, the
    tokenizer's mask token, a known mask token name, or ``config.mask_token_id``, in that order.

    Args:
        path: local model directory.
        trust_remote_code: allow the directory's own modelling code (default: False).
        dtype: ``fp32``/``bf16``/``fp16`` or None for fp32 on CPU, bf16 on GPU (default: None).
        device: ``cpu``, ``cuda`` or ``auto`` (default: ``"cpu"``).
        mask_id: override the mask id (default: None).
        shift_logits: override the Dream-style right shift (default: None: by model type).
    """
    from outlierkit._utils import resolve_device, resolve_dtype

    p = Path(path)
    if not p.is_dir():
        raise ModelLoadError(f"model directory {p} does not exist")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p} has no config.json; pass a Hugging Face model directory")
    try:
        import transformers
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        raise ModelLoadError("transformers is not installed; pip install 'outlierkit[diffusion]'") from None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    try:
        config = transformers.AutoConfig.from_pretrained(p, **kw)
    except (OSError, ValueError) as e:  # OSError: config.json is not valid JSON
        hint = "" if trust_remote_code or isinstance(e, OSError) else \
            " (if the model ships its own code, pass --trust-remote-code)"
        raise ModelLoadError(f"cannot read the config in {p}: {str(e).splitlines()[0]}{hint}") from None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(p, **kw)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from {p}: {str(e).splitlines()[0]}") from None
    model = None
    errors = []
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModel):
        try:
            model = auto.from_pretrained(p, dtype=torch_dtype, **kw)
            break
        except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # corrupt weights included
            errors.append(f"{auto.__name__}: {(str(e).strip() or type(e).__name__).splitlines()[0]}")
    if model is None:
        raise ModelLoadError(f"cannot load a model from {p}: {'; '.join(errors)}")
    model.to(dev).eval()

    mid = mask_id
    if mid is None:
        mid = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else _token_id(tokenizer, MASK_TOKEN_NAMES)
    if mid is None:
        mid = getattr(config, "mask_token_id", None)
    vocab_size = int(getattr(config, "vocab_size", 0) or len(tokenizer))
    if mid is None:
        raise ConfigError(f"the vocabulary of {p} has no mask token; pass --mask-id for this model family")
    if not 0 <= int(mid) < vocab_size:
        raise ConfigError(f"mask id {mid} is outside the vocabulary of {vocab_size} tokens")
    pad = tokenizer.pad_token_id
    if pad is not None and int(pad) == int(mid):
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id != mid else None
    tokens = TokenSpec(mask_id=int(mid), eos_id=tokenizer.eos_token_id,
                       eot_id=_token_id(tokenizer, EOT_TOKEN_NAMES), pad_id=pad)
    mtype = str(getattr(config, "model_type", "?"))
    ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "max_sequence_length", None)
    shift = shift_logits if shift_logits is not None else mtype in SHIFTED_FAMILIES
    return LoadedModel(model, tokenizer, tokens, int(ctx) if ctx else None, mtype, shift)


def hf_forward(model: Any) -> Any:
    """Wrap a HF model as a denoiser: ``f(ids, attention_mask=None) -> logits`` under ``no_grad``.

    Inputs must already be on the model's device (``decode_paths(..., device=...)`` puts them there).
    """

    @torch.no_grad()
    def f(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits

    return f
