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

import difflib
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import DenseNet, EfficientNet, ResNet, SENet

from monai_armed.networks.blocks.cluster_norm import ClusterScaleBias, cluster_norm_modules
from monai_armed.networks.layers.random_effects import RandomEffects, check_cluster_index
from monai_armed.networks.utils import ARMEDOutput, cluster_one_hot, total_kl_divergence
from monai_armed.utils import shape_str

__all__ = ["ARMED", "ARMED_VARIANTS", "default_tap_layers", "INPUT_SUFFIX"]

#: The paper's models as ``ARMED`` wrapper settings; train each with ``variant_loss_weights(variant)``. The
#: conventional, cluster-input and domain-adversarial networks have no random effects (and no swapped norms).
ARMED_VARIANTS: dict[str, dict] = {
    "conventional": {"random_slope": False, "random_intercept": False, "swap_norm": False},
    "cluster_input": {"random_slope": False, "random_intercept": False, "swap_norm": False, "cluster_input": True},
    "domain_adversarial": {"random_slope": False, "random_intercept": False, "swap_norm": False},
    "armed": {},
    "armed_no_adversary": {},
}

#: A tap named ``"<module>:input"`` reads the first positional input of ``<module>`` instead of its output.
INPUT_SUFFIX = ":input"

_SWAPPABLE_NORMS: dict[type, int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.InstanceNorm1d: 1,
    nn.InstanceNorm2d: 2,
    nn.InstanceNorm3d: 3,
}
#: spatial size of the construction dry run when ``in_shape`` is not given, per number of spatial dimensions
_PROBE_SIZE = {1: 256, 2: 64, 3: 32}
#: the end of every refusal of a network whose output layer ARMED cannot use
_HEAD_HINT = (
    "Pass the layer whose output the network returns as head=, e.g. ARMED(net, n_clusters, head=\"fc\") with a name "
    "from net.named_modules(): an nn.Linear called last in forward, whose output the network returns unchanged. "
    "Dense prediction (segmentation) and transformer networks are not supported by ARMED yet; they come in a later "
    "release."
)


class _TapOutputError(TypeError):
    """A tapped layer returned something other than a tensor (raised from a hook, so not a dry-run input problem)."""


def _norm_dims(module: nn.Module) -> int:
    for cls, dims in _SWAPPABLE_NORMS.items():
        if isinstance(module, cls):
            return dims
    return 0


def _last_linear(network: nn.Module) -> str:
    names = [name for name, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"{type(network).__name__} has no nn.Linear layer to put the random effects on; pass head=<name of the "
            "final linear layer> (a module name from network.named_modules())."
        )
    return names[-1]


def _guess_in_shape(network: nn.Module) -> tuple[tuple[int, ...], str]:
    """The dry run's input shape without the batch dimension, and where it came from, when ``in_shape`` is not given:
    the first convolution's input channels at ``_PROBE_SIZE``, else the first linear layer's input features."""
    layers = [(n, m) for n, m in network.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    layers = layers or [(n, m) for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    name, layer = layers[0]  # the head is an nn.Linear, so there is one
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (layer.in_features,)
    else:
        dims = len(layer.kernel_size)
        shape = (layer.in_channels,) + (_PROBE_SIZE.get(dims, 64),) * dims
    if 0 in shape:
        raise ValueError(
            f"cannot guess the input shape of {type(network).__name__} for ARMED's dry run: its first layer {name!r} is "
            f"an uninitialised {type(layer).__name__}; pass in_shape=(channels, *spatial), the shape of one input "
            "without the batch dimension."
        )
    return shape, f"guessed from {name!r} ({type(layer).__name__}); pass in_shape=(channels, *spatial) otherwise"


def _describe(value: Any) -> str:
    """What a forward returned, for error messages: ``"a Tensor (1, 2)"``, ``"a tuple (Tensor (1, 2), list)"``."""
    if isinstance(value, torch.Tensor):
        return f"a Tensor {shape_str(value)}"
    if isinstance(value, (tuple, list)):
        items = [f"Tensor {shape_str(v)}" if isinstance(v, torch.Tensor) else type(v).__name__ for v in value]
        return f"a {type(value).__name__} ({', '.join(items)})"
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {list(value)}"
    return f"a {type(value).__name__}"


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _generic_taps(network: nn.Module, head: str) -> list[str]:
    """The parameterised children before the head's branch, descending while there is just one."""
    module, prefix = network, ""
    while True:
        names, chosen = [], module
        for name, child in module.named_children():
            full = prefix + name
            if head == full or head.startswith(full + "."):
                break
            if _has_params(child):
                names.append(full)
                chosen = child
        if len(names) == 1 and next(chosen.children(), None) is not None:
            module, prefix = chosen, names[0] + "."
            continue
        return names


def default_tap_layers(network: nn.Module, head: str | None = None) -> list[str]:
    """The intermediate layers whose outputs :class:`ARMED` feeds to the cluster adversary by default.

    ``ARMED`` adds the head's input (the penultimate features) after these. Rules, first match wins:

    - a network with a ``feature_layers`` attribute (e.g. :class:`ARMEDCNN`: ``c0 ... c6``): those names;
    - MONAI ``DenseNet``: the transition layers ``features.transitionN`` (dense block outputs after compression);
    - MONAI ``ResNet`` / ``SENet`` (SEResNet...): ``layer1 ... layer3`` (``layer4`` pooled is the penultimate);
    - MONAI ``EfficientNet``: every stage ``_blocks.N``;
    - otherwise: the parameterised children that come before the head's branch, descending into a single one
      (``features`` of a ``features`` / ``classifier`` network, say).

    Example::

        default_tap_layers(resnet18(spatial_dims=2, n_input_channels=1, num_classes=2))   # ["layer1", "layer2", "layer3"]
    """
    declared = getattr(network, "feature_layers", None)
    if declared is not None:
        return [str(name) for name in declared]
    if isinstance(network, DenseNet):
        return [f"features.{n}" for n, _ in network.features.named_children() if n.startswith("transition")]
    if isinstance(network, (ResNet, SENet)):
        return [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(network, n)][:-1]
    if isinstance(network, EfficientNet):
        return [f"_blocks.{n}" for n, _ in network._blocks.named_children()]
    return _generic_taps(network, head if head is not None else _last_linear(network))


@dataclass
class _PassState:
    """What the hooks of one forward pass share."""

    cluster: torch.Tensor | None
    split_head: bool
    captured: dict[str, torch.Tensor] | None = None
    head_output: torch.Tensor | None = None
    pred_fe: torch.Tensor | None = None
    calls: dict[str, int] = field(default_factory=dict)


def _broadcast(effects: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` effects shaped to multiply/add ``(B, ..., K)``."""
    return effects.to(like.dtype).reshape([effects.shape[0]] + [1] * (like.dim() - 2) + [effects.shape[1]])


class ARMED(nn.Module):
    """Turns a classification or regression network into an ARMED mixed-effects network, without editing its code.

    ARMED (Nguyen & Montillo, https://arxiv.org/abs/2202.11783, TPAMI 2023) adds per-cluster Bayesian random effects
    to a fixed-effects network and a cluster adversary on its features. This wrapper does it with forward hooks:

    - the **head** (the final ``nn.Linear``: ``head=``, or the last one in ``named_modules`` order) gets a random
      multiplicative scale on its input features ``h`` and a random intercept on its logits, as in the paper's
      mixed-effects CNN (armed_method.md section 2.2)::

          logits_ME = head(h * (1 + u_s(z))) + u_int(z)        logits_FE = head(h)

      with ``u_s`` a :class:`RandomEffects` of ``head.in_features`` units and ``u_int`` one of ``head.out_features``;
    - the **tapped layers** (``tap_layers``, default :func:`default_tap_layers` plus the head's input) give the
      fixed-effects activations that the adversary reads; ``"<module>:input"`` taps a module's input;
    - ``swap_norm`` replaces BatchNorm / InstanceNorm layers (1-3 d, all with ``True`` or those named in a list) by
      :class:`ClusterScaleBias` (instance norm with per-cluster random scale and bias, armed_method.md section 1.2).
      Every ``ClusterScaleBias`` in the network, swapped or built with ``norm="clusterscalebias"``, gets the
      cluster of the batch during each call and is cleared afterwards, also on error.

    ``forward(x, cluster=None)`` returns mixed-effects logits for the given clusters (int64 index ``(B,)``, ``-1`` =
    unseen, or soft membership ``(B, n_clusters)``), fixed-effects logits when ``cluster`` is ``None`` (then it is
    exactly ``network(x)``, which ``torch.jit.trace`` can export: the export path is trace-based, not
    ``torch.jit.script``, because the random effects live in Python hooks). :meth:`forward_armed` returns
    ``ARMEDOutput(pred, pred_fe, features, kl)`` for :class:`~monai_armed.engines.ARMEDTrainer` from one pass of the
    backbone: without cluster norms the head alone runs on ``[h * (1 + u_s); h]``; with cluster norms the batch is
    doubled (``[x; x]`` with clusters ``[z; unseen]``), which costs a second forward's compute in the same call.

    The head is never picked silently: at construction a **dry run** on one zero input of ``in_shape`` checks that
    the network returns a single tensor that *is* the head's output (nothing after the head, not even a reshape or an
    activation: the intercept is added to that output and ``pred_fe`` is read there) and that every tapped layer is
    called, and measures ``feature_channels`` (the adversary's input width). Otherwise it raises a ``ValueError`` or
    ``TypeError`` naming the head found (e.g. an attention projection of UNETR, or ViT's head with its tuple output)
    and how to pass ``head=``; dense prediction (segmentation) and transformer networks are not supported yet. The
    dry run runs in eval mode without gradients before any norm is swapped, so the network's weights, running
    statistics and training flags are left as they were (lazy layers are initialised by it). Without ``in_shape`` it
    uses the first convolution's input channels at 64 x 64 in 2-D, 32^3 in 3-D, 256 in 1-D, or else the first
    ``nn.Linear``'s ``(in_features,)``; pass ``in_shape`` when the network needs another size. Tapped modules must
    return one tensor ``(B, C, *spatial)`` or ``(B, C)``; if one is called more than once per pass the last call
    counts.

    Regression: a network whose head is an ``nn.Linear`` with one output (e.g. ``DenseNet121(..., out_channels=1)``,
    ``resnet18(..., num_classes=1)``) predicts a continuous outcome; train it with
    :class:`~monai_armed.losses.GaussianLikelihood` as ``ARMEDTrainer``'s ``loss_function`` (its residual scale is
    learned with the network). "Logits" above are then the predicted mean: ``u_int`` is a per-cluster offset of the
    prediction and ``u_s`` a per-cluster scale of the features. MONAI's ``Regressor`` is refused: it reshapes the
    head's output to ``out_shape`` after the head, where ARMED could not add the intercept.

    Args:
        network: the fixed-effects classifier or regressor (any ``nn.Module`` whose ``forward(x)`` returns its head's
            output: logits, or the predicted mean of a regression).
        n_clusters: number of seen clusters.
        head: name of the final linear layer, whose output the network returns (default: the last ``nn.Linear``).
        tap_layers: module names whose outputs feed the adversary (``"<name>:input"`` for an input); default
            ``default_tap_layers(network) + [head + ":input"]``.
        swap_norm: ``True`` (every BatchNorm / InstanceNorm), a list of module names, or ``False``.
        slope_prior_scale: prior s.d. of the random scales ``u_s``.
        intercept_prior_scale: prior s.d. of the random intercepts.
        post_loc_init_scale: initial spread of the posterior means of ``u_s`` and ``u_int`` (0.1 in the paper).
        random_slope: add the random scale on the head's input (``False`` with ``random_intercept=False`` and no
            cluster norms gives a domain-adversarial network).
        random_intercept: add the random intercept on the logits.
        norm_kwargs: further :class:`ClusterScaleBias` arguments of swapped norms (``eps``, ``prior_scale``,
            ``post_loc_init_scale``, ``re_kwargs``); a swapped norm's affine starts from the replaced layer's.
        re_kwargs: further :class:`RandomEffects` arguments of ``u_s`` and ``u_int`` (``kl_estimator``, ...).
        cluster_input: the cluster-as-input baseline: a learned, unregularised logit offset per cluster, which is
            what concatenating the one-hot cluster to the linear head's input amounts to (zero for unseen clusters).
        in_shape: ``(channels, *spatial)`` of one input, for the construction dry run (default: guessed, see above).

    Example::

        net = ARMED(DenseNet121(spatial_dims=3, in_channels=1, out_channels=2), n_clusters=8, in_shape=(1, 64, 64, 64))
        adversary = ClusterAdversary(net.feature_channels, n_clusters=8, hidden_channels=(64, 32))
        logits = net(x, cluster)                 # mixed effects; net(x) gives fixed effects
        out = net.forward_armed(x, cluster)      # ARMEDOutput(pred, pred_fe, features, kl) for ARMEDTrainer
        print(net.report())
        ARMED(UNETR(1, 2, img_size=32), n_clusters=8)   # ValueError: its last nn.Linear (in a transformer block)
                                                         # is not the output layer; names it and how to pass head=
        regressor = ARMED(DenseNet121(spatial_dims=2, in_channels=1, out_channels=1), n_clusters=8)   # predicts y
        trainer = ARMEDTrainer(..., network=regressor, loss_function=GaussianLikelihood().init_from_data(train_y))
    """

    def __init__(
        self,
        network: nn.Module,
        n_clusters: int,
        head: str | None = None,
        tap_layers: Sequence[str] | None = None,
        swap_norm: bool | Sequence[str] = False,
        slope_prior_scale: float = 0.25,
        intercept_prior_scale: float = 0.25,
        post_loc_init_scale: float = 0.1,
        random_slope: bool = True,
        random_intercept: bool = True,
        norm_kwargs: dict | None = None,
        re_kwargs: dict | None = None,
        cluster_input: bool = False,
        in_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}.")
        if n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {n_clusters}.")
        self.network, self.n_clusters = network, int(n_clusters)
        self.in_shape = tuple(int(s) for s in in_shape) if in_shape is not None else None
        modules = dict(network.named_modules())
        self.head_name = head if head is not None else _last_linear(network)
        if self.head_name not in modules or self.head_name == "":
            raise ValueError(
                f"head {self.head_name!r} is not a module of {type(network).__name__}; its nn.Linear layers are "
                f"{[n for n, m in modules.items() if isinstance(m, nn.Linear)]}."
            )
        head_module = modules[self.head_name]
        if not isinstance(head_module, nn.Linear):
            raise TypeError(f"head {self.head_name!r} must be an nn.Linear, got {type(head_module).__name__}.")
        head_found = "given as head=" if head is not None else f"the last nn.Linear of {type(network).__name__}"
        self._head_desc = f"{self.head_name!r} ({type(head_module).__name__}, {head_found})"

        swap_names = self._swap_names(swap_norm)
        self._norm_names = list(cluster_norm_modules(network))
        taps = (
            default_tap_layers(network, self.head_name) + [self.head_name + INPUT_SUFFIX]
            if tap_layers is None
            else [str(t) for t in tap_layers]
        )
        self.tapped_layers = self._check_taps(taps)
        # before the norms are swapped, so that a refused network is left as it was
        self._feature_widths = self._dry_run()
        self.swapped_norms = self._swap_norms(swap_names, norm_kwargs or {})
        self._norm_names = list(cluster_norm_modules(network))
        self.in_features, self.out_channels = head_module.in_features, head_module.out_features  # lazy: set by now

        re_args = dict(re_kwargs or {})
        self.random_slope = (
            RandomEffects(
                n_clusters,
                self.in_features,
                prior_scale=slope_prior_scale,
                post_loc_init_scale=post_loc_init_scale,
                **re_args,
            )
            if random_slope
            else None
        )
        self.random_intercept = (
            RandomEffects(
                n_clusters,
                self.out_channels,
                prior_scale=intercept_prior_scale,
                post_loc_init_scale=post_loc_init_scale,
                **re_args,
            )
            if random_intercept
            else None
        )
        self.cluster_logit = nn.Parameter(torch.zeros(n_clusters, self.out_channels)) if cluster_input else None
        reference = next(network.parameters(), None)
        if reference is not None:
            if self.cluster_logit is not None:
                self.cluster_logit.data = self.cluster_logit.data.to(reference.device)
            for m in (self.random_slope, self.random_intercept):
                if m is not None:
                    m.to(reference.device)

    @classmethod
    def from_variant(cls, variant: str, network: nn.Module, n_clusters: int, **kwargs: Any) -> ARMED:
        """Wrap ``network`` as one of the paper's models (``ARMED_VARIANTS``); the variant's structural settings
        override ``kwargs``, so one config builds every baseline.

        Example::

            net = ARMED.from_variant("domain_adversarial", DenseNet121(2, 1, 1), n_clusters=8)
            trainer_weights = variant_loss_weights("domain_adversarial", gen_weight=0.1)
        """
        if variant not in ARMED_VARIANTS:
            raise ValueError(f"unknown ARMED variant {variant!r}; expected one of {sorted(ARMED_VARIANTS)}.")
        return cls(network, n_clusters, **{**kwargs, **ARMED_VARIANTS[variant]})

    # ----------------------------------------------------------------------------------------------- construction
    def _swap_names(self, swap_norm: bool | Sequence[str]) -> list[str]:
        """The norm layers that ``swap_norm`` names, checked (nothing is replaced yet)."""
        network = self.network
        if swap_norm is False or swap_norm is None:
            return []
        if swap_norm is True:
            names = [n for n, m in network.named_modules() if _norm_dims(m)]
            if not names:
                raise ValueError(f"swap_norm=True but {type(network).__name__} has no BatchNorm/InstanceNorm layer.")
        elif isinstance(swap_norm, str):
            raise TypeError(f"swap_norm must be True, False or a list of module names, got the string {swap_norm!r}.")
        else:
            names = list(swap_norm)
        modules = dict(network.named_modules())
        for name in names:
            if name not in modules:
                raise ValueError(
                    f"swap_norm: {name!r} is not a module of {type(network).__name__}.{_suggest(name, modules)}"
                )
            if not _norm_dims(modules[name]):
                raise TypeError(
                    f"swap_norm: {name!r} is a {type(modules[name]).__name__}; only BatchNorm1d/2d/3d and "
                    "InstanceNorm1d/2d/3d layers can be swapped."
                )
        return names

    def _swap_norms(self, names: list[str], norm_kwargs: dict) -> list[str]:
        network = self.network
        modules = dict(network.named_modules())
        for name in names:
            old = modules[name]
            new = ClusterScaleBias(old.num_features, self.n_clusters, spatial_dims=_norm_dims(old), **norm_kwargs)
            if old.affine and new.norm.affine:
                with torch.no_grad():
                    new.norm.weight.copy_(old.weight)
                    new.norm.bias.copy_(old.bias)
            reference = next(old.parameters(), None)
            if reference is not None:
                new.to(device=reference.device, dtype=reference.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(network.get_submodule(parent_name) if parent_name else network, child, new)
        return names

    def _check_taps(self, taps: list[str]) -> list[str]:
        modules = dict(self.network.named_modules())
        for tap in taps:
            name = tap[: -len(INPUT_SUFFIX)] if tap.endswith(INPUT_SUFFIX) else tap
            if name not in modules or name == "":
                raise ValueError(
                    f"tap layer {tap!r} is not a module of {type(self.network).__name__}.{_suggest(name, modules)}"
                )
            if tap == self.head_name:
                raise ValueError(
                    f"tap layer {tap!r} is the head, whose output holds the random effects; tap "
                    f"{self.head_name + INPUT_SUFFIX!r} (its fixed-effects input) instead."
                )
        if len(set(taps)) != len(taps):
            raise ValueError(f"tap_layers lists a layer twice: {taps}.")
        return taps

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def feature_widths(self) -> list[int]:
        """Channel width of each tapped feature, in ``tapped_layers`` order (measured by the construction dry run)."""
        return list(self._feature_widths)

    @property
    def feature_channels(self) -> int:
        """Total width of the pooled tapped features: ``ClusterAdversary(net.feature_channels, n_clusters)``."""
        return int(sum(self.feature_widths))

    @property
    def cluster_norms(self) -> list[str]:
        """Names of every :class:`ClusterScaleBias` in the network (swapped or built in) that gets the cluster."""
        return list(self._norm_names)

    def kl_divergence(self) -> torch.Tensor:
        """Sum of the KL divergences of every random-effects layer (head and cluster norms)."""
        return total_kl_divergence(self)

    def posterior_means(self) -> dict[str, torch.Tensor]:
        """Posterior means ``(n_clusters, units)`` by group: ``slope``, ``intercept``, ``<norm>.scale``, ``<norm>.bias``."""
        means: dict[str, torch.Tensor] = {}
        if self.random_slope is not None:
            means["slope"] = self.random_slope.loc.detach()
        if self.random_intercept is not None:
            means["intercept"] = self.random_intercept.loc.detach()
        for name in self._norm_names:
            for key, value in self.network.get_submodule(name).posterior_means().items():
                means[f"{name}.{key}"] = value
        return means

    def report(self) -> str:
        """A human-readable summary: head, random effects, tapped layers with widths, swapped / cluster norms."""
        widths = self.feature_widths
        lines = [
            f"ARMED wrapper of {type(self.network).__name__}, {self.n_clusters} clusters",
            f"head: {self.head_name} (Linear {self.in_features} -> {self.out_channels})",
            f"  random scale (1 + u_s) on its {self.in_features} input features: "
            + ("yes" if self.random_slope is not None else "no"),
            f"  random intercept on its {self.out_channels} logits: "
            + ("yes" if self.random_intercept is not None else "no"),
            f"tapped layers for the adversary ({len(self.tapped_layers)}, {sum(widths)} channels):",
        ]
        lines += [f"  {name}: {width}" for name, width in zip(self.tapped_layers, widths)]
        lines.append(f"swapped norms -> ClusterScaleBias ({len(self.swapped_norms)}):")
        lines += [f"  {name}" for name in self.swapped_norms]
        built_in = [n for n in self._norm_names if n not in set(self.swapped_norms)]
        if built_in:
            lines.append(f"built-in ClusterScaleBias layers ({len(built_in)}): {', '.join(built_in)}")
        lines.append(
            "forward_armed: doubled batch [x; x] (cluster norms present)"
            if self._norm_names
            else "forward_armed: one backbone pass, head run on [h * (1 + u_s); h]"
        )
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> torch.Tensor:
        if cluster is None:
            return self.network(x)
        self._check_cluster(cluster, x)
        with self._hooked(_PassState(cluster, split_head=False)):
            return self.network(x)

    def forward_armed(self, x: torch.Tensor, cluster: torch.Tensor | None) -> ARMEDOutput:
        """Mixed- and fixed-effects logits, the adversary's fixed-effects features and the KL, from one pass.

        ``cluster=None`` treats every sample as unseen (``pred`` equals ``pred_fe``).
        """
        if cluster is None:
            cluster = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self._check_cluster(cluster, x)
        batch = x.shape[0]
        if self._norm_names:
            unseen = torch.zeros_like(cluster) if cluster.is_floating_point() else torch.full_like(cluster, -1)
            state = _PassState(torch.cat([cluster, unseen]), split_head=False, captured={})
            with self._hooked(state):
                out = self.network(torch.cat([x, x]))
            self._check_output(out, None)
            pred, pred_fe = out[:batch], out[batch:]
            features = [f[batch:] for f in self._collect(state)]
        else:
            state = _PassState(cluster, split_head=True, captured={})
            with self._hooked(state):
                out = self.network(x)
            self._check_output(out, state)
            pred, pred_fe = out, state.pred_fe
            features = self._collect(state)
        return ARMEDOutput(pred, pred_fe, features, self.kl_divergence())

    # ------------------------------------------------------------------------------------------------------ hooks
    @contextmanager
    def _hooked(self, state: _PassState) -> Iterator[_PassState]:
        """Install the pass's hooks and cluster context; always removes / clears them afterwards."""
        handles: list[Any] = []
        norms = [self.network.get_submodule(name) for name in self._norm_names]
        try:
            if state.captured is not None:
                for tap in self.tapped_layers:
                    handles.append(self._tap_hook(tap, state))
            if state.cluster is not None:
                head = self.network.get_submodule(self.head_name)
                handles.append(head.register_forward_pre_hook(lambda m, args: self._head_pre(state, args)))
                handles.append(head.register_forward_hook(lambda m, args, out: self._head_post(state, out)))
            for norm in norms:
                norm.set_cluster(state.cluster)
            yield state
        finally:
            for handle in handles:
                handle.remove()
            for norm in norms:
                norm.set_cluster(None)

    def _tap_hook(self, tap: str, state: _PassState) -> Any:
        captured = state.captured
        assert captured is not None
        if tap.endswith(INPUT_SUFFIX):
            module = self.network.get_submodule(tap[: -len(INPUT_SUFFIX)])

            def read_input(m: nn.Module, args: tuple) -> None:
                if not args or not isinstance(args[0], torch.Tensor):
                    raise _TapOutputError(
                    f"tap layer {tap!r} was not called with a tensor as its first positional input."
                )
                captured[tap] = args[0]

            return module.register_forward_pre_hook(read_input)

        def read_output(m: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                raise _TapOutputError(
                    f"tap layer {tap!r} returned a {type(out).__name__}; a tapped layer must return a tensor."
                )
            captured[tap] = out

        return self.network.get_submodule(tap).register_forward_hook(read_output)

    def _head_pre(self, state: _PassState, args: tuple) -> tuple:
        h, cluster = args[0], state.cluster
        assert cluster is not None
        if h.shape[0] != cluster.shape[0]:
            raise ValueError(
                f"the head {self.head_name!r} got input {shape_str(h)} but the cluster has {cluster.shape[0]} rows; "
                "ARMED needs one head row per sample."
            )
        if self.random_slope is None:
            return args
        h_me = h * (1.0 + _broadcast(self.random_slope(cluster), h))
        return ((torch.cat([h_me, h]) if state.split_head else h_me),) + tuple(args[1:])

    def _head_post(self, state: _PassState, out: torch.Tensor) -> torch.Tensor:
        cluster = state.cluster
        assert cluster is not None
        me = out
        if state.split_head:
            if self.random_slope is not None:
                batch = cluster.shape[0]
                me, state.pred_fe = out[:batch], out[batch:]
            else:
                state.pred_fe = out
        if self.random_intercept is not None:
            me = me + _broadcast(self.random_intercept(cluster), me)
        if self.cluster_logit is not None:
            membership = cluster if cluster.is_floating_point() else cluster_one_hot(cluster, self.n_clusters, me.dtype)
            me = me + membership @ self.cluster_logit
        state.head_output = me
        return me

    # ----------------------------------------------------------------------------------------------------- checks
    def _check_cluster(self, cluster: Any, x: torch.Tensor) -> None:
        if not isinstance(cluster, torch.Tensor):
            raise TypeError(
                f"cluster must be a tensor (int64 index or float membership), got {type(cluster).__name__}."
            )
        if cluster.is_floating_point():
            if cluster.dim() != 2 or cluster.shape[1] != self.n_clusters:
                raise ValueError(
                    f"soft cluster membership must have shape (batch, {self.n_clusters}), got {shape_str(cluster)}."
                )
        else:
            if cluster.dim() != 1:
                raise ValueError(f"cluster indices must have shape (batch,), got {shape_str(cluster)}.")
            check_cluster_index(cluster, self.n_clusters)
        if cluster.shape[0] != x.shape[0]:
            raise ValueError(f"the cluster has {cluster.shape[0]} rows but the input batch has {x.shape[0]} samples.")

    def _check_output(self, out: Any, state: _PassState | None) -> None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{type(self.network).__name__} returned a {type(out).__name__}; ARMED needs a logits tensor."
            )
        if state is not None and out is not state.head_output:
            raise ValueError(
                f"the output of {type(self.network).__name__} is not the output of the head {self._head_desc}: "
                "ARMED adds the random intercept there and reads the fixed-effects logits there, so the head must be "
                f"the network's last operation. {_HEAD_HINT}"
            )

    def _collect(self, state: _PassState) -> list[torch.Tensor]:
        captured = state.captured
        assert captured is not None
        missing = [tap for tap in self.tapped_layers if tap not in captured]
        if missing:
            raise RuntimeError(
                f"tap layers {missing} were not called during the forward pass of {type(self.network).__name__}."
            )
        return [captured[tap] for tap in self.tapped_layers]

    def _dry_run(self) -> list[int]:
        """Check on one zero input that the network returns its head's output and calls every tapped layer; returns
        the tapped widths. Eval mode without gradients, so running statistics stay; training flags are restored."""
        network, name = self.network, type(self.network).__name__
        shape, source = (self.in_shape, "in_shape") if self.in_shape is not None else _guess_in_shape(network)
        reference = next(itertools.chain(network.parameters(), network.buffers()), None)
        x = torch.zeros(
            (1, *shape),
            device=reference.device if reference is not None else None,
            dtype=reference.dtype if reference is not None and reference.is_floating_point() else None,
        )
        where = f"a dry run of {name} on a zero input {shape_str(x)} ({source})"
        head_outputs: list[Any] = []
        head = network.get_submodule(self.head_name)
        handle = head.register_forward_hook(lambda m, args, out: head_outputs.append(out))
        modes = [(m, m.training) for m in network.modules()]
        state = _PassState(None, split_head=False, captured={})
        network.eval()
        try:
            with torch.no_grad(), self._hooked(state):
                out = network(x)
        except _TapOutputError:
            raise
        except Exception as e:
            raise ValueError(
                f"{where} failed: {type(e).__name__}: {e}. Pass in_shape=(channels, *spatial), the shape of one input "
                "without the batch dimension, that the network accepts."
            ) from e
        finally:
            handle.remove()
            for m, training in modes:
                m.training = training
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"{name} returned {_describe(out)} on {where}; ARMED needs a network that returns one tensor, the "
                f"output of its head {self._head_desc}. {_HEAD_HINT}"
            )
        if not head_outputs:
            raise ValueError(
                f"the head {self._head_desc} was not called during {where}, which returned {_describe(out)}. "
                f"{_HEAD_HINT}"
            )
        if out is not head_outputs[-1]:
            raise ValueError(
                f"the output of {name} is not the output of the head {self._head_desc}: on {where} the head gave "
                f"{_describe(head_outputs[-1])} but {name} returned {_describe(out)}. ARMED adds the random intercept "
                f"to the head's output and reads the fixed-effects prediction there, so the head must be the "
                f"network's last operation. {_HEAD_HINT}"
            )
        missing = [tap for tap in self.tapped_layers if tap not in (state.captured or {})]
        if missing:
            raise ValueError(
                f"tap layers {missing} were not called during {where}; pass tap_layers= with layers that the forward "
                "pass calls (names from net.named_modules())."
            )
        return [_width(f) for f in self._collect(state)]

def _width(feature: torch.Tensor) -> int:
    return int(feature.shape[1]) if feature.dim() > 1 else 1


def _suggest(name: str, modules: dict[str, nn.Module]) -> str:
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    return f" Did you mean {close}?" if close else ""
