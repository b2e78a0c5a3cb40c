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
"""An inferer that gives everything an ARMED autoencoder-classifier computes in one pass."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from monai.inferers import Inferer

from monai_armed.engines.distributed import unwrap_armed
from monai_armed.networks.nets.autoencoder import AECOutput

__all__ = ["AutoencoderInferer"]


class AutoencoderInferer(Inferer):
    """Calls ``network.forward_autoencoder(inputs, cluster)`` and returns the whole :class:`AECOutput`.

    MONAI's ``SimpleInferer`` returns ``network(inputs)``, the logits only; an evaluator that writes reconstructions,
    batch-effect maps or latents needs all of them from the same pass. :class:`~monai_armed.engines.ARMEDEvaluator`
    gives the inferer the batch's resolved ``cluster`` (observed, fixed, inferred or randomized), so ``pred`` in its
    output is an :class:`AECOutput` (use ``decollate=False``).

    Raises:
        TypeError: the network has no ``forward_autoencoder``.

    Example::

        evaluator = ARMEDEvaluator(device, loader, net, z_predictor=zp, inferer=AutoencoderInferer(), decollate=False,
                                   val_handlers=[AutoencoderOutputWriter("eval/inference")])
        out = AutoencoderInferer()(x, net, cluster=cluster)       # AECOutput: out.recon_fe, out.recon_re, ...
    """

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> AECOutput:
        forward = getattr(unwrap_armed(network), "forward_autoencoder", None)
        if not callable(forward):
            raise TypeError(
                f"AutoencoderInferer needs a network with forward_autoencoder(x, cluster) -> AECOutput; "
                f"{type(network).__name__} has none (use monai_armed.networks.MixedEffectsAutoencoder)."
            )
        return forward(inputs, *args, **kwargs)
