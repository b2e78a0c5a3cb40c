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

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.handlers.prediction_collector import PredictionCollector
from monai_armed.metrics import classification_summary
from monai_armed.utils import write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PerClusterAccuracy"]


class PerClusterAccuracy:
    """Accuracy of an evaluator's predictions per cluster (and for unseen samples), at the end of every run.

    Puts ``per_cluster_accuracy`` (``{cluster name: {"accuracy", "n"}}``) into ``engine.state.metric_details``, the
    worst seen cluster's accuracy into ``engine.state.metrics["min_cluster_accuracy"]``, logs the table, and writes it
    to ``output_file`` if given.

    With several grouping factors (the evaluator's ``cluster`` a mapping ``factor -> index``) the table is of one
    factor, ``cluster_factor`` (default the first), and ``n_clusters`` / ``cluster_names`` are that factor's.

    Under DDP with a sharded validation loader (a ``DistributedSampler``) the table covers the process's own shard, or
    with ``gather_processes`` every process's shard (attach it in every process then); rank 0 writes ``output_file``.

    Args:
        n_clusters: number of seen clusters.
        cluster_names: names of the clusters (e.g. ``ClusterVocabulary.clusters``); default: the indices.
        output_file: optional JSON path.
        name: logger name (``None``: the engine's logger).
        cluster_factor: with several grouping factors, the one the table is of (default the first).
        gather_processes: under DDP with a sharded loader, tabulate every process's predictions (a collective call).

    Example::

        PerClusterAccuracy(n_clusters=10, output_file="eval/per_cluster.json").attach(evaluator)
    """

    def __init__(
        self,
        n_clusters: int,
        cluster_names: Sequence[str] | None = None,
        output_file: str | os.PathLike | None = None,
        name: str | None = None,
        cluster_factor: str | None = None,
        gather_processes: bool = False,
    ) -> None:
        self.n_clusters, self.cluster_names, self.output_file = n_clusters, cluster_names, output_file
        self.collector = PredictionCollector(
            cluster_factor=cluster_factor, gather_processes=gather_processes, owner=type(self).__name__
        )
        self.logger = logging.getLogger(name) if name else None

    def attach(self, engine: Engine) -> None:
        self._check_levels(getattr(engine, "n_clusters", None))  # the collector then takes the same (first) factor
        self.collector.attach(engine)
        if not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _check_levels(self, levels: int | Mapping[str, int] | None) -> None:
        """Refuse a table whose clusters are not those of the factor it tabulates, where the engine says them: with
        several factors the table is of ``cluster_factor`` (default the first), whose levels ``n_clusters`` and
        ``cluster_names`` must count."""
        factor = self.collector.cluster_factor
        if isinstance(levels, Mapping):
            if factor is not None and factor not in levels:
                raise KeyError(f"cluster_factor {factor!r} is not a grouping factor of the engine: {list(levels)}.")
            chosen = factor or next(iter(levels))
            expected, what = levels[chosen], f"grouping factor {chosen!r}" + ("" if factor else " (the first)")
        elif isinstance(levels, int):
            expected, what = levels, "the engine's clusters"
        else:
            return
        given = [self.n_clusters] + ([len(self.cluster_names)] if self.cluster_names is not None else [])
        if any(n != expected for n in given):
            hint = "; pass cluster_factor= for another factor" if isinstance(levels, Mapping) and not factor else ""
            raise ValueError(
                f"{type(self).__name__} tabulates {what}, which has {expected} levels, but got n_clusters="
                f"{self.n_clusters}" + (f" and {len(self.cluster_names)} cluster_names" if self.cluster_names is not None else "")
                + f"{hint}."
            )

    #: ``metric_details`` key, ``metrics`` key of the worst seen cluster, its per-cluster field, and whether lower wins
    details_key, worst_key, field, lower_is_worse = "per_cluster_accuracy", "min_cluster_accuracy", "accuracy", True

    def table(self, pred, label, cluster) -> dict:
        """The per-cluster table of one run's predictions."""
        return classification_summary(pred, label, cluster, self.n_clusters, self.cluster_names)["per_cluster"]

    def describe(self, table: dict) -> str:
        """The log line of a table."""
        return "per-cluster accuracy: " + ", ".join(f"{k}={v['accuracy']:.3f} (n={v['n']})" for k, v in table.items())

    def __call__(self, engine: Engine) -> None:
        c = self.collector
        if c.pred is None or c.label is None or c.cluster is None:
            raise KeyError(f"{type(self).__name__} needs 'pred', 'label' and 'cluster' in the evaluator's output.")
        table = self.table(c.pred, c.label, c.cluster)
        engine.state.metric_details[self.details_key] = table
        seen = [v[self.field] for k, v in table.items() if k != "unseen" and v[self.field] is not None]
        if seen:
            engine.state.metrics[self.worst_key] = min(seen) if self.lower_is_worse else max(seen)
        (self.logger or engine.logger).info(self.describe(table))
        if self.output_file is not None and idist.get_rank() == 0:
            write_json(table, self.output_file)
