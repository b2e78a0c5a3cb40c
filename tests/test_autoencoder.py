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
"""Tests of the ARMED autoencoder-classifier networks (monai_armed.networks.nets.autoencoder)."""

from __future__ import annotations

import io
import unittest
import warnings

import pytest
import torch
import torch.nn.functional as F
from parameterized import parameterized

from monai_armed.networks import ClusterAdversary, ClusterScaleBias, total_kl_divergence
from monai_armed.networks.nets.autoencoder import (
    AEC_LOSS_WEIGHTS,
    AEC_VARIANTS,
    PAPER_AEC_CONFIG,
    PAPER_IMAGE_CLASSIFIER_CONFIG,
    AECDecoder,
    AECEncoder,
    AutoencoderClassifier,
    ImageClusterClassifier,
    MixedEffectsAutoencoder,
    aec_loss_weights,
)

pytestmark = pytest.mark.usefixtures("single_thread")

C = 3
SMALL = {"channels": (4, 8, 8), "strides": (2, 2, 1), "latent_size": 8, "classifier_channels": 8}
SHAPES = {2: (1, 16, 16), 3: (1, 8, 8, 8)}
RE_VARIANTS = ("armed", "armed_no_adversary")


def _net(variant: str = "armed", dims: int = 2, seed: int = 0, **kwargs) -> MixedEffectsAutoencoder:
    torch.manual_seed(seed)
    args = {**SMALL, "spatial_dims": dims, "in_shape": SHAPES[dims], "out_channels": 2, "n_clusters": C, **kwargs}
    return MixedEffectsAutoencoder(variant=variant, **args)


def _x(dims: int = 2, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand((n,) + SHAPES[dims], generator=torch.Generator().manual_seed(seed))


CLUSTER = torch.tensor([0, 1, 2, -1])


def _soft(cluster: torch.Tensor) -> torch.Tensor:
    return F.one_hot(cluster.clamp(min=0), C).float() * (cluster >= 0).unsqueeze(1).float()


def _perturb_random_effects(net: MixedEffectsAutoencoder, value: float = 1.0) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, ClusterScaleBias):
                m.random_effects.loc.add_(value * torch.randn_like(m.random_effects.loc))


def _grad_norm(module: torch.nn.Module) -> float:
    return float(sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None))


class TestShapes(unittest.TestCase):
    @parameterized.expand([(v, d, soft) for v in AEC_VARIANTS for d in (2, 3) for soft in (False, True)])
    def test_output_fields(self, variant, dims, soft):
        net = _net(variant, dims)
        x = _x(dims)
        cluster = _soft(CLUSTER) if soft else CLUSTER
        out = net.forward_autoencoder(x, cluster)
        self.assertEqual(tuple(out.pred.shape), (4, 2))
        self.assertEqual(tuple(out.pred_fe.shape), (4, 2))
        self.assertEqual(tuple(out.recon_fe.shape), x.shape)
        self.assertTrue(bool(((out.recon_fe >= 0) & (out.recon_fe <= 1)).all()))
        self.assertEqual(tuple(out.latent_fe.shape), (4, 8))
        spatial = SHAPES[dims][1:]
        half, quarter = tuple(s // 2 for s in spatial), tuple(s // 4 for s in spatial)
        expected = [(4, 4) + half, (4, 8) + quarter, (4, 8) + quarter, (4, 8)]  # block outputs, then the latent
        self.assertEqual([tuple(f.shape) for f in out.features], expected)
        self.assertEqual(net.feature_channels, 4 + 8 + 8 + 8)
        self.assertEqual(tuple(ClusterAdversary(net.feature_channels, C)(out.features).shape), (4, C))
        self.assertEqual(out.kl.dim(), 0)
        if variant in RE_VARIANTS:
            self.assertTrue(net.has_random_effects)
            self.assertEqual(tuple(out.pred_re.shape), (4, 2))
            self.assertEqual(tuple(out.recon_re.shape), x.shape)
            self.assertEqual(tuple(out.latent_re.shape), (4, 8))
            self.assertEqual(tuple(out.latent_cluster_logits.shape), (4, C))
            self.assertGreater(float(out.kl.detach()), 0.0)
            torch.testing.assert_close(out.kl, total_kl_divergence(net))
        else:
            self.assertFalse(net.has_random_effects)
            for field in ("pred_re", "recon_re", "latent_re", "latent_cluster_logits"):
                self.assertIsNone(getattr(out, field), field)
            self.assertIs(out.pred, out.pred_fe)
            self.assertEqual(float(out.kl), 0.0)
        latents, recon = net.encode(x, cluster), net.reconstruct(x, cluster)
        self.assertEqual(tuple(latents.fe.shape), (4, 8))
        self.assertEqual(tuple(recon.fe.shape), x.shape)
        self.assertEqual(latents.re is None, variant not in RE_VARIANTS)
        self.assertEqual(recon.me is None, variant not in RE_VARIANTS)

    def test_paper_config_layout(self):
        # the paper's 256 x 256 layout (checked on a 64 x 64 input to keep the dense layer small)
        config = {**PAPER_AEC_CONFIG, "in_shape": (1, 64, 64)}
        enc = AECEncoder(config["spatial_dims"], config["in_shape"], config["channels"], config["strides"], 3, 56)
        self.assertEqual([b.conv.out_channels for b in enc.blocks], [64, 64, 64, 128, 256, 512])
        self.assertEqual([b.conv.stride for b in enc.blocks], [(1, 1)] * 3 + [(2, 2)] * 3)
        self.assertEqual(enc.out_shape, (512, 8, 8))
        self.assertEqual(enc.latent.out_features, 56)
        self.assertTrue(PAPER_AEC_CONFIG["tie_weights"])
        judge = ImageClusterClassifier(2, 1, 4, **PAPER_IMAGE_CLASSIFIER_CONFIG)
        self.assertEqual(tuple(judge(torch.rand(2, 1, 128, 128)).shape), (2, 4))

    def test_block_layout(self):
        net = _net("armed")
        fe, re = net.fixed_effects, net.random_effects
        self.assertEqual(type(fe.encoder.blocks[0].adn.N).__name__, "BatchNorm2d")
        self.assertEqual(type(fe.encoder.latent_norm).__name__, "BatchNorm1d")
        self.assertIsInstance(re.encoder.blocks[0].adn.N, ClusterScaleBias)
        self.assertEqual(type(re.encoder.latent_norm).__name__, "Identity")
        upsample, last = re.decoder.blocks[-1]  # stride 2: nearest upsampling, then a stride-1 convolution
        self.assertIsInstance(upsample, torch.nn.Upsample)
        self.assertEqual(last.conv.stride, (1, 1))
        self.assertFalse(hasattr(last, "adn"))  # a plain convolution before the sigmoid: no norm, no activation
        self.assertIsInstance(re.decoder.blocks[-2][-1].adn.N, ClusterScaleBias)  # the blocks before it have one
        self.assertFalse(hasattr(fe.decoder.blocks[-1][-1], "adn"))
        with_norm = AECDecoder(re.encoder, SMALL["channels"], SMALL["strides"], latent_size=8, final_norm=True)
        self.assertEqual(with_norm.blocks[-1][-1].adn.N.num_features, 1)  # the paper's layout, as an option
        self.assertFalse(any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules()))
        self.assertEqual(fe.classifier[1].negative_slope, 0.3)
        self.assertEqual(net.mixer[0].in_features, 16)
        self.assertEqual(re.latent_classifier.cluster[-1].out_features, C)


class TestForwardContract(unittest.TestCase):
    @parameterized.expand([(v,) for v in AEC_VARIANTS])
    def test_forward_without_cluster_is_fixed_effects(self, variant):
        net, x = _net(variant).eval(), _x()
        with torch.no_grad():
            logits = net(x)
            torch.testing.assert_close(logits, net.forward_autoencoder(x, CLUSTER).pred_fe)
            torch.testing.assert_close(logits, net.fixed_effects(x))
            torch.testing.assert_close(net.forward_autoencoder(x).pred, logits)  # no cluster: as forward(x)
            if variant not in RE_VARIANTS:
                torch.testing.assert_close(net(x, CLUSTER), logits)
        self.assertIsInstance(logits, torch.Tensor)

    def test_mixed_effects_depend_on_the_cluster(self):
        net, x = _net("armed").eval(), _x()
        _perturb_random_effects(net)
        unseen = torch.full_like(CLUSTER, -1)
        with torch.no_grad():
            mixed = net(x, CLUSTER)
            torch.testing.assert_close(mixed, net.forward_autoencoder(x, CLUSTER).pred)
            torch.testing.assert_close(net(x, _soft(CLUSTER))[:3], mixed[:3])
            fixed = net(x)
            torch.testing.assert_close(net(x, unseen), fixed)  # unseen rows: the fixed-effects head, as no cluster
            torch.testing.assert_close(net.forward_autoencoder(x, unseen).pred, fixed)
            self.assertFalse(torch.allclose(mixed[:3], fixed[:3]))
            torch.testing.assert_close(mixed[3], fixed[3])
            zero_effects = net(x, torch.zeros(len(CLUSTER), C))  # the mixer with z = 0
            recon = net.reconstruct(x, CLUSTER).me
            self.assertFalse(torch.allclose(recon[:3], net.reconstruct(x, unseen).me[:3]))
            torch.testing.assert_close(net.reconstruct(x).me, net.reconstruct(x, unseen).me)
            for m in net.modules():  # zero posterior means: every cluster is the fixed-effects RE path
                if isinstance(m, ClusterScaleBias):
                    m.random_effects.loc.zero_()
            torch.testing.assert_close(net(x, CLUSTER)[:3], zero_effects[:3])
        self.assertTrue(all(m.cluster is None for m in net.modules() if isinstance(m, ClusterScaleBias)))

    def test_bad_input_shape(self):
        net = _net("armed")
        with self.assertRaisesRegex(ValueError, r"expected images of shape \(batch, 1, 16, 16\), got \(2, 1, 12, 16\)"):
            net(torch.rand(2, 1, 12, 16))
        with self.assertRaisesRegex(ValueError, r"expected images of shape \(batch, 1, 16, 16\), got \(2, 16, 16\)"):
            net.forward_autoencoder(torch.rand(2, 16, 16), torch.tensor([0, 1]))
        with self.assertRaisesRegex(IndexError, "cluster index 3 is out of range"):
            net(_x(), torch.tensor([0, 1, 3, 0]))
        with self.assertRaisesRegex(ValueError, r"soft cluster membership must have shape \(batch, 3\)"):
            net(_x(), torch.rand(4, 2))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, r"unknown AEC variant 'vae'; expected one of"):
            _net("vae")
        with self.assertRaisesRegex(ValueError, r"spatial size \(18, 18\) of in_shape must be divisible .* \(4\)"):
            _net(in_shape=(1, 18, 18))
        with self.assertRaisesRegex(ValueError, "kernel_size must be odd"):
            _net(kernel_size=4)
        with self.assertRaisesRegex(ValueError, "strides must give one positive stride per entry of channels"):
            _net(strides=(2, 2))
        with self.assertRaisesRegex(ValueError, r"in_shape must be \(channels, size, size\)"):
            _net(in_shape=(16, 16))
        with self.assertRaisesRegex(ValueError, "at least 2 clusters"):
            ImageClusterClassifier(2, 1, 1)
        with self.assertRaisesRegex(
            ValueError, r"ImageClusterClassifier expected images \(batch, 1, <2 spatial dims>\)"
        ):
            ImageClusterClassifier(2, 1, 2)(torch.rand(2, 3, 16, 16))


class TestAdversaryInputs(unittest.TestCase):
    def test_latent_only_features(self):
        net, x = _net("domain_adversarial", adversary_inputs="latent"), _x()
        out = net.forward_autoencoder(x, CLUSTER)
        self.assertEqual(len(out.features), 1)
        self.assertIs(out.features[0], out.latent_fe)
        self.assertEqual(net.feature_channels, SMALL["latent_size"])
        logits = ClusterAdversary(net.feature_channels, C, (8,), input_norm=True)(out.features)
        self.assertEqual(tuple(logits.shape), (4, C))
        everything = _net("domain_adversarial").forward_autoencoder(x, CLUSTER).features
        self.assertEqual(len(everything), len(SMALL["channels"]) + 1)
        with self.assertRaisesRegex(ValueError, "adversary_inputs must be 'all' or 'latent'"):
            _net(adversary_inputs="blocks")

    def test_input_norm_makes_the_adversary_scale_invariant(self):
        """A standardised adversary sees the same features whatever per-feature scale the network gives them."""
        torch.manual_seed(0)
        adversary = ClusterAdversary(6, C, (8,), input_norm=True)
        features = torch.randn(16, 6)
        scale = torch.tensor([0.1, 1.0, 50.0, 0.2, 3.0, 1e2])
        torch.testing.assert_close(adversary(features * scale), adversary(features), atol=1e-3, rtol=1e-3)
        plain = ClusterAdversary(6, C, (8,))
        self.assertFalse(torch.allclose(plain(features * scale), plain(features), atol=1e-3))


class TestGradients(unittest.TestCase):
    def test_detached_mixer_keeps_parts_apart(self):
        net, x = _net("armed"), _x()
        fe_enc, re_enc = net.fixed_effects.encoder, net.random_effects.encoder
        out = net.forward_autoencoder(x, CLUSTER)
        F.cross_entropy(out.pred, torch.tensor([0, 1, 1, 0])).backward()
        self.assertEqual(_grad_norm(fe_enc) + _grad_norm(re_enc), 0.0)
        self.assertGreater(_grad_norm(net.mixer), 0.0)
        net.zero_grad()
        F.mse_loss(net.forward_autoencoder(x, CLUSTER).recon_fe, x).backward()
        self.assertEqual(_grad_norm(net.random_effects), 0.0)
        self.assertGreater(_grad_norm(fe_enc), 0.0)
        net.zero_grad()
        F.mse_loss(net.forward_autoencoder(x, CLUSTER).recon_re, x).backward()
        self.assertEqual(_grad_norm(net.fixed_effects), 0.0)
        self.assertGreater(_grad_norm(re_enc), 0.0)

    def test_attached_mixer_trains_both_encoders(self):
        net = _net("armed", detach_mixer_inputs=False)
        out = net.forward_autoencoder(_x(), CLUSTER)
        F.cross_entropy(out.pred, torch.tensor([0, 1, 1, 0])).backward()
        self.assertGreater(_grad_norm(net.fixed_effects.encoder), 0.0)
        self.assertGreater(_grad_norm(net.random_effects.encoder), 0.0)


class TestTyingAndExport(unittest.TestCase):
    def test_tied_decoder_shares_encoder_kernels(self):
        tied, untied = _net("armed", tie_weights=True), _net("armed")
        for aec in (tied.fixed_effects, tied.random_effects):
            for block, mirror in zip(aec.decoder.blocks, reversed(aec.encoder.blocks)):
                self.assertIs(block.conv.weight, mirror.conv.weight)
                self.assertIsNot(block.conv.bias, mirror.conv.bias)
        n_tied = sum(p.numel() for p in tied.parameters())
        n_shared = sum(
            b.conv.weight.numel() for aec in (tied.fixed_effects, tied.random_effects) for b in aec.decoder.blocks
        )
        # the untied decoders (resize-convolutions) hold kernels of the same sizes as the shared ones
        self.assertEqual(n_tied, sum(p.numel() for p in untied.parameters()) - n_shared)
        # a state-dict round trip keeps the kernels tied
        buffer = io.BytesIO()
        torch.save(tied.state_dict(), buffer)
        buffer.seek(0)
        copy = _net("armed", seed=5, tie_weights=True)
        copy.load_state_dict(torch.load(buffer, weights_only=True))
        x = _x()
        with torch.no_grad():
            torch.testing.assert_close(copy.eval().reconstruct(x, CLUSTER).me, tied.eval().reconstruct(x, CLUSTER).me)
        self.assertIs(
            copy.fixed_effects.decoder.blocks[0].conv.weight, copy.fixed_effects.encoder.blocks[-1].conv.weight
        )

    @parameterized.expand([("armed", 2), ("conventional", 2), ("armed", 3)])
    def test_trace_fixed_effects_path(self, variant, dims):
        net = _net(variant, dims).eval()
        with warnings.catch_warnings():  # the input-shape check is traced as a constant, as intended
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(net, _x(dims))
        torch.testing.assert_close(traced(_x(dims, n=3, seed=7)), net(_x(dims, n=3, seed=7)))


class TestLossWeights(unittest.TestCase):
    def test_variant_weights(self):
        self.assertEqual(aec_loss_weights("armed"), AEC_LOSS_WEIGHTS)
        self.assertEqual(aec_loss_weights("armed", gen_weight=0.5)["adv_weight"], 0.5)
        self.assertEqual(aec_loss_weights("armed_no_adversary")["adv_weight"], 0.0)
        self.assertEqual(aec_loss_weights("armed_no_adversary")["mix_weight"], AEC_LOSS_WEIGHTS["mix_weight"])
        da = aec_loss_weights("domain_adversarial", gen_weight=0.05)
        self.assertEqual(da["adv_weight"], 0.05)
        for name in ("recon_re_weight", "mix_weight", "image_cluster_weight", "kl_weight"):
            self.assertEqual(da[name], 0.0)
            self.assertEqual(aec_loss_weights("conventional")[name], 0.0)
        self.assertEqual(aec_loss_weights("conventional")["adv_weight"], 0.0)
        self.assertEqual(aec_loss_weights("armed", cls_weight=0.01)["cls_weight"], 0.01)
        with self.assertRaisesRegex(ValueError, "unknown AEC variant"):
            aec_loss_weights("dann")
        with self.assertRaisesRegex(ValueError, r"unknown AEC loss weight\(s\) \['gen'\]"):
            aec_loss_weights("armed", gen=1.0)

    def test_from_variant(self):
        for variant in AEC_VARIANTS:
            net = MixedEffectsAutoencoder.from_variant(variant, in_shape=(1, 16, 16), n_clusters=2, **SMALL)
            self.assertEqual(net.variant, variant)
            self.assertEqual(net.has_random_effects, AEC_VARIANTS[variant]["random_effects"])

    def test_standalone_autoencoder_classifier(self):
        torch.manual_seed(0)
        aec = AutoencoderClassifier(2, (1, 16, 16), out_channels=3, **SMALL)
        x = _x()
        self.assertEqual(tuple(aec(x).shape), (4, 3))
        self.assertEqual(tuple(aec.decode(aec.encode(x)).shape), (4, 1, 16, 16))
        self.assertEqual(aec.feature_channels, 28)


if __name__ == "__main__":
    unittest.main()


def test_latent_batch_norm_follows_the_block_norm():
    """The fixed-effects latent's BatchNorm1d takes the blocks' batch-norm arguments (Keras' defaults otherwise)."""
    quick = _net("conventional", norm=("batch", {"eps": 1e-3, "momentum": 0.1})).fixed_effects.encoder.latent_norm
    assert (quick.momentum, quick.eps) == (0.1, 1e-3)
    keras = _net("conventional").fixed_effects.encoder.latent_norm
    assert (keras.momentum, keras.eps) == (0.01, 1e-3)
    instance = _net("conventional", norm="instance").fixed_effects.encoder.latent_norm
    assert (instance.momentum, instance.eps) == (0.01, 1e-3)
