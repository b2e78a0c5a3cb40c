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

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ["MLDG_DEFAULTS", "train_mldg"]

MLDG_DEFAULTS: dict[str, float] = {
    "epochs": 10,
    "cluster_batch_size": 4,
    "inner_lr": 1e-3,
    "outer_lr": 1e-3,
    "meta_test_weight": 1.0,
}
"""Settings of the MLDG baseline in the ARMED spiral-benchmark notebooks."""


def _default_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits for one output unit (0/1 targets), cross-entropy for several (indices or probabilities)."""
    if logits.ndim == 1 or logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.reshape(target.shape), target.float())
    if target.ndim == logits.ndim:
        return F.cross_entropy(logits, target.float())
    return F.cross_entropy(logits, target.long())


def _check_inputs(features: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor) -> None:
    """Raise ``ValueError`` for mismatched lengths, negative cluster indices or fewer than 2 clusters."""
    if not len(features) == len(labels) == len(clusters):
        raise ValueError(
            "features, labels and clusters must have the same length, "
            f"got {len(features)}, {len(labels)} and {len(clusters)}."
        )
    if clusters.ndim != 1:
        raise ValueError(f"clusters must be a 1-D vector of integer indices, got shape {tuple(clusters.shape)}.")
    if clusters.is_floating_point() and not bool((clusters == clusters.round()).all()):
        raise ValueError("clusters must be integer indices; got fractional values (which would merge clusters).")
    if bool((clusters < 0).any()):
        raise ValueError("unseen (-1) clusters cannot be used for training; drop them before calling train_mldg.")
    n_clusters = int(torch.unique(clusters).numel())
    if n_clusters < 2:
        raise ValueError(f"MLDG needs at least 2 clusters, got {n_clusters}.")


def _cluster_slots(order_clusters: torch.Tensor, n_clusters: int, batch_size: int) -> torch.Tensor:
    """Positions (into the cluster-sorted order) of every cluster's minibatches, ``-1`` padded.

    Args:
        order_clusters: ``(N,)`` contiguous cluster index of each sample, sorted ascending.
        n_clusters: number of clusters ``K``.
        batch_size: samples per minibatch ``B``.

    Returns:
        ``(K, M, B)`` tensor, ``M`` the largest number of minibatches of any cluster.
    """
    counts = torch.bincount(order_clusters, minlength=n_clusters)
    starts = torch.cumsum(counts, 0) - counts
    n_batches = (counts + batch_size - 1) // batch_size
    offsets = torch.arange(int(n_batches.max()) * batch_size).view(1, -1, batch_size)
    slots = starts.view(-1, 1, 1) + offsets
    return torch.where(offsets < counts.view(-1, 1, 1), slots, -1)


def _epoch_schedule(
    cluster_ids: torch.Tensor, n_clusters: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle within clusters and lay out one epoch of per-cluster minibatches.

    Args:
        cluster_ids: ``(N,)`` contiguous cluster index (``0..K-1``) of each sample.
        n_clusters: number of clusters ``K``.
        batch_size: samples per minibatch ``B``.
        generator: source of randomness for the epoch.

    Returns:
        ``(schedule, test_clusters)``: ``(K, n_iter, B)`` sample indices (``-1`` padded), where a cluster that
        has run out of minibatches repeats a random one of its own, and ``(n_iter,)`` meta-test clusters.
    """
    perm = torch.randperm(len(cluster_ids), generator=generator)
    order = perm[torch.argsort(cluster_ids[perm], stable=True)]
    slots = _cluster_slots(cluster_ids[order], n_clusters, batch_size)
    n_batches = (slots[:, :, 0] >= 0).sum(1, keepdim=True)
    n_iter = slots.shape[1]
    step = torch.arange(n_iter).expand(n_clusters, -1)
    spare = (torch.rand(n_clusters, n_iter, generator=generator) * n_batches).long()
    batch_index = torch.where(step < n_batches, step, spare)
    positions = slots[torch.arange(n_clusters).view(-1, 1), batch_index]
    schedule = torch.where(positions >= 0, order[positions.clamp(min=0)], -1)
    return schedule, torch.randint(n_clusters, (n_iter,), generator=generator)


def _split_iteration(rows: torch.Tensor, test_cluster: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta-train (all other clusters) and meta-test (``test_cluster``) sample indices from ``(K, B)`` rows."""
    is_test = torch.arange(rows.shape[0], device=rows.device) == test_cluster
    train, test = rows[~is_test].flatten(), rows[test_cluster]
    return train[train >= 0], test[test >= 0]


def _meta_losses(
    network: nn.Module,
    params: dict[str, torch.Tensor],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inner_lr: float,
    first_order: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta-train loss at ``theta`` and meta-test loss at ``theta' = theta - inner_lr * grad``.

    In first-order mode the inner gradient is detached, so back-propagating the meta-test loss yields its gradient
    at ``theta'``, applied to ``theta``; otherwise the graph through the inner step is kept (second-order MLDG).
    """
    (x_tr, y_tr), (x_te, y_te) = batches
    loss_tr = loss_function(network(x_tr), y_tr)
    grads = torch.autograd.grad(
        loss_tr, list(params.values()), create_graph=not first_order, retain_graph=True, materialize_grads=True
    )
    if first_order:
        grads = [g.detach() for g in grads]
    fast = {name: p - inner_lr * g for (name, p), g in zip(params.items(), grads)}
    loss_te = loss_function(functional_call(network, fast, (x_te,)), y_te)
    return loss_tr, loss_te


def train_mldg(
    network: nn.Module,
    features: torch.Tensor | Sequence,
    labels: torch.Tensor | Sequence,
    clusters: torch.Tensor | Sequence,
    epochs: int = 10,
    cluster_batch_size: int = 4,
    inner_lr: float = 1e-3,
    outer_lr: float = 1e-3,
    meta_test_weight: float = 1.0,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    first_order: bool = True,
) -> dict[str, list[float]]:
    """Train ``network`` in place with Meta-Learning Domain Generalization (MLDG, Li et al., AAAI 2018).

    Each cluster is a domain. Every epoch, each cluster's samples are shuffled and split into minibatches of
    ``cluster_batch_size``; the epoch runs as many iterations as the largest cluster has minibatches (a cluster
    that has run out repeats a random minibatch of its own). At each iteration one random cluster is held out as
    meta-test: the meta-train loss ``L_tr`` on the other clusters' minibatches gives a virtual step
    ``theta' = theta - inner_lr * grad L_tr``, the meta-test loss ``L_te`` is evaluated at ``theta'``
    (:func:`torch.func.functional_call`), and Adam updates ``theta`` on ``L_tr + meta_test_weight * L_te``.
    With ``first_order=True`` (the ARMED baseline) the virtual step uses the detached gradient, so the gradient
    of ``L_te`` at ``theta'`` is applied to ``theta``; ``first_order=False`` keeps the second-order terms.

    Args:
        network: maps ``(B, F)`` float32 features to logits ``(B,)``/``(B, 1)`` (binary) or ``(B, n_classes)``.
        features: ``(N, F)`` features.
        labels: ``(N,)`` labels: 0/1 for one output unit, class indices for several (or what
            ``loss_function`` expects).
        clusters: ``(N,)`` non-negative integer cluster indices; at least 2 distinct clusters.
        epochs: number of epochs.
        cluster_batch_size: samples per cluster minibatch.
        inner_lr: step size of the virtual (meta-train) update.
        outer_lr: Adam learning rate of the real update.
        meta_test_weight: weight of the meta-test loss in the outer objective.
        loss_function: ``loss(logits, labels) -> scalar``; defaults to BCE-with-logits for one output unit and
            cross-entropy for several.
        seed: the epoch-``e`` shuffling and meta-test draws use a generator seeded with ``seed + e``.
        device: device to train on; ``network`` is moved there.
        first_order: use the first-order approximation (detached inner gradient).

    Returns:
        ``{"loss": [...], "meta_test_loss": [...]}``: per-epoch mean meta-train and meta-test losses.

    Raises:
        ValueError: mismatched lengths, negative (unseen) cluster indices or fewer than 2 clusters.

    Example::

        net = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1))
        history = train_mldg(net, X, y, z, **MLDG_DEFAULTS)
        history["loss"][-1] < history["loss"][0]  # usually True
    """
    features, labels, clusters = (torch.as_tensor(v) for v in (features, labels, clusters))
    if cluster_batch_size < 1 or epochs < 0:
        raise ValueError(f"cluster_batch_size must be >= 1 and epochs >= 0, got {cluster_batch_size} and {epochs}.")
    _check_inputs(features, labels, clusters)
    _, cluster_ids = torch.unique(clusters.long(), return_inverse=True)
    n_clusters = int(cluster_ids.max()) + 1
    features = features.to(device=device, dtype=torch.float32)
    labels = labels.to(device)
    loss_function = loss_function or _default_loss
    network.to(device).train()
    params = {name: p for name, p in network.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam(params.values(), lr=outer_lr)
    history: dict[str, list[float]] = {"loss": [], "meta_test_loss": []}
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(seed + epoch)
        schedule, test_clusters = _epoch_schedule(cluster_ids, n_clusters, cluster_batch_size, generator)
        schedule = schedule.to(device)
        totals = torch.zeros(2, device=device)
        for step, test_cluster in enumerate(test_clusters.tolist()):
            idx_tr, idx_te = _split_iteration(schedule[:, step], test_cluster)
            batches = ((features[idx_tr], labels[idx_tr]), (features[idx_te], labels[idx_te]))
            loss_tr, loss_te = _meta_losses(network, params, batches, loss_function, inner_lr, first_order)
            optimizer.zero_grad()
            (loss_tr + meta_test_weight * loss_te).backward()
            optimizer.step()
            totals += torch.stack([loss_tr.detach(), loss_te.detach()])
        mean_tr, mean_te = (totals / len(test_clusters)).tolist()
        history["loss"].append(mean_tr)
        history["meta_test_loss"].append(mean_te)
    return history
