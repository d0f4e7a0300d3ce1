"""``outlierkit hex``: train the tiny masked-diffusion model, evaluate HEX, generate from a model."""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

from outlierkit._utils.args import nonneg_float, positive_int
from outlierkit.errors import ConfigError, DataError

#: Decoded paths whose records an eval may keep in memory, per GiB of RAM (a PathRecord with its
#: short text is about 1 KiB in CPython); ``-n`` beyond that is refused before anything is allocated.
_PATHS_PER_GIB = 1 << 20


class _OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line ``outlierkit: error: ...``, exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"outlierkit: error: {self.prog}: {' '.join(message.split())}\n")


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _memory(text: str) -> int:
    from outlierkit.diffusion.sampler import parse_memory

    try:
        return parse_memory(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _warn(message: str) -> None:
    """A warning on the console (stderr), not only in report.md; once per message (the shared mechanism,
    which Report.warn uses too, so echoing a report's warnings never prints them twice)."""
    from outlierkit._utils.log import warning

    warning(message)


#: ``hex generate --prompt`` formats of the tiny tasks, spelled out here so that ``--help`` needs no torch
#: import; a test checks them against each task's ``prompt_format()``.
PROMPT_FORMATS: dict[str, str] = {
    "pointer-chase-k": "'3817450926;4+6=' (f(0)..f(9) as 10 digits ';' start digit '+' hops 4..8 '=')",
    "parity-chain": "4..12 bits then '=', e.g. '0110='",
    "pointer-chase": "'3817450926;4=' (f(0)..f(9) as 10 digits ';' start digit '=')",
    "exit-walk": "'3817450926;4=' (f(0)..f(9) as 10 digits ';' start digit '=')",
}


def _check_out(out: str, force: bool) -> None:
    """A bad ``--out`` (existing, under a regular file, unwritable) fails before any work, in one line."""
    from outlierkit._utils.io import check_output

    check_output(out, force=force)


def _prompt_help() -> str:
    forms = "; ".join(f"{name}: {form}" for name, form in PROMPT_FORMATS.items())
    return ("prompt text (repeatable). A tiny model takes its task's format - " + forms
            + ". A Hugging Face model takes plain text (--chat applies the tokenizer's chat template)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="tiny checkpoint dir, a bundled tiny checkpoint by name (pointer-chase-k, exit-walk), or "
                        "a Hugging Face model dir (default: the bundled pointer-chase-k)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hugging Face model's own code (LLaDA/Dream need it; off by default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--mask-id", type=int, default=None, help="override the mask token id")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to prompts")
    p.add_argument("--schedules", default=None,
                   help="block sizes or names, comma-separated: '8,16,32', '8:margin', 'topk_margin', "
                        "'random', 'full' (default: the tiny task's, else 8,16,32,64,128)")
    p.add_argument("--temperature", type=nonneg_float, default=0.9, help="Gumbel temperature (default: 0.9)")
    p.add_argument("--gen-length", type=positive_int, default=None,
                   help="answer length (default: tiny task's, else 256)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default: gen-length / 2)")
    p.add_argument("--cfg-scale", type=nonneg_float, default=0.0, help="classifier-free guidance (default: 0)")
    p.add_argument("--eos-last", action="store_true", help="commit EOS/EoT last (held back by score)")
    p.add_argument("--suppress-eos", action="store_true", help="never propose EOS/EoT")
    p.add_argument("--extractor", default=None,
                   help="answer extractor: gsm8k, boxed, mc, after_hash (default: tiny after_hash, else gsm8k)")
    p.add_argument("--vote", default="majority", help="vote rule (default: majority)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    p.add_argument("--batch-rows", type=positive_int, default=None,
                   help="rows (prompt x schedule x seed) per batched decode (default: from --max-memory; "
                        "at most 256 on CPU, where 128-256 rows ran fastest)")
    p.add_argument("--max-memory", type=_memory, default=None,
                   help="memory budget of a batched decode, e.g. 40GiB (default: 80%% of free GPU memory, "
                        "half the available RAM on CPU)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{train-tiny,eval,generate}",
                                parser_class=_OneLineParser)
    t = sub.add_parser("train-tiny", help="train the tiny masked-diffusion model on a synthetic task")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--task", default="pointer-chase-k",
                   help="registered tiny task: pointer-chase-k, parity-chain, or pointer-chase (hides the hop "
                        "count, so answers are ambiguous; kept to reproduce that finding) (default: pointer-chase-k)")
    t.add_argument("--steps", type=positive_int, default=2000, help="optimizer steps (default: 2000)")
    t.add_argument("--batch-size", type=positive_int, default=128, help="batch size (default: 128)")
    t.add_argument("--lr", type=nonneg_float, default=2e-3, help="peak learning rate (default: 2e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    t.add_argument("--threads", type=positive_int, default=1, help="torch threads (default: 1)")
    t.add_argument("--warmup", type=positive_int, default=None, help="warm-up steps (default: min(200, steps/10))")
    t.add_argument("--init-from", default=None, help="continue from this tiny checkpoint (fresh optimizer)")
    t.add_argument("--prefix-frac", type=float, default=0.0,
                   help="share of rows with a visible answer prefix (semi-AR masking; default: 0)")
    t.add_argument("--force", action="store_true", help="replace an existing --out")

    e = sub.add_parser("eval", help="accuracy of each schedule, same-compute votes and HEX, with paired CIs")
    _model_args(e)
    e.add_argument("--task", default=None,
                   help="tiny task for held-out problems; must be the checkpoint's own (default: the checkpoint's)")
    e.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} (for HF models)')
    e.add_argument("-n", "--n", type=positive_int, default=1000, help="test problems (default: 1000)")
    e.add_argument("--dev", type=int, default=0,
                   help="problems of a separate dev split (drawn before the -n test problems, disjoint from "
                        "them) on which the best single schedule is chosen; 0 picks it in hindsight on the "
                        "test problems (default: 0)")
    e.add_argument("--seeds-per-block", type=positive_int, default=6,
                   help="sampled paths decoded per schedule; must be >= k*s (default: 6)")
    e.add_argument("--ks", type=_ints, default=None,
                   help="HEX ensemble sizes k, each <= the number of schedules "
                        "(default: 3 and all schedules, e.g. 3,4 for the tiny task's 4)")
    e.add_argument("--hex-seeds", type=_ints, default=(1,), help="HEX seeds per schedule s (default: 1)")
    e.add_argument("--baselines", default="topk_margin,random",
                   help="schedules decoded greedily as baselines (default: topk_margin,random)")
    e.add_argument("--out", required=True, help="report directory")
    e.add_argument("--force", action="store_true", help="replace an existing --out")

    g = sub.add_parser("generate", help="decode prompts with HEX (or one schedule) and show every path")
    _model_args(g)
    g.add_argument("--prompt", action="append", required=True, help=_prompt_help())
    g.add_argument("--seeds-per-block", type=positive_int, default=1, help="paths per schedule (default: 1)")
    g.add_argument("--out", default=None, help="optional report directory")
    g.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args: Any) -> int:
    if args.action == "train-tiny":
        return _train(args)
    if args.action == "eval":
        return _eval(args)
    return _generate(args)


def _train(args: Any) -> int:
    import shlex
    import sys

    from outlierkit._utils import staged_output
    from outlierkit._utils.log import log
    from outlierkit.config import to_dict
    from outlierkit.diffusion.tiny import TrainConfig, check_init_from, make_task, save_tiny, train_tiny
    from outlierkit.report import Report, new_figure, save_figure

    _check_out(args.out, args.force)
    make_task(args.task)  # an unknown task fails here, listing the valid ones, before any work
    cfg = TrainConfig(task=args.task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, threads=args.threads, init_from=args.init_from, prefix_frac=args.prefix_frac,
                      warmup=args.warmup if args.warmup is not None else min(200, max(1, args.steps // 10)))
    check_init_from(cfg)
    log(f"training the tiny model on {cfg.task}: {cfg.steps} steps of {cfg.batch_size}, "
        f"{cfg.threads} thread(s); a loss line every 100 steps")
    with staged_output(args.out, force=args.force) as stage:
        model, task, hist = train_tiny(cfg, on_log=lambda s, l: log(f"step {s}/{cfg.steps} loss {l:.4f}"))
        meta: dict[str, Any] = {"train_config": to_dict(cfg),
                                "command": "outlierkit hex " + shlex.join(sys.argv[2:]),
                                "final_loss": hist[-1]["loss"], "train_seconds": hist[-1]["seconds"]}
        if args.init_from:
            from outlierkit.diffusion.tiny import load_tiny

            meta["parent"] = load_tiny(args.init_from)[2]
        save_tiny(model, task, stage, meta)
        rep = Report(kind="diffusion.train_tiny", config=to_dict(cfg))
        rep.metrics.update({"final_loss": hist[-1]["loss"], "seconds": hist[-1]["seconds"],
                            "params": sum(p.numel() for p in model.parameters())})
        rep.add_table("loss", hist)
        fig, ax = new_figure(figsize=(5, 3))
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist])
        ax.set_xlabel("step")
        ax.set_ylabel("masked-diffusion loss")
        ax.set_yscale("log")
        save_figure(fig, stage, "loss", rep)
        rep.save(stage)
    log(f"saved {args.out}")
    return 0


class _Loaded:
    """Either the tiny model or a HF model, behind one interface for the commands."""

    def __init__(self, args: Any) -> None:
        import torch

        from outlierkit._utils import resolve_device, resolve_dtype
        from outlierkit.diffusion.tiny import MASK, TINY_TOKENS, decode, is_tiny_dir, load_tiny, resolve_checkpoint

        if args.threads:
            torch.set_num_threads(args.threads)
        self.decode: Any
        tiny_path = resolve_checkpoint(args.model) if args.model is not None else None
        self.tiny = tiny_path is None or is_tiny_dir(tiny_path)
        if self.tiny:
            # Options of the HF path either apply to the tiny model too (device, dtype) or are refused:
            # nothing is silently ignored.
            if args.chat:
                raise ConfigError("--chat needs a tokenizer with a chat template; the tiny model has none "
                                  "(write prompts in its task's format, see `outlierkit hex generate --help`)")
            if args.mask_id is not None and args.mask_id != MASK:
                raise ConfigError(f"--mask-id {args.mask_id} does not apply: the tiny model's mask id is {MASK}")
            if args.trust_remote_code:
                _warn("--trust-remote-code has no effect on the tiny model (it ships no code)")
            self.model, self.task, _ = load_tiny(tiny_path)
            dev = resolve_device(args.device)
            self.model.to(device=dev, dtype=resolve_dtype(args.dtype, dev))
            self.tokens = TINY_TOKENS
            self.decode = decode
            self.max_context: int | None = self.model.config.max_len
            self.shift = False
            self.device: Any = dev
            self.gen_default, self.sched_default, self.extractor_default = (
                self.task.gen_length, ",".join(self.task.default_schedules), "after_hash")
        else:
            from outlierkit.diffusion.hf import hf_forward, load_hf_model

            lm = load_hf_model(args.model, trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                               device=args.device, mask_id=args.mask_id)
            self.lm = lm
            self.model = hf_forward(lm.model)
            self.tokens = lm.tokens
            self.decode = lm.decode
            self.max_context = lm.max_context
            self.shift = lm.shift_logits
            self.device = next(lm.model.parameters()).device
            self.gen_default, self.sched_default, self.extractor_default = 256, "8,16,32,64,128", "gsm8k"

    def encode(self, text: str, chat: bool) -> list[int]:
        if self.tiny:
            return list(self.task.prompt_from_text(text))
        return self.lm.encode(text, chat)

    def hex_config(self, args: Any, seeds_per_block: int) -> Any:
        from outlierkit.diffusion.hex import HexConfig

        gen = args.gen_length or self.gen_default
        if self.tiny and gen != self.task.gen_length:
            raise ConfigError(f"the tiny model was trained with gen-length {self.task.gen_length}")
        return HexConfig(
            schedules=tuple((self.sched_default if args.schedules is None else args.schedules).split(",")),
            seeds_per_block=seeds_per_block, temperature=args.temperature, gen_length=gen,
            steps=args.steps if args.steps is not None else max(1, gen // 2), cfg_scale=args.cfg_scale,
            suppress_eos=args.suppress_eos, eos_last=args.eos_last, shift_logits=self.shift,
            extractor=args.extractor or self.extractor_default, vote=args.vote, seed=args.seed,
            batch_rows=args.batch_rows, max_memory=args.max_memory)


def _read_jsonl(path: str, n: int) -> tuple[list[str], list[str]]:
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    prompts, answers = [], []
    for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompts.append(str(row["prompt"]))
            answers.append(str(row["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{p}:{ln}: expected a JSON object with 'prompt' and 'answer'") from None
        if len(prompts) >= n:
            break
    if not prompts:
        raise DataError(f"{p} holds no problems")
    return prompts, answers


def default_ks(n_schedules: int) -> tuple[int, ...]:
    """HEX ensemble sizes when ``--ks`` is not given: 3 schedules (spread over the pool) and all of them."""
    return tuple(sorted({min(3, n_schedules), n_schedules}))


def _check_eval_size(n: int, paths_per_problem: int) -> None:
    """Refuse an ``-n`` whose path records cannot fit in memory, before anything is allocated."""
    import os

    try:
        gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not POSIX: assume a modest machine
        gib = 16.0
    limit = int(gib / 2 * _PATHS_PER_GIB)
    if n * paths_per_problem > limit:
        raise ConfigError(f"-n {n} needs {n * paths_per_problem:,} decoded paths ({paths_per_problem} per "
                          f"problem), more than this machine's memory ({gib:.0f} GiB) holds; use at most "
                          f"-n {max(1, limit // paths_per_problem):,}")


def _eval(args: Any) -> int:
    from outlierkit._utils import staged_output
    from outlierkit._utils.log import log
    from outlierkit.diffusion.hex import EvalConfig, evaluate_hex

    _check_out(args.out, args.force)
    m = _Loaded(args)
    hc = m.hex_config(args, args.seeds_per_block)
    n_sched = len(hc.schedules)
    baselines = tuple(b for b in args.baselines.split(",") if b.strip())
    if args.dev < 0:
        raise ConfigError(f"--dev must be >= 0, got {args.dev}")
    cfg = EvalConfig(hex=hc, ks=args.ks if args.ks is not None else default_ks(n_sched),
                     seeds_per_schedule=args.hex_seeds, baselines=baselines, dev_size=args.dev)
    cfg.check()
    total = args.n + args.dev
    _check_eval_size(total, n_sched * (hc.seeds_per_block + 1) + len(baselines))
    if args.task is not None and not m.tiny:
        raise ConfigError("--task picks a tiny model's held-out problems; a Hugging Face model needs --data")
    if args.task is not None and args.task != m.task.name:
        raise ConfigError(f"--task {args.task} does not match the checkpoint, which was trained on "
                          f"{m.task.name}; its answers would score 0%. Leave --task out or pass {m.task.name}")
    if args.data:
        texts, gold = _read_jsonl(args.data, total)
        if len(texts) <= args.dev:
            raise DataError(f"{args.data} holds {len(texts)} problems; --dev {args.dev} leaves none to test")
        prompts: list[Any] = [m.encode(t, args.chat) for t in texts]
    elif m.tiny:
        log(f"drawing {total} held-out {m.task.name} problems ({args.dev} dev + {args.n} test)")
        probs = m.task.heldout(total)
        prompts, gold = [list(p.prompt_ids) for p in probs], [p.answer for p in probs]
    else:
        raise ConfigError("a Hugging Face model needs --data FILE.jsonl with prompt/answer rows")
    log(f"decoding {len(prompts)} problems: {n_sched} schedules x {hc.seeds_per_block} sampled seeds, plus "
        f"{n_sched + len(baselines)} greedy decodes; {hc.batch_rows or 'auto'} rows per batch")
    rep = evaluate_hex(m.model, prompts, gold, m.tokens, cfg, m.decode, max_context=m.max_context,
                       device=m.device, on_batch=lambda d, t: log(f"paths {d}/{t}"))
    rep.config["model"] = args.model or "bundled tiny pointer-chase-k"
    for w in rep.warnings:
        _warn(w)
    with staged_output(args.out, force=args.force) as stage:
        _plot_eval(rep, stage)
        rep.save(stage)
    for row in rep.tables["hex"]:
        log(f"HEX k={row['k']} s={row['s']}: {row['hex_acc']:.1f}% vs best same-compute single "
            f"{row['best_single_same_compute']} {row['best_single_acc']:.1f}% "
            f"(diff {row['hex_minus_best']:+.1f}, 95% CI {row['ci_lo']:+.1f}..{row['ci_hi']:+.1f})")
    log(f"report: {args.out}/report.md")
    return 0


def _plot_eval(rep: Any, out: Any) -> None:
    from outlierkit.report import new_figure, save_figure

    names, vals, colors = [], [], []
    for r in rep.tables["schedules"]:
        names.append(f"{r['schedule']} greedy")
        vals.append(r["greedy_acc"])
        colors.append("tab:gray")
    for r in rep.tables["hex"]:
        names.append(f"best single x{r['paths']}")
        vals.append(r["best_single_acc"])
        colors.append("tab:blue")
        names.append(f"HEX k={r['k']} s={r['s']}")
        vals.append(r["hex_acc"])
        colors.append("tab:red")
    fig, ax = new_figure(figsize=(7, 0.3 * len(names) + 1))
    ax.barh(range(len(names)), vals, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    lo = min(vals) if vals else 0
    ax.set_xlim(max(0, lo - 5), 100)
    save_figure(fig, out, "accuracy", rep)


def _generate(args: Any) -> int:
    import torch

    from outlierkit._utils import staged_output
    from outlierkit._utils.log import log
    from outlierkit.diffusion.hex import hex_generate
    from outlierkit.report import Report

    if args.out:
        _check_out(args.out, args.force)
    m = _Loaded(args)
    hc = m.hex_config(args, args.seeds_per_block)
    prompts = [m.encode(t, args.chat) for t in args.prompt]
    log(f"decoding {len(prompts)} prompt(s) x {len(hc.schedules)} schedule(s) x {hc.seeds_per_block} seed(s), "
        f"{hc.steps} steps each")
    res = hex_generate(m.model, prompts, m.tokens, hc, m.decode, max_context=m.max_context, device=m.device,
                       on_batch=lambda d, t: log(f"paths {d}/{t}"))
    rows = []
    for i, text in enumerate(args.prompt):
        print(f"prompt {i}: {text}")
        for p in res.paths_of(i):
            print(f"  {p.schedule:>12} seed {p.seed_index}: answer={p.answer!s:<8} {p.text!r}")
            rows.append({"prompt": i, "schedule": p.schedule, "seed_index": p.seed_index, "answer": p.answer,
                         "text": p.text, "nfe": p.nfe})
        v = res.votes[i]
        print(f"  vote: {v.answer} (counts {v.counts}{', tie broken' if v.tie else ''})")
    if args.out:
        from outlierkit.config import to_dict

        rep = Report(kind="diffusion.hex_generate", config=to_dict(hc))
        rep.add_table("paths", rows)
        rep.add_table("votes", [{"prompt": i, "answer": v.answer, "tie": v.tie, "votes": v.votes}
                                for i, v in enumerate(res.votes)])
        rep.metrics["seconds"] = res.seconds
        rep.metrics["threads"] = torch.get_num_threads()
        with staged_output(args.out, force=args.force) as stage:
            rep.save(stage)
    return 0
