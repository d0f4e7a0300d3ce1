"""HEX: equivalences with the plain sampler, batching, the vote plumbing on an analytic model, evaluation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hex_stubs import FlawedParityOracle

from outlierkit.diffusion.hex import (
    EvalConfig,
    HexConfig,
    decode_paths,
    evaluate_hex,
    hex_generate,
    pad_prompts,
    paired_bootstrap,
    path_seed,
    spread_subset,
)
from outlierkit.diffusion.sampler import TokenSpec, generate
from outlierkit.diffusion.tiny import TINY_TOKENS, decode, make_task
from outlierkit.errors import ConfigError, DataError

TASK = make_task("parity-chain")
TINY = dict(gen_length=24, steps=12, extractor="after_hash")


def prompts_of(n: int, seed: int = 7) -> tuple[list[list[int]], list[str]]:
    probs = TASK.heldout(n, seed=seed)
    return [list(p.prompt_ids) for p in probs], [p.answer for p in probs]


def test_one_schedule_hex_equals_plain_sampler(random_tiny):
    prompts, _ = prompts_of(4)
    cfg = HexConfig(schedules=("6",), seeds_per_block=1, temperature=0.9, seed=3, **TINY)
    res = hex_generate(random_tiny, prompts, TINY_TOKENS, cfg, decode)
    plain = generate(random_tiny, torch.tensor(prompts), TINY_TOKENS, cfg.sampler_config(),
                     seeds=[path_seed(3, i, 0, 0) for i in range(4)])
    assert [p.text for p in res.paths] == [decode(a) for a in plain.answers]
    assert all(p.nfe == 12 for p in res.paths)


def test_batched_rows_equal_one_row_at_a_time(random_tiny):
    prompts, _ = prompts_of(3)
    cfg = HexConfig(schedules=("2", "6", "24", "topk_margin"), seeds_per_block=2, temperature=0.9, **TINY)
    big = decode_paths(random_tiny, prompts, TINY_TOKENS, cfg, decode)
    one = decode_paths(random_tiny, prompts, TINY_TOKENS, HexConfig(**{**cfg.__dict__, "batch_rows": 1}), decode)
    assert [(p.prompt_index, p.schedule, p.seed_index, p.text) for p in big] == \
           [(p.prompt_index, p.schedule, p.seed_index, p.text) for p in one]
    assert len(big) == 3 * 4 * 2


def test_vote_plumbing_beats_every_single_schedule_on_flawed_oracle():
    """Plumbing, not evidence: schedules fail on different problems, so the vote beats each of them."""
    prompts, gold = prompts_of(240)
    oracle = FlawedParityOracle()
    cfg = HexConfig(schedules=("2", "12", "24"), seeds_per_block=1, temperature=0.0, batch_rows=512, **TINY)
    res = hex_generate(oracle, prompts, TINY_TOKENS, cfg, decode)
    acc = {}
    wrong = {}
    for sched in ("b2", "b12", "b24"):
        ans = {p.prompt_index: p.answer for p in res.paths if p.schedule == sched}
        wrong[sched] = {i for i in range(len(gold)) if ans[i] != gold[i]}
        acc[sched] = 1 - len(wrong[sched]) / len(gold)
    hex_acc = np.mean([a == g for a, g in zip(res.answers, gold, strict=True)])
    assert 0.5 < max(acc.values()) < 0.95  # the flaw bites
    assert hex_acc > max(acc.values()) + 0.03
    jac = len(wrong["b2"] & wrong["b24"]) / len(wrong["b2"] | wrong["b24"])
    assert jac < 0.5  # they fail differently
    # without the flaw every schedule is exact
    exact = hex_generate(FlawedParityOracle(flaw_mod=10**9), prompts[:30], TINY_TOKENS, cfg, decode)
    assert all(p.answer == gold[p.prompt_index] for p in exact.paths)


def test_evaluate_hex_matches_hex_generate_and_is_consistent():
    prompts, gold = prompts_of(40)
    oracle = FlawedParityOracle()
    hc = HexConfig(schedules=("2", "12", "24"), seeds_per_block=3, temperature=0.7, batch_rows=512, **TINY)
    rep = evaluate_hex(oracle, prompts, gold, TINY_TOKENS, EvalConfig(hex=hc, ks=(3, 1), seeds_per_schedule=(1,),
                                                                      baselines=("topk_margin",), n_boot=500),
                       decode)
    hex_row = next(r for r in rep.tables["hex"] if r["k"] == 3)
    direct = hex_generate(oracle, prompts, TINY_TOKENS, HexConfig(**{**hc.__dict__, "seeds_per_block": 1}), decode)
    assert hex_row["hex_acc"] == pytest.approx(100 * np.mean([a == g for a, g in zip(direct.answers, gold,
                                                                                       strict=True)]))
    one = next(r for r in rep.tables["hex"] if r["k"] == 1)
    rows = {r["schedule"]: r for r in rep.tables["schedules"]}
    # HEX with one schedule and one seed is that schedule's first sampled path; vote1 of b2 is the same
    assert one["hex_acc"] == pytest.approx(rows["b2"]["vote1_acc"])
    assert set(rows) == {"b2", "b12", "b24", "topk_margin"} and "mean_path_acc" not in rows["topk_margin"]
    assert hex_row["ci_lo"] <= hex_row["hex_minus_best"] <= hex_row["ci_hi"]
    assert len(rep.tables["examples"]) == 10 and rep.metrics["n_problems"] == 40
    with pytest.raises(ConfigError, match="k\\*s"):
        evaluate_hex(oracle, prompts, gold, TINY_TOKENS, EvalConfig(hex=hc, ks=(3,), seeds_per_schedule=(2,)),
                     decode)


def test_best_single_is_chosen_on_the_dev_split_and_scored_on_test():
    """Issue 12: the best single schedule used to be picked in hindsight on the test problems."""
    prompts, gold = prompts_of(40)
    oracle = FlawedParityOracle()
    # temperature 0: every seed of a schedule decodes the same path, so each schedule's same-compute vote is
    # its greedy answer and can be recomputed below with one decode per schedule
    hc = HexConfig(schedules=("2", "12", "24"), seeds_per_block=3, temperature=0.0, batch_rows=512, **TINY)
    cfg = EvalConfig(hex=hc, ks=(3,), seeds_per_schedule=(1,), baselines=(), n_boot=200, dev_size=15)
    rep = evaluate_hex(oracle, prompts, gold, TINY_TOKENS, cfg, decode)
    assert rep.metrics["n_problems"] == 25 and rep.metrics["n_dev"] == 15
    row = rep.tables["hex"][0]
    assert row["best_chosen_on"] == "dev"
    per = {}
    for lab in ("b2", "b12", "b24"):
        one = replace(hc, schedules=(lab[1:],), seeds_per_block=1)
        res = hex_generate(oracle, prompts, TINY_TOKENS, one, decode)
        per[lab] = np.array([a == g for a, g in zip(res.answers, gold, strict=True)])
    dev_best = max(per, key=lambda lab: per[lab][:15].mean())
    assert row["best_single_same_compute"] == dev_best
    assert row["best_single_acc"] == pytest.approx(100 * per[dev_best][15:].mean())
    assert row["hindsight_best_single_acc"] == pytest.approx(max(100 * v[15:].mean() for v in per.values()))
    with pytest.raises(ConfigError, match="leaves no test problems"):
        evaluate_hex(oracle, prompts, gold, TINY_TOKENS, replace(cfg, dev_size=40), decode)


def test_no_answer_paths_abstain():
    """A model that never writes #### gives no answer: counted as abstention, not a crash."""
    prompts, gold = prompts_of(5)

    def never(ids, attention_mask=None):
        out = torch.zeros(*ids.shape, 18)
        out[..., 8] = 5.0  # always "0"
        return out

    res = hex_generate(never, prompts, TINY_TOKENS, HexConfig(schedules=("4", "8"), seeds_per_block=2, **TINY),
                       decode)
    assert res.answers == [None] * 5 and all(v.votes == 0 for v in res.votes)


def test_pad_prompts_left_pads_with_mask():
    ids, mask = pad_prompts([[5, 6, 7], [8]], TINY_TOKENS)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ConfigError, match="no pad id"):
        pad_prompts([[5, 6], [7]], TokenSpec(mask_id=3))
    with pytest.raises(DataError):
        pad_prompts([], TINY_TOKENS)


def test_variable_length_prompts_decode_with_attention_mask(random_tiny):
    cfg = HexConfig(schedules=("4",), seeds_per_block=1, temperature=0.0, gen_length=24, steps=12,
                    extractor="after_hash")
    res = hex_generate(random_tiny, [[1, 8, 9, 4], [1, 9, 4]], TINY_TOKENS, cfg, decode)
    assert len(res.paths) == 2


def test_hex_config_errors():
    with pytest.raises(ConfigError, match="empty"):
        HexConfig(schedules=(), **TINY)
    with pytest.raises(ConfigError, match="seeds_per_block"):
        HexConfig(seeds_per_block=0, **TINY)
    with pytest.raises(ConfigError, match="valid names"):
        HexConfig(extractor="nope")
    with pytest.raises(ConfigError, match="does not divide"):
        HexConfig(schedules=("5",), **TINY)


def test_paired_bootstrap_and_spread():
    a = np.ones(400, bool)
    b = np.arange(400) % 2 == 0
    d, lo, hi = paired_bootstrap(a, b, 2000, seed=1)
    assert d == pytest.approx(0.5) and lo < 0.5 < hi and hi - lo < 0.15
    assert paired_bootstrap(a, a, 100) == (0.0, 0.0, 0.0)
    assert spread_subset(5, 3) == [0, 2, 4] and spread_subset(4, 1) == [0] and spread_subset(5, 5) == [0, 1, 2, 3, 4]
