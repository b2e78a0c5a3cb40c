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
"""Regression metrics (MSE, MAE, R²), overall and per cluster, computed with ``sklearn.metrics``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from monai_armed.metrics.clusters import cluster_groups
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

__all__ = ["REGRESSION_METRICS", "per_cluster_regression_metrics", "regression_metrics", "regression_summary"]

#: the metric names of :func:`regression_metrics`, in the order the reports show them
REGRESSION_METRICS = ("mse", "mae", "r2")


def _rows(values: Any, name: str) -> np.ndarray:
    """A prediction or target column as float64 ``(N,)`` (one output) or ``(N, K)`` (several)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().double().cpu().numpy()  # float64 without a float32 pass: large offsets keep digits
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{name} must hold one row per sample, got shape {array.shape}.")
    array = array.reshape(array.shape[0], -1)
    return array[:, 0] if array.shape[1] == 1 else array


def _pair(pred: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    y_pred, y_true = _rows(pred, "pred"), _rows(label, "label")
    if y_pred.shape != y_true.shape:
        raise ValueError(
            f"pred and label must have one value per sample and output, got shapes {y_pred.shape} and {y_true.shape}."
        )
    if not (np.isfinite(y_pred).all() and np.isfinite(y_true).all()):
        raise ValueError("regression metrics need finite predictions and labels; found nan or inf.")
    return y_pred, y_true


def _metrics(y_pred: np.ndarray, y_true: np.ndarray) -> dict:
    # R² is undefined for fewer than two rows or a constant target (sklearn would give nan, or 0 / 1 when forced)
    constant = y_true.shape[0] < 2 or bool(np.all(y_true == y_true[0]))
    return {
        "n": int(y_true.shape[0]),
        "mse": float(mean_squared_error(y_true, y_pred)),
        "mae": float(mean_absolute_error(y_true, y_pred)),
        "r2": None if constant else float(r2_score(y_true, y_pred)),
    }


def regression_metrics(pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> dict:
    """Mean squared error, mean absolute error and the coefficient of determination R² of a regression.

    Several outputs (``(N, K)``) are averaged uniformly over the outputs, as ``sklearn.metrics`` does.

    Args:
        pred: predicted means, ``(N,)`` or ``(N, 1)`` (or ``(N, K)``); for a Gaussian family the network's output.
        label: the observed outcomes, of the same number of values per row.

    Returns:
        ``{"n", "mse", "mae", "r2"}``; ``r2`` is ``None`` when it is undefined (fewer than two rows, or a constant
        label).

    Raises:
        ValueError: for empty, mismatched or non-finite inputs.

    Example::

        regression_metrics(torch.tensor([[1.0], [2.0], [2.0]]), torch.tensor([1.0, 3.0, 2.0]))
        # {"n": 3, "mse": 0.333..., "mae": 0.333..., "r2": 0.5}
    """
    return _metrics(*_pair(pred, label))


def per_cluster_regression_metrics(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    cluster: torch.Tensor | np.ndarray,
    n_clusters: int | None = None,
    cluster_names: Sequence[str] | None = None,
) -> dict[str, dict]:
    """:func:`regression_metrics` of each cluster index ``0..n_clusters-1`` and of the unseen (``-1``) samples.

    Args:
        pred: predicted means, ``(N,)`` or ``(N, 1)``.
        label: observed outcomes, ``(N,)``.
        cluster: ``(N,)`` cluster indices, ``-1`` for unseen clusters.
        n_clusters: number of seen clusters (default: largest index + 1).
        cluster_names: names of the clusters for the table (default: the indices).

    Returns:
        ``{name: {"n", "mse", "mae", "r2"}}`` for every cluster with samples, then ``"unseen"`` if there are any.

    Example::

        table = per_cluster_regression_metrics(pred, y, cluster, cluster_names=["site_a", "site_b"])
        table["site_b"]["r2"]
    """
    y_pred, y_true = _pair(pred, label)
    groups = cluster_groups(cluster, y_true.shape[0], n_clusters, cluster_names)
    return {name: _metrics(y_pred[rows], y_true[rows]) for name, rows in groups}


def regression_summary(
    pred: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray,
    cluster: torch.Tensor | np.ndarray | None = None,
    n_clusters: int | None = None,
    cluster_names: Sequence[str] | None = None,
) -> dict:
    """Overall :func:`regression_metrics` plus, given the clusters, a ``per_cluster`` table: the regression
    counterpart of :func:`~monai_armed.metrics.classification_summary`.

    Returns:
        ``{"n", "mse", "mae", "r2", "per_cluster": {name: {"n", "mse", "mae", "r2"}}}`` (``per_cluster`` only with
        ``cluster``).

    Example::

        summary = regression_summary(pred, y, cluster, n_clusters=4)
        summary["r2"], summary["per_cluster"]["2"]["mae"]
    """
    summary = regression_metrics(pred, label)
    if cluster is not None:
        summary["per_cluster"] = per_cluster_regression_metrics(pred, label, cluster, n_clusters, cluster_names)
    return summary
