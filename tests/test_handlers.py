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
import tempfile
import unittest
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDEvaluator, PrepareBatchCluster
from monai_armed.handlers import PerClusterAccuracy, PredictionCollector, RandomEffectsSummary, output_field
from monai_armed.metrics import classification_summary, per_cluster_accuracy, positive_probability, predicted_class
from monai_armed.networks import MixedEffectsMLP
from monai_armed.utils import write_json

# hand-made binary predictions: cluster 0 -> 2/3 right, cluster 1 -> 2/2, cluster 2 -> 0/1, cluster 3 absent,
# unseen (-1) -> 1/2
LOGITS = torch.tensor([[2.0], [-1.0], [0.5], [-3.0], [1.5], [0.7], [-0.2], [1.0]])
LABELS = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0])
CLUSTERS = torch.tensor([0, 0, 0, 1, 1, -1, -1, 2])
EXPECTED = {
    "a": {"accuracy": 2 / 3, "n": 3},
    "b": {"accuracy": 1.0, "n": 2},
    "c": {"accuracy": 0.0, "n": 1},
    "unseen": {"accuracy": 0.5, "n": 2},
}


def _outputs(decollate: bool, batch: int = 3) -> list:
    """Iteration outputs of the hand-made predictions, as a plain dict per batch or as decollated lists."""
    outputs = []
    for s in range(0, len(LABELS), batch):
        part = {"pred": LOGITS[s : s + batch], "label": LABELS[s : s + batch], "cluster": CLUSTERS[s : s + batch]}
        if decollate:
            part = [{k: v[i] for k, v in part.items()} for i in range(len(part["label"]))]
        outputs.append(part)
    return outputs


def _engine(handlers_need_details: bool = True) -> Engine:
    """A minimal ignite engine whose output is simply the batch it is given."""
    engine = Engine(lambda e, batch: batch)
    if handlers_need_details:

        @engine.on(Events.STARTED)
        def _init(e):
            e.state.metric_details = {}

    return engine


def _assert_table(table: dict, expected: dict) -> None:
    assert set(table) == set(expected)
    for name, value in expected.items():
        assert table[name]["n"] == value["n"]
        assert table[name]["accuracy"] == pytest.approx(value["accuracy"])


class TestPredictionCollector(unittest.TestCase):
    def test_plain_and_decollated(self):
        for decollate in (False, True):
            engine = _engine(False)
            collector = PredictionCollector()
            collector.attach(engine)
            engine.run(_outputs(decollate), max_epochs=1)
            self.assertTrue(torch.equal(collector.pred, LOGITS), decollate)
            self.assertTrue(torch.equal(collector.label, LABELS))
            self.assertTrue(torch.equal(collector.cluster, CLUSTERS))

    def test_resets_every_epoch_and_attach_once(self):
        engine = _engine(False)
        collector = PredictionCollector()
        collector.attach(engine)
        collector.attach(engine)  # no double registration
        engine.run(_outputs(False), max_epochs=2)
        self.assertEqual(len(collector.pred), len(LABELS))

    def test_missing_field_is_none(self):
        collector = PredictionCollector()
        fake = SimpleNamespace(state=SimpleNamespace(output={"pred": LOGITS[:2]}))
        collector.reset(fake)
        collector.collect(fake)
        fake.state.output = [{"pred": LOGITS[2]}, {"pred": LOGITS[3]}]
        collector.collect(fake)
        collector.finalize(fake)
        self.assertTrue(torch.equal(collector.pred, LOGITS[:4]))
        self.assertIsNone(collector.label)
        self.assertIsNone(collector.cluster)

    def test_custom_keys(self):
        collector = PredictionCollector(keys=("pred_fe",))
        fake = SimpleNamespace(state=SimpleNamespace(output={"pred_fe": LOGITS, "pred": LOGITS + 1}))
        collector.collect(fake)
        collector.finalize()
        self.assertTrue(torch.equal(collector.values["pred_fe"], LOGITS))
        self.assertIsNone(collector.pred)

    def test_output_field(self):
        self.assertTrue(torch.equal(output_field({"label": [1, 0]}, "label"), torch.tensor([1, 0])))
        self.assertIsNone(output_field({"label": None}, "label"))
        self.assertIsNone(output_field([{"label": 1}, {"x": 0}], "label"))
        self.assertIsNone(output_field([], "label"))
        stacked = output_field([{"pred": torch.tensor([0.5])}, {"pred": torch.tensor([1.5])}], "pred")
        self.assertTrue(torch.equal(stacked, torch.tensor([[0.5], [1.5]])))

    def test_with_armed_evaluator(self):
        torch.manual_seed(0)
        net = MixedEffectsMLP(2, 1, n_clusters=3).eval()
        x = torch.randn(10, 2)
        c = torch.tensor([0, 1, 2, -1, 0, 1, 2, -1, 0, 1])
        y = torch.arange(10) % 2
        loader = TensorBatchLoader({"features": x, "label": y, "cluster": c}, batch_size=4)
        evaluator = ARMEDEvaluator(
            device="cpu", val_data_loader=loader, network=net, prepare_batch=PrepareBatchCluster("features")
        )  # decollates by default
        collector = PredictionCollector()
        collector.attach(evaluator)
        evaluator.run()
        self.assertIsInstance(evaluator.state.output, list)
        with torch.no_grad():
            torch.testing.assert_close(collector.pred, net(x, c))
        self.assertTrue(torch.equal(collector.cluster, c))
        self.assertTrue(torch.equal(collector.label, y))


class TestPerClusterAccuracy(unittest.TestCase):
    def test_metric_details_and_json(self):
        for decollate in (False, True):
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "eval" / "per_cluster.json"
                engine = _engine()
                PerClusterAccuracy(n_clusters=4, cluster_names=["a", "b", "c", "d"], output_file=path).attach(engine)
                engine.run(_outputs(decollate), max_epochs=1)
                table = engine.state.metric_details["per_cluster_accuracy"]
                _assert_table(table, EXPECTED)
                self.assertNotIn("d", table)  # no samples
                self.assertEqual(engine.state.metrics["min_cluster_accuracy"], 0.0)
                _assert_table(json.loads(path.read_text()), EXPECTED)

    def test_default_names_and_no_file(self):
        engine = _engine()
        PerClusterAccuracy(n_clusters=3).attach(engine)
        engine.run(_outputs(False), max_epochs=1)
        table = engine.state.metric_details["per_cluster_accuracy"]
        self.assertEqual(set(table), {"0", "1", "2", "unseen"})
        self.assertAlmostEqual(table["0"]["accuracy"], 2 / 3)

    def test_attach_twice_tabulates_once(self):
        engine, tables = _engine(), []
        handler = PerClusterAccuracy(n_clusters=4)
        handler.describe = lambda table: tables.append(table) or ""
        handler.attach(engine)
        handler.attach(engine)
        engine.run(_outputs(False), max_epochs=1)
        self.assertEqual(len(tables), 1)

    def test_needs_cluster(self):
        engine = _engine()
        PerClusterAccuracy(n_clusters=3).attach(engine)
        data = [{"pred": LOGITS, "label": LABELS}]
        with self.assertRaisesRegex(KeyError, "cluster"):
            engine.run(data, max_epochs=1)


class TestRandomEffectsSummary(unittest.TestCase):
    def test_writes_json_and_scalars(self):
        torch.manual_seed(0)
        net = MixedEffectsMLP(2, 1, n_clusters=3, hidden_channels=(4, 4, 4))
        calls = []
        writer = SimpleNamespace(add_scalar=lambda tag, value, step: calls.append((tag, value, step)))
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "re.json"
            handler = RandomEffectsSummary(
                net, path, cluster_names=["x", "y", "z"], summary_writer=writer, tag_prefix="re"
            )
            engine = Engine(lambda e, b: None)
            handler.attach(engine)
            engine.run([0, 1], max_epochs=2)
            content = json.loads(path.read_text())
        self.assertEqual(content["clusters"], ["x", "y", "z"])
        self.assertEqual(content["epoch"], 2)
        self.assertEqual(set(content["groups"]), {"slope_hidden", "intercept"})
        means = net.posterior_means()
        np.testing.assert_allclose(
            content["groups"]["slope_hidden"]["posterior_mean"], means["slope_hidden"].numpy(), rtol=1e-6
        )
        self.assertEqual(len(content["groups"]["intercept"]["posterior_mean"]), 3)
        spread = means["slope_hidden"].std(0).tolist()
        # every epoch: 4 slope spreads + 1 intercept spread (the network does not train, so values stay put)
        tags = [f"re/slope_hidden/spread_{i}" for i in range(4)] + ["re/intercept/spread_0"]
        self.assertEqual({(tag, step) for tag, _, step in calls}, {(t, e) for t in tags for e in (1, 2)})
        values = {(tag, step): value for tag, value, step in calls}
        for i in range(4):
            self.assertAlmostEqual(values[(f"re/slope_hidden/spread_{i}", 1)], spread[i], places=6)
        self.assertAlmostEqual(values[("re/intercept/spread_0", 2)], means["intercept"].std(0).item(), places=6)

    def test_variance_components_of_every_factor_and_the_residual(self):
        from monai_armed.losses import GaussianLikelihood
        from monai_armed.networks import FactorSpec, MixedModelNet

        net = MixedModelNet(2, {"subject": FactorSpec(5, ["(Intercept)", "days"]), "site": FactorSpec(3)})
        with torch.no_grad():
            net.random_effects["subject"].prior_tril.fill_(0.5)  # a correlated prior
        family = GaussianLikelihood(scale_init=2.0)
        with tempfile.TemporaryDirectory() as d:
            handler = RandomEffectsSummary(net, Path(d) / "re.json", family=family)
            engine = Engine(lambda e, b: None)
            handler.attach(engine)
            engine.run([0], max_epochs=1)
            rows = json.loads((Path(d) / "re.json").read_text())["variance_components"]
        keys = [(r["grp"], r["var1"], r["var2"]) for r in rows]
        self.assertEqual(keys, [("subject", "(Intercept)", None), ("subject", "days", None),
                                ("subject", "(Intercept)", "days"), ("site", "(Intercept)", None),
                                ("Residual", None, None)])
        self.assertAlmostEqual(rows[2]["vcov"], 0.5, places=5)  # P = [[1, 0], [0.5, 1]]: covariance 0.5
        self.assertAlmostEqual(rows[-1]["vcov"], 4.0, places=5)

    def test_interval(self):
        net = MixedEffectsMLP(2, 1, n_clusters=3)
        steps = []
        writer = SimpleNamespace(add_scalar=lambda tag, value, step: steps.append(step))
        with tempfile.TemporaryDirectory() as d:
            handler = RandomEffectsSummary(net, Path(d) / "re.json", summary_writer=writer, interval=2)
            engine = Engine(lambda e, b: None)
            handler.attach(engine)
            engine.run([0], max_epochs=3)
        # epoch 2 by interval, epoch 3 at completion
        self.assertEqual(sorted(set(steps)), [2, 3])

    def test_direct_call_returns_summary(self):
        net = MixedEffectsMLP(2, 1, n_clusters=3)
        with tempfile.TemporaryDirectory() as d:
            summary = RandomEffectsSummary(net, Path(d) / "re.json")(SimpleNamespace(state=SimpleNamespace(epoch=7)))
        self.assertEqual(summary["epoch"], 7)
        self.assertEqual(summary["clusters"], ["0", "1", "2"])


def test_write_json_atomic(tmp_path):
    path = tmp_path / "a" / "b.json"
    assert write_json({"x": [1, 2]}, path) == str(path)
    assert json.loads(path.read_text()) == {"x": [1, 2]}
    write_json({"x": 3}, path)
    assert json.loads(path.read_text()) == {"x": 3}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]


class TestClassificationMetrics(unittest.TestCase):
    def test_binary_summary_vs_sklearn(self):
        summary = classification_summary(LOGITS, LABELS)
        prob = torch.sigmoid(LOGITS[:, 0]).numpy()
        pred = (LOGITS[:, 0] > 0).long().numpy()
        self.assertEqual(summary["n"], 8)
        self.assertAlmostEqual(summary["accuracy"], accuracy_score(LABELS.numpy(), pred))
        self.assertAlmostEqual(summary["balanced_accuracy"], balanced_accuracy_score(LABELS.numpy(), pred))
        self.assertAlmostEqual(summary["auroc"], roc_auc_score(LABELS.numpy(), prob))
        self.assertNotIn("per_cluster", summary)
        self.assertAlmostEqual(summary["accuracy"], 5 / 8)

    def test_multiclass_summary_vs_sklearn(self):
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(30, 3, generator=g)
        labels = torch.arange(30) % 3
        summary = classification_summary(logits, labels)
        prob = torch.softmax(logits, 1).numpy()
        pred = logits.argmax(1).numpy()
        self.assertAlmostEqual(summary["accuracy"], accuracy_score(labels.numpy(), pred))
        self.assertAlmostEqual(summary["balanced_accuracy"], balanced_accuracy_score(labels.numpy(), pred))
        self.assertAlmostEqual(summary["auroc"], roc_auc_score(labels.numpy(), prob, multi_class="ovr"))

    def test_auroc_none_with_one_class(self):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sklearn: y_pred contains classes not in y_true
            summary = classification_summary(LOGITS, torch.ones(8, dtype=torch.long))
        self.assertIsNone(summary["auroc"])
        self.assertAlmostEqual(summary["accuracy"], 5 / 8)

    def test_per_cluster_table(self):
        summary = classification_summary(LOGITS, LABELS.float().unsqueeze(1), CLUSTERS, 4, ["a", "b", "c", "d"])
        _assert_table(summary["per_cluster"], EXPECTED)

    def test_per_cluster_default_n_clusters(self):
        summary = classification_summary(LOGITS, LABELS, CLUSTERS)
        self.assertEqual(set(summary["per_cluster"]), {"0", "1", "2", "unseen"})

    def test_per_cluster_accuracy_unseen_slot(self):
        pred = predicted_class(LOGITS)
        accuracy, counts = per_cluster_accuracy(pred, LABELS, CLUSTERS, n_clusters=4)
        self.assertEqual(accuracy.shape, (5,))
        self.assertEqual(counts.tolist(), [3, 2, 1, 0, 2])
        np.testing.assert_allclose(accuracy[[0, 1, 2, 4]], [2 / 3, 1.0, 0.0, 0.5])
        self.assertTrue(math.isnan(accuracy[3]))

    def test_predicted_class_and_probability(self):
        self.assertEqual(predicted_class(torch.tensor([[0.1], [-0.1], [0.0]])).tolist(), [1, 0, 0])
        self.assertEqual(predicted_class(torch.tensor([[0.1, 0.3, -1.0], [2.0, 0.0, 0.0]])).tolist(), [1, 0])
        torch.testing.assert_close(positive_probability(torch.tensor([[0.0], [100.0]])), torch.tensor([0.5, 1.0]))
        p = positive_probability(torch.randn(4, 3))
        torch.testing.assert_close(p.sum(1), torch.ones(4))


if __name__ == "__main__":
    unittest.main()
