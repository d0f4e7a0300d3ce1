"""``outlierkit hex``: train the tiny masked-diffusion model, evaluate HEX, generate from a model."""

from __future__ import annotations

import argparse
from typing import Any

from outlierkit.errors import ConfigError, DataError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="tiny checkpoint dir or Hugging Face model dir (default: the bundled tiny model)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a Hugging Face model's own code (LLaDA/Dream need it; off by default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--dtype", default=None, help="fp32, bf16, fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--mask-id", type=int, default=None, help="override the mask token id")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to prompts")
    p.add_argument("--schedules", default=None,
                   help="block sizes or names, comma-separated: '8,16,32', '8:margin', 'topk_margin', "
                        "'random', 'full' (default: the tiny task's, else 8,16,32,64,128)")
    p.add_argument("--temperature", type=float, default=0.9, help="Gumbel temperature (default: 0.9)")
    p.add_argument("--gen-length", type=int, default=None, help="answer length (default: tiny task's, else 256)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen-length / 2)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance (default: 0)")
    p.add_argument("--eos-last", action="store_true", help="commit EOS/EoT last (held back by score)")
    p.add_argument("--suppress-eos", action="store_true", help="never propose EOS/EoT")
    p.add_argument("--extractor", default=None,
                   help="answer extractor: gsm8k, boxed, mc, after_hash (default: tiny after_hash, else gsm8k)")
    p.add_argument("--vote", default="majority", help="vote rule (default: majority)")
    p.add_argument("--seed", type=int, default=0, help="base seed (default: 0)")
    p.add_argument("--batch-rows", type=int, default=1024, help="rows per batched decode (default: 1024)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True, metavar="{train-tiny,eval,generate}")
    t = sub.add_parser("train-tiny", help="train the tiny masked-diffusion model on a synthetic task")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--task", default="pointer-chase", help="registered tiny task (default: pointer-chase)")
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps (default: 2000)")
    t.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default: 2e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(200, steps/10))")
    t.add_argument("--init-from", default=None, help="continue from this tiny checkpoint (fresh optimizer)")
    t.add_argument("--prefix-frac", type=float, default=0.0,
                   help="share of rows with a visible answer prefix (semi-AR masking; default: 0)")
    t.add_argument("--force", action="store_true", help="replace an existing --out")

    e = sub.add_parser("eval", help="accuracy of each schedule, same-compute votes and HEX, with paired CIs")
    _model_args(e)
    e.add_argument("--task", default=None, help="tiny task for held-out problems (default: the checkpoint's)")
    e.add_argument("--data", default=None, help='JSONL of {"prompt": ..., "answer": ...} (for HF models)')
    e.add_argument("-n", "--n", type=int, default=1000, help="problems (default: 1000)")
    e.add_argument("--seeds-per-block", type=int, default=6,
                   help="sampled paths decoded per schedule; must be >= k*s (default: 6)")
    e.add_argument("--ks", type=_ints, default=(3, 5), help="HEX ensemble sizes k (default: 3,5)")
    e.add_argument("--hex-seeds", type=_ints, default=(1,), help="HEX seeds per schedule s (default: 1)")
    e.add_argument("--baselines", default="topk_margin,random",
                   help="schedules decoded greedily as baselines (default: topk_margin,random)")
    e.add_argument("--out", required=True, help="report directory")
    e.add_argument("--force", action="store_true", help="replace an existing --out")

    g = sub.add_parser("generate", help="decode prompts with HEX (or one schedule) and show every path")
    _model_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--seeds-per-block", type=int, default=1, help="paths per schedule (default: 1)")
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
    from outlierkit.diffusion.tiny import TrainConfig, save_tiny, train_tiny
    from outlierkit.report import Report, new_figure, save_figure

    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--steps and --batch-size must be positive")
    cfg = TrainConfig(task=args.task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      seed=args.seed, threads=args.threads, init_from=args.init_from, prefix_frac=args.prefix_frac,
                      warmup=args.warmup if args.warmup is not None else min(200, max(1, args.steps // 10)))
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

        from outlierkit.diffusion.tiny import TINY_TOKENS, decode, is_tiny_dir, load_tiny

        if args.threads:
            torch.set_num_threads(args.threads)
        self.decode: Any
        self.tiny = args.model is None or is_tiny_dir(args.model)
        if self.tiny:
            self.model, self.task, _ = load_tiny(args.model)
            self.tokens = TINY_TOKENS
            self.decode = decode
            self.max_context: int | None = self.model.config.max_len
            self.shift = False
            self.device: Any = None
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
            steps=args.steps or max(1, gen // 2), cfg_scale=args.cfg_scale, suppress_eos=args.suppress_eos,
            eos_last=args.eos_last, shift_logits=self.shift, extractor=args.extractor or self.extractor_default,
            vote=args.vote, seed=args.seed, batch_rows=args.batch_rows)


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


def _eval(args: Any) -> int:
    from outlierkit._utils import staged_output
    from outlierkit._utils.io import check_output
    from outlierkit._utils.log import log
    from outlierkit.diffusion.hex import EvalConfig, evaluate_hex
    from outlierkit.diffusion.tiny import make_task

    check_output(args.out, force=args.force)
    m = _Loaded(args)
    hc = m.hex_config(args, args.seeds_per_block)
    if args.data:
        texts, gold = _read_jsonl(args.data, args.n)
        prompts: list[Any] = [m.encode(t, args.chat) for t in texts]
    elif m.tiny:
        task = make_task(args.task) if args.task else m.task
        probs = task.heldout(args.n)
        prompts, gold = [list(p.prompt_ids) for p in probs], [p.answer for p in probs]
    else:
        raise ConfigError("a Hugging Face model needs --data FILE.jsonl with prompt/answer rows")
    cfg = EvalConfig(hex=hc, ks=args.ks, seeds_per_schedule=args.hex_seeds,
                     baselines=tuple(b for b in args.baselines.split(",") if b.strip()))
    log(f"decoding {len(prompts)} problems x {len(hc.schedules)} schedules x {hc.seeds_per_block} seeds")
    rep = evaluate_hex(m.model, prompts, gold, m.tokens, cfg, m.decode, max_context=m.max_context,
                       device=m.device, on_batch=lambda d, t: log(f"paths {d}/{t}"))
    rep.config["model"] = args.model or "bundled tiny pointer-chase-k"
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
    from outlierkit._utils.io import check_output
    from outlierkit.diffusion.hex import hex_generate
    from outlierkit.report import Report

    if args.out:
        check_output(args.out, force=args.force)
    m = _Loaded(args)
    hc = m.hex_config(args, args.seeds_per_block)
    prompts = [m.encode(t, args.chat) for t in args.prompt]
    res = hex_generate(m.model, prompts, m.tokens, hc, m.decode, max_context=m.max_context, device=m.device)
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
