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
"""Experiment tracking: MONAI's StatsHandler, TensorBoardStatsHandler and MLFlowHandler on ARMED engines (decollated or
not), the epoch means ARMED trainers publish, ReportLogger, and a bundle without mlflow installed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy
from monai.handlers import CheckpointLoader, MLFlowHandler, StatsHandler, TensorBoardStatsHandler, from_engine
from monai.utils import optional_import, path_to_sqlite_uri

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import (
    ARMEDAutoencoderTrainer,
    ARMEDEvaluator,
    ARMEDTrainer,
    IterationOutput,
    PrepareBatchCluster,
    iteration_scalars,
)
from monai_armed.handlers import (
    AtomicCheckpointSaver,
    RandomEffectsSummary,
    ReportLogger,
    RunParams,
    checkpoint_load_dict,
    flatten_report,
    output_field,
)
from monai_armed.metrics import predicted_class
from monai_armed.networks import MixedEffectsMLP
from tests.bundle_workflow import (
    Interrupted,
    bundle_workflow,
    interrupt_before_epoch,
    mlflow_runs,
    run_log_dirs,
    tensorboard_scalars,
)
from tests.test_autoencoder_trainer import _images
from tests.test_autoencoder_trainer import _models as _aec_models
from tests.test_bundle_spirals import CONFIGS as SPIRALS
from tests.test_bundle_spirals import _clustered_csv
from tests.test_engines import _loader, _models

pytestmark = pytest.mark.usefixtures("single_thread")

ARMED_PARTS = {"loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl", "adv_accuracy"}
AEC_PARTS = ARMED_PARTS | {
    "loss_recon_fe",
    "loss_recon_re",
    "loss_re",
    "loss_latent_cluster",
    "loss_image_cluster",
    "loss_image_classifier",
}
EPOCHS, ITERATIONS = 2, 2


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One SQLite MLflow store for the module (creating one takes seconds); each test uses its own experiment."""
    return path_to_sqlite_uri(str(tmp_path_factory.mktemp("mlflow") / "mlruns.db"))


def _mlflow(tracking_uri: str, name: str, **kwargs) -> MLFlowHandler:
    return MLFlowHandler(tracking_uri=tracking_uri, experiment_name=name, close_on_complete=True, **kwargs)


def _history(handler: MLFlowHandler, key: str) -> list[tuple[int, float]]:
    run = handler.client.search_runs([handler.experiment.experiment_id])[0]
    return [(m.step, m.value) for m in handler.client.get_metric_history(run.info.run_id, key)]


def _logged_metrics(handler: MLFlowHandler) -> set[str]:
    return set(handler.client.search_runs([handler.experiment.experiment_id])[0].data.metrics)


def _armed_trainer(decollate: bool, handlers: list, **kwargs) -> ARMEDTrainer:
    net, adv = _models()
    return ARMEDTrainer(
        device="cpu",
        max_epochs=EPOCHS,
        train_data_loader=_loader(64),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
        adversary=adv,
        prepare_batch=PrepareBatchCluster("features"),
        decollate=decollate,
        train_handlers=handlers,
        **kwargs,
    )


def _aec_trainer(decollate: bool, handlers: list, **kwargs) -> ARMEDAutoencoderTrainer:
    net, adv, judge = _aec_models("armed")
    return ARMEDAutoencoderTrainer(
        device="cpu",
        max_epochs=EPOCHS,
        train_data_loader=TensorBatchLoader(_images(16), batch_size=8),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        adversary=adv,
        image_classifier=judge,
        decollate=decollate,
        train_handlers=handlers,
        **kwargs,
    )


TRAINERS = {"armed": (_armed_trainer, ARMED_PARTS), "autoencoder": (_aec_trainer, AEC_PARTS)}


def _record_scalars(trainer) -> list[list[dict[str, float]]]:
    """The trainer's scalars of every iteration, per epoch (read from the trainer, not from any handler)."""
    epochs: list[list[dict[str, float]]] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append([]))
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: epochs[-1].append({k: float(v) for k, v in e.output_scalars.items()})
    )
    return epochs


# --- the output of a trainer that does not decollate -------------------------------------------------------------


def test_iteration_output_reads_as_entries_and_as_first_item():
    pred, loss = torch.zeros(4, 1), torch.tensor(0.7)
    output = IterationOutput({"pred": pred, "label": torch.ones(4), "loss": loss, "n": 3})
    assert output["pred"] is pred and output.get("missing") is None and "label" in output and "x" not in output
    assert list(output.keys()) == ["pred", "label", "loss", "n"] and dict(output)["loss"] is loss
    assert isinstance(output, list) and len(output) == 1 and output[0] == {"loss": loss, "n": 3}
    assert from_engine(["loss"], first=True)(output) is loss  # what --tracking mlflow gives MLFlowHandler
    assert from_engine(["loss", "n"], first=True)(output) == (loss, 3)
    output["loss_kl"] = torch.tensor(2.0)
    output["n"] = torch.arange(4)  # a batch entry now: no longer a scalar
    assert set(output[0]) == {"loss", "loss_kl"}
    del output["loss"]
    assert set(output[0]) == {"loss_kl"} and "loss" not in output
    with pytest.raises(TypeError, match="set by key"):
        output[0] = {}
    assert repr(output).startswith("IterationOutput({'pred': tensor(")


def test_prediction_collector_reads_the_batch_of_an_iteration_output():
    pred = torch.arange(6.0).reshape(3, 2)
    output = IterationOutput({"pred": pred, "loss": torch.tensor(1.0)})
    assert output_field(output, "pred") is pred and output_field(output, "label") is None


def test_batch_entries_asked_of_the_first_item_name_where_they_are():
    output = IterationOutput({"pred": torch.zeros(4, 1), "label": torch.ones(4), "loss": torch.tensor(0.7)})
    with pytest.raises(KeyError, match=r"'pred': the first item .* only the iteration's scalars \['loss'\]; read batch"):
        from_engine(["pred", "label"])(output)


def test_iteration_scalars_of_every_output_form():
    loss = torch.tensor(0.5)
    batch = {"pred": torch.zeros(2, 1), "loss": loss, "n": 2, "flag": True, "name": "a"}
    assert iteration_scalars(IterationOutput(batch)) == {"loss": loss, "n": 2}
    assert iteration_scalars(batch) == {"loss": loss, "n": 2}
    assert iteration_scalars([{"pred": torch.zeros(1), "loss": 0.5}, {"pred": torch.ones(1), "loss": 0.5}]) == {
        "loss": 0.5
    }
    assert iteration_scalars(torch.tensor(1.0)) == {} and iteration_scalars([]) == {}


# --- MONAI's standard handlers on ARMED trainers ------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ignoring non-scalar output")  # MONAI's decollated items hold the samples too
@pytest.mark.parametrize("decollate", [False, True])
@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_standard_handlers_record_every_loss_part(kind, decollate, tmp_path, tracking_uri):
    """StatsHandler and TensorBoardStatsHandler with their defaults, MLFlowHandler as ``--tracking mlflow`` sets it up."""
    make, parts = TRAINERS[kind]
    stats = StatsHandler(name="tracking_test")
    board = TensorBoardStatsHandler(log_dir=str(tmp_path))
    mlflow = _mlflow(
        tracking_uri, f"{kind}_{decollate}", tag_name="train_loss", output_transform=from_engine(["loss"], first=True)
    )
    trainer = make(decollate, [stats, board, mlflow])
    recorded = _record_scalars(trainer)
    lines: list[str] = []
    stats.logger.addHandler(capture := logging.Handler())  # StatsHandler's logger does not propagate to pytest's
    capture.emit = lambda record: lines.append(record.getMessage())
    try:
        trainer.run()
    finally:
        stats.logger.removeHandler(capture)

    losses = [it["loss"] for epoch in recorded for it in epoch]
    means = {f"epoch_{k}": [np.mean([it[k] for it in epoch]) for epoch in recorded] for k in parts}
    assert len(losses) == EPOCHS * ITERATIONS and set(recorded[0][0]) == parts
    # StatsHandler: every part at every iteration, the epoch means and the learning rate at every epoch end
    iteration_lines = [line for line in lines if "Iter:" in line]
    assert len(iteration_lines) == EPOCHS * ITERATIONS
    for line, loss in zip(iteration_lines, losses):
        assert f"loss: {loss:.4f}" in line and all(f" {k}: " in line for k in parts), line
    epoch_lines = [line for line in lines if "Metrics --" in line]
    assert len(epoch_lines) == EPOCHS and all(f"{k}: " in epoch_lines[-1] for k in [*means, "lr"])
    # TensorBoard: the same, read back from the event file
    board.close()
    scalars = tensorboard_scalars(tmp_path)
    assert parts | set(means) | {"lr"} <= set(scalars)
    np.testing.assert_allclose([v for _, v in scalars["loss"]], losses, rtol=1e-5)
    assert [s for s, _ in scalars["loss"]] == list(range(1, EPOCHS * ITERATIONS + 1))
    for key, values in means.items():
        np.testing.assert_allclose([v for _, v in scalars[key]], values, rtol=1e-5, err_msg=key)
    assert scalars["lr"] == [(1, pytest.approx(0.01 if kind == "armed" else 1e-3)), (2, pytest.approx(scalars["lr"][0][1]))]
    # MLflow: the loss every iteration, the parts' epoch means and the learning rate
    np.testing.assert_allclose([v for _, v in _history(mlflow, "train_loss")], losses, rtol=1e-5)
    assert set(means) | {"lr", "lr_group_0"} <= _logged_metrics(mlflow)
    np.testing.assert_allclose([v for _, v in _history(mlflow, "epoch_loss_me")], means["epoch_loss_me"], rtol=1e-5)


def test_mlflow_handler_default_logs_every_part_without_decollation(tracking_uri):
    mlflow = _mlflow(tracking_uri, "default_transform")
    trainer = _armed_trainer(False, [mlflow])
    recorded = _record_scalars(trainer)
    trainer.run()
    assert ARMED_PARTS | {f"epoch_{k}" for k in ARMED_PARTS} | {"lr", "lr_group_0"} == _logged_metrics(mlflow)
    np.testing.assert_allclose(
        [v for _, v in _history(mlflow, "loss_gen")], [it["loss_gen"] for epoch in recorded for it in epoch], rtol=1e-5
    )


class _TextWriter:
    def __init__(self):
        self.texts = []

    def add_text(self, tag, text, step):
        self.texts.append((tag, text, step))


def test_run_params_are_recorded_once_per_run_and_a_changed_one_is_named(tracking_uri, caplog):
    """A resumed run (the same MLflow run name) keeps its first values: MLflow refuses to change a parameter."""
    writer, runs = _TextWriter(), []
    for lr in (0.01, 0.02):
        # an interrupted run is not finished, so the second run (the resume) continues it
        mlflow = MLFlowHandler(tracking_uri=tracking_uri, experiment_name="run_params", run_name="run_a", close_on_complete=False)
        trainer = _armed_trainer(False, [mlflow])
        RunParams({"learning_rate": lr, "variant": "armed", "columns": ["f0", "f1"]}, writer, [mlflow, None]).attach(trainer)
        with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.run_params"):
            trainer.run()
        run = mlflow.client.search_runs([mlflow.experiment.experiment_id])[0]
        runs.append(run.info.run_id)
        assert run.data.params["learning_rate"] == "0.01" and run.data.params["columns"] == '["f0", "f1"]'
        assert run.data.params["variant"] == "armed" and run.data.params["max_epochs"] == str(EPOCHS)
    assert runs[0] == runs[1], "the second run continued the first"
    assert "keeps the settings it recorded first; now learning_rate: 0.01 -> 0.02" in caplog.text
    assert [tag for tag, _, _ in writer.texts] == ["run_params", "run_params"]
    assert "| learning_rate | 0.02 |" in writer.texts[1][1]
    with pytest.raises(ValueError, match=r"the values of \['formula'\] are longer than MLflow's 6000"):
        RunParams({"formula": "x" * 6001})


def test_run_params_travel_in_the_checkpoint_and_refuse_a_resume_with_other_settings(tmp_path, caplog):
    """The settings are RunParams' state in the resume checkpoint: a resumed run's loader compares them before the
    first step; resumable ones are named in a warning; values compare as JSON (1 is 1.0, a dict's order is free).
    A checkpoint written before they were saved loads without them, with a warning (checkpoint_load_dict)."""
    path = tmp_path / "resume_checkpoint_epoch=1.pt"
    params = {"learning_rate": 0.01, "epochs": 4, "kl_weight": 1.0, "norm": {"a": 1, "b": 2}}
    trainer = Engine(lambda engine, batch: None)
    AtomicCheckpointSaver(str(tmp_path), {"trainer": trainer, "run_params": RunParams(params)}, save_interval=1,
                          epoch_level=True, file_prefix="resume").attach(trainer)  # fmt: skip
    trainer.run([0], max_epochs=1)

    def resume(checkpoint, **changes) -> None:
        resumed = Engine(lambda engine, batch: None)
        load = checkpoint_load_dict({"trainer": resumed, "run_params": RunParams({**params, **changes})}, checkpoint,
                                    ["run_params"])  # fmt: skip
        CheckpointLoader(str(checkpoint), load).attach(resumed)
        resumed.run([0], max_epochs=int(changes.get("epochs", 4)))

    with pytest.raises(ValueError, match=r"other settings \(learning_rate: 0.01 in training, 0.02 now\): the run"):
        resume(path, learning_rate=0.02)
    with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.run_params"):
        resume(path, epochs=6, kl_weight=1, norm={"b": 2, "a": 1})  # epochs resumable; 1 is 1.0; any dict order
    assert "resuming with epochs: 4 -> 6" in caplog.text and "kl_weight" not in caplog.text
    older = tmp_path / "older.pt"  # a checkpoint of 0.8.0: no settings in it
    torch.save({k: v for k, v in torch.load(path, weights_only=True).items() if k != "run_params"}, older)
    with caplog.at_level(logging.WARNING):
        resume(older, learning_rate=0.02)
    assert "holds no ['run_params'] (a checkpoint of an earlier monai-armed): not restored or checked" in caplog.text
    # the run resumed from it records its settings as unverified, so that a later resume is not judged by them
    resumed, changed = Engine(lambda engine, batch: None), RunParams({**params, "learning_rate": 0.05})
    CheckpointLoader(str(older), checkpoint_load_dict({"trainer": resumed, "run_params": changed}, older, ["run_params"])
                     ).attach(resumed)  # fmt: skip
    changed.attach(resumed)
    resumed.run([0], max_epochs=2)
    assert changed.state_dict() == {"params": {**RunParams({**params, "learning_rate": 0.05}).params}, "verified": False}
    with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.run_params"):
        RunParams(params).load_state_dict(changed.state_dict())  # the original learning rate: not refused
    assert "held none: they are not checked" in caplog.text
    # a value that is not equal to itself as a number, and numpy numbers in a list, compare as written
    RunParams({"x": float("nan"), "y": [np.int64(3)]}).load_state_dict(RunParams({"x": "nan", "y": [3]}).state_dict())


def test_epoch_means_precede_the_train_handlers_and_can_be_turned_off():
    seen: list[dict] = []

    class MetricsReader:
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.append(dict(e.state.metrics)))

    trainer = _armed_trainer(False, [MetricsReader()])
    trainer.optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.5})
    recorded = _record_scalars(trainer)
    trainer.run()
    assert len(seen) == EPOCHS
    for metrics, epoch in zip(seen, recorded):  # the handler sees this epoch's means, not the previous epoch's
        assert metrics["epoch_loss_kl"] == pytest.approx(np.mean([it["loss_kl"] for it in epoch]), rel=1e-6)
        assert metrics["lr"] == 0.01 and metrics["lr_group_1"] == 0.5
    plain = _armed_trainer(False, [], epoch_metrics=False)
    plain.run()
    assert plain.state.metrics == {} and set(plain.output_scalars) == ARMED_PARTS


@pytest.mark.parametrize("decollate", [False, True])
def test_evaluator_metrics_reach_standard_handlers(decollate, tmp_path, tracking_uri):
    """ARMEDEvaluator keeps MONAI's outputs (a dict, or the decollated list); its metrics reach the handlers' epoch logs."""
    net = MixedEffectsMLP(2, 1, n_clusters=4).eval()
    board = TensorBoardStatsHandler(log_dir=str(tmp_path), iteration_log=False)
    mlflow = _mlflow(tracking_uri, f"evaluator_{decollate}", iteration_log=False)
    accuracy = Accuracy(lambda out: (predicted_class(output_field(out, "pred")), output_field(out, "label").long()))
    evaluator = ARMEDEvaluator(
        device="cpu",
        val_data_loader=_loader(64, shuffle=False),
        network=net,
        prepare_batch=PrepareBatchCluster("features", require_cluster=False),
        key_val_metric={"val_accuracy": accuracy},
        val_handlers=[board, mlflow],
        decollate=decollate,
    )
    evaluator.run(global_epoch=3)
    board.close()
    expected = evaluator.state.metrics["val_accuracy"]
    assert tensorboard_scalars(tmp_path)["val_accuracy"] == [(3, pytest.approx(expected))]
    assert _history(mlflow, "val_accuracy") == [(3, pytest.approx(expected))]
    assert isinstance(evaluator.state.output, list if decollate else dict)


# --- the report and the random-effect spread ----------------------------------------------------------------------


class _Writer:
    """A TensorBoard-style writer that remembers its scalars and flushes."""

    def __init__(self) -> None:
        self.scalars: dict[str, tuple[float, int]] = {}
        self.flushes = 0

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars[tag] = (value, step)

    def flush(self) -> None:
        self.flushes += 1


REPORT = {
    "seen": {"observed": {"accuracy": 0.9, "n": 12, "per_cluster": {"site 0": {"accuracy": 1.0}}, "auroc": None}},
    "latent": {"fe": {"davies_bouldin": 1.5}},
    "classes": ["a", "b"],
    "counts": [3, 4],
}
FLAT = {
    "report/seen/observed/accuracy": 0.9,
    "report/seen/observed/n": 12.0,
    "report/seen/observed/per_cluster/site 0/accuracy": 1.0,
    "report/latent/fe/davies_bouldin": 1.5,
    "report/counts/0": 3.0,
    "report/counts/1": 4.0,
}


def test_flatten_report_keeps_the_numbers():
    assert flatten_report(REPORT, "report") == FLAT
    assert flatten_report({"a/b": {"c(d)": 1, "ok": True}}) == {"a/b/c_d_": 1.0}


def test_report_logger_writes_the_report_to_tensorboard_and_the_mlflow_run(tmp_path, tracking_uri):
    report_file = tmp_path / "metrics.json"
    report_file.write_text(json.dumps(REPORT))
    mlflow = _mlflow(tracking_uri, "report", iteration_log=False)
    trainer = Engine(lambda engine, batch: None)
    mlflow.attach(trainer)
    trainer.run([0], max_epochs=1)  # starts the run and, like --tracking mlflow's trainer handler, closes it
    assert mlflow.cur_run is None
    writer = _Writer()
    logged = ReportLogger(summary_writer=writer, mlflow_handlers=[None, mlflow], step=7)(report_file)
    assert logged == FLAT
    assert writer.scalars == {k: (v, 7) for k, v in FLAT.items()} and writer.flushes == 1
    run = mlflow.client.search_runs([mlflow.experiment.experiment_id])[0]
    assert run.data.metrics == FLAT
    assert _history(mlflow, "report/seen/observed/accuracy") == [(7, 0.9)]
    assert [a.path for a in mlflow.client.list_artifacts(run.info.run_id)] == ["metrics.json"]


def test_report_logger_takes_a_dict_and_skips_an_mlflow_handler_that_never_ran(tracking_uri, caplog):
    writer = _Writer()
    idle = _mlflow(tracking_uri, "never_started")
    with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.report_logger"):
        assert ReportLogger(writer, [idle], prefix="final")({"seen": {"auroc": 0.75}}) == {"final/seen/auroc": 0.75}
    assert "no MLFlowHandler has started a run" in caplog.text and writer.scalars == {"final/seen/auroc": (0.75, 0)}


def test_report_logger_names_a_bad_report_file(tmp_path):
    logger = ReportLogger(_Writer())
    with pytest.raises(FileNotFoundError, match=r"no report file '.*missing\.json'; run the report first"):
        logger(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json' is not valid JSON"):
        logger(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"list\.json' holds a list, expected a JSON object"):
        logger(str(tmp_path / "list.json"))


def test_random_effects_summary_flushes_its_writer(tmp_path):
    writer = _Writer()
    summary = RandomEffectsSummary(MixedEffectsMLP(2, 1, n_clusters=3), tmp_path / "re.json", summary_writer=writer)
    summary(SimpleNamespace(state=SimpleNamespace(epoch=1)))
    assert writer.flushes == 1 and "random_effects/intercept/spread_0" in writer.scalars


# --- a bundle where mlflow is not installed -----------------------------------------------------------------------


@pytest.fixture
def without_mlflow(monkeypatch):
    """mlflow as if not installed: ``import mlflow`` fails and MONAI's MLFlowHandler holds its missing-module stand-in."""
    import monai.handlers.mlflow_handler as mlflow_handler

    monkeypatch.setitem(sys.modules, "mlflow", None)
    missing, found = optional_import("mlflow", descriptor="Please install mlflow before using MLFlowHandler.")
    assert not found
    monkeypatch.setattr(mlflow_handler, "mlflow", missing)


def _spirals(root: Path, **override):
    _clustered_csv(root / "data.csv")
    data = {"csv_file": str(root / "data.csv"), "generate_default_data": False, "n_unseen_clusters": 1}
    return bundle_workflow(SPIRALS, ["train.json"], root, **{"epochs": 2, **data, **override})


def test_bundle_trains_and_writes_tensorboard_events_without_mlflow(without_mlflow, tmp_path):
    workflow = _spirals(tmp_path)
    workflow.run()
    (log_dir,) = run_log_dirs(tmp_path)
    scalars = tensorboard_scalars(log_dir)
    assert ARMED_PARTS - {"adv_accuracy"} <= set(scalars) and {"epoch_loss_gen", "lr", "val_accuracy"} <= set(scalars)
    assert "random_effects/intercept/spread_0" in scalars and "report/seen/observed/accuracy" in scalars
    assert [s for s, _ in scalars["val_accuracy"]] == [1, 2], "only the validation epochs, not the report's runs"
    assert not (tmp_path / "eval" / "mlruns.db").exists()


def test_bundle_tracking_without_mlflow_says_to_install_it(without_mlflow, tmp_path):
    workflow = _spirals(tmp_path, tracking="mlflow")
    with pytest.raises(Exception) as error:
        workflow.run()
    messages, cause = [], error.value
    while cause is not None:
        messages.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    assert "Please install mlflow before using MLFlowHandler" in "\n".join(messages)
    assert not (tmp_path / "models" / "model.pt").exists(), "it stops before training"


def test_bundle_without_tensorboard_events_when_turned_off(tmp_path):
    workflow = _spirals(tmp_path, tensorboard=False)
    workflow.run()
    assert (tmp_path / "eval" / "metrics.json").is_file() and not (tmp_path / "eval" / "tensorboard").exists()


def test_scalar_sums_keep_sums_and_counts_per_key():
    from monai_armed.engines import ScalarSums

    sums = ScalarSums()
    assert sums.means() == {} and sums.device() is None
    sums.add("loss", torch.tensor(0.5))
    sums.add("loss", 0.7)
    sums.add("loss_kl", torch.tensor([2.0]))
    assert sums.means() == pytest.approx({"loss": 0.6, "loss_kl": 2.0})
    totals, counts = sums.totals(["loss", "loss_gen"], torch.device("cpu"))
    assert totals.tolist() == pytest.approx([1.2, 0.0]) and counts.tolist() == [2.0, 0.0]
    with pytest.raises(RuntimeError):
        sums.add("loss", torch.ones(2))  # one value per key and iteration
    sums.reset()
    assert sums.means() == {}


def test_runs_in_one_bundle_root_keep_their_tracking_apart_and_a_resumed_run_continues_its_own(tmp_path):
    """Two fresh runs interrupted one after the other, then a resumed one: MLflow and TensorBoard hold two runs; the
    resumed run continues the newest (whose checkpoints it resumes), not the oldest unfinished one that MONAI's
    MLFlowHandler picks without a run name, and no fresh run appends to an interrupted one."""
    for _ in range(2):
        interrupted = _spirals(tmp_path, tracking="mlflow", epochs=3)
        interrupt_before_epoch(interrupted, 3)
        with pytest.raises(RuntimeError) as crash:
            interrupted.run()
        assert isinstance(crash.value.__cause__, Interrupted)
    logs = run_log_dirs(tmp_path)
    assert len(logs) == 2
    _spirals(tmp_path, tracking="mlflow", epochs=3, resume=True).run()
    assert run_log_dirs(tmp_path) == logs, "the resumed run logs where the newest interrupted one did"
    client, runs = mlflow_runs(path_to_sqlite_uri(str(tmp_path / "eval" / "mlruns.db")))
    runs = sorted(runs, key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in runs] == [p.name for p in logs]
    for run, log_dir, epochs, status in zip(runs, logs, (2, 3), ("RUNNING", "FINISHED")):
        assert run.info.status == status, run.info.run_name
        # MLflow returns a history in timestamp order, which a resumed run's records need not follow: each epoch once
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch_loss"))
        assert steps == list(range(1, epochs + 1)), (run.info.run_name, steps)
        # the resumed run's event file may sort before the first one (same second, by process id): each epoch once
        assert sorted(s for s, _ in tensorboard_scalars(log_dir)["epoch_loss"]) == list(range(1, epochs + 1))
