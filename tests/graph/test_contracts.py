"""The contracts users of scikit-learn, PyOD and PyG rely on; threads, reproducibility, early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from graph_fixtures import planted_graphs
from torch_geometric.data import Batch, InMemoryDataset
from torch_geometric.loader import DataLoader

from outlierkit.errors import ConfigError, DataError
from outlierkit.graph import GINDetector, RQForestDetector, RQGNNDetector, RQIsolationForestDetector, make_task
from outlierkit.graph.detectors import make_detector

FAST = {"epochs": 6, "batch_size": 32}


def _labelled(num: int = 60, seed: int = 1) -> tuple[list, np.ndarray]:
    graphs, y = planted_graphs(num, 0.25, seed=seed)
    for g, lab in zip(graphs, y, strict=True):
        g.y = torch.tensor([int(lab)])
    return graphs, y


def test_package_exports_detectors_and_data_helpers():
    import outlierkit.graph as g

    for name in ("RQGNNDetector", "GINDetector", "RQForestDetector", "RQIsolationForestDetector", "load_tu",
                 "load_split", "make_task", "DataConfig", "pack", "get_detector", "make_detector"):
        assert name in g.__all__ and getattr(g, name) is not None
    assert make_task.__module__ == "outlierkit.graph.data"  # no longer only in the bench module


def test_no_import_cycle_between_baselines_and_detector():
    import ast
    import inspect

    import outlierkit.graph.baselines as b
    import outlierkit.graph.detector as d

    def imported(mod) -> set[str]:
        return {n.module for n in ast.walk(ast.parse(inspect.getsource(mod)))
                if isinstance(n, ast.ImportFrom) and n.module}

    assert "outlierkit.graph.detector" not in imported(b) and "outlierkit.graph.baselines" not in imported(d)


@pytest.mark.parametrize("cls", [RQGNNDetector, GINDetector, RQForestDetector, RQIsolationForestDetector])
def test_sklearn_get_set_params_and_clone(cls):
    from sklearn.base import clone

    det = cls(seed=3, contamination=0.1)
    params = det.get_params()
    assert params["seed"] == 3 and params["contamination"] == 0.1
    assert not any(k.endswith("_") for k in params)  # fitted attributes are not hyperparameters
    assert det.set_params(seed=5) is det and det.seed == 5
    twin = clone(det)
    assert twin is not det and twin.get_params() == det.get_params()
    with pytest.raises(ConfigError, match="fitted attribute"):
        det.set_params(threshold_=0.9)
    with pytest.raises(ConfigError, match="unknown key"):
        det.set_params(sed=1)


def test_grid_search_over_a_detector():
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    graphs, y = planted_graphs(60, 0.25, seed=1)
    search = GridSearchCV(RQForestDetector(n_estimators=10), {"min_samples_leaf": [1, 4]},
                          cv=StratifiedKFold(2, shuffle=True, random_state=0)).fit(graphs, y)
    assert search.best_params_["min_samples_leaf"] in (1, 4) and 0.0 <= search.best_score_ <= 1.0
    assert search.predict(graphs[:5]).shape == (5,)


@pytest.mark.parametrize("name", ["rqgnn", "rq_forest", "rq_iforest"])
def test_pyod_fitted_attributes_and_contamination(name):
    graphs, y = planted_graphs(60, 0.25, seed=1)
    params = dict(FAST) if name == "rqgnn" else {"n_estimators": 20}
    det = make_detector(name, **params).fit(graphs, y)
    n_train = det.decision_scores_.shape[0]
    assert n_train == 60 and det.labels_.shape == (60,)  # every graph given to fit (rqgnn holds out 9 internally)
    assert np.array_equal(det.labels_, (det.decision_scores_ > det.threshold_).astype(int))
    c = make_detector(name, **params, contamination=0.2).fit(graphs, y)
    assert c.threshold_ == pytest.approx(np.quantile(c.decision_scores_, 0.8))
    assert abs(c.labels_.mean() - 0.2) <= 0.05
    with pytest.raises(ConfigError, match="contamination"):
        make_detector(name, **params, contamination=0.9).fit(graphs, y)


def test_pyg_batch_dataset_and_dataloader_give_one_score_per_graph(tmp_path):
    graphs, y = _labelled()
    det = RQForestDetector(n_estimators=20).fit(graphs)  # labels taken from each graph's .y
    ref = det.decision_function(graphs)
    batch = Batch.from_data_list(graphs)
    assert np.allclose(det.decision_function(batch), ref)
    loader = DataLoader(graphs, batch_size=25, shuffle=False)  # 3 mini-batches, 60 graphs
    assert det.decision_function(loader).shape == (60,) and np.allclose(det.decision_function(loader), ref)

    class Set(InMemoryDataset):
        def __init__(self) -> None:
            super().__init__(str(tmp_path))
            self.data, self.slices = self.collate(graphs)

    assert np.allclose(det.decision_function(Set()), ref)
    gnn = RQGNNDetector(**FAST).fit(DataLoader(graphs, batch_size=16, shuffle=True))
    assert gnn.decision_function(batch).shape == (60,)
    with pytest.raises(DataError, match="expected graphs"):
        det.decision_function(42)


def test_nan_node_features_are_a_data_error():
    graphs, y = planted_graphs(20, 0.25, seed=1)
    graphs[3].x[2, 0] = float("nan")
    with pytest.raises(DataError, match="graph 3: node 2 has a non-finite feature"):
        RQGNNDetector(**FAST).fit(graphs, y)


def test_threads_follow_work_size_and_same_seed_repeats():
    graphs, y = planted_graphs(40, 0.25, seed=1)
    quick = {"epochs": 3, "batch_size": 16}
    torch.set_num_threads(2)  # what a user's default looks like (the autouse fixture restores it)
    a = RQGNNDetector(**quick, seed=4).fit(graphs, y)
    assert a.threads_ == 1 and torch.get_num_threads() == 2  # small graphs: 1 thread, restored afterwards
    b = RQGNNDetector(**quick, seed=4).fit(graphs, y)
    assert [h["loss"] for h in a.history_] == [h["loss"] for h in b.history_]
    assert np.array_equal(a.decision_function(graphs), b.decision_function(graphs))
    assert RQGNNDetector(**quick, threads=2).fit(graphs, y).threads_ == 2
    with pytest.raises(ConfigError, match="threads"):
        RQGNNDetector(**quick, threads=0).fit(graphs, y)


def test_early_stopping_waits_more_than_patience_epochs(monkeypatch):
    """The released code stops when ``patiencecount > patience``: best at epoch 0 and patience 2 -> 4 epochs."""
    import outlierkit.graph.detector as mod

    calls = iter([1.0] + [0.0] * 50)
    monkeypatch.setattr(mod, "macro_f1", lambda *a, **k: next(calls))
    graphs, y = planted_graphs(40, 0.25, seed=1)
    det = RQGNNDetector(epochs=20, batch_size=32, patience=2).fit(graphs, y)
    assert len(det.history_) == 4 and det.best_epoch_["f1"] == 0


def test_cuda_error_names_an_existing_option():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    graphs, y = planted_graphs(20, 0.25, seed=1)
    with pytest.raises(ConfigError, match=r"device='cpu' \(CLI: --device cpu\)"):
        RQGNNDetector(**FAST, device="cuda").fit(graphs, y)


def test_rqgnn_default_and_named_behaviours():
    d = RQGNNDetector()
    assert (d.train_cheb, d.rq_normalize, d.batch_size) == (False, False, 128)  # see docs/graph.md, NCI1ds
    p = RQGNNDetector.behaviour("paper", seed=3)
    assert (p.train_cheb, p.rq_normalize, p.batch_size, p.seed) == (True, True, 512, 3)
    c = RQGNNDetector.behaviour("code")
    assert (c.train_cheb, c.rq_normalize, c.batch_size) == (False, False, 512)
    with pytest.raises(ConfigError, match="unknown RQGNN behaviour"):
        RQGNNDetector.behaviour("papr")
