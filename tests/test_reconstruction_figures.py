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
"""Tests of the reconstruction-grid and latent-embedding figures."""

from __future__ import annotations

import os
import unittest
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.image import imread

from monai_armed.visualize import save_latent_embedding, save_reconstruction_grid
from tests.test_figures import FigureTestCase, TitleRecorder


def batch_images(n_clusters: int = 3, per_cluster: int = 4, size: int = 16) -> tuple[np.ndarray, ...]:
    """Images whose brightness depends on the batch, FE/ME "reconstructions" and the batch indices."""
    rng = np.random.default_rng(0)
    clusters = np.repeat(np.arange(n_clusters), per_cluster)
    images = rng.random((clusters.size, 1, size, size)) * 0.5 + 0.1 * clusters[:, None, None, None]
    return images, images * 0.9 + 0.05, images * 0.95, clusters


class TestReconstructionGrid(FigureTestCase):

    def test_grid_rows_columns_and_titles(self) -> None:
        images, fe, me, clusters = batch_images()
        target = os.path.join(self.tmp, "eval", "recon.png")
        with TitleRecorder() as recorder:
            path = save_reconstruction_grid(
                torch.as_tensor(images), fe, me, clusters, target, cluster_names=["day1", "day2", "day3"], per_cluster=2
            )
        self.assertEqual(path, Path(target))
        self.assert_png(target)
        self.assertEqual(
            [t for t in recorder.titles if t.endswith("original")], [f"day{i}: original" for i in (1, 1, 2, 2, 3, 3)]
        )
        self.assertEqual(recorder.titles.count("mixed - fixed"), 6)
        full = imread(target)

        one_per = os.path.join(self.tmp, "one_per.png")
        save_reconstruction_grid(images, fe, me, clusters, one_per, per_cluster=1)
        fewer = os.path.join(self.tmp, "fewer.png")
        save_reconstruction_grid(images, fe, me, clusters, fewer, per_cluster=1, max_clusters=2)
        fe_only = os.path.join(self.tmp, "fe_only.png")
        with TitleRecorder() as recorder:
            save_reconstruction_grid(images, fe, None, clusters, fe_only, per_cluster=1)
        self.assertNotIn("mixed - fixed", recorder.titles)
        self.assertEqual(recorder.titles.count("fixed effects"), 3)
        heights = [imread(p).shape[0] for p in (target, one_per, fewer)]
        self.assertTrue(heights[0] > heights[1] > heights[2], heights)
        self.assertGreater(full.shape[1], imread(fe_only).shape[1])

    def test_string_batches_unseen_index_and_volumes(self) -> None:
        images, fe, me, _ = batch_images(n_clusters=2, per_cluster=2)
        with TitleRecorder() as recorder:
            save_reconstruction_grid(images, fe, me, ["b", "a", "b", "a"], os.path.join(self.tmp, "s.png"))
            save_reconstruction_grid(images, fe, me, [-1, -1, 0, 0], os.path.join(self.tmp, "u.png"), ["day1"])
        self.assertEqual(
            [t for t in recorder.titles if "original" in t],
            ["a: original", "b: original"]
            + [
                "unseen: original",
                "day1: original",
            ],
        )
        volumes = np.random.default_rng(0).random((2, 1, 8, 8, 6))
        self.assert_png(
            str(save_reconstruction_grid(volumes, volumes, volumes, [0, 1], os.path.join(self.tmp, "v.png")))
        )

    def test_errors_write_nothing(self) -> None:
        images, fe, me, clusters = batch_images()
        target = os.path.join(self.tmp, "bad.png")
        with self.assertRaisesRegex(
            ValueError, r"recon_me has shape \(12, 1, 8, 8\), expected the shape of images \(12, 1, 16, 16\)"
        ):
            save_reconstruction_grid(images, fe, me[:, :, :8, :8], clusters, target)
        with self.assertRaisesRegex(ValueError, "clusters must be a 1-D array of 12 labels"):
            save_reconstruction_grid(images, fe, me, clusters[:5], target)
        with self.assertRaisesRegex(ValueError, "cluster index 2 has no name: cluster_names holds 2"):
            save_reconstruction_grid(images, fe, me, clusters, target, cluster_names=["a", "b"])
        with self.assertRaisesRegex(ValueError, r"one channel\), got \(12, 3, 16, 16\)"):
            save_reconstruction_grid(np.repeat(images, 3, axis=1), fe, me, clusters, target)
        self.assertEqual(os.listdir(self.tmp), [])

    def test_failed_write_leaves_nothing_behind(self) -> None:
        images, fe, me, clusters = batch_images()
        occupied = os.path.join(self.tmp, "taken.png")
        os.makedirs(occupied)  # replacing a directory with the PNG fails after the temporary file was written
        with self.assertRaises(OSError):
            save_reconstruction_grid(images, fe, me, clusters, occupied)
        self.assertEqual(os.listdir(self.tmp), ["taken.png"])
        self.assertEqual(os.listdir(occupied), [])


class TestLatentEmbedding(FigureTestCase):

    def setUp(self) -> None:
        super().setUp()
        rng = np.random.default_rng(0)
        self.clusters = np.repeat(np.arange(4), 15)
        self.labels = np.tile([0, 1], 30)
        self.latents = {
            "fixed effects": rng.normal(size=(60, 8)) + 3.0 * self.labels[:, None],
            "random effects": torch.as_tensor(rng.normal(size=(60, 5)) + 3.0 * self.clusters[:, None]),
        }

    def test_pca_rows_panels_and_legends(self) -> None:
        target = os.path.join(self.tmp, "latents.png")
        legends: list[list[str]] = []
        original = Axes.legend

        def record_legend(ax: Axes, *args: object, **kwargs: object) -> object:
            legend = original(ax, *args, **kwargs)
            legends.append([text.get_text() for text in legend.get_texts()])
            return legend

        with TitleRecorder() as recorder, mock.patch.object(Axes, "legend", autospec=True, side_effect=record_legend):
            path = save_latent_embedding(
                self.latents,
                self.clusters,
                self.labels,
                target,
                cluster_names=list("ABCD"),
                label_names=["high", "low"],
            )
        self.assertEqual(path, Path(target))
        self.assert_png(target)
        self.assertEqual(
            recorder.titles,
            [
                "fixed effects: coloured by batch",
                "fixed effects: coloured by label",
                "random effects: coloured by batch",
                "random effects: coloured by label",
            ],
        )
        self.assertEqual(legends, [list("ABCD"), ["high", "low"]] * 2)
        legends.clear()
        with mock.patch.object(Axes, "legend", autospec=True, side_effect=record_legend):
            save_latent_embedding(
                self.latents,
                self.clusters,
                torch.as_tensor(self.labels, dtype=torch.float32),
                target,
                label_names=["high", "low"],
            )
        self.assertEqual(legends[1], ["high", "low"])  # float labels (e.g. BCE targets) are still named
        single = os.path.join(self.tmp, "single.png")
        save_latent_embedding({"fixed effects": self.latents["fixed effects"]}, self.clusters, self.labels, single)
        self.assertGreater(imread(target).shape[0], imread(single).shape[0])

    def test_tsne_and_one_dimensional_latent(self) -> None:
        target = os.path.join(self.tmp, "tsne.png")
        save_latent_embedding(
            {"e": self.latents["fixed effects"][:20]}, self.clusters[:20], self.labels[:20], target, method="tsne"
        )
        self.assert_png(target)
        self.assert_png(str(save_latent_embedding({"e": np.arange(60.0)[:, None]}, self.clusters, self.labels, target)))

    def test_errors(self) -> None:
        target = os.path.join(self.tmp, "bad.png")
        with self.assertRaisesRegex(ValueError, r"method must be one of \['pca', 'tsne'\], got 'umap'"):
            save_latent_embedding(self.latents, self.clusters, self.labels, target, method="umap")
        with self.assertRaisesRegex(ValueError, "latents is empty"):
            save_latent_embedding({}, self.clusters, self.labels, target)
        with self.assertRaisesRegex(ValueError, r"latents\['random effects'\] has 59 samples, expected 60"):
            save_latent_embedding(
                {**self.latents, "random effects": np.zeros((59, 2))}, self.clusters, self.labels, target
            )
        with self.assertRaisesRegex(ValueError, r"latents\['e'\] must be finite, found 1 nan/inf"):
            save_latent_embedding({"e": np.r_[np.zeros((59, 2)), [[np.inf, 0]]]}, self.clusters, self.labels, target)
        with self.assertRaisesRegex(ValueError, "labels must be a 1-D array of 60 labels"):
            save_latent_embedding(self.latents, self.clusters, self.labels[:3], target)
        with self.assertRaisesRegex(ValueError, "label index 1 has no name: label_names holds 1"):
            save_latent_embedding(self.latents, self.clusters, self.labels, target, label_names=["high"])
        self.assertEqual(os.listdir(self.tmp), [])


if __name__ == "__main__":
    unittest.main()
