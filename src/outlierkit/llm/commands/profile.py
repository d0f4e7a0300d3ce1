"""``outlierkit profile [MODEL ...]``: measure activation outliers; several models give a comparison table."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", default=["minilm"],
                        help="model directories or names in the local HF cache (default: the bundled MiniLM)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text files, directories, JSONL or saved datasets (default: built-in corpus)")
    parser.add_argument("--text-field", default="text", help="JSONL/dataset field holding the text (default: text)")
    parser.add_argument("--samples", type=int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--seq-len", type=int, default=128, help="maximum tokens per sample (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default: 8)")
    parser.add_argument("--level", choices=("basic", "default", "full"), default="default",
                        help="basic: layer outputs; default: + router, experts, SwiGLU gate/product; "
                             "full: + every linear's input and output")
    parser.add_argument("--hist-stride", type=int, default=None,
                        help="histogram quantiles, kurtosis and mean|x| use one token in N (default 8; 1 = exact, "
                             "the default at --level full); maxima, locations and moments use every token")
    parser.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default), fp16, auto")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--device-map", default=None, help="accelerate device map for models larger than a device")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model dir")
    parser.add_argument("--out", default="runs/profile", help="output directory (default: runs/profile)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="save statistics every N batches (10)")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling seed (default: 0)")
    parser.add_argument("--massive-abs", type=float, default=100.0, help="massive token: max|x| above this (100)")
    parser.add_argument("--massive-ratio", type=float, default=1000.0,
                        help="massive token: max|x| / median|x| above this (1000)")
    parser.add_argument("--no-int8-check", action="store_true", help="skip the INT8 reconstruction check")


def _init_distributed() -> tuple[int, int]:
    """Under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on GPU. Returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit.errors import ConfigError
    from outlierkit.llm.profile import ProfileOptions

    if args.samples < 1 or args.seq_len < 2 or args.batch_size < 1:
        raise ConfigError("--samples, --batch-size must be >= 1 and --seq-len >= 2")
    if not args.resume:
        check_output(args.out, force=args.force)
    opts = ProfileOptions(level=args.level, batch_size=args.batch_size, hist_stride=args.hist_stride,
                          massive_abs=args.massive_abs,
                          massive_ratio=args.massive_ratio, calib_fraction=0.0 if args.no_int8_check else 1 / 3,
                          checkpoint_every=args.checkpoint_every)
    rank, world = _init_distributed()
    config = {k: v for k, v in vars(args).items()}
    config["world_size"] = world
    if rank != 0:
        run_profiles(args, opts, None, config, shard=(rank, world))
        return 0
    with staged_output(args.out, force=args.force, resume=args.resume, keep_on_error=True) as stage:
        report, summary = run_profiles(args, opts, stage, config, shard=(rank, world))
    print_summary(summary, Path(args.out))
    return 0


def run_profiles(args: argparse.Namespace, opts: Any, stage: Path | None, config: dict[str, Any],
                 shard: tuple[int, int] = (0, 1)) -> tuple[Any, list[dict[str, Any]]]:
    """Profile every model in ``args.models``; returns (report, summary rows). Used by demo too."""
    import gc
    import warnings

    from outlierkit._utils.log import log
    from outlierkit._utils.seed import seed_everything
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.models import load_model
    from outlierkit.llm.profile import ActivationProfile, merge_distributed, profile_model
    from outlierkit.llm.profile_report import build_profile_report, summary_row

    seed_everything(args.seed)
    docs = load_documents(args.data, text_field=args.text_field)
    profiles: list[ActivationProfile] = []
    texts: list[Any] = []
    notes: list[str] = []
    for k, source in enumerate(args.models):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_model(source, dtype=args.dtype, device=args.device, device_map=args.device_map,
                                trust_remote_code=args.trust_remote_code)
        notes += [f"{loaded.name}: {w.message}" for w in caught if "outlierkit" in str(w.filename) or
                  "architecture" in str(w.message) or "fp16" in str(w.message)]
        name = loaded.name if loaded.name not in [p.model for p in profiles] else f"{loaded.name}#{k}"
        done = stage / f"profile-{k}" if stage is not None else None
        if done is not None and args.resume and done.with_suffix(".json").exists():
            log(f"{name}: already profiled, loaded from {done.name}")
            prof = ActivationProfile.load(done)
        else:
            corpus = build_corpus(loaded.tokenizer, docs, samples=args.samples, seq_len=args.seq_len,
                                  seed=args.seed, max_length=loaded.max_length)
            log(f"{name}: {len(corpus)} samples, {corpus.n_tokens} tokens, level {opts.level}, "
                f"{loaded.map.spec.name} table entry")
            ckpt = stage / f"checkpoint-{k}" if stage is not None and shard[1] == 1 else None
            prof = profile_model(loaded.model, loaded.map, corpus, opts, name=name, checkpoint=ckpt,
                                 resume=args.resume, shard=shard)
            prof = merge_distributed(prof)
            if done is not None:
                prof.save(done)
                for suffix in (".json", ".safetensors"):
                    if ckpt is not None and ckpt.with_suffix(suffix).exists():
                        ckpt.with_suffix(suffix).unlink()
        profiles.append(prof)
        tok = loaded.tokenizer
        texts.append(lambda i, tok=tok: tok.convert_ids_to_tokens(int(i)))
        del loaded
        gc.collect()
    if stage is None:
        return None, []
    report = build_profile_report(profiles, texts, stage, config, warnings=notes)
    for k in range(len(profiles)):
        report.artifacts[f"statistics_{k}"] = f"profile-{k}.safetensors"
    report.save(stage)
    return report, [summary_row(p, t) for p, t in zip(profiles, texts, strict=True)]


def print_summary(rows: list[dict[str, Any]], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Activation outliers (global max over embedding, residual, attention, MLP, final norm)")
    cols = ["model", "global_max", "where", "token", "massive_tokens", "int8_absmax_sqnr_db_at_peak",
            "int8_p99.9_sqnr_db_at_peak"]
    heads = ["model", "global max", "where", "token", "massive tokens", "INT8 SQNR@peak (absmax)",
             "INT8 SQNR@peak (p99.9)"]
    for h in heads:
        table.add_column(h)
    for r in rows:
        table.add_row(*[cell(r.get(c)) for c in cols])
    console = Console()
    console.print(table)
    console.print(f"report: {out / 'report.md'} (plots: layerwise_max.png, top_channels.png, sqnr_vs_max.png)")


def cell(v: Any, none: str = "") -> str:
    """A table cell: floats to 4 significant digits, None as ``none``."""
    if v is None:
        return none
    return f"{v:.4g}" if isinstance(v, float) else str(v)
