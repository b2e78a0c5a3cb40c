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

from collections.abc import Sequence

import torch
import torch.nn as nn

from monai_armed.networks.blocks.adversary import mlp_layers
from monai_armed.networks.utils import glorot_init

__all__ = ["ZPredictor"]


class ZPredictor(nn.Module):
    """Infers soft cluster membership from the input, for clusters not seen in training (armed_method.md section 4.2).

    Trained as an ordinary ``n_clusters``-way classifier on the seen clusters (the cluster index is its label). At
    test time :meth:`membership` gives softmax rows that sum to 1; fed to an ARMED network as ``cluster``, the applied
    random effect is the membership-weighted mean of the seen clusters' effects.

    By default it is the paper's tabular predictor (dense 8-8-4 with ReLU); pass ``backbone`` to use any network that
    maps the input to ``n_clusters`` logits (e.g. a MONAI CNN for images).

    Args:
        in_features: number of input features (ignored when ``backbone`` is given).
        n_clusters: number of seen clusters.
        hidden_channels: hidden widths of the default dense predictor.
        act: activation of the default dense predictor.
        backbone: optional network producing ``(B, n_clusters)`` logits.
        temperature: softmax temperature of :meth:`membership` (1 = calibrated as trained).

    Example::

        zp = ZPredictor(in_features=2, n_clusters=10)
        logits = zp(x)                          # train with CrossEntropyLoss(logits, cluster_index)
        soft_z = zp.membership(x)               # (B, 10), rows sum to 1
        logits_me = armed_net(x, soft_z)
    """

    def __init__(
        self,
        in_features: int = 0,
        n_clusters: int = 2,
        hidden_channels: Sequence[int] = (8, 8, 4),
        act: str | tuple = "relu",
        backbone: nn.Module | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if n_clusters < 2:
            raise ValueError(f"a Z-predictor needs at least 2 clusters, got n_clusters={n_clusters}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.n_clusters, self.temperature = n_clusters, temperature
        if backbone is None:
            if in_features < 1:
                raise ValueError("in_features must be >= 1 when no backbone is given.")
            width = hidden_channels[-1] if hidden_channels else in_features
            backbone = nn.Sequential(*mlp_layers(in_features, hidden_channels, act), nn.Linear(width, n_clusters))
            glorot_init(backbone)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.backbone(x)
        if logits.dim() != 2 or logits.shape[1] != self.n_clusters:
            raise ValueError(f"Z-predictor backbone must return (batch, {self.n_clusters}), got {tuple(logits.shape)}.")
        return logits

    def membership(self, x: torch.Tensor) -> torch.Tensor:
        """Soft cluster membership ``(B, n_clusters)``; rows sum to 1."""
        return torch.softmax(self.forward(x) / self.temperature, dim=1)
