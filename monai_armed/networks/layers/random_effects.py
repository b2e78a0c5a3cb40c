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

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_armed.utils import batch_checks_enabled, shape_str

__all__ = ["RandomEffects", "check_cluster_index", "inverse_softplus", "COVARIANCES"]

COVARIANCES = ("diagonal", "full")

_MIN_SCALE = 1e-5


def _check_cluster_type(cluster: object) -> None:
    """A readable error for clusters given as something other than one tensor (a network of one grouping factor), or
    as a bool / uint8 tensor, which torch would take as a mask rather than as indices."""
    if isinstance(cluster, torch.Tensor):
        if cluster.dtype in (torch.bool, torch.uint8):
            raise TypeError(
                f"cluster indices must be an int64 tensor (-1: unseen), got {cluster.dtype}: torch indexes with a "
                f"{cluster.dtype} tensor as a mask, not by value; convert it with cluster.long()."
            )
        return
    if isinstance(cluster, Mapping):
        raise TypeError(
            f"this network has one grouping factor: pass its clusters as one tensor, not a mapping of factors "
            f"{sorted(cluster)} (a network of several factors is MixedModelNet)."
        )
    raise TypeError(
        f"clusters must be a tensor of int64 indices (B,) (-1: unseen) or soft memberships (B, C), got "
        f"{type(cluster).__name__}: map raw cluster ids with ClusterIndexd / ClusterVocabulary first."
    )


def inverse_softplus(value: float | torch.Tensor) -> torch.Tensor:
    """Inverse of ``softplus``: returns ``x`` such that ``log(1 + exp(x)) == value`` (``value > 0``), in the dtype of a
    floating-point tensor ``value`` (float32 otherwise).

    Example::

        rho = inverse_softplus(0.1)       # softplus(rho) == 0.1
    """
    keep = isinstance(value, torch.Tensor) and value.is_floating_point()
    value = torch.as_tensor(value, dtype=value.dtype if keep else torch.float32)
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


def _refresh_level_total(module: nn.Module, incompatible_keys: object) -> None:
    if module.level_counts is not None:
        module._level_total = module.level_counts.sum()


def _per_unit(value: float | Sequence[float], units: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32)
    if tensor.dim() == 0:
        return tensor
    if tensor.shape != (units,):
        raise ValueError(
            f"{name} must be a float or have one value per unit ({units}), got shape {tuple(tensor.shape)}."
        )
    return tensor


def _check_membership(membership: torch.Tensor) -> None:
    """Soft memberships are probabilities: finite, >= 0, each row summing to 1 (or all 0: no cluster)."""
    # summed in float32 at least, within the rounding of the membership's own dtype (bfloat16 steps by 4e-3 near 1)
    totals = membership.sum(1, dtype=torch.promote_types(membership.dtype, torch.float32))
    tolerance = max(1e-3, 4 * torch.finfo(membership.dtype).eps)
    bad = ~torch.isfinite(membership).all(1) | (membership < 0).any(1)
    bad |= ((totals - 1).abs() > tolerance) & (totals.abs() > tolerance)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"soft cluster membership row {row} is {membership[row].tolist()}; expected probabilities (finite, >= 0, "
            "summing to 1, or all 0 for no cluster), e.g. a Z-predictor's softmax."
        )


class RandomEffects(nn.Module):
    """Per-cluster Bayesian random effects of one grouping factor: a Gaussian posterior per level over ``units`` values.

    Each level (cluster) ``c`` has ``units`` random effects ``u_c ~ q(u_c) = N(mu_c, S_c S_c^T)`` and a zero-mean
    Gaussian prior ``N(0, Sigma)``. This is the random-effects layer of ARMED (Nguyen & Montillo,
    https://arxiv.org/abs/2202.11783, TPAMI 2023), and with ``covariance="full"`` and ``learn_prior_scale=True`` the
    random-effects term of a generalized linear mixed model as lme4 fits it:

        - ``covariance="diagonal"`` (default): mean-field posterior ``S_c = diag(1e-5 + softplus(rho_c))`` and a
          diagonal prior ``Sigma = diag(prior_scale^2)``.
        - ``covariance="full"``: a full-covariance posterior per level (lower-triangular ``S_c`` with a softplus
          diagonal) and a full prior covariance ``Sigma = P P^T``, whose Cholesky factor ``P`` starts at
          ``diag(prior_scale)``. Intercept-slope correlations are learned, and for a linear mixed model the optimal
          posterior is exact, so the learned ``Sigma`` is the maximum-likelihood (empirical Bayes) estimate.

    ``learn_prior_scale=True`` learns ``Sigma`` (empirical Bayes); otherwise it stays fixed.

    ``forward(cluster)`` accepts
        - an ``int64`` tensor ``(B,)`` of cluster indices; ``-1`` marks an unseen cluster and gives a zero effect
          (fixed effects only). The cost is ``O(B * units)`` (``O(B * units^2)`` with full covariance) whatever the
          number of clusters.
        - a float tensor ``(B, n_clusters)`` of soft memberships (rows sum to 1, e.g. from a Z-predictor): the
          membership-weighted mean of the clusters' effects. An all-zero row gives a zero effect. Other rows
          (negative, NaN, or not summing to 1) raise a ``ValueError`` on checked batches.

    In training mode the output is a posterior draw (reparameterised, so gradients reach the posterior); in
    evaluation mode it is the posterior mean. With index input, ``sample_per_row=True`` (default) draws independent
    noise per row, ``False`` draws one value per cluster shared by the batch as in the authors' code (``O(C * units)``).

    Scale: :meth:`kl_divergence` sums the KL over every level. Given ``level_counts`` (training rows per level) it can
    instead estimate that sum from the levels of a batch alone, ``N / B * sum_i KL_{c(i)} / n_{c(i)}`` (unbiased over
    random batches), and ``sparse=True`` makes the look-ups produce sparse gradients; with
    :class:`~monai_armed.optimizers.LazyAdam` a step then touches only the levels in its batch, so a million levels
    cost memory, not time.

    The posterior scales are initialised in ``[post_scale_init_min, post_scale_init_min + post_scale_init_range]`` as
    the paper intends (uniformly in their inverse softplus, so a little more of them lie in the lower half).
    ``reference_scale_init=True`` reproduces the authors' code, which sums two inverse-softplus values and so starts
    the scales in about ``[0.003, 0.05]`` for the defaults.

    Args:
        n_clusters: number of seen clusters (levels) ``C``.
        units: number of random effects per cluster ``K``.
        prior_scale: standard deviation of the zero-mean Gaussian prior (initial value when learned); a float, or
            one value per unit.
        post_loc_init_scale: the posterior means start as ``N(0, post_loc_init_scale^2)``; a float, or one per unit.
        post_scale_init_min: lower end of the initial posterior scale.
        post_scale_init_range: width of the initial posterior scale interval.
        learn_prior_scale: learn the prior (co)variance (empirical Bayes) instead of keeping it fixed.
        kl_estimator: ``"analytic"`` (closed form, default) or ``"mc"`` (one-sample Monte-Carlo estimate with a
            fresh draw, the authors' estimator; diagonal covariance only).
        sample_per_row: see above.
        reference_scale_init: reproduce the authors' posterior-scale initialisation bug.
        covariance: ``"diagonal"`` or ``"full"`` (see above).
        level_counts: training rows per level ``(n_clusters,)``, for the batch estimate of the KL.
        sparse: index look-ups give sparse gradients (use an optimizer that accepts them, e.g. ``LazyAdam``), which
            list the batch's seen levels only (a batch of unseen rows alone gathers nothing on the CPU or when checked;
            on another device, unchecked, it lists level 0 with zero gradients rather than read the batch back).
        unit_names: names of the units for :meth:`variance_components` (default ``u0, u1, ...``).

    Example::

        re = RandomEffects(n_clusters=10, units=4, prior_scale=0.3)
        u = re(torch.tensor([0, 3, -1]))          # (3, 4); the last row is zero (unseen cluster)
        kl = re.kl_divergence()                  # scalar, summed over clusters and units
        spread = re.spread()                     # (4,) s.d. of the posterior means across clusters

        lmm = RandomEffects(18, 2, covariance="full", learn_prior_scale=True, unit_names=["(Intercept)", "Days"])
        lmm.variance_components("Subject")       # lme4 VarCorr rows: variances, then the covariance
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
        covariance: str = "diagonal",
        level_counts: Sequence[int] | torch.Tensor | None = None,
        sparse: bool = False,
        unit_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if n_clusters < 1 or units < 1:
            raise ValueError(f"n_clusters and units must be >= 1, got n_clusters={n_clusters}, units={units}.")
        prior = _per_unit(prior_scale, units, "prior_scale")
        loc_init = _per_unit(post_loc_init_scale, units, "post_loc_init_scale")
        if not bool((prior > 0).all()) or post_scale_init_min <= _MIN_SCALE or post_scale_init_range < 0:
            raise ValueError(
                f"prior_scale must be > 0 (not NaN), post_scale_init_min > {_MIN_SCALE} (the posterior's smallest scale) and "
                "post_scale_init_range >= 0."
            )
        if kl_estimator not in ("analytic", "mc"):
            raise ValueError(f"kl_estimator must be 'analytic' or 'mc', got {kl_estimator!r}.")
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}.")
        if covariance == "full" and kl_estimator != "analytic":
            raise ValueError("covariance='full' needs kl_estimator='analytic'.")
        if unit_names is not None and len(unit_names) != units:
            raise ValueError(f"unit_names must name each of the {units} units, got {len(unit_names)}.")
        self.n_clusters, self.units, self.covariance = n_clusters, units, covariance
        self.kl_estimator, self.sample_per_row, self.sparse = kl_estimator, sample_per_row, sparse
        self.unit_names = list(unit_names) if unit_names is not None else [f"u{k}" for k in range(units)]
        self.loc = nn.Parameter(torch.randn(n_clusters, units) * loc_init)
        if reference_scale_init:
            low = inverse_softplus(post_scale_init_min)
            high = low + inverse_softplus(post_scale_init_range)
        else:
            low = inverse_softplus(post_scale_init_min - _MIN_SCALE)
            high = inverse_softplus(post_scale_init_min + post_scale_init_range - _MIN_SCALE)
        self.rho = nn.Parameter(low + (high - low) * torch.rand(n_clusters, units))
        log_prior = prior.expand(units).clone().log() if covariance == "full" else prior.log()
        self._register(learn_prior_scale, "log_prior_scale", log_prior)
        rows, cols = torch.tril_indices(units, units, offset=-1)
        # clones: a view of the empty index pair (one unit) has a storage offset that serialization rejects
        self.register_buffer("_tril_rows", rows.clone(), persistent=False)
        self.register_buffer("_tril_cols", cols.clone(), persistent=False)
        if covariance == "full":
            n_off = units * (units - 1) // 2
            self.tril = nn.Parameter(torch.zeros(n_clusters, n_off))  # posterior Cholesky off-diagonals
            self._register(learn_prior_scale, "prior_tril", torch.zeros(n_off))
        else:  # empty stand-ins (not saved) keep one code path that TorchScript can compile
            self.register_buffer("tril", torch.zeros(n_clusters, 0), persistent=False)
            self.register_buffer("prior_tril", torch.zeros(0), persistent=False)
        counts = None if level_counts is None else torch.as_tensor(level_counts, dtype=torch.float32).reshape(-1)
        if counts is not None and (counts.shape != (n_clusters,) or bool((counts <= 0).any())):
            raise ValueError(
                f"level_counts must give the positive number of training rows of each of the {n_clusters} levels, "
                f"got {counts.numel()} values with minimum {float(counts.min()) if counts.numel() else None}."
            )
        self.register_buffer("level_counts", counts)
        # N of the batch estimate, kept so that a step does not sum over every level
        self.register_buffer("_level_total", counts.sum() if counts is not None else None, persistent=False)
        self.register_load_state_dict_post_hook(_refresh_level_total)

    def _register(self, learned: bool, name: str, value: torch.Tensor) -> None:
        if learned:
            setattr(self, name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    @property
    def scale(self) -> torch.Tensor:
        """Posterior marginal standard deviations ``(n_clusters, units)``."""
        diag = F.softplus(self.rho) + 1e-5
        if self.covariance == "diagonal":
            return diag
        return self.posterior_cholesky().pow(2).sum(-1).sqrt()

    @property
    def prior_scale(self) -> torch.Tensor:
        """Prior marginal standard deviations (a scalar or ``(units,)``)."""
        if self.covariance == "diagonal":
            return self.log_prior_scale.exp()
        return self.prior_covariance().diagonal().sqrt()

    def prior_cholesky(self) -> torch.Tensor:
        """Lower-triangular Cholesky factor ``P`` of the prior covariance ``Sigma = P P^T``, ``(units, units)``."""
        diag = self.log_prior_scale.exp().expand(self.units)
        if self.covariance == "diagonal":
            return torch.diag(diag)
        return torch.diag(diag).index_put((self._tril_rows, self._tril_cols), self.prior_tril)

    def prior_covariance(self) -> torch.Tensor:
        """The prior covariance ``Sigma`` of one level's effects, ``(units, units)``."""
        chol = self.prior_cholesky()
        return chol @ chol.T

    def posterior_cholesky(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Cholesky factors ``S_c`` of the posterior covariances, ``(n_clusters, units, units)`` (or of ``index``)."""
        rho = self.rho if index is None else self._gather(self.rho, index)
        chol = torch.diag_embed(F.softplus(rho) + 1e-5)
        if self.covariance == "full":
            tril = self.tril if index is None else self._gather(self.tril, index)
            chol[:, self._tril_rows, self._tril_cols] = tril
        return chol

    def forward(self, cluster: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            _check_cluster_type(cluster)
        if cluster.is_floating_point():
            return self._soft(cluster)
        return self._lookup(cluster)

    def _gather(self, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return F.embedding(index, table, sparse=True) if self.sparse else table[index]

    def _safe_index(self, index: torch.Tensor) -> tuple[torch.Tensor, bool]:
        if index.dim() != 1:
            raise ValueError(f"cluster indices must have shape (batch,), got {shape_str(index)}.")
        if not torch.jit.is_scripting():
            if not batch_checks_enabled():
                # reading a CPU tensor costs no device sync and spares the unseen mask (not when compiled: a graph break)
                if index.device.type == "cpu" and not torch.compiler.is_compiling():
                    low = int(index.min()) if index.numel() > 0 else 0
                    if low < -1:  # read anyway: a negative index other than -1 (unseen) is a mapping error
                        check_cluster_index(index, self.n_clusters)
                    return (self._unseen_to_seen(index) if low < 0 else index), low < 0
                # no read-back: treat every batch as possibly holding unseen (-1) rows
                return self._unseen_to_seen(index), True
        unseen = check_cluster_index(index, self.n_clusters) < 0
        return (self._unseen_to_seen(index) if unseen else index), unseen

    def _unseen_to_seen(self, index: torch.Tensor) -> torch.Tensor:
        """The level an unseen (-1) row is gathered from before its effect is zeroed. For a sparse table a level of
        the batch itself (its largest), without reading the batch back: level 0 would enter the sparse gradient
        (with zeros) and LazyAdam steps every level a sparse gradient lists. Only a batch of unseen rows alone lists
        level 0 then."""
        if self.sparse and index.numel() > 0:
            return torch.where(index >= 0, index, index.amax().clamp(min=0))
        return index.clamp(min=0)

    @torch.jit.unused
    def _nothing_seen(self, index: torch.Tensor) -> bool:
        """Whether a sparse table's batch holds unseen rows only, asked where the answer costs no device sync (a CPU
        batch) or the batch is read anyway (a checked one): such a batch then gathers nothing at all."""
        if not self.sparse or not (index.device.type == "cpu" or batch_checks_enabled()):
            return False
        return index.numel() > 0 and bool((index < 0).all())

    def _lookup(self, index: torch.Tensor) -> torch.Tensor:
        if index.dim() == 1 and index.numel() == 0:
            return self.loc.new_zeros(0, self.units)
        if not torch.jit.is_scripting():
            if self._nothing_seen(index):
                return self.loc.new_zeros(index.shape[0], self.units)
        safe, unseen = self._safe_index(index)
        effects = self._effects(safe) if torch.jit.is_scripting() else self._checked_effects(index, safe)
        if unseen:
            effects = effects * (index >= 0).unsqueeze(1).to(effects.dtype)
        return effects

    def _effects(self, safe: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self._gather(self.loc, safe)
        if self.sample_per_row:  # gather first: the cost is O(batch * units) whatever the number of clusters
            loc = self._gather(self.loc, safe)
            return loc + self._noise(safe, loc)
        return self._draw()[safe]

    @torch.jit.unused
    def _checked_effects(self, index: torch.Tensor, safe: torch.Tensor) -> torch.Tensor:
        try:
            return self._effects(safe)
        except IndexError:  # a batch whose values were not checked (see validate_batches): say what torch does not
            check_cluster_index(index, self.n_clusters)
            raise

    def _noise(self, index: torch.Tensor, loc: torch.Tensor) -> torch.Tensor:
        eps = torch.randn_like(loc)
        if self.covariance == "diagonal":
            return (F.softplus(self._gather(self.rho, index)) + 1e-5) * eps
        return (self.posterior_cholesky(index) @ eps.unsqueeze(-1)).squeeze(-1)

    def _soft(self, membership: torch.Tensor) -> torch.Tensor:
        if membership.dim() != 2 or membership.shape[1] != self.n_clusters:
            raise ValueError(
                f"soft cluster membership must have shape (batch, {self.n_clusters}), got {shape_str(membership)}."
            )
        if not torch.jit.is_scripting():  # a condition of its own: TorchScript then skips the block
            if batch_checks_enabled():
                _check_membership(membership)
        effects = self._draw() if self.training else self.loc
        return membership.to(effects.dtype) @ effects

    def _draw(self) -> torch.Tensor:
        if self.covariance == "diagonal":
            return self.loc + self.scale * torch.randn_like(self.loc)
        return self.loc + (self.posterior_cholesky() @ torch.randn_like(self.loc).unsqueeze(-1)).squeeze(-1)

    def linear_predictor(self, cluster: torch.Tensor, design: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``design_i^T u_c(i)`` under the posterior, each ``(B,)``.

        For a linear predictor ``eta_i = ... + z_i^T u_c(i)`` this is what an expected log-likelihood needs: the
        Gaussian family's is exact with them (no sampling), so the objective is deterministic. Unseen rows (``-1``)
        give zero mean and variance.

        Example::

            mean, var = re.linear_predictor(cluster, z)     # z: (B, units) random-effects design (e.g. [1, Days])
        """
        if design.dim() != 2 or design.shape != (cluster.shape[0], self.units):
            raise ValueError(f"design must have shape ({cluster.shape[0]}, {self.units}), got {shape_str(design)}.")
        if not torch.jit.is_scripting():
            if self._nothing_seen(cluster):
                zeros = design.new_zeros(cluster.shape[0])
                return zeros, zeros.clone()
        safe, unseen = self._safe_index(cluster)
        mean = (self._gather(self.loc, safe) * design).sum(1)
        if self.covariance == "diagonal":
            var = ((F.softplus(self._gather(self.rho, safe)) + 1e-5) * design).pow(2).sum(1)
        else:  # ||S_c^T z||^2
            var = (self.posterior_cholesky(safe).transpose(1, 2) @ design.unsqueeze(-1)).pow(2).sum((1, 2))
        if unseen:
            seen = (cluster >= 0).to(mean.dtype)
            mean, var = mean * seen, var * seen
        return mean, var

    def kl_divergence(self, cluster: torch.Tensor | None = None) -> torch.Tensor:
        """KL(q || p) summed over clusters and units, or its estimate from the levels of a batch.

        Without ``cluster``: the exact sum over every level (analytic, or a one-sample Monte-Carlo estimate). With an
        index batch ``cluster`` ``(B,)`` and ``level_counts``: ``N / B_seen * sum_i KL_{c(i)} / n_{c(i)}`` over the
        batch's ``B_seen`` rows of seen levels, with ``N`` the total count: an unbiased estimate of the same sum (given
        one seen row; 0 for a batch of unseen ``-1`` rows alone) whose cost depends on the batch only. Before version
        0.5 the mean ran over all ``B`` rows, which scaled the estimate by the seen share of the training rows.

        Example::

            re.kl_divergence()              # every level
            re.kl_divergence(cluster)       # the batch's levels only (needs level_counts)
        """
        if cluster is None:
            if self.kl_estimator == "mc":
                return self._mc_kl()
            return self._analytic_kl(self.loc, None).sum()
        if self.level_counts is None:
            raise ValueError("kl_divergence(cluster) needs level_counts (training rows per level) to scale the batch.")
        if cluster.numel() == 0:
            return self.loc.new_zeros(())
        if not torch.jit.is_scripting():
            if self._nothing_seen(cluster):
                return self.loc.new_zeros(())
        safe, unseen = self._safe_index(cluster)
        rows: torch.Tensor | int = cluster.shape[0]
        per_row = self._analytic_kl(self._gather(self.loc, safe), safe) / self.level_counts[safe]
        if unseen:
            # N counts the rows of seen levels, so the mean runs over the batch's seen rows (a tensor: no host read)
            seen = (cluster >= 0).to(per_row.dtype)
            per_row, rows = per_row * seen, seen.sum().clamp(min=1.0)
        total = self._level_total if self._level_total is not None else self.level_counts.sum()
        return per_row.sum() * (total / rows)

    def _analytic_kl(self, loc: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
        """Per-level KL ``(L,)`` for the posterior rows ``loc`` (all levels when ``index`` is None)."""
        if self.covariance == "diagonal":
            rho = self.rho if index is None else self._gather(self.rho, index)
            scale, log_prior = F.softplus(rho) + 1e-5, self.log_prior_scale
            # log(p / s) + (s^2 + m^2) / (2 p^2) - 1/2 with p = exp(log_prior): no exp-then-log of the prior
            kl = (log_prior - scale.log()) + (scale.square() + loc.square()) * (0.5 * torch.exp(-2.0 * log_prior)) - 0.5
            return kl.sum(-1)
        prior_chol = self.prior_cholesky()
        post_chol = self.posterior_cholesky(index)
        # 0.5 * [tr(Sigma^-1 S S^T) + mu^T Sigma^-1 mu - K + log|Sigma| - log|S S^T|], through P^-1 S and P^-1 mu
        whitened = torch.linalg.solve_triangular(prior_chol, post_chol, upper=False)
        whitened_loc = torch.linalg.solve_triangular(prior_chol, loc.unsqueeze(-1), upper=False).squeeze(-1)
        log_det_prior = 2 * prior_chol.diagonal().log().sum()
        log_det_post = 2 * post_chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        trace = whitened.pow(2).sum((-2, -1))
        return 0.5 * (trace + whitened_loc.pow(2).sum(-1) - self.units + log_det_prior - log_det_post)

    def _mc_kl(self) -> torch.Tensor:
        draw = self._draw()
        scale, prior = self.scale, self.prior_scale.expand(self.units)
        log_q = torch.distributions.Normal(self.loc, scale).log_prob(draw)
        log_p = torch.distributions.Normal(torch.zeros_like(draw), prior).log_prob(draw)
        return (log_q - log_p).sum()

    def variance_components(self, group: str = "cluster") -> list[dict]:
        """The prior covariance as lme4's ``as.data.frame(VarCorr(fit))`` rows for this grouping factor.

        Variances first (``var2`` is ``None``, ``sdcor`` the standard deviation), then each covariance (``sdcor`` the
        correlation), in the order lme4 prints them.

        Example::

            re.variance_components("Subject")
            # [{"grp": "Subject", "var1": "(Intercept)", "var2": None, "vcov": 612.1, "sdcor": 24.74}, ...]
        """
        with torch.no_grad():
            cov = self.prior_covariance().double().cpu()
        sd = cov.diagonal().sqrt()
        names = self.unit_names
        rows = [
            {"grp": group, "var1": names[k], "var2": None, "vcov": float(cov[k, k]), "sdcor": float(sd[k])}
            for k in range(self.units)
        ]
        for j in range(self.units if self.covariance == "full" else 0):  # a diagonal prior has no covariances
            for k in range(j + 1, self.units):
                corr = float(cov[j, k] / (sd[j] * sd[k])) if float(sd[j] * sd[k]) > 0 else 0.0
                rows.append({"grp": group, "var1": names[j], "var2": names[k], "vcov": float(cov[j, k]), "sdcor": corr})
        return rows

    def spread(self) -> torch.Tensor:
        """Across-cluster standard deviation of the posterior means, per unit ``(units,)``."""
        if self.n_clusters < 2:
            return torch.zeros(self.units, device=self.loc.device)
        return self.loc.detach().std(dim=0)

    def extra_repr(self) -> str:
        return (
            f"n_clusters={self.n_clusters}, units={self.units}, covariance={self.covariance!r}, "
            f"kl_estimator={self.kl_estimator!r}"
        )
