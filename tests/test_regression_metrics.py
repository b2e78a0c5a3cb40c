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
import math

import numpy as np
import pytest
import torch
from ignite.engine import Events
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDEvaluator, PrepareBatchCluster
from monai_armed.handlers import PerClusterRegression
from monai_armed.metrics import cluster_groups, per_cluster_regression_metrics, regression_metrics, regression_summary
from monai_armed.networks import MixedEffectsMLP

# a hand example: cluster "a" (index 0) y = 1, 2, 3 predicted 1, 2, 4 -> MSE = MAE = 1/3, R² = 1 - 1 / 2 = 0.5;
# "b" (1) y = 0, 4 predicted 1, 2 -> MSE = (1 + 4) / 2, MAE = 1.5, R² = 1 - 5 / 8; "c" (2) one row; one unseen row
PRED = torch.tensor([[1.0], [2.0], [4.0], [1.0], [2.0], [5.0], [0.5]])
LABEL = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 7.0, 1.0])
CLUSTER = torch.tensor([0, 0, 0, 1, 1, 2, -1])


def _sklearn(rows) -> dict:
    y, p = LABEL.numpy()[rows], PRED[:, 0].numpy()[rows]
    return {"mse": mean_squared_error(y, p), "mae": mean_absolute_error(y, p), "r2": r2_score(y, p)}


def test_overall_metrics_by_hand_and_sklearn():
    metrics = regression_metrics(PRED, LABEL)
    expected = _sklearn(slice(None))
    assert metrics["n"] == 7
    for key in ("mse", "mae", "r2"):
        assert metrics[key] == pytest.approx(expected[key])
    assert metrics["mse"] == pytest.approx((0 + 0 + 1 + 1 + 4 + 4 + 0.25) / 7)
    # (N,) predictions give the same; numpy arrays are accepted
    assert regression_metrics(PRED[:, 0].numpy(), LABEL.numpy()) == metrics


def test_per_cluster_metrics_by_hand_and_sklearn():
    table = per_cluster_regression_metrics(PRED, LABEL, CLUSTER, n_clusters=3, cluster_names=["a", "b", "c"])
    assert list(table) == ["a", "b", "c", "unseen"]
    assert table["a"] == pytest.approx({"n": 3, "mse": 1 / 3, "mae": 1 / 3, "r2": 0.5})
    assert table["b"] == pytest.approx({"n": 2, "mse": 2.5, "mae": 1.5, "r2": 1 - 5 / 8})
    for name, index in (("a", 0), ("b", 1)):
        expected = _sklearn(CLUSTER.numpy() == index)
        for key in ("mse", "mae", "r2"):
            assert table[name][key] == pytest.approx(expected[key]), (name, key)
    assert table["c"] == {"n": 1, "mse": 4.0, "mae": 2.0, "r2": None}, "R² of one row is undefined"
    assert table["unseen"] == {"n": 1, "mse": 0.25, "mae": 0.5, "r2": None}
    summary = regression_summary(PRED, LABEL, CLUSTER, n_clusters=4)
    assert set(summary["per_cluster"]) == {"0", "1", "2", "unseen"}, "empty clusters are left out"
    assert summary["r2"] == pytest.approx(_sklearn(slice(None))["r2"])
    assert regression_metrics(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]))["r2"] is None, "constant label"


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"one value per sample and output.*\(7,\) and \(6,\)"):
        regression_metrics(PRED, LABEL[:6])
    with pytest.raises(ValueError, match="finite"):
        regression_metrics(PRED, torch.tensor([1.0, math.nan, 3, 0, 4, 7, 1]))
    with pytest.raises(ValueError, match="got 2 cluster names for 3 clusters"):
        per_cluster_regression_metrics(PRED, LABEL, CLUSTER, cluster_names=["a", "b"])
    with pytest.raises(ValueError, match="cluster index 2 is out of range for 2 clusters"):
        per_cluster_regression_metrics(PRED, LABEL, CLUSTER, n_clusters=2)


def test_cluster_groups_rows_names_and_errors():
    groups = cluster_groups(np.array([1, -1, 1, 0, 3]), 5, n_clusters=4, cluster_names=["a", "b", "c", "d"])
    assert [name for name, _ in groups] == ["a", "b", "d", "unseen"], "clusters in index order, empty ones left out"
    assert [rows.nonzero()[0].tolist() for _, rows in groups] == [[3], [0, 2], [4], [1]]
    assert [name for name, _ in cluster_groups(torch.tensor([2, 0]), 2)] == ["0", "2"], "default: indices as names"
    assert cluster_groups(torch.tensor([], dtype=torch.long), 0) == []
    with pytest.raises(ValueError, match="got 3 cluster indices for 4 samples"):
        cluster_groups(torch.tensor([0, 1, 2]), 4)


def _regression_evaluator(**kwargs) -> tuple[ARMEDEvaluator, TensorBatchLoader, MixedEffectsMLP]:
    torch.manual_seed(0)
    net = MixedEffectsMLP(2, 1, n_clusters=3, hidden_channels=(), random_slopes="input").eval()
    with torch.no_grad():
        net.random_effects.loc.normal_(0, 0.5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g)
    cluster = torch.arange(30) % 3
    y = x[:, 0] - x[:, 1] + torch.tensor([-1.0, 0.0, 1.0])[cluster]
    loader = TensorBatchLoader({"features": x, "label": y, "cluster": cluster}, batch_size=8)
    evaluator = ARMEDEvaluator(
        device="cpu", val_data_loader=loader, network=net, prepare_batch=PrepareBatchCluster("features"), **kwargs
    )
    return evaluator, loader, net


def test_regression_evaluator_writes_metrics_before_its_handlers():
    seen_by_handler = {}

    class Probe:
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen_by_handler.update(e.state.metrics))

    evaluator, loader, net = _regression_evaluator(task="regression", val_handlers=[Probe()], decollate=False)
    evaluator.run()
    x = torch.cat([b["features"] for b in loader])
    y = torch.cat([b["label"] for b in loader])
    cluster = torch.cat([b["cluster"] for b in loader])
    with torch.no_grad():
        pred = net(x, cluster)[:, 0].numpy()
    metrics = dict(evaluator.state.metrics)
    assert metrics["mse"] == pytest.approx(mean_squared_error(y.numpy(), pred), rel=1e-5)
    assert metrics["mae"] == pytest.approx(mean_absolute_error(y.numpy(), pred), rel=1e-5)
    assert metrics["r2"] == pytest.approx(r2_score(y.numpy(), pred), rel=1e-5)
    assert seen_by_handler["mse"] == metrics["mse"], "the val handlers (StatsHandler, ...) see them"
    evaluator.cluster_mode = "fixed"  # reruns recompute from that run's predictions only
    evaluator.run()
    with torch.no_grad():
        fixed = net(x)[:, 0].numpy()
    assert evaluator.state.metrics["mse"] == pytest.approx(mean_squared_error(y.numpy(), fixed), rel=1e-5)
    assert evaluator.state.metrics["mse"] != pytest.approx(metrics["mse"])


def test_classification_evaluator_is_unchanged_and_task_is_checked():
    evaluator, _, _ = _regression_evaluator(decollate=False)
    assert evaluator.task == "classification"
    evaluator.run()
    assert "mse" not in evaluator.state.metrics
    with pytest.raises(ValueError, match=r"task must be one of \('classification', 'regression', 'segmentation'\), got 'survival'"):
        _regression_evaluator(task="survival")


@pytest.mark.parametrize("decollate", [False, True])
def test_per_cluster_regression_handler(tmp_path, decollate):
    evaluator, loader, net = _regression_evaluator(task="regression", decollate=decollate)
    handler = PerClusterRegression(3, cluster_names=["a", "b", "c"], output_file=tmp_path / "per_cluster.json")
    handler.attach(evaluator)
    evaluator.run()
    x = torch.cat([b["features"] for b in loader])
    y = torch.cat([b["label"] for b in loader])
    cluster = torch.cat([b["cluster"] for b in loader])
    with torch.no_grad():
        pred = net(x, cluster)
    expected = per_cluster_regression_metrics(pred, y, cluster, 3, ["a", "b", "c"])
    table = evaluator.state.metric_details["per_cluster_regression"]
    assert list(table) == ["a", "b", "c"]
    for name in table:
        rows = (cluster == ["a", "b", "c"].index(name)).numpy()
        assert table[name]["r2"] == pytest.approx(r2_score(y.numpy()[rows], pred[:, 0].numpy()[rows]), rel=1e-5)
        assert table[name] == pytest.approx(expected[name], rel=1e-5)
    assert evaluator.state.metrics["max_cluster_mse"] == pytest.approx(max(v["mse"] for v in table.values()))
    written = json.loads((tmp_path / "per_cluster.json").read_text())
    assert {k: pytest.approx(v) for k, v in written.items()} == table
    assert np.isfinite(evaluator.state.metrics["r2"])


def test_float64_targets_with_a_large_offset_keep_their_digits():
    p = torch.tensor([1e6 + 0.3, 1e6 + 0.7, 1e6 + 0.1], dtype=torch.float64)
    y = torch.tensor([1e6 + 0.2, 1e6 + 0.9, 1e6], dtype=torch.float64)
    metrics = regression_metrics(p, y)
    assert metrics["mse"] == pytest.approx(mean_squared_error(y.numpy(), p.numpy()), rel=1e-9)
    assert metrics["r2"] == pytest.approx(r2_score(y.numpy(), p.numpy()), rel=1e-9)
