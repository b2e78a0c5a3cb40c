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
import unittest
from unittest import mock

import numpy as np
import torch
from matplotlib.figure import Figure

from monai_armed.networks import MixedEffectsMLP, random_effects_summary
from monai_armed.networks.layers.random_effects import RandomEffects
from monai_armed.visualize import (
    write_tabular_figures,
    cluster_intercepts,
    plot_intercept_vs_patient_fraction,
    plot_random_scale_spread,
    positive_fraction,
    save_figure,
)
from tests.test_figures import PNG_MAGIC, FigureTestCase, TitleRecorder


class TestSiteFigures(FigureTestCase):

    def test_intercept_vs_patient_fraction(self) -> None:
        intercepts = {"site_c": 0.5, "site_a": -0.4, "site_b": 0.1, "site_d": 0.0}
        fraction = {"site_a": 0.2, "site_b": 0.5, "site_c": 0.7, "site_d": 0.45, "unseen_site": 0.9}
        path = os.path.join(self.tmp, "eval", "intercepts.png")
        with TitleRecorder() as recorder:
            self.assertEqual(plot_intercept_vs_patient_fraction(intercepts, fraction, path), path)
        self.assert_png(path)
        sites = list(intercepts)
        r = np.corrcoef([intercepts[s] for s in sites], [fraction[s] for s in sites])[0, 1]
        self.assertEqual(recorder.titles, [f"Site random intercept vs patient fraction (r = {r:.3f})"])

    def test_intercept_errors(self) -> None:
        path = os.path.join(self.tmp, "x.png")
        with self.assertRaisesRegex(ValueError, r"without a patient fraction: \['C'\]"):
            plot_intercept_vs_patient_fraction({"A": 0.1, "B": 0.2, "C": 0.3}, {"A": 0.1, "B": 0.5}, path)
        with self.assertRaisesRegex(ValueError, "at least 3 sites"):
            plot_intercept_vs_patient_fraction({"A": 0.1, "B": 0.2}, {"A": 0.1, "B": 0.5}, path)
        with self.assertRaisesRegex(ValueError, "finite"):
            plot_intercept_vs_patient_fraction({"A": 0.1, "B": np.nan, "C": 0.0}, {"A": 0.1, "B": 0.5, "C": 0.2}, path)
        self.assertFalse(os.path.exists(path))

    def test_cluster_intercepts_and_positive_fraction(self) -> None:
        net = torch.nn.Module()
        net.intercept = RandomEffects(3, 1)
        with torch.no_grad():
            net.intercept.loc.copy_(torch.tensor([[0.5], [-0.25], [0.125]]))
        summary = random_effects_summary(net, cluster_names=["A", "B", "C"])
        self.assertEqual(cluster_intercepts(summary, "intercept"), {"A": 0.5, "B": -0.25, "C": 0.125})
        with self.assertRaisesRegex(KeyError, r"no group 'bias'.*\['intercept'\]"):
            cluster_intercepts(summary, "bias")
        with self.assertRaisesRegex(ValueError, "unit 1 is out of range"):
            cluster_intercepts(summary, "intercept", unit=1)

        fraction = positive_fraction([1, 0, 1, 1, 0], ["B", "B", "A", "A", "C"])
        self.assertEqual(fraction, {"A": 1.0, "B": 0.5, "C": 0.0})
        by_index = positive_fraction(torch.tensor([1, 0, 1, 1]), torch.tensor([1, 1, 0, -1]), cluster_names=["A", "B"])
        self.assertEqual(by_index, {"A": 1.0, "B": 0.5})
        with self.assertRaisesRegex(ValueError, "differ in length"):
            positive_fraction([1, 0], ["A"])
        with self.assertRaisesRegex(ValueError, r"0 or 1, found \[2.0\]"):
            positive_fraction([1, 2], ["A", "B"])
        with self.assertRaisesRegex(ValueError, "index 2 has no name"):
            positive_fraction([1, 0], [0, 2], cluster_names=["A", "B"])

    def test_several_factors_mismatched_rows_and_float_indices(self) -> None:
        two = {"clusters": {"site": ["A", "B", "C"], "scanner": ["s1", "s2"]},
               "groups": {"intercept": {"posterior_mean": [[1.0], [2.0], [3.0]]}}}  # fmt: skip
        self.assertEqual(cluster_intercepts(two, factor="site"), {"A": 1.0, "B": 2.0, "C": 3.0})
        with self.assertRaisesRegex(ValueError, r"grouping factors \['site', 'scanner'\]: pass factor="):
            cluster_intercepts(two)
        short = {"clusters": ["A", "B"], "groups": {"intercept": {"posterior_mean": [[1.0], [2.0], [3.0]]}}}
        with self.assertRaisesRegex(ValueError, "3 rows but the summary names 2 clusters"):
            cluster_intercepts(short)
        floats = positive_fraction([1, 0, 1, 1, 0, 1], torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, -1.0]), ["A", "B"])
        self.assertEqual(floats, {"A": 0.5, "B": 1.0})

    def test_random_scale_spread(self) -> None:
        path = os.path.join(self.tmp, "spread", "scales.png")
        self.assertEqual(plot_random_scale_spread(torch.tensor([0.1, 0.4, 0.2]), path, ["x", "y", "z"]), path)
        self.assert_png(path)
        with mock.patch("matplotlib.axes.Axes.bar", autospec=True) as bar:
            plot_random_scale_spread(np.array([0.1, 0.4, 0.2]), path)
        heights = bar.call_args.args[2]
        np.testing.assert_array_equal(heights, [0.4, 0.2, 0.1])
        self.assert_png(plot_random_scale_spread(np.random.default_rng(0).random(300), path))
        with self.assertRaisesRegex(ValueError, "finite"):
            plot_random_scale_spread([0.1, np.inf], path)
        with self.assertRaisesRegex(ValueError, "non-empty"):
            plot_random_scale_spread([], path)

    def test_save_figure_keeps_old_file_on_failure(self) -> None:
        path = os.path.join(self.tmp, "keep.png")
        fig = Figure()
        fig.subplots().plot([0, 1], [0, 1])
        save_figure(fig, path)
        with open(path, "rb") as f:
            original = f.read()

        def write_half_then_fail(target: str, **kwargs: object) -> None:
            with open(target, "wb") as f:
                f.write(PNG_MAGIC)
            raise RuntimeError("disk full")

        broken = Figure()
        with mock.patch.object(broken, "savefig", side_effect=write_half_then_fail):
            with self.assertRaisesRegex(RuntimeError, "disk full"):
                save_figure(broken, path)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), original)
        self.assertEqual(os.listdir(self.tmp), ["keep.png"])


if __name__ == "__main__":
    unittest.main()


def test_tabular_intercept_figure_leaves_out_unseen_rows_and_empty_clusters(tmp_path):
    torch.manual_seed(0)
    net = MixedEffectsMLP(2, 1, n_clusters=5)
    rng = np.random.RandomState(0)
    clusters = [0, 1, 2, 3, -1] * 8  # cluster 4 has no rows; -1 rows are unseen
    datalist = [{"features": rng.randn(2), "label": int(rng.rand() > 0.5), "cluster": c} for c in clusters]
    with mock.patch("monai_armed.visualize.reports.plot_intercepts_vs_balance", return_value="p.png") as plot:
        paths = write_tabular_figures(net, datalist, tmp_path, cluster_names=["a", "b", "c", "d", "e"])
    intercepts, balance, _, names = plot.call_args.args
    assert names == ["a", "b", "c", "d"] and len(intercepts) == len(balance) == 4
    labels = np.array([d["label"] for d in datalist])
    expected = [labels[np.array(clusters) == c].mean() for c in range(4)]
    np.testing.assert_allclose(balance, expected)
    assert paths["intercepts_vs_balance"] == "p.png"
