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
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow, ckpt_export
from monai.data import load_net_with_metadata
from monai.utils import path_to_sqlite_uri

__all__ = [
    "bundle_workflow",
    "check_tracking",
    "error_messages",
    "export_network",
    "mlflow_run",
    "mlflow_runs",
    "run_log_dirs",
    "tensorboard_scalars",
    "torchrun_bundle",
]


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


def error_messages(error: BaseException) -> str:
    """The messages of an exception and of everything it was raised from (a bundle workflow wraps the real error).

    Example::

        with pytest.raises(RuntimeError) as error:
            workflow.run()
        assert "expected" in error_messages(error.value)
    """
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


class Interrupted(RuntimeError):
    """Raised by :func:`interrupt_before_epoch` to stop a run as a crash would."""


def interrupt_before_epoch(workflow: ConfigWorkflow, epoch: int | None, trainer_id: str = "train#trainer") -> None:
    """Make the workflow's trainer raise :class:`Interrupted` when ``epoch`` starts (the checkpoints of the epochs
    before it are written, as when a run is killed between two epochs); ``None`` only instantiates the trainer.

    The trainer (with its network and data loaders) is instantiated here, before ``run``. A MONAI ``DataLoader``
    reseeds torch's global generator when it is built, so the order in which a config's objects are built decides the
    initial weights: call this with ``None`` on the uninterrupted run that the resumed one is compared with.

    Example::

        interrupt_before_epoch(workflow, 3)
        with pytest.raises(RuntimeError) as crash:     # the bundle's run expression wraps it
            workflow.run()
        assert isinstance(crash.value.__cause__, Interrupted)
    """
    from ignite.engine import Events

    def stop(engine):
        raise Interrupted(f"interrupted before epoch {epoch}")

    trainer = workflow.parser.get_parsed_content(trainer_id)
    if epoch is not None:
        trainer.add_event_handler(Events.EPOCH_STARTED(once=epoch), stop)


def assert_same_training(first: Path, second: Path, checkpoints: list[str], outputs: list[str]) -> None:
    """Two bundle runs in ``first`` and ``second`` wrote bit-identical checkpoint tensors and identical JSON outputs.

    Example::

        assert_same_training(tmp_path / "full", tmp_path / "resumed", ["model.pt"], ["metrics.json"])
    """
    import json

    import torch

    for name in checkpoints:
        a = torch.load(first / "models" / name, weights_only=True)
        b = torch.load(second / "models" / name, weights_only=True)
        flat_a, flat_b = _flatten(a), _flatten(b)
        assert flat_a.keys() == flat_b.keys(), name
        different = [k for k in flat_a if not torch.equal(flat_a[k], flat_b[k])]
        assert not different, f"{name}: {len(different)} of {len(flat_a)} tensors differ, e.g. {different[:3]}"
    for name in outputs:
        a, b = (json.loads((root / "eval" / name).read_text()) for root in (first, second))
        assert a == b, name


def _flatten(state, prefix: str = "") -> dict:
    import torch

    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {}


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in ``log_dir``: ``{tag: [(step, value), ...]}``.

    Example::

        tensorboard_scalars(root / "eval" / "tensorboard")["loss"]
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def export_network(configs: Path, models: Path, tmp: Path, **kwargs):
    """Runs ``ckpt_export network_def`` from ``inference.json`` alone, as the READMEs do, on a copy of ``models`` in a
    new bundle root; returns the loaded TorchScript network and that root, which must still hold nothing else.

    Example::

        exported, export_root = export_network(CONFIGS, root / "models", tmp_path, use_trace=True)
    """
    export_root = tmp / "exported"
    shutil.copytree(models, export_root / "models")
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp / "model.ts"),
        ckpt_file=str(export_root / "models" / "model.pt"),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        bundle_root=str(export_root),
        **kwargs,
    )
    exported, _, _ = load_net_with_metadata(str(tmp / "model.ts"))
    assert sorted(p.name for p in export_root.iterdir()) == ["models"], "export writes nothing into the bundle root"
    return exported, export_root


def run_log_dirs(root: Path) -> list[Path]:
    """The TensorBoard folders of the training runs in a bundle root (``eval/tensorboard/run_*``), oldest first.

    Example::

        (only,) = run_log_dirs(root)
    """
    return sorted(p for p in (root / "eval" / "tensorboard").glob("run_*") if p.is_dir())


def mlflow_runs(tracking_uri: str):
    """The client and every run of the MLflow store at ``tracking_uri``.

    Example::

        client, runs = mlflow_runs(monai.utils.path_to_sqlite_uri(root / "eval" / "mlruns.db"))
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def mlflow_run(tracking_uri: str):
    """The client and the one run of the MLflow store at ``tracking_uri`` (a bundle run with ``--tracking mlflow``).

    Example::

        client, run = mlflow_run(monai.utils.path_to_sqlite_uri(root / "eval" / "mlruns.db"))
        run.data.metrics["epoch_loss"]
    """
    client, runs = mlflow_runs(tracking_uri)
    assert len(runs) == 1, f"expected one MLflow run in {tracking_uri}, found {len(runs)}"
    return client, runs[0]


def check_tracking(
    root: Path,
    parts: Collection[str],
    epochs: int,
    validation: str | None,
    report_key: str,
    validation_extra: Collection[str] = (),
) -> None:
    """Asserts what a bundle's training run in ``root`` with ``--tracking mlflow`` recorded.

    MLflow (the default store, ``eval/mlruns.db``): the run's settings (``RunParams``), the loss every iteration, each
    loss part's and the learning rate's value every epoch, the validation metric, the report (``report/<report_key>``
    equal to ``eval/metrics.json``) and the report file. TensorBoard (``eval/tensorboard``): the parts every iteration
    and every epoch, the learning rate, the random-effect spread, the validation metric and the report. The validation
    metric and ``validation_extra`` (further metrics the validation handlers compute) have the same value at every
    epoch in both.

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
    settings = {"variant", "epochs", "batch_size", "learning_rate", "seed", "gen_weight", "kl_weight"}
    assert settings <= set(run.data.params) and run.data.params["epochs"] == str(epochs), "RunParams in MLflow"

    def steps(key: str) -> list[int]:
        """The steps logged under ``key``, in step order (MLflow returns them in timestamp order)."""
        return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))

    iterations = steps("train_loss")
    assert len(iterations) >= epochs and len(set(iterations)) == len(iterations)
    for key in [*(f"epoch_{p}" for p in parts), "lr"]:
        assert steps(key) == list(range(1, epochs + 1)), key
    assert "lr_group_0" in logged
    if validation is not None:
        assert validation in logged
    assert run.data.metrics[f"report/{report_key}"] == pytest.approx(expected)
    assert "metrics.json" in [a.path for a in client.list_artifacts(run.info.run_id)]
    (log_dir,) = run_log_dirs(root)
    assert log_dir.name == run.info.run_name, "TensorBoard's folder is named after the MLflow run"
    scalars = tensorboard_scalars(log_dir)
    for key in parts:
        assert len(scalars[key]) == len(iterations) and len(scalars[f"epoch_{key}"]) == epochs, key
    assert len(scalars["lr"]) == epochs and any(tag.startswith("random_effects/") for tag in scalars)
    for key in [validation, *validation_extra] if validation is not None else validation_extra:
        history = [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, key)]
        assert scalars[key] == history, key
    assert scalars[f"report/{report_key}"] == [(epochs, pytest.approx(expected))]


def torchrun_bundle(configs: Path, tmp: Path, world_size: int = 2, **override) -> tuple[Path, Path, str, float]:
    """Runs ``train.json`` + ``multi_gpu_train.json`` with torchrun (gloo processes on the CPU) in ``tmp / "ddp"``.

    Each rank dumps its trained parameters to ``tmp / "probe" / "rank<r>.pt"``; a rank other than 0 writing a bundle
    file would write it under ``models_rank<r>`` / ``eval_rank<r>``. Returns the bundle root, the probe folder, the
    processes' output and the wall seconds; a failed run fails the test with the end of the output.

    Example::

        root, probe, output, seconds = torchrun_bundle(CONFIGS, tmp_path, epochs=1, dataset_dir=str(tmp_path / "data"))
    """
    root, probe = tmp / "ddp", tmp / "probe"
    probe.mkdir()
    multi_gpu = json.loads((configs / "multi_gpu_train.json").read_text())
    rank_suffix = "('' if dist.get_rank() == 0 else '_rank' + str(dist.get_rank()))"
    dump = (
        "$torch.save({n: p.detach().cpu() for n, p in @network.state_dict().items()}, "
        f"{str(probe)!r} + '/rank' + str(dist.get_rank()) + '.pt')"
    )
    dump_metrics = (
        f"$torch.save(dict(@validate#evaluator.state.metrics), {str(probe)!r} + '/metrics_rank' + "
        "str(dist.get_rank()) + '.pt')"
    )
    args = {
        "config_file": [str(configs / "train.json"), str(configs / "multi_gpu_train.json")],
        "bundle_root": str(root),
        "ckpt_dir": f"$@bundle_root + '/models' + {rank_suffix}",
        "output_dir": f"$@bundle_root + '/eval' + {rank_suffix}",
        "finalize": [dump, dump_metrics, *multi_gpu["finalize"]],
        **override,
    }
    args_file = tmp / "args.json"
    args_file.write_text(json.dumps(args))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}"]
    command += ["-m", "monai.bundle", "run", "--args_file", str(args_file)]
    start = time.perf_counter()
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        command, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return root, probe, output, time.perf_counter() - start
