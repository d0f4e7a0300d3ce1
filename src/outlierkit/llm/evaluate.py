"""Evaluation: perplexity (anchors' protocol), embedding fidelity to the float model, output agreement, SQNR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from outlierkit._utils.hooks import first_tensor
from outlierkit.llm.corpus import Batch, Document, iter_text_windows


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer: Any, documents: Sequence[Document], *, window: int = 128,
               max_windows: int | None = 32) -> dict[str, float]:
    """exp(mean token NLL) over non-overlapping ``window``-token chunks of the joined text.

    The protocol of SmoothQuant / llmc (quant-anchors 2.3): text joined with blank lines, tokenized once,
    cut into non-overlapping windows; each window is scored on its own (first token has no target).
    """
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for ids in iter_text_windows(tokenizer, documents, window=window, max_windows=max_windows):
        logits = model(input_ids=ids[None].to(device)).logits.float()  # (1, T, V)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:].to(device), reduction="sum")
        nll += float(loss)
        n += ids.numel() - 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "eval_tokens": float(n)}


@torch.no_grad()
def embeddings(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens (sentence-transformers' pooling), (N, C)."""
    device = next(model.parameters()).device
    out = []
    for b in batches:
        h = first_tensor(model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device)))
        assert h is not None
        m = b.attention_mask.to(h.device)[..., None].float()  # (B, T, 1)
        out.append(((h.float() * m).sum(1) / m.sum(1).clamp(min=1)).cpu())  # (B, C)
    return torch.cat(out)


def fidelity(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Embedding fidelity: mean / min cosine of paired embeddings; top-1 retrieval agreement (each sample's
    nearest other sample is the same in both spaces); SQNR of the embeddings.

    Shapes:
        ref, test: (N, C).
    """
    from outlierkit.llm.formats import sqnr_db

    cos = torch.nn.functional.cosine_similarity(ref.double(), test.double(), dim=-1)  # (N,)

    def nn_index(e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e.double(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(-1)

    agree = (nn_index(ref) == nn_index(test)).double().mean() if ref.shape[0] > 1 else torch.tensor(1.0)
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1_agree": float(agree),
            "emb_sqnr_db": sqnr_db(ref, test)}


@torch.no_grad()
def token_agreement(model: nn.Module, ref_logits: list[torch.Tensor], batches: list[Batch]) -> dict[str, float]:
    """Causal LMs: share of real tokens whose argmax next-token prediction matches the float model's."""
    from outlierkit.llm.recipe import model_outputs, output_sqnr

    test = model_outputs(model, batches)
    hit = tot = 0
    for r, t, b in zip(ref_logits, test, batches, strict=True):
        m = b.attention_mask.bool()
        hit += int((r.argmax(-1)[m] == t.argmax(-1)[m]).sum())
        tot += int(m.sum())
    return {"top1_agree": hit / max(tot, 1), "logit_sqnr_db": output_sqnr(ref_logits, test, batches)}


@dataclass
class EvalData:
    """Held-out data shared by every model evaluated in one comparison."""

    batches: list[Batch]
    documents: Sequence[Document]
    causal: bool
    window: int = 128
    max_windows: int | None = 32
    reference: torch.Tensor | list[torch.Tensor] | None = None  # float embeddings or logits


@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer: Any, data: EvalData) -> dict[str, float]:
    """Perplexity + token agreement (causal LMs) or embedding fidelity (encoders) against ``data.reference``."""
    from outlierkit.llm.recipe import model_outputs

    if data.causal:
        out = perplexity(model, tokenizer, data.documents, window=data.window, max_windows=data.max_windows)
        if data.reference is None:
            data.reference = model_outputs(model, data.batches)
        assert isinstance(data.reference, list)
        out.update(token_agreement(model, data.reference, data.batches))
        return out
    emb = embeddings(model, data.batches)
    if data.reference is None:
        data.reference = emb
    assert isinstance(data.reference, torch.Tensor)
    return fidelity(data.reference, emb)


# ------------------------------------------------------------------------------------------ comparisons

DEMO_RECIPES: tuple[str, ...] = ("fp32", "w8a8-rtn", "w8a8-smoothquant", "w8a8-osplus")


def split_documents(documents: Sequence[Document]) -> tuple[list[Document], list[Document]]:
    """Calibration / held-out split: even-indexed documents calibrate, odd-indexed ones evaluate."""
    docs = list(documents)
    if len(docs) < 2:
        from outlierkit.errors import DataError

        raise DataError("need at least two documents (one to calibrate, one held out); pass more text")
    return docs[0::2], docs[1::2]


def compare_recipes(
    source: str = "minilm",
    recipes: Sequence[Any] = DEMO_RECIPES,
    *,
    data: Sequence[str] | None = None,
    calib_samples: int = 32,
    eval_samples: int = 64,
    seq_len: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    max_windows: int | None = 32,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Quantize fresh copies of one model with each recipe and evaluate all on the same held-out data.

    Args:
        source: model directory / cached hub name / ``"minilm"`` (default; the bundled MiniLM).
        recipes: recipe files, preset names (default: fp32, w8a8-rtn, w8a8-smoothquant, w8a8-osplus),
            mappings or :class:`~outlierkit.llm.recipe.Recipe` objects.
        data: text files/dirs (default: the built-in corpus), split into calibration / held-out halves.
        model / tokenizer: an already loaded float model (copied per recipe) instead of ``source``.

    Returns one row per recipe: ``recipe``, formats, quality metrics (encoders: ``cos_mean``,
    ``top1_agree``, ``emb_sqnr_db``; causal LMs: ``ppl``, ``top1_agree``, ``logit_sqnr_db``),
    ``output_sqnr_db`` on calibration data, ``layer_sqnr_db_min``, ``max_in_absmax`` (largest input
    magnitude any quantized layer sees: what the transforms tame) and ``quantize_s``.
    """
    import copy
    import time

    from outlierkit._utils.seed import seed_everything
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.models import resolve
    from outlierkit.llm.recipe import load_recipe, quantize_

    seed_everything(seed)
    if model is None:
        from outlierkit.llm.models import load_model

        lm = load_model(source)
        model, tokenizer = lm.model, lm.tokenizer
    mm = resolve(model, warn=False)
    calib_docs, held_docs = split_documents(load_documents(data))
    max_len = getattr(model.config, "max_position_embeddings", None)  # type: ignore[union-attr]
    calib = build_corpus(tokenizer, calib_docs, samples=calib_samples, seq_len=seq_len, seed=seed,
                         max_length=max_len)
    held = build_corpus(tokenizer, held_docs, samples=eval_samples, seq_len=seq_len, seed=seed + 1,
                        max_length=max_len)
    ev = EvalData(held.batches(batch_size), held_docs, causal=mm.spec.causal, window=seq_len,
                  max_windows=max_windows)
    evaluate_model(model, tokenizer, ev)  # fills the float reference
    rows = []
    for spec in recipes:
        recipe = load_recipe(spec)
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = quantize_(m, recipe, calib, baseline=False)
        dt = time.perf_counter() - t0
        metrics = evaluate_model(m, tokenizer, ev)
        absmax = [float(v) for r in rep.tables.get("layer_sqnr", [])
                  if isinstance(v := r.get("in_absmax"), (int, float))]
        row: dict[str, Any] = {
            "recipe": recipe.name,
            "steps": "+".join(s.method for s in recipe.steps),
            "weight": recipe.weight.label() if recipe.weight else "float",
            "act": recipe.act.label() if recipe.act else "float",
            **{k: v for k, v in metrics.items() if k not in ("nll", "eval_tokens")},
            "output_sqnr_db": rep.metrics.get("output_sqnr_db"),
            "layer_sqnr_db_min": rep.metrics.get("layer_sqnr_db_min"),
            "max_in_absmax": max(absmax) if absmax else None,
            "quantize_s": dt,
        }
        rows.append(row)
        del m
    return rows
