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
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_norm_layer

__all__ = ["ARMEDCNN", "ArmedCNN", "PadToSize"]


class PadToSize(nn.Module):
    """Zero-pads each spatial dimension that is shorter than ``min_size`` up to ``min_size`` (centred); a no-op else.

    Lets a 'valid' convolution of kernel ``min_size`` run on maps that pooling has made smaller than the kernel.

    Example::

        PadToSize(3)(torch.zeros(2, 4, 1, 5)).shape   # (2, 4, 3, 5)
    """

    def __init__(self, min_size: int) -> None:
        super().__init__()
        self.min_size = min_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        padded = False
        # F.pad takes (before, after) pairs starting from the last dimension
        for i in range(x.dim() - 1, 1, -1):
            short = max(0, self.min_size - x.shape[i])
            padded = padded or short > 0
            pads += [short // 2, short - short // 2]
        return F.pad(x, pads) if padded else x


class ARMEDCNN(nn.Sequential):
    """The 2-D image classifier of the ARMED paper (armed_method.md section 2.2) as a MONAI-style network, 2-D or 3-D.

    A plain fixed-effects CNN (Nguyen & Montillo, https://arxiv.org/abs/2202.11783, TPAMI 2023). Blocks ``c0`` to
    ``c5`` are ``Conv 3 'same' -> [Dropout 0.5 in blocks 1, 3, 5, before the norm] -> norm -> PReLU``, each followed
    by a 2x max-pool; ``c6`` is a 'valid' ``Conv 3 -> PReLU`` without norm; then global average pooling, ``h =
    ReLU(Dense(hidden_channels))`` (the penultimate features) and ``Dense(out_channels)`` (logits, no activation).
    ``ARMED(ARMEDCNN(...), n_clusters)`` turns it into the paper's mixed-effects CNN (random scale on ``h``, random
    intercept on the logits, adversary on ``c0 ... c6`` and ``h``); :attr:`feature_layers` names ``c0 ... c6``.

    For a 192 x 192 input the map before ``c6`` is 3 x 3 and ``c6`` gives 1 x 1, exactly as in the paper, so the
    global pooling is the identity there. Other sizes work too: pooling uses ``ceil_mode`` (a 1-pixel map stays 1
    pixel), a map smaller than the kernel is zero-padded up to it before the 'valid' ``c6``, and the adaptive average
    pooling reduces whatever ``c6`` gives to one vector.

    Deviations from the reference, on purpose: PReLU has one learnable slope per channel (initialised 0, i.e. ReLU
    at the start as in Keras) instead of one per activation element, which would tie the network to one input size;
    the Dense L1 penalty (0.01) is not built in (the reference's custom training step ignored it too). Kernels are
    Glorot-uniform with zero biases and BatchNorm uses Keras' momentum 0.99 and eps 1e-3, as in the reference.

    Args:
        spatial_dims: number of spatial dimensions (2 as in the paper, or 3).
        in_channels: number of input channels.
        out_channels: number of logits (1 for a binary classifier with a sigmoid/BCE loss).
        filters: output channels of the blocks ``c0 ... c{n-1}`` (the last one is the 'valid' block). The paper's are
            ``(64, 128, 128, 256, 256, 512, 512)``; ``(8, 16, 16, 32, 32, 64, 64)`` is a CPU-sized version.
        hidden_channels: width of the penultimate dense layer ``h`` (512 in the paper).
        dropout: element-wise dropout probability of the blocks in ``dropout_blocks``.
        dropout_blocks: indices of the blocks with dropout (placed before the norm); default: the odd pooled
            blocks, i.e. ``(1, 3, 5)`` for the paper's 7 blocks.
        norm: norm of blocks ``c0 ... c{n-2}`` as a MONAI name or ``(name, kwargs)``, e.g.
            ``("clusterscalebias", {"n_clusters": 5})`` for random per-cluster scales and biases.
        kernel_size: convolution kernel size.

    Example::

        net = ARMEDCNN(spatial_dims=2, in_channels=1, out_channels=1)
        logits = net(torch.randn(2, 1, 192, 192))                  # (2, 1)
        small = ARMEDCNN(filters=(8, 16, 16, 32, 32, 64, 64), hidden_channels=32)
        me_cnn = ARMED(small, n_clusters=5)                          # the paper's ME-CNN
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        filters: Sequence[int] = (64, 128, 128, 256, 256, 512, 512),
        hidden_channels: int = 512,
        dropout: float = 0.5,
        dropout_blocks: Sequence[int] | None = None,
        norm: str | tuple = ("batch", {"eps": 1e-3, "momentum": 0.01}),
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        filters = [int(f) for f in filters]
        if len(filters) < 2 or min(filters) < 1:
            raise ValueError(
                f"filters must list at least 2 positive widths (blocks, then the final block), got {filters}."
            )
        if dropout_blocks is None:
            dropout_blocks = tuple(range(1, len(filters) - 1, 2))
        bad = [i for i in dropout_blocks if not 0 <= i < len(filters) - 1]
        if bad:
            raise ValueError(f"dropout_blocks must index the pooled blocks 0..{len(filters) - 2}, got {list(bad)}.")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.kernel_size = kernel_size
        conv = Conv[Conv.CONV, spatial_dims]
        pool = Pool[Pool.MAX, spatial_dims]
        width = in_channels
        for i, channels in enumerate(filters[:-1]):
            layers: list[nn.Module] = [conv(width, channels, kernel_size, padding=kernel_size // 2)]
            if i in dropout_blocks and dropout > 0:
                layers.append(nn.Dropout(dropout))  # element-wise like Keras' Dropout, not channel-wise Dropout2d
            layers += [get_norm_layer(norm, spatial_dims, channels), nn.PReLU(channels, init=0.0)]
            self.add_module(f"c{i}", nn.Sequential(*layers))
            self.add_module(f"pool{i}", pool(kernel_size=2, ceil_mode=True))
            width = channels
        last = len(filters) - 1
        self.add_module("pad", PadToSize(kernel_size))
        self.add_module(
            f"c{last}", nn.Sequential(conv(width, filters[-1], kernel_size), nn.PReLU(filters[-1], init=0.0))
        )
        self.add_module("global_pool", Pool[Pool.ADAPTIVEAVG, spatial_dims](1))
        self.add_module("flatten", nn.Flatten(1))
        self.add_module("h", nn.Sequential(nn.Linear(filters[-1], hidden_channels), nn.ReLU()))
        self.add_module("out", nn.Linear(hidden_channels, out_channels))
        self.feature_layers = tuple(f"c{i}" for i in range(len(filters)))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


ArmedCNN = ARMEDCNN
