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

import copy
import math
import os
import tempfile
import unittest
import warnings

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import (
    DenseNet,
    DenseNet121,
    EfficientNetBN,
    SEResNet50,
    UNet,
    resnet18,
)
from monai.inferers import SlidingWindowInferer
from parameterized import parameterized

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import ARMEDTrainer, PrepareBatchCluster
from monai_armed.inferers import armed_inference
from monai_armed.losses import GaussianLikelihood
from monai_armed.networks import (
    ARMED,
    ARMED_VARIANTS,
    ClusterAdversary,
    ClusterScaleBias,
    load_network_checkpoint,
    random_effects_summary,
    total_kl_divergence,
)

C = 3  # clusters


def _monai(name: str, dims: int) -> nn.Module:
    if name == "densenet121":
        return DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2)
    if name == "resnet18":
        return resnet18(spatial_dims=dims, n_input_channels=1, num_classes=2)
    if name == "seresnet50":
        return SEResNet50(spatial_dims=dims, in_channels=1, num_classes=2, layers=(1, 1, 1, 1))
    return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=dims, in_channels=1, num_classes=2)


class _Small(nn.Module):
    """conv -> pool -> dense(16) + ReLU -> dense(3): a fast network with a BatchNorm and a known head."""

    def __init__(self, post: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(self.hidden(self.pool(torch.relu(self.bn(self.conv(x))))))
        return self.post(out) if self.post is not None else out


class _Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class _FirstOfPair(nn.Module):
    """Returns its input itself through a layer that returns a tuple (so the head's output stays the network's)."""

    def __init__(self) -> None:
        super().__init__()
        self.pair = _Pair()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pair(x)[0]


def _small(seed: int = 0, **kwargs) -> ARMED:
    torch.manual_seed(seed)
    net = ARMED(_Small(), n_clusters=C, post_loc_init_scale=0.5, **kwargs)
    return net


def _x(batch: int = 4, size: tuple = (8, 8), seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, *size, generator=torch.Generator().manual_seed(seed))


class TestMonaiNetworks(unittest.TestCase):
    @parameterized.expand(
        [
            ("densenet121", 2, 32, ["features.transition1", "features.transition2", "features.transition3"]),
            ("resnet18", 2, 32, ["layer1", "layer2", "layer3"]),
            ("seresnet50", 2, 32, ["layer1", "layer2", "layer3"]),
            ("efficientnet", 2, 32, [f"_blocks.{i}" for i in range(7)]),
            ("densenet121", 3, 32, ["features.transition1", "features.transition2", "features.transition3"]),
            ("resnet18", 3, 16, ["layer1", "layer2", "layer3"]),
            ("seresnet50", 3, 16, ["layer1", "layer2", "layer3"]),
            ("efficientnet", 3, 32, [f"_blocks.{i}" for i in range(7)]),
        ]
    )
    def test_wraps_network(self, name, dims, size, blocks):
        torch.manual_seed(0)
        network = _monai(name, dims)
        head = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)][-1]
        net = ARMED(network, n_clusters=C, in_shape=(1,) + (size,) * dims)
        self.assertEqual(net.head_name, head)
        self.assertEqual(net.tapped_layers, blocks + [head + ":input"])
        channels = net.feature_channels  # measured by the construction dry run
        x = torch.randn((2, 1) + (size,) * dims)
        cluster = torch.tensor([0, 2])
        out = net.forward_armed(x, cluster)
        self.assertEqual(tuple(out.pred.shape), (2, 2))
        self.assertEqual(tuple(out.pred_fe.shape), (2, 2))
        self.assertEqual(len(out.features), len(net.tapped_layers))
        self.assertEqual(sum(f.shape[1] for f in out.features), channels)
        self.assertEqual(tuple(out.features[-1].shape), (2, net.in_features))
        self.assertEqual(ClusterAdversary(channels, C, hidden_channels=(8,))(out.features).shape, (2, C))
        self.assertTrue(math.isfinite(float(out.kl.detach())))
        torch.testing.assert_close(out.kl, total_kl_divergence(net))
        # mixed effects differ from fixed effects for seen clusters
        self.assertFalse(torch.allclose(out.pred, out.pred_fe))


class TestARMEDEffects(unittest.TestCase):
    def test_fixed_and_mixed_effects_match_the_formula(self):
        net, x, cluster = _small().eval(), _x(), torch.tensor([0, 2, -1, 1])
        h = net.network.hidden(net.network.pool(torch.relu(net.network.bn(net.network.conv(x)))))
        fe = net.network.fc(h)
        torch.testing.assert_close(net(x), fe)
        slope, intercept = net.random_slope.loc.detach(), net.random_intercept.loc.detach()
        seen = cluster.clamp(min=0)
        mask = (cluster >= 0).float().unsqueeze(1)
        me = net.network.fc(h * (1 + slope[seen] * mask)) + intercept[seen] * mask
        torch.testing.assert_close(net(x, cluster), me)
        out = net.forward_armed(x, cluster)
        torch.testing.assert_close(out.pred, me)
        torch.testing.assert_close(out.pred_fe, fe)
        torch.testing.assert_close(out.features[-1], h)
        torch.testing.assert_close(me[2], fe[2])  # unseen row: fixed effects
        self.assertFalse(torch.allclose(me[0], fe[0]))

    def test_forward_without_cluster_is_the_network(self):
        net, x = _small().eval(), _x()
        self.assertTrue(torch.equal(net(x), net.network(x)))
        torch.testing.assert_close(net(x, torch.full((4,), -1)), net(x))
        out = net.forward_armed(x, None)
        torch.testing.assert_close(out.pred, out.pred_fe)

    def test_soft_membership(self):
        net, x = _small().eval(), _x()
        index = torch.tensor([0, 2, 1, 1])
        one_hot = nn.functional.one_hot(index, C).float()
        torch.testing.assert_close(net(x, one_hot), net(x, index))
        torch.testing.assert_close(net.forward_armed(x, one_hot).pred, net(x, index))
        torch.testing.assert_close(net(x, torch.zeros(4, C)), net(x))

    def test_training_gradients_reach_every_part(self):
        net, x = _small().train(), _x()
        out = net.forward_armed(x, torch.tensor([0, 1, 1, 0]))
        (out.pred.square().sum() + out.pred_fe.square().sum() + sum(f.sum() for f in out.features)).backward()
        for name, p in net.named_parameters():
            self.assertIsNotNone(p.grad, name)
        for module in (net.random_slope, net.random_intercept):  # only the clusters in the batch
            self.assertEqual((module.loc.grad.abs().sum(1) > 0).tolist(), [True, True, False])
        out.kl.backward()  # the KL reaches every cluster
        self.assertTrue(bool((net.random_slope.loc.grad.abs().sum(1) > 0).all()))

    def test_no_random_effects_is_domain_adversarial(self):
        net = _small(random_slope=False, random_intercept=False).eval()
        self.assertIsNone(net.random_slope)
        x = _x()
        out = net.forward_armed(x, torch.tensor([0, 1, 2, 0]))
        torch.testing.assert_close(out.pred, net(x))
        torch.testing.assert_close(out.pred_fe, net(x))
        self.assertEqual(float(out.kl), 0.0)
        only_intercept = _small(random_slope=False).eval()
        out = only_intercept.forward_armed(x, torch.tensor([0, 1, 2, 0]))
        torch.testing.assert_close(out.pred - out.pred_fe, only_intercept.random_intercept.loc.detach()[[0, 1, 2, 0]])

    def test_cluster_input_adds_a_learned_offset_per_cluster(self):
        net = _small(random_slope=False, random_intercept=False, cluster_input=True).eval()
        with torch.no_grad():
            net.cluster_logit.copy_(torch.arange(C * 3, dtype=torch.float32).reshape(C, 3))
        x, cluster = _x(), torch.tensor([0, 2, -1, 1])
        out = net.forward_armed(x, cluster)
        expected = torch.cat([net.cluster_logit[[0, 2]], torch.zeros(1, 3), net.cluster_logit[[1]]]).detach()
        torch.testing.assert_close(out.pred - out.pred_fe, expected)
        torch.testing.assert_close(net(x, cluster), out.pred)
        torch.testing.assert_close(net(x), out.pred_fe)
        soft = torch.full((4, C), 1.0 / C)
        torch.testing.assert_close(net(x, soft) - net(x), net.cluster_logit.detach().mean(0).expand(4, 3))
        net.train()
        net.forward_armed(x, cluster).pred.sum().backward()
        self.assertEqual(net.cluster_logit.grad[[0, 1, 2]].abs().sum(1).gt(0).tolist(), [True, True, True])

    def test_variants_fix_the_structure(self):
        x, cluster = _x(), torch.tensor([0, 1, 2, 0])
        for variant, settings in ARMED_VARIANTS.items():
            torch.manual_seed(0)
            net = ARMED.from_variant(variant, _Small(), C, swap_norm=True, random_slope=True)
            has_re = variant.startswith("armed")
            self.assertEqual(net.random_slope is not None, has_re, variant)
            self.assertEqual(bool(net.swapped_norms), has_re, variant)
            self.assertEqual(net.cluster_logit is not None, variant == "cluster_input", variant)
            self.assertEqual(float(net.forward_armed(x, cluster).kl) > 0, has_re, variant)
        with self.assertRaisesRegex(ValueError, "unknown ARMED variant 'mixed'; expected one of"):
            ARMED.from_variant("mixed", _Small(), C)

    def test_explicit_taps_and_input_taps(self):
        net = _small(tap_layers=["conv", "hidden.2:input", "bn"])
        out = net.forward_armed(_x(), torch.tensor([0, 1, 2, 0]))
        self.assertEqual([tuple(f.shape) for f in out.features], [(4, 8, 8, 8), (4, 16), (4, 8, 8, 8)])
        self.assertEqual(net.feature_widths, [8, 16, 8])
        self.assertEqual(net.feature_channels, 32)
        self.assertIn("hidden.2:input: 16", net.report())

    def test_posterior_means_and_summary(self):
        net = _small(swap_norm=True)
        means = net.posterior_means()
        self.assertEqual(sorted(means), ["bn.bias", "bn.scale", "intercept", "slope"])
        self.assertEqual(tuple(means["slope"].shape), (C, 16))
        self.assertEqual(tuple(means["intercept"].shape), (C, 3))
        self.assertEqual(tuple(means["bn.scale"].shape), (C, 8))
        summary = random_effects_summary(net)
        self.assertEqual(sorted(summary["groups"]), ["network.bn.random_effects", "random_intercept", "random_slope"])
        self.assertEqual(len(summary["groups"]["random_slope"]["spread"]), 16)


class TestSwapNorm(unittest.TestCase):
    def test_swap_all_norms_keeps_affine_and_contracts(self):
        torch.manual_seed(0)
        network = _Small()
        with torch.no_grad():
            network.bn.weight.fill_(1.5)
            network.bn.bias.fill_(-0.25)
        net_swapped = ARMED(network, n_clusters=C, swap_norm=True, norm_kwargs={"post_loc_init_scale": 0.5})
        self.assertEqual(net_swapped.swapped_norms, ["bn"])
        self.assertEqual(net_swapped.cluster_norms, ["bn"])
        self.assertIsInstance(net_swapped.network.bn, ClusterScaleBias)
        self.assertTrue(torch.equal(net_swapped.network.bn.norm.weight.detach(), torch.full((8,), 1.5)))
        self.assertTrue(torch.equal(net_swapped.network.bn.norm.bias.detach(), torch.full((8,), -0.25)))
        net_swapped.eval()
        x, cluster = _x(), torch.tensor([0, 2, -1, 1])
        out = net_swapped.forward_armed(x, cluster)
        torch.testing.assert_close(out.pred, net_swapped(x, cluster))
        torch.testing.assert_close(out.pred_fe, net_swapped(x))
        torch.testing.assert_close(out.pred[2], out.pred_fe[2])
        # the adversary sees fixed-effects features: those of the pass without any cluster
        fe_only = net_swapped.forward_armed(x, None)
        for a, b in zip(out.features, fe_only.features):
            torch.testing.assert_close(a, b)
        # the norm's own random effects act even without the head's
        net_swapped.random_slope, net_swapped.random_intercept = None, None
        me = net_swapped(x, cluster)
        self.assertFalse(torch.allclose(me[0], out.pred_fe[0]))
        self.assertIsNone(net_swapped.network.bn.cluster)
        self.assertIn("swapped norms -> ClusterScaleBias (1):\n  bn", net_swapped.report())

    def test_swap_named_norms_in_monai_network(self):
        torch.manual_seed(0)
        network = resnet18(spatial_dims=2, n_input_channels=1, num_classes=2)
        bns = [n for n, m in network.named_modules() if isinstance(m, nn.BatchNorm2d)]
        net = ARMED(network, n_clusters=C, swap_norm=["bn1", "layer1.0.bn1"])
        self.assertEqual(net.swapped_norms, ["bn1", "layer1.0.bn1"])
        self.assertIsInstance(net.network.layer1[0].bn1, ClusterScaleBias)
        self.assertIsInstance(net.network.layer1[0].bn2, nn.BatchNorm2d)
        full = ARMED(resnet18(spatial_dims=2, n_input_channels=1, num_classes=2), n_clusters=C, swap_norm=True)
        self.assertEqual(full.swapped_norms, bns)
        out = full.train().forward_armed(torch.randn(2, 1, 64, 64), torch.tensor([1, 2]))
        self.assertEqual(tuple(out.pred.shape), (2, 2))
        self.assertEqual(out.features[0].shape[0], 2)

    def test_context_and_hooks_cleared_on_error(self):
        net = _small(swap_norm=True)
        head = net.network.fc
        with self.assertRaises(RuntimeError):  # wrong number of input channels fails inside the backbone
            net.forward_armed(torch.zeros(4, 2, 8, 8), torch.tensor([0, 1, 2, 0]))
        self.assertIsNone(net.network.bn.cluster)
        self.assertEqual(len(head._forward_pre_hooks) + len(head._forward_hooks), 0)
        self.assertEqual(len(net.network.conv._forward_hooks), 0)
        x = _x()
        net.eval()
        torch.testing.assert_close(net(x), net.network(x))

    def test_swap_norm_errors(self):
        with self.assertRaisesRegex(ValueError, r"swap_norm: 'bnn' is not a module of _Small. Did you mean \['bn'\]"):
            _small(swap_norm=["bnn"])
        with self.assertRaisesRegex(TypeError, "'conv' is a Conv2d; only BatchNorm1d/2d/3d and InstanceNorm1d/2d/3d"):
            _small(swap_norm=["conv"])
        with self.assertRaisesRegex(ValueError, "swap_norm=True but Sequential has no BatchNorm/InstanceNorm layer"):
            ARMED(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2)), C, swap_norm=True, head="2")


class TestARMEDErrors(unittest.TestCase):
    def test_head_errors(self):
        with self.assertRaisesRegex(
            ValueError,
            r"head 'out' is not a module of _Small\. Its last linear / convolution layers are \['conv', 'hidden.1', 'fc'\]",
        ):
            ARMED(_Small(), C, head="out")
        with self.assertRaisesRegex(TypeError, "head 'bn' must be an nn.Linear or a convolution, got BatchNorm2d"):
            ARMED(_Small(), C, head="bn")
        with self.assertRaisesRegex(
            ValueError,
            r"_Small calls layers with parameters after its head 'conv' \(Conv2d, given as head=\) in a dry run .*: "
            r"'bn' \(BatchNorm2d\), 'hidden.1' \(Linear\), 'fc' \(Linear\)\. .*head=",
        ):
            ARMED(_Small(), C, head="conv")
        with self.assertRaisesRegex(ValueError, "Sequential called no nn.Linear or convolution layer .* pass head="):
            ARMED(nn.Sequential(nn.Flatten(), nn.Identity()), C, in_shape=(4,))

    def test_conv_head_with_pooling_after_it(self):
        """A convolution is the head when nothing with parameters follows it (pooling and flattening may)."""
        conv_only = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net = ARMED(conv_only, C, post_loc_init_scale=0.5).eval()
        self.assertEqual((net.head_name, net.in_features, net.out_channels), ("0", 1, 2))
        x, cluster = _x(), torch.tensor([0, 1, 2, -1])
        out = net.forward_armed(x, cluster)
        torch.testing.assert_close(out.pred_fe, conv_only(x))
        # the intercept shifts each output channel's map uniformly, so the pooled output moves by the intercept
        scale = 1.0 + net.random_slope(cluster).reshape(4, 1, 1, 1)
        expected = conv_only(x * scale) + net.random_intercept(cluster)
        torch.testing.assert_close(out.pred, expected)

    def test_tap_errors(self):
        with self.assertRaisesRegex(
            ValueError, r"tap layer 'convv' is not a module of _Small. Did you mean \['conv'\]"
        ):
            _small(tap_layers=["convv"])
        with self.assertRaisesRegex(ValueError, r"tap layer 'fc' is the head, .* tap 'fc:input'"):
            _small(tap_layers=["fc"])
        with self.assertRaisesRegex(ValueError, "lists a layer twice"):
            _small(tap_layers=["conv", "conv"])
        with self.assertRaisesRegex(
            TypeError, "tap layer 'post.pair' returned a tuple; a tapped layer must return a tensor"
        ):
            ARMED(_Small(post=_FirstOfPair()), C, tap_layers=["post.pair"])
        self.assertEqual(ARMED(_Small(post=_FirstOfPair()), C, tap_layers=["post"]).feature_widths, [3])

    def test_tap_not_called(self):
        network = _Small(post=nn.Identity())
        network.unused = nn.Linear(2, 2)
        with self.assertRaisesRegex(
            ValueError, r"tap layers \['unused'\] were not called during a dry run of _Small .* pass tap_layers="
        ):
            ARMED(network, C, head="fc", tap_layers=["unused"])

    def test_cluster_errors(self):
        net, x = _small(), _x()
        with self.assertRaisesRegex(IndexError, r"cluster index 3 is out of range: expected -1 \(unseen\) or 0..2"):
            net(x, torch.tensor([0, 1, 3, 0]))
        with self.assertRaisesRegex(IndexError, "cluster index -2 is out of range"):
            net.forward_armed(x, torch.tensor([0, -2, 1, 0]))
        with self.assertRaisesRegex(ValueError, r"soft cluster membership must have shape \(batch, 3\), got \(4, 2\)"):
            net(x, torch.zeros(4, 2))
        with self.assertRaisesRegex(ValueError, "the cluster has 3 rows but the input batch has 4 samples"):
            net(x, torch.tensor([0, 1, 2]))
        with self.assertRaisesRegex(ValueError, r"cluster indices must have shape \(batch,\), got \(4, 1\)"):
            net(x, torch.zeros(4, 1, dtype=torch.long))
        with self.assertRaisesRegex(TypeError, "cluster must be a tensor"):
            net(x, [0, 1, 2, 0])

    def test_parameter_free_operations_after_the_head(self):
        net = ARMED(_Small(post=nn.Sigmoid()), C, post_loc_init_scale=0.5).eval()
        self.assertEqual(net.head_name, "fc")
        x, cluster = _x(), torch.tensor([0, 1, 2, -1])
        out = net.forward_armed(x, cluster)
        torch.testing.assert_close(out.pred_fe, net.network(x))
        h = net.network.hidden(net.network.pool(torch.relu(net.network.bn(net.network.conv(x)))))
        logits = net.network.fc(h * (1 + net.random_slope(cluster))) + net.random_intercept(cluster)
        torch.testing.assert_close(out.pred, torch.sigmoid(logits))  # the intercept enters before the sigmoid
        torch.testing.assert_close(net(x, cluster), out.pred)

    def test_layer_with_parameters_after_the_head(self):
        with self.assertRaisesRegex(
            ValueError,
            r"_Small calls layers with parameters after its head 'fc' \(Linear, the last linear or convolution layer "
            r"called\) .*: 'post' \(BatchNorm1d\)\. ARMED puts the random intercept on the output layer's output",
        ):
            ARMED(_Small(post=nn.BatchNorm1d(3)), C)

    def test_mlp_shape_from_its_first_linear(self):
        mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
        self.assertEqual(ARMED(mlp, C, tap_layers=["1"]).feature_channels, 8)  # dry run on (1, 5)
        self.assertIn("tapped layers for the adversary (1, 8 channels):\n  1: 8", ARMED(mlp, C, tap_layers=["1"]).report())

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "n_clusters must be >= 1"):
            ARMED(_Small(), 0)
        with self.assertRaisesRegex(TypeError, "network must be a torch.nn.Module"):
            ARMED("densenet", C)


def _hook_count(network: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


class TestHeadDryRun(unittest.TestCase):
    def test_explicit_head(self):
        network = _Small()
        network.aux = nn.Linear(3, 3)  # the last nn.Linear, never called: the call order finds fc
        self.assertEqual(ARMED(network, C).head_name, "fc")
        with self.assertRaisesRegex(
            ValueError, r"the head 'aux' \(Linear, given as head=\) was not called during a dry run.*head="
        ):
            ARMED(network, C, head="aux")
        net = ARMED(network, C, head="fc").eval()
        self.assertEqual((net.head_name, net.in_features, net.out_channels), ("fc", 16, 3))
        out = net.forward_armed(_x(), torch.tensor([0, 1, 2, -1]))
        torch.testing.assert_close(out.pred_fe, net(_x()))
        self.assertFalse(torch.allclose(out.pred[0], out.pred_fe[0]))
        with self.assertRaisesRegex(ValueError, r"after its head 'hidden.1' \(Linear, given as head=\) .*'fc'"):
            ARMED(_Small(), C, head="hidden.1")

    def test_output_that_does_not_come_from_the_head(self):
        class _Ignores(_Small):
            def forward(self, x):
                super().forward(x)
                return x.flatten(1)[:, :3]

        with self.assertRaisesRegex(
            ValueError, r"the output of _Ignores does not come from its head 'fc' .* returned a Tensor \(2, 3\)"
        ):
            ARMED(_Ignores(), C)

    def test_dry_run_leaves_the_network_as_it_was(self):
        for training in (True, False):
            torch.manual_seed(0)
            network = _Small().train(training)
            with torch.no_grad():
                network.bn.running_mean.fill_(0.5)
            before = copy.deepcopy(network.state_dict())
            reference = copy.deepcopy(network).eval()
            net = ARMED(network, C, post_loc_init_scale=0.5)
            for key, value in network.state_dict().items():
                self.assertTrue(torch.equal(value, before[key]), key)  # running_mean, num_batches_tracked, weights
            self.assertEqual({m.training for m in network.modules()}, {training})
            self.assertEqual(_hook_count(network), 0)
            x = _x()
            torch.testing.assert_close(net.eval()(x), reference(x), rtol=0, atol=0)  # network(x) is never changed

    def test_refused_network_keeps_its_norms(self):
        network = _Small(post=nn.BatchNorm1d(3))
        with self.assertRaisesRegex(ValueError, "after its head 'fc'"):
            ARMED(network, C, swap_norm=True)
        self.assertIsInstance(network.bn, nn.BatchNorm2d)

    def test_dry_run_shape(self):
        flat = nn.Sequential(nn.Conv3d(2, 2, 3), nn.Flatten(), nn.Linear(2 * 6**3, 2))  # needs 8^3 inputs
        with self.assertRaisesRegex(
            ValueError,
            r"a dry run of Sequential on a zero input \(2, 2, 32, 32, 32\) \(guessed from '0' \(Conv3d\); .*\) failed: "
            r"RuntimeError: .* Pass in_shape=\(channels, \*spatial\)",
        ):
            ARMED(flat, C)
        self.assertEqual(ARMED(flat, C, in_shape=(2, 8, 8, 8)).feature_widths, [2, 432])
        lazy_first = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 2))
        with self.assertRaisesRegex(ValueError, r"first layer '0' is an uninitialised LazyLinear; pass in_shape="):
            ARMED(lazy_first, C)
        lazy_head = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
        net = ARMED(lazy_head, C, in_shape=(1, 6, 6))  # the dry run initialises the lazy head before it is read
        self.assertEqual((net.in_features, net.random_slope.units), (32, 32))


class TestExportAndCheckpoints(unittest.TestCase):
    def test_trace_fixed_effects_path(self):
        for swap in (False, True):
            net, x = _small(swap_norm=swap).eval(), _x()
            with warnings.catch_warnings():  # shape checks inside the norms are traced as constants, as intended
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(net, x)
            torch.testing.assert_close(traced(_x(seed=5)), net(_x(seed=5)))

    def test_state_dict_roundtrip_weights_only(self):
        net = _small(seed=0, swap_norm=True)
        keys = list(net.state_dict())
        self.assertIn("random_slope.loc", keys)
        self.assertIn("random_intercept.rho", keys)
        self.assertIn("network.bn.random_effects.loc", keys)
        self.assertIn("network.fc.weight", keys)
        x, cluster = _x(), torch.tensor([0, 1, 2, -1])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt")
            net(x, cluster)  # a forward leaves nothing behind in the state dict
            self.assertEqual(list(net.state_dict()), keys)
            torch.save(net.state_dict(), path)
            other = _small(seed=7, swap_norm=True)
            self.assertEqual(list(other.state_dict()), keys)
            other.load_state_dict(torch.load(path, weights_only=True))
            torch.testing.assert_close(other.eval()(x, cluster), net.eval()(x, cluster))
            third = load_network_checkpoint(_small(seed=3, swap_norm=True), path, n_clusters=C).eval()
            torch.testing.assert_close(third(x, cluster), net(x, cluster))
            with self.assertRaisesRegex(ValueError, "trained with 3 clusters but the network has 5"):
                load_network_checkpoint(ARMED(_Small(), n_clusters=5, swap_norm=True), path)
            # a network built with other settings: no norm swap (other keys), or another head width (other shapes)
            with self.assertRaisesRegex(
                ValueError, r"model\.pt does not fit the network \(missing: .*unexpected: \['network\.bn\.norm.*same settings"
            ):
                load_network_checkpoint(_small(seed=3), path)
            wide = _Small()
            wide.fc = nn.Linear(16, 4)
            resized = r"other shapes \(checkpoint vs network\): \['network\.fc\.weight \(3, 16\) vs \(4, 16\)"
            with self.assertRaisesRegex(ValueError, resized):
                load_network_checkpoint(ARMED(wide, n_clusters=C, swap_norm=True), path)


class TestTrainerIntegration(unittest.TestCase):
    def test_armed_trainer_on_densenet121(self):
        torch.manual_seed(0)
        net = ARMED(DenseNet121(spatial_dims=2, in_channels=1, out_channels=2), n_clusters=C, in_shape=(1, 32, 32))
        adversary = ClusterAdversary(net.feature_channels, C, hidden_channels=(16,))
        g = torch.Generator().manual_seed(0)
        data = {
            "image": torch.randn(12, 1, 32, 32, generator=g),
            "label": torch.randint(0, 2, (12,), generator=g),
            "cluster": torch.arange(12) % C,
        }
        adv_before = [p.detach().clone() for p in adversary.parameters()]
        slope_before = net.random_slope.loc.detach().clone()
        trainer = ARMEDTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=TensorBatchLoader(data, batch_size=4),
            network=net,
            optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
            adversary=adversary,
            adv_optimizer=torch.optim.Adam(adversary.parameters(), lr=1e-2),
            adv_weight=0.1,
            kl_weight=1e-5,
            prepare_batch=PrepareBatchCluster(),
            decollate=False,
        )
        trainer.run()
        self.assertEqual(trainer.state.iteration, 3)
        output = trainer.state.output
        for key in ("loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl"):
            self.assertTrue(math.isfinite(float(output[key])), key)
        for module in (net.random_slope, net.random_intercept):
            for p in module.parameters():
                self.assertIsNotNone(p.grad)
                self.assertGreater(float(p.grad.abs().sum()), 0.0)
        self.assertFalse(torch.equal(net.random_slope.loc.detach(), slope_before))
        changed = [not torch.equal(a, p.detach()) for a, p in zip(adv_before, adversary.parameters())]
        self.assertTrue(all(changed))
        self.assertIsNone(net.network.class_layers.out._forward_pre_hooks.get(0))
        self.assertEqual(len(net.network.class_layers.out._forward_pre_hooks), 0)

    def test_regression_densenet_with_gaussian_likelihood(self):
        """A MONAI DenseNet with one output, wrapped, regresses a continuous label with a learned residual scale."""
        torch.manual_seed(0)
        network = DenseNet(spatial_dims=2, in_channels=1, out_channels=1, init_features=8, growth_rate=4, block_config=(2, 2))
        net = ARMED(network, n_clusters=C, in_shape=(1, 16, 16))
        self.assertEqual((net.head_name, net.out_channels), ("class_layers.out", 1))
        g = torch.Generator().manual_seed(0)
        level = torch.randn(24, generator=g)
        cluster = torch.arange(24) % C
        data = {
            "image": level.reshape(24, 1, 1, 1) + 0.1 * torch.randn(24, 1, 16, 16, generator=g),
            "label": level + torch.tensor([-1.0, 0.0, 1.0])[cluster],  # float: a continuous outcome
            "cluster": cluster,
        }
        family = GaussianLikelihood(scale_init=4.0)  # far above the response's s.d. (about 1.2)
        optimizer = torch.optim.Adam(net.parameters(), lr=2e-2)
        adversary = ClusterAdversary(net.feature_channels, C, hidden_channels=(8,))
        trainer = ARMEDTrainer(
            device="cpu",
            max_epochs=10,
            train_data_loader=TensorBatchLoader(data, batch_size=8, shuffle=True),
            network=net,
            optimizer=optimizer,
            loss_function=family,
            adversary=adversary,
            adv_weight=0.1,
            prepare_batch=PrepareBatchCluster(),
            decollate=False,
        )
        self.assertIn(id(family.log_scale), {id(p) for group in optimizer.param_groups for p in group["params"]})
        trainer.run()
        output = trainer.state.output
        self.assertEqual(tuple(output["pred"].shape), (8, 1))
        self.assertTrue(output["label"].is_floating_point())
        for key in ("loss", "loss_me", "loss_fe", "loss_adv", "loss_kl"):
            self.assertTrue(math.isfinite(float(output[key])), key)
        self.assertIsNotNone(family.log_scale.grad)
        scale = float(family.scale.detach())
        self.assertLess(scale, 3.0, "the residual scale is learned: it moves down towards the residual s.d.")
        self.assertGreater(scale, 0.5)
        for p in net.random_intercept.parameters():
            self.assertGreater(float(p.grad.abs().sum()), 0.0)
        net.eval()
        with torch.no_grad():
            mse = float((net(data["image"], cluster)[:, 0] - data["label"]).pow(2).mean())
        self.assertLess(mse, float(data["label"].var()), "it regresses better than the mean")


if __name__ == "__main__":
    unittest.main()


def test_level_counts_give_the_batch_estimate_of_the_kl_at_the_cost_of_the_batch():
    # equal counts and a batch holding each level equally: the estimate N / B * sum KL_c / n_c is the exact KL
    counts = [2] * C
    net = _small(re_kwargs={"level_counts": counts}, swap_norm=True, norm_kwargs={"re_kwargs": {"level_counts": counts}})
    net.train()
    x, cluster = _x(2 * C), torch.arange(C).repeat(2)
    exact = net.kl_divergence()
    torch.testing.assert_close(net.forward_armed(x, cluster).kl, exact)
    # a batch of level 0 alone: N / B * B * KL_0 / n_0 = C * KL_0 in every layer
    level_0 = sum(C * layer._analytic_kl(layer.loc, None)[0] for layer in net._random_effect_layers)
    torch.testing.assert_close(net.kl_divergence(torch.zeros(5, dtype=torch.long)), level_0)
    assert len(net._random_effect_layers) > 2, "head slopes, intercepts and the swapped norm's effects"
    torch.testing.assert_close(net.forward_armed(x, torch.eye(C)[cluster]).kl, exact, msg="soft membership: exact KL")
    torch.testing.assert_close(net.forward_armed(x, None).kl, exact, msg="no cluster: the exact KL, not 0")
    plain = _small()
    torch.testing.assert_close(plain.forward_armed(x, torch.zeros(2 * C, dtype=torch.long)).kl, plain.kl_divergence())


def test_a_windowed_batch_gives_the_batch_estimate_of_the_kl():
    """A sliding window runs one sample at a time; with level_counts the batch's KL estimate is the mean of the seen
    samples' own (it was the last sample's)."""
    torch.manual_seed(0)
    unet = UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
    net = ARMED(unet, n_clusters=3, in_shape=(1, 16, 16), re_kwargs={"level_counts": [10, 10, 80]}).train()
    x, cluster = torch.rand(3, 1, 16, 16), torch.tensor([0, 2, -1])
    windowed = armed_inference(SlidingWindowInferer((16, 16), sw_batch_size=1), x, net.forward_armed, cluster)
    torch.testing.assert_close(windowed.kl, net.kl_divergence(cluster))
    assert float(net.kl_divergence(cluster)) != pytest.approx(float(net.kl_divergence(cluster[1:2])))


def test_mask_dtypes_and_unchecked_out_of_range_indices_are_named():
    from monai_armed.utils import batch_checks

    net, x = _small(), _x(C)
    for dtype in (torch.uint8, torch.bool):
        with pytest.raises(TypeError, match=f"cluster indices must be an int64 tensor .*got {dtype}.*as a mask"):
            net(x, torch.ones(C, dtype=dtype))
    with batch_checks(False):  # a later batch of a run, whose values are not read
        with pytest.raises(IndexError, match=r"cluster index 3 is out of range: expected -1 \(unseen\) or 0..2"):
            net(x, torch.tensor([0, 1, 3]))


def test_report_names_the_cluster_input_offsets_and_a_plain_pass():
    lines = _small(**ARMED_VARIANTS["cluster_input"]).report()
    assert "learned logit offset per cluster" in lines
    assert "forward_armed: one backbone pass, head rows [head(h) + offset(z); head(h)]" in lines
    plain = _small(**ARMED_VARIANTS["domain_adversarial"]).report()
    assert "forward_armed: one plain pass (no cluster effects: mixed = fixed prediction)" in plain
    assert "head rows [head(h * (1 + u_s)) + u_int; head(h)]" in _small().report()
