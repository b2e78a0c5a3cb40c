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

import io
import math
import unittest

import torch
from parameterized import parameterized

from monai_armed.networks.layers import GradientReversal, RandomEffects, grad_reverse, inverse_softplus


def _re(n_clusters: int = 4, units: int = 3, seed: int = 0, **kwargs) -> RandomEffects:
    torch.manual_seed(seed)
    return RandomEffects(n_clusters, units, **kwargs)


def _set_scale(re: RandomEffects, scale: torch.Tensor | float) -> None:
    """Set the posterior scales exactly (scale = softplus(rho) + 1e-5)."""
    target = torch.as_tensor(scale, dtype=torch.float32).expand_as(re.rho)
    with torch.no_grad():
        re.rho.copy_(inverse_softplus(target - 1e-5))


class TestRandomEffectsForward(unittest.TestCase):
    @parameterized.expand([("index", torch.tensor([0, 3, 1, 2, 0])), ("soft", torch.full((5, 4), 0.25))])
    def test_shapes(self, _, cluster):
        re = _re(4, 3)
        for training in (True, False):
            re.train(training)
            out = re(cluster)
            self.assertEqual(tuple(out.shape), (5, 3))
            self.assertTrue(torch.isfinite(out).all())

    def test_unseen_index_gives_zero_rows(self):
        re = _re(4, 3)
        cluster = torch.tensor([-1, 2, -1, 0])
        for training in (True, False):
            re.train(training)
            out = re(cluster)
            self.assertTrue(torch.equal(out[0], torch.zeros(3)))
            self.assertTrue(torch.equal(out[2], torch.zeros(3)))
            self.assertFalse(torch.equal(out[1], torch.zeros(3)))

    def test_eval_returns_posterior_mean(self):
        re = _re(4, 3).eval()
        idx = torch.tensor([3, 0, 0, 2, 1])
        a, b = re(idx), re(idx)
        self.assertTrue(torch.equal(a, b))
        self.assertTrue(torch.equal(a, re.loc.detach()[idx]))

    def test_train_is_stochastic_and_differentiable(self):
        re = _re(4, 3).train()
        idx = torch.tensor([3, 0, 0, 2, 1])
        a, b = re(idx), re(idx)
        self.assertFalse(torch.allclose(a, b))
        self.assertFalse(torch.allclose(a, re.loc.detach()[idx]))
        (a**2).sum().backward()
        for p in (re.loc, re.rho):
            self.assertIsNotNone(p.grad)
            # rows of the used clusters get a gradient, the others (none here) would not
            self.assertTrue((p.grad.abs().sum(1) > 0).all())

    def test_train_gradient_only_for_used_clusters(self):
        re = _re(4, 3).train()
        re(torch.tensor([1, 1, -1])).sum().backward()
        used = re.loc.grad.abs().sum(1) > 0
        self.assertEqual(used.tolist(), [False, True, False, False])
        self.assertEqual((re.rho.grad.abs().sum(1) > 0).tolist(), [False, True, False, False])

    def test_one_hot_equals_index_in_eval(self):
        re = _re(5, 2).eval()
        idx = torch.tensor([4, 0, 2, 2, 1])
        one_hot = torch.nn.functional.one_hot(idx, 5).float()
        torch.testing.assert_close(re(one_hot), re(idx))

    def test_soft_half_half_and_zero_row(self):
        re = _re(4, 3).eval()
        soft = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
        out = re(soft)
        loc = re.loc.detach()
        torch.testing.assert_close(out[0], (loc[0] + loc[1]) / 2)
        self.assertTrue(torch.equal(out[1], torch.zeros(3)))
        half = re.to(torch.bfloat16)(torch.softmax(torch.randn(64, 4), 1).to(torch.bfloat16))  # rounded, not refused
        self.assertEqual(half.dtype, torch.bfloat16)
        re.float()
        for row in ([1.0, 1.0, 0.0, 0.0], [-1.0, 2.0, 0.0, 0.0], [float("nan"), 0.0, 1.0, 0.0]):
            with self.assertRaisesRegex(ValueError, "soft cluster membership row 0 is .* expected probabilities"):
                re(torch.tensor([row]))

    def test_soft_zero_row_in_train(self):
        re = _re(4, 3).train()
        out = re(torch.zeros(2, 4))
        self.assertTrue(torch.equal(out, torch.zeros(2, 3)))


class TestRandomEffectsInit(unittest.TestCase):
    def test_default_scale_range(self):
        re = _re(200, 10)
        s = re.scale.detach()
        self.assertGreaterEqual(float(s.min()), 0.05 - 1e-6)
        self.assertLessEqual(float(s.max()), 0.10 + 1e-6)
        # spread over the interval, not collapsed at one end
        self.assertLess(float(s.min()), 0.055)
        self.assertGreater(float(s.max()), 0.095)

    def test_custom_scale_range(self):
        re = _re(200, 10, post_scale_init_min=0.2, post_scale_init_range=0.3)
        s = re.scale.detach()
        self.assertGreaterEqual(float(s.min()), 0.2 - 1e-6)
        self.assertLessEqual(float(s.max()), 0.5 + 1e-6)
        self.assertGreater(float(s.max()), 0.45)

    def test_reference_scale_init(self):
        re = _re(200, 10, reference_scale_init=True)
        s = re.scale.detach()
        self.assertGreaterEqual(float(s.min()), 0.0026)
        self.assertLessEqual(float(s.max()), 0.0501)
        self.assertLess(float(s.min()), 0.004)
        self.assertGreater(float(s.max()), 0.045)

    def test_loc_init_scale(self):
        re = _re(500, 4, post_loc_init_scale=[0.01, 0.01, 1.0, 1.0])
        sd = re.loc.detach().std(0)
        self.assertLess(float(sd[:2].max()), 0.02)
        self.assertGreater(float(sd[2:].min()), 0.8)

    def test_inverse_softplus(self):
        v = torch.tensor([1e-3, 0.05, 1.0, 7.0])
        torch.testing.assert_close(torch.nn.functional.softplus(inverse_softplus(v)), v)

    @parameterized.expand(
        [
            ({"n_clusters": 0}, "n_clusters"),
            ({"units": 0}, "units"),
            ({"prior_scale": 0.0}, "prior_scale"),
            ({"prior_scale": float("nan")}, "prior_scale must be > 0 \\(not NaN\\)"),
            ({"post_scale_init_min": -0.1}, "post_scale_init_min"),
            ({"kl_estimator": "exact"}, "kl_estimator"),
        ]
    )
    def test_bad_arguments(self, kwargs, word):
        args = {"n_clusters": 3, "units": 2, **kwargs}
        with self.assertRaisesRegex(ValueError, word):
            RandomEffects(**args)


class TestRandomEffectsKL(unittest.TestCase):
    def test_analytic_closed_form(self):
        re = _re(3, 4, prior_scale=0.3)
        mu, s, p = re.loc.detach(), re.scale.detach(), 0.3
        by_hand = (math.log(p) - torch.log(s) + (s**2 + mu**2) / (2 * p**2) - 0.5).sum()
        kl = re.kl_divergence()
        self.assertEqual(kl.dim(), 0)
        torch.testing.assert_close(kl.detach(), by_hand)
        ref = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu, s), torch.distributions.Normal(torch.zeros_like(mu), torch.full_like(s, p))
        ).sum()
        torch.testing.assert_close(kl.detach(), ref)
        self.assertGreater(float(kl.detach()), 0.0)

    def test_mc_estimate_approaches_analytic(self):
        torch.manual_seed(1)
        re = RandomEffects(3, 4, prior_scale=0.2, post_loc_init_scale=0.3, kl_estimator="mc")
        _set_scale(re, 0.15)
        analytic = RandomEffects(3, 4, prior_scale=0.2, kl_estimator="analytic")
        analytic.load_state_dict(re.state_dict())
        target = float(analytic.kl_divergence().detach())
        with torch.no_grad():
            draws = torch.stack([re.kl_divergence() for _ in range(4000)])
        self.assertGreater(float(draws.std()), 0.0)  # really Monte-Carlo
        self.assertAlmostEqual(float(draws.mean()), target, delta=0.05 * abs(target))

    def test_kl_zero_when_posterior_equals_prior(self):
        for estimator in ("analytic", "mc"):
            re = _re(3, 2, prior_scale=0.4, kl_estimator=estimator)
            with torch.no_grad():
                re.loc.zero_()
            _set_scale(re, 0.4)
            self.assertAlmostEqual(float(re.kl_divergence().detach()), 0.0, places=4)

    def test_per_unit_prior_scale(self):
        prior = torch.tensor([0.1, 0.5, 2.0])
        re = _re(4, 3, prior_scale=prior.tolist())
        torch.testing.assert_close(re.prior_scale, prior)
        mu, s = re.loc.detach(), re.scale.detach()
        by_hand = (torch.log(prior / s) + (s**2 + mu**2) / (2 * prior**2) - 0.5).sum()
        torch.testing.assert_close(re.kl_divergence().detach(), by_hand)
        # differs from using any single prior for all units
        single = (torch.log(0.5 / s) + (s**2 + mu**2) / (2 * 0.5**2) - 0.5).sum()
        self.assertFalse(torch.allclose(by_hand, single))

    def test_per_unit_wrong_length(self):
        with self.assertRaisesRegex(ValueError, r"prior_scale.*\(3\)"):
            RandomEffects(4, 3, prior_scale=[0.1, 0.2])
        with self.assertRaisesRegex(ValueError, "post_loc_init_scale"):
            RandomEffects(4, 3, post_loc_init_scale=[0.1, 0.2, 0.3, 0.4])

    def test_learnable_prior_gets_gradient(self):
        re = _re(4, 3, learn_prior_scale=True)
        self.assertIn("log_prior_scale", dict(re.named_parameters()))
        re.kl_divergence().backward()
        self.assertIsNotNone(re.log_prior_scale.grad)
        self.assertNotEqual(float(re.log_prior_scale.grad.abs().sum()), 0.0)

    def test_fixed_prior_is_buffer(self):
        re = _re(4, 3)
        self.assertNotIn("log_prior_scale", dict(re.named_parameters()))
        self.assertIn("log_prior_scale", dict(re.named_buffers()))

    def test_kl_gradient_reaches_posterior(self):
        re = _re(4, 3)
        re.kl_divergence().backward()
        self.assertTrue((re.loc.grad != 0).any())
        self.assertTrue((re.rho.grad != 0).all())


class TestRandomEffectsErrors(unittest.TestCase):
    @parameterized.expand([("too_high", 4, "4"), ("below_minus_one", -2, "-2")])
    def test_out_of_range_index(self, _, bad, shown):
        re = _re(4, 2)
        for training in (True, False):
            re.train(training)
            with self.assertRaises(IndexError) as ctx:
                re(torch.tensor([0, bad, 1]))
            msg = str(ctx.exception)
            self.assertIn(shown, msg)
            self.assertIn("0..3", msg)
            self.assertIn("-1", msg)

    def test_soft_wrong_width(self):
        re = _re(4, 2)
        with self.assertRaisesRegex(ValueError, r"\(batch, 4\)"):
            re(torch.full((3, 5), 0.2))

    def test_index_wrong_dim(self):
        re = _re(4, 2)
        with self.assertRaisesRegex(ValueError, r"\(batch,\)"):
            re(torch.zeros(3, 1, dtype=torch.long))


class TestSamplePerRow(unittest.TestCase):
    def test_shared_draw_per_cluster(self):
        re = _re(4, 3, sample_per_row=False).train()
        out = re(torch.tensor([2, 2, 1, 2]))
        self.assertTrue(torch.equal(out[0], out[1]))
        self.assertTrue(torch.equal(out[0], out[3]))
        self.assertFalse(torch.equal(out[0], out[2]))

    def test_default_draws_per_row(self):
        re = _re(4, 3).train()
        self.assertTrue(re.sample_per_row)
        out = re(torch.tensor([2, 2]))
        self.assertFalse(torch.equal(out[0], out[1]))

    def test_shared_draw_eval_is_mean(self):
        re = _re(4, 3, sample_per_row=False).eval()
        idx = torch.tensor([2, 2, 1])
        self.assertTrue(torch.equal(re(idx), re.loc.detach()[idx]))


class TestSpread(unittest.TestCase):
    def test_spread(self):
        re = _re(6, 3)
        torch.testing.assert_close(re.spread(), re.loc.detach().std(0))
        self.assertEqual(tuple(re.spread().shape), (3,))

    def test_spread_one_cluster(self):
        re = _re(1, 3)
        self.assertTrue(torch.equal(re.spread(), torch.zeros(3)))


class TestGradientReversal(unittest.TestCase):
    @parameterized.expand([(1.0,), (0.5,), (3.0,)])
    def test_forward_identity_backward_reversed(self, weight):
        x = torch.randn(4, 3, requires_grad=True)
        layer = GradientReversal(weight)
        y = layer(x)
        self.assertTrue(torch.equal(y, x.detach()))
        upstream = torch.randn(4, 3)
        y.backward(upstream)
        torch.testing.assert_close(x.grad, -weight * upstream)

    def test_function_and_schedulable_weight(self):
        x = torch.randn(5, requires_grad=True)
        (grad_reverse(x, 2.0) * 3).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((5,), -6.0))
        layer = GradientReversal()
        layer.weight = 0.25
        x.grad = None
        layer(x).sum().backward()
        torch.testing.assert_close(x.grad, torch.full((5,), -0.25))
        self.assertIn("0.25", repr(layer))


class TestCorrelatedRandomEffects(unittest.TestCase):
    def _full(self, n_clusters: int = 5, units: int = 3, **kwargs) -> RandomEffects:
        re = _re(n_clusters, units, covariance="full", learn_prior_scale=True, prior_scale=[1.0, 0.5, 2.0], **kwargs)
        with torch.no_grad():  # a correlated prior and posterior, away from the initial diagonal ones
            re.prior_tril.copy_(torch.tensor([0.3, -0.4, 0.2]))
            re.tril.normal_(0, 0.2)
            re.loc.normal_(0, 1.0)
        return re

    def test_kl_matches_torch_multivariate_normal(self):
        re = self._full()
        post = torch.distributions.MultivariateNormal(re.loc, scale_tril=re.posterior_cholesky())
        prior = torch.distributions.MultivariateNormal(torch.zeros(3), scale_tril=re.prior_cholesky())
        expected = torch.distributions.kl_divergence(post, prior)
        torch.testing.assert_close(re.kl_divergence(), expected.sum(), rtol=1e-5, atol=1e-5)

    def test_diagonal_kl_unchanged_and_equal_to_full_with_zero_off_diagonals(self):
        diagonal = _re(4, 3, prior_scale=[1.0, 0.5, 2.0])
        full = _re(4, 3, prior_scale=[1.0, 0.5, 2.0], covariance="full")
        self.assertNotIn("tril", diagonal.state_dict())  # old checkpoints keep loading
        full.load_state_dict(diagonal.state_dict(), strict=False)
        torch.testing.assert_close(full.kl_divergence(), diagonal.kl_divergence(), rtol=1e-5, atol=1e-5)

    def test_batch_kl_estimate_is_exact_over_all_rows_and_unbiased(self):
        counts = torch.tensor([1.0, 4.0, 2.0, 3.0, 2.0])
        re = self._full(level_counts=counts)
        rows = torch.repeat_interleave(torch.arange(5), counts.long())  # every training row once
        torch.testing.assert_close(re.kl_divergence(rows), re.kl_divergence(), rtol=1e-5, atol=1e-5)
        torch.manual_seed(1)
        with torch.no_grad():
            draws = [re.kl_divergence(rows[torch.randint(0, len(rows), (4,))]) for _ in range(2000)]
            torch.testing.assert_close(torch.stack(draws).mean(), re.kl_divergence(), rtol=0.05, atol=0.0)
            unseen = re.kl_divergence(torch.tensor([-1, -1]))
            # training batches with unseen (-1) rows: the estimate stays unbiased (the mean runs over seen rows)
            mixed = torch.cat([rows, torch.full((len(rows),), -1)])
            draws = [re.kl_divergence(mixed[torch.randint(0, len(mixed), (6,))]) for _ in range(2000)]
            torch.testing.assert_close(torch.stack(draws).mean(), re.kl_divergence(), rtol=0.05, atol=0.0)
            torch.testing.assert_close(re.kl_divergence(torch.cat([rows, -rows.new_ones(3)])), re.kl_divergence())
        self.assertEqual(float(unseen), 0.0)

    def test_diagonal_prior_has_no_covariance_rows(self):
        rows = _re(4, 2, unit_names=["(Intercept)", "x"]).variance_components("g")
        self.assertEqual([r["var2"] for r in rows], [None, None])
        with self.assertRaisesRegex(ValueError, "post_scale_init_min > 1e-05"):
            _re(4, 2, post_scale_init_min=1e-6)

    def test_batch_kl_needs_counts(self):
        with self.assertRaisesRegex(ValueError, "level_counts"):
            self._full().kl_divergence(torch.tensor([0, 1]))
        with self.assertRaisesRegex(ValueError, "level_counts must give"):
            _re(3, 2, level_counts=[1, 0, 2])

    def test_draws_have_the_posterior_covariance(self):
        re = self._full().train()
        torch.manual_seed(2)
        draws = re(torch.full((40000,), 2)).detach()
        chol = re.posterior_cholesky()[2].detach()
        torch.testing.assert_close(torch.cov(draws.T), chol @ chol.T, rtol=0.0, atol=0.01)
        torch.testing.assert_close(draws.mean(0), re.loc.detach()[2], rtol=0.0, atol=0.01)

    def test_linear_predictor_mean_and_variance(self):
        re = self._full()
        cluster, design = torch.tensor([0, 4, -1]), torch.tensor([[1.0, 2.0, 0.5], [1.0, -1.0, 0.0], [1.0, 3.0, 1.0]])
        mean, var = re.linear_predictor(cluster, design)
        chol = re.posterior_cholesky().detach()
        for row, c in enumerate([0, 4]):
            z = design[row]
            self.assertAlmostEqual(float(mean[row]), float(z @ re.loc.detach()[c]), places=5)
            self.assertAlmostEqual(float(var[row]), float(z @ chol[c] @ chol[c].T @ z), places=5)
        self.assertEqual((float(mean[2]), float(var[2])), (0.0, 0.0))

    def test_variance_components_rows_like_lme4(self):
        re = _re(4, 2, covariance="full", prior_scale=[3.0, 2.0], unit_names=["(Intercept)", "Days"])
        with torch.no_grad():
            re.prior_tril.copy_(torch.tensor([1.0]))  # P = [[3, 0], [1, 2]]: Sigma = [[9, 3], [3, 5]]
        rows = re.variance_components("Subject")
        self.assertEqual([(r["grp"], r["var1"], r["var2"]) for r in rows],
                         [("Subject", "(Intercept)", None), ("Subject", "Days", None), ("Subject", "(Intercept)", "Days")])
        self.assertAlmostEqual(rows[0]["vcov"], 9.0, places=5)
        self.assertAlmostEqual(rows[1]["sdcor"], math.sqrt(5.0), places=5)
        self.assertAlmostEqual(rows[2]["vcov"], 3.0, places=5)
        self.assertAlmostEqual(rows[2]["sdcor"], 3.0 / math.sqrt(45.0), places=5)

    def test_empirical_bayes_prior_reaches_its_closed_form_optimum(self):
        # for fixed posteriors, the KL is minimised by Sigma = mean_c (mu mu^T + S S^T): gradient descent must get there
        re = self._full(n_clusters=50)
        for p in (re.loc, re.rho, re.tril):
            p.requires_grad_(False)
        optimizer = torch.optim.LBFGS([re.log_prior_scale, re.prior_tril], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            kl = re.kl_divergence()
            kl.backward()
            return kl

        optimizer.step(closure)
        chol = re.posterior_cholesky()
        optimum = (re.loc.unsqueeze(2) * re.loc.unsqueeze(1) + chol @ chol.transpose(1, 2)).mean(0)
        torch.testing.assert_close(re.prior_covariance().detach(), optimum, rtol=0.0, atol=2e-3)

    def test_one_unit_layers_save_as_torchscript(self):
        for covariance in ("diagonal", "full"):
            re = _re(3, 1, covariance=covariance).eval()
            buffer = io.BytesIO()
            torch.jit.save(torch.jit.script(re), buffer)  # serialization rejects views into empty storage
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
            torch.testing.assert_close(loaded(torch.tensor([2, -1])), re(torch.tensor([2, -1])))

    def test_torchscript_full_covariance(self):
        re = self._full().eval()
        scripted = torch.jit.script(re)
        index = torch.tensor([1, -1, 3])
        torch.testing.assert_close(scripted(index), re(index))


if __name__ == "__main__":
    unittest.main()
