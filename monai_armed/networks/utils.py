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

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from monai_armed.networks.layers.random_effects import RandomEffects, check_cluster_index
from monai_armed.utils import batch_checks_enabled

__all__ = [
    "ARMEDOutput",
    "random_effects_modules",
    "random_effects_summary",
    "total_kl_divergence",
    "cluster_one_hot",
    "glorot_init",
    "load_network_checkpoint",
]


class ARMEDOutput(NamedTuple):
    """Everything one ARMED training step needs from a network, computed in a single forward pass.

    Attributes:
        pred: mixed-effects prediction (logits), fixed + random effects of the given clusters.
        pred_fe: fixed-effects prediction (logits), as for an unseen cluster.
        features: fixed-effects activations that the cluster adversary reads (before any random effect).
        kl: sum of the KL divergences of all random-effects layers (a scalar tensor; 0 without random effects).

    Example::

        out = net.forward_armed(x, cluster)
        out.pred, out.pred_fe, out.features, out.kl
    """

    pred: torch.Tensor
    pred_fe: torch.Tensor
    features: list[torch.Tensor]
    kl: torch.Tensor


def random_effects_modules(network: nn.Module) -> dict[str, RandomEffects]:
    """The ``RandomEffects`` submodules of ``network`` by qualified name.

    Example::

        random_effects_modules(MixedEffectsMLP(2, 1, n_clusters=5))   # {"random_effects": RandomEffects(...)}
    """
    return {name: m for name, m in network.named_modules() if isinstance(m, RandomEffects)}


def total_kl_divergence(
    network: nn.Module, cluster: torch.Tensor | None = None, layers: Iterable[RandomEffects] | None = None
) -> torch.Tensor:
    """Sum of the KL divergences of every ``RandomEffects`` submodule of ``network``.

    With an index batch ``cluster`` ``(B,)``, a layer that knows its ``level_counts`` (and computes its KL
    analytically) gives the unbiased batch estimate of its KL (:meth:`RandomEffects.kl_divergence`), whose cost follows
    the batch rather than the number of levels; the others give their exact KL (or their Monte-Carlo estimate).

    Args:
        network: the network.
        cluster: the batch's cluster indices, or ``None`` for the exact KL of every layer.
        layers: the network's ``RandomEffects`` layers when the caller keeps them (spares a walk over its modules).

    Example::

        loss = task_loss + 1e-5 * total_kl_divergence(net)
    """
    layers = list(random_effects_modules(network).values()) if layers is None else list(layers)
    batch = isinstance(cluster, torch.Tensor) and not cluster.is_floating_point()
    terms = [m.kl_divergence(cluster if batch and _batch_kl(m) else None) for m in layers]
    if not terms:
        return torch.zeros((), device=next(network.parameters()).device)
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


def _batch_kl(layer: RandomEffects) -> bool:
    return layer.level_counts is not None and layer.kl_estimator == "analytic"


def cluster_one_hot(cluster: torch.Tensor, n_clusters: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Soft-membership form of ``cluster``: index ``(B,)`` -> one-hot ``(B, C)`` with ``-1`` -> a zero row.

    Float input ``(B, C)`` is returned as it is (cast to ``dtype``). Indices are range-checked (an error naming the
    valid range) while batch checks are on: always, except inside a trainer after its first batch without
    ``validate_batches`` (:func:`~monai_armed.utils.batch_checks`).

    Example::

        cluster_one_hot(torch.tensor([1, -1]), 3)   # [[0, 1, 0], [0, 0, 0]]
    """
    if cluster.is_floating_point():
        return cluster.to(dtype)
    check = True
    if not torch.jit.is_scripting():  # TorchScript cannot read the Python-side switch: a scripted network checks
        check = batch_checks_enabled()
    if check:
        check_cluster_index(cluster, n_clusters)
    seen = (cluster >= 0).unsqueeze(1).to(dtype)
    one_hot = torch.zeros(cluster.shape[0], n_clusters, dtype=dtype, device=cluster.device)
    return one_hot.scatter_(1, cluster.clamp(min=0).unsqueeze(1), seen)


def glorot_init(module: nn.Module) -> None:
    """Glorot-uniform weights and zero biases for every ``nn.Linear`` in ``module`` (the Keras defaults of the paper).

    PyTorch's default (Kaiming-uniform with ``a=sqrt(5)`` and random biases) starts the paper's tiny 4-4-4 networks
    much closer to zero, and they then learn the spirals markedly slower in the 10-epoch protocol.

    Example::

        glorot_init(my_mlp)
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def random_effects_summary(
    network: nn.Module,
    cluster_names: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    family: nn.Module | None = None,
) -> dict:
    """Posterior means, scales, prior scales and across-cluster spread of every random-effect group of a network.

    Groups are a network's ``re_groups`` (column ranges of its ``random_effects`` layer, as in ``MixedEffectsMLP``)
    when it has them, else one group per ``RandomEffects`` submodule. Plain Python types only (JSON-ready).

    ``variance_components`` holds the prior (co)variances as lme4's ``VarCorr`` rows (the network's own
    ``variance_components()`` when it has one, e.g. ``MixedModelNet`` by factor, else one group per layer), with the
    residual row of a Gaussian ``family`` last. They are estimates only where the prior scales are learned
    (``learn_prior_scale=True``, as ``MixedModelNet`` does); with a fixed prior (the default of ``MixedEffectsMLP`` and
    the image networks) they repeat the chosen ``prior_scale``, and each group's ``spread`` (the across-cluster s.d.
    of the posterior means) says how much the clusters differ.

    A network of several grouping factors (``MixedModelNet``) has one group per factor, named by the factor, and
    ``cluster_names`` is then a mapping ``factor -> names`` (e.g. a ``ClusterVocabularies``); each group carries its
    own ``"clusters"``, checked against its number of levels.

    Returns:
        ``{"clusters": [names], "groups": {group: {"posterior_mean": C x K, "posterior_scale": C x K,
        "prior_scale": K, "spread": K}}, "variance_components": [{"grp", "var1", "var2", "vcov", "sdcor"}, ...]}``;
        with several factors ``"clusters"`` is ``{factor: [names]}``.

    Example::

        summary = random_effects_summary(net, cluster_names=vocabulary.clusters)
        summary["groups"]["intercept"]["spread"]            # MixedEffectsMLP; "random_intercept" for ARMED
    """
    layers = random_effects_modules(network)
    layer = getattr(network, "random_effects", None)
    if isinstance(layer, RandomEffects) and getattr(network, "re_groups", None):
        groups: dict[str, tuple[RandomEffects, slice]] = {
            name: (layer, slice(a, b)) for name, (a, b) in network.re_groups.items()
        }
    else:
        groups = {(_factor_of(name) or name): (m, slice(None)) for name, m in layers.items()}
    factors = [f for f in (_factor_of(name) for name in layers) if f is not None]
    if factors:
        names = _names_per_factor(cluster_names, {f: groups[f][0].n_clusters for f in factors})
    else:
        if isinstance(cluster_names, Mapping):
            raise ValueError("cluster_names per factor (a mapping) are for a network of several grouping factors.")
        n_clusters = next(iter(layers.values())).n_clusters if layers else int(getattr(network, "n_clusters", 0))
        names = list(cluster_names) if cluster_names is not None else [str(i) for i in range(n_clusters)]
        if layers and len(names) != n_clusters:  # names of another run's vocabulary would label the rows wrongly
            raise ValueError(f"the network has {n_clusters} clusters but {len(names)} cluster_names.")
    summary: dict = {"clusters": names, "groups": {}, "variance_components": _variance_components(network, family)}
    for name, (m, cols) in groups.items():
        with torch.no_grad():
            loc, scale = m.loc[:, cols], m.scale[:, cols]
            prior = m.prior_scale.expand(m.units)[cols]
            spread = m.spread()[cols]
        summary["groups"][name] = {
            **({"clusters": names[name]} if factors else {}),
            "posterior_mean": loc.cpu().tolist(),
            "posterior_scale": scale.cpu().tolist(),
            "prior_scale": prior.cpu().tolist(),
            "spread": spread.cpu().tolist(),
        }
    return summary


def _names_per_factor(cluster_names: object, levels: Mapping[str, int]) -> dict[str, list[str]]:
    """Each factor's level names (its indices when none are given), checked against its number of levels."""
    if cluster_names is not None and not isinstance(cluster_names, Mapping) and not hasattr(cluster_names, "n_levels"):
        raise ValueError(
            f"the network has the grouping factors {list(levels)}: give cluster_names per factor, e.g. a "
            "ClusterVocabularies or {factor: names}."
        )
    names = {}
    for factor, n in levels.items():
        try:
            given = None if cluster_names is None else cluster_names[factor]
        except KeyError:
            given = None
        given = getattr(given, "clusters", given)
        names[factor] = [str(i) for i in range(n)] if given is None else [str(v) for v in given]
        if len(names[factor]) != n:
            raise ValueError(f"grouping factor {factor!r} has {n} levels but {len(names[factor])} cluster_names.")
    return names


def _variance_components(network: nn.Module, family: nn.Module | None) -> list[dict]:
    if callable(getattr(network, "variance_components", None)):
        rows = list(network.variance_components())
    else:
        rows = [row for name, m in random_effects_modules(network).items() for row in m.variance_components(name)]
    residual = family.residual_variance() if callable(getattr(family, "residual_variance", None)) else None
    if residual is not None:
        rows.append({"grp": "Residual", "var1": None, "var2": None, "vcov": residual, "sdcor": residual**0.5})
    return rows


def _factor_of(module_name: str) -> str | None:
    """The grouping factor of a random-effects layer of a network with several (``random_effects.<factor>``), else
    ``None``; FactorModules stores a factor's dots as ``__dot__``."""
    _, found, factor = module_name.rpartition("random_effects.")
    return factor.replace("__dot__", ".") if found and factor and "." not in factor else None


def load_network_checkpoint(
    network: nn.Module,
    path: str,
    n_clusters: int | Mapping[str, int] | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a state dict saved by ``CheckpointSaver`` (``weights_only=True``) into ``network``, checking clusters.

    A checkpoint whose random-effects tables have another number of clusters than ``network`` (or than
    ``n_clusters``, e.g. ``len(vocabulary)``, or a mapping factor -> levels such as ``vocabularies.n_levels`` for a
    network of several grouping factors) raises a ``ValueError`` naming the file, the factor and both numbers, instead of
    ``load_state_dict``'s size-mismatch message; so does a checkpoint of a network built with other settings (missing,
    unexpected or resized entries, the first of each named). ``{"model": state_dict}`` checkpoints are unwrapped.

    Example::

        load_network_checkpoint(net, "models/model.pt", n_clusters=len(vocabulary))
    """
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise ValueError(f"checkpoint {path} could not be read as a PyTorch state dict: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    layers = random_effects_modules(network)
    for name, m in layers.items():
        key, factor = name + ".loc", _factor_of(name)
        if key in state and state[key].shape[0] != m.n_clusters:
            what = f"levels of grouping factor {factor!r}" if factor else "clusters"
            raise ValueError(
                f"checkpoint {path} was trained with {state[key].shape[0]} {what} but the network has "
                f"{m.n_clusters}: use the cluster vocabulary saved with that checkpoint."
            )
    # a network of several grouping factors has one layer per factor; another network's layers share its clusters
    factors = {_factor_of(name) or name: m.n_clusters for name, m in layers.items()}
    if n_clusters is not None and factors:
        if isinstance(n_clusters, Mapping):
            wrong = {f: (factors.get(f), n) for f, n in n_clusters.items() if factors.get(f) != n}
            if wrong:
                raise ValueError(
                    "the network's levels differ from the expected ones: "
                    + "; ".join(f"grouping factor {f!r}: {have} in the network, {n} expected" for f, (have, n) in wrong.items())
                    + "."
                )
        elif sum(_factor_of(name) is not None for name in layers) > 1:
            raise ValueError(f"the network has the grouping factors {list(factors)}: give n_clusters per factor (a mapping).")
        elif next(iter(factors.values())) != n_clusters:
            raise ValueError(f"the network has {next(iter(factors.values()))} clusters but {n_clusters} were expected.")
    own = network.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    resized = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or resized:
        found = "; ".join(
            f"{what}: {items[:3]}{' ...' if len(items) > 3 else ''}"
            for what, items in (("missing", missing), ("unexpected", unexpected), ("other shapes (checkpoint vs network)", resized))
            if items
        )
        raise ValueError(
            f"checkpoint {path} does not fit the network ({found}): it was trained with other network settings. Build "
            "the network with the same settings as the training run (a bundle: the same overrides, e.g. variant, "
            "backbone, spatial_dims, channels)."
        )
    network.load_state_dict(state)
    return network
