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
"""The random effects of every grouping factor of a linear mixed model as one vector, for fits that treat them
jointly: the exact marginal likelihood of a Gaussian model, and a joint Gaussian posterior for the other families.

A per-level posterior (the ELBO of :func:`~monai_armed.apps.fit_mixed_model`) is exact for one grouping factor with
correlated effects and a Gaussian family, but not when a row's effects come from several factors (crossed or nested:
their posteriors are correlated across factors) or from an uncorrelated (``||``) term (one level's intercept and slope
are correlated in the posterior although not in the prior). The fits here keep those correlations.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from monai_armed.data.formula import MixedDesign
from monai_armed.losses.families import LikelihoodFamily
from monai_armed.networks.layers.random_effects import inverse_softplus
from monai_armed.networks.nets.mixed_model import MixedModelNet

__all__ = [
    "MAX_JOINT_EFFECTS",
    "MAX_JOINT_POSTERIOR_EFFECTS",
    "EffectsLayout",
    "GaussianMarginalLikelihood",
    "JointPosteriorELBO",
]

#: the most random effects (levels x terms, over every factor) whose Gaussian marginal likelihood is solved densely
MAX_JOINT_EFFECTS = 4000
#: the most random effects given one joint posterior (dense ``q x q`` Cholesky factorisations per Newton step)
MAX_JOINT_POSTERIOR_EFFECTS = 2000


#: the criterion's value where parameters admit no posterior
_UNFIT = 1e10


class EffectsLayout:
    """Where each factor's effects sit in the vector ``u`` of all ``q`` random effects (factor by factor, level by
    level, term by term), the design ``Z`` as per-row column indices and values, and the prior covariance ``G``.

    Args:
        design: the training design (its factors give ``Z`` and the level codes).
        network: the :class:`~monai_armed.networks.nets.MixedModelNet` whose layers hold the priors and posteriors.
        dtype: floating-point type of the tensors.

    Example::

        layout = EffectsLayout(design, network, torch.float64)
        precision, log_det = layout.prior_precision()      # G^-1 (q x q) and log|G|
    """

    def __init__(self, design: MixedDesign, network: MixedModelNet, dtype: torch.dtype) -> None:
        if len(network.hidden) or network.out_channels != 1:
            raise ValueError("a joint fit of the random effects needs a linear fixed part and one output.")
        self.layers = [network.random_effects[key] for key in design.factors]
        self.sizes = [(factor.n_levels, factor.Z.shape[1]) for factor in design.factors.values()]
        self.q = sum(levels * units for levels, units in self.sizes)
        columns, values, self.blocks, offset = [], [], [], 0
        for (levels, units), factor in zip(self.sizes, design.factors.values()):
            codes = torch.as_tensor(factor.codes, dtype=torch.long)
            columns.append(offset + codes.unsqueeze(1) * units + torch.arange(units))
            values.append(torch.tensor(factor.Z, dtype=dtype))
            start = offset + torch.arange(levels).reshape(levels, 1, 1) * units
            rows = (start + torch.arange(units).reshape(1, units, 1)).expand(levels, units, units)
            cols = (start + torch.arange(units).reshape(1, 1, units)).expand(levels, units, units)
            self.blocks.append((rows.reshape(-1), cols.reshape(-1)))  # each level's (units x units) block
            offset += levels * units
        #: ``(N, k)`` column of ``u`` and value of each of a row's ``k`` random-effects design entries
        self.columns, self.values = torch.cat(columns, 1), torch.cat(values, 1)

    def gram(self, row_weights: torch.Tensor) -> torch.Tensor:
        """``Z^T diag(row_weights) Z`` (dense, ``q x q``), differentiable in the weights."""
        q = self.q
        pairs = (self.columns.unsqueeze(2) * q + self.columns.unsqueeze(1)).reshape(-1)
        products = (row_weights.reshape(-1, 1, 1) * self.values.unsqueeze(2) * self.values.unsqueeze(1)).reshape(-1)
        return products.new_zeros(q * q).index_add(0, pairs, products).reshape(q, q)

    def transpose_times(self, rows: torch.Tensor) -> torch.Tensor:
        """``Z^T r`` (``(q,)``) of a per-row vector ``r`` (``(N,)``)."""
        products = (self.values * rows.unsqueeze(1)).reshape(-1)
        return products.new_zeros(self.q).index_add(0, self.columns.reshape(-1), products)

    def row_variances(self, covariance: torch.Tensor) -> torch.Tensor:
        """``z_i^T S z_i`` of every row for a covariance ``S`` of ``u`` (``(N,)``), from the row's own entries."""
        entries = covariance[self.columns.unsqueeze(2), self.columns.unsqueeze(1)]
        return (self.values.unsqueeze(2) * self.values.unsqueeze(1) * entries).sum((1, 2))

    def prior_precision(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``G^-1`` (dense, ``q x q``, block-diagonal) and ``log|G|``, differentiable in the layers' priors."""
        dtype = self.values.dtype
        precision, log_det = torch.zeros(self.q, self.q, dtype=dtype), torch.zeros((), dtype=dtype)
        for layer, (levels, units), (rows, cols) in zip(self.layers, self.sizes, self.blocks):
            chol = layer.prior_cholesky().to(dtype)
            block = torch.cholesky_inverse(chol).expand(levels, units, units).reshape(-1)
            precision = precision.index_put((rows, cols), block)
            log_det = log_det + levels * 2 * chol.diagonal().log().sum()
        return precision, log_det

    def prior_parameters(self) -> list[nn.Parameter]:
        """The learned parameters of every factor's prior covariance."""
        return [p for layer in self.layers for p in (layer.log_prior_scale, layer.prior_tril)
                if isinstance(p, nn.Parameter) and p.numel()]  # fmt: skip

    @torch.no_grad()
    def write_posterior(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Set each level's posterior to the mean and the covariance of its own effects (the diagonal blocks of the
        joint ``covariance``; a diagonal layer keeps the block's variances)."""
        offset = 0
        for layer, (levels, units), (rows, cols) in zip(self.layers, self.sizes, self.blocks):
            layer.loc.copy_(mean[offset : offset + levels * units].reshape(levels, units))
            block = covariance[rows, cols].reshape(levels, units, units)
            if layer.covariance == "full":
                factor = torch.linalg.cholesky(block)
                diagonal = factor.diagonal(dim1=-2, dim2=-1)
                layer.tril.copy_(factor[:, layer._tril_rows, layer._tril_cols])
            else:
                diagonal = block.diagonal(dim1=-2, dim2=-1).sqrt()
            layer.rho.copy_(inverse_softplus((diagonal - 1e-5).clamp(min=1e-12)))
            offset += levels * units


class GaussianMarginalLikelihood:
    """The exact negative log marginal likelihood per row of a linear Gaussian mixed model, every factor's random
    effects integrated out jointly.

    ``y = X beta + Z u + e``, ``u ~ N(0, G)``, ``e_i ~ N(0, sigma^2)``, row weights multiplying each row's
    log-likelihood. With ``M = Z^T W Z + sigma^2 G^-1`` (dense, ``q x q``) and ``r = y - X beta``::

        -log L = 0.5 * [sum(w) log(2 pi sigma^2) + (r^T W r - r^T W Z M^-1 Z^T W r) / sigma^2
                        + log|G| + log|M| - q log sigma^2]

    Its minimum over the fixed effects, the priors and ``sigma`` gives lme4's maximum-likelihood estimates
    (``reml=True``: adds ``0.5 * log|X^T V^-1 X|``, lme4's REML); :meth:`set_posterior` then writes the exact
    conditional posterior of the effects into the network's layers.

    Args:
        design: the training design.
        network: a :class:`~monai_armed.networks.nets.MixedModelNet` with a linear fixed part and one output.
        family: the Gaussian family (its ``log_scale`` is ``log sigma``).
        y: the response ``(N,)`` in the units being fitted.
        weights: row weights ``(N,)`` or ``None``.
        reml: add the restricted-likelihood term.

    Example::

        criterion = GaussianMarginalLikelihood(design, network, family, y)
        loss = criterion()          # -log L / N; minimise over network.out.weight, the priors and family.log_scale
        criterion.set_posterior()   # each level's posterior mean (BLUP) and covariance into the network
    """

    def __init__(
        self,
        design: MixedDesign,
        network: MixedModelNet,
        family: LikelihoodFamily,
        y: torch.Tensor,
        weights: torch.Tensor | None = None,
        reml: bool = False,
    ) -> None:
        if family.name != "gaussian":
            raise ValueError(f"the marginal likelihood is for the gaussian family, got {family.name!r}.")
        dtype = y.dtype
        self.network, self.family, self.reml, self.n_rows = network, family, reml, design.n_rows
        self.layout = EffectsLayout(design, network, dtype)
        q = self.q = self.layout.q
        if q > MAX_JOINT_EFFECTS:
            raise ValueError(f"{q} random effects: the dense joint solve takes at most {MAX_JOINT_EFFECTS}.")
        w = torch.ones(design.n_rows, dtype=dtype) if weights is None else weights.to(dtype)
        X = torch.tensor(design.X, dtype=dtype)
        col, wval = self.layout.columns, w.unsqueeze(1) * self.layout.values
        self.ztwz = self.layout.gram(w)
        self.ztwx = torch.zeros(q, X.shape[1], dtype=dtype).index_add_(
            0, col.reshape(-1), (wval.unsqueeze(2) * X.unsqueeze(1)).reshape(-1, X.shape[1])
        )
        self.ztwy = torch.zeros(q, dtype=dtype).index_add_(0, col.reshape(-1), (wval * y.unsqueeze(1)).reshape(-1))
        self.xtwx, self.xtwy = X.T @ (w.unsqueeze(1) * X), X.T @ (w * y)
        self.ytwy, self.weight_total = (w * y * y).sum(), w.sum()

    def criterion_parameters(self) -> list[torch.Tensor]:
        """What the criterion depends on: the fixed effects, the residual scale and the priors."""
        return [self.network.out.weight, *self.family.parameters(), *self.layout.prior_parameters()]

    def _system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``M``'s Cholesky factor, ``log|G|`` and ``sigma^2``."""
        variance = self.family.variance
        precision, log_det_prior = self.layout.prior_precision()
        return torch.linalg.cholesky(self.ztwz + variance * precision), log_det_prior, variance

    def __call__(self) -> torch.Tensor:
        chol, log_det_prior, variance = self._system()
        beta = self.network.out.weight[0].to(chol.dtype)
        ztwr = self.ztwy - self.ztwx @ beta
        rtwr = self.ytwy - 2 * beta @ self.xtwy + beta @ self.xtwx @ beta
        half_solved = torch.linalg.solve_triangular(chol, ztwr.unsqueeze(1), upper=False)
        quadratic = (rtwr - half_solved.pow(2).sum()) / variance
        log_det_m = 2 * chol.diagonal().log().sum()
        total = self.weight_total * torch.log(2 * math.pi * variance) + quadratic + log_det_prior + log_det_m
        total = total - self.q * variance.log()
        if self.reml:  # X^T V^-1 X = (X^T X - X^T Z M^-1 Z^T X) / sigma^2 (Woodbury)
            half_x = torch.linalg.solve_triangular(chol, self.ztwx, upper=False)
            total = total + torch.logdet((self.xtwx - half_x.T @ half_x) / variance)
        return 0.5 * total / self.n_rows

    @torch.no_grad()
    def set_posterior(self) -> None:
        """Write the conditional posterior of the effects given the fitted parameters into the network's layers: each
        level's mean (lme4's conditional modes, ``ranef``) and the covariance of its own effects (``sigma^2 M^-1``)."""
        chol, _, variance = self._system()
        beta = self.network.out.weight[0].to(chol.dtype)
        mean = torch.cholesky_solve((self.ztwy - self.ztwx @ beta).unsqueeze(1), chol)[:, 0]
        self.layout.write_posterior(mean, variance * torch.cholesky_inverse(chol))


class JointPosteriorELBO:
    """The negative ELBO per row of a generalized linear mixed model whose random effects, all factors together, have
    one Gaussian posterior ``N(m, S)`` (``q x q``, so correlations across factors and within a level are kept), at the
    posterior that is optimal for the current fixed effects, priors and family.

    ``(1/N) [sum_i w_i E_q[-log p(y_i | eta_i)] + KL(q || N(0, G))]`` with ``eta_i = x_i beta + z_i u``; the
    expectation takes ``eta_i``'s posterior mean and variance (exact for Gaussian and Poisson, Gauss-Hermite for the
    logit families). Each call first finds the optimal ``q`` by Newton steps from the previous one: the optimal
    precision is ``S^-1 = G^-1 + Z^T diag(lambda) Z`` with ``lambda_i = 2 d E_i / d v_i`` (Opper & Archambeau,
    Neural Computation 2009), reached by damped fixed-point steps, and a Newton step of the mean with that curvature,
    each step taken only as far as it lowers the ELBO.
    The value returned is differentiable in the fixed effects, the priors and the family's parameters with ``q``
    held fixed, which at the optimum is the gradient of the optimised ELBO (the envelope theorem), so an outer
    optimiser sees a smooth function of a few parameters. For a Gaussian family the optimum is the exact posterior and
    the exact marginal likelihood; for the others it is a variational approximation, close to lme4's Laplace fits,
    where per-level posteriors cannot share information between a row's factors.

    Args:
        design: the training design.
        network: a :class:`~monai_armed.networks.nets.MixedModelNet` with a linear fixed part and one output.
        family: the likelihood family.
        y: the response ``(N,)``.
        extras: the family's ``trials`` and ``weight`` tensors (or ``None``).
        newton_steps: the most Newton steps per call.

    Example::

        elbo = JointPosteriorELBO(design, network, family, y, {"trials": None, "weight": None})
        loss = elbo()          # minimise over elbo.criterion_parameters()
        elbo.set_posterior()   # each level's share of the joint posterior into the network
    """

    def __init__(
        self,
        design: MixedDesign,
        network: MixedModelNet,
        family: LikelihoodFamily,
        y: torch.Tensor,
        extras: dict[str, torch.Tensor | None],
        newton_steps: int = 100,
    ) -> None:
        dtype = y.dtype
        self.layout = EffectsLayout(design, network, dtype)
        q = self.layout.q
        if q > MAX_JOINT_POSTERIOR_EFFECTS:
            raise ValueError(f"{q} random effects: a joint posterior takes at most {MAX_JOINT_POSTERIOR_EFFECTS}.")
        self.network, self.family, self.n_rows, self.extras = network, family, design.n_rows, extras
        self.x, self.y, self.newton_steps = torch.tensor(design.X, dtype=dtype), y, newton_steps
        self.mean = torch.zeros(q, dtype=dtype)
        self.covariance = torch.zeros(q, q, dtype=dtype)
        self.weights: torch.Tensor | None = None  # lambda, the row weights of the posterior precision

    def criterion_parameters(self) -> list[torch.Tensor]:
        """What the criterion is minimised over: the fixed effects, the priors and the family's parameters."""
        return [self.network.out.weight, *self.family.parameters(), *self.layout.prior_parameters()]

    def fixed_effects_start(self) -> list[torch.Tensor]:
        """The parameters of the model without random effects (a GLM), to fit first: a start near the optimum keeps
        the first line searches from stepping where ``exp`` overflows."""
        return [self.network.out.weight, *self.family.parameters()]

    def glm_objective(self) -> torch.Tensor:
        """The negative log-likelihood per row without random effects."""
        return self._expected_nll(torch.zeros_like(self.mean), torch.zeros_like(self.covariance)) / self.n_rows

    def _expected_nll(self, mean: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i E_q[nll_i]`` for the posterior ``N(mean, covariance)`` of ``u``."""
        beta = self.network.out.weight[0].to(self.x.dtype)
        eta = self.x @ beta + (self.layout.values * mean[self.layout.columns]).sum(1)
        return self.family(eta, self.y, pred_var=self.layout.row_variances(covariance), **self.extras) * self.n_rows

    @staticmethod
    def _kl(mean, covariance, precision, log_det_prior, log_det_post) -> torch.Tensor:
        trace = (precision * covariance).sum()
        return 0.5 * (trace + mean @ precision @ mean - mean.numel() + log_det_prior - log_det_post)

    def _slopes(self, mean: torch.Tensor, covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``d/d mu_i`` and ``d/d v_i`` of ``sum_i w_i E_q[nll_i]`` at ``eta_i ~ N(mu_i, v_i)``."""
        beta = self.network.out.weight[0].detach().to(self.x.dtype)
        with torch.enable_grad():
            mu = (self.x @ beta + (self.layout.values * mean[self.layout.columns]).sum(1)).requires_grad_(True)
            var = self.layout.row_variances(covariance).requires_grad_(True)
            total = self.family(mu, self.y, pred_var=var, **self.extras) * self.n_rows
            return torch.autograd.grad(total, (mu, var))

    def _optimise_posterior(self, precision: torch.Tensor, log_det_prior: torch.Tensor) -> torch.Tensor:
        """Block-coordinate steps on ``q`` for the current parameters (all detached), each lowering the ELBO: the
        precision's row weights towards ``2 dE/dv`` (damped), then a Newton step of the mean (halved as needed).
        Returns ``log|S|``."""

        def system(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            chol = torch.linalg.cholesky(precision + self.layout.gram(weights))
            return chol, torch.cholesky_inverse(chol), -2 * chol.diagonal().log().sum()

        def objective(m: torch.Tensor, c: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
            return self._expected_nll(m, c) + self._kl(m, c, precision, log_det_prior, log_det)

        mean = self.mean
        weights = self.weights if self.weights is not None else (2 * self._slopes(mean, self.covariance)[1]).clamp(min=1e-10)
        chol, covariance, log_det = system(weights)
        current = objective(mean, covariance, log_det)
        for _ in range(self.newton_steps):
            target = (2 * self._slopes(mean, covariance)[1]).clamp(min=1e-10)
            change = target - weights
            for _ in range(30):  # damped: a fixed-point step of the weights can overshoot
                trial = system(weights + change)
                value = objective(mean, trial[1], trial[2])
                if value <= current:
                    weights, (chol, covariance, log_det), current = weights + change, trial, value
                    break
                change = change / 2
            gradient = self.layout.transpose_times(self._slopes(mean, covariance)[0]) + precision @ mean
            step = -torch.cholesky_solve(gradient.unsqueeze(1), chol)[:, 0]
            for _ in range(30):
                value = objective(mean + step, covariance, log_det)
                if value <= current:
                    mean, current = mean + step, value
                    break
                step = step / 2
            settled = bool(step.abs().max() <= 1e-10 * (1 + mean.abs().max()))
            if settled and bool((change.abs() <= 1e-8 * (1 + weights.abs())).all()):
                break
        self.mean, self.covariance, self.weights = mean, covariance, weights
        return log_det

    def __call__(self) -> torch.Tensor:
        precision, log_det_prior = self.layout.prior_precision()
        start = self.mean, self.covariance, self.weights
        try:
            with torch.no_grad():
                log_det_post = self._optimise_posterior(precision.detach(), log_det_prior.detach())
            failed = not bool(torch.isfinite(log_det_post)) or not bool(torch.isfinite(self.mean).all())
        except torch.linalg.LinAlgError:
            failed = True
        if not failed:
            nll = self._expected_nll(self.mean, self.covariance)
            kl = self._kl(self.mean, self.covariance, precision, log_det_prior, log_det_post)
            value = (nll + kl) / self.n_rows
            if bool(torch.isfinite(value)):
                return value
        # parameters no posterior fits (a line search's trial step too far, e.g. exp overflowing): a large, flat value
        # (finite, so that the line search can interpolate back)
        self.mean, self.covariance, self.weights = start
        return sum(p.sum() * 0 for p in self.criterion_parameters()) + _UNFIT

    @torch.no_grad()
    def set_posterior(self) -> None:
        """Write each level's share of the joint posterior (its mean and the covariance of its own effects) into the
        network's layers."""
        self()
        self.layout.write_posterior(self.mean, self.covariance)
