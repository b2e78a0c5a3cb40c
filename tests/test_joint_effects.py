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

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from monai_armed.apps import fit_formula
from monai_armed.apps.joint_effects import EffectsLayout, GaussianMarginalLikelihood, JointPosteriorELBO
from monai_armed.apps.mixed_model import _build_network
from monai_armed.data import build_design
from monai_armed.losses import likelihood

CROSSED = "y ~ x + (1 + x | subject) + (1 | site)"


def _crossed_frame(seed: int = 0, rows: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    subject, site = rng.integers(0, 6, rows), rng.integers(0, 4, rows)
    x = rng.normal(size=rows)
    y = 1 + 0.5 * x + rng.normal(0, 1, 6)[subject] + rng.normal(0, 0.7, 6)[subject] * x + rng.normal(0, 1, 4)[site]
    return pd.DataFrame({"y": y + rng.normal(0, 0.5, rows), "x": x, "subject": subject.astype(str),
                         "site": site.astype(str)})  # fmt: skip


def _model_at_random_parameters(formula: str, frame: pd.DataFrame, seed: int = 0):
    """A design, its network and a gaussian family with arbitrary (not fitted) fixed effects, priors and scale."""
    design = build_design(formula, frame)
    network = _build_network(design, likelihood("gaussian"), (), False, []).double()
    family = likelihood("gaussian").double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        network.out.weight.copy_(torch.randn(network.out.weight.shape, generator=g, dtype=torch.float64))
        family.log_scale.fill_(-0.3)
        for layer in network.random_effects.values():
            layer.log_prior_scale.copy_(0.3 * torch.randn(layer.log_prior_scale.shape, generator=g, dtype=torch.float64))
            layer.prior_tril.copy_(0.4 * torch.randn(layer.prior_tril.shape, generator=g, dtype=torch.float64))
    return design, network, family


def _dense(design, network, family):
    """The marginal model written out densely: X, y, beta, Z (N x q), G (q x q), sigma^2 (numpy float64)."""
    columns, covariances = [], []
    for key, factor in design.factors.items():
        levels, units = factor.n_levels, factor.Z.shape[1]
        z = np.zeros((design.n_rows, levels * units))
        for k in range(units):
            z[np.arange(design.n_rows), factor.codes * units + k] = factor.Z[:, k]
        columns.append(z)
        prior = network.random_effects[key].prior_covariance().detach().numpy()
        covariances.append(np.kron(np.eye(levels), prior))
    q = sum(c.shape[0] for c in covariances)
    G = np.zeros((q, q))
    start = 0
    for c in covariances:
        G[start : start + len(c), start : start + len(c)] = c
        start += len(c)
    beta = network.out.weight.detach().numpy()[0]
    return design.X, design.y, beta, np.concatenate(columns, 1), G, float(family.variance.detach())


def _dense_nll(X, y, beta, Z, G, variance, reml=False) -> float:
    """-log N(y; X beta, Z G Z^T + sigma^2 I) per row (plus 0.5 log|X^T V^-1 X| per row for REML)."""
    V = Z @ G @ Z.T + variance * np.eye(len(y))
    r = y - X @ beta
    total = len(y) * np.log(2 * np.pi) + np.linalg.slogdet(V)[1] + r @ np.linalg.solve(V, r)
    if reml:
        total += np.linalg.slogdet(X.T @ np.linalg.solve(V, X))[1]
    return 0.5 * total / len(y)


@pytest.mark.parametrize("reml", [False, True])
def test_criterion_is_the_dense_gaussian_marginal_likelihood(reml):
    design, network, family = _model_at_random_parameters(CROSSED, _crossed_frame())
    y = torch.tensor(design.y)
    value = GaussianMarginalLikelihood(design, network, family, y, reml=reml)()
    assert float(value.detach()) == pytest.approx(_dense_nll(*_dense(design, network, family), reml=reml), rel=1e-9)


def test_row_weights_count_as_repeated_rows():
    frame = _crossed_frame(1)
    weights = np.random.default_rng(1).integers(1, 4, len(frame))
    design, network, family = _model_at_random_parameters(CROSSED, frame, seed=1)
    weighted = GaussianMarginalLikelihood(design, network, family, torch.tensor(design.y), torch.tensor(weights))()
    repeated = build_design(CROSSED, frame.loc[frame.index.repeat(weights)])
    value = GaussianMarginalLikelihood(repeated, network, family, torch.tensor(repeated.y))()
    # the criterion is per training row: the weighted data has len(frame) of them, the repeated data sum(weights)
    assert float(weighted.detach()) * len(frame) == pytest.approx(float(value.detach()) * weights.sum(), rel=1e-9)


def test_posterior_is_the_conditional_distribution_of_the_effects():
    design, network, family = _model_at_random_parameters(CROSSED, _crossed_frame(2), seed=2)
    criterion = GaussianMarginalLikelihood(design, network, family, torch.tensor(design.y))
    criterion.set_posterior()
    X, y, beta, Z, G, variance = _dense(design, network, family)
    V = Z @ G @ Z.T + variance * np.eye(len(y))
    mean = G @ Z.T @ np.linalg.solve(V, y - X @ beta)
    covariance = G - G @ Z.T @ np.linalg.solve(V, Z @ G)
    start = 0
    for layer in network.random_effects.values():
        levels, units = layer.n_clusters, layer.units
        np.testing.assert_allclose(layer.loc.detach().numpy().ravel(), mean[start : start + levels * units], atol=1e-8)
        chol = layer.posterior_cholesky().detach().numpy()
        for level in range(levels):
            block = slice(start + level * units, start + (level + 1) * units)
            expected = covariance[block, block] if layer.covariance == "full" else np.diag(np.diag(covariance[block, block]))
            np.testing.assert_allclose(chol[level] @ chol[level].T, expected, atol=1e-6)
        start += levels * units


def _balanced_nested(seed: int = 0, batches: int = 10, casks: int = 3, samples: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    batch = np.repeat(np.arange(batches), casks * samples)
    cask = np.tile(np.repeat(np.arange(casks), samples), batches)
    y = 60 + rng.normal(0, 1.5, batches)[batch] + rng.normal(0, 3, batches * casks)[batch * casks + cask]
    y = y + rng.normal(0, 0.8, y.size)
    return pd.DataFrame({"y": y, "batch": batch.astype(str), "cask": cask.astype(str)})


def test_nested_reml_matches_the_anova_estimates():
    """Balanced nested data: REML gives the ANOVA estimates (when positive), the outer factor's variance included; the
    per-level posteriors the fit used before set it to about zero on such data."""
    frame = _balanced_nested()
    fit = fit_formula("y ~ 1 + (1 | batch/cask)", frame, reml=True)
    batches, casks, samples = 10, 3, 2
    cell = frame["batch"] + ":" + frame["cask"]
    ms_error = float(((frame["y"] - frame.groupby(cell)["y"].transform("mean")) ** 2).sum()) / (batches * casks * (samples - 1))
    cell_means, batch_means = frame.groupby(cell)["y"].mean(), frame.groupby("batch")["y"].mean()
    ms_cask = samples * float(((cell_means - cell_means.index.str.split(":").str[0].map(batch_means)) ** 2).sum())
    ms_cask /= batches * (casks - 1)
    ms_batch = casks * samples * float(((batch_means - frame["y"].mean()) ** 2).sum()) / (batches - 1)
    rows = {r["grp"]: r["vcov"] for r in fit.variance_components()}
    assert rows["Residual"] == pytest.approx(ms_error, rel=1e-4)
    assert rows["batch:cask"] == pytest.approx((ms_cask - ms_error) / samples, rel=1e-4)
    assert rows["batch"] == pytest.approx((ms_batch - ms_cask) / (casks * samples), rel=1e-3)
    assert fit.notes == []


def test_uncorrelated_slopes_reach_the_dense_maximum_likelihood():
    """A ``||`` term: the fit's parameters maximise the dense likelihood (a small step along any of them lowers it)."""
    rng = np.random.default_rng(3)
    subject = np.repeat(np.arange(12), 8)
    days = np.tile(np.arange(8.0), 12)
    y = 250 + 10 * days + rng.normal(0, 24, 12)[subject] + rng.normal(0, 6, 12)[subject] * days
    frame = pd.DataFrame({"y": y + rng.normal(0, 25, y.size), "days": days, "subject": subject.astype(str)})
    fit = fit_formula("y ~ days + (days || subject)", frame)
    network, family, scale = fit.network, fit.family, fit.response_scale
    design = build_design("y ~ days + (days || subject)", frame)
    design.y = design.y / scale
    best = _dense_nll(*_dense(design, network, family))
    layer = network.random_effects["subject"]
    for parameter in (network.out.weight, family.log_scale, layer.log_prior_scale):
        for index in np.ndindex(*parameter.shape):
            for step in (-0.02, 0.02):
                with torch.no_grad():
                    parameter[index] += step
                assert _dense_nll(*_dense(design, network, family)) > best
                with torch.no_grad():
                    parameter[index] -= step


def test_per_level_fits_of_several_factors_say_they_are_approximate(caplog):
    rng = np.random.default_rng(4)
    frame = _crossed_frame(4, rows=120)
    frame["count"] = rng.poisson(3, len(frame))
    with caplog.at_level(logging.WARNING):
        fit = fit_formula("count ~ x + (1 | subject) + (1 | site)", frame, "poisson", hidden_channels=(4,), epochs=2)
    assert len(fit.notes) == 1 and fit.notes[0].startswith("an MLP fixed part")
    assert "variational approximation" in fit.notes[0] and "variational approximation" in caplog.text
    assert fit.estimation == "variational approximation: ELBO with a Gaussian posterior per level"


def test_joint_posterior_of_a_gaussian_model_is_the_exact_marginal_likelihood():
    """The optimal Gaussian posterior of a Gaussian model is the exact one, so the optimised ELBO equals the marginal
    likelihood at any parameters: a check of the inner solver."""
    design, network, family = _model_at_random_parameters(CROSSED, _crossed_frame(7), seed=7)
    y = torch.tensor(design.y)
    elbo = JointPosteriorELBO(design, network, family, y, {"trials": None, "weight": None})
    exact = GaussianMarginalLikelihood(design, network, family, y)
    assert float(elbo().detach()) == pytest.approx(float(exact().detach()), rel=1e-8)


def _nested_counts(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    site = np.repeat(np.arange(12), 30)
    unit = site * 5 + np.tile(np.repeat(np.arange(5), 6), 12)
    x = rng.normal(size=site.size)
    eta = 0.5 + 0.3 * x + rng.normal(0, 0.8, 12)[site] + rng.normal(0, 0.5, 60)[unit]
    return pd.DataFrame({"count": rng.poisson(np.exp(eta)), "x": x, "site": site.astype(str),
                         "unit": (unit % 5).astype(str)})  # fmt: skip


def test_joint_posterior_gradient_is_the_optimised_elbos():
    """At the optimal posterior the gradient with the posterior held fixed is the optimised ELBO's (envelope theorem):
    the outer optimiser's gradients agree with finite differences of the re-optimised criterion."""
    frame = _nested_counts()
    design = build_design("count ~ x + (1 | site/unit)", frame)
    family = likelihood("poisson").double()
    network = _build_network(design, family, (), False, []).double()
    with torch.no_grad():
        network.out.weight.copy_(torch.tensor([[0.4, 0.25]], dtype=torch.float64))
    elbo = JointPosteriorELBO(design, network, family, torch.tensor(design.y), {"trials": None, "weight": None})
    parameters = elbo.criterion_parameters()
    elbo().backward()
    for parameter in parameters:
        for index in np.ndindex(*parameter.shape):
            with torch.no_grad():
                parameter[index] += 1e-5
            up = float(elbo().detach())
            with torch.no_grad():
                parameter[index] -= 2e-5
            down = float(elbo().detach())
            with torch.no_grad():
                parameter[index] += 1e-5
            assert float(parameter.grad[index]) == pytest.approx((up - down) / 2e-5, rel=1e-4, abs=1e-8)


def _few_counts_per_unit(seed: int = 0) -> pd.DataFrame:
    """Nested Poisson counts: 15 sites (variance 0.64) x 6 units (variance 0.25), two low counts per unit."""
    rng = np.random.default_rng(seed)
    site = np.repeat(np.arange(15), 12)
    unit = site * 6 + np.tile(np.repeat(np.arange(6), 2), 15)
    x = rng.normal(size=site.size)
    eta = -0.3 + 0.3 * x + rng.normal(0, 0.8, 15)[site] + rng.normal(0, 0.5, 90)[unit]
    return pd.DataFrame({"count": rng.poisson(np.exp(eta)), "x": x, "site": site.astype(str),
                         "unit": (unit % 6).astype(str)})  # fmt: skip


def test_nested_poisson_factors_fit_with_one_joint_posterior(monkeypatch):
    """With two low counts per unit, per-level posteriors shrink the inner factor's variance (0.195 for the simulated
    0.25); the joint posterior gives 0.29 and a better bound (a lower criterion) than the per-level fit."""
    import monai_armed.apps.mixed_model as mixed_model

    frame = _few_counts_per_unit()
    fit = fit_formula("count ~ x + (1 | site/unit)", frame, "poisson")
    rows = {r["grp"]: r["vcov"] for r in fit.variance_components()}
    assert rows["site"] == pytest.approx(0.64, rel=0.3) and rows["site:unit"] == pytest.approx(0.25, rel=0.3)
    assert fit.notes == [] and "joint Gaussian posterior" in fit.estimation
    monkeypatch.setattr(mixed_model, "_joint_fit", lambda *args: None)
    per_level = fit_formula("count ~ x + (1 | site/unit)", frame, "poisson")
    assert fit.objective < per_level.objective - 0.005
    assert {r["grp"]: r["vcov"] for r in per_level.variance_components()}["site:unit"] < 0.8 * rows["site:unit"]


def test_dotted_factor_names_and_two_terms_on_one_group_fit():
    """``(1 | g) + (0 + x | g)`` keys its second term ``g.1`` (as lme4 names it) and a column may be ``subj.id``: torch
    module names cannot hold dots, so the layers store them escaped, and the fit equals the ``||`` one."""
    frame = _crossed_frame(5, rows=80).rename(columns={"subject": "subj.id"})
    two_terms = fit_formula("y ~ x + (1 | subj.id) + (0 + x | subj.id)", frame)
    uncorrelated = fit_formula("y ~ x + (x || subj.id)", frame)
    rows = {(r["grp"], r["var1"]): r["vcov"] for r in two_terms.variance_components()}
    other = {(r["grp"], r["var1"]): r["vcov"] for r in uncorrelated.variance_components()}
    assert set(rows) == {("subj.id", "(Intercept)"), ("subj.id.1", "x"), ("Residual", None)}
    assert rows[("subj.id.1", "x")] == pytest.approx(other[("subj.id", "x")], rel=1e-4)
    assert rows[("subj.id", "(Intercept)")] == pytest.approx(other[("subj.id", "(Intercept)")], rel=1e-4)
    state = two_terms.network.state_dict()
    assert "random_effects.subj__dot__id__dot__1.loc" in state
    network = two_terms.network
    network.load_state_dict(state)
    assert list(network.random_effects) == ["subj.id", "subj.id.1"]
    assert "subj.id.1" in network.random_effects and "subj__dot__id" not in network.random_effects
    with pytest.raises(KeyError, match="'subj.id.2'"):
        network.random_effects["subj.id.2"]
    from monai_armed.networks.utils import random_effects_summary

    assert set(random_effects_summary(network)["groups"]) == {"subj.id", "subj.id.1"}
    network.random_effects.pop("subj.id.1")
    assert list(network.random_effects) == ["subj.id"]
    assert "exact marginal likelihood" in two_terms.estimation


def test_an_unconverged_fit_says_so(caplog):
    frame = _crossed_frame(6)
    with caplog.at_level(logging.WARNING):
        fit = fit_formula(CROSSED, frame, max_iter=2)
    assert fit.iterations <= 2 and any("max_iter=2" in note for note in fit.notes)
    assert "may not be converged" in caplog.text


def test_boundary_fits_of_crossed_factors_finish_and_say_they_are_singular(caplog):
    """A random slope with no variance, crossed with another factor: the joint criterion works through Lambda (lme4's
    form), so a correlation reaching +-1 does not break a Cholesky factorisation of G^-1 (this data set crashed)."""
    rng = np.random.default_rng(5)
    g, h, x = rng.integers(0, 6, 120), rng.integers(0, 4, 120), rng.normal(size=120)
    frame = pd.DataFrame({"y": x + rng.normal(0, 1, 6)[g] + rng.normal(size=120), "x": x, "g": g.astype(str),
                          "h": h.astype(str)})  # fmt: skip
    with caplog.at_level(logging.WARNING):
        fit = fit_formula("y ~ x + (1 + x | g) + (1 | h)", frame)
    assert any("boundary (singular) fit" in note for note in fit.notes) and "isSingular" in caplog.text
    correlation = next(r for r in fit.variance_components() if r["var2"] is not None)["sdcor"]
    assert abs(correlation) > 0.99
    assert all(np.isfinite(r["vcov"]) for r in fit.variance_components())


def test_rows_of_levels_outside_the_vocabulary_have_no_effect_for_that_factor():
    """Codes of -1 in a training design (levels left out of a given vocabulary) contribute nothing to their factor,
    as in the per-level fit, instead of indexing the previous factor's last level."""
    frame = _crossed_frame(8)
    vocabularies = {"subject": sorted(frame["subject"].unique()), "site": sorted(frame["site"].unique())[1:]}
    design = build_design(CROSSED, frame, vocabularies=vocabularies)
    assert (design.factors["site"].codes == -1).any()
    network = _build_network(design, likelihood("gaussian"), (), False, []).double()
    layout = EffectsLayout(design, network, torch.float64)
    unseen = torch.as_tensor(design.factors["site"].codes < 0)
    site = slice(design.factors["subject"].Z.shape[1], None)
    assert bool((layout.values[unseen][:, site] == 0).all())
