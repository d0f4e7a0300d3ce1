"""Train a small LLaMA-architecture causal LM on offline text (the built-in corpus plus any text files).

The LLM claims (SmoothQuant, OS+, spike-aware mixed precision, GPTQ, rotation) need a trained causal LM to be
measured by perplexity: random-weight fixtures carry no signal and MiniLM is an encoder. This module trains one
in about half an hour of CPU, with the libraries of the field (a byte-level BPE from ``tokenizers``, the model is
transformers' ``LlamaForCausalLM``), and saves a regular Hugging Face directory that every outlierkit command
loads. What is written by hand: the training loop (a plain AdamW/cosine loop; a ``Trainer`` would add an
accelerate dependency and a dataset layer for what is 30 lines here).

Split: every source is cut into documents and split by the evaluation protocol
(:func:`outlierkit.llm.evaluate.split_documents`): the model trains only on the calibration half of each source,
so ``outlierkit eval`` (which scores the held-out half) measures text the model never saw (training documents
identical to a held-out one are dropped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierkit._utils.train import optimizer_step, warmup_cosine
from outlierkit.errors import ConfigError
from outlierkit.llm.corpus import Document

SPECIALS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS, EOS, PAD = 0, 1, 2


@dataclass
class LMConfig:
    """Model and training settings; every field is recorded in the saved model's ``outlierkit_train.json``."""

    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 6
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 768  # LLaMA rule: 8/3 x hidden rounded up to a multiple of 256 (g128-divisible)
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1500
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip: float = 1.0
    seed: int = 0
    threads: int = 2
    val_frac: float = 0.02
    keep_best: bool = False  # keep the weights of the lowest validation loss (checked at every log step)
    data: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ConfigError(f"hidden {self.hidden} must divide by heads {self.heads}, and heads by kv_heads "
                              f"{self.kv_heads}")
        if min(self.vocab_size - len(SPECIALS), self.layers, self.seq_len - 1, self.batch_size, self.steps,
               self.intermediate) < 1:
            raise ConfigError("vocab_size > 3, and layers, seq_len > 1, batch_size, steps, intermediate >= 1")
        if not 0 < self.lr < 1 or not 0 <= self.min_lr_frac <= 1 or self.warmup < 0 or not 0 < self.val_frac < 0.5:
            raise ConfigError("need 0 < lr < 1, 0 <= min_lr_frac <= 1, warmup >= 0, 0 < val_frac < 0.5")


def training_documents(data: Sequence[str] | None) -> tuple[list[Document], list[Document]]:
    """(train, held-out) documents: the built-in corpus plus ``data``, each source split by the eval protocol."""
    from outlierkit.llm.corpus import default_documents, load_documents
    from outlierkit.llm.evaluate import split_documents

    train: list[Document] = []
    test: list[Document] = []
    sources = [default_documents()] + [load_documents([p]) for p in (data or [])]
    for docs in sources:
        a, b = split_documents(docs)
        train += a
        test += b
    # The built-in corpus repeats some text under two names (pydoc topics "identifiers" / "id-classes", ...):
    # a training document identical to a held-out one would leak it, so it is dropped from training.
    held = {d.text for d in test}
    return [d for d in train if d.text not in held], test


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2/LLaMA-3 style: no unknown tokens) trained on ``texts``; adds ``<s>`` in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=1 << 30)


def token_stream(tokenizer: Any, docs: Sequence[Document]) -> torch.Tensor:
    """All documents as one stream, each as ``<s> text </s>`` (int32 to halve its memory)."""
    ids: list[int] = []
    enc = tokenizer(list(d.text for d in docs), add_special_tokens=True)["input_ids"]
    for row in enc:
        ids += row
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.int32)


def build_model(cfg: LMConfig) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(512, cfg.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, attention_bias=False, mlp_bias=False,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(conf)


def _windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    idx = starts[:, None] + torch.arange(length)[None]
    return stream[idx].long()


@torch.no_grad()
def _mean_loss(model: nn.Module, stream: torch.Tensor, seq_len: int, batch: int, max_windows: int = 64) -> float:
    n = min(max_windows, (stream.numel() - 1) // seq_len)
    if n == 0:
        return float("nan")
    starts = torch.arange(n) * seq_len
    total = 0.0
    for i in range(0, n, batch):
        x = _windows(stream, starts[i:i + batch], seq_len + 1)
        logits = model(input_ids=x[:, :-1]).logits
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
    return total / (n * seq_len)


def train_lm(cfg: LMConfig, on_log: Callable[[dict[str, float]], None] | None = None,
             log_every: int = 100, documents: tuple[list[Document], list[Document]] | None = None,
             ) -> tuple[nn.Module, Any, list[dict[str, float]], dict[str, Any]]:
    """Train the tokenizer and the model; returns (model in eval mode, tokenizer, loss log, data summary).

    ``documents``: the (train, held-out) split of :func:`training_documents` when the caller already has it
    (default: built from ``cfg.data``)."""
    cfg.check()
    torch.set_num_threads(cfg.threads)
    train_docs, test_docs = documents if documents is not None else training_documents(cfg.data)
    tokenizer = train_tokenizer([d.text for d in train_docs], cfg.vocab_size)
    stream = token_stream(tokenizer, train_docs)
    n_val = max(cfg.seq_len + 1, int(stream.numel() * cfg.val_frac))
    train, val = stream[:-n_val], stream[-n_val:]  # the validation slice is never trained on
    if train.numel() <= cfg.seq_len + 1:
        raise ConfigError(f"only {train.numel()} training tokens; pass more text with --data")
    model = build_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_frac))
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, torch.Tensor] | None] = (float("inf"), 0, None)
    running, t0 = 0.0, time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        starts = torch.randint(0, train.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        x = _windows(train, starts, cfg.seq_len + 1)
        logits = model(input_ids=x[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        running += optimizer_step(loss, opt, sched, model.parameters(), cfg.clip)
        if (step + 1) % log_every == 0 or step + 1 == cfg.steps:
            model.eval()
            row = {"step": step + 1, "loss": running / ((step % log_every) + 1),
                   "val_loss": _mean_loss(model, val, cfg.seq_len, cfg.batch_size),
                   "seconds": time.perf_counter() - t0}
            model.train()
            if cfg.keep_best and row["val_loss"] < best[0]:  # early stopping without stopping: a copy of the best
                best = (row["val_loss"], step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            history.append(row)
            running = 0.0
            if on_log is not None:
                on_log(row)
    model.eval()
    summary: dict[str, Any] = {"train_documents": len(train_docs), "heldout_documents": len(test_docs),
                               "train_tokens": int(train.numel()), "val_tokens": int(val.numel()),
                               "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
                               "params": sum(p.numel() for p in model.parameters())}
    if cfg.keep_best and best[2] is not None:
        model.load_state_dict(best[2])
        summary.update({"kept_step": best[1], "kept_val_loss": best[0]})
    return model, tokenizer, history, summary


def save_lm(model: nn.Module, tokenizer: Any, out_dir: str | Path, cfg: LMConfig, meta: dict[str, Any],
            dtype: torch.dtype = torch.bfloat16) -> Path:
    """A regular Hugging Face directory (weights in ``dtype``; bf16 halves the bundle) plus the training record."""
    import json

    from transformers.utils import logging as hf_logging

    from outlierkit._utils import atomic_write_text

    hf_logging.disable_progress_bar()  # outlierkit logs its own stages
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # weights cast on the way out (the model itself is left as it is: casting it would also round the rotary
    # inv_freq buffer)
    cast: dict[int, torch.Tensor] = {}  # tied tensors (embedding = LM head) stay one tensor, saved once
    state = {k: cast.setdefault(v.data_ptr(), v.detach().to(dtype)) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)  # type: ignore[operator]
    tokenizer.save_pretrained(out)
    atomic_write_text(out / "outlierkit_train.json",
                      json.dumps({"config": asdict(cfg), **meta}, indent=2, default=str) + "\n")
    return out
