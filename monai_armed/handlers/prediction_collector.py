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

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.engines.distributed import gather_shards, gathers_shards
from monai_armed.engines.output import IterationOutput

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PredictionCollector", "output_field"]


def output_field(
    output: dict | IterationOutput | Sequence[dict], key: str, factor: str | None = None
) -> torch.Tensor | None:
    """One field of ``engine.state.output`` as a batch tensor, whether or not the engine decollated it.

    A field that holds one tensor per grouping factor (the ``cluster`` of a several-factor model, a mapping
    ``factor -> index``) gives the tensor of ``factor``, by default the first factor.

    Example::

        pred = output_field(engine.state.output, "pred")     # (B, ...) tensor
        site = output_field(engine.state.output, "cluster", factor="site")
    """
    if isinstance(output, (dict, IterationOutput)):
        value = output.get(key)
        return None if value is None else torch.as_tensor(_factor_value(value, key, factor))
    values = [item.get(key) for item in output]
    if not values or any(v is None for v in values):
        return None
    return torch.stack([torch.as_tensor(_factor_value(v, key, factor)) for v in values])


def _factor_value(value: object, key: str, factor: str | None) -> object:
    if not isinstance(value, Mapping):
        return value
    if not value:
        raise ValueError(f"output field {key!r} is an empty mapping.")
    name = factor if factor is not None else next(iter(value))
    if name not in value:
        raise KeyError(f"output field {key!r} has no grouping factor {name!r}; it has {list(value)}.")
    return value[name]


class PredictionCollector:
    """Gathers ``pred``, ``label`` and ``cluster`` of every iteration of an evaluator run (on the CPU).

    After a run, :attr:`pred`, :attr:`label` and :attr:`cluster` hold the concatenated tensors (``None`` for a field
    the engine did not output). Works with decollated and plain outputs. Under DDP, when the evaluator's loader reads one
    shard per process (a ``DistributedSampler``), each process collects its shard; with ``gather_processes`` every
    process holds the predictions of all of them (attach it in every process then: the gathering is a collective call;
    see :func:`~monai_armed.engines.gathers_shards`). With several grouping factors (a mapping
    ``cluster``) it collects the index of ``cluster_factor``, by default the engine's first factor (the network's
    order, whatever the order of the batch's cluster keys).

    Args:
        keys: output keys to collect.
        cluster_factor: the grouping factor collected from a mapping field (default the first).
        pred_transform: applied to every batch of ``pred`` before it is kept (e.g.
            :func:`~monai_armed.metrics.label_map`, so that segmentation logits are kept as small class maps).
        gather_processes: under DDP with a sharded loader, gather every process's predictions.
        owner: the handler whose predictions these are, in messages (default ``"PredictionCollector"``).

    Example::

        collector = PredictionCollector()
        collector.attach(evaluator)
        evaluator.run()
        summary = classification_summary(collector.pred, collector.label, collector.cluster)
    """

    def __init__(
        self,
        keys: Sequence[str] = (Keys.PRED, Keys.LABEL, "cluster"),
        cluster_factor: str | None = None,
        pred_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        gather_processes: bool = False,
        owner: str | None = None,
    ) -> None:
        self.keys = tuple(keys)
        self.gather_processes = gather_processes
        self.owner = owner or type(self).__name__
        self.cluster_factor = cluster_factor
        self.pred_transform = pred_transform
        self._parts: dict[str, list[torch.Tensor]] = {k: [] for k in self.keys}
        self.values: dict[str, torch.Tensor | None] = {k: None for k in self.keys}

    def attach(self, engine: Engine) -> None:
        levels = getattr(engine, "n_clusters", None)
        if self.cluster_factor is None and isinstance(levels, Mapping) and levels:
            # the network's first factor, as the engine counts them, not the first key of the batch's mapping
            self.cluster_factor = next(iter(levels))
        if not engine.has_event_handler(self.reset, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.finalize)

    def reset(self, engine: Engine | None = None) -> None:
        """Forget the last run: a run that gives no batch (an empty loader, which ignite skips) leaves ``None``."""
        self._parts = {k: [] for k in self.keys}
        self.values = {k: None for k in self.keys}

    def collect(self, engine: Engine) -> None:
        for key in self.keys:
            value = output_field(engine.state.output, key, self.cluster_factor)
            if value is not None:
                value = value.detach()
                if key == Keys.PRED and self.pred_transform is not None:
                    value = self.pred_transform(value)
                self._parts[key].append(value.cpu())

    def finalize(self, engine: Engine | None = None) -> None:
        """Concatenate the run's batches; with ``gather_processes`` under DDP, every process's (a collective call)."""
        values = {k: torch.cat(v) if v else None for k, v in self._parts.items()}
        loader = getattr(engine.state, "dataloader", None) if engine is not None else None
        if gathers_shards(loader, self.gather_processes, self.owner):
            device = getattr(engine.state, "device", None) or "cpu"
            values = {k: None if v is None else gather_shards(v, device) for k, v in values.items()}
        self.values = values

    @property
    def pred(self) -> torch.Tensor | None:
        return self.values.get(Keys.PRED)

    @property
    def label(self) -> torch.Tensor | None:
        return self.values.get(Keys.LABEL)

    @property
    def cluster(self) -> torch.Tensor | None:
        return self.values.get("cluster")
