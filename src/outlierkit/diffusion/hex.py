"""HEX: majority vote over heterogeneous semi-autoregressive block schedules, all paths batched together."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from outlierkit.diffusion.sampler import Denoiser, SamplerConfig, TokenSpec, generate, truncate_at_stop
from outlierkit.diffusion.schedules import Schedule, parse_schedules
from outlierkit.diffusion.voting import EXTRACTORS, VOTES, Ballot, VoteResult
from outlierkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class HexConfig:
    """HEX settings; defaults are the reported LLaDA-8B setting.

    Lee et al., "Test-Time Scaling in Diffusion LLMs via Hidden Semi-Autoregressive Experts",
    arXiv 2510.05040. Each schedule ``b`` (a block size) is a hidden expert; every (schedule, seed) path
    decodes the same prompt with equal ``steps``, answers are extracted, and
    ``y* = argmax_y sum_{paths} 1[extract(path) = y]`` (ties -> the smallest block; paths without an
    answer abstain). Cost = ``len(schedules) * seeds_per_block`` decodes, run as one batch.

    Args:
        schedules: block sizes or schedule names (default: ``("8", "16", "32", "64", "128")``).
        seeds_per_block: sampled paths per schedule (default: 5).
        temperature: Gumbel temperature (default: 0.9).
        gen_length: answer length (default: 256).
        steps: denoising steps, equal for every schedule (default: 128).
        cfg_scale / suppress_eos / eos_last / shift_logits: passed to :class:`SamplerConfig`.
        extractor: registered answer extractor (default: ``"gsm8k"``).
        vote: registered vote rule (default: ``"majority"``).
        seed: base seed; path seeds derive from (seed, prompt, schedule, seed index) (default: 0).
        batch_rows: rows (prompt x schedule x seed) per batched decode (default: None: chosen from
            ``max_memory`` by :func:`~outlierkit.diffusion.sampler.auto_batch_rows`, at most 256 on CPU).
        max_memory: memory budget in bytes for a batched decode (default: None: 80% of free GPU memory,
            half the available RAM on CPU).
    """

    schedules: tuple[str, ...] = ("8", "16", "32", "64", "128")
    seeds_per_block: int = 5
    temperature: float = 0.9
    gen_length: int = 256
    steps: int = 128
    cfg_scale: float = 0.0
    suppress_eos: bool = False
    eos_last: bool = False
    shift_logits: bool = False
    extractor: str = "gsm8k"
    vote: str = "majority"
    seed: int = 0
    batch_rows: int | None = None
    max_memory: int | None = None

    def __post_init__(self) -> None:
        if self.seeds_per_block < 1:
            raise ConfigError(f"seeds_per_block must be >= 1, got {self.seeds_per_block}")
        if self.batch_rows is not None and self.batch_rows < 1:
            raise ConfigError(f"batch_rows must be >= 1, got {self.batch_rows}")
        if self.max_memory is not None and self.max_memory < 1:
            raise ConfigError(f"max_memory must be positive, got {self.max_memory}")
        EXTRACTORS.get(self.extractor)
        VOTES.get(self.vote)
        self.resolved_schedules()

    def resolved_schedules(self) -> list[Schedule]:
        return parse_schedules(list(self.schedules), self.gen_length, self.steps)

    def sampler_config(self, schedule: Schedule | None = None) -> SamplerConfig:
        s = schedule or self.resolved_schedules()[0]
        return SamplerConfig(gen_length=self.gen_length, steps=self.steps, block_length=s.block_length,
                             temperature=self.temperature, remasking=s.remasking,  # type: ignore[arg-type]
                             cfg_scale=self.cfg_scale, suppress_eos=self.suppress_eos,
                             eos_last=self.eos_last, shift_logits=self.shift_logits)


def path_seed(base: int, prompt_index: int, schedule_index: int, seed_index: int) -> int:
    """Seed of one path; distinct (prompt, schedule, seed index) give independent Gumbel streams."""
    return (base * 1_000_003 + prompt_index * 10_007 + schedule_index * 101 + seed_index) % (2**62)


@dataclass
class PathRecord:
    """One decoded path: which prompt/schedule/seed, its text, extracted answer, and forward passes."""

    prompt_index: int
    schedule: str
    block_length: int
    remasking: str
    seed_index: int
    seed: int
    text: str
    answer: str | None
    nfe: int


@dataclass
class HexResult:
    """Voted answers per prompt, the vote details, and every path (for ablations and reports)."""

    answers: list[str | None]
    votes: list[VoteResult]
    paths: list[PathRecord] = field(default_factory=list)
    seconds: float = 0.0

    def paths_of(self, prompt_index: int) -> list[PathRecord]:
        return [p for p in self.paths if p.prompt_index == prompt_index]


def pad_prompts(prompts: torch.Tensor | Sequence[Sequence[int]], tokens: TokenSpec
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Left-pad prompts of different lengths with ``pad_id``; returns ids (N, P) and mask (N, P) or None."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise DataError(f"prompts must be (N, P), got shape {tuple(prompts.shape)}")
        return prompts.long(), None
    seqs = [list(map(int, p)) for p in prompts]
    if not seqs or any(len(p) == 0 for p in seqs):
        raise DataError("no prompts, or an empty prompt")
    P = max(len(p) for p in seqs)
    if all(len(p) == P for p in seqs):
        return torch.tensor(seqs, dtype=torch.long), None
    if tokens.pad_id is None:
        raise ConfigError("prompts differ in length but the token spec has no pad id")
    ids = torch.tensor([[tokens.pad_id] * (P - len(p)) + p for p in seqs], dtype=torch.long)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in seqs], dtype=torch.long)
    return ids, mask


def decode_paths(
    model: Denoiser,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    tokens: TokenSpec,
    config: HexConfig,
    decode_text: Callable[[list[int]], str],
    *,
    max_context: int | None = None,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[PathRecord]:
    """Decode every (prompt, schedule, seed) path, ``batch_rows`` rows per batched :func:`generate` call.

    Rows of one call mix prompts, block sizes and seeds: per-row block bounds and a generator per row.
    """
    ids, mask = pad_prompts(prompts, tokens)
    if device is not None:
        ids, mask = ids.to(device), (mask.to(device) if mask is not None else None)
    schedules = config.resolved_schedules()
    rows = [(i, j, s) for i in range(ids.shape[0]) for j in range(len(schedules))
            for s in range(config.seeds_per_block)]
    base = config.sampler_config(schedules[0])
    extract = EXTRACTORS.get(config.extractor)
    step = config.batch_rows or _auto_rows(model, ids, mask, tokens, config, len(rows))
    out: list[PathRecord] = []
    for lo in range(0, len(rows), step):
        chunk = rows[lo:lo + step]
        pi = torch.tensor([r[0] for r in chunk], device=ids.device)
        seeds = [path_seed(config.seed, i, j, s) for i, j, s in chunk]
        res = generate(
            model, ids[pi], tokens, base,
            attention_mask=mask[pi] if mask is not None else None,
            block_lengths=[schedules[j].block_length for _, j, _ in chunk],
            remasking=[schedules[j].remasking for _, j, _ in chunk],
            seeds=seeds, max_context=max_context,
        )
        for (i, j, s), seed, ans_ids in zip(chunk, seeds, res.answers.tolist(), strict=True):
            text = decode_text(truncate_at_stop(ans_ids, tokens))
            out.append(PathRecord(i, schedules[j].label, schedules[j].block_length, schedules[j].remasking,
                                  s, seed, text, extract(text), res.nfe))
        if on_batch is not None:
            on_batch(min(lo + step, len(rows)), len(rows))
    return out


def _auto_rows(model: Denoiser, ids: torch.Tensor, mask: torch.Tensor | None, tokens: TokenSpec,
               config: HexConfig, n_rows: int) -> int:
    """Rows per batch from the memory budget; one 1-row forward learns the vocabulary and logits dtype."""
    from outlierkit._utils.log import log
    from outlierkit.diffusion.sampler import auto_batch_rows, logits_of, memory_budget

    G = config.gen_length
    canvas = torch.cat([ids[:1], torch.full((1, G), tokens.mask_id, dtype=ids.dtype, device=ids.device)], 1)
    with torch.no_grad():
        am = None if mask is None else torch.cat([mask[:1], torch.ones(1, G, dtype=mask.dtype,
                                                                       device=mask.device)], 1)
        probe = logits_of(model(canvas, attention_mask=am) if am is not None else model(canvas))
    V, nbytes = probe.shape[-1], probe.element_size()
    budget = config.max_memory if config.max_memory is not None else memory_budget(ids.device)
    rows = auto_batch_rows(canvas.shape[1], V, nbytes, device=ids.device, cfg=config.cfg_scale > 0,
                           max_memory=budget)
    if n_rows > rows:
        log(f"{rows} rows per batch (memory budget {budget / 2**30:.1f} GiB, {canvas.shape[1]} positions x "
            f"{V} tokens per row)")
    return rows


def vote_paths(paths: Sequence[PathRecord], n_prompts: int, vote: str = "majority") -> list[VoteResult]:
    """Vote per prompt over its paths (order = position in ``paths``)."""
    rule = VOTES.get(vote)
    ballots: list[list[Ballot]] = [[] for _ in range(n_prompts)]
    for k, p in enumerate(paths):
        ballots[p.prompt_index].append(Ballot(p.answer, p.block_length, k))
    return [rule(b) for b in ballots]


def hex_generate(
    model: Denoiser,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    tokens: TokenSpec,
    config: HexConfig,
    decode_text: Callable[[list[int]], str],
    *,
    max_context: int | None = None,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> HexResult:
    """Run HEX on ``prompts``: decode all paths batched, extract, vote.

    Shapes: prompts (N, P) tensor or N id lists (left-padded here) -> N voted answers.
    """
    t0 = time.perf_counter()
    paths = decode_paths(model, prompts, tokens, config, decode_text, max_context=max_context,
                         device=device, on_batch=on_batch)
    n = len(prompts)
    votes = vote_paths(paths, n, config.vote)
    return HexResult([v.answer for v in votes], votes, paths, time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------- evaluation


def paired_bootstrap(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray, n_boot: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` (accuracy points in [-1, 1]) and its paired percentile bootstrap CI."""
    x = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if x.size == 0:
        raise DataError("paired bootstrap on zero problems")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def spread_subset(n: int, k: int) -> list[int]:
    """``k`` of ``n`` indices spread evenly, ends included: (5, 3) -> [0, 2, 4]."""
    if not 1 <= k <= n:
        raise ConfigError(f"cannot pick {k} of {n} schedules")
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


@dataclass(frozen=True)
class EvalConfig:
    """What :func:`evaluate_hex` measures.

    Args:
        hex: the decode settings; ``hex.schedules`` is the pool and ``hex.seeds_per_block`` the seeds
            decoded per schedule (>= the largest HEX path count, so same-compute baselines come free).
        ks: HEX ensemble sizes k (schedules spread over the pool) (default: (3, 5)).
        seeds_per_schedule: HEX seeds per schedule s; HEX(k, s) uses k*s paths; pairs with k*s above
            ``hex.seeds_per_block`` are skipped with a warning (default: (1, 3)).
        baselines: schedules decoded greedily alongside, not part of HEX
            (default: ``("topk_margin", "random")``).
        n_boot: bootstrap resamples (default: 10000).
        dev_size: the first ``dev_size`` problems form a dev split on which the best single schedule (at
            each path budget) and the best greedy schedule are chosen; every accuracy and CI is then
            reported on the remaining problems only. 0 picks the best single in hindsight on the test
            problems themselves (optimistic for the baseline) (default: 0).
    """

    hex: HexConfig = field(default_factory=HexConfig)
    ks: tuple[int, ...] = (3, 5)
    seeds_per_schedule: tuple[int, ...] = (1, 3)
    baselines: tuple[str, ...] = ("topk_margin", "random")
    n_boot: int = 10_000
    dev_size: int = 0

    def combos(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """HEX(k, s) pairs that fit the seeds decoded per schedule, and those skipped."""
        S = self.hex.seeds_per_block
        pairs = [(k, s) for k in self.ks for s in self.seeds_per_schedule]
        return [p for p in pairs if p[0] * p[1] <= S], [p for p in pairs if p[0] * p[1] > S]

    def check(self) -> None:
        """Validate everything :func:`evaluate_hex` needs before any decoding (a one-line error if not)."""
        J = len(self.hex.resolved_schedules())
        if not self.ks or not self.seeds_per_schedule or min(*self.ks, *self.seeds_per_schedule) < 1:
            raise ConfigError(f"ks {self.ks} and seeds per schedule {self.seeds_per_schedule} must be positive")
        for k in self.ks:
            if k > J:
                raise ConfigError(f"HEX ensemble size k={k} exceeds the {J} schedules "
                                  f"{list(self.hex.schedules)}; use k <= {J}")
        combos, skipped = self.combos()
        if not combos:
            raise ConfigError(f"every HEX(k, s) in {skipped} needs k*s <= seeds decoded per schedule "
                              f"({self.hex.seeds_per_block}) for the same-compute baseline; raise seeds_per_block")
        if self.baselines:
            parse_schedules(list(self.baselines), self.hex.gen_length, self.hex.steps)
        if self.n_boot < 1:
            raise ConfigError(f"n_boot must be >= 1, got {self.n_boot}")
        if self.dev_size < 0:
            raise ConfigError(f"dev_size must be >= 0, got {self.dev_size}")


def evaluate_hex(
    model: Denoiser,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    gold: Sequence[str],
    tokens: TokenSpec,
    config: EvalConfig,
    decode_text: Callable[[list[int]], str],
    *,
    max_context: int | None = None,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> Any:
    """Accuracy of each schedule (greedy, sampled, same-compute vote), HEX(k, s), and paired CIs -> Report."""
    from outlierkit.config import to_dict
    from outlierkit.report import Report

    hc = config.hex
    n = len(gold)
    if len(prompts) != n or n == 0:
        raise DataError(f"{len(prompts)} prompts but {n} gold answers")
    if config.dev_size >= n:
        raise ConfigError(f"dev split of {config.dev_size} leaves no test problems out of {n}")
    dv, te = np.arange(config.dev_size), np.arange(config.dev_size, n)  # dev / test problem indices
    config.check()
    pool = hc.resolved_schedules()
    J, S = len(pool), hc.seeds_per_block
    combos, skipped = config.combos()
    extra = parse_schedules(list(config.baselines), hc.gen_length, hc.steps) if config.baselines else []
    gold_n = [EXTRACTORS.get(hc.extractor)(g) or g for g in gold]
    rep = Report(kind="diffusion.hex_eval", config=to_dict(config))
    if skipped:
        rep.warn(f"skipped HEX(k, s) {skipped}: k*s exceeds the {S} seeds decoded per schedule")
    t0 = time.perf_counter()
    all_scheds = pool + extra
    greedy_cfg = replace(hc, schedules=tuple(s.label for s in all_scheds), seeds_per_block=1, temperature=0.0)
    # Progress counts both stages as one run of rows: greedy (every schedule once), then sampled.
    n_greedy, total = n * len(all_scheds), n * len(all_scheds) + n * J * S

    def stage(offset: int) -> Callable[[int, int], None] | None:
        return None if on_batch is None else (lambda d, t: on_batch(offset + d, total))

    greedy = decode_paths(model, prompts, tokens, greedy_cfg, decode_text, max_context=max_context,
                          device=device, on_batch=stage(0))
    sampled_cfg = replace(hc, schedules=tuple(s.label for s in pool))
    sampled = decode_paths(model, prompts, tokens, sampled_cfg, decode_text, max_context=max_context,
                           device=device, on_batch=stage(n_greedy))
    rep.metrics["decode_seconds"] = time.perf_counter() - t0
    labels = [s.label for s in all_scheds]
    # ans[i][j][s]: answer of prompt i, schedule j, seed s
    ans: list[list[list[str | None]]] = [[[None] * S for _ in labels] for _ in range(n)]
    blk = {s.label: s.block_length for s in all_scheds}
    for p in sampled:
        ans[p.prompt_index][labels.index(p.schedule)][p.seed_index] = p.answer
    g_ans: list[list[str | None]] = [[None] * len(labels) for _ in range(n)]
    for p in greedy:
        g_ans[p.prompt_index][labels.index(p.schedule)] = p.answer
    rule = VOTES.get(hc.vote)

    def vote(i: int, picks: list[tuple[int, int]]) -> VoteResult:
        return rule([Ballot(ans[i][j][s], blk[labels[j]], o) for o, (j, s) in enumerate(picks)])

    def correct(answers: Sequence[str | None]) -> np.ndarray:
        return np.array([a is not None and a == g for a, g in zip(answers, gold_n, strict=True)])

    sched_rows: list[dict[str, Any]] = []
    greedy_ok: dict[str, np.ndarray] = {}
    budgets = sorted({k * s for k, s in combos})
    single_vote_ok: dict[tuple[str, int], np.ndarray] = {}
    for j, lab in enumerate(labels):
        g_ok = correct([g_ans[i][j] for i in range(n)])
        greedy_ok[lab] = g_ok
        row: dict[str, Any] = {
            "schedule": lab, "block": blk[lab], "remasking": all_scheds[j].remasking,
            "greedy_acc": 100 * g_ok[te].mean(),
            "greedy_no_answer": 100 * np.mean([g_ans[i][j] is None for i in te]),
        }
        sched_rows.append(row)
        if j >= J:  # baselines are decoded greedily only
            continue
        paths_ok = np.array([[ans[i][j][s] == gold_n[i] for s in range(S)] for i in te])
        row["mean_path_acc"] = 100 * paths_ok.mean()
        row["path_no_answer"] = 100 * np.mean([[a is None for a in ans[i][j]] for i in te])
        row[f"pass@{S}"] = 100 * paths_ok.any(1).mean()
        for b in budgets:
            ok = correct([vote(i, [(j, s) for s in range(b)]).answer for i in range(n)])
            single_vote_ok[(lab, b)] = ok
            row[f"vote{b}_acc"] = 100 * ok[te].mean()
    rep.add_table("schedules", sched_rows)

    hex_rows: list[dict[str, Any]] = []
    for k, s in combos:
        idx = spread_subset(J, k)
        picks = [(j, t) for j in idx for t in range(s)]
        votes = [vote(i, picks) for i in range(n)]
        ok = correct([v.answer for v in votes])
        b = k * s
        singles = {labels[j]: single_vote_ok[(labels[j], b)] for j in range(J)}
        pick = dv if len(dv) else te  # choose on dev; without one, in hindsight on test
        best_lab = max(singles, key=lambda lab: singles[lab][pick].mean())
        hindsight = max(singles, key=lambda lab: singles[lab][te].mean())
        med = statistics.median(float(v[te].mean()) for v in singles.values())
        d, lo, hi = paired_bootstrap(ok[te], singles[best_lab][te], config.n_boot, seed=hc.seed)
        best_greedy = max((labels[j] for j in range(J)), key=lambda lab: greedy_ok[lab][pick].mean())
        dg, glo, ghi = paired_bootstrap(ok[te], greedy_ok[best_greedy][te], config.n_boot, seed=hc.seed)
        hex_rows.append({
            "k": k, "s": s, "paths": b, "schedules": "+".join(labels[j] for j in idx),
            "hex_acc": 100 * ok[te].mean(),
            "tie_rate": 100 * np.mean([votes[i].tie for i in te]),
            "no_answer": 100 * np.mean([votes[i].answer is None for i in te]),
            "best_chosen_on": "dev" if len(dv) else "test (hindsight)",
            "best_single_same_compute": best_lab,
            "best_single_acc": 100 * singles[best_lab][te].mean(),
            "hindsight_best_single": hindsight,
            "hindsight_best_single_acc": 100 * singles[hindsight][te].mean(),
            "median_single_acc": 100 * med,
            "hex_minus_best": 100 * d, "ci_lo": 100 * lo, "ci_hi": 100 * hi,
            "best_greedy": best_greedy,
            "hex_minus_best_greedy": 100 * dg, "greedy_ci_lo": 100 * glo, "greedy_ci_hi": 100 * ghi,
        })
    rep.add_table("hex", hex_rows)

    # Do schedules fail differently? Jaccard overlap of greedy error sets.
    overlap = []
    for a in labels[:J]:
        row = {"schedule": a}
        for b2 in labels[:J]:
            ea, eb = ~greedy_ok[a][te], ~greedy_ok[b2][te]
            union = (ea | eb).sum()
            row[b2] = float((ea & eb).sum() / union) if union else 1.0
        overlap.append(row)
    rep.add_table("greedy_error_jaccard", overlap)

    # Per-problem view for the first problems: each schedule's answers and the vote.
    if hex_rows:
        k_max, s_max = max(combos)
        idx = spread_subset(J, k_max)
        examples = []
        for i in te[:10].tolist():
            v = vote(i, [(j, t) for j in idx for t in range(s_max)])
            row2: dict[str, Any] = {"problem": i, "gold": gold_n[i]}
            for j in idx:
                row2[labels[j]] = " ".join(str(ans[i][j][t]) for t in range(s_max))
            row2["vote"] = v.answer
            row2["tie"] = v.tie
            examples.append(row2)
        rep.add_table("examples", examples)
        top = max(hex_rows, key=lambda r: (r["paths"], r["k"]))
        rep.metrics.update({
            "n_problems": len(te), "n_dev": len(dv), "hex_acc": top["hex_acc"], "hex_k": top["k"],
            "hex_paths": top["paths"],
            "best_single_same_compute_acc": top["best_single_acc"], "hex_minus_best": top["hex_minus_best"],
            "hex_minus_best_ci_lo": top["ci_lo"], "hex_minus_best_ci_hi": top["ci_hi"],
        })
    rep.metrics["nfe_per_path"] = sampled[0].nfe if sampled else 0
    return rep
