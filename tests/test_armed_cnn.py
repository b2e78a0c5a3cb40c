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
from parameterized import parameterized

from monai_armed.networks import ARMED, ARMEDCNN, ClusterScaleBias
from monai_armed.networks.nets import PadToSize

SMALL = (8, 16, 16, 32, 32, 64, 64)
BLOCKS = [f"c{i}" for i in range(7)]


def _small(seed: int = 0, **kwargs) -> ARMEDCNN:
    torch.manual_seed(seed)
    return ARMEDCNN(**{"filters": SMALL, "hidden_channels": 32, **kwargs})


class TestARMEDCNNStructure(unittest.TestCase):
    def test_paper_network_at_192(self):
        torch.manual_seed(0)
        net = ARMEDCNN().eval()
        self.assertEqual([net.get_submodule(b)[0].out_channels for b in BLOCKS], [64, 128, 128, 256, 256, 512, 512])
        self.assertEqual((net.h[0].in_features, net.h[0].out_features, net.out.out_features), (512, 512, 1))
        with torch.no_grad():
            out = ARMED(net, n_clusters=2, random_slope=False, random_intercept=False).forward_armed(
                torch.randn(1, 1, 192, 192), None
            )
        self.assertEqual(tuple(out.pred.shape), (1, 1))
        sizes = [tuple(f.shape[2:]) for f in out.features[:-1]]
        self.assertEqual(sizes, [(192, 192), (96, 96), (48, 48), (24, 24), (12, 12), (6, 6), (1, 1)])
        self.assertEqual(tuple(out.features[-1].shape), (1, 512))

    def test_block_layout(self):
        net = _small()
        kinds = {b: [type(m).__name__ for m in net.get_submodule(b)] for b in BLOCKS}
        self.assertEqual(kinds["c0"], ["Conv2d", "BatchNorm2d", "PReLU"])
        for b in ("c1", "c3", "c5"):  # dropout before the norm
            self.assertEqual(kinds[b], ["Conv2d", "Dropout", "BatchNorm2d", "PReLU"])
        for b in ("c2", "c4"):
            self.assertEqual(kinds[b], ["Conv2d", "BatchNorm2d", "PReLU"])
        self.assertEqual(kinds["c6"], ["Conv2d", "PReLU"])
        self.assertEqual(net.c6[0].padding, (0, 0))  # 'valid'
        self.assertEqual(net.c0[0].padding, (1, 1))  # 'same'
        self.assertEqual(net.c1[1].p, 0.5)
        bn = net.c0[1]
        self.assertEqual((bn.eps, bn.momentum), (1e-3, 0.01))  # Keras defaults
        prelu = net.c3[-1]
        self.assertEqual(prelu.weight.shape, (32,))
        self.assertEqual(float(prelu.weight.detach().abs().sum()), 0.0)
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self.assertEqual(float(m.bias.detach().abs().sum()), 0.0)
        self.assertEqual(net.feature_layers, tuple(BLOCKS))

    @parameterized.expand(
        [(2, (192, 192)), (2, (40, 52)), (2, (17, 9)), (2, (1, 1)), (3, (32, 32, 32)), (3, (8, 12, 10))]
    )
    def test_output_shape_for_sizes(self, dims, size):
        net = _small(spatial_dims=dims, in_channels=2, out_channels=3).eval()
        x = torch.randn((2, 2) + size)
        with torch.no_grad():
            y = net(x)
        self.assertEqual(tuple(y.shape), (2, 3))
        self.assertTrue(bool(torch.isfinite(y).all()))

    def test_dropout_configurable_and_train_mode_stochastic(self):
        net = _small(dropout_blocks=(0,))
        self.assertIsInstance(net.c0[1], nn.Dropout)
        self.assertNotIsInstance(net.c1[1], nn.Dropout)
        self.assertEqual(len(_small(dropout=0.0).c1), 3)
        short = ARMEDCNN(filters=(4, 4, 4, 4, 4))  # default: dropout in the odd pooled blocks
        self.assertEqual([isinstance(short.get_submodule(f"c{i}")[1], nn.Dropout) for i in range(4)], [0, 1, 0, 1])
        x = torch.randn(2, 1, 16, 16)
        net.train()
        self.assertFalse(torch.allclose(net(x), net(x)))
        net.eval()
        torch.testing.assert_close(net(x), net(x))

    def test_torchscript_and_gradients(self):
        net = _small().eval()
        x = torch.randn(2, 1, 20, 24)
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(x), net(x))
        net.train()
        net(x).sum().backward()
        self.assertIsNotNone(net.c0[0].weight.grad)
        self.assertGreater(float(net.c0[0].weight.grad.abs().sum()), 0.0)

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "filters must list at least 2 positive widths"):
            ARMEDCNN(filters=(8,))
        with self.assertRaisesRegex(ValueError, r"dropout_blocks must index the pooled blocks 0..2, got \[3\]"):
            ARMEDCNN(filters=(8, 8, 8, 8), dropout_blocks=(1, 3))
        with self.assertRaisesRegex(ValueError, "spatial_dims must be 1, 2 or 3"):
            ARMEDCNN(spatial_dims=4)

    def test_pad_to_size(self):
        pad = PadToSize(3)
        self.assertEqual(tuple(pad(torch.ones(2, 4, 1, 5)).shape), (2, 4, 3, 5))
        y = pad(torch.ones(1, 1, 1, 2, 7))
        self.assertEqual(tuple(y.shape), (1, 1, 3, 3, 7))
        self.assertEqual(float(y.sum()), 14.0)  # zeros around the original values
        x = torch.ones(1, 1, 4, 4)
        self.assertIs(pad(x), x)


class TestMixedEffectsCNN(unittest.TestCase):
    def test_armed_wrapper_defaults(self):
        net = ARMED(_small(), n_clusters=4)
        self.assertEqual(net.head_name, "out")
        self.assertEqual(net.tapped_layers, BLOCKS + ["out:input"])
        self.assertEqual(net.feature_channels, sum(SMALL) + 32)
        self.assertEqual((net.random_slope.units, net.random_intercept.units), (32, 1))
        x, cluster = torch.randn(3, 1, 32, 32), torch.tensor([0, 3, -1])
        out = net.train().forward_armed(x, cluster)
        self.assertEqual([f.shape[1] for f in out.features], list(SMALL) + [32])
        net.eval()
        torch.testing.assert_close(net(x), net.network(x))
        me = net(x, cluster)
        self.assertFalse(torch.allclose(me[:2], net(x)[:2]))
        torch.testing.assert_close(me[2], net(x)[2])

    def test_cluster_norm_inside_the_cnn(self):
        cnn = _small(norm=("clusterscalebias", {"n_clusters": 3, "post_loc_init_scale": 0.5}))
        self.assertIsInstance(cnn.c0[1], ClusterScaleBias)
        net = ARMED(cnn, n_clusters=3, random_slope=False, random_intercept=False).eval()
        self.assertEqual(net.cluster_norms, ["c0.1", "c1.2", "c2.1", "c3.2", "c4.1", "c5.2"])  # after dropout
        self.assertEqual(net.swapped_norms, [])
        x, cluster = torch.randn(2, 1, 64, 64), torch.tensor([2, -1])  # instance norm needs c5 > 1 x 1
        fe = net(x)
        me = net(x, cluster)
        self.assertFalse(torch.allclose(me[0], fe[0]))
        torch.testing.assert_close(me[1], fe[1])
        out = net.forward_armed(x, cluster)
        torch.testing.assert_close(out.pred, me)
        torch.testing.assert_close(out.pred_fe, fe)
        self.assertGreater(float(out.kl.detach()), 0.0)
        self.assertTrue(all(cnn.get_submodule(n).cluster is None for n in net.cluster_norms))


if __name__ == "__main__":
    unittest.main()
