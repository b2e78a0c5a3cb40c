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
"""ARMED on MONAI's segmentation networks, transformers and heads followed by parameter-free operations."""

from __future__ import annotations

import math
import unittest

import numpy
import pytest

import torch
import torch.nn as nn
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.networks.nets import (
    UNETR,
    AttentionUnet,
    BasicUNet,
    Classifier,
    DynUNet,
    HighResNet,
    Regressor,
    SegResNet,
    SwinUNETR,
    UNet,
    ViT,
)
from parameterized import parameterized

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDEvaluator, ARMEDTrainer
from monai_armed.handlers import ClusterModeReport
from monai_armed.inferers import cluster_inference
from monai_armed.metrics import per_image_segmentation_scores, segmentation_summary
from monai_armed.losses import GaussianLikelihood
from monai_armed.networks import ARMED, ClusterAdversary, ClusterScaleBias

C = 3  # clusters
CLASSES = 3


def _network(name: str, dims: int = 2) -> tuple[nn.Module, tuple[int, ...]]:
    """A small MONAI network and the spatial shape of its inputs."""
    network, size = _sized_network(name, dims)
    if name == "swinunetr" and dims == 3:  # divisible by 32, with more than one voxel at the bottleneck
        return network, (32, 32, 64)
    return network, (size,) * dims


def _sized_network(name: str, dims: int) -> tuple[nn.Module, int]:
    if name == "unet":
        return UNet(dims, 1, CLASSES, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), 16
    if name == "basicunet":
        return BasicUNet(dims, 1, CLASSES, features=(4, 4, 8, 8, 16, 4)), 32
    if name == "segresnet":
        return SegResNet(dims, init_filters=8, in_channels=1, out_channels=CLASSES, blocks_down=(1, 1, 1), blocks_up=(1, 1)), 16
    if name == "dynunet":
        return DynUNet(dims, 1, CLASSES, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2],
                       filters=[4, 8, 16]), 16  # fmt: skip
    if name == "attentionunet":
        return AttentionUnet(dims, 1, CLASSES, channels=(4, 8, 16), strides=(2, 2)), 16
    if name == "unetr":
        return UNETR(1, CLASSES, img_size=32, feature_size=4, hidden_size=24, mlp_dim=48, num_heads=2,
                     spatial_dims=dims), 32  # fmt: skip
    if name == "swinunetr":
        return SwinUNETR(1, CLASSES, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                         spatial_dims=dims), 64  # fmt: skip
    if name == "vit":
        return ViT(1, 16, 8, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2, classification=True,
                   num_classes=CLASSES, spatial_dims=dims), 16  # fmt: skip
    if name == "classifier":
        return Classifier((1,) + (16,) * dims, CLASSES, (4, 8), (2, 2)), 16
    return Regressor((1,) + (16,) * dims, (1,), (4, 8), (2, 2)), 16


SEGMENTATION = ["unet", "basicunet", "segresnet", "dynunet", "attentionunet", "unetr", "swinunetr"]
HEADS = {
    "unet": "model.2.1.conv.unit0.conv",
    "basicunet": "final_conv",
    "segresnet": "conv_final.2.conv",
    "dynunet": "output_block.conv.conv",
    "attentionunet": "model.2.conv",
    "unetr": "out.conv.conv",
    "swinunetr": "out.conv.conv",
    "vit": "classification_head.0",
    "classifier": "final.1",
    "regressor": "final.1",
}


def _wrap(name: str, dims: int = 2, **kwargs) -> tuple[ARMED, tuple[int, ...]]:
    torch.manual_seed(0)
    network, shape = _network(name, dims)
    return ARMED(network, C, in_shape=(1, *shape), post_loc_init_scale=0.5, **kwargs), shape


def _data(name: str, n: int, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(n, 1, *shape, generator=g)
    if name in SEGMENTATION:
        label = (image > 0.5).long() + (image > 1.0).long()  # (n, 1, *spatial) classes 0..2
    elif name == "regressor":
        label = image.flatten(1).mean(1, keepdim=True)
    else:
        label = torch.randint(0, CLASSES, (n,), generator=g)
    return {"image": image, "label": label, "cluster": torch.arange(n) % C}


def _loss(name: str) -> nn.Module:
    if name in SEGMENTATION:
        return DiceCELoss(to_onehot_y=True, softmax=True)
    if name == "regressor":
        return GaussianLikelihood()
    return nn.CrossEntropyLoss()


def _train(net: ARMED, name: str, data: dict, batch: int = 2, epochs: int = 1, **kwargs) -> ARMEDTrainer:
    adversary = ClusterAdversary(net.feature_channels, C, hidden_channels=(8,))
    trainer = ARMEDTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=TensorBatchLoader(data, batch_size=batch),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
        loss_function=_loss(name),
        adversary=adversary,
        adv_weight=0.1,
        decollate=False,
        **kwargs,
    )
    trainer.run()
    return trainer


class TestDenseAndTransformerWrapping(unittest.TestCase):
    @parameterized.expand([(n,) for n in HEADS])
    def test_wrap_forward_and_two_iterations(self, name):
        net, shape = _wrap(name)
        self.assertEqual(net.head_name, HEADS[name])
        data = _data(name, 4, shape)
        x, cluster = data["image"], data["cluster"]
        net.eval()
        with torch.no_grad():
            reference = net.network(x)
            plain = net(x)
            out = net.forward_armed(x, cluster)
            unseen = net.forward_armed(x, torch.full((4,), -1))
            mixed = net.prediction(net(x, cluster))
        # forward(x) is network(x) itself, tuple outputs included
        if isinstance(reference, tuple):
            torch.testing.assert_close(plain[0], reference[0], rtol=0, atol=0)
        else:
            torch.testing.assert_close(plain, reference, rtol=0, atol=0)
        torch.testing.assert_close(out.pred_fe, net.prediction(reference))
        torch.testing.assert_close(mixed, out.pred)
        torch.testing.assert_close(unseen.pred, unseen.pred_fe)
        self.assertFalse(torch.allclose(out.pred, out.pred_fe))
        self.assertEqual(tuple(out.pred.shape), tuple(net.prediction(reference).shape))
        self.assertEqual([f.shape[0] for f in out.features], [4] * len(net.tapped_layers))
        net.train()
        trainer = _train(net, name, data)
        self.assertEqual(trainer.state.iteration, 2)
        for key in ("loss", "loss_me", "loss_fe", "loss_adv", "loss_kl"):
            self.assertTrue(math.isfinite(float(trainer.state.output[key])), key)
        for module in (net.random_slope, net.random_intercept):
            self.assertGreater(float(module.loc.grad.abs().sum()), 0.0)

    def test_segmentation_random_effects_are_per_channel_and_uniform_over_space(self):
        net, shape = _wrap("basicunet")
        net.eval()
        x, cluster = _data("basicunet", 3, shape)["image"], torch.tensor([0, 1, -1])
        with torch.no_grad():
            out = net.forward_armed(x, cluster)
            h = {}
            handle = net.network.final_conv.register_forward_pre_hook(lambda m, a: h.setdefault("h", a[0]))
            net.network(x)
            handle.remove()
            scale = 1 + net.random_slope(cluster).reshape(3, -1, 1, 1)
            expected = net.network.final_conv(h["h"] * scale) + net.random_intercept(cluster).reshape(3, -1, 1, 1)
        torch.testing.assert_close(out.pred, expected)
        self.assertEqual((net.random_slope.units, net.random_intercept.units), (4, CLASSES))
        self.assertIn("head: final_conv (Conv2d 4 -> 3)", net.report())

    def test_vit_tokens_are_averaged_for_the_adversary(self):
        net, shape = _wrap("vit")
        self.assertEqual(net.tapped_layers, ["blocks.0", "blocks.1", "classification_head.0:input"])
        self.assertEqual(net.feature_widths, [24, 24, 24])
        self.assertIn("blocks.0: 24 (tokens, averaged)", net.report())
        self.assertIn("prediction: item 0 of the network's output (a tuple / list)", net.report())
        out = net.forward_armed(torch.randn(2, 1, *shape), torch.tensor([0, 1]))
        self.assertEqual([tuple(f.shape) for f in out.features], [(2, 24)] * 3)

    def test_swapped_norms_in_a_segmentation_network(self):
        net, shape = _wrap("unet", swap_norm=True)
        self.assertGreater(len(net.swapped_norms), 3)
        self.assertIn("doubled batch", net.report())
        trainer = _train(net, "unet", _data("unet", 4, shape))
        self.assertTrue(math.isfinite(float(trainer.state.output["loss"])))

    def test_refusals(self):
        with self.assertRaisesRegex(ValueError, r"DynUNet\(deep_supervision=True\) .* deep_supervision=False"):
            ARMED(DynUNet(2, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], deep_supervision=True), C)
        with self.assertRaisesRegex(
            ValueError, r"HighResNet calls layers with parameters after its head 'blocks.11.conv' .*'blocks.11.adn.N'"
        ):
            ARMED(HighResNet(2, 1, 2), C, in_shape=(1, 16, 16))
        net, _ = _wrap("basicunet")
        with self.assertRaisesRegex(
            ValueError, r"BasicUNet takes \(batch, channels, 2 spatial dims\) .* got \(1, 1, 16, 16, 16\): a 3-d input"
        ):
            net(torch.zeros(1, 1, 16, 16, 16), torch.tensor([0]))
        with self.assertRaisesRegex(ValueError, r"BasicUNet takes \(batch, channels, 2 spatial dims\) .* a 3-d input"):
            net(torch.zeros(1, 1, 16, 16, 16))  # the fixed-effects call (no cluster) checks it too
        net3d, _ = _wrap("segresnet", dims=3)
        with self.assertRaisesRegex(ValueError, r"takes \(batch, channels, 3 spatial dims\) .* a 2-d input"):
            net3d.forward_armed(torch.zeros(1, 1, 16, 16), torch.tensor([0]))
        with self.assertRaisesRegex(ValueError, r"SegResNet takes \(batch, channels, 3 spatial dims\) .* a 2-d input"):
            net3d(torch.zeros(1, 1, 16, 16))

    def test_swap_norm_skips_built_in_cluster_norms_and_refusals_leave_the_network(self):
        network, shape = _network("unet")
        with self.assertRaises(TypeError):
            ARMED(network, C, in_shape=(1, *shape), swap_norm=True, re_kwargs={"no_such_argument": 1})
        self.assertFalse(any(isinstance(m, ClusterScaleBias) for m in network.modules()), "nothing was swapped")
        net = ARMED(network, C, in_shape=(1, *shape), swap_norm=True)
        with self.assertRaisesRegex(ValueError, "has no BatchNorm/InstanceNorm layer outside its ClusterScaleBias layers"):
            ARMED(net.network, C, in_shape=(1, *shape), swap_norm=True)  # the norms inside them are not swapped again
        with self.assertRaisesRegex(ValueError, "is the norm inside a ClusterScaleBias"):
            ARMED(net.network, C, in_shape=(1, *shape), swap_norm=[net.swapped_norms[0] + ".norm"])

    def test_taps_after_a_split_head_give_fixed_effects_rows(self):
        network = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 2, 1)), nn.Identity())
        net = ARMED(network, C, tap_layers=["0", "2", "3"], post_loc_init_scale=0.5).eval()
        x, cluster = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
        out = net.forward_armed(x, cluster)
        self.assertEqual([f.shape[0] for f in out.features], [5, 5, 5])
        torch.testing.assert_close(out.features[2], network(x))  # the fixed-effects output, not the mixed one

    def test_output_without_a_tensor(self):
        class _Named(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(1, 2, 3)

            def forward(self, x):
                return {"logits": self.conv(x)}

        with self.assertRaisesRegex(
            ValueError, r"_Named returned a dict with keys \['logits'\] .* not a mapping\. .*head="
        ):
            ARMED(_Named(), C)


    def test_several_outputs_need_head(self):
        class _TwoMaps(nn.Module):  # a segmentation map and an auxiliary map from two convolutions
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Conv2d(1, 4, 3, padding=1)
                self.aux = nn.Conv2d(4, 3, 1)
                self.seg = nn.Conv2d(4, 2, 1)

            def forward(self, x):
                h = torch.relu(self.body(x))
                aux = self.aux(h)
                return aux, self.seg(h)

        with self.assertRaisesRegex(
            ValueError,
            r"_TwoMaps returned a tuple \(Tensor \(2, 3, 8, 8\), Tensor \(2, 2, 8, 8\)\) .* items \[0, 1\] each hold a "
            r"row per sample.*item 1 comes from .*'seg'.* as head= .*\['seg', 'aux', 'body'\]",
        ):
            ARMED(_TwoMaps(), C, in_shape=(1, 8, 8))
        with self.assertRaisesRegex(ValueError, r"calls layers with parameters after its head 'aux'"):
            ARMED(_TwoMaps(), C, in_shape=(1, 8, 8), head="aux")
        net = ARMED(_TwoMaps(), C, in_shape=(1, 8, 8), head="seg", post_loc_init_scale=0.5)
        out = net.forward_armed(torch.randn(2, 1, 8, 8), torch.tensor([0, 1]))
        self.assertEqual(tuple(out.pred.shape), (2, 2, 8, 8))  # the segmentation map, not the auxiliary one
        self.assertFalse(torch.allclose(out.pred, out.pred_fe))

    def test_default_taps_are_the_encoder_levels(self):
        expected = {
            "basicunet": ["conv_0", "down_1", "down_2", "down_3", "down_4"],
            "segresnet": ["down_layers.0", "down_layers.1", "down_layers.2"],
            "unetr": ["encoder1", "encoder2", "encoder3", "encoder4", "decoder5:input"],
            "dynunet": ["input_block", "downsamples.0", "bottleneck"],
        }
        for name, taps in expected.items():
            net, _ = _wrap(name)
            self.assertEqual(net.tapped_layers, taps + [HEADS[name] + ":input"], name)  # and the head's input


class TestSlidingWindow(unittest.TestCase):
    def test_evaluator_passes_each_sample_its_cluster(self):
        net, _ = _wrap("basicunet")
        net.eval()
        images = torch.randn(2, 1, 40, 24)  # not multiples of the window; one side smaller than it
        cluster = torch.tensor([2, 0])
        inferer = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=3, overlap=0.25)
        with torch.no_grad():
            whole = cluster_inference(inferer, images, net, cluster)
            per_sample = [inferer(images[i : i + 1], lambda w, i=i: net(w, cluster[i].repeat(w.shape[0]))) for i in (0, 1)]
            swapped = cluster_inference(inferer, images, net, cluster.flip(0))
        self.assertEqual(tuple(whole.shape), (2, CLASSES, 40, 24))
        torch.testing.assert_close(whole, torch.cat(per_sample))
        self.assertFalse(torch.allclose(whole, swapped))
        evaluator = ARMEDEvaluator(
            device="cpu",
            val_data_loader=TensorBatchLoader({"image": images, "cluster": cluster}, batch_size=2),
            network=net,
            inferer=inferer,
            decollate=False,
        )
        evaluator.run()
        torch.testing.assert_close(evaluator.state.output["pred"], whole)

    def test_trainer_honours_the_inferer(self):
        net, _ = _wrap("basicunet")
        data = _data("basicunet", 4, (48, 40))
        calls = []
        inferer = SlidingWindowInferer(roi_size=(32, 32), sw_batch_size=4, overlap=0.0)
        original = net.forward_armed

        def counted(x, cluster):
            calls.append((tuple(x.shape), cluster.tolist()))
            return original(x, cluster)

        net.forward_armed = counted
        trainer = _train(net, "basicunet", data, inferer=inferer)
        self.assertEqual(tuple(trainer.state.output["pred"].shape), (2, CLASSES, 48, 40))
        self.assertTrue(all(shape[2:] == (32, 32) for shape, _ in calls))
        self.assertTrue(all(len(set(c)) == 1 for _, c in calls), "the windows of one sample share its cluster")
        self.assertTrue(math.isfinite(float(trainer.state.output["loss"])))
        self.assertGreater(float(net.random_intercept.loc.grad.abs().sum()), 0.0)


def _square(offset: int = 0, size: int = 16) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size, dtype=torch.long)
    mask[..., 4 + offset : 10 + offset, 4:10] = 1
    return mask


class TestSegmentationMetrics(unittest.TestCase):
    def test_dice_and_hd95_per_image(self):
        empty = torch.zeros(1, 1, 16, 16, dtype=torch.long)
        pred = torch.cat([_square(), _square(2), empty, _square()])
        label = torch.cat([_square(), _square(), empty, empty])
        scores = per_image_segmentation_scores(pred, label, num_classes=2)
        # identical; shifted by 2 rows (overlap 4 of 6 rows); both empty; a prediction on an empty mask
        numpy.testing.assert_allclose(scores["dice"], [1.0, 2 * 24 / 72, 1.0, 0.0], rtol=1e-6)
        self.assertEqual(scores["hd95"][:2].tolist(), [0.0, 2.0])
        self.assertTrue(math.isnan(scores["hd95"][2]) and math.isnan(scores["hd95"][3]))
        logits = torch.cat([1 - pred, pred], dim=1).float()  # the same predictions as logits
        torch.testing.assert_close(torch.as_tensor(per_image_segmentation_scores(logits, label)["dice"]),
                                   torch.as_tensor(scores["dice"]))  # fmt: skip
        summary = segmentation_summary(pred, label, torch.tensor([0, 0, 1, -1]), n_clusters=2,
                                       cluster_names=["a", "b"])  # fmt: skip
        self.assertAlmostEqual(summary["dice"], (1 + 2 / 3 + 1 + 0) / 4, places=6)
        self.assertEqual((summary["per_cluster"]["a"]["n"], summary["per_cluster"]["a"]["hd95"]), (2, 1.0))
        self.assertAlmostEqual(summary["per_cluster"]["a"]["dice"], (1 + 2 / 3) / 2, places=6)
        self.assertEqual(summary["per_cluster"]["unseen"]["dice"], 0.0)
        self.assertIsNone(summary["per_cluster"]["b"]["hd95"])
        with self.assertRaisesRegex(ValueError, r"masks \(1, 1, 8, 8\) and predictions \(1, 1, 16, 16\) differ"):
            per_image_segmentation_scores(_square(), torch.zeros(1, 1, 8, 8, dtype=torch.long))

    def test_class_maps_and_absent_classes(self):
        mask = torch.cat([_square(), _square(2)])
        # a float class map (MONAI's AsDiscrete(argmax=True)) is not taken for one-channel logits
        numpy.testing.assert_allclose(per_image_segmentation_scores(mask.float(), mask)["dice"], [1.0, 1.0])
        logits = torch.stack([torch.zeros(2, 16, 16), 2.0 * mask[:, 0].float(), torch.full((2, 16, 16), -1.0)], 1)
        # class 2 is absent from masks and predictions: with num_classes it counts as a correct empty class
        with_absent = per_image_segmentation_scores(logits, mask)["dice"]
        numpy.testing.assert_allclose(with_absent, [1.0, 1.0])
        class_map = logits.argmax(1, keepdim=True)
        numpy.testing.assert_allclose(per_image_segmentation_scores(class_map, mask, num_classes=3)["dice"], with_absent)

    def test_cluster_mode_report_gives_dice_per_cluster_and_mode(self):
        net, shape = _wrap("basicunet")
        data = _data("basicunet", 6, shape)
        loader = TensorBatchLoader(data, batch_size=3)
        evaluator = ARMEDEvaluator(device="cpu", val_data_loader=loader, network=net, task="segmentation",
                                   inferer=SlidingWindowInferer((32, 32), sw_batch_size=2), decollate=False)  # fmt: skip
        report = ClusterModeReport(evaluator, {"seen": loader}, cluster_names=["a", "b", "c"])
        self.assertEqual(report.metrics, "segmentation")
        results = report.run()
        self.assertEqual(sorted(results["seen"]), ["fixed", "observed", "randomized"])
        for mode in ("observed", "fixed"):
            table = results["seen"][mode]
            self.assertEqual(sorted(table["per_cluster"]), ["a", "b", "c"])
            self.assertEqual(table["n"], 6)
            self.assertTrue(0.0 <= table["dice"] <= 1.0)
            dice = [table["per_cluster"][c]["dice"] for c in "abc"]
            self.assertAlmostEqual(table["dice"], sum(dice) / 3)
            hd95 = [table["per_cluster"][c]["hd95"] for c in "abc"]
            self.assertTrue(all(h is None or h >= 0.0 for h in hd95 + [table["hd95"]]), hd95)
            self.assertIsNotNone(table["hd95"])  # the labels hold foreground in every image
        self.assertNotEqual(results["seen"]["observed"]["dice"], results["seen"]["fixed"]["dice"])
        self.assertEqual(report.collector.pred.dtype, torch.uint8)  # class maps, not logits, are kept


class TestThreeDimensional(unittest.TestCase):
    @parameterized.expand([(n,) for n in SEGMENTATION])
    def test_3d_epoch_and_sliding_window(self, name):
        net, shape = _wrap(name, dims=3)
        self.assertEqual(net.spatial_dims, 3)
        data = _data(name, 2, shape)
        trainer = _train(net, name, data, batch=2)
        self.assertTrue(math.isfinite(float(trainer.state.output["loss"])))
        net.eval()
        volume = torch.randn(1, 1, shape[0] + 8, *shape[1:])
        inferer = SlidingWindowInferer(roi_size=shape, sw_batch_size=2, overlap=0.25)
        with torch.no_grad():
            pred = cluster_inference(inferer, volume, net, torch.tensor([1]))
        self.assertEqual(tuple(pred.shape), (1, CLASSES, shape[0] + 8, *shape[1:]))


if __name__ == "__main__":
    unittest.main()


def test_a_one_channel_logit_map_is_not_taken_for_a_class_map():
    logits = torch.tensor([[[[-2.3, 3.1], [0.2, -0.6]]]])
    label = torch.tensor([[[[0, 1], [0, 0]]]])
    with pytest.raises(ValueError, match=r"values from -2.3 to 3.1 that are not class indices.*\(logits > 0\).long\(\)"):
        per_image_segmentation_scores(logits, label)
    numpy.testing.assert_allclose(per_image_segmentation_scores((logits > 0).long(), label, hd95=False)["dice"], [2 / 3])
