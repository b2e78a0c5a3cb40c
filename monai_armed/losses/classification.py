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

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_armed.utils import batch_checks_enabled

__all__ = ["LogitClassificationLoss", "balanced_class_weights", "cluster_confusion_loss"]


def balanced_class_weights(labels: torch.Tensor, n_classes: int = 2) -> torch.Tensor:
    """Per-class weights inversely proportional to frequency, normalised to mean 1 (``(n_classes,)``).

    For two classes this is the paper's weighting ``w_0 ∝ mean(y)``, ``w_1 ∝ 1 - mean(y)``.

    Example::

        weights = balanced_class_weights(torch.tensor([0, 0, 0, 1]))   # tensor([0.5, 1.5])
        loss = LogitClassificationLoss(class_weight=weights)
    """
    labels = labels.long().flatten()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must be classes 0..{n_classes - 1}, got values {sorted(set(labels.tolist()))}.")
    counts = torch.bincount(labels, minlength=n_classes).float()
    if bool((counts == 0).any()):
        raise ValueError(f"every class needs at least one label to weight it, got counts {counts.tolist()}.")
    weights = counts.sum() / counts
    return weights * n_classes / weights.sum()


class LogitClassificationLoss(nn.Module):
    """Classification loss on logits that fits both binary (one logit) and multi-class networks.

    ``(B, 1)`` logits use binary cross-entropy with integer labels ``{0, 1}``; ``(B, n)`` logits with ``n > 1`` use
    cross-entropy with labels ``0..n-1``. Labels may be ``(B,)`` or ``(B, 1)``, of any integer, bool or whole-valued
    float type. A label outside the classes raises a ``ValueError`` that says which classes were expected.

    With ``class_weight``, each row's loss is multiplied by its class's weight and the batch takes the plain mean
    (Keras' ``class_weight``, as in the paper), for one logit and for several alike: torch's weighted cross-entropy
    divides by the sum of the weights instead, which cancels the weighting of a batch that holds one class.

    Args:
        class_weight: optional per-class weights ``(n_classes,)`` (for one logit: the weights of class 0 and 1).

    Example::

        loss = LogitClassificationLoss()
        loss(torch.randn(4, 1), torch.tensor([0, 1, 1, 0]))      # binary
        loss(torch.randn(4, 3), torch.tensor([0, 2, 1, 0]))      # three classes
    """

    def __init__(self, class_weight: torch.Tensor | list[float] | None = None) -> None:
        super().__init__()
        self.register_buffer("class_weight", None if class_weight is None else torch.as_tensor(class_weight).float())

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        label = label.reshape(-1)
        if label.numel() == 0:
            raise ValueError("cannot compute a classification loss on an empty batch.")
        check = batch_checks_enabled()
        if logits.dim() != 2:
            raise ValueError(f"classification logits must be (batch, classes), got shape {tuple(logits.shape)}.")
        if label.is_floating_point():
            if check and not bool((label == label.round()).all()):
                raise ValueError("classification labels must be whole numbers (class indices).")
        if label.dtype != torch.long:
            label = label.long()
        n = logits.shape[1]
        n_classes = 2 if n == 1 else n
        if self.class_weight is not None and self.class_weight.numel() != n_classes:
            raise ValueError(
                f"class_weight has {self.class_weight.numel()} values but the logits have {n_classes} classes."
            )
        if check:
            low, high = torch.aminmax(label)
            if int(low) < 0 or int(high) >= n_classes:
                raise ValueError(
                    f"label outside the classes: expected 0..{n_classes - 1}, got values {sorted(set(label.tolist()))}."
                )
        weight = None if self.class_weight is None else self.class_weight.to(logits.device)[label]
        if n > 1:
            if weight is None:
                return F.cross_entropy(logits, label)
            return (F.cross_entropy(logits, label, reduction="none") * weight).mean()
        return F.binary_cross_entropy_with_logits(logits[:, 0], label.to(logits.dtype), weight=weight)


def cluster_confusion_loss(logits: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a cluster classifier's logits against the uniform distribution over the clusters.

    Minimised by features from which the classifier cannot tell the clusters apart (every softmax row uniform, loss
    ``log(n_clusters)``), unlike the negative cross-entropy on the true clusters, which is also minimised by features
    that the classifier confidently gets wrong. Rows whose ``cluster`` is ``-1`` (unseen) are left out; ``0`` when none
    is left.

    Args:
        logits: ``(B, n_clusters)`` classifier logits.
        cluster: ``(B,)`` cluster indices (only their sign is used: ``-1`` rows are skipped).

    Example::

        loss = cluster_confusion_loss(adversary(features), cluster)    # minimise with the features' optimizer
    """
    if logits.dim() != 2:
        raise ValueError(f"cluster_confusion_loss expects logits (batch, n_clusters), got {tuple(logits.shape)}.")
    if cluster.numel() != logits.shape[0]:
        raise ValueError(f"cluster has {cluster.numel()} values for {logits.shape[0]} rows of logits.")
    # a weighted mean over the seen rows rather than a boolean selection: no read-back of the mask to the host
    seen = (cluster.reshape(-1) >= 0).to(logits.dtype)
    per_row = -torch.log_softmax(logits, dim=1).mean(1)
    return (per_row * seen).sum() / seen.sum().clamp(min=1.0)
