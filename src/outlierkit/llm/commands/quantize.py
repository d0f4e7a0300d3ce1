"""``outlierkit quantize MODEL --recipe R.yaml --out DIR``: apply a recipe, save model + recipe + report."""

from __future__ import annotations

import argparse


def add_calib_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", nargs="+", default=None,
                        help="text files, directories or JSONL (default: the built-in corpus)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration samples (recipe: 32)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (recipe: 128)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per forward (recipe: 8)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (recipe: 0)")
    parser.add_argument("--dtype", default="fp32", help="fp32 (default), bf16, auto")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory, cached hub name or 'minilm' (the bundled MiniLM)")
    parser.add_argument("--recipe", required=True,
                        help="recipe YAML/JSON or a preset: fp32, w8a8-rtn, w8a8-smoothquant, w8a8-osplus")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--target", default=None, choices=("transformers", "vllm", "outlierkit"),
                        help="who loads the result (default: the recipe's target, else transformers): transformers "
                             "(compressed-tensors, simulated on its "
                             "grid; outlierkit's format for what it cannot express), vllm (compressed-tensors that "
                             "vLLM serves, refused otherwise) or outlierkit (its own format)")
    parser.add_argument("--sequential", action="store_true",
                        help="models larger than the device: keep the model in CPU memory and run every pass "
                             "(transforms, GPTQ, range observers, the report's SQNR passes) one decoder layer at a "
                             "time on --device")
    add_calib_arguments(parser)


def recipe_with_calib(args: argparse.Namespace, recipe: object) -> object:
    """The recipe with --calib-samples / --seq-len / --batch-size / --seed applied."""
    import dataclasses

    from outlierkit.errors import ConfigError
    from outlierkit.llm.recipe import Recipe

    assert isinstance(recipe, Recipe)
    changes = {k: v for k, v in (("samples", args.calib_samples), ("seq_len", args.seq_len),
                                 ("batch_size", args.batch_size), ("seed", args.seed)) if v is not None}
    for k, v in changes.items():
        if v < (2 if k == "seq_len" else 0 if k == "seed" else 1):
            raise ConfigError(f"--{k.replace('_', '-')} is too small: {v}")
    recipe.calib = dataclasses.replace(recipe.calib, **changes)
    return recipe


def run(args: argparse.Namespace) -> int:
    from outlierkit._utils import log, seed_everything
    from outlierkit._utils.io import check_output, staged_output
    from outlierkit.errors import ConfigError
    from outlierkit.llm.corpus import build_corpus, load_documents
    from outlierkit.llm.export import save_quantized
    from outlierkit.llm.export_ct import recipe_vllm_problems
    from outlierkit.llm.models import load_model
    from outlierkit.llm.recipe import Recipe, for_target, load_recipe, quantize_

    check_output(args.out, force=args.force)
    recipe = recipe_with_calib(args, load_recipe(args.recipe))
    assert isinstance(recipe, Recipe)
    args.target = args.target or recipe.target or "transformers"
    recipe = for_target(recipe, args.target)
    if args.target == "vllm":  # refuse before any work what the recipe's formats alone rule out
        problems = recipe_vllm_problems(recipe)
        if problems:
            raise ConfigError(f"recipe {recipe.name} cannot be served by vLLM: " + "; ".join(problems))
    seed_everything(recipe.calib.seed)
    from outlierkit.llm.evaluate import calibration_half

    docs = calibration_half(load_documents(args.data))  # `eval` / `compare` evaluate on the other half
    from outlierkit._utils.device import placement

    # --sequential: the weights stay in CPU memory (in the compute device's default dtype); each layer visits
    # --device only while it runs
    load_device, dtype, compute = placement(args.device, args.dtype, args.sequential)
    lm = load_model(args.model, dtype=dtype, device=load_device)
    corpus = build_corpus(lm.tokenizer, docs, samples=recipe.calib.samples, seq_len=recipe.calib.seq_len,
                          seed=recipe.calib.seed, max_length=lm.max_length)
    log(f"{lm.name}: recipe {recipe.name} ({' -> '.join(s.method for s in recipe.steps)}), "
        f"{len(corpus)} calibration samples, {corpus.n_tokens} tokens")
    report = quantize_(lm.model, recipe, corpus, sequential=args.sequential, device=compute)
    report.config.update({"model": args.model, "data": args.data, "dtype": args.dtype,
                          "sequential": args.sequential})
    report.config["target"] = args.target
    with staged_output(args.out, force=args.force) as stage:
        fmt = save_quantized(lm.model, lm.tokenizer, stage, recipe_yaml=recipe.to_yaml(), target=args.target)
        report.metrics["export_compressed_tensors"] = float(fmt == "compressed-tensors")
        report.artifacts.update({"model": "model.safetensors", "recipe": "recipe.yaml"})
        report.config["saved_format"] = fmt
        if fmt != "compressed-tensors":
            report.artifacts["quant_state"] = "outlierkit_quant.json"
            report.warn("saved in outlierkit's format (compressed-tensors cannot express this recipe): load it with "
                        "`outlierkit eval --quantized` or outlierkit.llm.export.load_quantized, not plain transformers")
        report.save(stage)
    m = report.metrics
    rtn = m.get("output_sqnr_db_rtn")
    print(f"{lm.name} -> {args.out}: output SQNR {m['output_sqnr_db']:.2f} dB"
          + (f" (plain RTN with the same formats: {rtn:.2f} dB)" if rtn is not None else "")
          + f", {m['layers_quantized']} layers quantized, "
          f"min layer SQNR {m.get('layer_sqnr_db_min', float('nan')):.2f} dB; saved as {fmt} (target {args.target})")
    for w in report.warnings:
        print(f"note: {w}")
    return 0
