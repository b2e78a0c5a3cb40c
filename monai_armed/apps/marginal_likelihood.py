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

import math

import torch

from monai_armed.data.formula import MixedDesign
from monai_armed.losses.families import LikelihoodFamily
from monai_armed.networks.layers.random_effects import inverse_softplus
from monai_armed.networks.nets.mixed_model import MixedModelNet

__all__ = ["GaussianMarginalLikelihood", "MAX_JOINT_EFFECTS"]

#: the most random effects (levels x terms, over every factor) whose joint posterior is solved densely
MAX_JOINT_EFFECTS = 4000


class GaussianMarginalLikelihood:
    """The exact negative log marginal likelihood of a linear Gaussian mixed model, per row, with the random effects
    of every grouping factor integrated out jointly.

    ``y = X beta + Z u + e``, ``u ~ N(0, G)`` (``G`` block-diagonal: each factor's prior covariance, per level),
    ``e_i ~ N(0, sigma^2)`` with row weights multiplying each row's log-likelihood. With ``M = Z^T W Z + sigma^2 G^-1``
    (dense, ``q x q`` for the ``q`` random effects of all factors) and ``r = y - X beta``::

        -log L = 0.5 * [sum(w) log(2 pi sigma^2) + (r^T W r - r^T W Z M^-1 Z^T W r) / sigma^2
                        + log|G| + log|M| - q log sigma^2]

    A per-level mean-field posterior (the ELBO of :func:`~monai_armed.apps.fit_mixed_model`) is exact for one
    grouping factor with correlated effects, but not when a row's effects come from several factors (crossed or
    nested: their posteriors are correlated across factors) or from an uncorrelated (``||``) term (the posterior of
    one level's intercept and slope is correlated although the prior is not). Maximising this criterion instead gives
    lme4's maximum-likelihood estimates (``reml=True``: adds ``0.5 * log|X^T V^-1 X|``, lme4's REML). The parameters
    are those of ``network`` and ``family``: the fixed effects, each factor's prior covariance and the residual scale;
    :meth:`set_posterior` then writes the exact conditional posterior of the effects into the network's layers.

    Args:
        design: the training design (its factors give ``Z`` and the level codes).
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
        if len(network.hidden) or network.out_channels != 1 or family.name != "gaussian":
            raise ValueError("the marginal likelihood needs a linear fixed part, one output and the gaussian family.")
        dtype = y.dtype
        self.network, self.family, self.reml, self.n_rows = network, family, reml, design.n_rows
        self.layers = [network.random_effects[key] for key in design.factors]
        self.sizes = [(factor.n_levels, factor.Z.shape[1]) for factor in design.factors.values()]
        self.q = sum(levels * units for levels, units in self.sizes)
        if self.q > MAX_JOINT_EFFECTS:
            raise ValueError(f"{self.q} random effects: the dense joint solve takes at most {MAX_JOINT_EFFECTS}.")
        w = torch.ones(design.n_rows, dtype=dtype) if weights is None else weights.to(dtype)
        X = torch.tensor(design.X, dtype=dtype)
        columns, values, offset = [], [], 0
        for (levels, units), factor in zip(self.sizes, design.factors.values()):
            codes = torch.as_tensor(factor.codes, dtype=torch.long)
            columns.append(offset + codes.unsqueeze(1) * units + torch.arange(units))
            values.append(torch.tensor(factor.Z, dtype=dtype))
            offset += levels * units
        col, val = torch.cat(columns, 1), torch.cat(values, 1)  # Z as (N, k) column indices and values
        q = self.q
        pairs = (col.unsqueeze(2) * q + col.unsqueeze(1)).reshape(-1)
        products = ((w.unsqueeze(1) * val).unsqueeze(2) * val.unsqueeze(1)).reshape(-1)
        self.ztwz = torch.zeros(q * q, dtype=dtype).index_add_(0, pairs, products).reshape(q, q)
        wval = w.unsqueeze(1) * val
        self.ztwx = torch.zeros(q, X.shape[1], dtype=dtype).index_add_(
            0, col.reshape(-1), (wval.unsqueeze(2) * X.unsqueeze(1)).reshape(-1, X.shape[1])
        )
        self.ztwy = torch.zeros(q, dtype=dtype).index_add_(0, col.reshape(-1), (wval * y.unsqueeze(1)).reshape(-1))
        self.xtwx, self.xtwy = X.T @ (w.unsqueeze(1) * X), X.T @ (w * y)
        self.ytwy, self.weight_total = (w * y * y).sum(), w.sum()
        # where each factor's prior precision goes in M: the (units x units) diagonal block of every level
        self.blocks = []
        offset = 0
        for levels, units in self.sizes:
            start = offset + torch.arange(levels).reshape(levels, 1, 1) * units
            rows = (start + torch.arange(units).reshape(1, units, 1)).expand(levels, units, units)
            cols = (start + torch.arange(units).reshape(1, 1, units)).expand(levels, units, units)
            self.blocks.append((rows.reshape(-1), cols.reshape(-1)))
            offset += levels * units

    def _system(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``M``'s Cholesky factor, ``log|G|`` and ``sigma^2``."""
        variance = self.family.variance
        m, log_det_prior = self.ztwz, self.ztwz.new_zeros(())
        for layer, (levels, units), (rows, cols) in zip(self.layers, self.sizes, self.blocks):
            chol = layer.prior_cholesky().to(m.dtype)
            precision = torch.cholesky_inverse(chol)
            m = m.index_put((rows, cols), (variance * precision).expand(levels, units, units).reshape(-1), accumulate=True)
            log_det_prior = log_det_prior + levels * 2 * chol.diagonal().log().sum()
        return torch.linalg.cholesky(m), log_det_prior, variance

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
        level's mean (lme4's conditional modes, ``ranef``) and the covariance of its own effects (the diagonal
        ``units x units`` block of ``sigma^2 M^-1``; a diagonal layer keeps the block's variances)."""
        chol, _, variance = self._system()
        beta = self.network.out.weight[0].to(chol.dtype)
        mean = torch.cholesky_solve((self.ztwy - self.ztwx @ beta).unsqueeze(1), chol)[:, 0]
        covariance = variance * torch.cholesky_inverse(chol)
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
