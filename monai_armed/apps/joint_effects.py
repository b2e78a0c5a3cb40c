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
    "UNFIT",
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


#: the joint posterior criterion's value where the parameters admit no posterior
UNFIT = 1e10


class EffectsLayout:
    """Where each factor's effects sit in the vector ``u`` of all ``q`` random effects (factor by factor, level by
    level, term by term), and the design in lme4's spherical form ``Z Lambda`` (``u = Lambda b``, ``b ~ N(0, I)``,
    ``G = Lambda Lambda^T`` block-diagonal): a row's entries of ``Z Lambda`` sit in the same columns as its entries of
    ``Z`` (its levels' blocks), with values ``z_f P_f`` for each factor's prior Cholesky factor ``P_f``. Working with
    ``Lambda`` rather than ``G^-1``, as lme4 does, keeps every system positive definite where a variance is 0 or a
    correlation +-1, and with per-row entries nothing is ever multiplied by a dense ``q x q`` ``Lambda``.

    Args:
        design: the training design (its factors give ``Z`` and the level codes).
        network: the :class:`~monai_armed.networks.nets.MixedModelNet` whose layers hold the priors and posteriors.
        dtype: floating-point type of the tensors.

    Example::

        layout = EffectsLayout(design, network, torch.float64)
        values = layout.spherical_values()          # (N, k) entries of Z Lambda in layout.columns
        gram = layout.gram(torch.ones(n), values)   # Lambda^T Z^T Z Lambda (q x q)
    """

    def __init__(self, design: MixedDesign, network: MixedModelNet, dtype: torch.dtype) -> None:
        if len(network.hidden) or network.out_channels != 1 or network.out.bias is not None:
            raise ValueError(
                "a joint fit of the random effects needs a linear fixed part without a bias (the intercept a column of "
                "the design) and one output."
            )
        self.layers = [network.random_effects[key] for key in design.factors]
        self.sizes = [(factor.n_levels, factor.Z.shape[1]) for factor in design.factors.values()]
        self.q = sum(levels * units for levels, units in self.sizes)
        columns, values, offset = [], [], 0
        for (levels, units), factor in zip(self.sizes, design.factors.values()):
            codes = torch.as_tensor(factor.codes, dtype=torch.long)
            # a level outside the vocabulary (-1) has no effect for this factor: a zero entry of Z
            columns.append(offset + codes.clamp(min=0).unsqueeze(1) * units + torch.arange(units))
            values.append(torch.tensor(factor.Z, dtype=dtype) * (codes >= 0).unsqueeze(1).to(dtype))
            offset += levels * units
        #: ``(N, k)`` column of ``u`` and value of each of a row's ``k`` random-effects design entries
        self.columns, self.values = torch.cat(columns, 1), torch.cat(values, 1)

    def spherical_values(self) -> torch.Tensor:
        """The entries of ``Z Lambda`` (``(N, k)``, in :attr:`columns`), differentiable in the layers' priors."""
        parts, start = [], 0
        for layer, (_, units) in zip(self.layers, self.sizes):
            parts.append(self.values[:, start : start + units] @ layer.prior_cholesky().to(self.values.dtype))
            start += units
        return torch.cat(parts, 1)

    def gram(self, row_weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``V^T diag(row_weights) V`` (dense, ``q x q``) of the per-row entries ``values``."""
        q = self.q
        pairs = (self.columns.unsqueeze(2) * q + self.columns.unsqueeze(1)).reshape(-1)
        products = (row_weights.reshape(-1, 1, 1) * values.unsqueeze(2) * values.unsqueeze(1)).reshape(-1)
        return products.new_zeros(q * q).index_add(0, pairs, products).reshape(q, q)

    def transpose_times(self, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``V^T r`` (``(q,)`` or ``(q, p)``) of a per-row vector or matrix ``r`` (``(N,)`` or ``(N, p)``)."""
        matrix = rows.reshape(rows.shape[0], -1)
        products = (values.unsqueeze(2) * matrix.unsqueeze(1)).reshape(-1, matrix.shape[1])
        out = products.new_zeros(self.q, matrix.shape[1]).index_add(0, self.columns.reshape(-1), products)
        return out[:, 0] if rows.dim() == 1 else out

    def times(self, vector: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``V v`` (``(N,)``) of a vector ``v`` of all effects."""
        return (values * vector[self.columns]).sum(1)

    def row_variances(self, covariance: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``v_i^T S v_i`` of every row's entries ``v_i`` for a covariance ``S`` (``(N,)``)."""
        entries = covariance[self.columns.unsqueeze(2), self.columns.unsqueeze(1)]
        return (values.unsqueeze(2) * values.unsqueeze(1) * entries).sum((1, 2))

    def prior_parameters(self) -> list[nn.Parameter]:
        """The learned parameters of every factor's prior covariance."""
        return [p for layer in self.layers for p in (layer.log_prior_scale, layer.prior_tril)
                if isinstance(p, nn.Parameter) and p.numel()]  # fmt: skip

    @torch.no_grad()
    def write_posterior(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Set each level's posterior from a joint posterior ``N(mean, covariance)`` of the spherical effects ``b``:
        ``u_l = P_f b_l``, with the covariance of the level's own effects ``P_f S_ll P_f^T`` (a diagonal layer keeps
        its variances)."""
        offset = 0
        for layer, (levels, units) in zip(self.layers, self.sizes):
            chol = layer.prior_cholesky().to(mean.dtype)
            index = offset + torch.arange(levels * units).reshape(levels, units)
            layer.loc.copy_(mean[index] @ chol.T)
            block = chol @ covariance[index.unsqueeze(2), index.unsqueeze(1)] @ chol.T
            if layer.covariance == "full":  # a jitter: a level's block is singular where a prior variance is 0
                factor = torch.linalg.cholesky(block + 1e-12 * torch.eye(units, dtype=block.dtype))
                diagonal = factor.diagonal(dim1=-2, dim2=-1)
                layer.tril.copy_(factor[:, layer._tril_rows, layer._tril_cols])
            else:
                diagonal = block.diagonal(dim1=-2, dim2=-1).sqrt()
            layer.rho.copy_(inverse_softplus((diagonal - 1e-5).clamp(min=1e-12)))
            offset += levels * units


class GaussianMarginalLikelihood:
    """The exact negative log marginal likelihood per row of a linear Gaussian mixed model, every factor's random
    effects integrated out jointly.

    ``y = X beta + Z u + e``, ``u ~ N(0, G)`` with ``G = Lambda Lambda^T``, ``e_i ~ N(0, sigma^2)``, row weights
    multiplying each row's log-likelihood. With ``A = Lambda^T Z^T W Z Lambda + sigma^2 I`` (dense, ``q x q``; lme4's
    form, positive definite also where a variance is 0 or a correlation +-1) and ``r = y - X beta``::

        -log L = 0.5 * [sum(w) log(2 pi sigma^2) + (r^T W r - r^T W Z Lambda A^-1 Lambda^T Z^T W r) / sigma^2
                        + log|A| - q log sigma^2]

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
        loss = criterion()          # -log L / N; minimise over criterion.criterion_parameters()
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
        self.network, self.family, self.reml, self.n_rows, self.y = network, family, reml, design.n_rows, y
        self.layout = EffectsLayout(design, network, dtype)
        self.q = self.layout.q
        if self.q > MAX_JOINT_EFFECTS:
            raise ValueError(f"{self.q} random effects: the dense joint solve takes at most {MAX_JOINT_EFFECTS}.")
        self.w = torch.ones(design.n_rows, dtype=dtype) if weights is None else weights.to(dtype)
        self.x = torch.tensor(design.X, dtype=dtype)
        self.xtwx, self.weight_total = self.x.T @ (self.w.unsqueeze(1) * self.x), self.w.sum()

    def criterion_parameters(self) -> list[torch.Tensor]:
        """What the criterion depends on: the fixed effects, the residual scale and the priors."""
        return [self.network.out.weight, *self.family.parameters(), *self.layout.prior_parameters()]

    def _system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Cholesky factor of ``A``, the entries of ``Z Lambda``, the residual ``r`` and ``sigma^2``."""
        variance = self.family.variance
        values = self.layout.spherical_values()
        spherical = self.layout.gram(self.w, values) + variance * torch.eye(self.q, dtype=values.dtype)
        residual = self.y - self.x @ self.network.out.weight[0].to(values.dtype)
        return torch.linalg.cholesky(spherical), values, residual, variance

    def __call__(self) -> torch.Tensor:
        chol, values, residual, variance = self._system()
        lztwr = self.layout.transpose_times(self.w * residual, values)
        half_solved = torch.linalg.solve_triangular(chol, lztwr.unsqueeze(1), upper=False)
        quadratic = ((self.w * residual * residual).sum() - half_solved.pow(2).sum()) / variance
        log_det_a = 2 * chol.diagonal().log().sum()  # log|G| + log|M|, with M = Z^T W Z + sigma^2 G^-1
        total = self.weight_total * torch.log(2 * math.pi * variance) + quadratic + log_det_a - self.q * variance.log()
        if self.reml:  # X^T V^-1 X = (X^T W X - X^T W Z Lambda A^-1 Lambda^T Z^T W X) / sigma^2 (Woodbury)
            lztwx = self.layout.transpose_times(self.w.unsqueeze(1) * self.x, values)
            half_x = torch.linalg.solve_triangular(chol, lztwx, upper=False)
            total = total + torch.logdet((self.xtwx - half_x.T @ half_x) / variance)
        return 0.5 * total / self.n_rows

    @torch.no_grad()
    def set_posterior(self) -> None:
        """Write the conditional posterior of the effects given the fitted parameters into the network's layers: each
        level's mean (lme4's conditional modes, ``ranef``) and the covariance of its own effects; in the spherical
        form ``b | y ~ N(A^-1 Lambda^T Z^T W r, sigma^2 A^-1)``."""
        chol, values, residual, variance = self._system()
        lztwr = self.layout.transpose_times(self.w * residual, values)
        mean = torch.cholesky_solve(lztwr.unsqueeze(1), chol)[:, 0]
        self.layout.write_posterior(mean, variance * torch.cholesky_inverse(chol))


class JointPosteriorELBO:
    """The negative ELBO per row of a generalized linear mixed model whose random effects, all factors together, have
    one Gaussian posterior (``q x q``, so correlations across factors and within a level are kept), at the posterior
    that is optimal for the current fixed effects, priors and family.

    ``(1/N) [sum_i w_i E_q[-log p(y_i | eta_i)] + KL(q || p)]`` with ``eta_i = x_i beta + z_i u``; the expectation
    takes ``eta_i``'s posterior mean and variance (exact for Gaussian and Poisson, Gauss-Hermite for the logit
    families). In lme4's spherical form ``u = Lambda b``, ``b ~ N(0, I)`` a priori and ``N(a, S_b)`` a posteriori,
    the KL is ``0.5 [tr S_b + a^T a - q - log|S_b|]`` whatever the prior, which stays finite where a variance is 0.
    Each call first finds the optimal posterior from the previous one: ``S_b^-1 = I + Lambda^T Z^T diag(lambda) Z
    Lambda`` with ``lambda_i = 2 dE_i/dv_i`` (Opper & Archambeau, Neural Computation 2009), reached by damped
    fixed-point steps, and a Newton step of ``a`` with that curvature, each step taken only as far as it lowers the
    ELBO. The value returned is differentiable in the fixed effects, the priors and the family's parameters with
    ``a`` and ``S_b`` held fixed, which at the optimum is the gradient of the optimised ELBO (the envelope theorem), so
    an outer optimiser sees a smooth function of a few parameters. For a Gaussian family the optimum is the exact
    posterior and the exact marginal likelihood; for the others it is a variational approximation, close to lme4's
    Laplace fits, where per-level posteriors cannot share information between a row's factors.

    Args:
        design: the training design.
        network: a :class:`~monai_armed.networks.nets.MixedModelNet` with a linear fixed part and one output.
        family: the likelihood family.
        y: the response ``(N,)``.
        extras: the family's ``trials`` and ``weight`` tensors (or ``None``).
        newton_steps: the most steps per call; :attr:`settled` says whether the last call's posterior converged.

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
        self.mean = torch.zeros(q, dtype=dtype)  # a
        self.covariance = torch.eye(q, dtype=dtype)  # S_b
        self.log_det = torch.zeros((), dtype=dtype)  # log|S_b|
        self.weights: torch.Tensor | None = None  # lambda, the row weights of the posterior precision
        self.settled = False

    def criterion_parameters(self) -> list[torch.Tensor]:
        """What the criterion is minimised over: the fixed effects, the priors and the family's parameters."""
        return [self.network.out.weight, *self.family.parameters(), *self.layout.prior_parameters()]

    def fixed_effects_start(self) -> list[torch.Tensor]:
        """The parameters of the model without random effects (a GLM), to fit first: a start near the optimum keeps
        the first line searches from stepping where ``exp`` overflows."""
        return [self.network.out.weight, *self.family.parameters()]

    def glm_objective(self) -> torch.Tensor:
        """The negative log-likelihood per row without random effects."""
        zero = self.layout.values.new_zeros(self.layout.values.shape)
        return self._expected_nll(self.mean, self.covariance, zero) / self.n_rows

    def _expected_nll(self, mean: torch.Tensor, covariance: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``sum_i w_i E_q[nll_i]`` for ``b ~ N(mean, covariance)``, ``values`` the entries of ``Z Lambda``."""
        beta = self.network.out.weight[0].to(self.x.dtype)
        eta = self.x @ beta + self.layout.times(mean, values)
        variance = self.layout.row_variances(covariance, values)
        return self.family(eta, self.y, pred_var=variance, **self.extras) * self.n_rows

    def _slopes(self, mean: torch.Tensor, covariance: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``d/d mu_i`` and ``d/d v_i`` of ``sum_i w_i E_q[nll_i]`` at ``eta_i ~ N(mu_i, v_i)``."""
        beta = self.network.out.weight[0].detach().to(self.x.dtype)
        with torch.enable_grad():
            mu = (self.x @ beta + self.layout.times(mean, values)).requires_grad_(True)
            var = self.layout.row_variances(covariance, values).requires_grad_(True)
            total = self.family(mu, self.y, pred_var=var, **self.extras) * self.n_rows
            return torch.autograd.grad(total, (mu, var))

    def _optimise_posterior(self, values: torch.Tensor) -> None:
        """Steps on ``a`` and ``S_b`` for the current parameters (all detached; ``values`` the entries of ``Z Lambda``),
        each lowering the ELBO: the precision's row weights towards ``2 dE/dv`` (damped), then a Newton step of ``a``
        (halved as needed)."""
        eye = torch.eye(self.layout.q, dtype=values.dtype)

        def system(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            chol = torch.linalg.cholesky(eye + self.layout.gram(weights, values))
            return chol, torch.cholesky_inverse(chol), -2 * chol.diagonal().log().sum()

        def objective(a: torch.Tensor, s: torch.Tensor, log_det: torch.Tensor) -> torch.Tensor:
            return self._expected_nll(a, s, values) + 0.5 * (s.diagonal().sum() + a @ a - a.numel() - log_det)

        a = self.mean
        weights = self.weights
        if weights is None:
            weights = (2 * self._slopes(a, self.covariance, values)[1]).clamp(min=1e-10)
        chol, covariance, log_det = system(weights)
        current = objective(a, covariance, log_det)
        self.settled = False
        for _ in range(self.newton_steps):
            change = (2 * self._slopes(a, covariance, values)[1]).clamp(min=1e-10) - weights
            for _ in range(30):  # damped: a fixed-point step of the weights can overshoot
                trial = system(weights + change)
                value = objective(a, trial[1], trial[2])
                if value <= current:
                    weights, (chol, covariance, log_det), current = weights + change, trial, value
                    break
                change = change / 2
            gradient = self.layout.transpose_times(self._slopes(a, covariance, values)[0], values) + a
            step = -torch.cholesky_solve(gradient.unsqueeze(1), chol)[:, 0]
            for _ in range(30):
                value = objective(a + step, covariance, log_det)
                if value <= current:
                    a, current = a + step, value
                    break
                step = step / 2
            if bool(step.abs().max() <= 1e-10 * (1 + a.abs().max())) and bool(
                (change.abs() <= 1e-8 * (1 + weights.abs())).all()
            ):
                self.settled = True
                break
        self.mean, self.covariance, self.log_det, self.weights = a, covariance, log_det, weights

    def __call__(self) -> torch.Tensor:
        values = self.layout.spherical_values()
        start = self.mean, self.covariance, self.log_det, self.weights
        try:
            with torch.no_grad():
                self._optimise_posterior(values.detach())
            failed = not bool(torch.isfinite(self.log_det)) or not bool(torch.isfinite(self.mean).all())
        except torch.linalg.LinAlgError:
            failed = True
        if not failed:
            nll = self._expected_nll(self.mean, self.covariance, values)
            kl = 0.5 * (self.covariance.diagonal().sum() + self.mean @ self.mean - self.layout.q - self.log_det)
            value = (nll + kl) / self.n_rows
            if bool(torch.isfinite(value)):
                return value
        # parameters no posterior fits (a line search's trial step too far, e.g. exp overflowing): a large, flat value
        # (finite, so that the line search can interpolate back)
        self.mean, self.covariance, self.log_det, self.weights = start
        self.settled = False
        return sum(p.sum() * 0 for p in self.criterion_parameters()) + UNFIT

    @torch.no_grad()
    def set_posterior(self) -> None:
        """Write each level's share of the joint posterior (its mean and the covariance of its own effects) into the
        network's layers."""
        self.layout.write_posterior(self.mean, self.covariance)
