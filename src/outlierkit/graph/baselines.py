"""Non-GNN baselines: Rayleigh-quotient/size features with a random forest or an isolation forest."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from outlierkit.errors import DataError
from outlierkit.graph.base import DETECTORS, GraphDetector, Graphs, check_labels
from outlierkit.graph.data import PackedGraphs, pack
from outlierkit.graph.rayleigh import rayleigh_quotient


def spectral_features(graphs: PackedGraphs) -> np.ndarray:
    r"""Per graph: the normalized Rayleigh-quotient vector, the channel shares and size statistics.

    ``[r_G (F), mean_v x_v (F), log(1+n), log(1+m), m / n]`` with ``n`` nodes and ``m`` undirected edges:
    what a classical detector can see of the spectrum and composition without message passing.

    Shapes:
        graphs: G graphs with F features -> (G, 2F + 3).
    """
    batch = graphs.batch_vector()
    rq = rayleigh_quotient(graphs.x, graphs.edge_index, batch, graphs.num_graphs, normalize=True)
    n = graphs.graph_sizes().float().clamp_min(1)
    mean = torch.zeros(graphs.num_graphs, graphs.num_features).index_add_(0, batch, graphs.x.float())
    mean = mean / n.unsqueeze(1)  # (G, F)
    m = graphs.edge_counts().float() / 2
    size = torch.stack([torch.log1p(n), torch.log1p(m), m / n], 1)  # (G, 3)
    return torch.cat([rq, mean, size], 1).numpy().astype(np.float64)


@dataclass
class _FeatureDetector(GraphDetector):
    seed: int = 10

    def _features(self, graphs: Graphs) -> np.ndarray:
        return spectral_features(self._packed(graphs))


@DETECTORS.register("rq_forest")
@dataclass
class RQForestDetector(_FeatureDetector):
    """Supervised non-GNN baseline: ``spectral_features`` + a class-balanced random forest (scikit-learn).

    Breiman, "Random Forests", Machine Learning 2001. Score = forest probability of the anomaly class;
    threshold 0.5. The validation set, when given, is not used (nothing to early-stop).

    Args:
        n_estimators: trees (default: 300).
        min_samples_leaf: leaf size (default: 1).
        seed: random state (default: 10).

    Shapes:
        graphs: G graphs -> decision_function (G,), predict_proba (G, 2).
    """

    name: ClassVar[str] = "rq_forest"
    n_estimators: int = 300
    min_samples_leaf: int = 1
    model_: Any = field(init=False, default=None, repr=False)

    def fit(self, graphs: Graphs, y: Any = None, *, val_graphs: Graphs | None = None,
            val_y: Any = None) -> RQForestDetector:
        from sklearn.ensemble import RandomForestClassifier

        self._check_params()
        data = pack(graphs, y)
        yt = check_labels(data.y)
        self.n_features_in_ = data.num_features
        feats = spectral_features(data)
        self.model_ = RandomForestClassifier(
            n_estimators=self.n_estimators, min_samples_leaf=self.min_samples_leaf,
            class_weight="balanced_subsample", random_state=self.seed, n_jobs=1,
        ).fit(feats, yt.numpy())
        self._set_threshold(np.asarray(self.model_.predict_proba(feats))[:, 1], 0.5)
        return self

    def predict_proba(self, graphs: Graphs) -> np.ndarray:
        self._check_fitted()
        return np.asarray(self.model_.predict_proba(self._features(graphs)), dtype=np.float64)

    def decision_function(self, graphs: Graphs) -> np.ndarray:
        return self.predict_proba(graphs)[:, 1]


@DETECTORS.register("rq_iforest")
@dataclass
class RQIsolationForestDetector(_FeatureDetector):
    """One-class non-GNN baseline: isolation forest on ``spectral_features`` of the *normal* training graphs.

    Liu et al., "Isolation Forest", ICDM 2008. Protocol (b) of the field: anomaly labels are only used
    to drop anomalies from training and to set ``threshold_`` at the training anomaly rate (PyOD's
    contamination rule; ``contamination`` overrides that rate). Score = ``-score_samples`` (higher = more
    anomalous); ``predict_proba`` is the score min-max scaled over the training graphs and clipped to [0, 1].

    Args:
        n_estimators: trees (default: 300).
        seed: random state (default: 10).

    Shapes:
        graphs: G graphs -> decision_function (G,), predict_proba (G, 2).
    """

    name: ClassVar[str] = "rq_iforest"
    n_estimators: int = 300
    model_: Any = field(init=False, default=None, repr=False)
    score_range_: tuple[float, float] = field(init=False, default=(0.0, 1.0), repr=False)

    def fit(self, graphs: Graphs, y: Any = None, *, val_graphs: Graphs | None = None,
            val_y: Any = None) -> RQIsolationForestDetector:
        from sklearn.ensemble import IsolationForest

        self._check_params()
        data = pack(graphs, y)
        yt = check_labels(data.y).numpy()
        feats = spectral_features(data)
        normal = feats[yt == 0]
        if normal.shape[0] < 2:
            raise DataError("rq_iforest needs at least 2 normal training graphs")
        self.n_features_in_ = data.num_features
        self.model_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(normal)
        train_scores = -self.model_.score_samples(feats)
        self._set_threshold(train_scores, float(np.quantile(train_scores, 1.0 - float(yt.mean()))))
        self.score_range_ = (float(train_scores.min()), float(train_scores.max()))
        return self

    def decision_function(self, graphs: Graphs) -> np.ndarray:
        self._check_fitted()
        return np.asarray(-self.model_.score_samples(self._features(graphs)), dtype=np.float64)

    def predict_proba(self, graphs: Graphs) -> np.ndarray:
        lo, hi = self.score_range_
        p1 = np.clip((self.decision_function(graphs) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
        return np.stack([1.0 - p1, p1], axis=1)
