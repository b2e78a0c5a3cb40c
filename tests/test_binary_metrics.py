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
import unittest

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from monai_armed.metrics import (
    binary_metrics,
    classification_summary,
    mean_ci95,
    per_cluster_binary_metrics,
    youden_threshold,
)

KEYS = {"auroc", "balanced_accuracy", "sensitivity", "specificity", "threshold", "n", "n_positive"}


def brute_force_youden(y: np.ndarray, p: np.ndarray) -> float:
    """Largest sens + spec - 1 over every distinct probability used as a ``>=`` threshold."""
    best = -np.inf
    for t in np.unique(p):
        pred = p >= t
        best = max(best, pred[y == 1].mean() + (~pred[y == 0]).mean() - 1)
    return best


def noisy_scores(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = 1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(0, 1.5, n))))
    return y, p


class TestYouden(unittest.TestCase):
    def test_separable(self) -> None:
        self.assertEqual(youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]), 0.7)

    def test_maximises_j(self) -> None:
        y, p = noisy_scores()
        t = youden_threshold(y, p)
        pred = p >= t
        j = pred[y == 1].mean() + (~pred[y == 0]).mean() - 1
        self.assertAlmostEqual(j, brute_force_youden(y, p), places=12)
        self.assertIn(t, p)

    def test_never_infinite(self) -> None:
        # an uninformative score: J = 0 at every threshold, including sklearn's leading +inf
        t = youden_threshold([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5])
        self.assertEqual(t, 0.5)

    def test_single_class_raises(self) -> None:
        with self.assertRaisesRegex(ValueError, "both classes.*only class 1"):
            youden_threshold([1, 1, 1], [0.2, 0.5, 0.9])


class TestBinaryMetrics(unittest.TestCase):
    def test_against_sklearn(self) -> None:
        y, p = noisy_scores()
        m = binary_metrics(y, p)
        self.assertEqual(set(m), KEYS)
        self.assertEqual(m["threshold"], youden_threshold(y, p))
        self.assertAlmostEqual(m["auroc"], roc_auc_score(y, p), places=12)
        pred = (p >= m["threshold"]).astype(int)
        self.assertAlmostEqual(m["balanced_accuracy"], balanced_accuracy_score(y, pred), places=12)
        self.assertAlmostEqual(m["sensitivity"], pred[y == 1].mean(), places=12)
        self.assertAlmostEqual(m["specificity"], 1 - pred[y == 0].mean(), places=12)
        self.assertEqual((m["n"], m["n_positive"]), (300, int(y.sum())))
        self.assertIsInstance(m["n"], int)
        json.dumps(m)

    def test_given_threshold_is_used(self) -> None:
        y = np.array([0, 0, 0, 1, 1, 1])
        p = np.array([0.1, 0.3, 0.6, 0.4, 0.7, 0.9])
        m = binary_metrics(y, p, threshold=0.5)
        self.assertEqual(m["threshold"], 0.5)
        self.assertAlmostEqual(m["sensitivity"], 2 / 3)
        self.assertAlmostEqual(m["specificity"], 2 / 3)
        # the threshold is inclusive, as in roc_curve
        self.assertAlmostEqual(binary_metrics(y, p, threshold=0.4)["sensitivity"], 1.0)
        self.assertAlmostEqual(binary_metrics(y, p, threshold=0.95)["sensitivity"], 0.0)

    def test_torch_and_column_inputs(self) -> None:
        y, p = noisy_scores(50)
        expected = binary_metrics(y, p, threshold=0.5)
        got = binary_metrics(torch.as_tensor(y).float(), torch.as_tensor(p).reshape(-1, 1), threshold=0.5)
        for key in KEYS:
            self.assertAlmostEqual(got[key], expected[key], places=6)
        self.assertEqual(binary_metrics([False, True], [0.2, 0.8])["auroc"], 1.0)

    def test_single_class(self) -> None:
        positives = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9], threshold=0.5)
        self.assertTrue(math.isnan(positives["auroc"]))
        self.assertTrue(math.isnan(positives["balanced_accuracy"]))
        self.assertTrue(math.isnan(positives["specificity"]))
        self.assertAlmostEqual(positives["sensitivity"], 2 / 3)
        negatives = binary_metrics([0, 0], [0.2, 0.6], threshold=0.5)
        self.assertTrue(math.isnan(negatives["sensitivity"]))
        self.assertEqual(negatives["specificity"], 0.5)
        unfitted = binary_metrics([0, 0], [0.2, 0.6])
        self.assertTrue(all(math.isnan(unfitted[k]) for k in KEYS - {"n", "n_positive"}))
        self.assertEqual((unfitted["n"], unfitted["n_positive"]), (2, 0))

    def test_errors(self) -> None:
        with self.assertRaisesRegex(ValueError, r"\{0, 1\}, found \[2\]"):
            binary_metrics([0, 1, 2], [0.1, 0.2, 0.3])
        with self.assertRaisesRegex(ValueError, r"\{0, 1\}"):
            binary_metrics(["a", "b"], [0.1, 0.2])
        with self.assertRaisesRegex(ValueError, "differ in length: 3 labels vs 2 probabilities"):
            binary_metrics([0, 1, 1], [0.1, 0.2])
        with self.assertRaisesRegex(ValueError, "1 nan/inf"):
            binary_metrics([0, 1], [0.1, float("nan")])
        with self.assertRaisesRegex(ValueError, r"\[0, 1\].*sigmoid"):
            binary_metrics([0, 1], [-2.0, 3.0])
        with self.assertRaisesRegex(ValueError, "empty"):
            binary_metrics([], [])
        with self.assertRaisesRegex(ValueError, r"prob\[:, 1\]"):
            binary_metrics([0, 1], np.full((2, 2), 0.5))
        with self.assertRaisesRegex(ValueError, "threshold must be a finite number"):
            binary_metrics([0, 1], [0.1, 0.9], threshold=float("nan"))


class TestPerCluster(unittest.TestCase):
    def test_matches_subsets(self) -> None:
        y, p = noisy_scores(200)
        cluster = np.random.default_rng(1).integers(-1, 3, 200)
        result = per_cluster_binary_metrics(y, p, cluster, threshold=0.4, cluster_names=["A", "B", "C"])
        self.assertEqual(list(result), ["unseen", "A", "B", "C"])
        for name, index in (("unseen", -1), ("A", 0), ("B", 1), ("C", 2)):
            keep = cluster == index
            self.assertEqual(result[name], binary_metrics(y[keep], p[keep], threshold=0.4))

    def test_shared_youden_threshold_and_raw_ids(self) -> None:
        y, p = noisy_scores(120)
        sites = np.array(["site_b", "site_a", "site_c"])[np.arange(120) % 3]
        result = per_cluster_binary_metrics(y, torch.as_tensor(p), sites.tolist())
        self.assertEqual(list(result), ["site_a", "site_b", "site_c"])
        shared = youden_threshold(y, p)
        self.assertTrue(all(m["threshold"] == shared for m in result.values()))
        self.assertEqual(sum(m["n"] for m in result.values()), 120)

    def test_single_class_cluster_and_errors(self) -> None:
        y = np.array([1, 1, 0, 1])
        p = np.array([0.9, 0.8, 0.2, 0.7])
        result = per_cluster_binary_metrics(y, p, torch.tensor([0, 0, 1, 1]), threshold=0.5)
        self.assertTrue(math.isnan(result["0"]["auroc"]))
        self.assertEqual(result["0"]["sensitivity"], 1.0)
        self.assertEqual(result["1"]["auroc"], 1.0)
        with self.assertRaisesRegex(ValueError, "3 clusters vs 4 labels"):
            per_cluster_binary_metrics(y, p, [0, 0, 1], threshold=0.5)
        with self.assertRaisesRegex(ValueError, "index 1 has no name"):
            per_cluster_binary_metrics(y, p, [0, 0, 1, 1], threshold=0.5, cluster_names=["A"])
        with self.assertRaisesRegex(ValueError, "threshold must be a finite number"):
            per_cluster_binary_metrics(y, p, [0, 0, 1, 1], threshold=float("nan"))
        single = per_cluster_binary_metrics([1, 1, 1], [0.2, 0.6, 0.9], ["A", "B", "B"])
        self.assertTrue(math.isnan(single["B"]["threshold"]) and math.isnan(single["B"]["sensitivity"]))
        self.assertEqual(single["B"]["n_positive"], 2)


class TestMeanCI95(unittest.TestCase):
    def test_t_interval(self) -> None:
        values = [0.91, 0.93, 0.92, 0.95, 0.90]
        mean, (low, high) = mean_ci95(values)
        expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        self.assertAlmostEqual(mean, np.mean(values), places=12)
        self.assertAlmostEqual(low, expected[0], places=12)
        self.assertAlmostEqual(high, expected[1], places=12)

    def test_normal_interval_as_in_the_paper(self) -> None:
        values = np.array([0.8, 0.9, 0.85, 0.95])
        mean, (low, high) = mean_ci95(torch.as_tensor(values), method="normal")
        half = 1.96 * values.std(ddof=1) / 2
        self.assertAlmostEqual(high - mean, half, places=12)
        self.assertAlmostEqual(mean - low, half, places=12)
        self.assertGreater(mean_ci95(values)[1][1], high)  # t(0.975, 3) > 1.96

    def test_edge_cases(self) -> None:
        self.assertEqual(mean_ci95([0.7]), (0.7, None))
        with self.assertRaisesRegex(ValueError, "at least one value"):
            mean_ci95([])
        with self.assertRaisesRegex(ValueError, "finite"):
            mean_ci95([0.5, float("nan")])
        with self.assertRaisesRegex(ValueError, "'t' or 'normal'"):
            mean_ci95([0.5, 0.6], method="bootstrap")


if __name__ == "__main__":
    unittest.main()


def test_youden_ties_within_rounding_take_the_highest_threshold():
    # J = 0.4 at both 0.5 and 0.3 in exact arithmetic; in floating point they differ by ~1e-17
    y, p = [1, 1, 1, 0, 0, 0, 0, 0, 1, 1], [0.3, 0.4, 0.8, 0.3, 0.2, 0.4, 0.8, 0.0, 0.5, 0.7]
    assert youden_threshold(y, p) == 0.5


def test_classification_summary_of_two_softmax_channels_and_an_index_beyond_the_clusters():
    logits, y = torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 0, 1, 1, 0, 1, 0])
    summary = classification_summary(logits, y)
    assert summary["auroc"] == roc_auc_score(y.numpy(), torch.softmax(logits, 1)[:, 1].numpy())
    with pytest.raises(ValueError, match="cluster index 3 is out of range for 2 clusters"):
        classification_summary(logits[:6], y[:6], torch.tensor([0, 0, 1, 1, 2, 3]), n_clusters=2)
