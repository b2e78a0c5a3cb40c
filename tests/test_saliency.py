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

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv

from monai_armed.visualize import fe_me_gradcam, save_gradcam_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIZE = 8


class TinyMixedCNN(nn.Module):
    """Two convolutions, a dense head on the flattened features (so the Grad-CAM gradients vary over space) and
    a cluster-specific slope on the pooled features: ``logit = head(f) + u[cluster] . mean(f)``."""

    def __init__(self, n_clusters: int = 3, spatial_dims: int = 2, re_scale: float = 1.0) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.features = nn.Sequential(conv(1, 4, 3, padding=1), nn.ReLU(), conv(4, 6, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(6 * SIZE**spatial_dims, 1)
        self.slopes = nn.Parameter(torch.randn(n_clusters, 6) * re_scale)

    def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        f = self.features(x)
        logit = self.head(f.flatten(1))
        if cluster is not None:
            seen = (cluster >= 0).unsqueeze(1).float()
            logit = logit + (self.slopes[cluster.clamp(min=0)] * seen * f.flatten(2).mean(2)).sum(1, keepdim=True)
        return logit


def manual_gradcam(net: nn.Module, x: torch.Tensor, cluster: torch.Tensor | None, pool: str) -> torch.Tensor:
    """Grad-CAM written out with autograd: pooled gradients weight the activations, ReLU, upsample, min-max."""
    store = {}
    handle = net.features[3].register_forward_hook(lambda m, i, o: store.update(acti=o))
    with torch.enable_grad():
        logit = net(x, cluster)
        (grad,) = torch.autograd.grad(logit[:, -1].sum(), store["acti"])
    handle.remove()
    weights = grad.flatten(2).mean(2) if pool == "mean" else grad.flatten(2).amax(2)
    cam = F.relu((weights[:, :, None, None] * store["acti"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)
    flat = cam.flatten(1)
    low, high = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
    return ((cam - low) / (high - low)).detach()


class TestFeMeGradCAM(unittest.TestCase):
    def setUp(self) -> None:
        torch.manual_seed(0)
        self.x = torch.rand(4, 1, SIZE, SIZE)
        self.cluster = torch.tensor([0, 1, 2, -1])

    def test_shapes_range_and_difference(self) -> None:
        net = TinyMixedCNN().eval()
        maps = fe_me_gradcam(net, self.x, self.cluster, "features.3")
        self.assertEqual(set(maps), {"fe", "me", "difference"})
        for key in ("fe", "me"):
            self.assertEqual(tuple(maps[key].shape), (4, 1, SIZE, SIZE))
            self.assertAlmostEqual(float(maps[key].amin(dim=(1, 2, 3)).max()), 0.0, places=6)
            self.assertAlmostEqual(float(maps[key].amax(dim=(1, 2, 3)).min()), 1.0, places=6)
        diff = maps["difference"]
        self.assertEqual(tuple(diff.shape), (4, 1, SIZE, SIZE))
        magnitude = diff.flatten(1).abs().amax(1)
        # seen clusters: nonzero random effects change the map; the unseen sample (-1) gets fixed effects only
        torch.testing.assert_close(magnitude[:3], torch.ones(3))
        self.assertEqual(float(magnitude[3]), 0.0)
        raw = maps["me"] - maps["fe"]
        torch.testing.assert_close(diff, raw / raw.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12))

    def test_matches_manual_gradcam(self) -> None:
        net = TinyMixedCNN().eval()
        for pool in ("mean", "max"):
            maps = fe_me_gradcam(net, self.x, self.cluster, "features.3", grad_pool=pool)
            torch.testing.assert_close(maps["fe"], manual_gradcam(net, self.x, None, pool), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                maps["me"], manual_gradcam(net, self.x, self.cluster, pool), atol=1e-5, rtol=1e-4
            )
        mean_maps = fe_me_gradcam(net, self.x, self.cluster, "features.3", grad_pool="mean")
        self.assertGreater(float((maps["fe"] - mean_maps["fe"]).abs().max()), 1e-3)

    def test_zero_random_effects_give_zero_difference(self) -> None:
        net = TinyMixedCNN(re_scale=0.0)
        maps = fe_me_gradcam(net, self.x, self.cluster, "features.3")
        torch.testing.assert_close(maps["me"], maps["fe"])
        self.assertEqual(float(maps["difference"].abs().max()), 0.0)

    def test_network_left_untouched_and_works_without_grad(self) -> None:
        net = TinyMixedCNN().train()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with torch.inference_mode():
            maps = fe_me_gradcam(net, self.x, self.cluster, "features.3")
        self.assertFalse(maps["me"].requires_grad)
        self.assertTrue(net.training)
        self.assertEqual(len(net.features[3]._forward_hooks), 0)
        self.assertEqual(len(net.features[3]._backward_hooks), 0)
        self.assertTrue(all(p.grad is None for p in net.parameters()))
        for key, value in net.state_dict().items():
            torch.testing.assert_close(value, before[key])

    def test_soft_membership_and_two_logit_head(self) -> None:
        class TwoLogits(TinyMixedCNN):
            def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
                if cluster is not None and cluster.is_floating_point():
                    cluster = cluster.argmax(1)
                logit = super().forward(x, cluster)
                return torch.cat([-logit, logit], dim=1)

        net = TwoLogits()
        soft = F.one_hot(self.cluster.clamp(min=0), 3).float()
        maps = fe_me_gradcam(net, self.x, soft, "features.3")
        # class_idx=-1 explains the positive logit, so the maps equal those of the one-logit parent network
        reference = fe_me_gradcam(net, self.x, self.cluster.clamp(min=0), "features.3")
        torch.testing.assert_close(maps["me"], reference["me"])
        torch.testing.assert_close(maps["fe"], manual_gradcam(net, self.x, None, "mean"), atol=1e-5, rtol=1e-4)

    def test_3d(self) -> None:
        net = TinyMixedCNN(spatial_dims=3)
        x = torch.rand(2, 1, SIZE, SIZE, SIZE)
        maps = fe_me_gradcam(net, x, torch.tensor([0, 2]), "features.3")
        for key in ("fe", "me", "difference"):
            self.assertEqual(tuple(maps[key].shape), (2, 1, SIZE, SIZE, SIZE))
        self.assertEqual(float(maps["fe"].max()), 1.0)
        self.assertGreater(float(maps["difference"].abs().max()), 0.5)
        with tempfile.TemporaryDirectory() as tmp:
            path = save_gradcam_figure(x, maps, os.path.join(tmp, "cam3d.png"), slice_index=2)
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), PNG_MAGIC)
            with self.assertRaisesRegex(ValueError, "slice_index 9 is out of range"):
                save_gradcam_figure(x, maps, os.path.join(tmp, "bad.png"), slice_index=9)

    def test_errors(self) -> None:
        net = TinyMixedCNN()
        with self.assertRaisesRegex(ValueError, "target_layer 'features.9' is not a submodule.*features.3"):
            fe_me_gradcam(net, self.x, self.cluster, "features.9")
        with self.assertRaisesRegex(ValueError, "cluster must be a tensor of shape.*B = 4"):
            fe_me_gradcam(net, self.x, self.cluster[:2], "features.3")
        with self.assertRaisesRegex(ValueError, "x must be a \\(B, C, \\*spatial\\) tensor"):
            fe_me_gradcam(net, self.x[0, 0], self.cluster, "features.3")
        with self.assertRaisesRegex(ValueError, "grad_pool must be 'mean' or 'max'"):
            fe_me_gradcam(net, self.x, self.cluster, "features.3", grad_pool="sum")


class TestGradCAMFigure(unittest.TestCase):
    def test_writes_png_atomically(self) -> None:
        torch.manual_seed(0)
        x = torch.rand(3, 1, SIZE, SIZE)
        maps = fe_me_gradcam(TinyMixedCNN(), x, torch.tensor([0, 1, 2]), "features.3")
        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, "nested", "gradcam.png")
            path = save_gradcam_figure(x, maps, target, title="t", max_samples=2, sample_names=["a", "b"])
            self.assertEqual(path, target)
            with open(path, "rb") as f:
                self.assertEqual(f.read(8), PNG_MAGIC)
            self.assertEqual(os.listdir(os.path.dirname(target)), ["gradcam.png"])
            with self.assertRaisesRegex(ValueError, r"lacks \['difference'\]"):
                save_gradcam_figure(x, {"fe": maps["fe"], "me": maps["me"]}, target)
            with self.assertRaisesRegex(ValueError, r"maps\['fe'\] has shape \(2, 1, 8, 8\), expected \(3, 1, 8, 8\)"):
                save_gradcam_figure(x, {**maps, "fe": maps["fe"][:2]}, target)
            with self.assertRaisesRegex(ValueError, "image must be"):
                save_gradcam_figure(x[0], maps, target)


if __name__ == "__main__":
    unittest.main()
