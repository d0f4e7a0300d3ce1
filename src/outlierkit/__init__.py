"""outlierkit: find outliers and put them to work.

Three parts share only the registry, config, report, CLI and ``_utils``:

- ``outlierkit.llm``: activation-outlier profiling and outlier-aware quantization of Hugging Face models;
- ``outlierkit.graph``: graph-level anomaly detection with RQGNN;
- ``outlierkit.diffusion``: masked-diffusion LM sampling and HEX test-time scaling.
"""

from __future__ import annotations

__version__ = "0.1.0"

from outlierkit.errors import (
    ConfigError,
    DataError,
    ModelLoadError,
    NumericalError,
    OutlierkitError,
    OutputExistsError,
    UnknownNameError,
    UnsupportedArchitectureError,
)
from outlierkit.registry import Registry
from outlierkit.report import Report

__all__ = [
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "NumericalError",
    "OutlierkitError",
    "OutputExistsError",
    "Registry",
    "Report",
    "UnknownNameError",
    "UnsupportedArchitectureError",
    "__version__",
]
