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
"""Likelihood families of generalized linear mixed models (lme4-style) as losses on the linear predictor.

Every family returns the full negative log-likelihood of each row, constants included, so that its sum over the rows
is exactly ``-log p(y | eta)`` and can be compared with R's ``logLik``. Given the variance of ``eta`` under a Gaussian
variational posterior of the random effects, it returns the expected negative log-likelihood (the data term of an
ELBO) instead, computed deterministically so that the objective can be minimised with L-BFGS.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_armed.utils import batch_checks_enabled

__all__ = [
    "FAMILIES",
    "BernoulliLikelihood",
    "BinomialLikelihood",
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "LikelihoodFamily",
    "PoissonLikelihood",
    "likelihood",
    "validate_weights",
]

_REDUCTIONS = ("mean", "sum", "none")


def _column(values: Any, name: str) -> np.ndarray:
    """A whole column (array, tensor or list) as a flat float64 array; ``(N,)`` and ``(N, 1)`` are accepted."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"column '{name}' must be numeric: {error}") from error
    if array.ndim > 2 or (array.ndim == 2 and array.shape[1] != 1):
        raise ValueError(f"column '{name}' must be one column, (N,) or (N, 1), got shape {array.shape}.")
    array = array.reshape(-1)
    if array.size == 0:
        raise ValueError(f"column '{name}' is empty.")
    return array


def _show(value: float) -> str:
    """A value as written in a message: whole numbers without a decimal point, others exactly (``repr``)."""
    if math.isfinite(value) and value == round(value):
        return str(int(value))
    return repr(float(value))


def _first(bad: np.ndarray) -> int | None:
    """Index of the first ``True`` in a boolean mask, ``None`` when there is none."""
    rows = np.flatnonzero(bad)
    return int(rows[0]) if rows.size else None


def _reject_first(bad: np.ndarray, values: np.ndarray, name: str, expected: str) -> None:
    """Raise a ``ValueError`` naming the column, the first row where ``bad`` holds, its value and what was expected."""
    row = _first(bad)
    if row is not None:
        raise ValueError(f"column '{name}' row {row} has {_show(values[row])}; {expected}.")


def validate_weights(values: Any, name: str = "weights") -> None:
    """Check a whole column of row weights: finite, non-negative and not all zero.

    Args:
        values: the weights of every row (numpy array, tensor or list), ``(N,)`` or ``(N, 1)``.
        name: the column's name, used in the error messages.

    Raises:
        ValueError: naming the column, the first offending row and its value.

    Example::

        validate_weights(table["w"], name="w")     # before training, once
    """
    weights = _column(values, name)
    expected = "row weights must be finite numbers >= 0"
    _reject_first(~np.isfinite(weights), weights, name, expected)
    _reject_first(weights < 0, weights, name, expected)
    if not bool((weights > 0).any()):
        raise ValueError(f"column '{name}' has only zero weights; at least one row needs a weight > 0.")


def _per_row(x: torch.Tensor, what: str) -> torch.Tensor:
    """``(B,)`` or ``(B, 1)`` as ``(B,)``; any other shape raises a ``ValueError`` that names ``what``."""
    if x.dim() == 1 or (x.dim() == 2 and x.shape[1] == 1):
        return x.reshape(-1)
    raise ValueError(f"{what} must be (batch,) or (batch, 1), got shape {tuple(x.shape)}.")


def _same_rows(rows: int, pred: torch.Tensor, other: torch.Tensor, what: str) -> None:
    if other.shape[0] != rows:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but {what} has shape {tuple(other.shape)}: one row each.")


class LikelihoodFamily(nn.Module):
    """Base class of the likelihood families: the negative log-likelihood of a response given its linear predictor.

    ``forward`` returns the mean (or sum, or per-row vector) of ``weight_i * nll_i``, where ``nll_i`` is the full
    negative log-likelihood of row ``i`` (constants included). The mean divides by the batch size, not by the weights'
    sum, as the ELBO ``(1/B) sum_i w_i nll_i`` needs. With ``pred_var`` (the variance of ``eta`` under a Gaussian
    posterior, ``eta ~ N(pred, pred_var)``) it returns the expected negative log-likelihood ``E_q[nll_i]`` instead.

    ``forward`` checks only shapes; check a whole data set once with :meth:`validate_target` and
    :func:`validate_weights`. Subclasses implement ``_nll``, ``_expected_nll``, ``_unit_deviance`` and ``mean``.

    Args:
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (the per-row vector ``(B,)``).

    Example::

        family = likelihood("poisson")
        family.validate_target(table["count"], name="count")          # once, before training
        loss = family(eta, count, weight=w, pred_var=eta_var)          # E_q[-log p(y | eta)], mean over the batch
    """

    name: str = "family"
    link: str = "identity"

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}.")
        self.reduction = reduction

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        weight: torch.Tensor | None = None,
        trials: torch.Tensor | float | None = None,
        pred_var: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Weighted negative log-likelihood (or its expectation under ``eta ~ N(pred, pred_var)``), reduced.

        Args:
            pred: the linear predictor ``eta`` on the link scale, ``(B,)`` or ``(B, 1)`` (categorical: ``(B, C)``).
            target: the response, ``(B,)`` or ``(B, 1)``.
            weight: optional non-negative row weights, ``(B,)`` or ``(B, 1)``.
            trials: the number of trials of each row, ``(B,)``, ``(B, 1)`` or one number (binomial only; the other
                families ignore it).
            pred_var: optional variance of ``eta`` (>= 0), ``(B,)`` or ``(B, 1)``.

        Returns:
            a scalar for ``"mean"`` and ``"sum"``, the per-row ``(B,)`` vector for ``"none"``.

        Example::

            per_row = GaussianLikelihood(reduction="none")(torch.zeros(3), torch.tensor([0.5, -1.0, 2.0]))   # (3,)
        """
        eta = self._eta(pred)
        rows = eta.shape[0]
        if rows == 0:
            raise ValueError("cannot compute a likelihood on an empty batch.")
        y = _per_row(target, "target")
        _same_rows(rows, pred, target, "target")
        n = self._trials(trials, pred, eta)
        if pred_var is None:
            nll = self._nll(eta, y, n)
        else:
            var = _per_row(pred_var, "pred_var")
            _same_rows(rows, pred, pred_var, "pred_var")
            if batch_checks_enabled() and bool((var < 0).any()):
                raise ValueError(f"pred_var is a variance and must be >= 0, got minimum {float(var.min())}.")
            nll = self._expected_nll(eta, var.to(eta), y, n)
        if weight is not None:
            w = _per_row(weight, "weight")
            _same_rows(rows, pred, weight, "weight")
            nll = nll * w
        if self.reduction == "mean":
            return nll.mean()
        if self.reduction == "sum":
            return nll.sum()
        return nll

    def mean(self, pred: torch.Tensor) -> torch.Tensor:
        """The expected response (the inverse link of ``pred``), of ``pred``'s shape.

        Example::

            likelihood("bernoulli").mean(torch.zeros(2))     # tensor([0.5, 0.5])
        """
        raise NotImplementedError

    def unit_deviance(
        self, pred: torch.Tensor, target: torch.Tensor, trials: torch.Tensor | float | None = None
    ) -> torch.Tensor:
        """The GLM unit deviance of each row, ``(B,)``: twice the log-likelihood ratio of the saturated model.

        Rows whose response sits on the boundary (``y = 0``, ``y = n``) give finite values (``0 log 0 = 0``).

        Example::

            likelihood("poisson").unit_deviance(torch.log(torch.tensor([2.0])), torch.tensor([0.0]))  # tensor([4.])
        """
        eta = self._eta(pred)
        y = _per_row(target, "target")
        _same_rows(eta.shape[0], pred, target, "target")
        return self._unit_deviance(eta, y, self._trials(trials, pred, eta))

    def validate_target(self, values: Any, trials: Any = None, name: str = "y", trials_name: str = "trials") -> None:
        """Check a whole response column (once, before training) against what the family expects.

        Args:
            values: the response of every row (numpy array, tensor or list), ``(N,)`` or ``(N, 1)``.
            trials: the trials column (binomial only), one value per row or one number.
            name: the response column's name, used in the messages.
            trials_name: the trials column's name, used in the messages.

        Raises:
            ValueError: naming the column, the first offending row (0-based), its value and what was expected.

        Example::

            BernoulliLikelihood().validate_target([0, 1, 2.37], name="y")
            # ValueError: column 'y' row 2 has 2.37; the bernoulli family expects 0 or 1 ...
        """
        y = _column(values, name)
        _reject_first(~np.isfinite(y), y, name, f"the {self.name} family expects {self._expects()}")
        self._check_values(y, trials, name, trials_name)

    def residual_variance(self) -> float | None:
        """The residual variance of the response given ``eta`` (Gaussian ``sigma^2``); ``None`` for the others.

        Example::

            GaussianLikelihood(scale_init=2.0).residual_variance()      # 4.0
        """
        return None

    # the parts a family defines; eta, y and trials arrive flat, (B,) (categorical eta: (B, C))

    def _eta(self, pred: torch.Tensor) -> torch.Tensor:
        return _per_row(pred, "pred")

    def _trials(self, trials: torch.Tensor | float | None, pred: torch.Tensor, eta: torch.Tensor) -> torch.Tensor | None:
        return None

    def _nll(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _expected_nll(
        self, eta: torch.Tensor, var: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} family has no expected negative log-likelihood (pred_var).")

    def _unit_deviance(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _expects(self) -> str:
        return "finite numbers"

    def _check_values(self, y: np.ndarray, trials: Any, name: str, trials_name: str) -> None:
        pass

    def _check_counts(self, y: np.ndarray, name: str) -> None:
        """Whole numbers >= 0 (Poisson, binomial, categorical)."""
        expected = f"the {self.name} family expects {self._expects()}"
        _reject_first(y != np.round(y), y, name, expected)
        _reject_first(y < 0, y, name, expected)


class GaussianLikelihood(LikelihoodFamily):
    """Normal response with identity link and residual standard deviation ``sigma = exp(log_scale)``.

    ``nll_i = 0.5 log(2 pi sigma^2) + (y_i - eta_i)^2 / (2 sigma^2)``; with ``pred_var`` the squared error becomes
    ``(y_i - pred_i)^2 + pred_var_i``. ``log_scale`` is a parameter (learned with the network) unless
    ``learn_scale=False``, when it is a buffer. Start it from the data with :meth:`init_from_data`, which sets
    ``sigma`` to the response's standard deviation (the residual s.d. of an intercept-only model, an upper bound of a
    useful model's).

    Args:
        scale_init: the initial ``sigma`` (> 0).
        learn_scale: whether ``log_scale`` is an ``nn.Parameter``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example::

        family = GaussianLikelihood().init_from_data(train_y)
        loss = family(eta, y)                     # mean over the batch of -log N(y | eta, sigma^2)
        family.residual_variance()                # sigma^2, for the variance-components table
    """

    name = "gaussian"
    link = "identity"

    def __init__(self, scale_init: float = 1.0, learn_scale: bool = True, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if not (math.isfinite(scale_init) and scale_init > 0):
            raise ValueError(f"scale_init must be a finite number > 0, got {scale_init!r}.")
        log_scale = torch.tensor(math.log(scale_init))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    @property
    def scale(self) -> torch.Tensor:
        """The residual standard deviation ``sigma`` (a differentiable 0-d tensor)."""
        return self.log_scale.exp()

    @property
    def variance(self) -> torch.Tensor:
        """The residual variance ``sigma^2`` (a differentiable 0-d tensor)."""
        return (2 * self.log_scale).exp()

    def init_from_data(self, target: Any) -> GaussianLikelihood:
        """Set ``sigma`` to the standard deviation of the whole response column; returns the family itself.

        Example::

            family = GaussianLikelihood().init_from_data(table["y"])
        """
        y = _column(target, "target")
        _reject_first(~np.isfinite(y), y, "target", "the gaussian family expects finite numbers")
        std = float(y.std())
        if not std > 0:
            raise ValueError("cannot set the residual scale from a constant response (standard deviation 0).")
        with torch.no_grad():
            self.log_scale.fill_(math.log(std))
        return self

    def residual_variance(self) -> float:
        return float(self.variance.detach())

    def mean(self, pred: torch.Tensor) -> torch.Tensor:
        return pred

    def _nll(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        return self._from_squared_error((y - eta) ** 2)

    def _expected_nll(
        self, eta: torch.Tensor, var: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None
    ) -> torch.Tensor:
        return self._from_squared_error((y - eta) ** 2 + var)

    def _from_squared_error(self, squared_error: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.log(2 * math.pi) + self.log_scale + 0.5 * squared_error * (-2 * self.log_scale).exp()

    def _unit_deviance(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        return (y - eta) ** 2


class _LogitFamily(LikelihoodFamily):
    """Logit-link families: ``E[softplus(eta)]`` under ``eta ~ N(m, v)`` by Gauss-Hermite quadrature.

    With the nodes ``z_k`` and weights ``w_k`` rescaled to the standard normal, ``E[f(m + s Z)] ~ sum_k w_k f(m + s
    z_k)``. The nodes are symmetric, so the sum runs over the pairs ``f(m + s z_k) + f(m - s z_k)``: its derivative in
    ``s`` then vanishes exactly at ``s = 0`` instead of being rounding noise divided by ``s``.
    """

    link = "logit"

    def __init__(self, quadrature_nodes: int = 16, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if quadrature_nodes < 1:
            raise ValueError(f"quadrature_nodes must be >= 1, got {quadrature_nodes}.")
        self.quadrature_nodes = quadrature_nodes
        x, w = np.polynomial.hermite.hermgauss(quadrature_nodes)
        z, w = math.sqrt(2.0) * x, w / math.sqrt(math.pi)
        positive = z > 0
        center = float(w[quadrature_nodes // 2]) if quadrature_nodes % 2 else 0.0
        dtype = torch.get_default_dtype()
        # constants, not state: left out of the state_dict so that checkpoints do not depend on the node count
        self.register_buffer("gh_nodes", torch.as_tensor(z[positive], dtype=dtype), persistent=False)
        self.register_buffer("gh_weights", torch.as_tensor(w[positive], dtype=dtype), persistent=False)
        self.register_buffer("gh_center", torch.tensor(center, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"quadrature_nodes={self.quadrature_nodes}, reduction={self.reduction!r}"

    def mean(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(pred)

    def _expected_softplus(self, eta: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        # clamp: sqrt has an infinite derivative at 0 (a zero variance gets a zero gradient instead)
        spread = var.clamp_min(1e-30).sqrt().unsqueeze(1) * self.gh_nodes.to(eta)
        center = eta.unsqueeze(1)
        pairs = F.softplus(center + spread) + F.softplus(center - spread)
        return self.gh_center.to(eta) * F.softplus(eta) + pairs @ self.gh_weights.to(eta)


class BernoulliLikelihood(_LogitFamily):
    """Binary response ``y`` in ``{0, 1}`` with logit link: ``nll_i = -[y log p + (1 - y) log(1 - p)]``, ``p =
    sigmoid(eta)``.

    With ``pred_var``, ``E[nll] = E[softplus(eta)] - y pred`` with the expectation by Gauss-Hermite quadrature
    (deterministic; 16 nodes are accurate to about 1e-5 for a posterior s.d. of ``eta`` up to 2).

    Args:
        quadrature_nodes: the number of Gauss-Hermite nodes.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example::

        family = BernoulliLikelihood()
        loss = family(logits, label, pred_var=logit_var)       # logits (B,) or (B, 1)
    """

    name = "bernoulli"

    def _nll(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(eta, y.to(eta), reduction="none")

    def _expected_nll(
        self, eta: torch.Tensor, var: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None
    ) -> torch.Tensor:
        return self._expected_softplus(eta, var) - y.to(eta) * eta

    def _unit_deviance(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        # y is 0 or 1, so the saturated model's likelihood is 1 and the deviance is -2 log p_y
        return 2 * self._nll(eta, y, trials)

    def _expects(self) -> str:
        return "0 or 1 (a binary outcome; use the gaussian family for a continuous one)"

    def _check_values(self, y: np.ndarray, trials: Any, name: str, trials_name: str) -> None:
        _reject_first((y != 0) & (y != 1), y, name, f"the {self.name} family expects {self._expects()}")


class BinomialLikelihood(_LogitFamily):
    """``y`` successes out of ``n`` trials with logit link, constants included:
    ``nll_i = -[log C(n, y) + y log p + (n - y) log(1 - p)]``.

    ``trials`` is required by ``forward`` and ``unit_deviance`` (one value per row, or one number for all). With
    ``pred_var``, ``E[nll] = n E[softplus(eta)] - y pred - log C(n, y)`` by Gauss-Hermite quadrature.

    Args:
        quadrature_nodes: the number of Gauss-Hermite nodes.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example::

        family = BinomialLikelihood()
        family.validate_target(table["hits"], trials=table["shots"], name="hits", trials_name="shots")
        loss = family(eta, hits, trials=shots)
    """

    name = "binomial"

    def _trials(self, trials: torch.Tensor | float | None, pred: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        if trials is None:
            raise ValueError("the binomial family needs the number of trials of each row (trials=...).")
        n = torch.as_tensor(trials, dtype=eta.dtype, device=eta.device)
        if n.dim() == 0:
            return n.expand(eta.shape[0])
        _same_rows(eta.shape[0], pred, n, "trials")
        return _per_row(n, "trials")

    @staticmethod
    def _log_choose(n: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.lgamma(n + 1) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)

    def _nll(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        y = y.to(eta)
        # log p = -softplus(-eta), log(1 - p) = -softplus(eta): stable for large |eta|
        return y * F.softplus(-eta) + (trials - y) * F.softplus(eta) - self._log_choose(trials, y)

    def _expected_nll(
        self, eta: torch.Tensor, var: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None
    ) -> torch.Tensor:
        y = y.to(eta)
        return trials * self._expected_softplus(eta, var) - y * eta - self._log_choose(trials, y)

    def _unit_deviance(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        y = y.to(eta)
        failures = trials - y
        # 2 [y log(y / (n p)) + (n - y) log((n - y) / (n (1 - p)))], with xlogy's 0 log 0 = 0
        saturated = torch.special.xlogy(y, y / trials) + torch.special.xlogy(failures, failures / trials)
        return 2 * (saturated + y * F.softplus(-eta) + failures * F.softplus(eta))

    def _expects(self) -> str:
        return "whole-number counts of successes 0 <= y <= trials"

    def _check_values(self, y: np.ndarray, trials: Any, name: str, trials_name: str) -> None:
        if trials is None:
            raise ValueError(f"the binomial family needs the number of trials to check column '{name}' (trials=...).")
        n = _column(trials, trials_name)
        if n.size == 1:
            n = np.full_like(y, n[0])
        elif n.size != y.size:
            raise ValueError(f"column '{trials_name}' has {n.size} rows but column '{name}' has {y.size}.")
        expected = "the binomial family expects whole-number trials >= 1"
        _reject_first(~np.isfinite(n), n, trials_name, expected)
        _reject_first((n != np.round(n)) | (n < 1), n, trials_name, expected)
        self._check_counts(y, name)
        row = _first(y > n)
        if row is not None:
            raise ValueError(
                f"column '{name}' row {row} has {_show(y[row])} successes but column '{trials_name}' has "
                f"{_show(n[row])} trials there; the binomial family expects {self._expects()}."
            )


class PoissonLikelihood(LikelihoodFamily):
    """Count response with log link: ``nll_i = exp(eta) - y eta + lgamma(y + 1)``.

    With ``pred_var``, ``E[nll] = exp(pred + pred_var / 2) - y pred + lgamma(y + 1)`` (closed form).

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example::

        family = PoissonLikelihood()
        loss = family(log_rate, counts)
    """

    name = "poisson"
    link = "log"

    def mean(self, pred: torch.Tensor) -> torch.Tensor:
        return pred.exp()

    def _nll(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        y = y.to(eta)
        return eta.exp() - y * eta + torch.lgamma(y + 1)

    def _expected_nll(
        self, eta: torch.Tensor, var: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None
    ) -> torch.Tensor:
        y = y.to(eta)
        return (eta + 0.5 * var).exp() - y * eta + torch.lgamma(y + 1)

    def _unit_deviance(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        y = y.to(eta)
        # 2 [y log(y / mu) - (y - mu)] with log mu = eta and 0 log 0 = 0
        return 2 * (torch.special.xlogy(y, y) - y * eta - y + eta.exp())

    def _expects(self) -> str:
        return "whole-number counts >= 0"

    def _check_values(self, y: np.ndarray, trials: Any, name: str, trials_name: str) -> None:
        self._check_counts(y, name)


class CategoricalLikelihood(LikelihoodFamily):
    """Class-index response with softmax over ``(B, C)`` logits: ``nll_i = -log softmax(eta_i)[y_i]``.

    There is no expected negative log-likelihood under ``pred_var``: passing it raises ``NotImplementedError``.

    Args:
        n_classes: the number of classes; when given, ``pred`` must have that many columns and
            :meth:`validate_target` checks ``y < n_classes``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Example::

        family = CategoricalLikelihood(n_classes=3)
        loss = family(torch.randn(4, 3), torch.tensor([0, 2, 1, 0]))
    """

    name = "categorical"
    link = "softmax"

    def __init__(self, n_classes: int | None = None, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if n_classes is not None and n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}.")
        self.n_classes = n_classes

    def extra_repr(self) -> str:
        return f"n_classes={self.n_classes}, reduction={self.reduction!r}"

    def mean(self, pred: torch.Tensor) -> torch.Tensor:
        return torch.softmax(pred, dim=-1)

    def _eta(self, pred: torch.Tensor) -> torch.Tensor:
        wrong_count = pred.dim() == 2 and (pred.shape[1] < 2 if self.n_classes is None else pred.shape[1] != self.n_classes)
        if pred.dim() != 2 or wrong_count:
            classes = "n_classes >= 2" if self.n_classes is None else str(self.n_classes)
            raise ValueError(f"pred must be logits (batch, {classes}), got shape {tuple(pred.shape)}.")
        return pred

    def _nll(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        y = y.long()
        if batch_checks_enabled() and bool(((y < 0) | (y >= eta.shape[1])).any()):
            raise ValueError(
                f"target must be class indices 0..{eta.shape[1] - 1} for logits of {eta.shape[1]} classes, got values "
                f"{sorted(set(y.tolist()))}."
            )
        return -torch.log_softmax(eta, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)

    def _expected_nll(
        self, eta: torch.Tensor, var: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError(
            "the categorical family has no expected negative log-likelihood under pred_var (the random effects' "
            "variance of C logits needs a covariance); call it without pred_var."
        )

    def _unit_deviance(self, eta: torch.Tensor, y: torch.Tensor, trials: torch.Tensor | None) -> torch.Tensor:
        return 2 * self._nll(eta, y, trials)

    def _expects(self) -> str:
        if self.n_classes is None:
            return "class indices, whole numbers >= 0"
        return f"class indices, whole numbers 0..{self.n_classes - 1}"

    def _check_values(self, y: np.ndarray, trials: Any, name: str, trials_name: str) -> None:
        self._check_counts(y, name)
        if self.n_classes is not None:
            _reject_first(y >= self.n_classes, y, name, f"the {self.name} family expects {self._expects()}")


FAMILIES: dict[str, type[LikelihoodFamily]] = {
    "gaussian": GaussianLikelihood,
    "bernoulli": BernoulliLikelihood,
    "categorical": CategoricalLikelihood,
    "binomial": BinomialLikelihood,
    "poisson": PoissonLikelihood,
}
_ALIASES = {"binary": "bernoulli", "normal": "gaussian"}


def likelihood(name: str, **kwargs: Any) -> LikelihoodFamily:
    """The likelihood family called ``name`` (case-insensitive; ``"binary"`` and ``"normal"`` are aliases).

    Args:
        name: one of ``FAMILIES`` or an alias.
        kwargs: the family's constructor arguments (e.g. ``n_classes``, ``scale_init``, ``reduction``).

    Raises:
        ValueError: for an unknown name, listing the known ones.

    Example::

        family = likelihood("Binary")                     # BernoulliLikelihood()
        family = likelihood("gaussian", learn_scale=False)
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in FAMILIES:
        known = ", ".join(sorted(FAMILIES))
        aliases = ", ".join(f"{alias} = {target}" for alias, target in sorted(_ALIASES.items()))
        raise ValueError(f"unknown likelihood family {name!r}; the known families are {known} (aliases: {aliases}).")
    return FAMILIES[key](**kwargs)
