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

from monai_armed.apps import fit_formula, format_varcorr
from monai_armed.networks import FactorSpec, MixedModelNet


def _one_way(groups: int = 12, per_group: int = 8, sd_group: float = 2.0, sd_resid: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(groups), per_group)
    y = 5.0 + rng.normal(0, sd_group, groups)[group] + rng.normal(0, sd_resid, group.size)
    return pd.DataFrame({"y": y, "g": [f"g{k:02d}" for k in group]})


def _anova(frame: pd.DataFrame, reml: bool = False) -> tuple[float, float]:
    """Closed-form ML (or REML) estimates of a balanced one-way random-intercept model: (group, residual variance)."""
    groups = frame.groupby("g")["y"]
    a, n = groups.ngroups, int(groups.size().iloc[0])
    within = float(((frame["y"] - groups.transform("mean")) ** 2).sum()) / (a * (n - 1))
    between = n * float(((groups.mean() - frame["y"].mean()) ** 2).sum()) / (a - 1 if reml else a)
    return (between - within) / n, within


@pytest.mark.parametrize("reml", [False, True])
def test_gaussian_random_intercept_matches_closed_form_estimates(reml):
    frame = _one_way()
    fit = fit_formula("y ~ 1 + (1 | g)", frame, reml=reml)
    group_var, resid_var = _anova(frame, reml)
    rows = {(r["grp"], r["var1"]): r for r in fit.variance_components()}
    assert rows[("g", "(Intercept)")]["vcov"] == pytest.approx(group_var, rel=1e-3)
    assert rows[("Residual", None)]["vcov"] == pytest.approx(resid_var, rel=1e-3)
    assert fit.fixed_effects()["(Intercept)"] == pytest.approx(frame["y"].mean(), rel=1e-4)
    assert "Residual" in format_varcorr(fit.variance_components())


def test_correlated_slopes_and_crossed_factors_recover_the_simulation():
    rng = np.random.default_rng(1)
    subjects, sites, visits = 60, 8, 6
    subject = np.repeat(np.arange(subjects), visits)
    site = rng.integers(0, sites, subject.size)  # crossed with subject
    days = np.tile(np.arange(visits, dtype=float), subjects)
    cov = np.array([[4.0, 1.2], [1.2, 1.0]])  # correlation 0.6
    effects = rng.multivariate_normal([0, 0], cov, subjects)
    site_effect = rng.normal(0, 1.5, sites)
    y = 10 + 2 * days + effects[subject, 0] + effects[subject, 1] * days + site_effect[site]
    y = y + rng.normal(0, 0.5, subject.size)
    frame = pd.DataFrame({"y": y, "days": days, "subject": subject.astype(str), "site": site.astype(str)})
    fit = fit_formula("y ~ days + (1 + days | subject) + (1 | site)", frame)
    rows = {(r["grp"], r["var1"], r["var2"]): r for r in fit.variance_components()}
    assert rows[("subject", "(Intercept)", None)]["vcov"] == pytest.approx(4.0, rel=0.4)
    assert rows[("subject", "days", None)]["vcov"] == pytest.approx(1.0, rel=0.4)
    assert rows[("subject", "(Intercept)", "days")]["sdcor"] == pytest.approx(0.6, abs=0.25)
    assert rows[("site", "(Intercept)", None)]["sdcor"] == pytest.approx(1.5, rel=0.5)
    assert rows[("Residual", None, None)]["vcov"] == pytest.approx(0.25, rel=0.2)
    assert fit.fixed_effects()["days"] == pytest.approx(2.0, abs=0.4)


def test_unseen_level_of_one_factor_falls_back_to_zero_for_that_factor(caplog):
    frame = _one_way()
    frame["h"] = np.where(np.arange(len(frame)) % 2 == 0, "a", "b")
    fit = fit_formula("y ~ 1 + (1 | g) + (1 | h)", frame)
    new = pd.DataFrame({"g": ["g03", "unknown"], "h": ["a", "a"]})
    with caplog.at_level(logging.WARNING):  # lme4 refuses them by default: a warning, not an INFO line
        eta = fit.linear_predictor(new)
    effects = {k: layer.loc.detach().double()[:, 0] * fit.response_scale for k, layer in fit.network.random_effects.items()}
    fixed = fit.fixed_effects()["(Intercept)"]
    g_index = fit.design.factors["g"].levels.index("g03")
    assert eta[0] == pytest.approx(fixed + float(effects["g"][g_index]) + float(effects["h"][0]), rel=1e-6)
    assert eta[1] == pytest.approx(fixed + float(effects["h"][0]), rel=1e-6)  # g unseen: h still applies
    assert "allow.new.levels" in caplog.text and "{'g': 1}" in caplog.text


def test_a_model_without_fixed_effects_is_refused_by_name():
    with pytest.raises(ValueError, match=r"fixed part '0' .* has no columns: a model without fixed effects"):
        fit_formula("y ~ 0 + (1 | g)", _one_way())


@pytest.mark.parametrize("family", ["binomial", "poisson", "bernoulli"])
def test_glmm_families_recover_the_fixed_slope(family):
    rng = np.random.default_rng(2)
    groups, per_group = 30, 20
    g = np.repeat(np.arange(groups), per_group)
    x = rng.normal(0, 1, g.size)
    eta = -0.3 + 0.8 * x + rng.normal(0, 0.7, groups)[g]
    trials = np.full(g.size, 10)
    if family == "poisson":
        y = rng.poisson(np.exp(eta))
    elif family == "binomial":
        y = rng.binomial(trials, 1 / (1 + np.exp(-eta)))
    else:
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    frame = pd.DataFrame({"y": y, "x": x, "g": g.astype(str), "n": trials})
    fit = fit_formula("y ~ x + (1 | g)", frame, family, trials="n" if family == "binomial" else None)
    assert fit.fixed_effects()["x"] == pytest.approx(0.8, abs=0.15)
    sd = {r["grp"]: r["sdcor"] for r in fit.variance_components()}["g"]
    assert sd == pytest.approx(0.7, abs=0.3)
    assert fit.family.residual_variance() is None
    p = fit.predict(frame.head(3))
    assert p.shape == (3,) and np.all(p > 0)


def test_mini_batch_fit_with_many_levels_touches_only_the_batch():
    rng = np.random.default_rng(3)
    levels = 2000
    g = rng.integers(0, levels, 8000)
    y = 1.0 + rng.normal(0, 1.0, levels)[g] + rng.normal(0, 1.0, g.size)
    frame = pd.DataFrame({"y": y, "g": g.astype(str)})
    fit = fit_formula("y ~ 1 + (1 | g)", frame, optimizer="adam", epochs=40, batch_size=512, lr=0.05)
    layer = fit.network.random_effects["g"]
    assert layer.sparse and layer.level_counts is not None
    full_batch = {r["grp"]: r["sdcor"] for r in fit_formula("y ~ 1 + (1 | g)", frame).variance_components()}
    sd = {r["grp"]: r["sdcor"] for r in fit.variance_components()}
    assert sd["g"] == pytest.approx(full_batch["g"], rel=0.1)
    assert sd["Residual"] == pytest.approx(full_batch["Residual"], rel=0.05)


def test_constant_slope_falls_back_to_a_diagonal_prior(caplog):
    frame = _one_way()
    frame["c"] = 2.0
    with caplog.at_level(logging.WARNING):
        fit = fit_formula("y ~ 1 + (1 + c | g)", frame)
    assert fit.network.random_effects["g"].covariance == "diagonal"
    assert "diagonal prior" in caplog.text and fit.notes


def test_bad_inputs_name_the_column_and_row():
    frame = _one_way()
    with pytest.raises(ValueError, match="bernoulli"):
        fit_formula("y ~ 1 + (1 | g)", frame, "bernoulli")
    counts = pd.DataFrame({"y": [3, 2, 9, 1], "n": [5, 5, 5, 5], "g": ["a", "b", "a", "b"]})
    with pytest.raises(ValueError, match=r"'y' row 2.*'n'"):
        fit_formula("y ~ 1 + (1 | g)", counts, "binomial", trials="n")
    with pytest.raises(ValueError, match="row 1"):
        fit_formula("y ~ 1 + (1 | g)", counts.assign(y=[1, -2, 0, 1]), "poisson")
    with pytest.raises(ValueError, match="unknown"):
        fit_formula("y ~ 1 + (1 | g)", frame, "gamma")
    with pytest.raises(ValueError, match="categorical outcome cannot be fitted from a formula"):
        fit_formula("y ~ 1 + (1 | g)", counts, "categorical")
    with pytest.raises(ValueError, match="reml=True needs the gaussian family"):
        fit_formula("y ~ 1 + (1 | g)", counts, "poisson", reml=True)
    with pytest.raises(ValueError, match="'trials_col' is not in data"):
        fit_formula("y ~ 1 + (1 | g)", counts, "binomial", trials="trials_col")


def test_network_contract():
    net = MixedModelNet(2, {"s": FactorSpec(5, ["(Intercept)", "x"], counts=[2] * 5), "t": FactorSpec(3)})
    x = torch.randn(4, 2 + 2 + 1)
    cluster = {"s": torch.tensor([0, 1, -1, 4]), "t": torch.tensor([2, -1, 0, 1])}
    assert net(x).shape == (4, 1)
    out = net.forward_armed(x, cluster)
    assert out.pred.shape == (4, 1) and out.kl.dim() == 0
    with pytest.raises(ValueError, match="mapping"):
        net(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(KeyError, match="'t'"):
        net(x, {"s": cluster["s"]})
    with pytest.raises(ValueError, match=r"\(batch, 5\)"):
        net(torch.randn(4, 3), cluster)
    with pytest.raises(ValueError, match=">= 2 levels"):
        MixedModelNet(2, {"s": FactorSpec(1)})


def test_formula_without_random_terms_fits_and_predicts():
    frame = _one_way()
    fit = fit_formula("y ~ 1", frame)
    assert fit.fixed_effects()["(Intercept)"] == pytest.approx(frame["y"].mean(), rel=1e-4)
    assert fit.predict(frame.head(2)).tolist() == pytest.approx([frame["y"].mean()] * 2, rel=1e-4)
    assert [r["grp"] for r in fit.variance_components()] == ["Residual"]


def test_formula_scores_of_a_binary_outcome_rank_and_classify():
    from monai_armed.apps import formula_scores, split_rows

    rng = np.random.default_rng(4)
    g = rng.integers(0, 20, 1500)
    x = rng.normal(0, 1, g.size)
    eta = 1.5 * x + rng.normal(0, 1.5, 20)[g]
    frame = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "g": g.astype(str)})
    train, test = split_rows(frame, 0.3, seed=0)
    fit = fit_formula("y ~ x + (1 | g)", train, "bernoulli")
    mixed, fixed = formula_scores(fit, test), formula_scores(fit, test, random_effects=False)
    assert mixed["rows"] == len(test) == 450
    assert mixed["auroc"] > fixed["auroc"] > 0.6  # the groups' intercepts add to the slope
    assert mixed["accuracy"] > 0.7 and mixed["deviance"] < fixed["deviance"]


def test_gaussian_scores_are_in_the_datas_units():
    from monai_armed.apps import formula_scores

    frame = _one_way()
    frame["y"] = frame["y"] * 10 + 100  # the fit divides the response by its s.d.: the scores must not
    scores = formula_scores(fit_formula("y ~ 1 + (1 | g)", frame), frame)
    assert scores["deviance"] == pytest.approx(scores["mse"], rel=1e-6)  # a Gaussian's unit deviance is (y - mu)^2
    assert scores["mse"] < frame["y"].var()


@pytest.mark.parametrize("hidden", [(), (4,)])
def test_recentering_moves_the_levels_mean_into_the_fixed_part_without_changing_predictions(hidden):
    from monai_armed.apps.mixed_model import _recenter

    torch.manual_seed(0)
    net = MixedModelNet(2, {"g": FactorSpec(6, ["(Intercept)", "x"])}, hidden_channels=hidden).eval()
    with torch.no_grad():
        net.random_effects["g"].loc.normal_(3.0, 1.0)  # levels far from mean zero
        net.out.weight.normal_()
    x = torch.cat([torch.ones(10, 1), torch.randn(10, 1)], 1)
    inputs, cluster = torch.cat([x, x], 1), {"g": torch.arange(10) % 6}
    before, kl_before = net(inputs, cluster), net.kl_divergence()
    _recenter(net, ["(Intercept)", "x"])
    torch.testing.assert_close(net(inputs, cluster), before, rtol=1e-5, atol=1e-5)
    loc = net.random_effects["g"].loc
    assert abs(float(loc[:, 0].mean())) < 1e-6  # the intercepts' mean went into the fixed part
    assert (abs(float(loc[:, 1].mean())) < 1e-6) == (hidden == ())  # slopes only into a linear fixed part
    assert float(net.kl_divergence()) < float(kl_before)


def test_recentering_a_subset_under_a_correlated_prior_never_raises_the_kl():
    from monai_armed.apps.mixed_model import _recenter

    net = MixedModelNet(1, {"g": FactorSpec(5, ["(Intercept)", "x"])}, hidden_channels=(3,)).eval()
    layer = net.random_effects["g"]
    with torch.no_grad():
        layer.prior_tril.fill_(2.0)  # strongly correlated intercept and slope
        layer.loc.copy_(torch.tensor([[1.0, 2.0]]).expand(5, 2))
    x = torch.randn(5, 1)
    inputs, cluster = torch.cat([x, torch.ones(5, 1), x], 1), {"g": torch.arange(5)}  # [fixed x | 1, x]
    before, kl_before = net(inputs, cluster), float(net.kl_divergence())
    _recenter(net, ["(Intercept)", "x"])  # an MLP fixed part: only the intercepts can move
    torch.testing.assert_close(net(inputs, cluster), before, rtol=1e-5, atol=1e-5)
    assert float(net.kl_divergence()) < kl_before
    assert torch.equal(layer.loc[:, 1], torch.full((5,), 2.0))  # the slopes stayed


def test_adversary_of_a_factor_trains_against_the_fixed_part():
    from monai_armed.apps.mixed_model import _adversary_step
    from monai_armed.networks import ClusterAdversary

    torch.manual_seed(0)
    net = MixedModelNet(2, {"site": FactorSpec(3)}, hidden_channels=(8,))
    judge = ClusterAdversary(net.feature_channels, 3, (4,))
    optimizer = torch.optim.Adam(judge.parameters(), lr=0.1)
    x, site = torch.randn(12, 3), torch.arange(12) % 3
    before = [p.detach().clone() for p in judge.parameters()]
    gen = _adversary_step(net, judge, optimizer, x, site)
    assert any(not torch.equal(a, p) for a, p in zip(before, judge.parameters()))  # the adversary stepped
    (-gen).backward()  # the fit subtracts it: the fixed part's features get the adversary's gradient
    assert net.hidden[0][0].weight.grad is not None and float(net.hidden[0][0].weight.grad.abs().sum()) > 0
    frame = _one_way()
    frame["x"] = np.arange(len(frame), dtype=float)
    with pytest.raises(ValueError, match="needs one of the grouping factors"):
        fit_formula("y ~ x + (1 | g)", frame, adversary="g")  # linear fixed part: nothing to make invariant
    with pytest.raises(ValueError, match="needs one of the grouping factors"):
        fit_formula("y ~ x + (1 | g)", frame, hidden_channels=(4,), adversary="site")
    fit = fit_formula("y ~ x + (1 | g)", frame, hidden_channels=(4,), adversary="g", epochs=2)
    assert np.isfinite(fit.predict(frame.head(3))).all()


def test_csv_and_output_errors_come_before_anything_is_written(tmp_path, caplog):
    from monai_armed.apps import read_formula_csv, write_formula_outputs

    empty, header = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header.write_text("y,g\n")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        read_formula_csv(empty, "y ~ 1 + (1 | g)")
    with pytest.raises(ValueError, match=r"header.csv has a header but no rows: columns \['y', 'g'\]"):
        read_formula_csv(header, "y ~ 1 + (1 | g)")
    frame = _one_way()
    fit = fit_formula("y ~ 1 + (1 | g)", frame, source="one_way.csv")
    with pytest.raises(ValueError):
        write_formula_outputs(fit, tmp_path / "out", test=frame.drop(columns="y"))
    assert not (tmp_path / "out").exists()
    write_formula_outputs(fit, tmp_path / "out", train=frame, test=frame)
    with caplog.at_level(logging.WARNING):
        write_formula_outputs(fit, tmp_path / "out", train=frame)
    assert "is from an earlier run" in caplog.text


def test_family_errors_name_the_file_and_trials_need_the_binomial_family():
    frame = _one_way().assign(count=lambda f: np.arange(len(f)) % 4, n=4)
    frame.loc[3, "count"] = -1
    with pytest.raises(ValueError, match=r"counts.csv: column 'count' row 3 has -1"):
        fit_formula("count ~ 1 + (1 | g)", frame, "poisson", source="counts.csv")
    with pytest.raises(ValueError, match="trials \\(n\\) are for the binomial family only"):
        fit_formula("y ~ 1 + (1 | g)", frame, "poisson", trials="n")
