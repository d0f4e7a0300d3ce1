"""The public Python API of the LLM part: load, profile, quantize_, evaluate, save/export and plan (lazy imports).

A typical session, as torchao's ``quantize_`` or llm-compressor's ``oneshot``::

    from outlierkit.llm import load_model, quantize_, evaluate_model, save_quantized
    lm = load_model("minilm")
    report = quantize_(lm.model, "w8a8-smoothquant", ["some calibration text", ...], tokenizer=lm.tokenizer)
    save_quantized(lm.model, lm.tokenizer, "out/")

Names resolve on first use (PEP 562), so ``import outlierkit.llm`` does not import torch or transformers.
"""

from __future__ import annotations

from outlierkit._utils.lazy import lazy_exports

_EXPORTS = {
    # load
    "load_model": "outlierkit.llm.models",
    "LoadedModel": "outlierkit.llm.models",
    "resolve": "outlierkit.llm.models",
    # data
    "load_documents": "outlierkit.llm.corpus",
    "build_corpus": "outlierkit.llm.corpus",
    "TokenCorpus": "outlierkit.llm.corpus",
    "Batch": "outlierkit.llm.corpus",
    # profile
    "profile_model": "outlierkit.llm.profile",
    "ProfileOptions": "outlierkit.llm.profile",
    "ActivationProfile": "outlierkit.llm.profile",
    # quantize
    "quantize_": "outlierkit.llm.recipe",
    "Recipe": "outlierkit.llm.recipe",
    "Step": "outlierkit.llm.recipe",
    "CalibConfig": "outlierkit.llm.recipe",
    "load_recipe": "outlierkit.llm.recipe",
    "PRESETS": "outlierkit.llm.recipe",
    "METHODS": "outlierkit.llm.methods",
    "parse_format": "outlierkit.llm.formats",
    # evaluate
    "evaluate_model": "outlierkit.llm.evaluate",
    "compare_recipes": "outlierkit.llm.evaluate",
    "perplexity": "outlierkit.llm.evaluate",
    "EvalData": "outlierkit.llm.evaluate",
    "PROTOCOL": "outlierkit.llm.evaluate",
    # save / export
    "save_quantized": "outlierkit.llm.export",
    "load_quantized": "outlierkit.llm.export",
    "export_compressed_tensors": "outlierkit.llm.export_ct",
    # plan
    "Planner": "outlierkit.llm.plan",
    "PlanTarget": "outlierkit.llm.plan",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
