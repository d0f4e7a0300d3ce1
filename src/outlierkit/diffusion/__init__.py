"""Masked-diffusion LM sampling (LLaDA-style semi-autoregressive blocks) and HEX test-time scaling.

Imports are lazy so that ``outlierkit hex --help`` does not load torch or transformers.
"""

from __future__ import annotations

from outlierkit._utils.lazy import lazy_exports

_EXPORTS = {
    "TokenSpec": "outlierkit.diffusion.sampler",
    "SamplerConfig": "outlierkit.diffusion.sampler",
    "GenerateOutput": "outlierkit.diffusion.sampler",
    "generate": "outlierkit.diffusion.sampler",
    "REMASKING": "outlierkit.diffusion.sampler",
    "Schedule": "outlierkit.diffusion.schedules",
    "SCHEDULES": "outlierkit.diffusion.schedules",
    "parse_schedules": "outlierkit.diffusion.schedules",
    "EXTRACTORS": "outlierkit.diffusion.voting",
    "VOTES": "outlierkit.diffusion.voting",
    "Ballot": "outlierkit.diffusion.voting",
    "HexConfig": "outlierkit.diffusion.hex",
    "HexResult": "outlierkit.diffusion.hex",
    "EvalConfig": "outlierkit.diffusion.hex",
    "hex_generate": "outlierkit.diffusion.hex",
    "evaluate_hex": "outlierkit.diffusion.hex",
    "paired_bootstrap": "outlierkit.diffusion.hex",
    "load_hf_model": "outlierkit.diffusion.hf",
    "TinyMDM": "outlierkit.diffusion.tiny",
    "TASKS": "outlierkit.diffusion.tiny",
    "train_tiny": "outlierkit.diffusion.tiny",
    "load_tiny": "outlierkit.diffusion.tiny",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
