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
"""MONAI inferers (sliding window, ...) for networks that take the cluster of every sample."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from monai.inferers import Inferer, PatchInferer, SimpleInferer, SlidingWindowInferer

from monai_armed.networks.utils import ARMEDOutput

__all__ = ["armed_inference", "cluster_inference", "is_windowed"]

ClusterArg = torch.Tensor | Mapping[str, torch.Tensor] | None


def _row(cluster: ClusterArg, index: int) -> ClusterArg:
    if cluster is None:
        return None
    if isinstance(cluster, Mapping):
        return {k: v[index : index + 1] for k, v in cluster.items()}
    return cluster[index : index + 1]


def _repeat(row: ClusterArg, n: int) -> ClusterArg:
    """One sample's cluster for a batch of ``n`` windows of that sample."""
    if row is None:
        return None
    if isinstance(row, Mapping):
        return {k: v.expand(n, *v.shape[1:]) for k, v in row.items()}
    return row.expand(n, *row.shape[1:])


def _with_cluster(network: Callable, row: ClusterArg) -> Callable:
    return lambda window: network(window, cluster=_repeat(row, window.shape[0]))


def _is_simple(inferer: Inferer | None) -> bool:
    return inferer is None or type(inferer) is SimpleInferer


def is_windowed(inferer: Inferer | None) -> bool:
    """Whether the inferer calls the network on batches of windows (sliding window, slices, patches).

    Example::

        is_windowed(SlidingWindowInferer((64, 64)))      # True
    """
    return isinstance(inferer, (SlidingWindowInferer, PatchInferer))


def cluster_inference(inferer: Inferer | None, inputs: torch.Tensor, network: Callable, cluster: ClusterArg) -> Any:
    """``network(inputs, cluster=cluster)`` through a MONAI inferer, with each window given its own sample's cluster.

    MONAI's inferers pass extra arguments unchanged to every call of the network, but a sliding-window inferer calls
    it on batches of windows, not of samples. Here a windowed inferer (``SlidingWindowInferer`` and its subclasses such
    as ``SliceInferer``, ``PatchInferer``) runs one sample at a time, and each batch of that sample's windows gets the
    sample's cluster (index, soft membership, or one per grouping factor) repeated; any other inferer is called as
    ``inferer(inputs, network, cluster=cluster)`` (``None``: the network itself).

    Example::

        inferer = SlidingWindowInferer(roi_size=(96, 96), sw_batch_size=4, overlap=0.25)
        logits = cluster_inference(inferer, images, armed_unet, cluster)     # (B, K, H, W), any H, W
    """
    if inferer is None:
        return network(inputs, cluster=cluster)
    if not is_windowed(inferer):
        return inferer(inputs, network, cluster=cluster)
    outputs = [inferer(inputs[i : i + 1], _with_cluster(network, _row(cluster, i))) for i in range(inputs.shape[0])]
    if isinstance(outputs[0], torch.Tensor):
        return torch.cat(outputs)
    if isinstance(outputs[0], (tuple, list)):
        return type(outputs[0])(torch.cat(items) for items in zip(*outputs))
    return {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}


class _WindowPredictor:
    """Runs ``forward_armed`` on the windows of one sample; keeps their pooled features and the KL."""

    def __init__(self, forward_armed: Callable, row: ClusterArg) -> None:
        self.forward_armed, self.row = forward_armed, row
        self.features: list[list[torch.Tensor]] = []
        self.kl: torch.Tensor | None = None

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        out = self.forward_armed(window, _repeat(self.row, window.shape[0]))
        self.features.append([f.flatten(2).mean(2) if f.dim() > 2 else f for f in out.features])
        self.kl = out.kl
        return torch.cat([out.pred, out.pred_fe], dim=1)

    def sample_features(self) -> list[torch.Tensor]:
        """Each tapped feature pooled and averaged over the sample's windows: ``(1, C)`` per tap."""
        return [torch.cat(per_tap).mean(0, keepdim=True) for per_tap in zip(*self.features)]


def armed_inference(
    inferer: Inferer | None, inputs: torch.Tensor, forward_armed: Callable, cluster: ClusterArg
) -> ARMEDOutput:
    """``forward_armed(inputs, cluster)`` through a MONAI inferer, for training with a sliding window (say).

    A :class:`~monai.inferers.SimpleInferer` (or ``None``) calls ``forward_armed`` once, and an inferer that is not
    windowed is called as ``inferer(inputs, forward_armed, cluster=cluster)`` and must return its ``ARMEDOutput``. A
    windowed inferer (``SlidingWindowInferer`` and its subclasses, ``PatchInferer``) runs one sample at a time: every
    batch of windows goes through ``forward_armed`` with the sample's cluster, the inferer
    stitches the mixed- and fixed-effects predictions (stacked on the channel dimension, so both need a channel
    dimension that the inferer keeps, as dense predictions have), each tapped feature is pooled globally and averaged
    over the sample's windows, and the KL is the mean of the samples' KLs over those of seen clusters (the network's
    KL when it sums every level; the batch estimate when it uses ``level_counts``).

    Example::

        out = armed_inference(SlidingWindowInferer((64, 64), sw_batch_size=4), images, net.forward_armed, cluster)
        out.pred.shape                       # (B, K, H, W), the images' size
    """
    if _is_simple(inferer):
        return forward_armed(inputs, cluster)
    if not is_windowed(inferer):
        return inferer(inputs, forward_armed, cluster=cluster)
    preds, preds_fe, features, kls, seen = [], [], [], [], []
    for i in range(inputs.shape[0]):
        row = _row(cluster, i)
        predictor = _WindowPredictor(forward_armed, row)
        both = inferer(inputs[i : i + 1], predictor)
        half = both.shape[1] // 2
        preds.append(both[:, :half])
        preds_fe.append(both[:, half:])
        features.append(predictor.sample_features())
        kls.append(predictor.kl)
        seen.append(not isinstance(row, torch.Tensor) or row.is_floating_point() or bool((row >= 0).all()))
    pooled = [torch.cat(per_sample) for per_sample in zip(*features)]
    return ARMEDOutput(torch.cat(preds), torch.cat(preds_fe), pooled, _batch_kl(kls, seen))


def _batch_kl(kls: list[Any], seen: list[bool]) -> Any:
    """The batch's KL from each sample's: the mean over the samples of seen clusters. A KL over every level is the
    same for each sample; a batch estimate from ``level_counts`` (``N / B_seen * sum_i KL_c(i) / n_c(i)``) is the
    mean of the samples' own estimates over the seen ones (an unseen sample's is 0)."""
    if not isinstance(kls[0], torch.Tensor):
        return kls[-1]
    chosen = [kl for kl, is_seen in zip(kls, seen) if is_seen] or kls
    return torch.stack(chosen).mean()
