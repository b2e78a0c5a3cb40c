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
"""The random scale of a convolution head folded into its kernel: same values and gradients as scaling the input."""

from __future__ import annotations

import unittest

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import UNet
from parameterized import parameterized

from monai_armed.networks import ARMED
from monai_armed.networks.layers.scaled_conv import can_fold_input_scale, conv_with_scaled_copy

CONVS = [
    ("conv1d", lambda: nn.Conv1d(5, 3, 3, padding=1), (4, 5, 11)),
    ("conv2d_1x1", lambda: nn.Conv2d(5, 2, 1), (4, 5, 7, 6)),
    ("conv2d_strided_dilated", lambda: nn.Conv2d(5, 3, 3, stride=2, padding=2, dilation=2), (3, 5, 9, 8)),
    ("conv2d_same_no_bias", lambda: nn.Conv2d(5, 3, 3, padding="same", bias=False), (2, 5, 6, 6)),
    ("conv3d", lambda: nn.Conv3d(4, 2, 3, padding=1), (2, 4, 5, 4, 6)),
    ("transposed2d", lambda: nn.ConvTranspose2d(5, 2, 3, stride=2, padding=1, output_padding=1), (4, 5, 6, 5)),
    ("transposed3d", lambda: nn.ConvTranspose3d(4, 3, 2, stride=2, bias=False), (2, 4, 3, 4, 3)),
    ("transposed1d_dilated", lambda: nn.ConvTranspose1d(5, 2, 3, dilation=2), (3, 5, 8)),
]


class TestConvWithScaledCopy(unittest.TestCase):
    @parameterized.expand(CONVS)
    def test_values_and_gradients_match_scaling_the_input(self, _, make, shape):
        torch.manual_seed(0)
        conv = make()
        batch, channels = shape[:2]
        out_channels = conv.out_channels
        x = torch.randn(*shape, requires_grad=True)
        scale = (1.0 + 0.3 * torch.randn(batch, channels)).requires_grad_()
        shift = torch.randn(batch, out_channels, requires_grad=True)
        spatial = [1] * (x.dim() - 2)
        expected = torch.cat([conv(x * scale.view(batch, channels, *spatial)) + shift.view(batch, -1, *spatial), conv(x)])
        weights = torch.randn_like(expected)
        params = [x, scale, shift] + list(conv.parameters())
        expected_grads = torch.autograd.grad((expected * weights).sum(), params)
        both = conv_with_scaled_copy(conv, x, scale, shift)
        torch.testing.assert_close(both, expected)
        grads = torch.autograd.grad((both * weights).sum(), params)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        without_shift = conv_with_scaled_copy(conv, x, scale)
        torch.testing.assert_close(without_shift[:batch], conv(x * scale.view(batch, channels, *spatial)))
        torch.testing.assert_close(without_shift[batch:], conv(x))

    def test_refuses_what_it_cannot_fold(self):
        for conv in (nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect"), nn.Linear(4, 2)):
            self.assertFalse(can_fold_input_scale(conv))
        with self.assertRaisesRegex(TypeError, "ungrouped, zero-padded torch convolution"):
            conv_with_scaled_copy(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5), torch.ones(1, 4))


class TestArmedFoldedHead(unittest.TestCase):
    def _net(self) -> ARMED:
        torch.manual_seed(0)
        unet = UNet(2, 1, 2, channels=(4, 8), strides=(2,), num_res_units=0)
        return ARMED(unet, 3, in_shape=(1, 16, 16))

    def test_split_pass_folds_the_scale_and_restores_the_head(self):
        net = self._net().eval()
        head = net.network.get_submodule(net.head_name)
        self.assertTrue(can_fold_input_scale(head))
        x, cluster = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, -1])
        calls = []
        head.register_forward_hook(lambda m, args, out: calls.append(out.shape[0]))
        out = net.forward_armed(x, cluster)
        # one call of the head (its hooks run once) gives [mixed; fixed] rows; the pass leaves no forward behind
        self.assertEqual(calls, [8])
        self.assertNotIn("forward", vars(head))
        torch.testing.assert_close(out.pred, net(x, cluster))
        torch.testing.assert_close(out.pred_fe, net(x))
        torch.testing.assert_close(out.pred[3], out.pred_fe[3])

    def test_head_restored_when_the_pass_fails(self):
        net = self._net()
        head = net.network.get_submodule(net.head_name)
        with self.assertRaises(ValueError):
            net.forward_armed(torch.randn(2, 1, 16, 16), torch.tensor([0, 1, 2]))
        with self.assertRaises(RuntimeError):
            net.forward_armed(torch.randn(2, 2, 16, 16), torch.tensor([0, 1]))
        self.assertNotIn("forward", vars(head))
        torch.testing.assert_close(net(torch.ones(1, 1, 16, 16)), net.network(torch.ones(1, 1, 16, 16)))

    def test_empty_batch(self):
        net = self._net()
        out = net.forward_armed(torch.randn(0, 1, 16, 16), torch.zeros(0, dtype=torch.long))
        self.assertEqual(tuple(out.pred.shape), (0, 2, 16, 16))
        self.assertEqual(tuple(out.pred_fe.shape), (0, 2, 16, 16))


class _WeightStandardised(nn.Conv2d):
    """A convolution with its own forward, which the fold must not replace by a plain convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class _SameConv(nn.Conv2d):
    """A convolution whose forward is its parent's, but overridden: computed unfolded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _two_layer(head: nn.Conv2d) -> nn.Sequential:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
    head.load_state_dict(nn.Conv2d(4, 3, 3, padding=1).state_dict())
    return nn.Sequential(*body, head)


class TestArmedHeadsNotFolded(unittest.TestCase):
    def test_a_head_with_its_own_forward_keeps_it(self):
        net = _two_layer(_WeightStandardised(4, 3, 3, padding=1))
        self.assertFalse(can_fold_input_scale(net[2]))
        armed = ARMED(net, 3, in_shape=(1, 8, 8)).eval()
        x, cluster = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, -1])
        out = armed.forward_armed(x, cluster)
        torch.testing.assert_close(out.pred_fe, net(x))
        torch.testing.assert_close(out.pred, armed(x, cluster))

    def test_an_instance_forward_on_the_head_is_used_and_kept(self):
        net = _two_layer(nn.Conv2d(4, 3, 3, padding=1))
        armed = ARMED(net, 3, in_shape=(1, 8, 8)).eval()
        head, calls = net[2], []

        def counted(x: torch.Tensor) -> torch.Tensor:
            calls.append(x.shape[0])
            return nn.Conv2d.forward(head, x)

        head.forward = counted
        self.assertFalse(can_fold_input_scale(head))
        out = armed.forward_armed(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, -1]))
        self.assertEqual(calls, [4, 4])  # the fixed rows, then the mixed rows
        self.assertIs(vars(head)["forward"], counted)
        self.assertEqual(tuple(out.pred.shape), (4, 3, 8, 8))

    def test_training_draws_match_the_unfolded_pass(self):
        folded = ARMED(_two_layer(nn.Conv2d(4, 3, 3, padding=1)), 3, in_shape=(1, 8, 8))
        unfolded = ARMED(_two_layer(_SameConv(4, 3, 3, padding=1)), 3, in_shape=(1, 8, 8))
        unfolded.load_state_dict(folded.state_dict())
        self.assertTrue(can_fold_input_scale(folded.network[2]))
        self.assertFalse(can_fold_input_scale(unfolded.network[2]))
        x, cluster = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
        outs = []
        for net in (folded, unfolded):
            torch.manual_seed(7)
            outs.append(net.train().forward_armed(x, cluster))
        torch.testing.assert_close(outs[0].pred, outs[1].pred)
        torch.testing.assert_close(outs[0].pred_fe, outs[1].pred_fe)


if __name__ == "__main__":
    unittest.main()
