"""Quantization methods, registered by name in :data:`METHODS` (one file each; imported explicitly)."""

from __future__ import annotations

from outlierkit.llm.methods import gptq as gptq  # noqa: F401
from outlierkit.llm.methods import llm_int8 as llm_int8  # noqa: F401
from outlierkit.llm.methods import os_plus as os_plus  # noqa: F401
from outlierkit.llm.methods import real_int8 as real_int8  # noqa: F401
from outlierkit.llm.methods import rotate as rotate  # noqa: F401
from outlierkit.llm.methods import rtn as rtn  # noqa: F401
from outlierkit.llm.methods import smoothquant as smoothquant  # noqa: F401
from outlierkit.llm.methods import spike_mp as spike_mp  # noqa: F401
from outlierkit.llm.methods.base import METHODS, LayerRecord, QuantContext, QuantMethod

__all__ = ["METHODS", "LayerRecord", "QuantContext", "QuantMethod"]
