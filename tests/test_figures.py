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

import os
import tempfile
import unittest
from unittest import mock

import numpy as np
import torch
from matplotlib.axes import Axes

from monai_armed.visualize import (
    feature_importance,
    intercept_balance_correlation,
    plot_decision_boundaries,
    plot_feature_importance,
    plot_intercepts_vs_balance,
    plot_random_effect_spread,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHIFT = torch.tensor([-0.5, 0.0, 0.5])


class CountingPredict:
    """``sigmoid(4 * (x0 - shift[cluster]))`` (shift 0 for fixed effects) that records its calls."""

    def __init__(self) -> None:
        self.clusters: list[torch.Tensor | None] = []
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
        self.clusters.append(cluster)
        self.shapes.append(tuple(x.shape))
        shift = 0.0 if cluster is None else SHIFT[cluster]
        return torch.sigmoid(4 * (x[:, 0] - shift))


class TitleRecorder:
    """Records every axes title a plotting function sets (wraps ``Axes.set_title``)."""

    def __init__(self) -> None:
        self.titles: list[str] = []

    def __enter__(self) -> TitleRecorder:
        original = Axes.set_title
        self._patch = mock.patch.object(
            Axes,
            "set_title",
            autospec=True,
            side_effect=lambda ax, t, *a, **k: (self.titles.append(t), original(ax, t)),
        )
        self._patch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._patch.stop()


class FigureTestCase(unittest.TestCase):
    """A temporary folder per test and a check that a figure was written completely (shared by figure tests)."""

    def setUp(self) -> None:
        self._tmp = tempfile.TemporaryDirectory()
        self.tmp = self._tmp.name

    def tearDown(self) -> None:
        self._tmp.cleanup()

    def assert_png(self, path: str) -> None:
        self.assertTrue(os.path.isfile(path))
        with open(path, "rb") as f:
            self.assertEqual(f.read(8), PNG_MAGIC)
        self.assertGreater(os.path.getsize(path), 1000)
        self.assertEqual([n for n in os.listdir(os.path.dirname(path)) if n.endswith(".tmp")], [])


class TestFigures(FigureTestCase):

    def test_decision_boundaries_one_call_per_panel(self) -> None:
        predict = CountingPredict()
        rng = np.random.default_rng(0)
        points = (rng.uniform(-1, 1, (60, 2)), rng.integers(0, 2, 60), rng.integers(0, 3, 60))
        boundary = np.stack([np.zeros(50), np.linspace(-1, 1, 50)], axis=1)
        target = os.path.join(self.tmp, "nested", "dir", "boundaries.png")
        path = plot_decision_boundaries(
            predict, [-1, 0, 1, 2], target, step=0.05, points=points, true_boundary=boundary, ncols=3, title="t"
        )
        self.assertEqual(path, target)
        self.assert_png(path)
        self.assertEqual(len(predict.clusters), 4)
        self.assertIsNone(predict.clusters[0])
        n = 81 * 81
        self.assertEqual(predict.shapes, [(n, 2)] * 4)
        for expected, cluster in zip([0, 1, 2], predict.clusters[1:]):
            self.assertEqual(cluster.dtype, torch.int64)
            self.assertEqual(tuple(cluster.shape), (n,))
            self.assertTrue(bool((cluster == expected).all()))

    def test_decision_boundaries_extra_features(self) -> None:
        predict = CountingPredict()
        path = plot_decision_boundaries(
            predict,
            [1],
            os.path.join(self.tmp, "b.png"),
            x_range=(-1, 1),
            y_range=(0, 1),
            step=0.1,
            extra_features=[0.3, 0.7],
            cluster_names=["a", "b", "c"],
        )
        self.assert_png(path)
        self.assertEqual(predict.shapes, [(21 * 11, 4)])

    def test_decision_boundaries_runs_without_grad(self) -> None:
        def predict(x: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
            self.assertFalse(torch.is_grad_enabled())
            return torch.full((x.shape[0],), 0.7)

        self.assert_png(plot_decision_boundaries(predict, [0], os.path.join(self.tmp, "c.png"), step=0.2))

    def test_decision_boundaries_rejects_empty(self) -> None:
        with self.assertRaises(ValueError):
            plot_decision_boundaries(CountingPredict(), [], os.path.join(self.tmp, "d.png"))

    def test_intercept_correlation(self) -> None:
        a, b = np.array([-1.0, 0.2, 0.1, 0.9]), np.array([0.2, 0.45, 0.5, 0.8])
        self.assertAlmostEqual(intercept_balance_correlation(a, b), np.corrcoef(a, b)[0, 1], places=12)
        with self.assertRaisesRegex(ValueError, "3 clusters"):
            intercept_balance_correlation(a[:2], b[:2])
        with self.assertRaisesRegex(ValueError, "zero variance"):
            intercept_balance_correlation(a, np.full(4, 0.5))
        with self.assertRaisesRegex(ValueError, "finite"):
            intercept_balance_correlation(np.array([0.0, np.nan, 1.0]), np.array([0.1, 0.2, 0.3]))
        with self.assertRaisesRegex(ValueError, "length"):
            intercept_balance_correlation(a, b[:3])

    def test_plot_intercepts(self) -> None:
        a, b = np.array([-1.0, 0.2, 0.1, 0.9]), np.array([0.2, 0.45, 0.5, 0.8])
        path = os.path.join(self.tmp, "x", "intercepts.png")
        self.assertEqual(plot_intercepts_vs_balance(a, b, path), path)
        self.assert_png(path)
        seen = np.array([True, True, False, True])
        self.assert_png(plot_intercepts_vs_balance(a, b, path, cluster_names=list("abcd"), seen_mask=seen))

    def test_plot_feature_importance(self) -> None:
        path = os.path.join(self.tmp, "y", "importance.png")
        out = plot_feature_importance(
            np.array([0.1, 0.5, 0.3]), path, ["x1", "x2", "probe"], errors=np.array([0.01, 0.05, 0.02]), title="t"
        )
        self.assertEqual(out, path)
        self.assert_png(path)
        with self.assertRaises(ValueError):
            plot_feature_importance(np.ones(3), path, ["only one"])

    def test_plot_random_effect_spread(self) -> None:
        path = os.path.join(self.tmp, "z", "spread.png")
        self.assertEqual(plot_random_effect_spread(np.array([0.3, 0.01, 0.12]), path), path)
        self.assert_png(path)
        self.assert_png(plot_random_effect_spread(np.linspace(0, 1, 12), path, [f"u{i}" for i in range(12)], "t"))

    def test_feature_importance(self) -> None:
        calls: list[torch.Tensor | None] = []

        def predict(x: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
            calls.append(cluster)
            return torch.sigmoid(2 * x[:, 0] + 0 * x[:, 1])

        with torch.no_grad():
            imp = feature_importance(predict, np.zeros(2))
        self.assertIsInstance(imp, np.ndarray)
        np.testing.assert_allclose(imp, [0.5, 0.0], atol=1e-6)
        self.assertIsNone(calls[0])
        feature_importance(predict, np.zeros(2), cluster=2)
        self.assertEqual(calls[1].tolist(), [2])

    def test_feature_importance_cluster_dependent(self) -> None:
        def predict(x: torch.Tensor, cluster: torch.Tensor | None) -> torch.Tensor:
            slope = 1.0 if cluster is None else 3.0
            return torch.sigmoid(slope * x[:, 1])

        np.testing.assert_allclose(feature_importance(predict, np.zeros(2), cluster=0), [0.0, 0.75], atol=1e-6)
        np.testing.assert_allclose(feature_importance(predict, np.zeros(2)), [0.0, 0.25], atol=1e-6)


if __name__ == "__main__":
    unittest.main()
