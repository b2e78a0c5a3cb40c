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

from pathlib import Path

from monai.bundle import ConfigWorkflow

__all__ = ["bundle_workflow", "mlflow_run", "tensorboard_scalars"]


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
