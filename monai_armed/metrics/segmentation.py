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
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

from monai_armed.metrics.clusters import cluster_groups

__all__ = ["label_map", "per_image_segmentation_scores", "segmentation_summary"]


def label_map(pred: torch.Tensor) -> torch.Tensor:
    """Class map ``(N, 1, *spatial)`` (uint8) of logits ``(N, K, *spatial)`` with ``K >= 2``; a one-channel input is a
    class map already (integer, or float as MONAI's ``AsDiscrete(argmax=True)`` gives it).

    Raises:
        ValueError: a one-channel input that is not a class map (values that are not whole numbers in 0..255, e.g. a
            sigmoid network's logits: pass ``(logits > 0).long()``, or two channels).

    Example::

        label_map(logits)           # argmax over the channels, kept as a channel
    """
    if pred.shape[1] == 1:
        values = pred.detach()
        if values.numel() and (
            (values.is_floating_point() and not bool((values == values.round()).all()))
            or int(values.min()) < 0
            or int(values.max()) > 255
        ):
            raise ValueError(
                f"a one-channel prediction is taken as a class map, but it holds values from {float(values.min()):.4g} "
                f"to {float(values.max()):.4g} that are not class indices: for a sigmoid network's logit map pass "
                "(logits > 0).long(), or give the logits of every class (K >= 2 channels)."
            )
        return pred.to(torch.uint8)
    return pred.argmax(1, keepdim=True).to(torch.uint8)


def per_image_segmentation_scores(
    pred: torch.Tensor, label: torch.Tensor, num_classes: int | None = None, hd95: bool = True
) -> dict[str, np.ndarray]:
    """Dice and 95th-percentile Hausdorff distance of every image, averaged over the foreground classes.

    An image whose mask and prediction are both empty for a class scores Dice 1 for it (a correct empty prediction),
    a prediction on an empty mask Dice 0 (MONAI's ``ignore_empty=False``). HD95 (in pixels / voxels) averages the
    classes present in both mask and prediction and is ``nan`` for an image without any.

    Args:
        pred: logits ``(N, K, *spatial)`` (``K >= 2``) or a class map ``(N, 1, *spatial)``.
        label: class map ``(N, 1, *spatial)``.
        num_classes: number of classes including the background (default: ``K`` of logits, else the largest class
            in either map + 1).
        hd95: also compute HD95 (slower).

    Example::

        scores = per_image_segmentation_scores(logits, masks)
        scores["dice"].mean()
    """
    classes = label_map(pred).long()
    truth = torch.as_tensor(label).long()
    if truth.shape != classes.shape:
        raise ValueError(
            f"segmentation masks {tuple(truth.shape)} and predictions {tuple(classes.shape)} differ in shape; both "
            "must be (N, 1, *spatial)."
        )
    if num_classes is None:
        num_classes = pred.shape[1] if pred.shape[1] > 1 else int(max(classes.max(), truth.max())) + 1
    num_classes = max(int(num_classes), 2)
    pred_hot, true_hot = one_hot(classes, num_classes), one_hot(truth, num_classes)
    dice = compute_dice(pred_hot, true_hot, include_background=False, ignore_empty=False).mean(1)
    scores = {"dice": dice.double().numpy()}
    if hd95:
        both = (pred_hot.flatten(2).any(2) & true_hot.flatten(2).any(2))[:, 1:]
        distance = torch.full(both.shape, math.nan, dtype=torch.float64)
        if bool(both.any()):
            distance = compute_hausdorff_distance(pred_hot, true_hot, include_background=False, percentile=95).double()
        distance = torch.where(both & torch.isfinite(distance), distance, torch.nan)
        counts = both.sum(1)
        total = torch.nan_to_num(distance, nan=0.0).sum(1)
        scores["hd95"] = torch.where(counts > 0, total / counts.clamp(min=1), torch.nan).numpy()
    return scores


def _mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


def segmentation_summary(
    pred: torch.Tensor,
    label: torch.Tensor,
    cluster: torch.Tensor | None = None,
    n_clusters: int | None = None,
    cluster_names: Sequence[str] | None = None,
    num_classes: int | None = None,
) -> dict:
    """Mean per-image Dice and HD95 overall and, given the clusters, per cluster (the segmentation counterpart of
    :func:`~monai_armed.metrics.classification_summary`).

    Returns:
        ``{"n", "dice", "hd95", "per_cluster": {name: {"n", "dice", "hd95"}}}`` (``per_cluster`` only with
        ``cluster``; ``"unseen"`` collects index ``-1``; ``hd95`` is ``None`` where no image has one).

    Example::

        summary = segmentation_summary(logits, masks, cluster, n_clusters=6, cluster_names=names)
        summary["dice"], summary["per_cluster"]["batch_3"]["dice"]
    """
    scores = per_image_segmentation_scores(pred, label, num_classes)
    summary: dict = {"n": int(scores["dice"].shape[0]), **{k: _mean(v) for k, v in scores.items()}}
    if cluster is None:
        return summary
    groups = cluster_groups(cluster, summary["n"], n_clusters, cluster_names)
    table = {name: {"n": int(rows.sum()), **{k: _mean(v[rows]) for k, v in scores.items()}} for name, rows in groups}
    summary["per_cluster"] = table
    return summary
