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

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.engines.distributed import unwrap_armed
from monai_armed.networks.utils import random_effects_summary
from monai_armed.utils import write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["RandomEffectsSummary"]


class RandomEffectsSummary:
    """Writes what the random effects learned: per-cluster posterior means (intercepts, slopes) and scales, the
    across-cluster spread of each unit (a large spread = a feature whose effect differs between clusters) and the
    variance components (lme4's ``VarCorr`` rows, with the residual of a Gaussian ``family``; ``format_varcorr``
    prints them as lme4 does).

    Writes ``output_file`` (JSON, see ``random_effects_summary``; rank 0 under DDP) every ``interval`` epochs and at the
    end of training, and, with a ``summary_writer`` (e.g. ``torch.utils.tensorboard.SummaryWriter``), the spreads as scalars
    ``{tag_prefix}/{group}/spread_{unit}`` per epoch.

    Args:
        network: the mixed-effects network.
        output_file: JSON path.
        cluster_names: names of the clusters (e.g. ``ClusterVocabulary.clusters``); with several grouping factors a
            mapping ``factor -> names`` or a ``ClusterVocabularies``.
        summary_writer: optional TensorBoard-style writer with ``add_scalar``.
        interval: epochs between two writes.
        tag_prefix: prefix of the scalar tags.
        family: the likelihood family of the loss, for the residual variance row (Gaussian).

    Example::

        RandomEffectsSummary(net, "eval/random_effects.json", cluster_names=vocab.clusters).attach(trainer)
    """

    def __init__(
        self,
        network: nn.Module,
        output_file: str | os.PathLike,
        cluster_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
        summary_writer: Any = None,
        interval: int = 1,
        tag_prefix: str = "random_effects",
        family: nn.Module | None = None,
    ) -> None:
        self.network, self.output_file = network, output_file
        self.cluster_names = cluster_names  # a sequence, or names per factor: random_effects_summary reads both
        self.summary_writer, self.interval, self.tag_prefix = summary_writer, interval, tag_prefix
        self.family = family
        self._written_epoch: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> dict | None:
        if self._written_epoch == engine.state.epoch:  # the last epoch fires both EPOCH_COMPLETED and COMPLETED
            return None
        self._written_epoch = engine.state.epoch
        summary = random_effects_summary(unwrap_armed(self.network), self.cluster_names, self.family)
        summary["epoch"] = engine.state.epoch
        if idist.get_rank() == 0:  # under DDP every process holds the same parameters
            write_json(summary, self.output_file)
        if self.summary_writer is not None:
            for group, values in summary["groups"].items():
                for unit, spread in enumerate(values["spread"]):
                    self.summary_writer.add_scalar(
                        f"{self.tag_prefix}/{group}/spread_{unit}", spread, engine.state.epoch
                    )
            if callable(getattr(self.summary_writer, "flush", None)):  # a process may end before the writer's own flush
                self.summary_writer.flush()
        return summary
