"""Every graph detector, registered in one place; ``get_detector`` / ``make_detector`` by name."""

from __future__ import annotations

from typing import Any

import outlierkit.graph.baselines  # noqa: F401  (registers rq_forest, rq_iforest)
import outlierkit.graph.detector  # noqa: F401  (registers rqgnn, gin)
from outlierkit.graph.base import DETECTORS, GraphDetector, check_param_name


def get_detector(name: str) -> type[GraphDetector]:
    """The detector class registered as ``name``; an unknown name is an error listing the valid ones."""
    return DETECTORS.get(name)


def detector_names() -> list[str]:
    """Registered detector names, sorted."""
    return sorted(DETECTORS.names())


def make_detector(name: str, **params: Any) -> GraphDetector:
    """Instantiate detector ``name``; a key that is not a hyperparameter is a ``ConfigError`` listing valid ones."""
    from outlierkit.config import from_dict

    cls = get_detector(name)
    for key in params:
        check_param_name(cls, key)
    return from_dict(cls, params, where=f"detector {name!r}")
