"""Class-balanced focal loss (against the formula, extreme logits) and the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from outlierkit.graph.losses import cb_focal_loss, class_balanced_weights
from outlierkit.graph.metrics import auprc, evaluate, macro_f1, roc_auc


def test_class_balanced_weights_match_anchor_example():
    # MCF-7: 27,770 graphs, 2,294 anomalies; the training set is 70% of each class
    w = class_balanced_weights([int(0.7 * (27770 - 2294)), int(0.7 * 2294)], beta=0.999)
    assert w.sum().item() == pytest.approx(2.0)
    assert w[0].item() == pytest.approx(0.89, abs=0.01) and w[1].item() == pytest.approx(1.11, abs=0.01)
    with pytest.raises(ValueError):
        class_balanced_weights([10, 0])


def naive_loss(logits, y, w, gamma):
    t = torch.nn.functional.one_hot(y, 2).double()
    z = logits.double()
    bce = -(t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))
    mod = torch.exp(-gamma * t * z - gamma * torch.log1p(torch.exp(-z)))  # Cui et al.'s form
    return (w.double()[y].unsqueeze(1) * mod * bce).sum() / len(y)


def test_focal_loss_matches_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 2, generator=g) * 3
    y = torch.randint(0, 2, (32,), generator=g)
    w = torch.tensor([0.7, 1.3])
    for gamma in (0.0, 1.5, 2.0):
        assert cb_focal_loss(logits, y, w, gamma).item() == pytest.approx(naive_loss(logits, y, w, gamma).item(),
                                                                           rel=1e-5)


def test_focal_loss_is_finite_for_extreme_logits():
    logits = torch.tensor([[-1000.0, 1000.0], [500.0, -500.0], [-120.0, -95.0]], requires_grad=True)
    y = torch.tensor([0, 0, 1])
    loss = cb_focal_loss(logits, y, torch.tensor([1.0, 1.0]), 1.5)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 100  # confidently wrong: large but finite
    assert torch.isfinite(logits.grad).all()


def test_metrics():
    y = np.array([0, 0, 1, 1, 0])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2])
    assert roc_auc(y, s) == pytest.approx(5 / 6)
    assert auprc(y, s) == pytest.approx((1 + 2 / 3) / 2)
    pred = np.array([0, 0, 0, 1, 0])
    f1_0, f1_1 = 2 * 3 / (2 * 3 + 1), 2 * 1 / (2 * 1 + 1)
    assert macro_f1(y, pred) == pytest.approx((f1_0 + f1_1) / 2)
    assert macro_f1(y, np.zeros(5, dtype=int)) == pytest.approx((2 * 3 / (2 * 3 + 2)) / 2)
    assert math.isnan(roc_auc(np.zeros(3), s[:3])) and math.isnan(auprc(np.zeros(3), s[:3]))
    assert set(evaluate(y, s, pred)) == {"auc", "auprc", "macro_f1"}
