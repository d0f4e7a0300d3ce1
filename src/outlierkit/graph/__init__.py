"""Graph-level anomaly detection with RQGNN behind the scikit-learn/PyOD detector contract.

Imports are lazy so that ``outlierkit graph --help`` does not load torch or PyG.
"""

from __future__ import annotations

from outlierkit._utils.lazy import lazy_exports

_EXPORTS = {
    "RQGNNDetector": "outlierkit.graph.detector",
    "GINDetector": "outlierkit.graph.detector",
    "DETECTORS": "outlierkit.graph.detector",
    "get_detector": "outlierkit.graph.detector",
    "make_detector": "outlierkit.graph.detector",
    "load_detector": "outlierkit.graph.detector",
    "RQForestDetector": "outlierkit.graph.baselines",
    "RQIsolationForestDetector": "outlierkit.graph.baselines",
    "load_tu": "outlierkit.graph.data",
    "PackedGraphs": "outlierkit.graph.data",
    "stratified_split": "outlierkit.graph.data",
    "downsample_anomalies": "outlierkit.graph.data",
    "rayleigh_quotient": "outlierkit.graph.rayleigh",
    "RQGNN": "outlierkit.graph.model",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
