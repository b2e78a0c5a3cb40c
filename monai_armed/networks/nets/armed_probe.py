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
"""What :class:`~monai_armed.networks.ARMED` learns about a network before wrapping it: its output layer (head), found
by a dry run, and the layers whose outputs the adversary reads by default."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import (
    UNETR,
    ViT,
    AttentionUnet,
    BasicUNet,
    DenseNet,
    DynUNet,
    EfficientNet,
    ResNet,
    SegResNet,
    SENet,
    SwinUNETR,
    UNet,
)

from monai_armed.utils import shape_str

__all__ = [
    "HEAD_TYPES",
    "INPUT_SUFFIX",
    "PROBE_BATCH",
    "default_tap_layers",
    "describe_output",
    "guess_in_shape",
    "is_token_layer",
    "layer_call_order",
    "locate_head",
    "probe_input",
]

#: the layers that can be an ARMED head: a linear layer (classification, regression, transformer tokens) or a
#: convolution (the logit map of a segmentation network)
HEAD_TYPES = (nn.Linear, nn.modules.conv._ConvNd)
#: A tap named ``"<module>:input"`` reads the first positional input of ``<module>`` instead of its output.
INPUT_SUFFIX = ":input"
#: rows of the dry-run input: two, so that an operation after the head that changes the number of rows shows up
PROBE_BATCH = 2
#: spatial size of the dry run when ``in_shape`` is not given, per number of spatial dimensions
_PROBE_SIZE = {1: 256, 2: 64, 3: 32}


def guess_in_shape(network: nn.Module) -> tuple[tuple[int, ...], str]:
    """The dry run's input shape without the batch dimension, and where it came from: the first convolution's input
    channels at 64 x 64 in 2-D, 32^3 in 3-D, 256 in 1-D, else the first linear layer's input features.

    Example::

        guess_in_shape(UNet(3, 1, 2, channels=(8, 16), strides=(2,)))   # ((1, 32, 32, 32), "guessed from ...")
    """
    layers = [(n, m) for n, m in network.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    layers = layers or [(n, m) for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(
            f"cannot guess the input shape of {type(network).__name__} for ARMED's dry run: it has no convolution or "
            "nn.Linear layer; pass in_shape=(channels, *spatial), the shape of one input without the batch dimension."
        )
    name, layer = layers[0]
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (layer.in_features,)
    else:
        dims = len(layer.kernel_size)
        shape = (layer.in_channels,) + (_PROBE_SIZE.get(dims, 64),) * dims
    if 0 in shape:
        raise ValueError(
            f"cannot guess the input shape of {type(network).__name__} for ARMED's dry run: its first layer {name!r} is "
            f"an uninitialised {type(layer).__name__}; pass in_shape=(channels, *spatial), the shape of one input "
            "without the batch dimension."
        )
    return shape, f"guessed from {name!r} ({type(layer).__name__}); pass in_shape=(channels, *spatial) otherwise"


def probe_input(network: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A zero batch of ``PROBE_BATCH`` inputs of ``shape`` on the network's device and floating dtype.

    Example::

        x = probe_input(net, (1, 64, 64))     # (2, 1, 64, 64) zeros
    """
    reference = next(itertools.chain(network.parameters(), network.buffers()), None)
    return torch.zeros(
        (PROBE_BATCH, *shape),
        device=reference.device if reference is not None else None,
        dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
    )


@contextmanager
def evaluation_pass(network: nn.Module) -> Iterator[None]:
    """Eval mode without gradients for a dry run; every module's training flag is restored afterwards.

    Example::

        with evaluation_pass(net):
            out = net(x)
    """
    modes = [(m, m.training) for m in network.modules()]
    network.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _has_own_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def layer_call_order(network: nn.Module, x: torch.Tensor) -> tuple[list[str], Any]:
    """Names of the layers with parameters of their own, in the order their forward passes end, during one
    evaluation-mode pass on ``x`` (a layer called twice appears twice); also returns the network's output.

    Example::

        order, out = layer_call_order(net, probe_input(net, (1, 32, 32)))
        order[-1]                          # the output convolution of a UNet
    """
    order: list[str] = []
    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: order.append(name))
        for name, m in network.named_modules()
        if name and (_has_own_params(m) or isinstance(m, HEAD_TYPES))
    ]
    try:
        with evaluation_pass(network):
            out = network(x)
    finally:
        for handle in handles:
            handle.remove()
    return order, out


def locate_head(network: nn.Module, order: Sequence[str]) -> str:
    """The output layer in a :func:`layer_call_order`: the last linear layer or convolution called.

    Example::

        locate_head(unet, layer_call_order(unet, x)[0])     # "model.2.conv" ("model.2.1.conv.unit0.conv" with res units)
    """
    modules = dict(network.named_modules())
    heads = [name for name in order if isinstance(modules[name], HEAD_TYPES)]
    if not heads:
        raise ValueError(
            f"{type(network).__name__} called no nn.Linear or convolution layer in a dry run, so ARMED found no output "
            "layer to put the random effects on; pass head=<name from net.named_modules()>."
        )
    return heads[-1]


def layers_after(network: nn.Module, order: Sequence[str], head: str) -> list[str]:
    """The layers with parameters that a :func:`layer_call_order` calls after the head's last call (outside it).

    Example::

        layers_after(highresnet, order, "blocks.11.conv")      # ["blocks.11.adn.N"]: a BatchNorm after the head
    """
    last = max(i for i, name in enumerate(order) if name == head)
    after = [n for n in order[last + 1 :] if not n.startswith(head + ".")]
    return list(dict.fromkeys(after))


def describe_output(value: Any) -> str:
    """What a forward returned, for error messages: ``"a Tensor (1, 2)"``, ``"a tuple (Tensor (1, 2), list)"``.

    Example::

        describe_output((torch.zeros(1, 2), []))      # "a tuple (Tensor (1, 2), list)"
    """
    if isinstance(value, torch.Tensor):
        return f"a Tensor {shape_str(value)}"
    if isinstance(value, (tuple, list)):
        items = [f"Tensor {shape_str(v)}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in value]
        return f"a {type(value).__name__} ({', '.join(items)})"
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {list(value)}"
    return f"a {type(value).__name__}"


def is_token_layer(module: nn.Module) -> bool:
    """Whether a tapped layer returns transformer tokens ``(B, N, C)`` (pooled over the tokens for the adversary).

    Example::

        is_token_layer(vit.blocks[0])     # True
    """
    return isinstance(module, (TransformerBlock, nn.TransformerEncoderLayer, nn.LayerNorm))


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _generic_taps(network: nn.Module, head: str) -> list[str]:
    """The parameterised children before the head's branch, descending while there is just one."""
    module, prefix = network, ""
    while True:
        names, chosen = [], module
        for name, child in module.named_children():
            full = prefix + name
            if head == full or head.startswith(full + "."):
                break
            if _has_params(child):
                names.append(full)
                chosen = child
        if len(names) == 1 and next(chosen.children(), None) is not None:
            module, prefix = chosen, names[0] + "."
            continue
        return names


def _nested_unet_taps(level: nn.Sequential, prefix: str) -> list[str]:
    """Encoder blocks of MONAI's recursive ``UNet`` / ``AttentionUnet``: each level is a ``Sequential`` whose first
    item is the level's encoder block and whose second (a skip connection / attention layer) wraps the next level in
    ``.submodule``, down to the bottom block."""
    taps = [f"{prefix}.0"]
    inner = getattr(level[1], "submodule", None)
    if isinstance(inner, nn.Sequential) and len(inner) >= 2 and hasattr(inner[1], "submodule"):
        return taps + _nested_unet_taps(inner, f"{prefix}.1.submodule")
    return taps + [f"{prefix}.1.submodule" if inner is not None else f"{prefix}.1"]


def _encoder_taps(network: nn.Module) -> list[str] | None:
    """The encoder levels (skip features and bottleneck) of MONAI's segmentation networks, or ``None``."""
    if isinstance(network, (UNet, AttentionUnet)):
        return _nested_unet_taps(network.model, "model")
    if isinstance(network, BasicUNet):
        return ["conv_0", "down_1", "down_2", "down_3", "down_4"]
    if isinstance(network, SegResNet):
        return [f"down_layers.{i}" for i in range(len(network.down_layers))]
    if isinstance(network, DynUNet):
        return ["input_block"] + [f"downsamples.{i}" for i in range(len(network.downsamples))] + ["bottleneck"]
    if isinstance(network, UNETR):  # decoder5's first input is the projected bottleneck of the transformer
        return ["encoder1", "encoder2", "encoder3", "encoder4", "decoder5" + INPUT_SUFFIX]
    if isinstance(network, SwinUNETR):
        return ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"]
    if isinstance(network, ViT):
        return [f"blocks.{i}" for i in range(len(network.blocks))]
    return None


def default_tap_layers(network: nn.Module, head: str | None = None) -> list[str]:
    """The intermediate layers whose outputs :class:`~monai_armed.networks.ARMED` feeds to the cluster adversary by
    default (``ARMED`` adds the head's input after these); ``head`` is only needed by the last rule (default: found
    by a dry run, as ``ARMED`` does). Rules, first match wins:

    - a network with a ``feature_layers`` attribute (e.g. :class:`ARMEDCNN`: ``c0 ... c6``): those names;
    - MONAI ``DenseNet``: the transition layers ``features.transitionN`` (dense block outputs after compression);
    - MONAI ``ResNet`` / ``SENet`` (SEResNet...): ``layer1 ... layer3`` (``layer4`` pooled is the penultimate);
    - MONAI ``EfficientNet``: every stage ``_blocks.N``;
    - MONAI segmentation networks: the encoder levels, skip features and bottleneck (``UNet`` / ``AttentionUnet``: the
      down block of every level and the bottom block; ``BasicUNet``: ``conv_0``, ``down_1 ... down_4``;
      ``SegResNet``: ``down_layers.N``; ``DynUNet``: ``input_block``, ``downsamples.N``, ``bottleneck``; ``UNETR``:
      ``encoder1 ... encoder4`` and the projected transformer output ``decoder5:input``; ``SwinUNETR``:
      ``encoder1 ... encoder4``, ``encoder10``);
    - MONAI ``ViT``: every transformer block ``blocks.N`` (tokens, averaged over the tokens);
    - otherwise: the parameterised children that come before the head's branch, descending into a single one
      (``features`` of a ``features`` / ``classifier`` network, say).

    Example::

        default_tap_layers(resnet18(spatial_dims=2, n_input_channels=1, num_classes=2))   # layer1 ... layer3
        default_tap_layers(BasicUNet(2, 1, 2))          # conv_0, down_1, down_2, down_3, down_4
    """
    declared = getattr(network, "feature_layers", None)
    if declared is not None:
        return [str(name) for name in declared]
    if isinstance(network, DenseNet):
        return [f"features.{n}" for n, _ in network.features.named_children() if n.startswith("transition")]
    if isinstance(network, (ResNet, SENet)):
        return [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(network, n)][:-1]
    if isinstance(network, EfficientNet):
        return [f"_blocks.{n}" for n, _ in network._blocks.named_children()]
    encoder = _encoder_taps(network)
    if encoder is not None:
        return encoder
    if head is None:
        shape, _ = guess_in_shape(network)
        head = locate_head(network, layer_call_order(network, probe_input(network, shape))[0])
    return _generic_taps(network, head)
