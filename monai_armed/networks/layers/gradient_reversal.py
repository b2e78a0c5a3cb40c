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

__all__ = ["GradientReversal", "grad_reverse"]


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.weight * grad, None


def grad_reverse(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-weight`` in the backward pass.

    Example::

        features = grad_reverse(hidden, weight=0.5)   # the adversary below learns, the layers above unlearn
    """
    return _GradReverse.apply(x, weight)


class GradientReversal(nn.Module):
    """Gradient-reversal layer (Ganin & Lempitsky, 2015): identity forward, ``-weight * grad`` backward.

    Placed between a feature extractor and a cluster adversary, one backward pass trains the adversary to predict
    the cluster and the features to hide it. ``weight`` is a plain attribute so a handler can schedule it.

    Args:
        weight: the factor applied to the reversed gradient.

    Example::

        grl = GradientReversal(weight=0.5)
        y = grl(x)          # y == x, but dL/dx = -0.5 * dL/dy
    """

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
