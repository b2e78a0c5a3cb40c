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
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.handlers.prediction_collector import PredictionCollector
from monai_armed.metrics.binary import _shared_threshold
from monai_armed.metrics import (
    binary_metrics,
    classification_summary,
    label_map,
    per_cluster_binary_metrics,
    positive_probability,
    regression_summary,
    segmentation_summary,
)
from monai_armed.utils import nan_to_none, write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["ClusterModeReport", "dataset_modes", "format_report_table"]

logger = logging.getLogger(__name__)

_METRICS = ("classification", "regression", "binary", "segmentation")
#: the metrics of the tables that a report logs, per kind of report
_LOGGED = {
    "classification": ("accuracy",),
    "regression": ("mse", "r2"),
    "binary": ("auroc",),
    "segmentation": ("dice",),
}
#: the report's default metrics for an evaluator's task
_TASK_METRICS = {"regression": "regression", "segmentation": "segmentation"}


def dataset_modes(
    modes: Mapping[str, Sequence[str]] | None, datasets: Sequence[str], default: Sequence[str], owner: str
) -> dict[str, list[str]]:
    """The cluster modes of each dataset: its entry of ``modes``, else ``default``. An entry that names no dataset (a
    misspelt name, or a dataset left out of this run) is ignored with a warning that names it.

    Example::

        dataset_modes({"unseen": ["fixed"]}, ["seen", "unseen"], ["observed", "fixed"], "ClusterModeReport")
        # {"seen": ["observed", "fixed"], "unseen": ["fixed"]}
    """
    unknown = sorted(set(modes or {}) - set(datasets))
    if unknown:
        logger.warning(f"{owner}: modes given for {unknown}, which name no dataset (the datasets: {list(datasets)}); "
                       "they are ignored.")  # fmt: skip
    return {name: list(modes[name]) if modes and name in modes else list(default) for name in datasets}


class ClusterModeReport:
    """Evaluates a network on several datasets, each in several cluster modes, and writes one metrics JSON.

    For every ``(dataset, mode)`` pair it reruns an ``ARMEDEvaluator`` with that loader and ``cluster_mode`` and stores
    the metrics of its predictions. ``metrics="classification"`` stores :func:`classification_summary`
    (accuracy, balanced accuracy, AUROC, per-cluster accuracy); ``metrics="regression"`` stores
    :func:`~monai_armed.metrics.regression_summary` (MSE, MAE and R² of the predicted means, overall and per cluster,
    ``r2`` ``null`` where undefined); ``metrics="binary"`` stores :func:`binary_metrics`
    (AUROC, balanced accuracy, sensitivity, specificity at a threshold) overall and per cluster, where the threshold
    of each mode is the Youden point fitted on ``threshold_dataset`` in that mode (e.g. the training predictions, as
    in the paper), or fitted on each dataset itself when ``threshold_dataset`` is ``None``. Metrics that the data
    cannot define (AUROC of a one-class site) are written as ``null``. ``metrics="segmentation"`` stores
    :func:`~monai_armed.metrics.segmentation_summary`: the mean per-image Dice and HD95 of the argmax class maps,
    overall and per cluster (the logits are reduced to class maps as they are collected). Attach it to a trainer to run once training
    completes, or call :meth:`run` (e.g. from ``evaluate.json``). A dataset without batches is an error (raised
    before any is evaluated). Under DDP, loaders with a ``DistributedSampler`` give the metrics of the process's own
    shard, or with ``gather_processes`` of every process's (run the report in every process then); rank 0 writes
    ``output_file``.

    Args:
        evaluator: an ``ARMEDEvaluator`` (its ``z_predictor`` is used by ``inferred``).
        datasets: ``{name: loader}``, e.g. ``{"seen": test_loader, "unseen": unseen_loader}``.
        modes: ``{name: [modes]}``; default: ``observed, fixed, randomized`` for every dataset, plus ``inferred`` when
            the evaluator has a Z-predictor. An entry that names no dataset is ignored with a warning.
        output_file: JSON path (optional; written by rank 0 under ``torch.distributed``).
        cluster_names: names of the seen clusters for the per-cluster tables.
        metrics: ``"classification"``, ``"regression"``, ``"binary"`` or ``"segmentation"``; default the
            evaluator's ``task`` when it is ``"regression"`` or ``"segmentation"``, else ``"classification"``.
        threshold_dataset: name of the dataset whose predictions fix the decision threshold of each mode
            (``metrics="binary"`` only); it is evaluated in every mode that another dataset uses.
        cluster_factor: with several grouping factors, the one of the per-cluster tables (default the evaluator's
            ``inferred_factor``, else the first); ``cluster_names`` are then that factor's.
        gather_processes: under DDP with sharded loaders, gather every process's predictions (a collective call).

    Example::

        report = ClusterModeReport(evaluator, {"seen": test_loader, "unseen": unseen_loader},
                                   {"seen": ["observed", "fixed", "randomized"], "unseen": ["fixed", "inferred"]},
                                   output_file="eval/metrics.json")
        metrics = report.run()
        metrics["unseen"]["inferred"]["accuracy"]

        binary = ClusterModeReport(evaluator, {"train": train_loader, "seen": test_loader}, metrics="binary",
                                   threshold_dataset="train")
        binary.run()["seen"]["observed"]["auroc"]

        regression = ClusterModeReport(ARMEDEvaluator(..., task="regression"), {"seen": test_loader},
                                       cluster_names=vocabulary.clusters)
        regression.run()["seen"]["observed"]["per_cluster"]["site_a"]["r2"]
        segmentation = ClusterModeReport(ARMEDEvaluator(..., task="segmentation", inferer=sliding_window),
                                         {"seen": test_loader, "unseen": unseen_loader})
        segmentation.run()["unseen"]["inferred"]["dice"]
    """

    def __init__(
        self,
        evaluator: Any,
        datasets: Mapping[str, Any],
        modes: Mapping[str, Sequence[str]] | None = None,
        output_file: str | os.PathLike | None = None,
        cluster_names: Sequence[str] | None = None,
        metrics: str | None = None,
        threshold_dataset: str | None = None,
        cluster_factor: str | None = None,
        gather_processes: bool = False,
    ) -> None:
        if metrics is None:
            metrics = _TASK_METRICS.get(getattr(evaluator, "task", None), "classification")
        if metrics not in _METRICS:
            raise ValueError(f"metrics must be one of {', '.join(map(repr, _METRICS))}, got {metrics!r}.")
        if threshold_dataset is not None and (metrics != "binary" or threshold_dataset not in datasets):
            raise ValueError(
                f"threshold_dataset {threshold_dataset!r} needs metrics='binary' and must be one of the datasets "
                f"{sorted(datasets)}."
            )
        self.evaluator, self.output_file, self.metrics = evaluator, output_file, metrics
        default = ["observed", "fixed", "randomized"] + (["inferred"] if evaluator.z_predictor is not None else [])
        self.modes = dataset_modes(modes, list(datasets), default, type(self).__name__)
        self.threshold_dataset = threshold_dataset
        if threshold_dataset is not None:  # evaluated first, in every mode that needs its threshold
            needed = dict.fromkeys(m for modes_ in self.modes.values() for m in modes_)
            self.modes[threshold_dataset] = list(dict.fromkeys([*self.modes[threshold_dataset], *needed]))
            datasets = {threshold_dataset: datasets[threshold_dataset], **datasets}
        self.datasets = dict(datasets)
        self.cluster_names = cluster_names
        if cluster_factor is None:
            cluster_factor = getattr(evaluator, "inferred_factor", None)
        if cluster_factor is None and isinstance(evaluator.n_clusters, Mapping):
            cluster_factor = next(iter(evaluator.n_clusters))
        self.cluster_factor = cluster_factor
        #: classes of the segmentation logits (their channels), so that a class absent from a dataset still counts
        self.num_classes: int | None = None
        self.collector = PredictionCollector(
            cluster_factor=cluster_factor,
            pred_transform=self._class_map if metrics == "segmentation" else None,
            gather_processes=gather_processes,
            owner=type(self).__name__,
        )
        self.collector.attach(evaluator)

    def _class_map(self, pred: Any) -> Any:
        """A batch of segmentation logits as a class map, remembering how many classes the logits have."""
        if pred.shape[1] > 1:
            self.num_classes = int(pred.shape[1])
        return label_map(pred)

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> dict:
        return self.run()

    def run(self) -> dict:
        empty = [name for name, loader in self.datasets.items() if len(loader) == 0]
        if empty:  # ignite would skip the run and leave the previous dataset's predictions to be reported
            raise ValueError(f"{type(self).__name__}: the datasets {empty} have no batches; leave them out of datasets.")
        evaluator, previous_mode = self.evaluator, self.evaluator.cluster_mode
        previous = (evaluator.data_loader, evaluator.state.epoch_length)
        results: dict[str, dict] = {}
        try:
            for name, loader in self.datasets.items():
                evaluator.data_loader, evaluator.state.epoch_length = loader, len(loader)
                results[name] = {}
                for mode in self.modes[name]:
                    evaluator.cluster_mode = mode
                    evaluator.run()
                    threshold = None
                    if self.threshold_dataset is not None and name != self.threshold_dataset:
                        fitted = results[self.threshold_dataset][mode]["threshold"]
                        threshold = _shared_threshold(fitted, self.threshold_dataset, name, "ClusterModeReport")
                    results[name][mode] = self._summary(threshold)
        finally:
            evaluator.data_loader, evaluator.state.epoch_length = previous
            evaluator.cluster_mode = previous_mode
        results = nan_to_none(results)
        if self.output_file is not None and idist.get_rank() == 0:
            write_json(results, self.output_file)
        for metric in _LOGGED[self.metrics]:
            table = format_report_table({"model": results}, metric)
            evaluator.logger.info(f"cluster-mode report ({metric}):\n" + table)
        return results

    def _summary(self, threshold: float | None) -> dict:
        c, n_clusters = self.collector, self.evaluator.n_clusters
        if isinstance(n_clusters, Mapping):
            n_clusters = n_clusters[self.cluster_factor]
        if self.metrics == "classification":
            return classification_summary(c.pred, c.label, c.cluster, n_clusters, self.cluster_names)
        if self.metrics == "regression":
            return regression_summary(c.pred, c.label, c.cluster, n_clusters, self.cluster_names)
        if self.metrics == "segmentation":
            return segmentation_summary(c.pred, c.label, c.cluster, n_clusters, self.cluster_names, self.num_classes)
        label, prob = c.label.reshape(-1).cpu().numpy(), positive_probability(c.pred).cpu().numpy()
        if prob.ndim != 1:
            raise ValueError(
                f"metrics='binary' needs one logit per sample, got predictions of shape {tuple(c.pred.shape)}."
            )
        summary = binary_metrics(label, prob, threshold=threshold)  # None: the Youden point of these predictions
        if c.cluster is not None:
            summary["per_cluster"] = per_cluster_binary_metrics(
                label, prob, c.cluster.cpu().numpy(),
                summary["threshold"] if math.isfinite(summary["threshold"]) else None, self.cluster_names,
            )  # fmt: skip (a single-class dataset has a nan threshold: its clusters' metrics are then null)
        return summary


def format_report_table(
    reports: Mapping[str, Mapping], metric: str = "accuracy", columns: Mapping[str, str] | None = None
) -> str:
    """A text table with one row per model and one column per ``dataset/mode`` of :class:`ClusterModeReport` results.

    Args:
        reports: model name -> report (``metrics.json`` content).
        metric: the metric shown.
        columns: ``dataset/mode`` -> column title, in the order shown (default: every ``dataset/mode``, sorted).

    Example::

        print(format_report_table({"conventional": conv_metrics, "armed": armed_metrics}))
        print(format_report_table(reports, "auroc", {"seen/observed": "seen sites", "unseen/fixed": "unseen"}))
    """
    if columns is None:
        columns = {c: c for c in sorted({f"{d}/{m}" for r in reports.values() for d, modes in r.items() for m in modes})}
    width = max([len(c) for c in columns.values()] + [8])
    name_width = max([len(n) for n in reports] + [5])
    lines = [f"{'model':<{name_width}}  " + "  ".join(f"{c:>{width}}" for c in columns.values())]
    for name, report in reports.items():
        cells = []
        for column in columns:
            dataset, mode = column.split("/")
            value = report.get(dataset, {}).get(mode, {}).get(metric)
            cells.append(f"{value:>{width}.3f}" if value is not None else f"{'-':>{width}}")
        lines.append(f"{name:<{name_width}}  " + "  ".join(cells))
    return "\n".join(lines)
