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
from collections.abc import Sequence
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.handlers.prediction_collector import PredictionCollector
from monai_armed.metrics import per_cluster_regression_metrics
from monai_armed.utils import write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["PerClusterRegression"]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class PerClusterRegression:
    """MSE, MAE and R² of an evaluator's predictions per cluster (and for unseen samples), at the end of every run:
    the regression counterpart of :class:`~monai_armed.handlers.PerClusterAccuracy`.

    Puts ``per_cluster_regression`` (``{cluster name: {"n", "mse", "mae", "r2"}}``, ``r2`` ``None`` where undefined)
    into ``engine.state.metric_details``, the worst seen cluster's MSE into ``engine.state.metrics["max_cluster_mse"]``,
    logs the table, and writes it to ``output_file`` if given. ``pred`` is the predicted mean (``(N,)`` or
    ``(N, 1)``), e.g. of an ``ARMEDEvaluator(task="regression")``, which also writes the overall ``mse``, ``mae`` and
    ``r2``.

    Args:
        n_clusters: number of seen clusters.
        cluster_names: names of the clusters (e.g. ``ClusterVocabulary.clusters``); default: the indices.
        output_file: optional JSON path.
        name: logger name (``None``: the engine's logger).

    Example::

        PerClusterRegression(n_clusters=10, output_file="eval/per_cluster_regression.json").attach(evaluator)
    """

    def __init__(
        self,
        n_clusters: int,
        cluster_names: Sequence[str] | None = None,
        output_file: str | os.PathLike | None = None,
        name: str | None = None,
    ) -> None:
        self.n_clusters, self.cluster_names, self.output_file = n_clusters, cluster_names, output_file
        self.collector = PredictionCollector()
        self.logger = logging.getLogger(name) if name else None

    def attach(self, engine: Engine) -> None:
        self.collector.attach(engine)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        c = self.collector
        if c.pred is None or c.label is None or c.cluster is None:
            raise KeyError("PerClusterRegression needs 'pred', 'label' and 'cluster' in the evaluator's output.")
        table = per_cluster_regression_metrics(c.pred, c.label, c.cluster, self.n_clusters, self.cluster_names)
        engine.state.metric_details["per_cluster_regression"] = table
        seen = [v["mse"] for k, v in table.items() if k != "unseen"]
        if seen:
            engine.state.metrics["max_cluster_mse"] = max(seen)
        logger = self.logger or engine.logger
        logger.info(
            "per-cluster regression: "
            + ", ".join(
                f"{k}: mse={_number(v['mse'])} mae={_number(v['mae'])} r2={_number(v['r2'])} (n={v['n']})"
                for k, v in table.items()
            )
        )
        if self.output_file is not None:
            write_json(table, self.output_file)
