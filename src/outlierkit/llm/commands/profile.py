"""``outlierkit profile [MODEL ...]``: measure activation outliers; several models give a comparison table."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from outlierkit._utils.args import nonneg_int, positive_float, positive_int

# The INT8 check calibrates thresholds on a third of the samples and evaluates them on the rest.
MIN_INT8_SAMPLES = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="*", default=["minilm"],
                        help="model directories or names in the local HF cache (default: the bundled MiniLM)")
    parser.add_argument("--data", nargs="+", default=None,
                        help="text files, directories, JSONL or saved datasets (default: built-in corpus)")
    parser.add_argument("--text-field", default="text", help="JSONL/dataset field holding the text (default: text)")
    parser.add_argument("--samples", type=positive_int, default=64, help="number of samples (default: 64)")
    parser.add_argument("--seq-len", type=positive_int, default=128, help="maximum tokens per sample (default: 128)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="samples per forward pass (default: 8)")
    parser.add_argument("--level", choices=("basic", "default", "full"), default="default",
                        help="basic: layer outputs; default: + router, experts, SwiGLU gate/product; "
                             "full: + every linear's input and output")
    parser.add_argument("--hist-stride", type=positive_int, default=None,
                        help="histogram quantiles, kurtosis, mean|x| and the INT8 check's errors use one token in N "
                             "(default 8; 1 = exact, the default at --level full); maxima, locations, moments and "
                             "the INT8 thresholds use every token")
    parser.add_argument("--dtype", default=None, help="fp32 (CPU default), bf16 (GPU default), fp16, auto")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--device-map", default=None, help="accelerate device map for models larger than a device")
    parser.add_argument("--sequential", action="store_true",
                        help="models larger than the device, without a device map: keep the weights in CPU memory "
                             "and run one decoder layer at a time on --device (16 batches per pass)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model dir")
    parser.add_argument("--out", default="runs/profile", help="output directory (default: runs/profile)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    parser.add_argument("--checkpoint-every", type=nonneg_int, default=10,
                        help="save statistics every N batches (default 10; 0: never)")
    parser.add_argument("--seed", type=int, default=0, help="corpus sampling seed (default: 0)")
    parser.add_argument("--massive-abs", type=positive_float, default=100.0,
                        help="massive token: max|x| above this (100)")
    parser.add_argument("--massive-ratio", type=positive_float, default=1000.0,
                        help="massive token: max|x| / median|x| above this (1000)")
    parser.add_argument("--no-int8-check", action="store_true",
                        help=f"skip the INT8 reconstruction check (skipped with a warning below {MIN_INT8_SAMPLES} "
                             "samples)")


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


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def run(args: argparse.Namespace) -> int:
    """Profile, write the report, print the summary; exit 3 when NaN/Inf made the statistics unusable."""
    from outlierkit._utils.io import check_output, partial_dir, staged_output
    from outlierkit._utils.log import warning
    from outlierkit.errors import ConfigError
    from outlierkit.llm.profile import ProfileOptions

    if args.seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, got {args.seq_len}")
    if not args.resume:
        check_output(args.out, force=args.force)
    int8_check = not args.no_int8_check
    if int8_check and args.samples < MIN_INT8_SAMPLES:
        warning(f"the INT8 check needs at least {MIN_INT8_SAMPLES} samples (a third calibrates, the rest "
                f"evaluates); with --samples {args.samples} it is skipped")
        int8_check = False
    opts = ProfileOptions(level=args.level, batch_size=args.batch_size, hist_stride=args.hist_stride,
                          massive_abs=args.massive_abs,
                          massive_ratio=args.massive_ratio, calib_fraction=1 / 3 if int8_check else 0.0,
                          checkpoint_every=args.checkpoint_every)
    rank, world = _init_distributed()
    config = {k: v for k, v in vars(args).items()}
    config["world_size"] = world
    config["int8_check"] = int8_check
    if rank != 0:
        # Rank 0 owns OUT.partial; the other ranks keep their checkpoints in it, once rank 0 made it.
        _barrier(world)
        run_profiles(args, opts, None, config, shard=(rank, world), work_dir=partial_dir(args.out))
        return 0
    with staged_output(args.out, force=args.force, resume=args.resume, keep_on_error=True) as stage:
        pin_inputs(stage, {**run_inputs(args, int8_check), "world_size": world}, resume=args.resume)
        _barrier(world)
        try:
            report, summary = run_profiles(args, opts, stage, config, shard=(rank, world))
        except BaseException:
            if [f.name for f in stage.iterdir()] == [INPUTS_FILE]:  # nothing to resume: leave no OUT.partial
                (stage / INPUTS_FILE).unlink()
            raise
        (stage / INPUTS_FILE).unlink(missing_ok=True)  # only needed while the run can be resumed
    print_summary(summary, Path(args.out))
    bad = report.tables.get(NONFINITE_TABLE, []) if report is not None else []
    if bad or (report is not None and report.metrics.get("unusable")):
        print_nonfinite(bad)
        models = sorted({str(r["model"]) for r in bad}) or [str(m) for m in args.models]
        from outlierkit.cli import EXIT_UNUSABLE, print_error

        print_error(f"the forward pass of {', '.join(models)} produced NaN/Inf at {len(bad)} site(s) (table "
                    f"above); the statistics are unusable. The report in {args.out} is kept for diagnosis (exit "
                    f"{EXIT_UNUSABLE}). Check the weights and --dtype (fp16 overflows on outliers)")
        return EXIT_UNUSABLE
    return 0


NONFINITE_TABLE = "nonfinite_sites"
INPUTS_FILE = "inputs.json"
# Options that change which tokens are profiled or how they are counted: a resume must not mix them.
RESUME_KEYS = ("models", "data", "text_field", "samples", "seq_len", "seed", "level", "hist_stride", "batch_size",
               "massive_abs", "massive_ratio", "dtype", "int8_check")


def _fingerprint(path: str) -> Any:
    """A data path by size and modification time (every file under a directory), so edited data is noticed."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    return [str(p.resolve()), [[str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size,
                                f.stat().st_mtime_ns] for f in files]]


def run_inputs(args: argparse.Namespace, int8_check: bool) -> dict[str, Any]:
    """What a run profiles, in a JSON-comparable form (model paths resolved, data fingerprinted)."""
    values = {k: getattr(args, k, None) for k in RESUME_KEYS}
    values["int8_check"] = int8_check
    values["models"] = [str(Path(m).resolve()) if Path(m).exists() else m for m in args.models]
    values["data"] = [_fingerprint(d) for d in args.data] if args.data else None
    return json.loads(json.dumps(values))


def pin_inputs(stage: Path, inputs: dict[str, Any], *, resume: bool) -> None:
    """Record the inputs in ``OUT.partial``; ``--resume`` with other inputs is refused (it would mix corpora)."""
    from outlierkit._utils.io import atomic_write_text
    from outlierkit.errors import ConfigError

    path = stage / INPUTS_FILE
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            before = None
        if not isinstance(before, dict):
            raise ConfigError(f"{path} is unreadable; cannot check that --resume continues the same run (delete "
                              f"{stage} and run without --resume)")
        changed = [k for k in (*RESUME_KEYS, "world_size") if before.get(k) != inputs.get(k)]
        if changed:
            what = ", ".join(f"--{k.replace('_', '-')}" + (f" {before.get(k)} -> {inputs.get(k)}"
                                                           if k not in ("data", "models") else " (changed)")
                             for k in changed)
            raise ConfigError(f"--resume with other inputs than the interrupted run in {stage}: {what}; rerun "
                              "with the same options, or without --resume to start over")
        return
    atomic_write_text(path, json.dumps(inputs, indent=1) + "\n")


def nonfinite_rows(prof: Any, token_text: Any) -> list[dict[str, Any]]:
    """One row per site whose tensors held NaN/Inf, including sites where every token was non-finite.

    Read defensively (``getattr``): the counters live on the profiler's per-site statistics.
    """
    from outlierkit.llm.profile import fmt_loc

    rows = []
    for site in prof.sites:
        st = prof.stats[site.name]
        n = int(getattr(st, "nonfinite_tokens", 0) or 0)
        if not n:
            continue
        loc = getattr(st, "loc_nonfinite", None)
        where = fmt_loc(loc, token_text) if loc is not None else {}
        rows.append({"model": prof.model, "site": site.name, "kind": site.kind, "nonfinite_tokens": n,
                     "finite_tokens": int(getattr(st, "tokens", 0) or 0),
                     "all_nonfinite": not getattr(st, "count", 0),
                     "first_sample": where.get("sample"), "first_pos": where.get("pos"),
                     "first_token": where.get("token")})
    return rows


def print_nonfinite(rows: list[dict[str, Any]]) -> None:
    """The sites with NaN/Inf on the console (all-NaN sites too, which have no statistics to show)."""
    from rich.table import Table
    from rich.text import Text

    from outlierkit._utils.log import get_console

    table = Table(title="Sites with NaN/Inf activations (excluded from the statistics)", title_style="bold red")
    cols = ["model", "site", "kind", "nonfinite_tokens", "finite_tokens", "all_nonfinite", "first_sample",
            "first_pos", "first_token"]
    for c in cols:
        table.add_column(c.replace("_", " "))
    for r in rows:
        table.add_row(*[Text(cell(r.get(c))) for c in cols])  # tokens like [unused0] are not markup
    get_console().print(table)


def run_profiles(args: argparse.Namespace, opts: Any, stage: Path | None, config: dict[str, Any],
                 shard: tuple[int, int] = (0, 1), work_dir: Path | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Profile every model in ``args.models``; returns (report, summary rows). Used by demo too.

    ``stage`` is where rank 0 writes the report (``None`` on the other ranks); ``work_dir`` (default
    ``stage``) holds the checkpoints, one set per rank under ``torchrun``, and the finished profiles that
    ``--resume`` skips.
    """
    import gc
    import warnings

    from outlierkit._utils.device import placement
    from outlierkit._utils.log import log, warning
    from outlierkit._utils.log import stage as log_stage
    from outlierkit._utils.seed import seed_everything
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.models import load_model
    from outlierkit.llm.profile import ActivationProfile, checkpoint_path, merge_distributed, profile_model
    from outlierkit.llm.profile_report import build_profile_report, summary_row
    from outlierkit.llm.sequential import layerwise

    sequential = bool(getattr(args, "sequential", False))  # demo builds its own namespace
    if sequential and args.device_map:
        from outlierkit.errors import ConfigError

        raise ConfigError("--sequential and --device-map are two ways to fit a large model: give one")
    load_device, load_dtype, compute = placement(args.device, args.dtype, sequential)
    seed_everything(args.seed)
    docs = load_documents(args.data, text_field=args.text_field)
    profiles: list[ActivationProfile] = []
    texts: list[Any] = []
    notes: list[str] = []
    for k, source in enumerate(args.models):
        loading = log_stage(f"loading {source} ({k + 1}/{len(args.models)})")
        with loading, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_model(source, dtype=load_dtype, device=load_device,
                                device_map=args.device_map, trust_remote_code=args.trust_remote_code)
        for w in caught:  # outlierkit's own (fp16, generic fallback): on the console now and in the report
            if "outlierkit" in str(w.filename) or "architecture" in str(w.message) or "fp16" in str(w.message):
                notes.append(f"{loaded.name}: {w.message}")
                warning(notes[-1])
        name = loaded.name if loaded.name not in [p.model for p in profiles] else f"{loaded.name}#{k}"
        work = work_dir if work_dir is not None else stage
        done = work / f"profile-{k}" if work is not None else None
        if done is not None and args.resume and done.with_suffix(".json").exists():
            log(f"{name}: already profiled, loaded from {done.name}")
            prof = ActivationProfile.load(done)
        else:
            corpus = build_corpus(loaded.tokenizer, docs, samples=args.samples, seq_len=args.seq_len,
                                  seed=args.seed, max_length=loaded.max_length, vocab_size=loaded.vocab_rows)
            log(f"{name}: {len(corpus)} samples, {corpus.n_tokens} tokens, level {opts.level}, "
                f"{loaded.map.spec.name} table entry")
            # profile_model names one checkpoint per rank (checkpoint_path); no dots: with_suffix adds .json
            world = shard[1]
            ckpt = None if work is None else work / f"checkpoint-{k}"
            with layerwise(loaded.model, compute):
                prof = profile_model(loaded.model, loaded.map, corpus, opts, name=name, checkpoint=ckpt,
                                     resume=args.resume, shard=shard)
            prof = merge_distributed(prof)
            if done is not None and stage is not None:  # rank 0: every rank holds the merged profile
                prof.save(done)
            _barrier(world)  # the merged profile is saved before any rank drops its checkpoint
            for suffix in (".json", ".safetensors"):
                if ckpt is not None and checkpoint_path(ckpt, shard).with_suffix(suffix).exists():
                    checkpoint_path(ckpt, shard).with_suffix(suffix).unlink()
        profiles.append(prof)
        tok = loaded.tokenizer
        texts.append(lambda i, tok=tok: tok.convert_ids_to_tokens(int(i)))
        del loaded
        gc.collect()
    _barrier(shard[1])  # every rank is done with OUT.partial before rank 0 renames it
    if stage is None:
        return None, []
    log("writing the report and plots")
    report = build_profile_report(profiles, texts, stage, config, warnings=notes)
    for k in range(len(profiles)):
        report.artifacts[f"statistics_{k}"] = f"profile-{k}.safetensors"
    bad = [r for p, t in zip(profiles, texts, strict=True) for r in nonfinite_rows(p, t)]
    report.metrics["nonfinite_sites"] = len(bad)
    if bad:
        report.add_table(NONFINITE_TABLE, bad)
        report.warn(f"NaN/Inf in the forward pass at {len(bad)} site(s) ({sum(r['all_nonfinite'] for r in bad)} "
                    f"entirely non-finite): the statistics are unusable; see the {NONFINITE_TABLE} table")
    if any(getattr(p, "unusable", False) for p in profiles):  # the profiler's own verdict, where it has one
        report.metrics["unusable"] = True
    report.save(stage)
    return report, [summary_row(p, t) for p, t in zip(profiles, texts, strict=True)]


def print_summary(rows: list[dict[str, Any]], out: Path) -> None:
    from rich.table import Table
    from rich.text import Text

    from outlierkit._utils.log import stdout_console

    table = Table(title="Activation outliers (global max over embedding, residual, attention, MLP, final norm)")
    cols = ["model", "global_max", "where", "token", "massive_tokens", "int8_absmax_sqnr_db_at_peak",
            "int8_p99.9_sqnr_db_at_peak"]
    heads = ["model", "global max", "where", "token", "massive tokens (residual sites)", "INT8 SQNR@peak (absmax)",
             "INT8 SQNR@peak (p99.9)"]
    for h in heads:
        table.add_column(h)
    for r in rows:
        table.add_row(*[Text(cell(r.get(c))) for c in cols])  # tokens like [unused0] are not markup
    console = stdout_console()
    console.print(table)
    console.print(f"report: {out / 'report.md'} (plots: layerwise_max.png, top_channels.png, sqnr_vs_max.png)")


def cell(v: Any, none: str = "") -> str:
    """A table cell: floats to 4 significant digits, None as ``none``."""
    if v is None:
        return none
    return f"{v:.4g}" if isinstance(v, float) else str(v)
