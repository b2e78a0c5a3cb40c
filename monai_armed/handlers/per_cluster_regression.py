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

from monai_armed.handlers.per_cluster_accuracy import PerClusterAccuracy
from monai_armed.metrics import per_cluster_regression_metrics

__all__ = ["PerClusterRegression"]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


class PerClusterRegression(PerClusterAccuracy):
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
        cluster_factor: with several grouping factors, the one the table is of (default the first).

    Example::

        PerClusterRegression(n_clusters=10, output_file="eval/per_cluster_regression.json").attach(evaluator)
    """

    details_key, worst_key, field, lower_is_worse = "per_cluster_regression", "max_cluster_mse", "mse", False

    def table(self, pred, label, cluster) -> dict:
        return per_cluster_regression_metrics(pred, label, cluster, self.n_clusters, self.cluster_names)

    def describe(self, table: dict) -> str:
        return "per-cluster regression: " + ", ".join(
            f"{k}: mse={_number(v['mse'])} mae={_number(v['mae'])} r2={_number(v['r2'])} (n={v['n']})"
            for k, v in table.items()
        )
