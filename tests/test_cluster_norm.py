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

import unittest

import torch
import torch.nn as nn
from monai.networks.layers import Norm
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import DenseNet
from parameterized import parameterized

from monai_armed.networks import ClusterScaleBias, cluster_context, cluster_norm_modules, total_kl_divergence


def _block(features: int = 4, clusters: int = 3, dims: int = 2, seed: int = 0, **kwargs) -> ClusterScaleBias:
    torch.manual_seed(seed)
    block = ClusterScaleBias(features, clusters, spatial_dims=dims, **kwargs)
    with torch.no_grad():  # a non-trivial fixed-effects affine, so the tests see it
        block.norm.weight.uniform_(0.5, 1.5)
        block.norm.bias.uniform_(-0.5, 0.5)
    return block


def _x(batch: int = 3, features: int = 4, size: tuple = (5, 6), seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, features, *size, generator=torch.Generator().manual_seed(seed))


def _instance_norm(block: ClusterScaleBias, x: torch.Tensor) -> torch.Tensor:
    """Instance norm computed by hand: per sample and channel over space, eps 1e-3, the block's affine."""
    dims = tuple(range(2, x.dim()))
    mean, var = x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    w, b = block.norm.weight.detach().reshape(shape), block.norm.bias.detach().reshape(shape)
    return (x - mean) / torch.sqrt(var + 1e-3) * w + b


class TestClusterScaleBiasForward(unittest.TestCase):
    def test_no_cluster_is_instance_norm(self):
        block, x = _block().eval(), _x()
        self.assertIsNone(block.cluster)
        torch.testing.assert_close(block(x), _instance_norm(block, x))
        self.assertEqual(block.norm.eps, 1e-3)

    def test_index_applies_scale_and_bias_of_the_cluster(self):
        block, x = _block().eval(), _x()
        with torch.no_grad():
            block.random_effects.loc.normal_(0.0, 0.5)
        cluster = torch.tensor([2, 0, -1])
        block.set_cluster(cluster)
        y = block(x)
        loc = block.random_effects.loc.detach()
        g, b = loc[:, :4], loc[:, 4:]
        x_hat = _instance_norm(block, x)
        for row, c in enumerate([2, 0]):
            expected = x_hat[row] * (1 + g[c]).reshape(4, 1, 1) + b[c].reshape(4, 1, 1)
            torch.testing.assert_close(y[row], expected)
        torch.testing.assert_close(y[2], x_hat[2])  # unseen cluster: fixed effects only

    def test_soft_membership_matches_index_and_mixes(self):
        block, x = _block().eval(), _x(batch=2)
        with torch.no_grad():
            block.random_effects.loc.normal_(0.0, 0.5)
        block.set_cluster(torch.tensor([1, 2]))
        by_index = block(x)
        block.set_cluster(nn.functional.one_hot(torch.tensor([1, 2]), 3).float())
        torch.testing.assert_close(block(x), by_index)
        block.set_cluster(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))
        mixed = block(x)
        loc = block.random_effects.loc.detach()
        mean = (loc[0] + loc[1]) / 2
        x_hat = _instance_norm(block, x)
        torch.testing.assert_close(mixed[0], x_hat[0] * (1 + mean[:4]).reshape(4, 1, 1) + mean[4:].reshape(4, 1, 1))
        torch.testing.assert_close(mixed[1], x_hat[1])

    @parameterized.expand([(1, (7,)), (2, (5, 6)), (3, (3, 4, 5))])
    def test_spatial_dims(self, dims, size):
        block = _block(dims=dims).eval()
        block.set_cluster(torch.tensor([0, 1, 2]))
        x = _x(size=size)
        y = block(x)
        self.assertEqual(y.shape, x.shape)
        block.set_cluster(None)
        torch.testing.assert_close(block(x), _instance_norm(block, x))

    def test_train_gradients_reach_random_effects_and_affine(self):
        block = _block().train()
        block.set_cluster(torch.tensor([0, 1, 1]))
        (block(_x()) ** 2).sum().backward()
        for name, p in block.named_parameters():
            self.assertIsNotNone(p.grad, name)
            self.assertGreater(float(p.grad.abs().sum()), 0.0, name)
        used = block.random_effects.loc.grad.abs().sum(1) > 0
        self.assertEqual(used.tolist(), [True, True, False])

    def test_kl_found_by_total_kl_divergence(self):
        net = nn.Sequential(nn.Conv2d(1, 4, 3), _block(), nn.ReLU(), nn.Conv2d(4, 2, 3), _block(2, seed=3))
        expected = net[1].kl_divergence() + net[4].kl_divergence()
        torch.testing.assert_close(total_kl_divergence(net), expected)
        self.assertGreater(float(expected.detach()), 0.0)
        self.assertEqual(list(cluster_norm_modules(net)), ["1", "4"])

    def test_state_dict_keys_and_posterior_means(self):
        block = _block()
        block.set_cluster(torch.tensor([0, 1, 2]))
        keys = sorted(block.state_dict())
        self.assertEqual(
            keys,
            [
                "norm.bias",
                "norm.weight",
                "random_effects.loc",
                "random_effects.log_prior_scale",
                "random_effects.rho",
            ],
        )
        means = block.posterior_means()
        self.assertEqual(tuple(means["scale"].shape), (3, 4))
        self.assertEqual(tuple(means["bias"].shape), (3, 4))
        torch.testing.assert_close(torch.cat([means["scale"], means["bias"]], 1), block.random_effects.loc.detach())

    def test_defaults_follow_the_reference_block(self):
        block = ClusterScaleBias(8, 50)
        scale = block.random_effects.scale.detach()
        self.assertGreaterEqual(float(scale.min()), 0.01 - 1e-6)
        self.assertLessEqual(float(scale.max()), 0.015 + 1e-6)
        torch.testing.assert_close(block.random_effects.prior_scale, torch.tensor(0.25))
        no_affine = ClusterScaleBias(8, 2, affine=False)
        self.assertIsNone(no_affine.norm.weight)


class TestClusterScaleBiasErrors(unittest.TestCase):
    def test_wrong_input_rank_or_channels(self):
        block = _block()
        with self.assertRaisesRegex(ValueError, r"expected input \(batch, 4, <2 spatial dims>\), got \(3, 4, 5\)"):
            block(torch.zeros(3, 4, 5))
        with self.assertRaisesRegex(ValueError, r"got \(3, 5, 4, 4\)"):
            block(torch.zeros(3, 5, 4, 4))

    def test_single_spatial_element(self):
        with self.assertRaisesRegex(ValueError, r"needs more than one, got \(3, 4, 1, 1\)"):
            _block()(torch.zeros(3, 4, 1, 1))

    def test_cluster_rows_must_match_batch(self):
        block = _block()
        block.set_cluster(torch.tensor([0, 1]))
        with self.assertRaisesRegex(ValueError, "cluster context has 2 rows but the input batch has 3"):
            block(_x())

    def test_bad_cluster_values(self):
        block = _block()
        block.set_cluster(torch.tensor([0, 3, 1]))
        with self.assertRaisesRegex(IndexError, r"cluster index 3 is out of range: expected -1 \(unseen\) or 0..2"):
            block(_x())
        block.set_cluster(torch.zeros(3, 4))
        with self.assertRaisesRegex(ValueError, r"soft cluster membership must have shape \(batch, 3\)"):
            block(_x())

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "spatial_dims must be 1, 2 or 3"):
            ClusterScaleBias(4, 2, spatial_dims=4)
        with self.assertRaisesRegex(ValueError, "num_features must be >= 1"):
            ClusterScaleBias(0, 2)


class TestClusterNormFactoryAndContext(unittest.TestCase):
    def test_norm_factory_entry(self):
        self.assertIn("CLUSTERSCALEBIAS", Norm.names)
        layer = Norm["clusterscalebias", 3](num_features=8, n_clusters=4)
        self.assertIsInstance(layer, ClusterScaleBias)
        self.assertEqual((layer.spatial_dims, layer.num_features, layer.n_clusters), (3, 8, 4))
        # get_norm_layer fills num_features from channels, the kwargs carry n_clusters and the rest
        built = get_norm_layer(("clusterscalebias", {"n_clusters": 5, "prior_scale": 0.5}), spatial_dims=2, channels=6)
        self.assertEqual((built.spatial_dims, built.num_features, built.n_clusters), (2, 6, 5))
        torch.testing.assert_close(built.random_effects.prior_scale, torch.tensor(0.5))

    def test_monai_network_with_cluster_norms(self):
        torch.manual_seed(0)
        net = DenseNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            init_features=8,
            growth_rate=4,
            block_config=(2, 2),
            norm=("clusterscalebias", {"n_clusters": 3, "post_loc_init_scale": 0.5}),
        ).eval()
        norms = cluster_norm_modules(net)
        self.assertEqual(len(norms), 11)  # norm0, 2 per dense layer (4 layers), 1 transition, norm5
        x = torch.randn(2, 1, 16, 16)
        fe = net(x)
        with cluster_context(net, torch.tensor([0, 2])) as entered:
            self.assertEqual(len(entered), 11)
            self.assertTrue(all(m.cluster is not None for m in norms.values()))
            me = net(x)
        self.assertTrue(all(m.cluster is None for m in norms.values()))
        self.assertFalse(torch.allclose(me, fe))
        torch.testing.assert_close(net(x), fe)
        with cluster_context(net, torch.tensor([-1, -1])):
            torch.testing.assert_close(net(x), fe)

    def test_torchscript(self):
        block, x = _block().eval(), _x()
        scripted = torch.jit.script(block)
        torch.testing.assert_close(scripted(x), block(x))
        cluster = torch.tensor([2, -1, 0])
        scripted._cluster = cluster  # the context can be set on the scripted block too
        block.set_cluster(cluster)
        torch.testing.assert_close(scripted(x), block(x))
        net = DenseNet(
            2, 1, 2, init_features=8, growth_rate=4, block_config=(2, 2), norm=("clusterscalebias", {"n_clusters": 3})
        )
        net.eval()
        x = torch.randn(2, 1, 16, 16)
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))

    def test_context_cleared_on_error(self):
        norms = [_block(), _block(seed=1)]
        with self.assertRaises(RuntimeError):
            with cluster_context(norms, torch.tensor([0, 1, 2])):
                self.assertTrue(all(m.cluster is not None for m in norms))
                raise RuntimeError("boom")
        self.assertTrue(all(m.cluster is None for m in norms))


if __name__ == "__main__":
    unittest.main()
