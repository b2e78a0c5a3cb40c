# Copyright (c) monai_armed contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Binary classification metrics at a Youden threshold, overall and per cluster (reference §6.1).

A sample is predicted positive when its probability is ``>= threshold`` (the convention of
:func:`sklearn.metrics.roc_curve`). Metrics that a set of samples cannot define are ``nan`` rather than errors:
AUROC and balanced accuracy need both classes, sensitivity needs a positive and specificity a negative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

__all__ = ["youden_threshold", "binary_metrics", "per_cluster_binary_metrics"]


def _as_numpy(values: np.ndarray | torch.Tensor | Sequence, name: str) -> np.ndarray:
    """``values`` as a 1-D numpy array (``(N, 1)`` is flattened); other shapes raise naming ``name``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{name} must have shape (N,) or (N, 1), got {array.shape}; for two-column softmax outputs pass prob[:, 1]."
        )
    return array


def _check_inputs(
    y_true: np.ndarray | torch.Tensor | Sequence, prob: np.ndarray | torch.Tensor | Sequence
) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(labels as int64, probabilities as float64)``; raises ``ValueError`` naming what was expected."""
    y = _as_numpy(y_true, "y_true")
    p = _as_numpy(prob, "prob")
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true and prob differ in length: {y.shape[0]} labels vs {p.shape[0]} probabilities.")
    if y.shape[0] == 0:
        raise ValueError("y_true and prob are empty: expected at least one sample.")
    try:
        y_float = y.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"y_true must hold binary labels in {{0, 1}}, got values of type {y.dtype}.") from None
    bad = ~np.isin(y_float, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"y_true must hold binary labels in {{0, 1}}, found {np.unique(y[bad])[:5].tolist()}.")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError(f"prob must be finite probabilities in [0, 1], found {int((~np.isfinite(p)).sum())} nan/inf.")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(
            f"prob must be probabilities in [0, 1] (apply a sigmoid to logits), got range [{p.min():g}, {p.max():g}]."
        )
    return y_float.astype(np.int64), p


def _fit_youden(y: np.ndarray, p: np.ndarray) -> float:
    """Youden threshold of validated inputs with both classes present."""
    fpr, tpr, thresholds = roc_curve(y, p)
    # thresholds[0] is +inf (nothing predicted positive); it can tie with J = 0 and is never a useful cut-off.
    youden = tpr[1:] - fpr[1:]
    # the first (highest) threshold among ties; J values equal in exact arithmetic can differ by rounding (1e-17)
    best = 1 + int(np.flatnonzero(youden >= youden.max() - 1e-12)[0])
    return float(thresholds[best])


def youden_threshold(
    y_true: np.ndarray | torch.Tensor | Sequence[int], prob: np.ndarray | torch.Tensor | Sequence[float]
) -> float:
    """
    The ROC threshold that maximises Youden's ``J = sensitivity + specificity - 1`` on the given data.

    The candidates are the thresholds of :func:`sklearn.metrics.roc_curve` (the distinct probabilities);
    among ties the highest threshold wins. Fit it on training predictions and pass it to :func:`binary_metrics`
    for validation and test data, as the reference does for the MCI study (refitting on the test data is
    optimistic).

    Args:
        y_true: ``(N,)`` labels in ``{0, 1}``.
        prob: ``(N,)`` (or ``(N, 1)``) probabilities of class 1.

    Returns:
        the threshold; samples with ``prob >= threshold`` are predicted positive.

    Raises:
        ValueError: for labels outside ``{0, 1}``, mismatched lengths, empty input, probabilities outside
            ``[0, 1]`` or not finite, or when ``y_true`` holds a single class (the ROC is then undefined).

    Example::

        youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])   # 0.7
    """
    y, p = _check_inputs(y_true, prob)
    if np.unique(y).size < 2:
        raise ValueError(f"youden_threshold needs both classes in y_true, got only class {int(y[0])} (n={y.size}).")
    return _fit_youden(y, p)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator > 0 else math.nan


def binary_metrics(
    y_true: np.ndarray | torch.Tensor | Sequence[int],
    prob: np.ndarray | torch.Tensor | Sequence[float],
    threshold: float | None = None,
) -> dict[str, float | int]:
    """
    AUROC, and balanced accuracy, sensitivity and specificity at a threshold (reference §6.1).

    Args:
        y_true: ``(N,)`` labels in ``{0, 1}`` (numpy, torch or a sequence).
        prob: ``(N,)`` (or ``(N, 1)``) probabilities of class 1.
        threshold: decision threshold (``prob >= threshold`` is positive). ``None`` fits the Youden threshold on
            this same data (:func:`youden_threshold`); pass the one fitted on training predictions to evaluate
            other data without optimism.

    Returns:
        ``{"auroc", "balanced_accuracy", "sensitivity", "specificity", "threshold", "n", "n_positive"}``
        (floats and ints). With a single class in ``y_true``: ``auroc`` and ``balanced_accuracy`` are ``nan``,
        so is ``specificity`` (no negatives) or ``sensitivity`` (no positives), and ``threshold`` (with every
        thresholded metric) is ``nan`` when it was to be fitted here.

    Raises:
        ValueError: for labels outside ``{0, 1}``, mismatched lengths, empty input, probabilities outside
            ``[0, 1]`` or not finite, or a non-finite ``threshold``.

    Example::

        train_t = youden_threshold(y_train, p_train)
        binary_metrics(y_test, p_test, threshold=train_t)["balanced_accuracy"]
    """
    y, p = _check_inputs(y_true, prob)
    both_classes = np.unique(y).size == 2
    if threshold is None:
        threshold = _fit_youden(y, p) if both_classes else math.nan
    elif not math.isfinite(float(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold}.")
    threshold = float(threshold)
    n_positive = int(y.sum())
    metrics: dict[str, float | int] = {
        "auroc": float(roc_auc_score(y, p)) if both_classes else math.nan,
        "balanced_accuracy": math.nan,
        "sensitivity": math.nan,
        "specificity": math.nan,
        "threshold": threshold,
        "n": int(y.size),
        "n_positive": n_positive,
    }
    if math.isnan(threshold):
        return metrics
    tn, fp, fn, tp = confusion_matrix(y, (p >= threshold).astype(np.int64), labels=[0, 1]).ravel().tolist()
    metrics["sensitivity"] = _ratio(tp, tp + fn)
    metrics["specificity"] = _ratio(tn, tn + fp)
    if both_classes:
        metrics["balanced_accuracy"] = (metrics["sensitivity"] + metrics["specificity"]) / 2
    return metrics


def per_cluster_binary_metrics(
    y_true: np.ndarray | torch.Tensor | Sequence[int],
    prob: np.ndarray | torch.Tensor | Sequence[float],
    cluster: np.ndarray | torch.Tensor | Sequence,
    threshold: float | None = None,
    cluster_names: Sequence[str] | None = None,
) -> dict[str, dict[str, float | int]]:
    """
    :func:`binary_metrics` of each cluster's samples, all at one shared threshold.

    Args:
        y_true: ``(N,)`` labels in ``{0, 1}``.
        prob: ``(N,)`` probabilities of class 1.
        cluster: ``(N,)`` cluster of each sample: indices (``-1`` = unseen) or raw ids such as site names.
        threshold: the shared decision threshold, normally fitted on training predictions with
            :func:`youden_threshold`; ``None`` fits one Youden threshold on all the given samples (never one per
            cluster, which would flatter small clusters).
        cluster_names: names for integer cluster indices (``cluster_names[i]`` for index ``i``); the default
            name is ``str(cluster)``. Index ``-1`` is always named ``"unseen"``.

    Returns:
        ``{name: binary_metrics(...)}`` for every cluster present, in sorted cluster order. Clusters with a single
        class get ``nan`` where a metric needs both (see :func:`binary_metrics`).

    Raises:
        ValueError: as :func:`binary_metrics`, when ``cluster`` differs in length from ``y_true``, or when an
            index has no entry in ``cluster_names``.

    Example::

        t = youden_threshold(y_train, p_train)
        per_cluster_binary_metrics(y_test, p_test, site_test, threshold=t)["site_3"]["auroc"]
    """
    y, p = _check_inputs(y_true, prob)
    c = _as_numpy(cluster, "cluster")
    if c.shape[0] != y.shape[0]:
        raise ValueError(f"cluster and y_true differ in length: {c.shape[0]} clusters vs {y.shape[0]} labels.")
    if threshold is None and np.unique(y).size == 2:
        threshold = _fit_youden(y, p)
    # still None only when the pooled data has one class: then so has every cluster, and its threshold is nan
    names = list(cluster_names) if cluster_names is not None else None
    integer = np.issubdtype(c.dtype, np.integer)
    if names is not None and integer and c.max() >= len(names):
        raise ValueError(f"cluster index {int(c.max())} has no name: cluster_names holds {len(names)} names.")
    values, inverse = np.unique(c, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.cumsum(np.bincount(inverse, minlength=values.size))[:-1]
    result: dict[str, dict[str, float | int]] = {}
    for value, index in zip(values.tolist(), np.split(order, bounds)):
        if integer and value < 0:
            name = "unseen"
        elif integer and names is not None:
            name = str(names[value])
        else:
            name = str(value)
        result[name] = binary_metrics(y[index], p[index], threshold)
    return result


def _shared_threshold(threshold: float, threshold_dataset: str, dataset: str, owner: str) -> float:
    """The threshold fitted on ``threshold_dataset`` for scoring ``dataset``; a report's error when that dataset held
    a single class (its threshold is nan, and ``binary_metrics`` could only say "threshold must be finite")."""
    if not math.isfinite(threshold):
        raise ValueError(
            f"{owner}: the threshold dataset {threshold_dataset!r} holds a single class, so no decision threshold can "
            f"be fitted for {dataset!r}; give it both classes or pass threshold_dataset=None to fit each dataset's own "
            "threshold."
        )
    return threshold
