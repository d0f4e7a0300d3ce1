"""``outlierkit train-lm --out DIR``: train a small LLaMA causal LM on offline text.

See :mod:`outlierkit.llm.train_lm` for the data split, the tokenizer and the model.
"""

from __future__ import annotations

import argparse

from outlierkit._utils.args import positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from outlierkit.llm.train_lm import LMConfig

    d = LMConfig()
    parser.add_argument("--out", required=True, help="output model directory (a regular Hugging Face directory)")
    parser.add_argument("--data", nargs="+", default=[],
                        help="text files/dirs/JSONL added to the built-in corpus (each source: calibration half "
                             "trains, held-out half is only evaluated)")
    for flag, name, what in (("--steps", "steps", "optimizer steps"),
                             ("--batch-size", "batch_size", "sequences per step"),
                             ("--seq-len", "seq_len", "tokens per sequence"), ("--hidden", "hidden", "hidden size"),
                             ("--layers", "layers", "decoder layers"), ("--heads", "heads", "attention heads"),
                             ("--kv-heads", "kv_heads", "KV heads"), ("--intermediate", "intermediate", "MLP width"),
                             ("--vocab-size", "vocab_size", "BPE vocabulary")):
        parser.add_argument(flag, type=positive_int, default=getattr(d, name),
                            help=f"{what} (default: {getattr(d, name)})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"warm-up steps (default: {d.warmup})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay,
                        help=f"AdamW weight decay on matrices (default: {d.weight_decay})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"seed (default: {d.seed})")
    parser.add_argument("--threads", type=positive_int, default=d.threads, help=f"CPU threads (default: {d.threads})")
    parser.add_argument("--keep-best", action="store_true",
                        help="save the weights of the lowest validation loss (checked every 100 steps) instead of "
                             "the last ones: training on little text overfits (the bundled tinylm's validation loss "
                             "was lowest at step 900 of 1500)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys
    from dataclasses import asdict
    from pathlib import Path

    from outlierkit._utils import staged_output
    from outlierkit._utils.io import check_output
    from outlierkit._utils.log import log
    from outlierkit.llm.evaluate import perplexity
    from outlierkit.llm.models import load_model
    from outlierkit.llm.train_lm import LMConfig, save_lm, train_lm, training_documents
    from outlierkit.report import Report, new_figure, save_figure

    cfg = LMConfig(vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers, heads=args.heads,
                   kv_heads=args.kv_heads, intermediate=args.intermediate, seq_len=args.seq_len,
                   batch_size=args.batch_size, steps=args.steps, lr=args.lr, warmup=args.warmup,
                   weight_decay=args.weight_decay, seed=args.seed, threads=args.threads, data=list(args.data),
                   keep_best=args.keep_best)
    cfg.check()
    check_output(args.out, force=args.force)
    log(f"training a {cfg.layers}-layer LLaMA (hidden {cfg.hidden}) for {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens on {cfg.threads} thread(s); a line every 100 steps")
    documents = training_documents(cfg.data)  # read and split once: training, then the held-out scores
    model, tokenizer, hist, summary = train_lm(
        cfg, on_log=lambda r: log(f"step {int(r['step'])}/{cfg.steps} loss {r['loss']:.3f} "
                                  f"val {r['val_loss']:.3f} ({r['seconds']:.0f} s)"), documents=documents)
    command = "outlierkit train-lm " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["train-lm"] else None
    with staged_output(args.out, force=args.force) as stage:
        save_lm(model, tokenizer, stage, cfg, {"command": command, "history": hist, **summary})
        # The artifact is the product: score what was written (bf16 weights, saved tokenizer), reloaded.
        lm = load_model(str(stage), dtype="fp32", device="cpu")
        test_docs = documents[1]
        rep = Report(kind="llm.train_lm", config=asdict(cfg))
        rep.metrics.update({"final_loss": hist[-1]["loss"], "final_val_loss": hist[-1]["val_loss"],
                            "seconds": hist[-1]["seconds"], **summary})
        by_source: dict[str, list] = {}
        for d in test_docs:
            by_source.setdefault("built-in" if d.source.startswith("default:") else Path(d.source).name,
                                 []).append(d)
        for name, docs in by_source.items():
            ppl = perplexity(lm.model, lm.tokenizer, docs, window=128, max_windows=64)
            rep.metrics[f"heldout_ppl[{name}]"] = ppl["ppl"]
            log(f"held-out perplexity on {name}: {ppl['ppl']:.2f} ({int(ppl['eval_tokens'])} tokens)")
        rep.add_table("loss", hist)
        fig, ax = new_figure(figsize=(5, 3))
        ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label="train")
        ax.plot([h["step"] for h in hist], [h["val_loss"] for h in hist], label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        save_figure(fig, stage, "loss", rep)
        rep.save(stage)
    if "kept_step" in summary:
        log(f"kept the weights of step {summary['kept_step']} (validation loss {summary['kept_val_loss']:.3f})")
    log(f"saved {args.out}")
    return 0
