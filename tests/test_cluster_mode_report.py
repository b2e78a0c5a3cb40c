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

import json
import logging

import pytest
import torch
from ignite.engine import Engine, Events

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDEvaluator, PrepareBatchCluster
from monai_armed.handlers import ClusterModeReport
from monai_armed.metrics import binary_metrics, regression_summary, youden_threshold
from monai_armed.networks import MixedEffectsMLP


def _loader(n: int, seed: int, single_class_cluster: bool = False) -> TensorBatchLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    label = (x[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
    cluster = torch.arange(n) % 3
    if single_class_cluster:
        label[cluster == 2] = 1
    data = {"features": x, "label": label, "cluster": cluster}
    return TensorBatchLoader(data, batch_size=16)


@pytest.fixture(scope="module")
def evaluator():
    torch.manual_seed(0)
    net = MixedEffectsMLP(2, 1, n_clusters=3, random_slopes="both").eval()
    with torch.no_grad():
        net.random_effects.loc.normal_(0, 0.5)  # clusters differ, so the modes differ
    return ARMEDEvaluator(
        device="cpu",
        val_data_loader=_loader(32, 0),
        network=net,
        prepare_batch=PrepareBatchCluster("features"),
        decollate=False,
    )


def test_binary_report_uses_the_training_threshold_of_each_mode(evaluator, tmp_path):
    out = tmp_path / "metrics.json"
    report = ClusterModeReport(
        evaluator,
        {"seen": _loader(48, 1, single_class_cluster=True), "train": _loader(64, 2)},
        {"seen": ["observed", "fixed"], "train": ["observed"]},
        output_file=out,
        cluster_names=["a", "b", "c"],
        metrics="binary",
        threshold_dataset="train",
    )
    evaluator.cluster_mode = "observed"
    results = report.run()
    assert evaluator.cluster_mode == "observed", "the evaluator's own mode is restored"
    assert list(results) == ["train", "seen"], "the threshold dataset runs first"
    assert set(results["train"]) == {"observed", "fixed"}, "it is evaluated in every mode the others need"
    for mode in ("observed", "fixed"):
        evaluator.cluster_mode = mode
        evaluator.data_loader, evaluator.state.epoch_length = report.datasets["train"], len(report.datasets["train"])
        evaluator.run()
        train_prob = torch.sigmoid(report.collector.pred[:, 0]).numpy()
        fitted = youden_threshold(report.collector.label.numpy(), train_prob)
        assert results["train"][mode]["threshold"] == pytest.approx(fitted)
        assert results["seen"][mode]["threshold"] == pytest.approx(fitted)
    assert results["seen"]["observed"]["auroc"] != results["seen"]["fixed"]["auroc"]
    assert results["seen"]["observed"]["per_cluster"]["c"]["auroc"] is None, "one-class site: NaN becomes null"
    assert json.loads(out.read_text()) == results


def test_binary_report_without_threshold_dataset_fits_each_dataset(evaluator):
    report = ClusterModeReport(evaluator, {"seen": _loader(40, 3)}, {"seen": ["observed"]}, metrics="binary")
    seen = report.run()["seen"]["observed"]
    prob = torch.sigmoid(report.collector.pred[:, 0]).numpy()
    expected = binary_metrics(report.collector.label.numpy(), prob)
    assert seen["threshold"] == pytest.approx(expected["threshold"])
    assert seen["auroc"] == pytest.approx(expected["auroc"])
    assert set(seen["per_cluster"]) == {"0", "1", "2"}


def test_bad_arguments_are_named(evaluator):
    with pytest.raises(ValueError, match="metrics must be one of 'classification', 'regression', 'binary'"):
        ClusterModeReport(evaluator, {"seen": _loader(8, 0)}, metrics="auc")
    with pytest.raises(ValueError, match="threshold_dataset 'train' needs metrics='binary'"):
        ClusterModeReport(evaluator, {"seen": _loader(8, 0), "train": _loader(8, 1)}, threshold_dataset="train")
    with pytest.raises(ValueError, match=r"must be one of the datasets \['seen'\]"):
        ClusterModeReport(evaluator, {"seen": _loader(8, 0)}, metrics="binary", threshold_dataset="train")


def test_regression_report_from_the_evaluator_task(tmp_path, caplog):
    """An evaluator with task="regression" gives MSE, MAE and R² overall and per cluster; classification unchanged."""
    torch.manual_seed(0)
    net = MixedEffectsMLP(2, 1, n_clusters=3, hidden_channels=(), random_slopes="input").eval()
    with torch.no_grad():
        net.random_effects.loc.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    cluster = torch.arange(40) % 3
    cluster[-1] = -1  # one sample of an unseen cluster
    y = x[:, 0] + torch.tensor([-1.0, 0.0, 1.0, 0.0])[cluster]
    loader = TensorBatchLoader({"features": x, "label": y, "cluster": cluster}, batch_size=16)
    evaluator = ARMEDEvaluator(
        device="cpu", val_data_loader=loader, network=net, prepare_batch=PrepareBatchCluster("features"),
        decollate=False, task="regression",
    )
    out = tmp_path / "metrics.json"
    report = ClusterModeReport(evaluator, {"seen": loader}, {"seen": ["observed", "fixed"]}, output_file=out,
                               cluster_names=["a", "b", "c"])
    assert report.metrics == "regression"
    with caplog.at_level("INFO"):
        results = report.run()
    assert "cluster-mode report (mse)" in caplog.text and "cluster-mode report (r2)" in caplog.text
    for mode, clusters in (("observed", cluster), ("fixed", None)):
        with torch.no_grad():
            pred = net(x, clusters)
        expected = regression_summary(pred, y, cluster, 3, ["a", "b", "c"])
        seen = results["seen"][mode]
        assert set(seen) == {"n", "mse", "mae", "r2", "per_cluster"}
        for key in ("mse", "mae", "r2"):
            assert seen[key] == pytest.approx(expected[key], rel=1e-5), (mode, key)
        assert list(seen["per_cluster"]) == ["a", "b", "c", "unseen"]
        for name, row in seen["per_cluster"].items():
            wanted = expected["per_cluster"][name]
            assert row == {k: pytest.approx(v, rel=1e-5) if v is not None else None for k, v in wanted.items()}
        assert seen["per_cluster"]["unseen"]["r2"] is None, "one row: R² undefined, written as null"
    assert results["seen"]["observed"]["mse"] != pytest.approx(results["seen"]["fixed"]["mse"])
    assert json.loads(out.read_text()) == results


def _one_class_loader(n: int, seed: int) -> TensorBatchLoader:
    loader = _loader(n, seed)
    loader.data["label"] = torch.ones_like(loader.data["label"])
    return loader


def test_binary_report_of_a_single_class_dataset_is_null_or_a_named_error(evaluator):
    report = ClusterModeReport(evaluator, {"seen": _one_class_loader(24, 3)}, {"seen": ["fixed"]}, metrics="binary")
    summary = report.run()["seen"]["fixed"]
    assert summary["auroc"] is None and summary["n"] == 24
    assert set(summary["per_cluster"]) == {"0", "1", "2"} and summary["per_cluster"]["0"]["auroc"] is None
    report = ClusterModeReport(
        evaluator, {"train": _one_class_loader(24, 3), "seen": _loader(24, 4)}, {"seen": ["fixed"]}, metrics="binary",
        threshold_dataset="train",
    )  # fmt: skip
    with pytest.raises(ValueError, match="the threshold dataset 'train' holds a single class"):
        report.run()


def test_an_empty_dataset_is_refused_before_any_evaluation(evaluator):
    """ignite skips an empty loader's run, so the report gave the previous dataset's metrics under its name (found
    by helper 51); it is now refused before anything is evaluated."""
    report = ClusterModeReport(evaluator, {"seen": _loader(48, 1), "unseen": []}, {"seen": ["fixed"], "unseen": ["fixed"]})
    runs = []

    def record(engine):
        runs.append(engine.data_loader)

    evaluator.add_event_handler(Events.STARTED, record)
    try:
        with pytest.raises(ValueError, match=r"datasets \['unseen'\] have no batches"):
            report.run()
    finally:
        evaluator.remove_event_handler(record, Events.STARTED)
    assert runs == []
    # a run that yields nothing leaves no earlier predictions behind in the collector
    report.collector.values["pred"] = torch.zeros(1)
    report.collector.reset()
    assert report.collector.pred is None


def test_modes_of_no_dataset_are_named_in_a_warning_and_attach_is_idempotent(evaluator, caplog):
    with caplog.at_level(logging.WARNING):
        report = ClusterModeReport(evaluator, {"seen": _loader(48, 1)}, {"seen": ["fixed"], "unsen": ["fixed"]})
    assert "modes given for ['unsen'], which name no dataset" in caplog.text
    assert report.modes == {"seen": ["fixed"]}
    assert_attached_once(report)


def assert_attached_once(report) -> None:
    """A report attached twice to a trainer runs once when the trainer completes."""
    calls = []
    report.run = lambda: calls.append(1)  # what the handler runs when the trainer completes
    trainer = Engine(lambda engine, batch: None)
    report.attach(trainer)
    report.attach(trainer)
    trainer.run([0], max_epochs=1)
    assert calls == [1]
