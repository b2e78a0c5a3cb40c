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

import functools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
from monai.networks.layers.factories import Norm

from monai_armed.networks.layers.random_effects import RandomEffects
from monai_armed.utils import shape_str

__all__ = ["ClusterScaleBias", "cluster_context", "cluster_norm_modules", "cluster_scale_bias_factory"]


class ClusterScaleBias(nn.Module):
    """Instance normalisation followed by a per-cluster random scale and bias: ``(1 + g(z)) * x_hat + b(z)``.

    The normalisation block of the ARMED autoencoder family (armed_method.md section 1.2): ``x_hat`` is an instance
    norm (per sample and channel over the spatial dimensions, with a learnable per-channel affine), and ``g``, ``b``
    are the ``num_features`` random scales and biases of the sample's cluster, broadcast over space. Both come from
    one :class:`RandomEffects` layer of ``2 * num_features`` units (scales first), so its KL term is found by
    :func:`~monai_armed.networks.utils.total_kl_divergence` and its posterior by ``random_effects_summary``.

    The cluster is not a ``forward`` argument, so the block can sit inside any network whose ``forward(x)`` knows
    nothing of clusters: set it beforehand with :meth:`set_cluster` (or :func:`cluster_context`, or let
    :class:`~monai_armed.networks.nets.ARMED` do it). With no cluster set the block is a plain instance norm (fixed
    effects only). The cluster is an int64 index ``(B,)`` (``-1`` = unseen, zero effect) or a float soft membership
    ``(B, n_clusters)``, as for :class:`RandomEffects`; it is never saved in the state dict.

    MONAI networks that take a ``norm`` argument build it through the ``Norm`` factory entry ``"clusterscalebias"``
    (registered when ``monai_armed`` is imported); ``n_clusters`` and any other argument go in the norm's kwargs,
    ``num_features`` and ``spatial_dims`` are filled in by MONAI::

        DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, norm=("clusterscalebias", {"n_clusters": 5}))
        # in a bundle config: "norm": ["clusterscalebias", {"n_clusters": 5}]

    Args:
        num_features: number of channels ``F``.
        n_clusters: number of seen clusters.
        spatial_dims: number of spatial dimensions of the input ``(B, F, *spatial)``.
        eps: instance-norm epsilon (1e-3, the TensorFlow-Addons default of the reference).
        post_loc_init_scale: the posterior means of ``g`` and ``b`` start as ``N(0, post_loc_init_scale^2)``.
        prior_scale: s.d. of the zero-mean Gaussian prior of ``g`` and ``b``.
        affine: learnable per-channel affine of the instance norm (the fixed-effects scale and shift).
        re_kwargs: further :class:`RandomEffects` arguments; by default the posterior scales start in
            ``[0.01, 0.015]`` as the reference block intends (``post_scale_init_min=0.01``,
            ``post_scale_init_range=0.005``).

    Example::

        norm = ClusterScaleBias(num_features=16, n_clusters=4, spatial_dims=2)
        norm.set_cluster(torch.tensor([0, 3, -1]))
        y = norm(torch.randn(3, 16, 8, 8))      # per-cluster scale and bias; the last row is a plain instance norm
        norm.set_cluster(None)
    """

    __annotations__ = {"_cluster": Optional[torch.Tensor]}  # a real type (not a string), which TorchScript can read

    def __init__(
        self,
        num_features: int,
        n_clusters: int,
        spatial_dims: int = 2,
        eps: float = 1e-3,
        post_loc_init_scale: float = 0.1,
        prior_scale: float = 0.25,
        affine: bool = True,
        re_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}.")
        self.num_features, self.n_clusters, self.spatial_dims = num_features, n_clusters, spatial_dims
        self.norm = Norm[Norm.INSTANCE, spatial_dims](num_features, eps=eps, affine=affine)
        re_args = {"post_scale_init_min": 0.01, "post_scale_init_range": 0.005, **(re_kwargs or {})}
        self.random_effects = RandomEffects(
            n_clusters, 2 * num_features, prior_scale=prior_scale, post_loc_init_scale=post_loc_init_scale, **re_args
        )
        self._cluster = None

    @property
    def cluster(self) -> torch.Tensor | None:
        """The cluster context the next ``forward`` uses (``None``: fixed effects only)."""
        return self._cluster

    def set_cluster(self, cluster: torch.Tensor | None) -> None:
        """Set the clusters of the next batches: index ``(B,)``, soft membership ``(B, n_clusters)`` or ``None``."""
        self._cluster = cluster

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"ClusterScaleBias expected input (batch, {self.num_features}, <{self.spatial_dims} spatial dims>), "
                f"got {shape_str(x)}."
            )
        spatial = 1
        for size in x.shape[2:]:
            spatial *= size
        if spatial < 2:
            raise ValueError(
                f"ClusterScaleBias normalises each channel over its spatial elements and needs more than one, got "
                f"{shape_str(x)}; use a larger input or normalise earlier in the network."
            )
        x_hat = self.norm(x)
        cluster = self._cluster
        if cluster is None:
            return x_hat
        if cluster.shape[0] != x.shape[0]:
            raise ValueError(
                f"ClusterScaleBias: the cluster context has {cluster.shape[0]} rows but the input batch has "
                f"{x.shape[0]}; set_cluster() must be given one cluster per sample of the batch."
            )
        effects = self.random_effects(cluster).to(x_hat.dtype)
        shape = [x.shape[0], 2 * self.num_features] + [1] * self.spatial_dims
        effects = effects.reshape(shape)
        scale, bias = effects[:, : self.num_features], effects[:, self.num_features :]
        return x_hat * (1.0 + scale) + bias

    def kl_divergence(self) -> torch.Tensor:
        """KL divergence of the random scales and biases (summed)."""
        return self.random_effects.kl_divergence()

    def posterior_means(self) -> dict[str, torch.Tensor]:
        """Posterior means ``{"scale": (n_clusters, F), "bias": (n_clusters, F)}`` (detached)."""
        loc = self.random_effects.loc.detach()
        return {"scale": loc[:, : self.num_features], "bias": loc[:, self.num_features :]}

    def extra_repr(self) -> str:
        return f"num_features={self.num_features}, n_clusters={self.n_clusters}, spatial_dims={self.spatial_dims}"


def cluster_norm_modules(network: nn.Module) -> dict[str, ClusterScaleBias]:
    """The :class:`ClusterScaleBias` submodules of ``network`` by qualified name.

    Example::

        cluster_norm_modules(DenseNet121(2, 1, 2, norm=("clusterscalebias", {"n_clusters": 3})))   # 121 entries
    """
    return {name: m for name, m in network.named_modules() if isinstance(m, ClusterScaleBias)}


@contextmanager
def cluster_context(
    modules: nn.Module | Iterable[ClusterScaleBias], cluster: torch.Tensor | None
) -> Iterator[list[ClusterScaleBias]]:
    """Set ``cluster`` on every :class:`ClusterScaleBias` of a network (or of a list) for the block, then clear it.

    The context is cleared (set to ``None``) when the block ends, also when it raises, so a failed call never leaves
    a stale cluster behind for the next batch.

    Example::

        net = DenseNet121(2, 1, 2, norm=("clusterscalebias", {"n_clusters": 3}))
        with cluster_context(net, cluster):
            logits = net(x)                    # mixed effects
        logits_fe = net(x)                     # fixed effects
    """
    norms = list(cluster_norm_modules(modules).values()) if isinstance(modules, nn.Module) else list(modules)
    try:
        for m in norms:
            m.set_cluster(cluster)
        yield norms
    finally:
        for m in norms:
            m.set_cluster(None)


def cluster_scale_bias_factory(dim: int) -> functools.partial:
    """``Norm`` factory of ``"clusterscalebias"``: :class:`ClusterScaleBias` with ``spatial_dims=dim``.

    Example::

        from monai.networks.layers import Norm
        layer = Norm["clusterscalebias", 3](num_features=8, n_clusters=4)
    """
    return functools.partial(ClusterScaleBias, spatial_dims=dim)


if "CLUSTERSCALEBIAS" not in Norm.names:  # a module reload must not register it twice
    Norm.add_factory_callable("clusterscalebias", cluster_scale_bias_factory, desc="ClusterScaleBias (monai_armed)")
