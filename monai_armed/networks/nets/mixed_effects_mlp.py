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

from monai_armed.networks.blocks.adversary import mlp_layers
from monai_armed.networks.layers.random_effects import RandomEffects
from monai_armed.networks.utils import ARMEDOutput, cluster_one_hot, glorot_init, total_kl_divergence
from monai_armed.utils import shape_str

__all__ = ["MixedEffectsMLP", "MLP_VARIANTS", "variant_loss_weights"]

_SLOPE_MODES = ("none", "input", "hidden", "both")

#: The paper's dense-network models as ``MixedEffectsMLP`` settings plus ``ARMEDTrainer`` loss weights. ``adv`` is a
#: switch: the trainer's adversarial weight is ``adv * gen_weight`` (armed_method.md sections 2.1, 3.4, 4.3).
MLP_VARIANTS: dict[str, dict] = {
    "conventional": {"network": {"random_slopes": "none", "random_intercept": False}, "me": 1.0, "fe": 0.0, "adv": 0},
    "cluster_input": {
        "network": {"random_slopes": "none", "random_intercept": False, "cluster_input": True},
        "me": 1.0,
        "fe": 0.0,
        "adv": 0,
    },
    "domain_adversarial": {
        "network": {"random_slopes": "none", "random_intercept": False},
        "me": 1.0,
        "fe": 0.0,
        "adv": 1,
    },
    "armed": {"network": {}, "me": 1.0, "fe": 1.0, "adv": 1},
    "armed_no_adversary": {"network": {}, "me": 1.0, "fe": 0.0, "adv": 0},
}


def variant_loss_weights(variant: str, gen_weight: float = 1.0) -> dict[str, float]:
    """``ARMEDTrainer`` loss weights (``me_weight``, ``fe_weight``, ``adv_weight``) of one of the paper's models.

    The names and weights are shared by ``MLP_VARIANTS`` and the ``ARMED`` wrapper's ``ARMED_VARIANTS``.

    Example::

        variant_loss_weights("armed", gen_weight=0.5)   # {"me_weight": 1.0, "fe_weight": 1.0, "adv_weight": 0.5}
    """
    spec = _variant(variant)
    return {"me_weight": spec["me"], "fe_weight": spec["fe"], "adv_weight": spec["adv"] * gen_weight}


def _variant(variant: str) -> dict:
    if variant not in MLP_VARIANTS:
        raise ValueError(f"unknown MLP variant {variant!r}; expected one of {sorted(MLP_VARIANTS)}.")
    return MLP_VARIANTS[variant]


class MixedEffectsMLP(nn.Module):
    """Mixed-effects dense network (ARMED-DFNN) with the paper's baselines as settings.

    The fixed-effects (FE) subnetwork is an MLP ``x -> h_1 ... h_L -> logits_FE``. The random-effects (RE)
    subnetwork adds per-cluster Bayesian terms in logit space (the mixing function of the paper)::

        logits_ME = logits_FE + x^T U_in(z) + h_L^T U_hid(z) + b(z)

    with random slopes on the inputs (``U_in``, a linear mixed model's slopes) and/or on the last hidden layer
    (``U_hid``, the "nonlinear slopes" of the spiral experiments) and a random intercept ``b``. Each is a
    :class:`RandomEffects` layer with its own prior. The cluster adversary reads ``[h_1, ..., h_L]``.

    ``hidden_channels=()`` gives a purely linear fixed part ``x -> logits_FE``; with ``random_slopes="input"`` and a
    random intercept this is a linear mixed model (with :class:`~monai_armed.losses.GaussianLikelihood` as the
    trainer's loss and ``fe_weight=0``, the ELBO alone; with ``fe_weight > 0`` the fixed part must also predict the
    response by itself, with the same residual scale) or a GLMM (another family). Without hidden layers the adversary
    reads the inputs ``[x]`` (``feature_channels == in_features``, as in :class:`~monai_armed.networks.MixedModelNet`):
    a linear model has no learned representation to make cluster-invariant, so the adversary then only measures how
    much the inputs tell about the cluster and gives the network no gradient. Random slopes on a hidden layer
    (``"hidden"``, ``"both"``) are refused there.

    The outputs are on the link scale of the task loss: logits for classification, the predicted mean for a Gaussian
    regression (``out_channels=1``).

    ``forward(x, cluster=None)`` returns the mixed-effects logits for the given clusters, or the fixed-effects logits
    when ``cluster`` is ``None``; an index of ``-1`` (unseen) also gives fixed effects for that row. ``cluster`` may be
    an int64 index ``(B,)`` or a soft membership ``(B, n_clusters)``. :meth:`forward_armed` returns everything the
    trainer needs in one pass.

    Baselines (see ``MLP_VARIANTS`` and :meth:`from_variant`): ``random_slopes="none", random_intercept=False`` is a
    conventional MLP (add an adversary in the trainer for the domain-adversarial MLP), ``cluster_input=True``
    concatenates the one-hot cluster to the input.

    Args:
        in_features: number of input features.
        out_channels: number of outputs: 1 for a binary classifier with a sigmoid/BCE loss or for a regression, or
            the number of classes.
        n_clusters: number of seen clusters.
        hidden_channels: FE hidden widths (the paper's 4-4-4 by default); ``()`` for a linear fixed part.
        act: activation of the hidden layers.
        random_slopes: ``"hidden"`` (default), ``"input"``, ``"both"`` or ``"none"``; ``"input"`` or ``"none"``
            with ``hidden_channels=()``.
        random_intercept: add a random intercept per cluster and output.
        cluster_input: feed the one-hot cluster to the FE network as extra inputs (baseline).
        slope_prior_scale: prior s.d. of the random slopes.
        intercept_prior_scale: prior s.d. of the random intercepts.
        slope_posterior_init_scale: initial spread of the slope posterior means.
        intercept_posterior_init_scale: initial spread of the intercept posterior means.
        re_kwargs: further :class:`RandomEffects` arguments (``kl_estimator``, ``reference_scale_init``, ...).

    Example::

        net = MixedEffectsMLP(in_features=2, out_channels=1, n_clusters=10, slope_prior_scale=0.3)
        logits_me = net(x, cluster)             # (B, 1)
        logits_fe = net(x)                      # fixed effects only
        out = net.forward_armed(x, cluster)     # pred, pred_fe, features, kl
        lmm = MixedEffectsMLP(3, 1, n_clusters=10, hidden_channels=(), random_slopes="input")   # x -> y, linear
    """

    def __init__(
        self,
        in_features: int,
        out_channels: int,
        n_clusters: int,
        hidden_channels: Sequence[int] = (4, 4, 4),
        act: str | tuple = "relu",
        random_slopes: str = "hidden",
        random_intercept: bool = True,
        cluster_input: bool = False,
        slope_prior_scale: float = 0.1,
        intercept_prior_scale: float = 0.1,
        slope_posterior_init_scale: float = 0.1,
        intercept_posterior_init_scale: float = 0.1,
        re_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if random_slopes not in _SLOPE_MODES:
            raise ValueError(f"random_slopes must be one of {_SLOPE_MODES}, got {random_slopes!r}.")
        hidden_channels = tuple(hidden_channels)
        if not hidden_channels and random_slopes in ("hidden", "both"):
            raise ValueError(
                f"random_slopes={random_slopes!r} puts random slopes on the last hidden layer, but "
                "hidden_channels=() has none (a linear fixed part); use random_slopes='input' for the random slopes "
                "of a linear mixed model, or 'none'."
            )
        self.in_features, self.out_channels, self.n_clusters = in_features, out_channels, n_clusters
        self.cluster_input = cluster_input
        fe_inputs = in_features + (n_clusters if cluster_input else 0)
        self.hidden = mlp_layers(fe_inputs, hidden_channels, act)
        self.out = nn.Linear(hidden_channels[-1] if hidden_channels else fe_inputs, out_channels)
        # a linear fixed part has no hidden layer: the adversary reads the inputs (as in MixedModelNet)
        self.feature_channels = int(sum(hidden_channels)) if hidden_channels else in_features
        # initialise the fixed effects before drawing the random effects: one seed gives every variant the same
        # fixed-effects weights, so variants can be compared on equal terms
        glorot_init(self)

        sizes = {
            "slope_input": in_features * out_channels if random_slopes in ("input", "both") else 0,
            "slope_hidden": hidden_channels[-1] * out_channels if random_slopes in ("hidden", "both") else 0,
            "intercept": out_channels if random_intercept else 0,
        }
        self.re_groups = {}
        prior, loc_init, offset = [], [], 0
        for name, size in sizes.items():
            if size:
                self.re_groups[name] = (offset, offset + size)
                offset += size
                slope = name != "intercept"
                prior += [slope_prior_scale if slope else intercept_prior_scale] * size
                loc_init += [slope_posterior_init_scale if slope else intercept_posterior_init_scale] * size
        self.random_effects = (
            RandomEffects(n_clusters, offset, prior_scale=prior, post_loc_init_scale=loc_init, **(re_kwargs or {}))
            if offset
            else None
        )
        # (start, end) units of each group as plain ints, which TorchScript can read (empty groups are (0, 0))
        self._input_slope_span = self.re_groups.get("slope_input", (0, 0))
        self._hidden_slope_span = self.re_groups.get("slope_hidden", (0, 0))
        self._intercept_span = self.re_groups.get("intercept", (0, 0))

    @classmethod
    def from_variant(cls, variant: str, **kwargs) -> MixedEffectsMLP:
        """Build one of the paper's models by name (``MLP_VARIANTS``).

        The variant fixes the structure (random effects, cluster input); ``kwargs`` give everything else (sizes,
        priors) and their structural entries are ignored for variants that set them, so one config can build every
        baseline.
        """
        return cls(**{**kwargs, **_variant(variant)["network"]})

    @property
    def has_random_effects(self) -> bool:
        return self.random_effects is not None

    def kl_divergence(self, cluster: torch.Tensor | None = None) -> torch.Tensor:
        """KL divergence of the random effects (0 without random effects); with an index batch ``cluster`` and the
        random effects' ``level_counts`` (``re_kwargs``), its batch estimate, whose cost follows the batch."""
        if self.random_effects is None:
            return self.out.weight.new_zeros(())
        return total_kl_divergence(self, cluster, [self.random_effects])

    def posterior_means(self) -> dict[str, torch.Tensor]:
        """Posterior means of each random-effect group, ``{name: (n_clusters, units)}``.

        Groups: ``slope_input`` (``in_features * out_channels``), ``slope_hidden`` (``hidden[-1] * out_channels``)
        and ``intercept`` (``out_channels``); slopes are laid out feature-major (feature ``i``, output ``o`` at
        ``i * out_channels + o``).
        """
        if self.random_effects is None:
            return {}
        loc = self.random_effects.loc.detach()
        return {name: loc[:, a:b] for name, (a, b) in self.re_groups.items()}

    def _fixed_effects(self, x: torch.Tensor, cluster: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected features of shape (batch, {self.in_features}), got {shape_str(x)}.")
        h = x
        if self.cluster_input:
            z = (
                cluster_one_hot(cluster, self.n_clusters, x.dtype)
                if cluster is not None
                else x.new_zeros(x.shape[0], self.n_clusters)
            )
            h = torch.cat([x, z], dim=1)
        features = []
        for layer in self.hidden:
            h = layer(h)
            features.append(h)
        if len(features) == 0:  # linear fixed part: the inputs, without the one-hot cluster of cluster_input
            features.append(x)
        return self.out(h), features

    def _random_effects(self, x: torch.Tensor, last_hidden: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
        if self.random_effects is None:
            return x.new_zeros(x.shape[0], self.out_channels)
        effects = self.random_effects(cluster)
        b, o = x.shape[0], self.out_channels
        terms: list[torch.Tensor] = []
        start, end = self._intercept_span
        if end > start:
            terms.append(effects[:, start:end])
        for inputs, (start, end) in ((x, self._input_slope_span), (last_hidden, self._hidden_slope_span)):
            if end > start:
                slopes = effects[:, start:end]
                # one output: a multiply-sum over the features, fewer operations than a batched matrix product
                terms.append(
                    (inputs * slopes).sum(1, keepdim=True)
                    if o == 1
                    else torch.bmm(inputs.unsqueeze(1), slopes.reshape(b, -1, o)).squeeze(1)
                )
        if len(terms) == 0:
            return x.new_zeros(b, o)
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total

    def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        pred_fe, features = self._fixed_effects(x, cluster)
        if cluster is None or not self.has_random_effects:
            return pred_fe
        return pred_fe + self._random_effects(x, features[-1], cluster)

    def forward_armed(self, x: torch.Tensor, cluster: torch.Tensor) -> ARMEDOutput:
        """Mixed- and fixed-effects logits, the adversary's features and the total KL, from one forward pass."""
        pred_fe, features = self._fixed_effects(x, cluster)
        if not self.has_random_effects:
            return ARMEDOutput(pred_fe, pred_fe, features, pred_fe.new_zeros(()))
        pred = pred_fe + self._random_effects(x, features[-1], cluster)
        return ARMEDOutput(pred, pred_fe, features, self.kl_divergence(cluster))
