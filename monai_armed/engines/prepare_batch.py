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
from typing import Any

import torch
from monai.engines import PrepareBatch
from monai.utils import CommonKeys

from monai_armed.utils import batch_checks_enabled

__all__ = ["PrepareBatchCluster", "PrepareBatchClusterTarget", "prepare_cluster_batch"]


class PrepareBatchCluster(PrepareBatch):
    """Moves a dictionary batch to the device and returns ``(inputs, targets, (), {"cluster": cluster})``.

    With several grouping factors (``cluster_key=["site", "subject"]``) ``cluster`` is the mapping
    ``{key: tensor}`` that networks such as :class:`~monai_armed.networks.MixedModelNet` take; a single key gives the
    tensor itself.

    ARMED engines and MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` pass the keyword arguments on to the
    network, so ``network(inputs, cluster=cluster)`` sees the cluster. Missing keys raise a ``KeyError`` that names the
    key and the keys present; non-finite inputs raise a ``ValueError``; raw cluster ids (strings, not mapped by
    ``ClusterIndexd``) a ``TypeError`` that says so.

    Args:
        image_key: key of the network input (``"image"``; tabular datalists use ``"features"``).
        label_key: key of the target; a batch without it gives ``targets=None`` (inference); ``None`` never reads one
            (inference on a datalist whose ``label`` is something else, e.g. the path of a mask).
        cluster_key: key of the cluster index (int64, ``-1`` = unseen) or soft membership, or a sequence of keys, one
            per grouping factor.
        require_cluster: raise when a cluster key is missing (training); otherwise pass ``cluster=None`` (fixed
            effects). With several keys, a batch that has some of them gets ``-1`` (unseen: a zero random effect) for
            each missing factor, and ``None`` only when it has none.
        check_finite: reject inputs containing NaN or infinity.

    Example::

        prepare = PrepareBatchCluster(image_key="features")
        x, y, _, kwargs = prepare({"features": x, "label": y, "cluster": z}, torch.device("cpu"))
        prepare = PrepareBatchCluster(image_key="features", cluster_key=["site", "subject"])
        _, _, _, kwargs = prepare(batch)          # kwargs["cluster"] == {"site": (B,), "subject": (B,)}
    """

    def __init__(
        self,
        image_key: str = CommonKeys.IMAGE,
        label_key: str | None = CommonKeys.LABEL,
        cluster_key: str | Sequence[str] = "cluster",
        require_cluster: bool = True,
        check_finite: bool = True,
    ) -> None:
        if not isinstance(cluster_key, str):
            cluster_key = tuple(cluster_key)
            if not cluster_key or len(set(cluster_key)) != len(cluster_key):
                raise ValueError(f"cluster_key must be one key or distinct keys, got {list(cluster_key)}.")
        self.image_key, self.label_key, self.cluster_key = image_key, label_key, cluster_key
        self.require_cluster, self.check_finite = require_cluster, check_finite

    @property
    def cluster_keys(self) -> tuple[str, ...]:
        """The cluster key(s) as a tuple (one per grouping factor)."""
        return (self.cluster_key,) if isinstance(self.cluster_key, str) else self.cluster_key

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict]:
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"expected a dictionary batch, got {type(batchdata).__name__}.")
        if self.image_key not in batchdata:
            raise KeyError(f"batch has no input key {self.image_key!r}; keys present: {sorted(batchdata)}.")
        inputs = torch.as_tensor(batchdata[self.image_key]).to(device=device, non_blocking=non_blocking, **kwargs)
        checked = self.check_finite and inputs.is_floating_point() and batch_checks_enabled()
        if checked and not bool(torch.isfinite(inputs).all()):
            raise ValueError(f"batch key {self.image_key!r} contains NaN or infinite values.")
        targets = batchdata.get(self.label_key) if self.label_key is not None else None
        if targets is not None:
            targets = torch.as_tensor(targets).to(device=device, non_blocking=non_blocking, **kwargs)
        clusters = {}
        for key in self.cluster_keys:
            cluster = batchdata.get(key)
            if cluster is None:
                if self.require_cluster:
                    raise KeyError(
                        f"batch has no cluster key {key!r}; keys present: {sorted(batchdata)}. "
                        "Map raw cluster ids with ClusterIndexd first."
                    )
            else:
                clusters[key] = _cluster_tensor(cluster, key).to(device=device, non_blocking=non_blocking)
        if isinstance(self.cluster_key, str):
            return inputs, targets, (), {"cluster": clusters.get(self.cluster_key)}
        if clusters:  # an absent factor of a batch that has others: unseen for that factor only
            for key in self.cluster_keys:
                if key not in clusters:
                    clusters[key] = torch.full((inputs.shape[0],), -1, dtype=torch.int64, device=inputs.device)
            clusters = {key: clusters[key] for key in self.cluster_keys}
        return inputs, targets, (), {"cluster": clusters or None}


def _cluster_tensor(cluster: Any, key: str) -> torch.Tensor:
    """The batch's cluster indices or memberships as a tensor; raw ids (text) get an error that says how to map them."""
    if isinstance(cluster, torch.Tensor):
        return cluster
    values = list(cluster) if isinstance(cluster, (list, tuple)) else [cluster]
    if any(isinstance(v, str) or v is None for v in values):
        raise TypeError(
            f"batch key {key!r} holds raw cluster ids or missing values ({values[:4]!r}...); expected int64 indices "
            "(-1 = unseen). Map the ids with ClusterIndexd(keys=..., vocabulary=...), with missing_as_unseen=True "
            "where some items have no cluster."
        )
    return torch.as_tensor(cluster)


class PrepareBatchClusterTarget(PrepareBatchCluster):
    """Returns ``(inputs, cluster)``: the cluster index as the target, to train a :class:`ZPredictor`.

    With several cluster keys the target is the index of ``target_key`` (default the first key): a Z-predictor infers
    one grouping factor.

    Args:
        target_key: with several ``cluster_key``, the one whose index is the target.
        kwargs: :class:`PrepareBatchCluster` arguments.

    Example::

        trainer = SupervisedTrainer(..., network=ZPredictor(2, 10), loss_function=torch.nn.CrossEntropyLoss(),
                                    prepare_batch=PrepareBatchClusterTarget(image_key="features"))
        prepare = PrepareBatchClusterTarget(image_key="features", cluster_key=["site", "subject"], target_key="site")
    """

    def __init__(self, *args: Any, target_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if target_key is not None and target_key not in self.cluster_keys:
            raise ValueError(f"target_key {target_key!r} is not one of the cluster keys {list(self.cluster_keys)}.")
        self.target_key = target_key if target_key is not None else self.cluster_keys[0]

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batchdata, Mapping) and batchdata.get(self.target_key) is None:
            raise KeyError(f"batch has no cluster key {self.target_key!r} to train a Z-predictor on.")
        inputs, _, _, extra = super().__call__(batchdata, device, non_blocking, **kwargs)
        cluster = extra["cluster"]
        if isinstance(cluster, Mapping):
            cluster = cluster[self.target_key]
        if bool((cluster < 0).any()):
            raise ValueError("a Z-predictor is trained on seen clusters only; the batch has unseen (-1) clusters.")
        return inputs, cluster


def prepare_cluster_batch(engine: Any, batchdata: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run an engine's ``prepare_batch`` and return ``(inputs, targets, cluster)`` (``cluster`` from its kwargs).

    The ARMED engines call the network with the inputs and the cluster alone, so other network arguments (MONAI's
    ``prepare_batch`` may return positional ``args`` and further keywords) are refused rather than dropped.

    Example::

        inputs, targets, cluster = prepare_cluster_batch(engine, batchdata)   # inside an engine's _iteration
    """
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
    inputs, targets, args, kwargs = batch if len(batch) == 4 else (*batch, (), {})
    extra = sorted(set(kwargs) - {"cluster"})
    if args or extra:
        raise ValueError(
            f"prepare_batch ({type(engine.prepare_batch).__name__}) returned network arguments besides the cluster "
            f"({len(args)} positional, keywords {extra}); the ARMED engines call the network with the inputs and the "
            "cluster only, so they would be dropped: return (inputs, targets, (), {'cluster': cluster})."
        )
    return inputs, targets, kwargs.get("cluster")
