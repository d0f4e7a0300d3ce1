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
    return _ppl_stats(*window_nll(model, tokenizer, documents, window=window, max_windows=max_windows))


def _ppl_stats(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Perplexity with its 95% bootstrap interval over windows, mean NLL and token count."""
    nll, n = float(sums.sum()), float(counts.sum())
    lo, hi = bootstrap_ratio(sums, counts)
    return {"ppl": math.exp(nll / n), "ppl_lo": math.exp(lo), "ppl_hi": math.exp(hi), "nll": nll / n,
            "eval_tokens": n}


@torch.no_grad()
def window_nll(model: nn.Module, tokenizer: Any, documents: Sequence[Document], *, window: int = 128,
               max_windows: int | None = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window of the perplexity protocol: summed token NLL and the number of predicted tokens (float64)."""
    from outlierkit.llm.sequential import forward_each

    windows = list(iter_text_windows(tokenizer, documents, window=window, max_windows=max_windows))
    sums: list[float] = []

    def nll(j: int, out: Any) -> None:
        logits = out.logits.float()  # (1, T, V)
        ids = windows[j]
        sums.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:].to(logits.device),
                                                            reduction="sum")))

    forward_each(model, [{"input_ids": ids[None]} for ids in windows], nll)
    counts = [ids.numel() - 1 for ids in windows]
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def paired_ppl_ratio(nll: torch.Tensor, ref_nll: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """ppl / ppl_ref - 1 on the same windows, with a paired 95% bootstrap interval (windows resampled together).

    The per-model perplexity intervals overlap whenever windows differ in difficulty more than models differ;
    the paired difference of NLL per window removes that shared variation.
    """
    diff = nll - ref_nll
    lo, hi = bootstrap_ratio(diff, counts)
    mid = float(diff.sum() / counts.sum())
    return {"ppl_rel": math.expm1(mid), "ppl_rel_lo": math.expm1(lo), "ppl_rel_hi": math.expm1(hi)}


# ----------------------------------------------------------------------------------- confidence intervals

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95% by default); well-behaved at small n and at 0 or 1."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def bootstrap_ratio(num: torch.Tensor, den: torch.Tensor, *, n_boot: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den) resampling whole units (samples, windows).

    Resampling units rather than tokens keeps the interval honest when tokens of one sample are correlated.
    Shapes: num, den: (N,) per unit.
    """
    num, den = num.double().flatten(), den.double().flatten()
    if num.numel() < 2:
        v = float(num.sum() / den.sum().clamp(min=1e-300))
        return v, v
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, num.numel(), (n_boot, num.numel()), generator=g)  # (n_boot, N)
    ratios = num[idx].sum(1) / den[idx].sum(1).clamp(min=1e-300)
    a = (1 - level) / 2
    q = torch.quantile(ratios, torch.tensor([a, 1 - a], dtype=torch.float64))
    return float(q[0]), float(q[1])


@torch.no_grad()
def embeddings(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens (sentence-transformers' pooling), (N, C)."""
    from outlierkit.llm.sequential import forward_each

    out: list[torch.Tensor] = []

    def pool(j: int, output: Any) -> None:
        h = first_tensor(output)
        assert h is not None
        m = batches[j].attention_mask.to(h.device)[..., None].float()  # (B, T, 1)
        out.append(((h.float() * m).sum(1) / m.sum(1).clamp(min=1)).cpu())  # (B, C)

    forward_each(model, batches, pool)
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

    n = ref.shape[0]
    hits = int((nn_index(ref) == nn_index(test)).sum()) if n > 1 else n
    lo, hi = wilson(hits, n)  # each sample's nearest neighbour either agrees or not: a proportion of n
    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()), "top1_agree": hits / max(n, 1),
            "top1_agree_lo": lo, "top1_agree_hi": hi, "emb_sqnr_db": sqnr_db(ref, test)}


@torch.no_grad()
def token_agreement(model: nn.Module, ref_logits: list[torch.Tensor], batches: list[Batch]) -> dict[str, float]:
    """Causal LMs: share of real tokens whose argmax next-token prediction matches the float model's."""
    from outlierkit.llm.recipe import model_outputs, output_sqnr

    test = model_outputs(model, batches)
    hits, counts = [], []  # per sample: tokens of one sample are correlated, so the interval resamples samples
    for r, t, b in zip(ref_logits, test, batches, strict=True):
        m = b.attention_mask.bool()
        hits.append(((r.argmax(-1) == t.argmax(-1)) & m).sum(-1))  # (B,)
        counts.append(m.sum(-1))
    h, c = torch.cat(hits).double(), torch.cat(counts).double()
    lo, hi = bootstrap_ratio(h, c)
    return {"top1_agree": float(h.sum() / c.sum().clamp(min=1)), "top1_agree_lo": lo, "top1_agree_hi": hi,
            "logit_sqnr_db": output_sqnr(ref_logits, test, batches)}


@dataclass
class EvalData:
    """Held-out data shared by every model evaluated in one comparison."""

    batches: list[Batch]
    documents: Sequence[Document]
    causal: bool
    window: int = 128
    max_windows: int | None = 32
    reference: torch.Tensor | list[torch.Tensor] | None = None  # float embeddings or logits
    reference_nll: torch.Tensor | None = None  # per-window NLL of the float model (causal)


@torch.no_grad()
def evaluate_model(model: nn.Module, tokenizer: Any, data: EvalData) -> dict[str, float]:
    """Perplexity + token agreement (causal LMs) or embedding fidelity (encoders) against ``data.reference``."""
    from outlierkit.llm.recipe import model_outputs

    if data.causal:
        sums, counts = window_nll(model, tokenizer, data.documents, window=data.window, max_windows=data.max_windows)
        out = _ppl_stats(sums, counts)
        if data.reference_nll is None:  # the first model evaluated is the reference (as for the logits)
            data.reference_nll = sums
        out.update(paired_ppl_ratio(sums, data.reference_nll, counts))
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


@dataclass(frozen=True)
class Protocol:
    """The one evaluation protocol shared by ``eval``, ``compare``, ``plan`` and ``quantize``, so that the same
    recipe gives the same numbers whichever command measures it.

    Documents are split once (:func:`split_documents`): even-indexed documents calibrate, odd-indexed ones
    are held out. Calibration draws ``calib_samples`` samples with ``calib_seed`` (the recipe's
    ``calib.samples`` / ``calib.seed`` defaults); evaluation draws ``samples`` with ``seed``; both cut at
    ``seq_len`` tokens, in batches of ``batch_size`` (per-tensor dynamic activation ranges depend on the
    batch, so it is part of the protocol); perplexity uses ``max_windows`` windows of ``seq_len`` tokens.
    """

    samples: int = 64
    seq_len: int = 128
    batch_size: int = 8
    max_windows: int = 32
    seed: int = 1
    calib_samples: int = 32
    calib_seed: int = 0


PROTOCOL = Protocol()


def held_out(documents: Sequence[Document]) -> list[Document]:
    """The evaluation half of the protocol's split."""
    return split_documents(documents)[1]


def calibration_half(documents: Sequence[Document]) -> list[Document]:
    """The calibration half of the protocol's split (all documents when there is only one)."""
    return list(documents) if len(documents) < 2 else split_documents(documents)[0]


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
    calib_samples: int | None = None,
    eval_samples: int = PROTOCOL.samples,
    seq_len: int | None = None,
    batch_size: int = PROTOCOL.batch_size,
    seed: int = PROTOCOL.seed,
    calib_seed: int | None = None,
    max_windows: int | None = PROTOCOL.max_windows,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Quantize fresh copies of one model with each recipe and evaluate all on the same held-out data.

    The protocol is :data:`PROTOCOL`, the one ``quantize`` + ``eval`` use: each recipe calibrates as
    ``quantize`` would (its ``calib`` settings on the calibration half of the documents) and every model is
    evaluated as ``eval`` would (``eval_samples`` held-out samples drawn with ``seed``).

    Args:
        source: model directory / cached hub name / ``"minilm"`` (default; the bundled MiniLM).
        recipes: recipe files, preset names (default: fp32, w8a8-rtn, w8a8-smoothquant, w8a8-osplus),
            mappings or :class:`~outlierkit.llm.recipe.Recipe` objects.
        data: text files/dirs (default: the built-in corpus), split into calibration / held-out halves.
        calib_samples / calib_seed: override every recipe's ``calib.samples`` / ``calib.seed``.
        seq_len: tokens per sample for evaluation and calibration (default: 128 for evaluation, the
            recipe's ``calib.seq_len`` for calibration).
        model / tokenizer: an already loaded float model (copied per recipe) instead of ``source``.

    Returns one row per recipe: ``recipe``, formats, quality metrics (encoders: ``cos_mean``,
    ``top1_agree`` with its 95% Wilson interval, ``emb_sqnr_db``; causal LMs: ``ppl`` and ``top1_agree``
    with 95% bootstrap intervals over windows / samples, ``logit_sqnr_db``), ``output_sqnr_db`` on
    calibration data, ``layer_sqnr_db_min``, ``max_in_absmax`` (largest input magnitude any quantized layer
    sees: what the transforms tame) and ``quantize_s``.
    """
    import copy
    import dataclasses
    import time

    from outlierkit._utils import log
    from outlierkit._utils.seed import seed_everything
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.models import resolve
    from outlierkit.llm.recipe import load_recipe, quantize_

    seed_everything(seed)
    if model is None:
        from outlierkit.llm.models import load_model

        log(f"compare: loading {source}")
        lm = load_model(source)
        model, tokenizer = lm.model, lm.tokenizer
    mm = resolve(model, warn=False)
    docs = load_documents(data)
    calib_docs, held_docs = split_documents(docs)
    max_len = getattr(model.config, "max_position_embeddings", None)  # type: ignore[union-attr]
    eval_len = seq_len or PROTOCOL.seq_len
    held = build_corpus(tokenizer, held_docs, samples=eval_samples, seq_len=eval_len, seed=seed,
                        max_length=max_len)
    ev = EvalData(held.batches(batch_size), held_docs, causal=mm.spec.causal, window=eval_len,
                  max_windows=max_windows)
    log(f"compare: float reference on {len(held)} held-out samples")
    evaluate_model(model, tokenizer, ev)  # fills the float reference
    rows = []
    calib_cache: dict[Any, Any] = {}
    specs = list(recipes)
    for i, spec in enumerate(specs, 1):
        recipe = load_recipe(spec)
        changes = {k: v for k, v in (("samples", calib_samples), ("seed", calib_seed), ("seq_len", seq_len))
                   if v is not None}
        recipe.calib = dataclasses.replace(recipe.calib, **changes)
        c = recipe.calib
        key = (c.samples, c.seq_len, c.seed)
        if key not in calib_cache:
            calib_cache[key] = build_corpus(tokenizer, calib_docs, samples=c.samples, seq_len=c.seq_len,
                                            seed=c.seed, max_length=max_len)
        log(f"compare: recipe {i}/{len(specs)} {recipe.name} ({'+'.join(s.method for s in recipe.steps)})")
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        # on the grid `quantize` uses (the recipe's target, else transformers), so `eval --quantized` agrees
        rep = quantize_(m, recipe, calib_cache[key], baseline=False, target=recipe.target or "transformers")
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
        log(f"compare: {recipe.name} done in {dt:.1f} s (top-1 agreement {row.get('top1_agree', 0):.3f})")
        rows.append(row)
        del m
    return rows
