"""The graph-detector contract (scikit-learn estimator + PyOD detector) and the detector registry."""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.base import BaseEstimator
from torch import Tensor

from outlierkit.config import to_dict
from outlierkit.errors import ConfigError, DataError
from outlierkit.graph.data import PackedGraphs, pack
from outlierkit.registry import Registry

Graphs = PackedGraphs | Sequence[Any] | Any  # also a PyG Batch, Dataset or DataLoader (see ``data.pack``)
DETECTORS: Registry[type[GraphDetector]] = Registry("graph detector")


def check_labels(y: Tensor | None, where: str = "training labels") -> Tensor:
    """0/1 labels with both classes present (the supervised protocol needs anomalies and normals)."""
    if y is None:
        raise DataError(f"{where} are required: pass y (1 = anomaly, 0 = normal) or graphs that carry .y")
    bad = set(torch.unique(y).tolist()) - {0, 1}
    if bad:
        raise DataError(f"{where} must be 0 (normal) or 1 (anomaly), found {sorted(bad)}")
    counts = torch.bincount(y, minlength=2)
    if int(counts.min()) == 0:
        raise DataError(f"{where} hold a single class ({int(counts.argmax())}); need normal and anomalous graphs")
    return y


@dataclass
class GraphDetector(BaseEstimator, ABC):  # type: ignore[misc]  # BaseEstimator: sklearn's tags, clone, search
    """Base of every graph-level detector: ``fit`` / ``decision_function`` / ``predict`` / ``predict_proba``.

    The scikit-learn estimator contract: hyperparameters are the dataclass init fields, read and written
    with ``get_params`` / ``set_params`` (so ``sklearn.base.clone`` and ``GridSearchCV`` work; ``score`` is
    the ROC-AUC); fitted attributes end in ``_`` and are not hyperparameters. The PyOD detector contract:
    after ``fit``, ``decision_scores_`` (training scores), ``threshold_`` and ``labels_`` (training
    predictions); ``contamination`` sets ``threshold_`` at that quantile of the training scores (PyOD's
    rule), while None keeps each detector's own threshold (0.5 for the supervised ones, the paper's argmax).

    ``decision_function`` is higher for more anomalous graphs; ``predict`` is ``score > threshold_``
    (1 = anomaly); ``predict_proba`` has columns (normal, anomaly). Graphs are ``PackedGraphs``, a
    sequence of PyG ``Data`` objects (``.x``, ``.edge_index``), a PyG ``Batch``, ``Dataset`` or
    ``DataLoader`` (one score per graph).
    """

    name: ClassVar[str] = ""
    supports_save: ClassVar[bool] = False
    contamination: float | None = field(default=None, kw_only=True)
    threshold_: float = field(init=False, default=math.nan, repr=False)
    n_features_in_: int = field(init=False, default=0, repr=False)
    decision_scores_: np.ndarray | None = field(init=False, default=None, repr=False)
    labels_: np.ndarray | None = field(init=False, default=None, repr=False)

    @abstractmethod
    def fit(self, graphs: Graphs, y: Any = None, *, val_graphs: Graphs | None = None,
            val_y: Any = None) -> GraphDetector:
        """Fit on labelled graphs; ``val_*`` (optional) is used for early stopping / model selection."""

    @abstractmethod
    def decision_function(self, graphs: Graphs) -> np.ndarray:
        """Anomaly scores, shape (G,); higher = more anomalous."""

    @abstractmethod
    def predict_proba(self, graphs: Graphs) -> np.ndarray:
        """Probabilities, shape (G, 2): columns normal, anomaly."""

    def predict(self, graphs: Graphs) -> np.ndarray:
        """0/1 labels, shape (G,): 1 where ``decision_function > threshold_``."""
        self._check_fitted()
        return (self.decision_function(graphs) > self.threshold_).astype(np.int64)

    def score(self, graphs: Graphs, y: Any = None) -> float:
        """ROC-AUC of ``decision_function`` against ``y`` (or the graphs' own ``.y``): scikit-learn's ``score``."""
        from outlierkit.graph.metrics import roc_auc

        packed = pack(graphs, y)
        yt = check_labels(packed.y, "labels to score against")
        return roc_auc(yt.numpy(), self.decision_function(packed))

    # --- scikit-learn estimator contract ----------------------------------------------------------
    @classmethod
    def param_names(cls) -> list[str]:
        """The hyperparameters: init fields of the dataclass (fitted ``*_`` attributes are not among them)."""
        return sorted(f.name for f in dataclasses.fields(cls) if f.init)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyperparameters by name (scikit-learn's ``get_params``; nothing is nested, so ``deep`` is moot)."""
        return {k: getattr(self, k) for k in self.param_names()}

    def set_params(self, **params: Any) -> GraphDetector:
        """Set hyperparameters in place (scikit-learn's ``set_params``), type-checked; returns ``self``."""
        from outlierkit.config import coerce

        hints = _init_hints(type(self))
        for key, value in params.items():
            check_param_name(type(self), key)
            setattr(self, key, coerce(value, hints[key], f"{self.name}.{key}"))
        return self

    def params(self) -> dict[str, Any]:
        """Hyperparameters (the dataclass init fields), JSON-ready."""
        return {k: to_dict(v) for k, v in self.get_params().items()}

    # --- shared helpers ---------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if math.isnan(self.threshold_):
            raise ConfigError(f"{type(self).__name__} is not fitted yet; call fit(graphs, y) first")

    def _packed(self, graphs: Graphs) -> PackedGraphs:
        packed = pack(graphs)
        if self.n_features_in_ and packed.num_features != self.n_features_in_:
            raise DataError(f"graphs have {packed.num_features} node features but the detector was fitted on "
                            f"{self.n_features_in_}; encode them the same way (same node-label categories)")
        return packed

    def _set_threshold(self, train_scores: np.ndarray, default: float) -> None:
        """PyOD's fitted attributes from the training scores: ``decision_scores_``, ``threshold_``, ``labels_``."""
        c = self.contamination
        if c is not None and not 0.0 < c <= 0.5:
            raise ConfigError(f"contamination must be in (0, 0.5] (PyOD's range) or None, got {c}")
        self.decision_scores_ = np.asarray(train_scores, dtype=np.float64)
        self.threshold_ = default if c is None else float(np.quantile(self.decision_scores_, 1.0 - c))
        self.labels_ = (self.decision_scores_ > self.threshold_).astype(np.int64)

    def _check_params(self) -> None:
        if self.contamination is not None and not 0.0 < self.contamination <= 0.5:
            raise ConfigError(f"contamination must be in (0, 0.5] (PyOD's range) or None, got {self.contamination}")

    def save(self, path: Any) -> None:
        raise ConfigError(f"detector {self.name!r} cannot be saved; savable detectors: "
                          f"{[n for n, c in DETECTORS.items() if c.supports_save]}")


def _init_hints(cls: type) -> dict[str, Any]:
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def check_param_name(cls: type[GraphDetector], key: str) -> None:
    """A clear error for a key that is not a hyperparameter of ``cls`` (fitted attributes named as such)."""
    names = cls.param_names()
    if key in names:
        return
    fitted = {f.name for f in dataclasses.fields(cls) if not f.init}
    if key in fitted or key.endswith("_"):
        raise ConfigError(f"{key!r} is a fitted attribute of {cls.name!r} (set by fit), not a hyperparameter; "
                          f"valid keys: {names}")
    raise ConfigError(f"unknown key {key!r} for detector {cls.name!r}; valid keys: {names}")
