"""``outlierkit plan MODEL --max-loss X | --bits B --out DIR``: a per-layer precision plan, verified, as a recipe."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="minilm", help="model directory or 'minilm' (default)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--max-loss", type=float, default=None,
                        help="maximum quality loss vs float: relative ppl increase (ppl), 1 - agreement (top1) "
                             "or 1 - mean embedding cosine (cos), per --metric")
    target.add_argument("--bits", type=float, default=None,
                        help="average bits per block-linear weight (kept layers count 16), e.g. 8.5")
    parser.add_argument("--metric", default="auto", choices=("auto", "ppl", "top1", "cos"),
                        help="quality metric (auto: ppl for causal LMs, cos for encoders)")
    parser.add_argument("--weight", default="int8-channel", help="weight format of quantized layers (int8-channel)")
    parser.add_argument("--act", default="int8-tensor", help="activation format of quantized layers (int8-tensor)")
    parser.add_argument("--transforms", nargs="+", default=["rtn", "smoothquant", "os_plus"],
                        help="candidates (default: rtn smoothquant os_plus); also rotate (folded Hadamard; "
                             "refused families are dropped with a warning), per_group (per fold group the best "
                             "measured of rtn/smoothquant/os_plus, one mixed candidate) and gptq (each transform "
                             "also tried with GPTQ, taken per layer where its measured SQNR beats RTN)")
    parser.add_argument("--profile", default=None,
                        help="saved activation profile (default: profile the calibration data)")
    parser.add_argument("--data", nargs="+", default=None, help="text (default: built-in corpus), split in halves")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration samples (default: 32)")
    parser.add_argument("--samples", type=int, default=32, help="held-out samples (default: 32)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sample (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward (default: 8)")
    parser.add_argument("--max-windows", type=int, default=16, help="perplexity windows (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--export-ct", action="store_true",
                        help="also write the planned model (DIR/model): compressed-tensors, or outlierkit's format "
                             "for what it cannot express (per --target)")
    parser.add_argument("--target", default="transformers", choices=("transformers", "vllm", "outlierkit"),
                        help="who loads the result (default transformers); vllm: formats vLLM serves only, and "
                             "q/k/v and gate/up decided together (one fused layer in vLLM)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: auto)")
    parser.add_argument("--dtype", default=None,
                        help="fp32 (CPU default), bf16 (GPU default, also with --sequential on a GPU), fp16")
    parser.add_argument("--sequential", action="store_true",
                        help="models larger than the device: keep the model and its copies in CPU memory and run "
                             "every forward one decoder layer at a time on --device")
    parser.add_argument("--out", default="runs/plan", help="output directory (default: runs/plan)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit._utils.log import log
    from outlierkit._utils.seed import seed_everything
    from outlierkit.errors import ConfigError
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.evaluate import EvalData, split_documents
    from outlierkit.llm.formats import parse_format
    from outlierkit.llm.models import load_model
    from outlierkit.llm.plan import Planner, PlanTarget, plan_report
    from outlierkit.llm.recipe import CalibConfig

    if args.calib_samples < 1 or args.samples < 2 or args.seq_len < 2 or args.batch_size < 1 or args.max_windows < 1:
        raise ConfigError("--calib-samples/--batch-size/--max-windows must be >= 1, --samples/--seq-len >= 2")
    target = PlanTarget(max_loss=args.max_loss, bits=args.bits)
    weight, act = parse_format(args.weight, "--weight"), parse_format(args.act, "--act")
    from outlierkit.llm.recipe import Recipe, for_target

    probe = for_target(Recipe(weight=weight, act=act), args.target)
    weight, act = probe.weight, probe.act  # on the target's grid
    if args.target == "vllm":
        from outlierkit.llm.export_ct import recipe_vllm_problems

        problems = recipe_vllm_problems(probe)
        if problems:
            raise ConfigError("--weight/--act cannot be served by vLLM: " + "; ".join(problems)
                              + " (e.g. --act int8-token or --act int8-tensor-static)")
    check_output(args.out, force=args.force)
    seed_everything(args.seed)
    from outlierkit._utils.device import placement

    load_device, dtype, compute = placement(args.device, args.dtype, args.sequential)
    lm = load_model(args.model, dtype=dtype, device=load_device)
    calib_docs, held_docs = split_documents(load_documents(args.data))
    calib = build_corpus(lm.tokenizer, calib_docs, samples=args.calib_samples, seq_len=args.seq_len,
                         seed=args.seed, max_length=lm.max_length)
    held = build_corpus(lm.tokenizer, held_docs, samples=args.samples, seq_len=args.seq_len, seed=args.seed + 1,
                        max_length=lm.max_length)
    ev = EvalData(held.batches(args.batch_size), held_docs, causal=lm.map.spec.causal, window=args.seq_len,
                  max_windows=args.max_windows)
    cc = CalibConfig(samples=args.calib_samples, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    planner = Planner(lm.model, lm.tokenizer, calib.batches(args.batch_size), ev, weight=weight, act=act,
                      target=target, transforms=args.transforms, metric=args.metric, calib_config=cc,
                      name=f"plan-{lm.name}", profile=args.profile, fused=args.target == "vllm",
                      sequential=args.sequential, device=compute)
    log(f"{lm.name}: planning for {target.label()} ({planner.metric}) over {', '.join(args.transforms)}")
    plan = planner.run()
    report = plan_report(plan, target, {k: v for k, v in vars(args).items() if k != "func"})
    with staged_output(args.out, force=args.force) as stage:
        (stage / "recipe.yaml").write_text(plan.recipe.to_yaml(), encoding="utf-8")
        report.artifacts["recipe"] = "recipe.yaml"
        if args.export_ct:
            import copy

            from outlierkit.llm.export import save_quantized
            from outlierkit.llm.recipe import quantize_

            check = copy.deepcopy(plan.recipe)
            check.calib = CalibConfig(min_tokens=1)  # the data the plan was verified on
            quantize_(lm.model, check, calib.batches(args.batch_size), baseline=False, sequential=args.sequential,
                      device=compute)
            fmt = save_quantized(lm.model, lm.tokenizer, stage / "model", recipe_yaml=plan.recipe.to_yaml(),
                                 target=args.target)
            report.artifacts["model"] = "model/"
            report.config["saved_format"] = fmt
            report.metrics["export_weights_bytes"] = float(sum(f.stat().st_size
                                                               for f in (stage / "model").glob("*.safetensors")))
        report.save(stage)
    _print(plan, target, args.out)
    return 0 if plan.meets_target else 1


def _print(plan: object, target: object, out: str) -> None:
    from rich.table import Table

    from outlierkit._utils.log import stdout_console
    from outlierkit.llm.plan import Plan, PlanTarget
    from outlierkit.report import _fmt

    assert isinstance(plan, Plan) and isinstance(target, PlanTarget)
    table = Table(title=f"uniform alternatives vs the plan ({target.label()}, metric {plan.metrics['metric']})")
    for c in ("recipe", "kept float", "loss", "avg weight bits", "meets"):
        table.add_column(c)
    for r in plan.uniform:
        table.add_row(str(r["uniform"]), str(r["kept_float"]), _fmt(r["loss"]), _fmt(r["avg_weight_bits"]),
                      str(r["meets"]))
    table.add_row(f"planned: {plan.transform} + per-layer", str(len(plan.kept)), _fmt(plan.loss),
                  _fmt(plan.metrics["avg_weight_bits"]), str(plan.meets_target))
    console = stdout_console()
    console.print(table)
    for r in plan.layers:
        if r["method"] == "keep":
            console.print(f"keep {r['layer']}: {r['reason']}")
    console.print(f"recipe and report in {out}")
