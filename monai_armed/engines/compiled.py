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

"""``torch.compile`` support of the ARMED engines: MONAI's ``compile`` argument compiles ``network.forward``, which the
ARMED trainers do not call (they call ``forward_armed``), and dynamo traces plain tensors better than ``MetaTensor``."""

from __future__ import annotations

import sys
from typing import Any

import torch
from monai.data import MetaTensor

__all__ = ["is_compiled", "plain_tensor", "with_meta_of"]


def is_compiled(module: Any) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns (an ``OptimizedModule``).

    Example::

        is_compiled(torch.compile(net)), is_compiled(net)      # True, False
    """
    dynamo = sys.modules.get("torch._dynamo")  # nothing is compiled before dynamo is imported, which takes a second
    return dynamo is not None and isinstance(module, dynamo.eval_frame.OptimizedModule)


def plain_tensor(inputs: Any) -> Any:
    """``inputs`` without its metadata (a ``MetaTensor`` as a ``torch.Tensor``), for a compiled network, as MONAI's
    engines do; anything else unchanged.

    Example::

        plain_tensor(MetaTensor(torch.zeros(1, 1, 8, 8))).__class__      # torch.Tensor
    """
    return inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs


def with_meta_of(output: Any, inputs: Any) -> Any:
    """A compiled network's tensor ``output`` with the metadata of its ``MetaTensor`` ``inputs`` (what the eager network
    would have returned, for post-processing that inverts transforms or writes images); anything else unchanged.

    Example::

        pred = with_meta_of(compiled_net(plain_tensor(image)), image)   # a MetaTensor with image.meta
    """
    if not isinstance(inputs, MetaTensor) or not isinstance(output, torch.Tensor) or isinstance(output, MetaTensor):
        return output
    return MetaTensor(output, meta=inputs.meta, applied_operations=inputs.applied_operations)
