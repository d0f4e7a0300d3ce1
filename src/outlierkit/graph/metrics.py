"""Detection metrics over a whole evaluation set: ROC-AUC, AUPRC, Macro-F1 (NaN when one class is absent)."""

from __future__ import annotations

import math

import numpy as np


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of ``score`` (higher = anomaly) against 0/1 labels; NaN when only one class is present."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if np.unique(y).size < 2:
        return math.nan
    return float(roc_auc_score(y, score))


def auprc(y: np.ndarray, score: np.ndarray) -> float:
    """Average precision of the anomaly class (area under precision-recall); NaN without anomalies."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(y)
    if not (y == 1).any():
        return math.nan
    return float(average_precision_score(y, score))


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean of the F1 of class 0 and class 1; a class never predicted nor present scores 0."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(y), np.asarray(pred), average="macro", labels=[0, 1], zero_division=0))


def evaluate(y: np.ndarray, score: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """``{"auc", "auprc", "macro_f1"}`` computed once over the whole set (not averaged per batch)."""
    return {"auc": roc_auc(y, score), "auprc": auprc(y, score), "macro_f1": macro_f1(y, pred)}
