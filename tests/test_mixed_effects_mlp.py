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

import pytest
import torch
import torch.nn as nn
from parameterized import parameterized

from monai_armed.networks import (
    MLP_VARIANTS,
    ClusterAdversary,
    MixedEffectsMLP,
    ZPredictor,
    cluster_one_hot,
    variant_loss_weights,
    random_effects_summary,
    total_kl_divergence,
)


def _net(seed: int = 0, **kwargs) -> MixedEffectsMLP:
    torch.manual_seed(seed)
    args = {"in_features": 3, "out_channels": 1, "n_clusters": 4, **kwargs}
    return MixedEffectsMLP(**args)


def _inputs(batch: int = 6, features: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(seed))


def _hidden(net: MixedEffectsMLP, x: torch.Tensor) -> torch.Tensor:
    """The last hidden layer computed layer by layer (no cluster input)."""
    h = x
    for layer in net.hidden:
        h = layer(h)
    return h


class TestMixedEffectsForward(unittest.TestCase):
    def test_no_cluster_equals_unseen_equals_fixed(self):
        net = _net().eval()
        x = _inputs()
        fe = net(x)
        self.assertEqual(tuple(fe.shape), (6, 1))
        torch.testing.assert_close(net(x, torch.full((6,), -1)), fe)
        torch.testing.assert_close(net.forward_armed(x, torch.full((6,), -1)).pred_fe, fe)
        torch.testing.assert_close(net.out(_hidden(net, x)), fe)

    def test_cluster_changes_output(self):
        net = _net().eval()
        x = _inputs()
        idx = torch.tensor([0, 1, 2, 3, 0, 1])
        self.assertFalse(torch.allclose(net(x, idx), net(x)))
        # different clusters give different outputs for the same input
        x1 = x[:1].expand(4, 3)
        out = net(x1, torch.arange(4))
        self.assertGreater(float(out.detach().std()), 0.0)

    @parameterized.expand([(1,), (2,)])
    def test_logit_mixing_hidden_slopes(self, out_channels):
        net = _net(out_channels=out_channels, random_slopes="hidden").eval()
        self.assertEqual(set(net.posterior_means()), {"slope_hidden", "intercept"})
        x = _inputs()
        idx = torch.tensor([0, 1, 2, 3, -1, 2])
        means = net.posterior_means()
        with torch.no_grad():
            h = _hidden(net, x)
            slopes = means["slope_hidden"][idx.clamp(min=0)].reshape(6, h.shape[1], out_channels)
            expected = means["intercept"][idx.clamp(min=0)] + torch.einsum("bk,bko->bo", h, slopes)
            expected[idx < 0] = 0.0
            diff = net(x, idx) - net(x)
        torch.testing.assert_close(diff, expected)

    @parameterized.expand([(1,), (2,)])
    def test_logit_mixing_input_slopes(self, out_channels):
        net = _net(out_channels=out_channels, random_slopes="input").eval()
        self.assertEqual(set(net.posterior_means()), {"slope_input", "intercept"})
        x = _inputs()
        idx = torch.tensor([3, 2, 1, 0, 0, 1])
        means = net.posterior_means()
        self.assertEqual(tuple(means["slope_input"].shape), (4, 3 * out_channels))
        with torch.no_grad():
            slopes = means["slope_input"][idx].reshape(6, 3, out_channels)
            expected = means["intercept"][idx] + torch.einsum("bi,bio->bo", x, slopes)
            diff = net(x, idx) - net(x)
        torch.testing.assert_close(diff, expected)

    def test_feature_major_layout(self):
        """Slope of feature i for output o lives at column i * out_channels + o."""
        net = _net(out_channels=2, random_slopes="input", random_intercept=False).eval()
        with torch.no_grad():
            net.random_effects.loc.zero_()
            net.random_effects.loc[1, 2 * 2 + 1] = 1.0  # cluster 1, feature 2, output 1
        x = torch.tensor([[0.0, 0.0, 5.0]])
        diff = net(x, torch.tensor([1])) - net(x)
        torch.testing.assert_close(diff, torch.tensor([[0.0, 5.0]]))

    def test_both_slopes_and_soft_membership(self):
        net = _net(random_slopes="both").eval()
        self.assertEqual(list(net.re_groups), ["slope_input", "slope_hidden", "intercept"])
        x = _inputs()
        idx = torch.tensor([0, 1, 2, 3, 0, 1])
        torch.testing.assert_close(net(x, cluster_one_hot(idx, 4)), net(x, idx))

    def test_forward_armed(self):
        net = _net(hidden_channels=(5, 3, 2)).train()
        x = _inputs()
        idx = torch.tensor([0, 1, 2, 3, 0, -1])
        out = net.forward_armed(x, idx)
        self.assertEqual([f.shape[1] for f in out.features], [5, 3, 2])
        self.assertEqual(net.feature_channels, 10)
        self.assertEqual(tuple(out.pred.shape), (6, 1))
        self.assertEqual(tuple(out.pred_fe.shape), (6, 1))
        self.assertEqual(out.kl.dim(), 0)
        self.assertGreater(float(out.kl.detach()), 0.0)
        self.assertTrue(out.kl.requires_grad)
        torch.testing.assert_close(out.kl, total_kl_divergence(net))
        out.kl.backward()
        self.assertIsNotNone(net.random_effects.loc.grad)
        # the unseen row gets the fixed-effects prediction, the others differ
        torch.testing.assert_close(out.pred[5], out.pred_fe[5])
        self.assertFalse(torch.allclose(out.pred[:5], out.pred_fe[:5]))

    def test_conventional_variant(self):
        net = MixedEffectsMLP.from_variant("conventional", in_features=3, out_channels=1, n_clusters=4)
        self.assertFalse(net.has_random_effects)
        self.assertEqual(net.posterior_means(), {})
        x = _inputs()
        out = net.forward_armed(x, torch.arange(6) % 4)
        self.assertEqual(float(out.kl), 0.0)
        self.assertTrue(torch.equal(out.pred, out.pred_fe))
        self.assertEqual(float(net.kl_divergence()), 0.0)
        torch.testing.assert_close(net(x, torch.arange(6) % 4), net(x))

    @parameterized.expand([(name,) for name in MLP_VARIANTS])
    def test_every_variant_builds(self, name):
        torch.manual_seed(0)
        net = MixedEffectsMLP.from_variant(name, in_features=3, out_channels=1, n_clusters=4)
        out = net.forward_armed(_inputs(), torch.arange(6) % 4)
        self.assertEqual(tuple(out.pred.shape), (6, 1))
        self.assertEqual(net.has_random_effects, name in ("armed", "armed_no_adversary"))
        self.assertEqual(net.cluster_input, name == "cluster_input")
        weights = variant_loss_weights(name)
        self.assertEqual(set(weights), {"me_weight", "fe_weight", "adv_weight"})

    def test_from_variant_override(self):
        net = MixedEffectsMLP.from_variant("armed", in_features=3, out_channels=1, n_clusters=4, random_slopes="input")
        self.assertIn("slope_input", net.re_groups)

    def test_unknown_variant(self):
        with self.assertRaises(ValueError) as ctx:
            MixedEffectsMLP.from_variant("bogus", in_features=3, out_channels=1, n_clusters=4)
        msg = str(ctx.exception)
        self.assertIn("bogus", msg)
        for name in MLP_VARIANTS:
            self.assertIn(name, msg)
        with self.assertRaisesRegex(ValueError, "armed"):
            variant_loss_weights("bogus")

    def test_variant_loss_weights(self):
        self.assertEqual(variant_loss_weights("armed", gen_weight=0.5)["adv_weight"], 0.5)
        self.assertEqual(variant_loss_weights("domain_adversarial", gen_weight=2.0)["adv_weight"], 2.0)
        self.assertEqual(variant_loss_weights("conventional", gen_weight=0.5)["adv_weight"], 0)
        self.assertEqual(variant_loss_weights("armed")["fe_weight"], 1.0)

    def test_cluster_input_depends_on_cluster(self):
        net = MixedEffectsMLP.from_variant("cluster_input", in_features=3, out_channels=1, n_clusters=4).eval()
        self.assertFalse(net.has_random_effects)
        x = _inputs(1).expand(4, 3)
        out = net(x, torch.arange(4))
        self.assertGreater(float(out.detach().std()), 0.0)
        armed = net.forward_armed(x, torch.arange(4))
        torch.testing.assert_close(armed.pred, out)
        # no cluster -> a zero one-hot, same as an unseen cluster
        torch.testing.assert_close(net(x), net(x, torch.full((4,), -1)))

    def test_multiclass_shapes(self):
        net = _net(out_channels=3, random_slopes="both")
        x = _inputs()
        out = net.forward_armed(x, torch.arange(6) % 4)
        self.assertEqual(tuple(out.pred.shape), (6, 3))
        self.assertEqual(tuple(out.pred_fe.shape), (6, 3))
        self.assertEqual(net.random_effects.units, 3 * 3 + 4 * 3 + 3)
        self.assertEqual(tuple(net(x).shape), (6, 3))

    def test_wrong_input_width(self):
        net = _net()
        with self.assertRaisesRegex(ValueError, r"\(batch, 3\).*\(6, 4\)"):
            net(torch.randn(6, 4))
        with self.assertRaisesRegex(ValueError, r"\(batch, 3\)"):
            net.forward_armed(torch.randn(6, 3, 1), torch.zeros(6, dtype=torch.long))

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "random_slopes"):
            _net(random_slopes="everything")
        for slopes in ("hidden", "both"):
            with self.assertRaisesRegex(ValueError, rf"random_slopes='{slopes}'.*hidden_channels=\(\).*'input'"):
                _net(hidden_channels=(), random_slopes=slopes)

    def test_priors_per_group(self):
        net = _net(out_channels=1, slope_prior_scale=0.3, intercept_prior_scale=0.7)
        prior = net.random_effects.prior_scale
        a, b = net.re_groups["slope_hidden"]
        c, d = net.re_groups["intercept"]
        torch.testing.assert_close(prior[a:b], torch.full((b - a,), 0.3))
        torch.testing.assert_close(prior[c:d], torch.full((d - c,), 0.7))

    def test_re_kwargs_passed_on(self):
        net = _net(re_kwargs={"kl_estimator": "mc", "sample_per_row": False})
        self.assertEqual(net.random_effects.kl_estimator, "mc")
        self.assertFalse(net.random_effects.sample_per_row)


class TestClusterAdversary(unittest.TestCase):
    def test_list_of_features(self):
        torch.manual_seed(0)
        adv = ClusterAdversary(in_features=7, n_clusters=4, hidden_channels=(4, 4))
        feats = [torch.randn(5, 4), torch.randn(5, 3)]
        out = adv(feats)
        self.assertEqual(tuple(out.shape), (5, 4))
        torch.testing.assert_close(out, adv(torch.cat(feats, 1)))

    def test_feature_maps_are_pooled(self):
        torch.manual_seed(0)
        adv = ClusterAdversary(in_features=5, n_clusters=3)
        fmap = torch.randn(2, 3, 4, 4, 4)
        vec = torch.randn(2, 2)
        out = adv([fmap, vec])
        self.assertEqual(tuple(out.shape), (2, 3))
        torch.testing.assert_close(out, adv(torch.cat([fmap.mean((2, 3, 4)), vec], 1)))
        out2d = adv([torch.randn(2, 3, 6, 6), vec])
        self.assertEqual(tuple(out2d.shape), (2, 3))

    def test_wrong_width(self):
        adv = ClusterAdversary(in_features=6, n_clusters=3)
        with self.assertRaisesRegex(ValueError, r"expected 6.*got 5"):
            adv([torch.randn(2, 3), torch.randn(2, 2)])

    def test_too_few_clusters(self):
        with self.assertRaisesRegex(ValueError, "at least 2"):
            ClusterAdversary(in_features=6, n_clusters=1)

    def test_no_hidden_layers(self):
        adv = ClusterAdversary(in_features=6, n_clusters=3, hidden_channels=())
        self.assertEqual(tuple(adv(torch.randn(2, 6)).shape), (2, 3))

    def test_glorot_zero_bias(self):
        adv = ClusterAdversary(in_features=6, n_clusters=3)
        for m in adv.modules():
            if isinstance(m, nn.Linear):
                self.assertTrue(torch.equal(m.bias, torch.zeros_like(m.bias)))


class TestZPredictor(unittest.TestCase):
    def test_membership_rows_sum_to_one(self):
        torch.manual_seed(0)
        zp = ZPredictor(in_features=3, n_clusters=5)
        x = _inputs(8)
        logits = zp(x)
        self.assertEqual(tuple(logits.shape), (8, 5))
        m = zp.membership(x)
        torch.testing.assert_close(m.sum(1), torch.ones(8))
        self.assertTrue((m >= 0).all())
        torch.testing.assert_close(m, torch.softmax(logits, 1))

    def test_temperature(self):
        torch.manual_seed(0)
        zp = ZPredictor(in_features=3, n_clusters=5, temperature=2.0)
        x = _inputs(8)
        torch.testing.assert_close(zp.membership(x), torch.softmax(zp(x) / 2.0, 1))

    def test_custom_backbone(self):
        zp = ZPredictor(n_clusters=4, backbone=nn.Linear(3, 4))
        self.assertEqual(tuple(zp.membership(_inputs()).shape), (6, 4))
        bad = ZPredictor(n_clusters=4, backbone=nn.Linear(3, 5))
        with self.assertRaisesRegex(ValueError, r"\(batch, 4\).*\(6, 5\)"):
            bad(_inputs())
        with self.assertRaisesRegex(ValueError, r"\(batch, 4\)"):
            bad.membership(_inputs())

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "at least 2"):
            ZPredictor(in_features=3, n_clusters=1)
        with self.assertRaisesRegex(ValueError, "temperature"):
            ZPredictor(in_features=3, n_clusters=3, temperature=0.0)
        with self.assertRaisesRegex(ValueError, "in_features"):
            ZPredictor(n_clusters=3)

    def test_soft_membership_drives_network(self):
        torch.manual_seed(0)
        zp = ZPredictor(in_features=3, n_clusters=4)
        net = _net().eval()
        x = _inputs()
        m = zp.membership(x).detach()
        out = net(x, m)
        # membership-weighted mix of the clusters' random effects (linear in the effect for each row)
        per_cluster = torch.stack([net(x, torch.full((6,), c)) for c in range(4)], 1)  # (B, C, 1)
        torch.testing.assert_close(out, (m.unsqueeze(2) * per_cluster).sum(1))


class TestUtils(unittest.TestCase):
    def test_random_effects_summary(self):
        net = _net(hidden_channels=(4, 4, 5))
        names = ["a", "b", "c", "d"]
        summary = random_effects_summary(net, names)
        self.assertEqual(summary["clusters"], names)
        self.assertEqual(set(summary["groups"]), {"slope_hidden", "intercept"})
        sh = summary["groups"]["slope_hidden"]
        self.assertEqual(len(sh["posterior_mean"]), 4)
        self.assertTrue(all(len(row) == 5 for row in sh["posterior_mean"]))
        self.assertEqual(len(sh["posterior_scale"]), 4)
        self.assertEqual(len(sh["prior_scale"]), 5)
        means = net.posterior_means()
        torch.testing.assert_close(torch.tensor(sh["posterior_mean"]), means["slope_hidden"])
        torch.testing.assert_close(torch.tensor(sh["spread"]), means["slope_hidden"].std(0))
        ic = summary["groups"]["intercept"]
        self.assertEqual(len(ic["posterior_mean"]), 4)
        self.assertEqual(len(ic["posterior_mean"][0]), 1)
        torch.testing.assert_close(torch.tensor(ic["spread"]), means["intercept"].std(0))
        self.assertIsInstance(sh["spread"][0], float)
        with self.assertRaisesRegex(ValueError, "the network has 4 clusters but 3 cluster_names"):
            random_effects_summary(net, names[:3])  # another run's vocabulary would label the rows wrongly

    def test_random_effects_summary_default_names_and_none(self):
        summary = random_effects_summary(_net())
        self.assertEqual(summary["clusters"], ["0", "1", "2", "3"])
        conventional = MixedEffectsMLP.from_variant("conventional", in_features=3, out_channels=1, n_clusters=4)
        self.assertEqual(random_effects_summary(conventional)["groups"], {})

    def test_cluster_one_hot(self):
        oh = cluster_one_hot(torch.tensor([2, -1, 0]), 3)
        expected = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        self.assertTrue(torch.equal(oh, expected))
        soft = torch.full((2, 3), 1 / 3, dtype=torch.float64)
        self.assertEqual(cluster_one_hot(soft, 3).dtype, torch.float32)
        with self.assertRaisesRegex(IndexError, "0..2"):
            cluster_one_hot(torch.tensor([3]), 3)
        with self.assertRaises(IndexError):
            cluster_one_hot(torch.tensor([-2]), 3)

    def test_total_kl_without_random_effects(self):
        net = nn.Linear(2, 2)
        self.assertEqual(float(total_kl_divergence(net)), 0.0)


if __name__ == "__main__":
    unittest.main()


@pytest.mark.parametrize("variant", ["armed", "conventional", "cluster_input"])
def test_torchscript_matches_eager(variant):
    import warnings

    net = MixedEffectsMLP.from_variant(variant, in_features=2, out_channels=1, n_clusters=4, random_slopes="both")
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        scripted = torch.jit.script(net)
    x = torch.randn(5, 2)
    index = torch.tensor([0, 3, -1, 2, 1])
    soft = torch.softmax(torch.randn(5, 4), dim=1)
    for cluster in (index, soft, None):
        torch.testing.assert_close(scripted(x, cluster), net(x, cluster))


# ----------------------------------------------------------------------------------- linear fixed part (regression)


def _regression(n_per_cluster: int = 50, n_clusters: int = 4, noise: float = 0.3, seed: int = 0):
    """y = X beta + 0.5 + offset(cluster) + noise, with offsets -1.5, -0.5, 0.5, 1.5 and X shifted per cluster."""
    g = torch.Generator().manual_seed(seed)
    cluster = torch.arange(n_clusters).repeat_interleave(n_per_cluster)
    x = torch.randn(len(cluster), 3, generator=g) + 0.3 * cluster.unsqueeze(1)
    offsets = torch.linspace(-1.5, 1.5, n_clusters)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 + offsets[cluster] + noise * torch.randn(len(cluster), generator=g)
    return x, y, cluster


def _fit_gaussian(net: MixedEffectsMLP, x, y, cluster, epochs: int, lr: float = 0.05, **kwargs):
    from monai_armed.data import TensorBatchLoader
    from monai_armed.engines import ARMEDTrainer, PrepareBatchCluster
    from monai_armed.losses import GaussianLikelihood

    family = GaussianLikelihood()
    trainer = ARMEDTrainer(
        device="cpu",
        max_epochs=epochs,
        train_data_loader=TensorBatchLoader({"features": x, "label": y, "cluster": cluster}, batch_size=len(y)),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), lr=lr),
        loss_function=family,
        prepare_batch=PrepareBatchCluster("features"),
        decollate=False,
        epoch_metrics=False,
        **kwargs,
    )
    trainer.run()
    return family


def test_linear_fixed_part_shapes_and_adversary_inputs():
    net = _net(out_channels=2, hidden_channels=(), random_slopes="input").eval()
    assert len(net.hidden) == 0 and (net.out.in_features, net.out.out_features) == (3, 2)
    assert net.feature_channels == 3 and list(net.re_groups) == ["slope_input", "intercept"]
    x, idx = _inputs(), torch.tensor([0, 1, 2, 3, -1, 1])
    fe = net(x)
    torch.testing.assert_close(fe, x @ net.out.weight.T + net.out.bias)  # x -> out, nothing in between
    out = net.forward_armed(x, idx)
    assert len(out.features) == 1 and out.features[0] is x, "the adversary reads the inputs"
    assert tuple(ClusterAdversary(net.feature_channels, 4, hidden_channels=(4,))(out.features).shape) == (6, 4)
    means = net.posterior_means()
    with torch.no_grad():
        slopes = means["slope_input"][idx.clamp(min=0)].reshape(6, 3, 2)
        expected = means["intercept"][idx.clamp(min=0)] + torch.einsum("bi,bio->bo", x, slopes)
        expected[idx < 0] = 0.0
        torch.testing.assert_close(net(x, idx) - fe, expected)
    # the one-hot cluster of the cluster-input baseline feeds the linear layer, not the adversary
    baseline = MixedEffectsMLP.from_variant("cluster_input", in_features=3, out_channels=1, n_clusters=4, hidden_channels=())
    assert baseline.out.in_features == 3 + 4 and baseline.feature_channels == 3
    assert baseline.forward_armed(x, idx).features[0] is x


def test_linear_fixed_part_reaches_the_least_squares_fit():
    """Without random effects, ARMEDTrainer + GaussianLikelihood maximises the Gaussian likelihood: ordinary least
    squares for the weights and the root mean squared residual for the learned scale."""
    x, y, cluster = _regression()
    torch.manual_seed(0)
    net = MixedEffectsMLP(3, 1, 4, hidden_channels=(), random_slopes="none", random_intercept=False)
    family = _fit_gaussian(net, x, y, cluster, epochs=400)
    design = torch.cat([x, torch.ones(len(y), 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution.squeeze(1)
    fitted = torch.cat([net.out.weight.detach()[0], net.out.bias.detach()]).double()
    torch.testing.assert_close(fitted, solution, atol=2e-3, rtol=0)
    rms = float((design @ solution - y.double()).pow(2).mean().sqrt())
    assert float(family.scale.detach()) == pytest.approx(rms, rel=1e-2)
    assert rms > 0.6, "the cluster offsets are left in the residual"


def test_linear_mixed_model_recovers_the_cluster_intercepts():
    """A linear mixed model (random intercept, weak prior, 50 rows per cluster; ``fe_weight=0``: the ELBO alone) comes
    close to OLS with one intercept per cluster: the same slopes, fixed bias + random intercept = each cluster's
    intercept, and sigma near the residual s.d."""
    x, y, cluster = _regression()
    torch.manual_seed(0)
    net = MixedEffectsMLP(
        3, 1, 4, hidden_channels=(), random_slopes="none", intercept_prior_scale=2.0, intercept_posterior_init_scale=0.0
    )
    family = _fit_gaussian(net, x, y, cluster, epochs=400, fe_weight=0.0)
    design = torch.cat([x, cluster_one_hot(cluster, 4)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double().unsqueeze(1)).solution.squeeze(1)
    torch.testing.assert_close(net.out.weight.detach()[0].double(), solution[:3], atol=0.03, rtol=0)
    intercepts = net.out.bias.detach() + net.posterior_means()["intercept"][:, 0]
    torch.testing.assert_close(intercepts.double(), solution[3:], atol=0.05, rtol=0)
    rms = float((design @ solution - y.double()).pow(2).mean().sqrt())
    assert float(family.scale.detach()) == pytest.approx(rms, abs=0.05)


def test_linear_fixed_part_adversary_gives_the_network_no_gradient():
    """The adversary of a linear fixed part reads the inputs: it trains, but the network trains as without it."""
    x, y, cluster = _regression(n_per_cluster=16)
    nets = []
    for adv_weight in (0.0, 1.0):
        torch.manual_seed(0)
        net = MixedEffectsMLP(3, 1, 4, hidden_channels=(), random_slopes="input")
        adversary = ClusterAdversary(net.feature_channels, 4, hidden_channels=(4,))
        before = [p.detach().clone() for p in adversary.parameters()]
        _fit_gaussian(net, x, y, cluster, epochs=5, adversary=adversary, adv_weight=adv_weight)
        assert any(not torch.equal(a, p) for a, p in zip(before, adversary.parameters()))
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)


def test_linear_fixed_part_torchscript_matches_eager():
    net = MixedEffectsMLP(2, 1, n_clusters=4, hidden_channels=(), random_slopes="input", cluster_input=True).eval()
    scripted = torch.jit.script(net)
    x, index = torch.randn(5, 2), torch.tensor([0, 3, -1, 2, 1])
    for cluster in (index, None):
        torch.testing.assert_close(scripted(x, cluster), net(x, cluster))


def test_level_counts_make_the_kl_of_forward_armed_a_batch_estimate():
    torch.manual_seed(0)
    net = MixedEffectsMLP(2, 1, n_clusters=4, re_kwargs={"level_counts": [3, 3, 3, 3]}, slope_posterior_init_scale=0.3)
    x = torch.randn(8, 2)
    balanced, only_2 = torch.arange(4).repeat(2), torch.full((8,), 2)
    torch.testing.assert_close(net.forward_armed(x, balanced).kl, net.kl_divergence(), msg="each level equally: exact")
    per_level = net.random_effects._analytic_kl(net.random_effects.loc, None)
    torch.testing.assert_close(net.forward_armed(x, only_2).kl, 4 * per_level[2])
    torch.testing.assert_close(net.forward_armed(x, torch.eye(4)[only_2]).kl, net.kl_divergence(), msg="soft: exact")
