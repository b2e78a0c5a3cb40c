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
"""Logs a finished run's report (the metrics JSON of the cluster-mode or autoencoder report) to TensorBoard and MLflow."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ReportLogger", "flatten_report"]

logger = logging.getLogger(__name__)

#: characters MLflow accepts in a metric name (others become "_")
_NOT_IN_METRIC_NAME = re.compile(r"[^\w.\- :/]")
#: MLflow's limit of metrics per ``log_batch`` call
_MLFLOW_BATCH = 1000


def flatten_report(report: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested report as ``{"a/b/c": value}`` (lists indexed, ``None`` and text left out).

    Example::

        flatten_report({"seen": {"observed": {"accuracy": 0.9, "per_cluster": {"site0": {"n": 12}}}}}, "report")
        # {"report/seen/observed/accuracy": 0.9, "report/seen/observed/per_cluster/site0/n": 12.0}
    """
    if isinstance(report, Mapping):
        items: Sequence[tuple[Any, Any]] = list(report.items())
    elif isinstance(report, (list, tuple)):
        items = list(enumerate(report))
    elif isinstance(report, (int, float)) and not isinstance(report, bool):
        return {prefix: float(report)}
    else:
        return {}
    flat: dict[str, float] = {}
    for key, value in items:
        name = _NOT_IN_METRIC_NAME.sub("_", str(key))
        flat.update(flatten_report(value, f"{prefix}/{name}" if prefix else name))
    return flat


class ReportLogger:
    """Logs a report (the metrics JSON that :class:`ClusterModeReport` or :class:`AutoencoderReport` writes) to
    TensorBoard and MLflow: every number as a scalar ``{prefix}/{dataset}/{mode}/{metric}`` at ``step``, and in MLflow
    the JSON file as an artifact of the run.

    The MLflow run is the one of the first given ``MLFlowHandler`` that has started: its current run or, once it has
    closed it (``--tracking mlflow`` closes the trainer's at the end of training, before the report runs), the latest
    run of its experiment (with its ``run_name`` when set), i.e. the training run itself.

    Args:
        summary_writer: a TensorBoard ``SummaryWriter`` (anything with ``add_scalar``; flushed when it can), or ``None``.
        mlflow_handlers: MONAI ``MLFlowHandler`` objects, e.g. those ``--tracking mlflow`` adds to ``train#handlers``;
            empty for no MLflow.
        prefix: first part of every scalar name.
        step: step of the scalars (e.g. the number of training epochs).

    Example::

        run: ["$@train#trainer.run()", "$@report.run()", "$@report_logger(@report.output_file)"]
        "report_logger": {"_target_": "monai_armed.handlers.ReportLogger", "summary_writer": "@tensorboard_writer",
                          "mlflow_handlers": "$[h for h in @train#handlers if isinstance(h, monai.handlers.MLFlowHandler)]"}
    """

    def __init__(
        self,
        summary_writer: Any = None,
        mlflow_handlers: Sequence[Any] = (),
        prefix: str = "report",
        step: int = 0,
    ) -> None:
        self.summary_writer, self.mlflow_handlers = summary_writer, [h for h in mlflow_handlers if h is not None]
        self.prefix, self.step = prefix, int(step)

    def __call__(self, report: Mapping | str | os.PathLike) -> dict[str, float]:
        """Logs ``report`` (a dict, or the path of its JSON file) and returns the scalars it logged.

        Raises:
            FileNotFoundError: no file at ``report``.
            ValueError: the file is not a JSON object.
        """
        artifact = None
        if not isinstance(report, Mapping):
            artifact, report = os.fspath(report), _read_report(report)
        scalars = flatten_report(report, self.prefix)
        if self.summary_writer is not None:
            for name, value in scalars.items():
                self.summary_writer.add_scalar(name, value, self.step)
            if callable(getattr(self.summary_writer, "flush", None)):
                self.summary_writer.flush()
        if self.mlflow_handlers:
            self._log_mlflow(scalars, artifact)
        return scalars

    def _log_mlflow(self, scalars: Mapping[str, float], artifact: str | None) -> None:
        from mlflow.entities import Metric  # an MLFlowHandler exists, so mlflow is installed

        handler = next((h for h in self.mlflow_handlers if h.experiment is not None), None)
        if handler is None:
            logger.warning("ReportLogger: no MLFlowHandler has started a run, so the report is not logged to MLflow.")
            return
        run_id = handler.cur_run.info.run_id if handler.cur_run is not None else _latest_run_id(handler)
        timestamp = int(time.time() * 1000)
        metrics = [Metric(name, value, timestamp, self.step) for name, value in scalars.items()]
        for start in range(0, len(metrics), _MLFLOW_BATCH):
            handler.client.log_batch(run_id=run_id, metrics=metrics[start : start + _MLFLOW_BATCH])
        if artifact is not None:
            handler.client.log_artifact(run_id, artifact)


def _read_report(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ReportLogger: no report file {os.fspath(path)!r}; run the report first.")
    with open(path, encoding="utf-8") as f:
        try:
            report = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"ReportLogger: {os.fspath(path)!r} is not valid JSON ({error}).") from error
    if not isinstance(report, dict):
        raise ValueError(f"ReportLogger: {os.fspath(path)!r} holds a {type(report).__name__}, expected a JSON object.")
    return report


def _latest_run_id(handler: Any) -> str:
    """The most recently started run of the handler's experiment (named ``handler.run_name`` when it has one)."""
    name = handler.run_name
    runs = handler.client.search_runs(
        [handler.experiment.experiment_id],
        filter_string=f"attributes.run_name = '{name}'" if name else "",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise ValueError(f"ReportLogger: the MLflow experiment {handler.experiment_name!r} has no run to log the report to.")
    return runs[0].info.run_id
