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
"""Tests of the likelihood families (monai_armed.losses.families) against torch.distributions and scipy.stats."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from torch import distributions as D

from monai_armed.losses import (
    FAMILIES,
    BernoulliLikelihood,
    BinomialLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    LikelihoodFamily,
    PoissonLikelihood,
    likelihood,
    validate_weights,
)

pytestmark = pytest.mark.usefixtures("single_thread")

B = 7


def _eta(seed: int = 0, scale: float = 1.5) -> torch.Tensor:
    return scale * torch.randn(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _cases() -> list[tuple[LikelihoodFamily, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]]:
    """(family, eta, y, trials, log p(y | eta) per row from torch.distributions)."""
    eta = _eta()
    sigma = 0.7
    y_gauss = eta + torch.tensor([0.3, -1.1, 0.0, 2.0, -0.4, 0.9, -2.5], dtype=torch.float64)
    y_bern = torch.tensor([0.0, 1, 1, 0, 1, 0, 0], dtype=torch.float64)
    trials = torch.tensor([1.0, 5, 5, 10, 3, 8, 2], dtype=torch.float64)
    y_binom = torch.tensor([0.0, 5, 2, 7, 3, 0, 1], dtype=torch.float64)
    y_pois = torch.tensor([0.0, 1, 4, 2, 9, 0, 3], dtype=torch.float64)
    logits = torch.randn(B, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_cat = torch.tensor([0, 3, 1, 2, 2, 0, 1])
    return [
        (GaussianLikelihood(scale_init=sigma), eta, y_gauss, None, D.Normal(eta, sigma).log_prob(y_gauss)),
        (BernoulliLikelihood(), eta, y_bern, None, D.Bernoulli(logits=eta).log_prob(y_bern)),
        (BinomialLikelihood(), eta, y_binom, trials, D.Binomial(trials, logits=eta).log_prob(y_binom)),
        (PoissonLikelihood(), eta, y_pois, None, D.Poisson(eta.exp()).log_prob(y_pois)),
        (CategoricalLikelihood(n_classes=4), logits, y_cat, None, D.Categorical(logits=logits).log_prob(y_cat)),
    ]


@pytest.mark.parametrize("case", range(5), ids=["gaussian", "bernoulli", "binomial", "poisson", "categorical"])
def test_nll_is_the_full_negative_log_density(case):
    family, eta, y, trials, log_prob = _cases()[case]
    family.reduction = "none"
    per_row = family(eta, y, trials=trials)
    assert per_row.shape == (B,)
    torch.testing.assert_close(per_row, -log_prob)
    family.reduction = "sum"
    torch.testing.assert_close(family(eta, y, trials=trials), -log_prob.sum())
    family.reduction = "mean"
    torch.testing.assert_close(family(eta, y, trials=trials), -log_prob.mean())
    if eta.dim() == 1:  # (B, 1) predictions and targets give the same values
        torch.testing.assert_close(family(eta[:, None], y[:, None], trials=trials), -log_prob.mean())


def test_nll_matches_scipy():
    eta = _eta()
    sigma = 1.3
    y = np.array([0.0, 1, 4, 2, 9, 0, 3])
    n = np.array([4.0, 1, 6, 2, 9, 5, 3])
    p = 1 / (1 + np.exp(-eta.numpy()))
    yt, nt = torch.as_tensor(y), torch.as_tensor(n)
    gaussian = GaussianLikelihood(scale_init=sigma, reduction="sum")
    assert gaussian(eta, yt).item() == pytest.approx(-stats.norm.logpdf(y, eta.numpy(), sigma).sum(), rel=1e-6)
    binomial = BinomialLikelihood(reduction="sum")
    assert binomial(eta, yt, trials=nt).item() == pytest.approx(-stats.binom.logpmf(y, n, p).sum(), rel=1e-10)
    poisson = PoissonLikelihood(reduction="sum")
    assert poisson(eta, yt).item() == pytest.approx(-stats.poisson.logpmf(y, np.exp(eta.numpy())).sum(), rel=1e-10)


@pytest.mark.parametrize("case", range(5), ids=["gaussian", "bernoulli", "binomial", "poisson", "categorical"])
def test_weights_multiply_rows_and_mean_divides_by_batch_size(case):
    family, eta, y, trials, log_prob = _cases()[case]
    weight = torch.tensor([0.0, 2.0, 0.5, 1.0, 3.0, 0.25, 1.0], dtype=torch.float64)
    family.reduction = "none"
    torch.testing.assert_close(family(eta, y, weight=weight, trials=trials), -weight * log_prob)
    family.reduction = "mean"
    # (1/B) sum w_i nll_i, not the weighted average (the weights sum to 7.75, not B)
    torch.testing.assert_close(family(eta, y, weight=weight[:, None], trials=trials), -(weight * log_prob).sum() / B)


def test_reduction_and_shape_errors():
    with pytest.raises(ValueError, match="reduction must be one of mean, sum, none"):
        PoissonLikelihood(reduction="avg")
    family = PoissonLikelihood()
    with pytest.raises(ValueError, match=r"pred has shape \(7,\) but target has shape \(6,\)"):
        family(_eta(), torch.zeros(6))
    with pytest.raises(ValueError, match=r"pred has shape \(7, 1\) but weight has shape \(5,\)"):
        family(_eta()[:, None], torch.zeros(B), weight=torch.ones(5))
    with pytest.raises(ValueError, match=r"pred has shape \(7,\) but pred_var has shape \(3, 1\)"):
        family(_eta(), torch.zeros(B), pred_var=torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"pred must be \(batch,\) or \(batch, 1\), got shape \(7, 2\)"):
        family(torch.zeros(B, 2), torch.zeros(B))
    with pytest.raises(ValueError, match=r"pred must be logits \(batch, 3\), got shape \(7, 4\)"):
        CategoricalLikelihood(n_classes=3)(torch.zeros(B, 4), torch.zeros(B))
    with pytest.raises(ValueError, match="empty batch"):
        family(torch.zeros(0), torch.zeros(0))
    # one column would give a loss of exactly 0 for class 0 (nothing to train)
    with pytest.raises(ValueError, match=r"pred must be logits \(batch, n_classes >= 2\), got shape \(7, 1\)"):
        CategoricalLikelihood()(torch.zeros(B, 1), torch.zeros(B))
    with pytest.raises(ValueError, match=r"class indices 0\.\.2 for logits of 3 classes, got values \[0, 3\]"):
        CategoricalLikelihood()(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pred_var is a variance and must be >= 0"):
        GaussianLikelihood()(torch.zeros(3), torch.zeros(3), pred_var=torch.tensor([0.0, -5.0, 1.0]))
    with pytest.raises(ValueError, match="the binomial family needs the number of trials"):
        BinomialLikelihood()(_eta(), torch.zeros(B))
    with pytest.raises(ValueError, match=r"pred has shape \(7,\) but trials has shape \(2,\)"):
        BinomialLikelihood()(_eta(), torch.zeros(B), trials=torch.ones(2))


def test_binomial_accepts_one_number_of_trials():
    eta, y = _eta(), torch.tensor([0.0, 1, 4, 2, 3, 0, 4], dtype=torch.float64)
    family = BinomialLikelihood(reduction="none")
    torch.testing.assert_close(family(eta, y, trials=4), -D.Binomial(4, logits=eta).log_prob(y))


def _monte_carlo(family: LikelihoodFamily, eta, var, y, trials=None, draws: int = 400_000):
    """Per-row mean of the nll over draws of eta ~ N(eta, var) (antithetic pairs), and its standard error."""
    z = torch.randn(draws // 2, eta.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = torch.cat([z, -z])
    samples = eta + var.sqrt() * z
    family.reduction = "none"
    repeated = None if trials is None else trials.repeat(draws)
    nll = family(samples.reshape(-1), y.repeat(draws), trials=repeated).reshape(draws, -1).detach()
    pairs = 0.5 * (nll[: draws // 2] + nll[draws // 2 :])
    return nll.mean(0), pairs.std(0) / math.sqrt(draws // 2)


def test_gaussian_expected_nll_is_analytic_and_matches_monte_carlo():
    eta = _eta()
    var = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 0.3, 4.0], dtype=torch.float64)
    y = eta + torch.tensor([0.3, -1.1, 0.0, 2.0, -0.4, 0.9, -2.5], dtype=torch.float64)
    family = GaussianLikelihood(scale_init=0.8, reduction="none").double()
    expected = family(eta, y, pred_var=var)
    sigma2 = 0.64
    formula = 0.5 * math.log(2 * math.pi * sigma2) + ((y - eta) ** 2 + var) / (2 * sigma2)
    torch.testing.assert_close(expected, formula)
    mc, se = _monte_carlo(family, eta, var, y)
    assert bool(((expected - mc).abs() < 4 * se + 1e-6).all()), (expected, mc, se)
    torch.testing.assert_close(expected.detach(), mc, rtol=1e-2, atol=1e-2)


def test_poisson_expected_nll_is_closed_form_and_matches_monte_carlo():
    eta = _eta(scale=0.8)
    var = torch.tensor([0.0, 0.05, 0.2, 0.5, 1.0, 0.3, 0.1], dtype=torch.float64)
    y = torch.tensor([0.0, 1, 4, 2, 9, 0, 3], dtype=torch.float64)
    family = PoissonLikelihood(reduction="none")
    expected = family(eta, y, pred_var=var)
    torch.testing.assert_close(expected, (eta + var / 2).exp() - y * eta + torch.lgamma(y + 1))
    mc, se = _monte_carlo(family, eta, var, y)
    assert bool(((expected - mc).abs() < 4 * se + 1e-6).all()), (expected, mc, se)
    assert float((expected - mc).abs().max()) < 1e-2


@pytest.mark.parametrize("binomial", [False, True], ids=["bernoulli", "binomial"])
def test_logit_quadrature_matches_monte_carlo_and_exact_integral(binomial):
    eta = _eta()
    var = torch.tensor([0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 0.3], dtype=torch.float64)
    if binomial:
        family, trials = BinomialLikelihood(reduction="none"), torch.tensor([1.0, 3, 2, 3, 1, 2, 3], dtype=torch.float64)
        y = torch.tensor([0.0, 3, 1, 2, 1, 0, 3], dtype=torch.float64)
    else:
        family, trials = BernoulliLikelihood(reduction="none"), None
        y = torch.tensor([0.0, 1, 1, 0, 1, 0, 0], dtype=torch.float64)
    expected = family(eta, y, trials=trials, pred_var=var)
    assert torch.equal(expected, family(eta, y, trials=trials, pred_var=var))  # deterministic
    torch.testing.assert_close(expected[0], family(eta, y, trials=trials)[0])  # zero variance: the plain nll
    mc, _ = _monte_carlo(family, eta, var, y, trials)
    assert float((expected - mc).abs().max()) < 1e-2, (expected, mc)
    # the same expectation by adaptive integration of the nll against the normal density
    n = np.ones(B) if trials is None else trials.numpy()
    for i in range(1, B):
        m, s = float(eta[i]), math.sqrt(float(var[i]))
        nll = lambda t: -stats.binom.logpmf(y[i].item(), n[i], 1 / (1 + math.exp(-t)))  # noqa: E731
        exact = integrate.quad(lambda t: nll(t) * stats.norm.pdf(t, m, s), m - 12 * s, m + 12 * s, limit=200)[0]
        assert float(expected[i]) == pytest.approx(exact, abs=1e-4)


def test_categorical_refuses_pred_var():
    family = CategoricalLikelihood()
    with pytest.raises(NotImplementedError, match="categorical family has no expected negative log-likelihood"):
        family(torch.zeros(3, 2), torch.tensor([0, 1, 1]), pred_var=torch.ones(3))


@pytest.mark.parametrize("name", ["bernoulli", "binomial", "poisson", "gaussian"])
def test_gradients_reach_pred_pred_var_and_scale(name):
    family = likelihood(name)
    pred = _eta().float().requires_grad_(True)
    var = torch.full((B, 1), 0.5, requires_grad=True)
    y = torch.tensor([0.0, 1, 1, 0, 1, 0, 1])
    family(pred[:, None], y, trials=torch.full((B,), 2.0), pred_var=var).backward()
    assert pred.grad is not None and bool(pred.grad.abs().gt(0).all())
    assert var.grad is not None and bool(var.grad.abs().gt(0).all())
    if name == "gaussian":
        assert family.log_scale.grad is not None and float(family.log_scale.grad.abs()) > 0


def test_zero_pred_var_gives_finite_gradients():
    pred = _eta().requires_grad_(True)
    var = torch.zeros(B, dtype=torch.float64, requires_grad=True)
    BernoulliLikelihood()(pred, torch.ones(B), pred_var=var).backward()
    assert bool(torch.isfinite(pred.grad).all()) and bool(torch.isfinite(var.grad).all())


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_maximum_likelihood_scale_is_the_residual_variance(optimizer):
    gen = torch.Generator().manual_seed(3)
    mu = torch.randn(200, generator=gen)
    y = mu + 2.5 * torch.randn(200, generator=gen)
    family = GaussianLikelihood(scale_init=0.5)
    if optimizer == "adam":
        opt = torch.optim.Adam(family.parameters(), lr=0.05)
        for _ in range(600):
            opt.zero_grad()
            family(mu, y).backward()
            opt.step()
    else:
        opt = torch.optim.LBFGS(family.parameters(), lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = family(mu, y)
            loss.backward()
            return loss

        opt.step(closure)
    residual_variance = float(((y - mu) ** 2).mean())
    assert family.residual_variance() == pytest.approx(residual_variance, rel=1e-3)
    assert float(family.variance.detach()) == pytest.approx(float(family.scale.detach()) ** 2, rel=1e-6)


def test_gaussian_scale_buffer_and_init_from_data():
    fixed = GaussianLikelihood(scale_init=2.0, learn_scale=False)
    assert list(fixed.parameters()) == [] and "log_scale" in dict(fixed.named_buffers())
    assert fixed.residual_variance() == pytest.approx(4.0)
    y = np.array([1.0, 3.0, 2.0, 6.0])
    assert GaussianLikelihood().init_from_data(y).scale.item() == pytest.approx(float(y.std()), rel=1e-6)
    with pytest.raises(ValueError, match="constant response"):
        GaussianLikelihood().init_from_data(np.ones(4))
    with pytest.raises(ValueError, match="scale_init must be a finite number > 0"):
        GaussianLikelihood(scale_init=0.0)
    assert BernoulliLikelihood().residual_variance() is None
    assert PoissonLikelihood().residual_variance() is None


def test_mean_is_the_inverse_link():
    eta = torch.tensor([-1.0, 0.0, 2.0])
    torch.testing.assert_close(likelihood("gaussian").mean(eta), eta)
    torch.testing.assert_close(likelihood("bernoulli").mean(eta), 1 / (1 + torch.exp(-eta)))
    torch.testing.assert_close(likelihood("binomial").mean(eta[:, None]), 1 / (1 + torch.exp(-eta[:, None])))
    torch.testing.assert_close(likelihood("poisson").mean(eta), torch.tensor([math.exp(-1), 1.0, math.exp(2)]))
    probs = likelihood("categorical").mean(eta[None])
    torch.testing.assert_close(probs, (torch.exp(eta) / torch.exp(eta).sum())[None])
    assert (likelihood("bernoulli").link, likelihood("poisson").link, likelihood("gaussian").link) == (
        "logit",
        "log",
        "identity",
    )


def test_unit_deviance_by_hand():
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    gaussian = likelihood("gaussian", scale_init=3.0).unit_deviance(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5]))
    torch.testing.assert_close(gaussian, torch.tensor([4.0, 2.25]))
    bern = likelihood("bernoulli").unit_deviance(torch.tensor([logit(0.8), logit(0.8)]), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bern, torch.tensor([-2 * math.log(0.8), -2 * math.log(0.2)]))
    # n = 4, p = 0.25 (mu = 1): y = 0 -> 2*4*log(4/3); y = 4 -> 2*4*log(4); y = 2 -> 2*[2 log 2 + 2 log(2/3)]
    eta = torch.full((3,), logit(0.25), dtype=torch.float64)
    binom = likelihood("binomial").unit_deviance(eta, torch.tensor([0.0, 4.0, 2.0]), trials=4)
    want = [8 * math.log(4 / 3), 8 * math.log(4), 2 * (2 * math.log(2) + 2 * math.log(2 / 3))]
    torch.testing.assert_close(binom, torch.tensor(want, dtype=torch.float64))
    # mu = 2: y = 0 -> 2*mu; y = 3 -> 2*[3 log 1.5 - 1]; y = 2 -> 0
    pois = likelihood("poisson").unit_deviance(torch.full((3,), math.log(2.0)), torch.tensor([0.0, 3.0, 2.0]))
    torch.testing.assert_close(pois, torch.tensor([4.0, 2 * (3 * math.log(1.5) - 1), 0.0]))
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    cat = likelihood("categorical").unit_deviance(logits, torch.tensor([2]))
    torch.testing.assert_close(cat, torch.tensor([-2 * math.log(0.3)]))


def test_unit_deviance_is_finite_on_the_boundary():
    eta = torch.tensor([-40.0, 40.0, -40.0, 40.0])
    binom = likelihood("binomial").unit_deviance(eta, torch.tensor([0.0, 5.0, 5.0, 0.0]), trials=5)
    assert bool(torch.isfinite(binom).all())
    torch.testing.assert_close(binom[:2], torch.zeros(2), atol=1e-12, rtol=0)
    assert float(binom[2]) == pytest.approx(400.0, rel=1e-6)  # 2 * 5 * 40, the fitted p near 0 for y = n
    pois = likelihood("poisson").unit_deviance(torch.tensor([-30.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert bool(torch.isfinite(pois).all()) and float(pois[1]) == pytest.approx(2.0)


def test_validate_target_accepts_valid_columns():
    likelihood("bernoulli").validate_target(np.array([0, 1, 1, 0]))
    likelihood("bernoulli").validate_target(torch.tensor([[True], [False]]))
    likelihood("binomial").validate_target([0, 3, 5], trials=[5, 3, 5])
    likelihood("binomial").validate_target([0, 3, 5], trials=5)
    likelihood("poisson").validate_target(torch.tensor([0.0, 7.0, 120.0]))
    likelihood("categorical", n_classes=3).validate_target([0, 2, 1])
    likelihood("categorical").validate_target([0, 12])
    likelihood("gaussian").validate_target(np.array([-2.37, 1e6]))
    validate_weights([0.0, 1.5, 2.0])


@pytest.mark.parametrize(
    "family,values,kwargs,message",
    [
        ("bernoulli", [0, 1, 1, 2.37, 0], {}, "column 'y' row 3 has 2.37; the bernoulli family expects 0 or 1"),
        ("bernoulli", [0, 1, float("nan")], {"name": "label"}, "column 'label' row 2 has nan; the bernoulli family"),
        (
            "binomial",
            [0, 3, 7],
            {"trials": [5, 5, 5], "name": "hits", "trials_name": "shots"},
            "column 'hits' row 2 has 7 successes but column 'shots' has 5 trials there",
        ),
        ("binomial", [0, -1, 2], {"trials": 5}, "column 'y' row 1 has -1; the binomial family expects whole-number"),
        (
            "binomial",
            [0, 1, 1],
            {"trials": [2, 0, 2]},
            "column 'trials' row 1 has 0; the binomial family expects whole-number trials >= 1",
        ),
        ("binomial", [0, 1, 1], {"trials": [2, 2.5, 2]}, "column 'trials' row 1 has 2.5"),
        ("binomial", [0, 1], {}, "the binomial family needs the number of trials to check column 'y'"),
        ("binomial", [0, 1], {"trials": [2, 2, 2]}, "column 'trials' has 3 rows but column 'y' has 2"),
        ("poisson", [0, 4, 1.5], {"name": "count"}, "column 'count' row 2 has 1.5; the poisson family expects whole"),
        ("poisson", [0, -3], {}, "column 'y' row 1 has -3; the poisson family expects whole-number counts >= 0"),
        ("categorical", [0, 1, 0.5], {}, "column 'y' row 2 has 0.5; the categorical family expects class indices"),
        ("gaussian", [0.5, float("inf")], {"name": "bmi"}, "column 'bmi' row 1 has inf; the gaussian family"),
    ],
)
def test_validate_target_names_column_row_and_value(family, values, kwargs, message):
    with pytest.raises(ValueError) as info:
        likelihood(family).validate_target(np.array(values, dtype=float), **kwargs)
    assert message in str(info.value)


def test_validate_target_of_categorical_with_n_classes():
    expected = r"column 'y' row 1 has 3; the categorical family expects class indices, whole numbers 0\.\.2"
    with pytest.raises(ValueError, match=expected):
        likelihood("categorical", n_classes=3).validate_target(torch.tensor([2, 3, 0]))
    with pytest.raises(ValueError, match="column 'y' must be one column"):
        likelihood("gaussian").validate_target(np.zeros((4, 2)))


@pytest.mark.parametrize(
    "values,message",
    [
        ([1.0, -0.5], "column 'weights' row 1 has -0.5; row weights must be finite numbers >= 0"),
        ([1.0, 1.0, float("nan")], "column 'weights' row 2 has nan"),
        ([0.0, 0.0], "column 'weights' has only zero weights"),
    ],
)
def test_validate_weights(values, message):
    with pytest.raises(ValueError) as info:
        validate_weights(np.array(values))
    assert message in str(info.value)


def test_factory_names_and_aliases():
    assert set(FAMILIES) == {"gaussian", "bernoulli", "categorical", "binomial", "poisson"}
    for name, cls in FAMILIES.items():
        family = likelihood(name.upper())
        assert type(family) is cls and family.name == name
    assert type(likelihood(" Binary ")) is BernoulliLikelihood
    assert likelihood("categorical", n_classes=5, reduction="sum").n_classes == 5
    with pytest.raises(ValueError) as info:
        likelihood("gamma")
    assert "unknown likelihood family 'gamma'" in str(info.value)
    assert "bernoulli, binomial, categorical, gaussian, poisson" in str(info.value)
