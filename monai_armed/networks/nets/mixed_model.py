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

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from monai_armed.networks.blocks.adversary import mlp_layers
from monai_armed.networks.layers.random_effects import RandomEffects
from monai_armed.networks.utils import ARMEDOutput, total_kl_divergence
from monai_armed.utils import shape_str

__all__ = ["FactorSpec", "FactorModules", "MixedModelNet", "ClusterInput"]

#: a network's clusters: one index / membership tensor (single factor), or one per factor by name
ClusterInput = torch.Tensor | Mapping[str, torch.Tensor]


@dataclass
class FactorSpec:
    """One grouping factor of a :class:`MixedModelNet`: its levels and the columns its random effects multiply.

    Args:
        n_levels: number of levels seen in training.
        terms: names of the random-effects design columns (``"(Intercept)"``, ``"Days"``, ...), one unit each.
        counts: training rows per level (enables the batch estimate of the KL and calibrates it).
        correlated: full covariance (``(1 + x | g)``) or independent effects (``(1 + x || g)``).
        prior_scale: initial prior standard deviation (learned): a float, or one value per unit (term x output).

    Example::

        FactorSpec(n_levels=18, terms=["(Intercept)", "Days"], counts=[10] * 18)
    """

    n_levels: int
    terms: Sequence[str] = ("(Intercept)",)
    counts: Sequence[float] | None = None
    correlated: bool = True
    prior_scale: float | Sequence[float] = 1.0


@contextmanager
def _naming_factor(name: str) -> Iterator[None]:
    """Prefix an input error raised for one grouping factor with the factor's name."""
    try:
        yield
    except (ValueError, IndexError, TypeError) as error:
        raise type(error)(f"grouping factor {name!r}: {error}") from None


class FactorModules(nn.ModuleDict):
    """A ``ModuleDict`` keyed by grouping-factor names, which may hold dots (``"Subject.1"``, the second term on one
    group; a column ``"subj.id"``) that torch's module names cannot: each ``.`` is stored as ``__dot__`` (so in the
    state dict's keys too) and every method takes and gives the factor names themselves.

    Example::

        layers = FactorModules({"subj.id": RandomEffects(5)})
        layers["subj.id"], list(layers)        # the layer, ["subj.id"]
    """

    @staticmethod
    def _escape(name: str) -> str:
        if "__dot__" in name:
            raise ValueError(f"a grouping factor's name cannot contain '__dot__', got {name!r}.")
        return name.replace(".", "__dot__")

    @staticmethod
    def factor_name(module_name: str) -> str:
        """The factor name of a stored module name (e.g. in ``named_modules`` or state-dict keys)."""
        return module_name.replace("__dot__", ".")

    def _stored(self, key: str) -> str:
        stored = self._escape(key)
        if stored not in self._modules:
            raise KeyError(key)
        return stored

    def __getitem__(self, key: str) -> nn.Module:  # type: ignore[override]
        return self._modules[self._stored(key)]

    def __setitem__(self, key: str, module: nn.Module) -> None:
        self.add_module(self._escape(key), module)

    def __delitem__(self, key: str) -> None:  # type: ignore[override]
        del self._modules[self._stored(key)]

    def pop(self, key: str) -> nn.Module:  # type: ignore[override]
        module = self[key]
        del self[key]
        return module

    def __contains__(self, key: str) -> bool:  # type: ignore[override]
        return "__dot__" not in key and self._escape(key) in self._modules

    def __iter__(self):
        return (self.factor_name(key) for key in self._modules)

    def keys(self):  # type: ignore[override]
        return list(iter(self))

    def items(self):  # type: ignore[override]
        return list(zip(iter(self), self._modules.values()))


class MixedModelNet(nn.Module):
    """A generalized (non)linear mixed model as a network: ``eta = f(X) + sum_f Z_f u_f[level_f]``.

    The fixed part ``f`` is linear (``hidden_channels=()``, the linear predictor of lme4's ``lmer``/``glmer``) or an
    MLP. Each grouping factor ``f`` (crossed or nested, e.g. ``Subject`` and ``site``) has a :class:`RandomEffects`
    layer with one unit per random-effects design column and output, a learned prior covariance (empirical Bayes)
    and a full-covariance posterior per level when ``correlated``. The input is one matrix whose columns are the
    fixed-effects design followed by each factor's random-effects design, in the order of ``factors``
    (:func:`~monai_armed.data.build_design` and :meth:`MixedDesign.inputs` produce it).

    ``cluster`` is a mapping ``factor -> (B,) int64 index`` (``-1``: an unseen level, which contributes nothing for
    that factor only) or, with one factor, the index tensor itself. Soft memberships ``(B, n_levels)`` work as in
    :class:`RandomEffects`. ``forward(x, cluster=None)`` gives the fixed-effects prediction without clusters, the mixed
    one with them (the posterior mean in evaluation mode, a draw in training), on the link scale.

    Args:
        in_features: columns of the fixed-effects design.
        factors: ``{name: FactorSpec}`` in the column order of the input.
        out_channels: linear predictors per row (1, or the classes of a categorical family).
        hidden_channels: widths of the fixed part's hidden layers; ``()`` for a linear fixed part.
        act: activation of the hidden layers.
        fixed_bias: add a bias to the fixed part (leave off when the design has an intercept column).
        sparse: random-effects look-ups give sparse gradients (for very many levels, with ``LazyAdam``).

    Example::

        net = MixedModelNet(2, {"Subject": FactorSpec(18, ["(Intercept)", "Days"], counts=[10] * 18)})
        x = torch.cat([X, Z], dim=1)                 # (B, 2 + 2): [1, Days | 1, Days]
        eta = net(x, {"Subject": subject_index})     # (B, 1)
        mean, var = net.linear_predictor(x, {"Subject": subject_index})   # exact expectations for the ELBO
        net.variance_components()                    # lme4 VarCorr rows per factor
    """

    def __init__(
        self,
        in_features: int,
        factors: Mapping[str, FactorSpec],
        out_channels: int = 1,
        hidden_channels: Sequence[int] = (),
        act: str | tuple = "relu",
        fixed_bias: bool = False,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        if in_features < 1 or out_channels < 1:
            raise ValueError(f"in_features and out_channels must be >= 1, got {in_features}, {out_channels}.")
        self.in_features, self.out_channels = in_features, out_channels
        self.hidden = mlp_layers(in_features, hidden_channels, act)
        width = hidden_channels[-1] if hidden_channels else in_features
        self.out = nn.Linear(width, out_channels, bias=fixed_bias or bool(hidden_channels))
        nn.init.zeros_(self.out.weight)
        if self.out.bias is not None:
            nn.init.zeros_(self.out.bias)
        self.factor_names = list(factors)
        self.random_effects = FactorModules()
        self._spans: list[tuple[int, int]] = []
        start = in_features
        for name, spec in factors.items():
            if spec.n_levels < 2:
                raise ValueError(f"a random effect needs >= 2 levels; factor {name!r} has {spec.n_levels}.")
            units = len(spec.terms)
            names = [t if out_channels == 1 else f"{t}[{o}]" for t in spec.terms for o in range(out_channels)]
            self.random_effects[name] = RandomEffects(
                spec.n_levels,
                units * out_channels,
                prior_scale=spec.prior_scale,
                post_loc_init_scale=0.0,
                learn_prior_scale=True,
                covariance="full" if spec.correlated and units * out_channels > 1 else "diagonal",
                level_counts=spec.counts,
                sparse=sparse,
                unit_names=names,
            )
            self._spans.append((start, start + units))
            start += units
        self.total_features = start
        self.feature_channels = int(sum(hidden_channels)) if hidden_channels else in_features

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.dim() != 2 or x.shape[1] != self.total_features:
            raise ValueError(
                f"expected inputs of shape (batch, {self.total_features}) ({self.in_features} fixed-effects columns, "
                f"then the random-effects columns of {self.factor_names}), got {shape_str(x)}."
            )
        return x[:, : self.in_features], [x[:, a:b] for a, b in self._spans]

    def _clusters(self, cluster: ClusterInput) -> list[torch.Tensor]:
        if isinstance(cluster, torch.Tensor):
            if len(self.factor_names) != 1:
                raise ValueError(
                    f"this model has the grouping factors {self.factor_names}: pass cluster as a mapping "
                    "{factor: index}."
                )
            return [cluster]
        missing = [f for f in self.factor_names if f not in cluster]
        if missing:
            raise KeyError(f"cluster has no entry for the grouping factor(s) {missing}; got {sorted(cluster)}.")
        return [cluster[f] for f in self.factor_names]

    def fixed_effects(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The fixed part's prediction ``(B, out_channels)`` and hidden activations (the adversary's features)."""
        h, _ = self._split(x)
        features = []
        for layer in self.hidden:
            h = layer(h)
            features.append(h)
        return self.out(h), features or [h]

    def _random_part(self, x: torch.Tensor, clusters: list[torch.Tensor]) -> torch.Tensor:
        total = x.new_zeros(x.shape[0], self.out_channels)
        for (name, layer), z, c in zip(self.random_effects.items(), self._split(x)[1], clusters):
            with _naming_factor(name):
                u = layer(c).reshape(z.shape[0], z.shape[1], self.out_channels)
            total = total + torch.einsum("bq,bqo->bo", z, u)
        return total

    def forward(self, x: torch.Tensor, cluster: ClusterInput | None = None) -> torch.Tensor:
        pred_fe, _ = self.fixed_effects(x)
        if cluster is None:
            return pred_fe
        return pred_fe + self._random_part(x, self._clusters(cluster))

    def forward_armed(self, x: torch.Tensor, cluster: ClusterInput) -> ARMEDOutput:
        """Mixed- and fixed-effects predictions, the adversary's features and the KL, from one forward pass.

        The KL is the sum over factors of their total KL, estimated from the batch's levels for factors with level
        counts (so a step's cost does not grow with the number of levels).
        """
        pred_fe, features = self.fixed_effects(x)
        clusters = self._clusters(cluster)
        pred = pred_fe + self._random_part(x, clusters)
        return ARMEDOutput(pred, pred_fe, features, self.kl_divergence(cluster))

    def linear_predictor(self, x: torch.Tensor, cluster: ClusterInput) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of the linear predictor, each ``(B, 1)`` (``out_channels == 1``).

        With these a family's expected negative log-likelihood is exact (Gaussian, Poisson) or a deterministic
        quadrature (logit families), so the ELBO can be maximised without sampling (e.g. by L-BFGS).
        """
        if self.out_channels != 1:
            raise ValueError("linear_predictor needs out_channels == 1; sample with forward() for several outputs.")
        pred_fe, _ = self.fixed_effects(x)
        mean, var = pred_fe[:, 0], pred_fe.new_zeros(pred_fe.shape[0])
        for (name, layer), z, c in zip(self.random_effects.items(), self._split(x)[1], self._clusters(cluster)):
            with _naming_factor(name):
                m, v = layer.linear_predictor(c, z)
            mean, var = mean + m, var + v
        return mean.unsqueeze(1), var.unsqueeze(1)

    def kl_divergence(self, cluster: ClusterInput | None = None) -> torch.Tensor:
        """Total KL of every factor's random effects (batch estimates where level counts are known and ``cluster``
        is an index batch)."""
        total = self.out.weight.new_zeros(())
        clusters = self._clusters(cluster) if cluster is not None else [None] * len(self.factor_names)
        for (name, layer), c in zip(self.random_effects.items(), clusters):
            with _naming_factor(name):
                total = total + total_kl_divergence(self, c, [layer])
        return total

    def variance_components(self) -> list[dict]:
        """lme4 ``VarCorr`` rows of every factor (the residual row comes from the Gaussian family)."""
        rows: list[dict] = []
        for name, layer in self.random_effects.items():
            rows += layer.variance_components(name)
        return rows
