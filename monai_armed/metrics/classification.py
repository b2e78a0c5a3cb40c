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

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import t as student_t
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from monai_armed.metrics.clusters import _check_cluster_range

__all__ = ["positive_probability", "predicted_class", "classification_summary", "per_cluster_accuracy", "mean_ci95"]


def positive_probability(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities from logits: ``(N, 1)`` -> sigmoid ``(N,)``; ``(N, C)`` -> softmax ``(N, C)``.

    Example::

        positive_probability(torch.tensor([[0.0], [2.0]]))        # tensor([0.5000, 0.8808])
    """
    logits = logits.float()
    return torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def predicted_class(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class indices ``(N,)`` from ``(N, 1)`` (threshold 0) or ``(N, C)`` (argmax) logits.

    Example::

        predicted_class(torch.tensor([[-1.0], [2.0]]))            # tensor([0, 1])
    """
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


def per_cluster_accuracy(
    pred_class: torch.Tensor, label: torch.Tensor, cluster: torch.Tensor, n_clusters: int
) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and sample count per cluster index ``0..n_clusters-1`` plus a last entry for unseen (``-1``) samples.

    Computed with ``bincount`` (no loop over samples). Clusters without samples get accuracy ``nan``.

    Example::

        acc, n = per_cluster_accuracy(pred_class, label, cluster, n_clusters=10)   # acc[10]: unseen samples
    """
    _check_cluster_range(int(cluster.max()) if cluster.numel() else -1, n_clusters)
    slot = torch.where(cluster < 0, torch.full_like(cluster, n_clusters), cluster).long()
    correct = (pred_class.reshape(-1) == label.reshape(-1).long()).double()
    counts = torch.bincount(slot, minlength=n_clusters + 1).double()
    hits = torch.bincount(slot, weights=correct, minlength=n_clusters + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = (hits / counts).numpy()
    return accuracy, counts.long().numpy()


def classification_summary(
    logits: torch.Tensor,
    label: torch.Tensor,
    cluster: torch.Tensor | None = None,
    n_clusters: int | None = None,
    cluster_names: Sequence[str] | None = None,
) -> dict:
    """Accuracy, balanced accuracy and AUROC (one-vs-rest for several classes), overall and per cluster.

    Args:
        logits: ``(N, 1)`` or ``(N, C)`` logits.
        label: ``(N,)`` class indices.
        cluster: optional ``(N,)`` cluster indices (``-1`` = unseen) for the per-cluster accuracy.
        n_clusters: number of seen clusters (default: largest index + 1).
        cluster_names: names of the clusters for the per-cluster table (default: the indices).

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "auroc", "per_cluster": {name: {"accuracy", "n"}}}``; AUROC is
        ``None`` when only one class is present.

    Example::

        summary = classification_summary(logits, labels, clusters, n_clusters=10)
        summary["accuracy"], summary["per_cluster"]["3"]["accuracy"]
    """
    label = label.reshape(-1).cpu()
    if label.is_floating_point() and not bool((label == label.round()).all()):
        raise ValueError(
            "classification metrics need class indices as labels, got non-integer values (e.g. "
            f"{float(label[label != label.round()][0])}): for a continuous outcome evaluate with task='regression' "
            "(ClusterModeReport: metrics='regression')."
        )
    label = label.long()
    logits = logits.detach().cpu()
    pred = predicted_class(logits)
    prob = positive_probability(logits).numpy()
    y = label.numpy()
    classes = np.unique(y)
    if len(classes) < 2:
        auroc = None
    elif prob.ndim == 1:
        auroc = float(roc_auc_score(y, prob))
    elif prob.shape[1] == 2:  # two softmax channels: the positive class's probability (sklearn's binary AUROC)
        auroc = float(roc_auc_score(y, prob[:, 1]))
    else:
        auroc = float(roc_auc_score(y, prob, multi_class="ovr", labels=np.arange(prob.shape[1])))
    summary = {
        "n": int(len(y)),
        "accuracy": float((pred == label).double().mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred.numpy())),
        "auroc": auroc,
    }
    if cluster is not None:
        cluster = cluster.reshape(-1).long().cpu()
        n_clusters = n_clusters if n_clusters is not None else int(cluster.max()) + 1
        names = list(cluster_names) if cluster_names is not None else [str(i) for i in range(n_clusters)]
        if len(names) != n_clusters:
            raise ValueError(f"got {len(names)} cluster names for {n_clusters} clusters.")
        accuracy, counts = per_cluster_accuracy(pred, label, cluster, n_clusters)
        summary["per_cluster"] = {
            name: {"accuracy": float(a), "n": int(n)}
            for name, a, n in zip([*names, "unseen"], accuracy, counts)
            if n > 0
        }
    return summary


def mean_ci95(
    values: Sequence[float] | np.ndarray | torch.Tensor, method: str = "t"
) -> tuple[float, list[float] | None]:
    """Mean of repeated results (seeds, folds, splits) and its 95% confidence interval.

    Args:
        values: the per-run results, e.g. one test accuracy per seed.
        method: ``"t"`` for the Student-t interval ``mean +- t(0.975, n - 1) * sd / sqrt(n)`` (right for the few
            runs of a benchmark), or ``"normal"`` for ``mean +- 1.96 * sd / sqrt(n)``, the interval the reference
            notebooks and paper report. ``sd`` is the sample standard deviation (``ddof=1``).

    Returns:
        ``(mean, [low, high])``; the interval is ``None`` for a single value.

    Raises:
        ValueError: for an empty or non-finite ``values`` or an unknown ``method``.

    Example::

        mean, (low, high) = mean_ci95([0.91, 0.93, 0.92, 0.95, 0.90])
    """
    if method not in ("t", "normal"):
        raise ValueError(f"method must be 't' or 'normal', got {method!r}.")
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("mean_ci95 needs at least one value, got none.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"mean_ci95 needs finite values, found {int((~np.isfinite(array)).sum())} nan/inf.")
    mean = float(array.mean())
    if array.size < 2:
        return mean, None
    factor = float(student_t.ppf(0.975, array.size - 1)) if method == "t" else 1.96
    half = factor * float(array.std(ddof=1)) / math.sqrt(array.size)
    return mean, [mean - half, mean + half]
