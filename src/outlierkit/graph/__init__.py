"""Graph-level anomaly detection with RQGNN behind the scikit-learn/PyOD detector contract.

Imports are lazy so that ``outlierkit graph --help`` does not load torch or PyG.
"""

from __future__ import annotations

from outlierkit._utils.lazy import lazy_exports

_EXPORTS = {
    "GraphDetector": "outlierkit.graph.base",
    "DETECTORS": "outlierkit.graph.base",
    "RQGNNDetector": "outlierkit.graph.detector",
    "GINDetector": "outlierkit.graph.detector",
    "TorchGraphDetector": "outlierkit.graph.detector",
    "load_detector": "outlierkit.graph.detector",
    "get_detector": "outlierkit.graph.detectors",
    "make_detector": "outlierkit.graph.detectors",
    "detector_names": "outlierkit.graph.detectors",
    "RQForestDetector": "outlierkit.graph.baselines",
    "RQIsolationForestDetector": "outlierkit.graph.baselines",
    "load_tu": "outlierkit.graph.data",
    "TUData": "outlierkit.graph.data",
    "PackedGraphs": "outlierkit.graph.data",
    "pack": "outlierkit.graph.data",
    "stratified_split": "outlierkit.graph.data",
    "downsample_anomalies": "outlierkit.graph.data",
    "load_split": "outlierkit.graph.data",
    "DataConfig": "outlierkit.graph.data",
    "Task": "outlierkit.graph.data",
    "make_task": "outlierkit.graph.data",
    "roc_auc": "outlierkit.graph.metrics",
    "macro_f1": "outlierkit.graph.metrics",
    "auprc": "outlierkit.graph.metrics",
    "rayleigh_quotient": "outlierkit.graph.rayleigh",
    "RQGNN": "outlierkit.graph.model",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
