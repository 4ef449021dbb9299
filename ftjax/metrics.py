"""Host-side metrics computed offline with scikit-learn / scipy (``evaluate.load`` needs the Hub).

Both are imported where they are used, not at module import: scipy.stats and sklearn.metrics add
~65 MB of RSS, which would otherwise sit in every training process from its first step on.
"""

from __future__ import annotations

import numpy as np


def classification_metrics(pred: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy, macro / weighted precision, recall and F1, and the confusion matrix (rows = gold)."""
    pred, labels = np.asarray(pred).astype(int), np.asarray(labels).astype(int)
    from sklearn import metrics as skm
    ids = list(range(len(label_names)))
    out = {"accuracy": float(skm.accuracy_score(labels, pred))}
    for avg in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(labels, pred, labels=ids, average=avg,
                                                         zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    out["confusion_matrix"] = skm.confusion_matrix(labels, pred, labels=ids).tolist()
    return out


def regression_metrics(pred: np.ndarray, labels: np.ndarray) -> dict:
    pred, labels = np.asarray(pred, np.float64), np.asarray(labels, np.float64)
    out = {"mse": float(np.mean((pred - labels) ** 2))}
    if len(pred) > 1 and pred.std() > 0 and labels.std() > 0:
        from scipy import stats
        out["pearson"] = float(stats.pearsonr(pred, labels)[0])
        out["spearman"] = float(stats.spearmanr(pred, labels)[0])
    return out
