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

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_armed.utils import shape_str

__all__ = ["RandomEffects", "check_cluster_index", "inverse_softplus"]

_MIN_SCALE = 1e-5


def inverse_softplus(value: float | torch.Tensor) -> torch.Tensor:
    """Inverse of ``softplus``: returns ``x`` such that ``log(1 + exp(x)) == value`` (``value > 0``).

    Example::

        rho = inverse_softplus(0.1)       # softplus(rho) == 0.1
    """
    value = torch.as_tensor(value, dtype=torch.float32)
    return value + torch.log(-torch.expm1(-value))


def check_cluster_index(index: torch.Tensor, n_clusters: int) -> int:
    """Raise an ``IndexError`` unless every index is ``-1`` (unseen) or ``0..n_clusters-1``; returns the smallest.

    Example::

        if check_cluster_index(cluster, 10) < 0:
            ...  # some samples come from unseen clusters
    """
    if index.numel() == 0:
        return 0
    low, high = torch.aminmax(index)
    low_value, high_value = int(low), int(high)
    if low_value < -1 or high_value >= n_clusters:
        bad = low_value if low_value < -1 else high_value
        raise IndexError(
            f"cluster index {bad} is out of range: expected -1 (unseen) or 0..{n_clusters - 1} ({n_clusters} clusters)."
        )
    return low_value


def _per_unit(value: float | Sequence[float], units: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if tensor.dim() == 0:
        return tensor
    if tensor.shape != (units,):
        raise ValueError(
            f"{name} must be a float or have one value per unit ({units}), got shape {tuple(tensor.shape)}."
        )
    return tensor


class RandomEffects(nn.Module):
    """Per-cluster Bayesian random effects: a mean-field Gaussian posterior over ``n_clusters x units`` values.

    Each cluster ``c`` has ``units`` random effects ``u_c ~ q(u_c) = N(mu_c, s_c^2)`` with ``s_c = 1e-5 + softplus(rho_c)``
    and a zero-mean Gaussian prior ``N(0, prior_scale^2)`` (fixed, or learnable for empirical Bayes). This is the
    random-effects layer of ARMED (Nguyen & Montillo, https://arxiv.org/abs/2202.11783, TPAMI 2023).

    ``forward(cluster)`` accepts
        - an ``int64`` tensor ``(B,)`` of cluster indices; ``-1`` marks an unseen cluster and gives a zero effect
          (fixed effects only). The cost is ``O(B * units)`` whatever the number of clusters.
        - a float tensor ``(B, n_clusters)`` of soft memberships (rows sum to 1, e.g. from a Z-predictor): the
          membership-weighted mean of the clusters' effects. An all-zero row gives a zero effect.

    In training mode the output is a posterior draw (reparameterised, so gradients reach ``mu`` and ``rho``); in
    evaluation mode it is the posterior mean. With index input, ``sample_per_row=True`` (default) draws independent
    noise per row, ``False`` draws one value per cluster shared by the batch as in the authors' code (``O(C * units)``).

    The posterior scales are initialised uniformly in ``[post_scale_init_min, post_scale_init_min +
    post_scale_init_range]`` as the paper intends. ``reference_scale_init=True`` reproduces the authors' code, which
    sums two inverse-softplus values and so starts the scales in about ``[0.003, 0.05]`` for the defaults.

    Args:
        n_clusters: number of seen clusters ``C``.
        units: number of random effects per cluster ``K``.
        prior_scale: standard deviation of the zero-mean Gaussian prior; a float, or one value per unit.
        post_loc_init_scale: the posterior means start as ``N(0, post_loc_init_scale^2)``; a float, or one per unit.
        post_scale_init_min: lower end of the initial posterior scale.
        post_scale_init_range: width of the initial posterior scale interval.
        learn_prior_scale: learn the prior scale (empirical Bayes) instead of keeping it fixed.
        kl_estimator: ``"analytic"`` (closed form, default) or ``"mc"`` (one-sample Monte-Carlo estimate with a
            fresh draw, the authors' estimator).
        sample_per_row: see above.
        reference_scale_init: reproduce the authors' posterior-scale initialisation bug.

    Example::

        re = RandomEffects(n_clusters=10, units=4, prior_scale=0.3)
        u = re(torch.tensor([0, 3, -1]))          # (3, 4); the last row is zero (unseen cluster)
        kl = re.kl_divergence()                  # scalar, summed over clusters and units
        spread = re.spread()                     # (4,) s.d. of the posterior means across clusters
    """

    def __init__(
        self,
        n_clusters: int,
        units: int = 1,
        prior_scale: float | Sequence[float] = 0.05,
        post_loc_init_scale: float | Sequence[float] = 0.05,
        post_scale_init_min: float = 0.05,
        post_scale_init_range: float = 0.05,
        learn_prior_scale: bool = False,
        kl_estimator: str = "analytic",
        sample_per_row: bool = True,
        reference_scale_init: bool = False,
    ) -> None:
        super().__init__()
        if n_clusters < 1 or units < 1:
            raise ValueError(f"n_clusters and units must be >= 1, got n_clusters={n_clusters}, units={units}.")
        prior = _per_unit(prior_scale, units, "prior_scale")
        loc_init = _per_unit(post_loc_init_scale, units, "post_loc_init_scale")
        if bool((prior <= 0).any()) or post_scale_init_min <= 0 or post_scale_init_range < 0:
            raise ValueError("prior_scale and post_scale_init_min must be > 0 and post_scale_init_range >= 0.")
        if kl_estimator not in ("analytic", "mc"):
            raise ValueError(f"kl_estimator must be 'analytic' or 'mc', got {kl_estimator!r}.")
        self.n_clusters, self.units = n_clusters, units
        self.kl_estimator, self.sample_per_row = kl_estimator, sample_per_row
        self.loc = nn.Parameter(torch.randn(n_clusters, units) * loc_init)
        if reference_scale_init:
            low = inverse_softplus(post_scale_init_min)
            high = low + inverse_softplus(post_scale_init_range)
        else:
            low = inverse_softplus(post_scale_init_min - _MIN_SCALE)
            high = inverse_softplus(post_scale_init_min + post_scale_init_range - _MIN_SCALE)
        self.rho = nn.Parameter(low + (high - low) * torch.rand(n_clusters, units))
        log_prior = prior.log()
        if learn_prior_scale:
            self.log_prior_scale = nn.Parameter(log_prior)
        else:
            self.register_buffer("log_prior_scale", log_prior)

    @property
    def scale(self) -> torch.Tensor:
        """Posterior standard deviations ``(n_clusters, units)``."""
        return F.softplus(self.rho) + 1e-5

    @property
    def prior_scale(self) -> torch.Tensor:
        return self.log_prior_scale.exp()

    def forward(self, cluster: torch.Tensor) -> torch.Tensor:
        if cluster.is_floating_point():
            return self._soft(cluster)
        return self._lookup(cluster)

    def _lookup(self, index: torch.Tensor) -> torch.Tensor:
        if index.dim() != 1:
            raise ValueError(f"cluster indices must have shape (batch,), got {shape_str(index)}.")
        if index.numel() == 0:
            return self.loc.new_zeros(0, self.units)
        low = check_cluster_index(index, self.n_clusters)
        safe = index.clamp(min=0) if low < 0 else index
        if not self.training:
            effects = self.loc[safe]
        elif self.sample_per_row:  # gather first: the cost is O(batch * units) whatever the number of clusters
            loc = self.loc[safe]
            effects = loc + (F.softplus(self.rho[safe]) + 1e-5) * torch.randn_like(loc)
        else:
            effects = self._draw()[safe]
        if low < 0:
            effects = effects * (index >= 0).unsqueeze(1).to(effects.dtype)
        return effects

    def _soft(self, membership: torch.Tensor) -> torch.Tensor:
        if membership.dim() != 2 or membership.shape[1] != self.n_clusters:
            raise ValueError(
                f"soft cluster membership must have shape (batch, {self.n_clusters}), got {shape_str(membership)}."
            )
        effects = self._draw() if self.training else self.loc
        return membership.to(effects.dtype) @ effects

    def _draw(self) -> torch.Tensor:
        return self.loc + self.scale * torch.randn_like(self.loc)

    def kl_divergence(self) -> torch.Tensor:
        """KL(q || p) summed over clusters and units (analytic, or a one-sample Monte-Carlo estimate)."""
        scale, prior = self.scale, self.prior_scale.expand(self.units)
        if self.kl_estimator == "analytic":
            kl = torch.log(prior / scale) + (scale**2 + self.loc**2) / (2 * prior**2) - 0.5
            return kl.sum()
        draw = self._draw()
        log_q = torch.distributions.Normal(self.loc, scale).log_prob(draw)
        log_p = torch.distributions.Normal(torch.zeros_like(draw), prior).log_prob(draw)
        return (log_q - log_p).sum()

    def spread(self) -> torch.Tensor:
        """Across-cluster standard deviation of the posterior means, per unit ``(units,)``."""
        if self.n_clusters < 2:
            return torch.zeros(self.units, device=self.loc.device)
        return self.loc.detach().std(dim=0)

    def extra_repr(self) -> str:
        return f"n_clusters={self.n_clusters}, units={self.units}, kl_estimator={self.kl_estimator!r}"
