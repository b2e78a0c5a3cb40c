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
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from monai.networks.nets import DynUNet

from monai_armed.networks.blocks.cluster_norm import ClusterScaleBias, cluster_norm_modules
from monai_armed.networks.layers.random_effects import RandomEffects, check_cluster_index
from monai_armed.networks.layers.scaled_conv import can_fold_input_scale, conv_with_scaled_copy
from monai_armed.networks.nets.armed_probe import (
    HEAD_TYPES,
    INPUT_SUFFIX,
    default_tap_layers,
    describe_output,
    evaluation_pass,
    guess_in_shape,
    is_token_layer,
    layer_call_order,
    layers_after,
    locate_head,
    probe_input,
)
from monai_armed.networks.utils import ARMEDOutput, cluster_one_hot, random_effects_modules, total_kl_divergence
from monai_armed.utils import batch_checks_enabled, shape_str

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

_SWAPPABLE_NORMS: dict[type, int] = {
    nn.BatchNorm1d: 1,
    nn.BatchNorm2d: 2,
    nn.BatchNorm3d: 3,
    nn.InstanceNorm1d: 1,
    nn.InstanceNorm2d: 2,
    nn.InstanceNorm3d: 3,
}
#: the end of every refusal of a network whose output layer ARMED cannot use
_HEAD_HINT = (
    "Pass the output layer as head=, e.g. ARMED(net, n_clusters, head=\"fc\"), with a name from net.named_modules(): "
    "an nn.Linear or a convolution, the last layer with parameters that the forward pass calls; only operations "
    "without parameters (an activation, a reshape, a tuple of outputs) may follow it, row by row."
)


class _TapOutputError(TypeError):
    """A tapped layer returned something other than a tensor (raised from a hook, so not a dry-run input problem)."""


def _norm_dims(module: nn.Module) -> int:
    for cls, dims in _SWAPPABLE_NORMS.items():
        if isinstance(module, cls):
            return dims
    return 0


@dataclass
class _PassState:
    """What the hooks of one forward pass share."""

    cluster: torch.Tensor | None
    split_head: bool
    captured: dict[str, torch.Tensor] | None = None
    head_input: torch.Tensor | None = None
    #: the head's own forward while ``_split_conv_forward`` stands in for it
    plain_head_forward: Any = None
    head_split_done: bool = False


def _channels_last(effects: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` effects shaped to multiply/add ``(B, ..., K)`` (a linear layer's features)."""
    return effects.to(like.dtype).reshape([effects.shape[0]] + [1] * (like.dim() - 2) + [effects.shape[1]])


def _channels_first(effects: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` effects shaped to multiply/add ``(B, K, *spatial)`` (a convolution's feature maps)."""
    return effects.to(like.dtype).reshape(list(effects.shape) + [1] * (like.dim() - 2))


class ARMED(nn.Module):
    """Turns a MONAI classification, regression or segmentation network into an ARMED mixed-effects network, without
    editing its code.

    ARMED (Nguyen & Montillo, https://arxiv.org/abs/2202.11783, TPAMI 2023) adds per-cluster Bayesian random effects
    to a fixed-effects network and a cluster adversary on its features. This wrapper does it with forward hooks:

    - the **head** (the output layer: an ``nn.Linear`` or a convolution, found by a dry run or given as ``head=``)
      gets a random multiplicative scale on its input features ``h`` and a random intercept on its output, as in the
      paper's mixed-effects CNN (armed_method.md section 2.2)::

          logits_ME = head(h * (1 + u_s(z))) + u_int(z)        logits_FE = head(h)

      with ``u_s`` a :class:`RandomEffects` of one unit per input feature (channel) of the head and ``u_int`` one per
      output. A linear head's features are the last dimension (``(B, C)``, or transformer tokens ``(B, N, C)``); a
      convolution's are the channels of its feature maps, so for **dense prediction** ``u_s`` scales each input
      channel of the segmentation head and ``u_int`` shifts each class's logit map, uniformly over space. In
      :meth:`forward_armed` without cluster norms, a plain torch convolution head (ungrouped, zero-padded, its
      class's own forward) computes the mixed and fixed rows in one grouped convolution, ``u_s`` folded into a
      per-sample kernel and ``u_int`` into its bias
      (:func:`~monai_armed.networks.layers.scaled_conv.conv_with_scaled_copy`);
    - the **tapped layers** (``tap_layers``, default :func:`default_tap_layers` plus the head's input) give the
      fixed-effects activations that the adversary reads: for segmentation networks the encoder levels (skip features
      and bottleneck), which :class:`ClusterAdversary` pools globally; transformer tokens ``(B, N, C)`` (ViT blocks)
      are averaged over the tokens. ``"<module>:input"`` taps a module's input;
    - ``swap_norm`` replaces BatchNorm / InstanceNorm layers (1-3 d, all with ``True`` or those named in a list) by
      :class:`ClusterScaleBias` (instance norm with per-cluster random scale and bias, armed_method.md section 1.2).
      Every ``ClusterScaleBias`` in the network, swapped or built with ``norm="clusterscalebias"``, gets the
      cluster of the batch during each call and is cleared afterwards, also on error. GroupNorm / LayerNorm layers
      are not swapped.

    ``forward(x, cluster=None)`` returns the network's output with mixed-effects predictions for the given clusters
    (int64 index ``(B,)``, ``-1`` = unseen, or soft membership ``(B, n_clusters)``), and with ``cluster=None`` it is
    exactly ``network(x)`` (fixed effects), which ``torch.jit.trace`` can export (the export path is trace-based, not
    ``torch.jit.script``, because the random effects live in Python hooks). A network that returns a tuple or list
    (ViT: ``(logits, hidden_states)``) keeps returning one; :meth:`prediction` picks the prediction from it.
    :meth:`forward_armed` returns ``ARMEDOutput(pred, pred_fe, features, kl)`` for
    :class:`~monai_armed.engines.ARMEDTrainer` from one pass of the backbone: without cluster norms the head (and any
    parameter-free operation after it) gives the rows ``[head(h * (1 + u_s)) + u_int; head(h)]`` (a plain
    convolution head in one grouped convolution, so forward hooks on the head see both; any other head in a second
    call); with cluster norms the batch is doubled
    (``[x; x]`` with clusters ``[z; unseen]``), which costs a second forward's compute in the same call.

    The head is never picked silently. At construction a **dry run** on a zero batch of ``in_shape`` records the
    order in which layers with parameters are called; the head is the last ``nn.Linear`` or convolution called (for
    UNETR and SwinUNETR the output convolution, not an attention projection). Only parameter-free operations may follow
    it (an activation, a reshape, a tuple of outputs: MONAI's ``Classifier``, ``Regressor``, ViT), and they must work
    row by row: a second pass runs the head on a doubled batch and checks that the prediction doubles too (its number
    of rows: an operation that mixes rows, such as subtracting the batch mean, is not detected and is yours to avoid,
    since ``forward_armed`` stacks the mixed and fixed rows in one batch). A layer
    with parameters after the head (HighResNet's last BatchNorm), an output without a tensor, a found head whose output
    is one of several per-sample outputs (a segmentation map and an auxiliary one: which is the prediction is yours to
    say with ``head=``), a DynUNet with deep supervision, or a tapped layer that is not called gives a ``ValueError`` /
    ``TypeError`` naming what was found and how to pass ``head=`` or ``tap_layers=``. The dry run measures
    ``feature_channels`` (the adversary's input width); it runs in eval mode without gradients before any norm is
    swapped, so the network's weights, running statistics and training flags are left as they were (lazy layers are
    initialised by it). Without ``in_shape`` it uses the first convolution's input channels at 64 x 64 in 2-D, 32^3 in
    3-D, 256 in 1-D, or else the first ``nn.Linear``'s ``(in_features,)``; pass ``in_shape`` when the network needs
    another size. A convolutional network then takes inputs with that many spatial dimensions only (a 3-D volume given
    to a 2-D network is an error naming both, with or without a cluster). Tapped modules must return one tensor; if one
    is called more than once per pass the last call counts.

    Regression: a network whose head has one output (``DenseNet121(..., out_channels=1)``, MONAI's ``Regressor``)
    predicts a continuous outcome; train it with :class:`~monai_armed.losses.GaussianLikelihood` as
    ``ARMEDTrainer``'s ``loss_function`` (its residual scale is learned with the network). "Logits" above are then
    the predicted mean: ``u_int`` is a per-cluster offset of the prediction and ``u_s`` a per-cluster scale of the
    features.

    Args:
        network: the fixed-effects classifier, regressor or segmentation network.
        n_clusters: number of seen clusters.
        head: name of the output layer (``nn.Linear`` or convolution; default: found by the dry run).
        tap_layers: module names whose outputs feed the adversary (``"<name>:input"`` for an input); default
            ``default_tap_layers(network) + [head + ":input"]``.
        swap_norm: ``True`` (every BatchNorm / InstanceNorm), a list of module names, or ``False``.
        slope_prior_scale: prior s.d. of the random scales ``u_s``.
        intercept_prior_scale: prior s.d. of the random intercepts.
        post_loc_init_scale: initial spread of the posterior means of ``u_s`` and ``u_int`` (0.1 in the paper).
        random_slope: add the random scale on the head's input (``False`` with ``random_intercept=False`` and no
            cluster norms gives a domain-adversarial network).
        random_intercept: add the random intercept on the head's output.
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
        seg = ARMED(UNet(2, 1, 3, channels=(16, 32, 64), strides=(2, 2)), n_clusters=8, swap_norm=True)
        seg(images, cluster)                     # (B, 3, H, W) logit maps with per-cluster effects
        vit = ARMED(ViT(1, 64, 16, classification=True, num_classes=2, spatial_dims=2), n_clusters=8)
        logits = vit.prediction(vit(x, cluster))  # ViT returns (logits, hidden_states)
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
        if isinstance(network, DynUNet) and network.deep_supervision:
            raise ValueError(
                "DynUNet(deep_supervision=True) returns its deep-supervision maps stacked with the output in training, "
                "where ARMED could not add the random effects to the output alone; build it with "
                "deep_supervision=False."
            )
        self.network, self.n_clusters = network, int(n_clusters)
        self.in_shape = tuple(int(s) for s in in_shape) if in_shape is not None else None
        shape, source = (self.in_shape, "in_shape") if self.in_shape is not None else guess_in_shape(network)
        probe = probe_input(network, shape)
        self._where = f"a dry run of {type(network).__name__} on a zero input {shape_str(probe)} ({source})"
        #: spatial dimensions of the inputs a convolutional network takes (``None``: not checked)
        self.spatial_dims = len(shape) - 1 if len(shape) > 1 else None
        order = self._call_order(probe)
        self.head_name = self._check_head(head, order)
        head_module = self.network.get_submodule(self.head_name)
        self._head_is_linear = isinstance(head_module, nn.Linear)

        swap_names = self._swap_names(swap_norm)
        self._norm_names = list(cluster_norm_modules(network))
        taps = (
            default_tap_layers(network, self.head_name) + [self.head_name + INPUT_SUFFIX]
            if tap_layers is None
            else [str(t) for t in tap_layers]
        )
        self.tapped_layers = self._check_taps(taps)
        modules = dict(network.named_modules())
        self._token_taps = {t for t in self.tapped_layers if t in modules and is_token_layer(modules[t])}
        # before the norms are swapped, so that a refused network is left as it was
        self._output_index, self._split_head, self._feature_widths = self._dry_run(probe)
        if head is None:
            self._check_one_prediction(probe, order)
        if self._head_is_linear:  # lazy layers are set by now
            self.in_features, self.out_channels = head_module.in_features, head_module.out_features
        else:
            self.in_features, self.out_channels = head_module.in_channels, head_module.out_channels

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
        # last, so that a refused argument leaves the user's network as it was
        self.swapped_norms = self._swap_norms(swap_names, norm_kwargs or {})
        self._norm_names = list(cluster_norm_modules(network))
        # kept, so that the KL of every step does not walk the network's modules
        self._random_effect_layers = list(random_effects_modules(self).values())

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
    def _call_order(self, probe: torch.Tensor) -> list[str]:
        """The layers with parameters in the order a dry run calls them (a failing dry run names ``in_shape``)."""
        try:
            order, _ = layer_call_order(self.network, probe)
        except Exception as e:
            raise ValueError(
                f"{self._where} failed: {type(e).__name__}: {e}. Pass in_shape=(channels, *spatial), the shape of one "
                "input without the batch dimension, that the network accepts."
            ) from e
        return order

    def _check_head(self, head: str | None, order: list[str]) -> str:
        """The head's name: ``head`` checked, or the output layer found in the call order; nothing with parameters
        may run after it."""
        network, kind = self.network, type(self.network).__name__
        modules = dict(network.named_modules())
        if head is None:
            name, found = locate_head(network, order), "the last linear or convolution layer called"
        else:
            name, found = head, "given as head="
            if name not in modules or name == "":
                candidates = [n for n, m in modules.items() if isinstance(m, HEAD_TYPES)][-5:]
                raise ValueError(
                    f"head {name!r} is not a module of {kind}.{_suggest(name, modules)} Its last linear / convolution "
                    f"layers are {candidates}."
                )
            if not isinstance(modules[name], HEAD_TYPES):
                raise TypeError(
                    f"head {name!r} must be an nn.Linear or a convolution, got {type(modules[name]).__name__}."
                )
            if name not in order:
                raise ValueError(
                    f"the head {name!r} ({type(modules[name]).__name__}, {found}) was not called during "
                    f"{self._where}. {_HEAD_HINT}"
                )
        self._head_desc = f"{name!r} ({type(modules[name]).__name__}, {found})"
        after = layers_after(network, order, name)
        if after:
            layers = ", ".join(f"{n!r} ({type(modules[n]).__name__})" for n in after[:3])
            raise ValueError(
                f"{kind} calls layers with parameters after its head {self._head_desc} in {self._where}: {layers}. "
                f"ARMED puts the random intercept on the output layer's output, so nothing with parameters may come "
                f"after it. {_HEAD_HINT}"
            )
        return name

    def _swap_names(self, swap_norm: bool | Sequence[str]) -> list[str]:
        """The norm layers that ``swap_norm`` names, checked (nothing is replaced yet)."""
        network = self.network
        if swap_norm is False or swap_norm is None:
            return []
        inside = [f"{n}." for n, m in network.named_modules() if isinstance(m, ClusterScaleBias)]
        if swap_norm is True:  # the instance norm inside a ClusterScaleBias is part of it
            names = [n for n, m in network.named_modules() if _norm_dims(m) and not n.startswith(tuple(inside))]
            if not names:
                outside = " outside its ClusterScaleBias layers" if inside else ""
                raise ValueError(f"swap_norm=True but {type(network).__name__} has no BatchNorm/InstanceNorm layer{outside}.")
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
            if inside and name.startswith(tuple(inside)):
                raise ValueError(f"swap_norm: {name!r} is the norm inside a ClusterScaleBias, which has random effects already.")
            if not _norm_dims(modules[name]):
                raise TypeError(
                    f"swap_norm: {name!r} is a {type(modules[name]).__name__}; only BatchNorm1d/2d/3d and "
                    "InstanceNorm1d/2d/3d layers can be swapped."
                )
        return names

    def _swap_norms(self, names: list[str], norm_kwargs: dict) -> list[str]:
        """Replace the named norms by ``ClusterScaleBias``; every replacement is built before any is installed."""
        network = self.network
        modules = dict(network.named_modules())
        replacements = {}
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
            replacements[name] = new
        for name, new in replacements.items():
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

    def kl_divergence(self, cluster: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of the KL divergences of every random-effects layer (head and cluster norms); with an index batch
        ``cluster``, the batch estimate of the layers built with ``level_counts`` (``re_kwargs``)."""
        return total_kl_divergence(self, cluster, self._random_effect_layers)

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
        head = type(self.network.get_submodule(self.head_name)).__name__
        what = "features" if self._head_is_linear else "channels"
        lines = [
            f"ARMED wrapper of {type(self.network).__name__}, {self.n_clusters} clusters",
            f"head: {self.head_name} ({head} {self.in_features} -> {self.out_channels})",
            f"  random scale (1 + u_s) on its {self.in_features} input {what}: "
            + ("yes" if self.random_slope is not None else "no"),
            f"  random intercept on its {self.out_channels} outputs: "
            + ("yes" if self.random_intercept is not None else "no"),
            *(
                [f"  learned logit offset per cluster (cluster as input, unregularised): {self.out_channels} outputs"]
                if self.cluster_logit is not None
                else []
            ),
            f"tapped layers for the adversary ({len(self.tapped_layers)}, {sum(widths)} channels):",
        ]
        lines += [
            f"  {name}: {width}" + (" (tokens, averaged)" if name in self._token_taps else "")
            for name, width in zip(self.tapped_layers, widths)
        ]
        lines.append(f"swapped norms -> ClusterScaleBias ({len(self.swapped_norms)}):")
        lines += [f"  {name}" for name in self.swapped_norms]
        built_in = [n for n in self._norm_names if n not in set(self.swapped_norms)]
        if built_in:
            lines.append(f"built-in ClusterScaleBias layers ({len(built_in)}): {', '.join(built_in)}")
        if self._norm_names or not self._split_head:
            reason = "cluster norms present" if self._norm_names else "the output does not follow the head row by row"
            lines.append(f"forward_armed: doubled batch [x; x] ({reason})")
        elif not self._has_head_effects:
            lines.append("forward_armed: one plain pass (no cluster effects: mixed = fixed prediction)")
        else:
            mixed = "head(h * (1 + u_s))" if self.random_slope is not None else "head(h)"
            mixed += " + u_int" if self.random_intercept is not None else ""
            mixed += " + offset(z)" if self.cluster_logit is not None else ""
            lines.append(f"forward_armed: one backbone pass, head rows [{mixed}; head(h)]")
        if self._output_index is not None:
            lines.append(f"prediction: item {self._output_index} of the network's output (a tuple / list)")
        return "\n".join(lines)

    # ---------------------------------------------------------------------------------------------------- forward
    def prediction(self, output: Any) -> torch.Tensor:
        """The prediction in the network's output: the output itself, or the item the dry run found in a tuple / list
        (ViT: its logits, not its hidden states).

        Example::

            logits = net.prediction(net(x, cluster))
        """
        return output if self._output_index is None else output[self._output_index]

    def forward(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> Any:
        self._check_input(x)
        if cluster is None:
            return self.network(x)
        self._check_cluster(cluster, x)
        with self._hooked(_PassState(cluster, split_head=False)):
            return self.network(x)

    def forward_armed(self, x: torch.Tensor, cluster: torch.Tensor | None) -> ARMEDOutput:
        """Mixed- and fixed-effects predictions, the adversary's fixed-effects features and the KL, from one pass.

        ``cluster=None`` treats every sample as unseen (``pred`` equals ``pred_fe``).
        """
        kl_cluster = cluster  # no cluster: the exact KL, not the batch estimate of unseen rows (0)
        if cluster is None:
            cluster = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        self._check_input(x)
        self._check_cluster(cluster, x)
        batch = x.shape[0]
        if self._norm_names or not self._split_head:
            unseen = torch.zeros_like(cluster) if cluster.is_floating_point() else torch.full_like(cluster, -1)
            state = _PassState(torch.cat([cluster, unseen]), split_head=False, captured={})
            with self._hooked(state):
                both = self._doubled_prediction(self.network(torch.cat([x, x])), batch)
            features = [f[batch:] for f in self._collect(state)]
            return ARMEDOutput(*both.split([batch, batch]), features, self.kl_divergence(kl_cluster))
        if not self._has_head_effects:
            state = _PassState(None, split_head=False, captured={})
            with self._hooked(state):
                pred = self.prediction(self.network(x))
            return ARMEDOutput(pred, pred, self._collect(state), self.kl_divergence(kl_cluster))
        state = _PassState(cluster, split_head=True, captured={})
        with self._hooked(state):
            both = self._doubled_prediction(self.network(x), batch)
        # a tap at or after the split head saw [mixed; fixed] rows: the adversary reads the fixed-effects ones
        features = [f[batch:] if f.dim() and f.shape[0] == 2 * batch else f for f in self._collect(state)]
        # split, not two slices: its backward joins the halves' gradients in one copy
        return ARMEDOutput(*both.split([batch, batch]), features, self.kl_divergence(kl_cluster))

    @property
    def _has_head_effects(self) -> bool:
        return self.random_slope is not None or self.random_intercept is not None or self.cluster_logit is not None

    # ------------------------------------------------------------------------------------------------------ hooks
    @contextmanager
    def _hooked(self, state: _PassState) -> Iterator[_PassState]:
        """Install the pass's hooks and cluster context; always removes / clears them afterwards."""
        handles: list[Any] = []
        norms = [self.network.get_submodule(name) for name in self._norm_names]
        folded: nn.Module | None = None
        try:
            if state.captured is not None:
                for tap in self.tapped_layers:
                    handles.append(self._tap_hook(tap, state))
            if state.cluster is not None and self._has_head_effects:
                head = self.network.get_submodule(self.head_name)
                handles.append(head.register_forward_pre_hook(lambda m, args: self._head_pre(state, args)))
                handles.append(head.register_forward_hook(lambda m, args, out: self._head_post(state, m, out)))
                if state.split_head and self.random_slope is not None and can_fold_input_scale(head):
                    # the head's own call computes the mixed rows too (one grouped convolution); hooks still run
                    state.plain_head_forward = head.forward
                    head.forward = lambda *args, **kwargs: self._split_conv_forward(state, head, *args, **kwargs)
                    folded = head
            for norm in norms:
                norm.set_cluster(state.cluster)
            yield state
        finally:
            for handle in handles:
                handle.remove()
            if folded is not None:
                del folded.forward
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

    def _broadcast(self, effects: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _channels_last(effects, like) if self._head_is_linear else _channels_first(effects, like)

    def _head_pre(self, state: _PassState, args: tuple) -> tuple | None:
        h, cluster = args[0], state.cluster
        assert cluster is not None
        if h.shape[0] != cluster.shape[0]:
            raise ValueError(
                f"the head {self.head_name!r} got input {shape_str(h)} but the cluster has {cluster.shape[0]} rows; "
                "ARMED needs one head row per sample."
            )
        if state.split_head:  # _head_post adds the mixed-effects rows (unless a folded head computed them)
            state.head_input = h
            return None
        if self.random_slope is None:
            return None
        return (h * (1.0 + self._broadcast(self.random_slope(cluster), h)),) + tuple(args[1:])

    def _head_post(self, state: _PassState, head: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """Adds the intercepts; a split head returns ``[mixed; fixed]``, the mixed rows from a second call of the head
        on ``h * (1 + u_s)`` (cheaper than running it on a doubled input: the head's output is the narrow side). A
        convolution head has computed both in its own call instead (``_split_conv_forward``)."""
        if state.head_split_done:  # a folded convolution head returned [mixed; fixed], intercepts included
            state.head_split_done = False
            return out
        cluster = state.cluster
        assert cluster is not None
        offset = self._head_offset(cluster)
        me = out
        if state.split_head and self.random_slope is not None:
            h = state.head_input
            assert h is not None
            forward = state.plain_head_forward or head.forward
            me = forward(h * (1.0 + self._broadcast(self.random_slope(cluster), h)))
        if offset is not None:
            me = me + self._broadcast(offset, me)
        return torch.cat([me, out]) if state.split_head else me

    def _head_offset(self, cluster: torch.Tensor) -> torch.Tensor | None:
        """What the mixed-effects rows add to the head's output ``(batch, out_channels)``: the random intercept and
        the cluster-input logit; ``None`` for neither."""
        offset = None
        if self.random_intercept is not None:
            offset = self.random_intercept(cluster)
        if self.cluster_logit is not None:
            membership = cluster if cluster.is_floating_point() else cluster_one_hot(cluster, self.n_clusters)
            logit = membership.to(self.cluster_logit.dtype) @ self.cluster_logit
            offset = logit if offset is None else offset + logit
        return offset

    def _split_conv_forward(
        self, state: _PassState, head: nn.Module, h: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The head's forward in a split pass of a convolution head: ``[mixed; fixed]`` rows from one grouped
        convolution, the random scale folded into the kernel and the intercepts into the bias."""
        cluster, forward = state.cluster, state.plain_head_forward
        assert cluster is not None and forward is not None and self.random_slope is not None
        # e.g. a transposed convolution given output_size; an empty batch (no groups): the plain call
        if args or kwargs or not isinstance(h, torch.Tensor) or h.shape[0] == 0:
            return forward(h, *args, **kwargs)
        offset = self._head_offset(cluster)  # drawn before the scale, as in the unfolded pass
        both = conv_with_scaled_copy(head, h, 1.0 + self.random_slope(cluster), offset)
        state.head_split_done = True
        return both

    # ----------------------------------------------------------------------------------------------------- checks
    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ARMED expects an input tensor, got {type(x).__name__}.")
        if self.spatial_dims is not None and x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"{type(self.network).__name__} takes (batch, channels, {self.spatial_dims} spatial dims) inputs (as in "
                f"{self._where}), got {shape_str(x)}: a {max(x.dim() - 2, 0)}-d input for a {self.spatial_dims}-d "
                "network."
            )

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
            if batch_checks_enabled():
                check_cluster_index(cluster, self.n_clusters)
        if cluster.shape[0] != x.shape[0]:
            raise ValueError(f"the cluster has {cluster.shape[0]} rows but the input batch has {x.shape[0]} samples.")

    def _doubled_prediction(self, out: Any, batch: int) -> torch.Tensor:
        """The prediction of a pass whose head (or input) batch was doubled: ``2 * batch`` rows, ME then FE."""
        pred = self.prediction(out)
        if not isinstance(pred, torch.Tensor) or pred.shape[0] != 2 * batch:
            raise ValueError(
                f"{type(self.network).__name__} returned {describe_output(out)} from a doubled batch of {batch} samples; "
                f"ARMED expected a prediction of {2 * batch} rows (the head {self._head_desc} and what follows it must "
                "work row by row)."
            )
        return pred

    def _collect(self, state: _PassState) -> list[torch.Tensor]:
        captured = state.captured
        assert captured is not None
        missing = [tap for tap in self.tapped_layers if tap not in captured]
        if missing:
            raise RuntimeError(
                f"tap layers {missing} were not called during the forward pass of {type(self.network).__name__}."
            )
        return [
            captured[tap].mean(1) if tap in self._token_taps and captured[tap].dim() == 3 else captured[tap]
            for tap in self.tapped_layers
        ]

    def _dry_run(self, probe: torch.Tensor) -> tuple[int | None, bool, list[int]]:
        """Find the prediction in the network's output and measure the tapped widths on the zero ``probe``.

        First the head runs on a doubled batch: if the prediction (the output, or an item of a tuple / list) doubles
        row by row, ``forward_armed`` can split the head. Otherwise (a residual connection around the head, say) the
        prediction is the output item that a perturbation of the head's output changes, and ``forward_armed`` doubles
        the whole batch. Returns the prediction's index in the output (``None``: the output itself), whether the head
        can be split, and the widths. Eval mode without gradients: running statistics and training flags stay."""
        network = self.network
        head = network.get_submodule(self.head_name)
        state = _PassState(None, split_head=False, captured={})
        doubled = head.register_forward_pre_hook(lambda m, args: (torch.cat([args[0], args[0]]),) + tuple(args[1:]))
        try:
            with evaluation_pass(network), self._hooked(state):
                out = network(probe)
            index = _item_with_rows(out, 2 * probe.shape[0])
        except _TapOutputError:
            raise
        except Exception:  # the operations after the head mix its rows with others: no split head
            index = -1
        finally:
            doubled.remove()
        split = index != -1
        if not split:
            state = _PassState(None, split_head=False, captured={})
            index = self._perturbed_item(probe, state)
        missing = [tap for tap in self.tapped_layers if tap not in (state.captured or {})]
        if missing:
            raise ValueError(
                f"tap layers {missing} were not called during {self._where}; pass tap_layers= with layers that the "
                "forward pass calls (names from net.named_modules())."
            )
        return index, split, [_width(f) for f in self._collect(state)]

    def _check_one_prediction(self, probe: torch.Tensor, order: Sequence[str]) -> None:
        """Refuses a found head whose output is one of several per-sample outputs (a segmentation map and an auxiliary
        one, say): which of them is the prediction is the user's to say, with ``head=``."""
        if self._output_index is None:
            return
        with evaluation_pass(self.network):
            out = self.network(probe)
        others = [
            i
            for i, v in enumerate(out)
            if i != self._output_index and isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == probe.shape[0]
        ]
        if others:
            modules = dict(self.network.named_modules())
            candidates = list(dict.fromkeys(n for n in reversed(order) if isinstance(modules[n], HEAD_TYPES)))[:5]
            raise ValueError(
                f"{type(self.network).__name__} returned {describe_output(out)} on {self._where}: items "
                f"{sorted([self._output_index, *others])} each hold a row per sample, so ARMED cannot tell which one is the "
                f"prediction (item {self._output_index} comes from the last linear or convolution layer called, "
                f"{self.head_name!r}). Pass the layer that produces the prediction as head= (one of the last linear / "
                f"convolution layers called: {candidates}; nothing with parameters may run after it), or wrap a "
                "network that returns the prediction alone."
            )

    def _perturbed_item(self, probe: torch.Tensor, state: _PassState) -> int | None:
        """The output item that changes when the head's output is perturbed (``None``: the output tensor itself)."""
        network, name = self.network, type(self.network).__name__
        generator = torch.Generator(device=probe.device).manual_seed(0)

        def perturb(m: nn.Module, args: tuple, out: Any) -> Any:
            noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
            return out + noise

        with evaluation_pass(network), self._hooked(state):
            plain = network(probe)
        handle = network.get_submodule(self.head_name).register_forward_hook(perturb)
        try:
            with evaluation_pass(network):
                shifted = network(probe)
        finally:
            handle.remove()
        if isinstance(plain, Mapping):
            raise ValueError(
                f"{name} returned {describe_output(plain)} on {self._where}; ARMED supports a tensor or a tuple / list "
                f"of outputs, not a mapping. {_HEAD_HINT}"
            )
        pairs = [(None, plain, shifted)] if isinstance(plain, torch.Tensor) else []
        if isinstance(plain, (tuple, list)):
            pairs = [(i, p, q) for i, (p, q) in enumerate(zip(plain, shifted)) if isinstance(p, torch.Tensor)]
        for index, p, q in pairs:
            if p.shape == q.shape and p.dim() and p.shape[0] == probe.shape[0] and not torch.equal(p, q):
                return index
        raise ValueError(
            f"the output of {name} does not come from its head {self._head_desc}: on {self._where} it returned "
            f"{describe_output(plain)}, and no tensor in it changed when the head's output did. {_HEAD_HINT}"
        )


def _item_with_rows(out: Any, rows: int) -> int | None:
    """``None`` if ``out`` is a tensor of ``rows`` rows, the index of the first such item of a tuple / list, else -1."""
    if isinstance(out, torch.Tensor):
        return None if out.dim() and out.shape[0] == rows else -1
    if isinstance(out, (tuple, list)):
        found = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows]
        return found[0] if found else -1
    return -1


def _width(feature: torch.Tensor) -> int:
    return int(feature.shape[1]) if feature.dim() > 1 else 1


def _suggest(name: str, modules: dict[str, nn.Module]) -> str:
    close = difflib.get_close_matches(name, [n for n in modules if n], n=3)
    return f" Did you mean {close}?" if close else ""
