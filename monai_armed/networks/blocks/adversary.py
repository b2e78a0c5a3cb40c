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

import torch
import torch.nn as nn
from monai.networks.layers.utils import get_act_layer

from monai_armed.networks.utils import glorot_init

__all__ = ["ClusterAdversary", "mlp_layers"]


def mlp_layers(in_features: int, hidden_channels: Sequence[int], act: str | tuple = "relu") -> nn.ModuleList:
    """Dense layers ``Linear -> act`` as a ``ModuleList`` (one entry per hidden layer), so callers can tap each one.

    Example::

        layers = mlp_layers(2, (4, 4, 4))
        h = x
        for layer in layers:
            h = layer(h)                    # each hidden activation can be tapped
    """
    layers, width = nn.ModuleList(), in_features
    for units in hidden_channels:
        layers.append(nn.Sequential(nn.Linear(width, units), get_act_layer(act)))
        width = units
    return layers


def _global_mean(feature_map: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial) -> (B, C)`` spatial mean. In float32 and float64 a sum then a scale of the small result:
    its gradient is an expanded view, where a mean's backward writes a scaled copy of the whole map. Low-precision
    maps (AMP) take the mean itself, which accumulates in float32 (their sum can overflow float16)."""
    dims = tuple(range(2, feature_map.dim()))
    if feature_map.dtype in (torch.float16, torch.bfloat16):
        return feature_map.mean(dims)
    return feature_map.sum(dims) / math.prod(feature_map.shape[2:])


class ClusterAdversary(nn.Module):
    """K-way cluster classifier over concatenated fixed-effects features (the ARMED adversary).

    Each input feature tensor is flattened to ``(B, n)``; feature maps with spatial dimensions (``(B, C, *spatial)``)
    are global-average pooled to ``(B, C)`` first. The concatenation passes through dense layers to ``n_clusters``
    logits. The trainer fits it to predict the cluster from detached features and penalises the main network with its
    cross-entropy, which drives the fixed-effects features towards cluster invariance.

    Args:
        in_features: total width of the concatenated (pooled) features.
        n_clusters: number of seen clusters.
        hidden_channels: widths of the hidden layers (the paper's MLP adversary uses ``(8, 8, 4)``, the spiral
            benchmark ``(4, 4)``).
        act: activation name or ``(name, kwargs)`` from MONAI's ``Act`` factory.
        input_norm: standardise the concatenated features with a ``BatchNorm1d`` without affine parameters before the
            dense layers, so the network cannot hide the cluster from the adversary by shrinking the features that
            carry it (they are still there for any later layer that rescales them).

    Example::

        adversary = ClusterAdversary(in_features=12, n_clusters=10, hidden_channels=(4, 4))
        logits = adversary([h1, h2, h3])        # (B, 10)
    """

    def __init__(
        self,
        in_features: int,
        n_clusters: int,
        hidden_channels: Sequence[int] = (8, 8, 4),
        act: str | tuple = "relu",
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        if n_clusters < 2:
            raise ValueError(f"an adversary needs at least 2 clusters, got n_clusters={n_clusters}.")
        self.in_features, self.n_clusters = in_features, n_clusters
        self.input_norm = nn.BatchNorm1d(in_features, affine=False) if input_norm else None
        self.hidden = nn.Sequential(*mlp_layers(in_features, hidden_channels, act))
        self.out = nn.Linear(hidden_channels[-1] if hidden_channels else in_features, n_clusters)
        glorot_init(self)

    @staticmethod
    def pool_features(features: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The features as the adversary reads them, each ``(B, n)``: feature maps global-average pooled.

        A trainer that calls the adversary twice on the same features (its own step on them detached, then the main
        step on them live) pools once and passes the pooled features (the forward pass leaves ``(B, n)`` inputs as
        they are).

        Example::

            pooled = adversary.pool_features(out.features)
            adversary([p.detach() for p in pooled]); adversary(pooled)
        """
        if isinstance(features, torch.Tensor):
            features = [features]
        return [_global_mean(f) if f.dim() > 2 else f for f in features]

    def forward(self, features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        flat = self.pool_features(features)
        x = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"ClusterAdversary expected {self.in_features} concatenated features, got {x.shape[1]} "
                f"(from shapes {[tuple(f.shape) for f in ([features] if isinstance(features, torch.Tensor) else features)]})."
            )
        return self.out(self.hidden(self.input_norm(x) if self.input_norm is not None else x))
