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
"""Tests of the latent and reconstruction batch-effect metrics (reference §5.7-5.8)."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from scipy import ndimage
from scipy.stats import f_oneway

from monai_armed.metrics import (
    anova_f_by_cluster,
    image_quality_metrics,
    latent_cluster_scores,
    reconstruction_mse,
)


def clustered_latents(seed: int = 0, n_per: int = 40, n_clusters: int = 4, dims: int = 6) -> tuple[np.ndarray, ...]:
    """Latents whose batch shifts the first ``n_clusters`` dimensions by 6 s.d., and their batch labels."""
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(n_clusters), n_per)
    latents = rng.normal(size=(clusters.size, dims))
    latents[np.arange(clusters.size), clusters] += 6.0
    return latents, clusters


def checkerboard(size: int = 32) -> np.ndarray:
    return (np.indices((size, size)).sum(axis=0) % 2).astype(np.float64)


class TestLatentClusterScores(unittest.TestCase):

    def test_separated_clusters_score_as_clustered_and_shuffled_labels_do_not(self) -> None:
        latents, clusters = clustered_latents()
        separated = latent_cluster_scores(latents, clusters)
        shuffled = latent_cluster_scores(latents, np.random.default_rng(1).permutation(clusters))
        self.assertEqual(set(separated), {"davies_bouldin", "calinski_harabasz"})
        self.assertLess(separated["davies_bouldin"], 1.0)
        self.assertGreater(separated["calinski_harabasz"], 50.0)
        self.assertGreater(shuffled["davies_bouldin"], 5 * separated["davies_bouldin"])
        self.assertLess(shuffled["calinski_harabasz"], separated["calinski_harabasz"] / 20)

    def test_standardizing_makes_scores_invariant_to_dimension_scaling(self) -> None:
        latents, clusters = clustered_latents()
        scaled = latents * np.array([1000.0, 0.01, 1.0, 5.0, 1e-3, 20.0]) + 7.0
        for key, value in latent_cluster_scores(latents, clusters).items():
            self.assertAlmostEqual(latent_cluster_scores(scaled, clusters)[key], value, places=6)
        raw = latent_cluster_scores(scaled, clusters, standardize=False)
        self.assertNotAlmostEqual(raw["davies_bouldin"], latent_cluster_scores(latents, clusters)["davies_bouldin"], 2)

    def test_torch_input_string_labels_and_constant_dimension(self) -> None:
        latents, clusters = clustered_latents()
        with_constant = np.concatenate([latents, np.full((latents.shape[0], 1), 3.0)], axis=1)
        names = np.array(["2021-01-0" + str(c) for c in clusters])
        scores = latent_cluster_scores(torch.as_tensor(with_constant, dtype=torch.float32), names)
        expected = latent_cluster_scores(latents, clusters)
        self.assertTrue(all(np.isfinite(v) for v in scores.values()))
        self.assertAlmostEqual(scores["davies_bouldin"], expected["davies_bouldin"], places=4)
        self.assertAlmostEqual(scores["calinski_harabasz"], expected["calinski_harabasz"], delta=1e-3)

    def test_errors(self) -> None:
        latents, clusters = clustered_latents()
        with self.assertRaisesRegex(ValueError, "at least 2 clusters.*got 1"):
            latent_cluster_scores(latents, np.zeros(len(latents), dtype=int))
        with self.assertRaisesRegex(ValueError, "differ in length: 159 labels vs 160 samples"):
            latent_cluster_scores(latents, clusters[:-1])
        bad = latents.copy()
        bad[0, 0], bad[1, 1], bad[2, 2] = np.nan, np.nan, np.inf
        with self.assertRaisesRegex(ValueError, "latents must be finite, found 2 nan and 1 inf"):
            latent_cluster_scores(bad, clusters)
        with self.assertRaisesRegex(ValueError, r"shape \(N, D\)"):
            latent_cluster_scores(latents[:, 0], clusters)
        with self.assertRaisesRegex(ValueError, "fewer clusters than samples"):
            latent_cluster_scores(latents[:4], np.arange(4))


class TestImageQualityMetrics(unittest.TestCase):

    def test_known_images(self) -> None:
        board = checkerboard()
        images = np.stack([np.full((32, 32), 0.25), board, ndimage.uniform_filter(board, size=3)])
        metrics = image_quality_metrics(images[:, None])
        self.assertEqual(set(metrics), {"brightness", "contrast", "sharpness", "snr"})
        for values in metrics.values():
            self.assertEqual(values.shape, (3,))
        np.testing.assert_allclose(metrics["brightness"][:2], [0.25, 0.5])
        np.testing.assert_allclose(metrics["contrast"][:2], [0.0, 0.5])
        self.assertEqual(metrics["sharpness"][0], 0.0)
        self.assertTrue(np.isnan(metrics["snr"][0]))
        self.assertAlmostEqual(metrics["snr"][1], 1.0)
        self.assertGreater(metrics["sharpness"][1], 10 * metrics["sharpness"][2])
        # a checkerboard's 5-point Laplacian is +-4 everywhere (mirrored borders keep the pattern): variance 16
        self.assertAlmostEqual(metrics["sharpness"][1], 16.0)

    def test_images_are_independent_and_shapes_accepted(self) -> None:
        rng = np.random.default_rng(0)
        images = rng.random((3, 16, 16))
        together = image_quality_metrics(torch.as_tensor(images))
        for i in range(3):
            alone = image_quality_metrics(images[i : i + 1])
            for key in together:
                self.assertAlmostEqual(together[key][i], alone[key][0])
        volumes = image_quality_metrics(rng.random((2, 1, 8, 8, 8)))
        self.assertEqual(volumes["sharpness"].shape, (2,))

    def test_bad_shape(self) -> None:
        with self.assertRaisesRegex(ValueError, r"one channel\), got \(2, 3, 8, 8\)"):
            image_quality_metrics(np.zeros((2, 3, 8, 8)))
        with self.assertRaisesRegex(ValueError, "images is empty"):
            image_quality_metrics(np.zeros((0, 8, 8)))


class TestAnovaF(unittest.TestCase):

    def test_shifted_groups_large_identical_groups_small(self) -> None:
        rng = np.random.default_rng(0)
        clusters = np.repeat([0, 1, 2], 50)
        same = rng.normal(size=150)
        shifted = same + 3.0 * clusters
        result = anova_f_by_cluster({"same": same, "shifted": shifted}, clusters)
        self.assertLess(result["same"], 5.0)
        self.assertGreater(result["shifted"], 100.0)
        expected = f_oneway(shifted[:50], shifted[50:100], shifted[100:]).statistic
        self.assertAlmostEqual(result["shifted"], float(expected))

    def test_single_array_small_batches_and_non_finite_values_left_out(self) -> None:
        values = np.array([1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 100.0, np.nan])
        clusters = np.array(["a", "a", "a", "b", "b", "b", "c", "b"])
        result = anova_f_by_cluster(torch.as_tensor(values), clusters)
        self.assertEqual(list(result), ["value"])
        self.assertAlmostEqual(result["value"], float(f_oneway([1.0, 2.0, 3.0], [5.0, 6.0, 7.0]).statistic))

    def test_degenerate_cases(self) -> None:
        self.assertTrue(np.isnan(anova_f_by_cluster([1.0, 2.0, 3.0], [0, 0, 1])["value"]))
        self.assertTrue(np.isnan(anova_f_by_cluster([1.0, 1.0, 1.0, 1.0], [0, 0, 1, 1])["value"]))
        self.assertTrue(np.isinf(anova_f_by_cluster([1.0, 1.0, 2.0, 2.0], [0, 0, 1, 1])["value"]))

    def test_errors(self) -> None:
        with self.assertRaisesRegex(ValueError, r"values\['snr'\] differ in length: 3 labels vs 2"):
            anova_f_by_cluster({"snr": [1.0, 2.0]}, [0, 1, 1])
        with self.assertRaisesRegex(ValueError, r"values\['snr'\] must be a 1-D array"):
            anova_f_by_cluster({"snr": np.zeros((2, 2))}, [0, 1])
        with self.assertRaisesRegex(ValueError, "min_samples must be at least 2"):
            anova_f_by_cluster([1.0, 2.0], [0, 1], min_samples=1)


class TestReconstructionMSE(unittest.TestCase):

    def test_values(self) -> None:
        images = torch.zeros(3, 1, 4, 4)
        recon = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 1.0, 2.0)])
        np.testing.assert_allclose(reconstruction_mse(images, recon), [0.0, 1.0, 4.0])
        self.assertAlmostEqual(reconstruction_mse(images, recon, reduction="mean"), 5.0 / 3.0)
        self.assertAlmostEqual(
            reconstruction_mse(images, recon, reduction="mean"), float(torch.nn.functional.mse_loss(recon, images))
        )

    def test_errors(self) -> None:
        with self.assertRaisesRegex(ValueError, r"differ in shape: \(2, 4\) vs \(2, 5\)"):
            reconstruction_mse(np.zeros((2, 4)), np.zeros((2, 5)))
        with self.assertRaisesRegex(ValueError, "reduction must be 'none' or 'mean', got 'sum'"):
            reconstruction_mse(np.zeros((2, 4)), np.zeros((2, 4)), reduction="sum")


if __name__ == "__main__":
    unittest.main()
