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
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_armed.apps.joint_effects import (
    MAX_JOINT_EFFECTS,
    MAX_JOINT_POSTERIOR_EFFECTS,
    UNFIT,
    GaussianMarginalLikelihood,
    JointPosteriorELBO,
)
from monai_armed.data.formula import MixedDesign, build_design
from monai_armed.losses.families import LikelihoodFamily, likelihood, validate_weights
from monai_armed.networks.blocks.adversary import ClusterAdversary
from monai_armed.networks.nets.mixed_model import FactorSpec, MixedModelNet
from monai_armed.optimizers import LazyAdam

__all__ = ["MixedModelFit", "fit_mixed_model", "fit_formula", "format_varcorr"]

logger = logging.getLogger(__name__)


@dataclass
class MixedModelFit:
    """A fitted mixed model: the network, its family, the training design and how the fit went.

    Estimates are on the data's own scale (the response scaling used for fitting is undone). ``estimation`` says
    which criterion gave them (exact maximum likelihood / REML, or a variational approximation), ``notes`` what the
    fit changed or could not do.

    Example::

        fit = fit_formula("Reaction ~ Days + (Days | Subject)", sleepstudy)
        fit.fixed_effects()          # {"(Intercept)": 251.4, "Days": 10.47}
        print(format_varcorr(fit.variance_components()))
        fit.predict(new_frame)       # response scale; unseen levels use the fixed effects for their factor
    """

    network: MixedModelNet
    family: LikelihoodFamily
    design: MixedDesign
    response_scale: float = 1.0
    fit_seconds: float = 0.0
    objective: float = float("nan")
    iterations: int = 0
    notes: list[str] = field(default_factory=list)
    estimation: str = ""

    def state_dict(self) -> dict:
        """Plain tensors that rebuild the fit's predictions: the network's and the family's state dicts and the
        response scale the network's units are divided by (loadable with ``weights_only=True``)."""
        return {
            "network": self.network.state_dict(),
            "family": self.family.state_dict(),
            "response_scale": torch.tensor(self.response_scale, dtype=torch.float64),
        }

    def fixed_effects(self) -> dict[str, float]:
        """Estimates of the linear fixed part by column name (``{}`` for an MLP fixed part)."""
        if len(self.network.hidden) or self.network.out_channels != 1:
            return {}
        weights = self.network.out.weight.detach().double()[0] * self.response_scale
        return {name: float(w) for name, w in zip(self.design.fixed_names, weights)}

    def variance_components(self) -> list[dict]:
        """lme4 ``as.data.frame(VarCorr(fit))`` rows: every factor's variances and covariances, then the residual."""
        scale = self.response_scale
        rows = []
        for row in self.network.variance_components():
            row = dict(row)
            row["vcov"] *= scale**2
            if row["var2"] is None:
                row["sdcor"] *= scale
            rows.append(row)
        residual = self.family.residual_variance()
        if residual is not None:
            variance = residual * scale**2
            rows.append({"grp": "Residual", "var1": None, "var2": None, "vcov": variance, "sdcor": variance**0.5})
        return rows

    def linear_predictor(self, data: pd.DataFrame | MixedDesign, random_effects: bool = True) -> np.ndarray:
        """The linear predictor (link scale, data units) of new rows; unseen levels contribute nothing."""
        design = data if isinstance(data, MixedDesign) else build_design(None, data, like=self.design,
                                                                         require_response=False)
        x, cluster = _tensors(design, dtype=self.network.out.weight.dtype)
        self.network.eval()
        with torch.no_grad():
            eta = self.network(x, cluster if random_effects else None)
        unseen = {k: int((c < 0).sum()) for k, c in cluster.items() if int((c < 0).sum())}
        if unseen and random_effects:  # lme4 refuses them unless allow.new.levels=TRUE: say so
            logger.warning("rows at levels unseen in training get no random effect of that factor (lme4's "
                           "allow.new.levels=TRUE), per factor: %s", unseen)
        return (eta.double().numpy()[:, 0] * self.response_scale) if eta.shape[1] == 1 else eta.double().numpy()

    def predict(self, data: pd.DataFrame | MixedDesign, random_effects: bool = True) -> np.ndarray:
        """The response of new rows at the posterior mean of their random effects (probability for the logit families,
        rate for Poisson), as lme4's ``predict(type="response")``: a plug-in, not averaged over the effects'
        uncertainty (for Poisson that average is ``exp(eta + var/2)``, a little larger)."""
        eta = torch.as_tensor(self.linear_predictor(data, random_effects) / self.response_scale)
        return (self.family.mean(eta).numpy() * self.response_scale).astype(float)


def format_varcorr(rows: Sequence[dict]) -> str:
    """The variance components as lme4 prints ``VarCorr``: group, name, variance, s.d. and correlations.

    Example::

        print(format_varcorr(fit.variance_components()))
    """
    lines = [f"{'Groups':<12} {'Name':<16} {'Variance':>12} {'Std.Dev.':>10}  Corr"]
    for row in rows:
        if row["var2"] is not None:
            continue
        corr = [
            f"{r['sdcor']:+.3f}"
            for r in rows
            if r["grp"] == row["grp"] and r["var2"] == row["var1"] and r["var1"] != row["var1"]
        ]
        name = row["var1"] or ""
        lines.append(f"{row['grp']:<12} {name:<16} {row['vcov']:>12.4f} {row['sdcor']:>10.4f}  {' '.join(corr)}")
    return "\n".join(lines)


def _tensors(design: MixedDesign, dtype: torch.dtype) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    columns = [design.X] + [f.Z for f in design.factors.values()]
    x = torch.as_tensor(np.concatenate(columns, axis=1), dtype=dtype)
    cluster = {key: torch.as_tensor(f.codes, dtype=torch.long) for key, f in design.factors.items()}
    return x, cluster


def fit_formula(
    formula: str,
    data: pd.DataFrame,
    family: str | LikelihoodFamily = "gaussian",
    *,
    trials: str | None = None,
    weights: str | None = None,
    source: str = "data",
    **kwargs,
) -> MixedModelFit:
    """Fit an lme4-style formula, e.g. ``"y ~ x1 + C(x2) + (1 + Days | Subject) + (1 | site)"``, to a data frame.

    Args:
        formula: the model; the fixed part through formulaic, ``(terms | group)`` random effects.
        data: one row per observation.
        family: ``"gaussian"``, ``"bernoulli"``, ``"binomial"``, ``"poisson"`` or a family instance (``"categorical"``
            is refused with the way to train one).
        trials: the column with the number of trials (binomial).
        weights: a column of non-negative row weights.
        source: the data's name in error messages (e.g. the CSV path).
        kwargs: :func:`fit_mixed_model` arguments.

    Example::

        fit = fit_formula("Reaction ~ Days + (Days | Subject)", pd.read_csv("sleepstudy.csv"))
        fit.fixed_effects(), fit.variance_components()
    """
    design = build_design(formula, data, source=source)
    for column in (trials, weights):
        if column is not None and column not in data.columns:
            raise ValueError(f"column {column!r} is not in {source}; columns: {list(data.columns)[:30]}.")
    n_trials = data[trials].to_numpy(dtype=float) if trials is not None else None
    row_weights = data[weights].to_numpy(dtype=float) if weights is not None else None
    return fit_mixed_model(design, family, trials=n_trials, weights=row_weights, trials_name=trials or "trials",
                           weights_name=weights or "weights", **kwargs)


def fit_mixed_model(
    design: MixedDesign,
    family: str | LikelihoodFamily = "gaussian",
    *,
    trials: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    hidden_channels: Sequence[int] = (),
    optimizer: str = "auto",
    max_iter: int = 500,
    epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-2,
    seed: int = 0,
    trials_name: str = "trials",
    weights_name: str = "weights",
    reml: bool = False,
    adversary: str | None = None,
    adv_weight: float = 1.0,
) -> MixedModelFit:
    """Fit a (generalized) mixed model by maximising its ELBO: ``mean_i w_i E_q[-log p(y_i | eta_i)] + KL / N``.

    The KL is that of every factor's random effects against their learned prior covariance, divided by the number of
    rows, so nothing is hand-set. The expectation is exact for the Gaussian and Poisson families and a Gauss-Hermite
    quadrature for the logit ones, so the objective is deterministic.

    With a Gaussian family and a linear fixed part the estimates are lme4's maximum-likelihood ones (``REML=FALSE``):
    for one grouping factor with correlated effects the per-level posterior family is exact; for several factors
    (crossed or nested) or a ``||`` term, whose exact posterior correlates effects across factors or within a level,
    the L-BFGS fit maximises the exact marginal likelihood instead
    (:class:`~monai_armed.apps.joint_effects.GaussianMarginalLikelihood`, up to
    :data:`~monai_armed.apps.joint_effects.MAX_JOINT_EFFECTS` random effects in all). The other families' L-BFGS fits
    of such models give all random effects one joint Gaussian posterior
    (:class:`~monai_armed.apps.joint_effects.JointPosteriorELBO`, up to
    :data:`~monai_armed.apps.joint_effects.MAX_JOINT_POSTERIOR_EFFECTS`): a variational approximation, as lme4's
    Laplace fits are an approximation. Beyond those sizes, or with an MLP fixed part or mini-batches, each level has
    its own posterior, which misses the correlations between factors: the fit's ``notes`` and the log say so, as they
    do for a boundary (singular) fit and an unconverged one. ``estimation`` names the criterion of every fit.

    ``optimizer="lbfgs"`` optimises the full data at once in float64 (the default, ``"auto"``, for a linear fixed part
    and up to 200,000 rows); ``"adam"`` takes mini-batches of ``batch_size`` rows for ``epochs`` with
    :class:`~monai_armed.optimizers.LazyAdam`, a sparse look-up and the batch estimate of the KL, so a step costs the
    same whatever the number of levels. A Gaussian response is divided by its standard deviation while fitting; the
    estimates are reported in the data's units.

    ``reml=True`` (Gaussian, linear fixed part, no weights; one grouping factor, or several within the joint limit)
    adds the restricted-likelihood term ``0.5 * log|X^T V^-1 X| / N`` (``V`` the marginal covariance, through the
    Woodbury identity), so the variance components are lme4's REML estimates (``lmer``'s default); without it they
    are ML (``REML = FALSE``).

    Args:
        design: the training design (:func:`~monai_armed.data.build_design`).
        family: a family name or instance (:func:`~monai_armed.losses.likelihood`).
        trials: number of trials per row (binomial).
        weights: non-negative row weights, multiplying each row's log-likelihood (frequency weights: a weight of 2 counts
            the row twice; not lme4's precision weights, which divide the residual variance).
        hidden_channels: hidden widths of an MLP fixed part; ``()`` (default) is a linear one.
        optimizer: ``"auto"``, ``"lbfgs"`` or ``"adam"``.
        max_iter: L-BFGS iterations.
        epochs: Adam epochs.
        batch_size: Adam mini-batch size.
        lr: Adam learning rate.
        seed: seed of the initialisation and the mini-batch order.
        trials_name: the trials column's name in messages.
        weights_name: the weights column's name in messages.
        reml: restricted maximum likelihood instead of maximum likelihood (see above).
        adversary: a grouping factor for ARMED's adversary (mini-batch fits with an MLP fixed part): a classifier of
            its levels from the fixed part's hidden features, which the fit fights (``- adv_weight * CE``), so the
            fixed effects become invariant to that factor. ``None`` (default): no adversary.
        adv_weight: weight of the adversarial term.

    Example::

        design = build_design("Reaction ~ Days + (Days | Subject)", frame)
        fit = fit_mixed_model(design, "gaussian")
    """
    start = time.perf_counter()
    family = likelihood(family) if isinstance(family, str) else family
    if design.y is None:
        raise ValueError(f"{design.source} has no response column {design.response!r} to fit.")
    if design.X.shape[1] == 0:
        raise ValueError(
            f"the fixed part {design.formula.fixed!r} of formula {str(design.formula)!r} has no columns: a model without "
            "fixed effects is not supported; keep the intercept (e.g. y ~ 1 + (1 | group))."
        )
    if trials is not None and family.name != "binomial":
        raise ValueError(f"trials ({trials_name}) are for the binomial family only; the {family.name} family has none.")
    try:
        family.validate_target(design.y, trials=trials, name=design.response, trials_name=trials_name)
        if weights is not None:
            validate_weights(weights, name=weights_name)
    except ValueError as error:
        raise ValueError(f"{design.source}: {error}") from None
    if family.name == "categorical":
        raise ValueError(
            "a categorical outcome cannot be fitted from a formula yet; train MixedModelNet(out_channels=n_classes) "
            "with ARMEDTrainer and CategoricalLikelihood instead."
        )
    if optimizer not in ("auto", "lbfgs", "adam"):
        raise ValueError(f"optimizer must be 'auto', 'lbfgs' or 'adam', got {optimizer!r}.")
    if optimizer == "auto":
        optimizer = "lbfgs" if not hidden_channels and design.n_rows <= 200_000 else "adam"
    joint = _joint_fit(design, family, hidden_channels, optimizer)
    if reml and (family.name != "gaussian" or hidden_channels or weights is not None or optimizer != "lbfgs"
                 or (len(design.factors) != 1 and joint != "marginal")):
        raise ValueError(
            "reml=True needs the gaussian family, a linear fixed part, no weights, the L-BFGS fit and one grouping "
            f"factor or at most {MAX_JOINT_EFFECTS} random effects in all; got family {family.name!r}, "
            f"hidden_channels {tuple(hidden_channels)}, factors {list(design.factors)}, weights "
            f"{'given' if weights is not None else 'none'}, optimizer {optimizer!r}."
        )
    if adversary is not None and (adversary not in design.factors or not hidden_channels or optimizer != "adam"):
        raise ValueError(
            f"adversary={adversary!r} needs one of the grouping factors {list(design.factors)}, an MLP fixed part "
            f"(hidden_channels) and optimizer='adam'; got hidden_channels {tuple(hidden_channels)}, optimizer "
            f"{optimizer!r}."
        )
    torch.manual_seed(seed)
    dtype = torch.float64 if optimizer == "lbfgs" else torch.float32
    notes: list[str] = []
    scale = float(np.std(design.y)) if family.name == "gaussian" else 1.0
    scale = scale if scale > 0 else 1.0
    network = _build_network(design, family, hidden_channels, optimizer == "adam", notes).to(dtype)
    family = family.to(dtype)
    x, cluster = _tensors(design, dtype)
    y = torch.as_tensor(design.y / scale, dtype=dtype)
    extras = {
        "trials": None if trials is None else torch.as_tensor(trials, dtype=dtype),
        "weight": None if weights is None else torch.as_tensor(weights, dtype=dtype),
    }
    _initialise(network, family, x, y, design)
    params = list(network.parameters()) + list(family.parameters())
    if joint is None:
        _note_mean_field(design, family, hidden_channels, optimizer, notes)
    if joint is not None:
        criterion = (GaussianMarginalLikelihood(design, network, family, y, extras["weight"], reml=reml)
                     if joint == "marginal" else JointPosteriorELBO(design, network, family, y, extras))
        objective, iterations, converged = _fit_joint(criterion, max_iter, notes)
    elif optimizer == "lbfgs":
        penalty = _RemlTerm(design, network, family, dtype) if reml else None
        objective, iterations, converged = _fit_lbfgs(network, family, params, x, y, cluster, extras, design.n_rows,
                                                      max_iter, penalty)
    else:
        objective, iterations = _fit_adam(
            network, family, params, x, y, cluster, extras, epochs, batch_size, lr, seed, design.fixed_names,
            adversary, adv_weight,
        )
        converged = True  # a fixed number of epochs: nothing to stop early
    if not hidden_channels:
        _note_singular(network, family, notes)
    if not converged:
        message = (f"the fit stopped before converging, after {iterations} L-BFGS iterations, at its limit of "
                   f"max_iter={max_iter} iterations or {max_iter * 5 // 4} objective evaluations: the estimates may "
                   "not be converged; raise max_iter.")
        logger.warning(message)
        notes.append(message)
    network.eval()
    return MixedModelFit(network, family, design, scale, time.perf_counter() - start, objective, iterations, notes,
                         _estimation(design, family, hidden_channels, optimizer, joint, reml))


def _mean_field_inexact(design: MixedDesign) -> bool:
    """Whether per-level posteriors miss correlations of the exact posterior: several factors, or a ``||`` term with
    several columns."""
    return len(design.factors) > 1 or any(not _correlated(f) and f.Z.shape[1] > 1 for f in design.factors.values())


def _note_singular(network: MixedModelNet, family: LikelihoodFamily, notes: list[str]) -> None:
    """Say where the fit is on the boundary, as lme4's ``isSingular``: a factor's relative covariance factor (its prior
    Cholesky factor over the residual s.d. for a Gaussian family) has a diagonal entry below 1e-4, i.e. a variance of
    0 or a correlation of +-1, which the data cannot tell from a smaller model."""
    residual = family.residual_variance()
    scale = residual**0.5 if residual is not None else 1.0
    singular = [
        name for name, layer in network.random_effects.items()
        if bool((layer.prior_cholesky().detach().diagonal() / scale < 1e-4).any())
    ]  # fmt: skip
    if singular:
        message = (
            f"boundary (singular) fit for {singular}: a variance is 0 or a correlation +-1 (lme4's isSingular); "
            "a simpler random-effects structure for these factors fits as well."
        )
        logger.warning(message)
        notes.append(message)


def _correlated(factor) -> bool:
    """Whether a factor's effects get a full prior covariance: not for ``||`` terms, nor where a non-intercept column
    does not vary (its covariance would be singular)."""
    return factor.correlated and not (factor.constant_columns and len(factor.names) > 1)


def _joint_fit(design: MixedDesign, family: LikelihoodFamily, hidden: Sequence[int], optimizer: str) -> str | None:
    """How a model that per-level posteriors would miss correlations of is fitted: ``"marginal"`` (the exact Gaussian
    marginal likelihood), ``"posterior"`` (one joint Gaussian posterior) or ``None`` (per-level posteriors: an MLP
    fixed part, mini-batches, too many effects, or nothing to miss)."""
    if hidden or optimizer != "lbfgs" or family.name == "categorical" or not _mean_field_inexact(design):
        return None
    effects = sum(f.n_levels * f.Z.shape[1] for f in design.factors.values())
    if family.name == "gaussian" and effects <= MAX_JOINT_EFFECTS:
        return "marginal"
    return "posterior" if effects <= MAX_JOINT_POSTERIOR_EFFECTS else None


def _note_mean_field(design: MixedDesign, family: LikelihoodFamily, hidden: Sequence[int], optimizer: str,
                     notes: list[str]) -> None:
    """Say where the per-level (mean-field) posterior makes the variance components approximate."""
    if not _mean_field_inexact(design):
        return
    if hidden:
        reason = "an MLP fixed part"
    elif optimizer != "lbfgs":
        reason = "the mini-batch fit"
    else:
        limit = MAX_JOINT_EFFECTS if family.name == "gaussian" else MAX_JOINT_POSTERIOR_EFFECTS
        reason = f"more than {limit} random effects for a joint fit"
    message = (
        f"{reason}: the factors {list(design.factors)} are fitted with independent per-level posteriors, so their "
        "variance components are a variational approximation (typically smaller than lme4's; nested factors can "
        "lose the outer one's variance)."
    )
    logger.warning(message)
    notes.append(message)


def _estimation(design: MixedDesign, family: LikelihoodFamily, hidden: Sequence[int], optimizer: str,
                joint: str | None, reml: bool) -> str:
    criterion = "REML" if reml else "maximum likelihood"
    quadrature = ", expectation by Gauss-Hermite quadrature" if family.name in ("bernoulli", "binomial") else ""
    if joint == "marginal":
        return f"{criterion}: exact marginal likelihood (the effects of every factor integrated out jointly)"
    if joint == "posterior":
        return f"variational approximation: ELBO with one joint Gaussian posterior of every factor's effects{quadrature}"
    if family.name == "gaussian" and not hidden and optimizer == "lbfgs" and not _mean_field_inexact(design):
        return f"{criterion}: ELBO with the exact posterior of each level's effects"
    reml_term = " and the REML term" if reml else ""
    return f"variational approximation: ELBO{reml_term} with a Gaussian posterior per level{quadrature}"


def _fit_joint(
    criterion: GaussianMarginalLikelihood | JointPosteriorELBO, max_iter: int, notes: list[str]
) -> tuple[float, int, bool]:
    """L-BFGS on a joint criterion over everything it depends on; then each level's posterior into the network (an
    inner solve that did not settle is noted in ``notes``)."""
    joint_posterior = isinstance(criterion, JointPosteriorELBO)
    if joint_posterior:
        _minimise(criterion.fixed_effects_start(), criterion.glm_objective, max_iter)
    iterations, converged = _minimise(criterion.criterion_parameters(), criterion, max_iter)
    with torch.no_grad():
        objective = float(criterion())
    if joint_posterior and objective >= UNFIT:
        raise ValueError(
            "no joint posterior of the random effects could be fitted from the fixed effects of a model without them "
            "(e.g. exp overflowing in a Poisson model): rescale the predictors, or fit with hidden_channels or "
            "optimizer='adam' (per-level posteriors)."
        )
    criterion.set_posterior()
    if joint_posterior and not criterion.settled:  # its own message: max_iter is not what stopped it
        message = ("the joint posterior's inner Newton solve did not settle at the optimum, so the outer gradient was "
                   "inexact and the estimates may be off: rescale the predictors, or fit with optimizer='adam'.")
        logger.warning(message)
        notes.append(message)
    return objective, iterations, converged


def _build_network(
    design: MixedDesign, family: LikelihoodFamily, hidden: Sequence[int], sparse: bool, notes: list[str]
) -> MixedModelNet:
    factors = {}
    for key, factor in design.factors.items():
        correlated = _correlated(factor)
        if factor.correlated and not correlated:
            message = (
                f"random-effects columns {factor.constant_columns} of factor {key!r} do not vary, so their covariance "
                "with the other effects cannot be estimated: this factor gets a diagonal prior."
            )
            logger.warning(message)
            notes.append(message)
        spread = factor.Z.std(0)
        prior = [1.0 if s == 0 else float(1.0 / s) for s in spread]
        factors[key] = FactorSpec(factor.n_levels, factor.names, factor.counts.tolist(), correlated, prior)
    n_classes = getattr(family, "n_classes", None) or (int(design.y.max()) + 1 if family.name == "categorical" else 1)
    return MixedModelNet(design.X.shape[1], factors, out_channels=n_classes, hidden_channels=hidden, sparse=sparse)


def _initialise(network: MixedModelNet, family: LikelihoodFamily, x: torch.Tensor, y: torch.Tensor,
                design: MixedDesign) -> None:
    """Least squares for a linear Gaussian fixed part (and its residual s.d.), so the optimiser starts near the end."""
    if family.name != "gaussian" or len(network.hidden):
        return
    X = x[:, : network.in_features]
    solution = torch.linalg.lstsq(X, y.unsqueeze(1)).solution
    with torch.no_grad():
        network.out.weight.copy_(solution.T)
        residual = (y - (X @ solution)[:, 0]).std()
        family.log_scale.copy_(residual.clamp(min=1e-3).log())


def _elbo(network, family, x, y, cluster, extras, n_rows: int, batch_kl: bool = False) -> torch.Tensor:
    """``mean_i w_i E_q[nll_i] + KL / N``; ``batch_kl`` estimates the KL from the levels of this batch."""
    if network.out_channels == 1:
        mean, var = network.linear_predictor(x, cluster)
        nll = family(mean, y, pred_var=var, **extras)
    else:
        nll = family(network(x, cluster), y, **extras)
    return nll + network.kl_divergence(cluster if batch_kl else None) / n_rows


class _RemlTerm:
    """``0.5 * log|X^T V^-1 X| / N`` for one grouping factor, from per-level sums that do not change while fitting."""

    def __init__(self, design: MixedDesign, network: MixedModelNet, family: LikelihoodFamily, dtype: torch.dtype):
        (key, factor), = design.factors.items()
        X, Z = torch.tensor(design.X, dtype=dtype), torch.tensor(factor.Z, dtype=dtype)
        codes = torch.as_tensor(factor.codes, dtype=torch.long)
        levels = factor.n_levels

        def per_level(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            outer = a.unsqueeze(2) * b.unsqueeze(1)
            return outer.new_zeros(levels, a.shape[1], b.shape[1]).index_add_(0, codes, outer)

        self.xtx, self.ztx, self.ztz = per_level(X, X).sum(0), per_level(Z, X), per_level(Z, Z)
        self.layer, self.family, self.n_rows = network.random_effects[key], family, design.n_rows

    def __call__(self) -> torch.Tensor:
        variance = self.family.variance
        # V_c^-1 = (I - Z_c M_c^-1 Z_c^T) / sigma^2 with M_c = sigma^2 Sigma^-1 + Z_c^T Z_c
        precision = torch.cholesky_inverse(self.layer.prior_cholesky())
        m = variance * precision + self.ztz
        correction = (self.ztx.transpose(1, 2) @ torch.linalg.solve(m, self.ztx)).sum(0)
        return 0.5 * torch.logdet((self.xtx - correction) / variance) / self.n_rows


def _minimise(params: Sequence[torch.Tensor], objective, max_iter: int) -> tuple[int, bool]:
    """L-BFGS with a strong-Wolfe line search on ``objective()``: the iterations it took and whether it stopped on its
    tolerances (rather than on ``max_iter`` or its budget of evaluations)."""
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    state = optimizer.state[optimizer._params[0]]
    iterations, evaluations = int(state.get("n_iter", 0)), int(state.get("func_evals", 0))
    return iterations, iterations < max_iter and evaluations < optimizer.defaults["max_eval"]


def _fit_lbfgs(network, family, params, x, y, cluster, extras, n_rows: int, max_iter: int,
               penalty: _RemlTerm | None = None) -> tuple[float, int, bool]:
    network.train()

    def objective() -> torch.Tensor:
        loss = _elbo(network, family, x, y, cluster, extras, n_rows)
        return loss + penalty() if penalty is not None else loss

    iterations, converged = _minimise(params, objective, max_iter)
    with torch.no_grad():
        return float(objective()), iterations, converged


def _adversary_step(network: MixedModelNet, judge: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
                    level: torch.Tensor) -> torch.Tensor:
    """One step of the adversary on detached features; returns its cross-entropy on the live features (whose
    gradient reaches only the network: the adversary's own gradients are cleared before its next step)."""
    _, features = network.fixed_effects(x)
    optimizer.zero_grad()
    F.cross_entropy(judge([f.detach() for f in features]), level, ignore_index=-1).backward()
    optimizer.step()
    return F.cross_entropy(judge(features), level, ignore_index=-1)


@torch.no_grad()
def _recenter(network: MixedModelNet, fixed_names: Sequence[str]) -> None:
    """Shift each factor's random intercepts (and, for a linear fixed part, its random slopes) by a common amount and
    the matching fixed effects by the opposite, choosing the shift that minimises the KL.

    The likelihood cannot tell a shift of every level's effect from the same shift of the fixed effect; only the KL
    pulls the levels towards zero along that direction, through a gradient of order ``levels / N``, far too weak for
    mini-batch steps to follow. Predictions stay the same and the KL cannot grow, so the ELBO only improves. With a
    prior precision ``A`` and the levels' mean ``m``, the shift of the shiftable units ``S`` is
    ``A_SS^-1 (A m)_S`` (``m_S`` when every unit can shift or the prior is diagonal).
    """
    if network.out_channels != 1:
        return
    linear = len(network.hidden) == 0
    for layer in network.random_effects.values():
        units, targets = [], []
        for unit, name in enumerate(layer.unit_names):
            if linear and name in fixed_names:
                targets.append((network.out.weight, (0, list(fixed_names).index(name))))
            elif name == "(Intercept)" and network.out.bias is not None:
                targets.append((network.out.bias, (0,)))
            else:
                continue
            units.append(unit)
        if not units:
            continue
        precision = torch.cholesky_inverse(layer.prior_cholesky().double())
        pulled = precision @ layer.loc.double().mean(0)
        shift = torch.linalg.solve(precision[units][:, units], pulled[units]).to(layer.loc.dtype)
        layer.loc[:, units] -= shift
        for (param, index), value in zip(targets, shift):
            param[index] += value


def _fit_adam(network, family, params, x, y, cluster, extras, epochs, batch_size, lr, seed,
              fixed_names: Sequence[str] = (), adversary: str | None = None, adv_weight: float = 1.0
              ) -> tuple[float, int]:
    optimizer = LazyAdam(params, lr=lr)
    judge = None
    if adversary is not None:  # ARMED: a classifier of the factor's levels from the fixed part's features
        judge = ClusterAdversary(network.feature_channels, network.random_effects[adversary].n_clusters, (16, 8))
        judge = judge.to(x.dtype)
        judge_optimizer = torch.optim.Adam(judge.parameters(), lr=lr)
    n_rows = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    network.train()
    steps, loss = 0, torch.zeros(())
    for _ in range(epochs):
        order = torch.randperm(n_rows, generator=generator)
        for batch in order.split(batch_size):
            sub = {k: v[batch] for k, v in cluster.items()}
            sub_extras = {k: None if v is None else v[batch] for k, v in extras.items()}
            optimizer.zero_grad()
            loss = _elbo(network, family, x[batch], y[batch], sub, sub_extras, n_rows, batch_kl=True)
            if judge is not None:
                loss = loss - adv_weight * _adversary_step(network, judge, judge_optimizer, x[batch], sub[adversary])
            loss.backward()
            optimizer.step()
            steps += 1
        _recenter(network, fixed_names)
    if network.out_channels == 1:
        _polish_random_effects(network, family, x, y, cluster, extras, n_rows)
    with torch.no_grad():  # the full-data ELBO (no adversary), comparable with the L-BFGS fits
        objective = _elbo(network, family, x, y, cluster, extras, n_rows)
    return float(objective), steps


def _polish_random_effects(network, family, x, y, cluster, extras, n_rows: int, max_iter: int = 200) -> None:
    """With the fixed part frozen, maximise the full-data ELBO over the random effects, their prior and the family's
    parameters by L-BFGS: a deterministic, convex-in-the-posterior problem (exact for a Gaussian family), which
    finishes what mini-batch steps leave unconverged at levels with few rows."""
    fixed = list(network.hidden.parameters()) + list(network.out.parameters())
    params = [p for p in list(network.random_effects.parameters()) + list(family.parameters()) if p.requires_grad]
    sparse = {layer: layer.sparse for layer in network.random_effects.values()}
    for p in fixed:
        p.requires_grad_(False)
    for layer in sparse:
        layer.sparse = False  # L-BFGS needs dense gradients
    try:
        _fit_lbfgs(network, family, params, x, y, cluster, extras, n_rows, max_iter)
    finally:
        for p in fixed:
            p.requires_grad_(True)
        for layer, was_sparse in sparse.items():
            layer.sparse = was_sparse
