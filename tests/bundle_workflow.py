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
"""Shared by the bundle tests: an initialised ``ConfigWorkflow`` of a bundle's config files."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow
from monai.utils import path_to_sqlite_uri

__all__ = ["bundle_workflow", "check_tracking", "mlflow_run", "tensorboard_scalars"]


def bundle_workflow(
    configs: Path, config_files: list[str], root: Path, workflow_type: str = "train", **override
) -> ConfigWorkflow:
    """``configs/<config_files>`` with ``configs/metadata.json``, no logging config, run in ``root``; initialised.

    Example::

        workflow = bundle_workflow(CONFIGS, ["train.json", "evaluate.json"], tmp_path, epochs=1)
        workflow.run()
    """
    workflow = ConfigWorkflow(
        config_file=[str(configs / f) for f in config_files],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(root),
        **override,
    )
    workflow.initialize()
    return workflow


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``: ``{tag: [(step, value), ...]}``.

    Example::

        tensorboard_scalars(root / "eval" / "tensorboard")["loss"]
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(tracking_uri: str):
    """The client and the one run of the MLflow store at ``tracking_uri`` (a bundle run with ``--tracking mlflow``).

    Example::

        client, run = mlflow_run(monai.utils.path_to_sqlite_uri(root / "eval" / "mlruns.db"))
        run.data.metrics["epoch_loss"]
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"expected one MLflow run in {tracking_uri}, found {len(runs)}"
    return client, runs[0]


def check_tracking(root: Path, parts: Collection[str], epochs: int, validation: str | None, report_key: str) -> None:
    """Asserts what a bundle's training run in ``root`` with ``--tracking mlflow`` recorded.

    MLflow (the default store, ``eval/mlruns.db``): the loss every iteration, each loss part's and the learning rate's
    value every epoch, the validation metric, the report (``report/<report_key>`` equal to ``eval/metrics.json``) and
    the report file. TensorBoard (``eval/tensorboard``): the parts every iteration and every epoch, the learning rate,
    the random-effect spread, the validation metric and the report.

    Example::

        check_tracking(root, {"loss", "loss_me"}, epochs=2, validation="val_auroc", report_key="seen/fixed/auroc")
    """
    report = json.loads((root / "eval" / "metrics.json").read_text())
    expected = report
    for key in report_key.split("/"):
        expected = expected[key]
    client, run = mlflow_run(path_to_sqlite_uri(str(root / "eval" / "mlruns.db")))
    assert run.info.status == "FINISHED"
    logged = set(run.data.metrics)

    def steps(key: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run.info.run_id, key)]

    iterations = steps("train_loss")
    assert len(iterations) >= epochs and iterations == sorted(iterations)
    for key in [*(f"epoch_{p}" for p in parts), "lr"]:
        assert steps(key) == list(range(1, epochs + 1)), key
    assert "lr_group_0" in logged
    if validation is not None:
        assert validation in logged
    assert run.data.metrics[f"report/{report_key}"] == pytest.approx(expected)
    assert "metrics.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    scalars = tensorboard_scalars(root / "eval" / "tensorboard")
    for key in parts:
        assert len(scalars[key]) == len(iterations) and len(scalars[f"epoch_{key}"]) == epochs, key
    assert len(scalars["lr"]) == epochs and any(tag.startswith("random_effects/") for tag in scalars)
    if validation is not None:
        assert [step for step, _ in scalars[validation]] == steps(validation)
    assert scalars[f"report/{report_key}"] == [(epochs, pytest.approx(expected))]
