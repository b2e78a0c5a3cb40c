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

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from monai_armed.engines.prepare_batch import PrepareBatchCluster, prepare_cluster_batch
from monai_armed.engines.trainer import ARMEDKeys
from monai_armed.networks.utils import cluster_one_hot

__all__ = ["ARMEDEvaluator", "CLUSTER_MODES", "resolve_cluster"]

#: ``observed``: the sample's own cluster; ``fixed``: no random effects; ``inferred``: soft membership from a
#: Z-predictor; ``randomized``: a random seen cluster per sample (ablation: do the random effects carry information?).
CLUSTER_MODES = ("observed", "fixed", "inferred", "randomized")


def resolve_cluster(
    mode: str,
    inputs: torch.Tensor,
    cluster: torch.Tensor | None,
    n_clusters: int,
    z_predictor: nn.Module | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """The ``cluster`` argument to give an ARMED network for one batch in one of ``CLUSTER_MODES``.

    In ``observed`` mode, samples of unseen clusters (index ``-1``) fall back to the Z-predictor's soft membership when
    one is given, else to fixed effects (the ``-1`` is passed on, which gives a zero random effect). A batch without
    any cluster falls back the same way.

    Example::

        cluster = resolve_cluster("observed", x, torch.tensor([0, -1]), n_clusters=10, z_predictor=zp)
        logits = net(x, cluster)        # row 1 uses the Z-predictor's membership
    """
    if mode == "fixed":
        return None
    if mode == "randomized":
        index = torch.randint(0, n_clusters, (inputs.shape[0],), generator=generator, device="cpu")
        return index.to(inputs.device)
    if mode == "inferred" or cluster is None:
        return z_predictor.membership(inputs) if z_predictor is not None else None
    if z_predictor is None or cluster.is_floating_point():
        return cluster
    unseen = cluster < 0
    if not bool(unseen.any()):
        return cluster
    soft = cluster_one_hot(cluster, n_clusters, inputs.dtype if inputs.is_floating_point() else torch.float32)
    return torch.where(unseen.unsqueeze(1), z_predictor.membership(inputs).to(soft.dtype), soft)


class ARMEDEvaluator(SupervisedEvaluator):
    """Evaluates an ARMED network on one dataset in one of four cluster modes (``CLUSTER_MODES``).

    ``cluster_mode`` is an attribute, so one evaluator can be rerun in several modes. ``engine.state.output`` holds
    ``pred`` (logits in that mode), ``label`` and ``cluster`` (the observed index). The number of samples that fell
    back from ``observed`` to inferred / fixed effects because their cluster was unseen is logged at the end of each
    run and kept in ``engine.state.n_unseen``.

    Args:
        device: device of the engine.
        val_data_loader: iterable of dictionary batches (input, optional ``label``, optional ``cluster``).
        network: network called as ``network(inputs, cluster=...)``.
        cluster_mode: one of ``CLUSTER_MODES``.
        z_predictor: optional :class:`ZPredictor`, needed by ``inferred`` and used for unseen clusters in ``observed``.
        n_clusters: number of seen clusters (default: ``network.n_clusters``), needed by ``randomized``.
        seed: seed of the random clusters of ``randomized`` (reset at every run, so runs are reproducible).
        prepare_batch: default ``PrepareBatchCluster(require_cluster=False)``.
        kwargs: further ``SupervisedEvaluator`` arguments (``key_val_metric``, ``val_handlers``, ``decollate``, ...).

    Example::

        evaluator = ARMEDEvaluator(device="cpu", val_data_loader=unseen_loader, network=net, z_predictor=zp,
                                   cluster_mode="inferred", key_val_metric={"acc": Accuracy(...)})
        evaluator.run()
        evaluator.cluster_mode = "fixed"
        evaluator.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Any,
        network: nn.Module,
        cluster_mode: str = "observed",
        z_predictor: nn.Module | None = None,
        n_clusters: int | None = None,
        seed: int = 0,
        prepare_batch: Callable | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=prepare_batch if prepare_batch is not None else PrepareBatchCluster(require_cluster=False),
            **kwargs,
        )
        self.z_predictor = z_predictor
        self.n_clusters = n_clusters if n_clusters is not None else getattr(network, "n_clusters", None)
        self.seed = seed
        self.cluster_mode = cluster_mode
        self._generator = torch.Generator()
        self.state.n_unseen = 0

    @property
    def cluster_mode(self) -> str:
        return self._cluster_mode

    @cluster_mode.setter
    def cluster_mode(self, mode: str) -> None:
        if mode not in CLUSTER_MODES:
            raise ValueError(f"cluster_mode must be one of {CLUSTER_MODES}, got {mode!r}.")
        if mode == "inferred" and self.z_predictor is None:
            raise ValueError("cluster_mode 'inferred' needs a z_predictor.")
        if mode == "randomized" and not self.n_clusters:
            raise ValueError("cluster_mode 'randomized' needs n_clusters (or a network with an n_clusters attribute).")
        self._cluster_mode = mode

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        self._generator.manual_seed(self.seed)
        self.state.n_unseen = 0
        super().run(global_epoch)
        if self.state.n_unseen and self.cluster_mode == "observed":
            fallback = "inferred" if self.z_predictor is not None else "fixed"
            self.logger.info(
                f"{self.state.n_unseen} samples of unseen clusters were evaluated with {fallback} effects."
            )

    def _iteration(self, engine: ARMEDEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        inputs, targets, observed = prepare_cluster_batch(engine, batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, ARMEDKeys.CLUSTER: observed}
        autocast = torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else nullcontext()
        with engine.mode(engine.network), autocast:
            if engine.z_predictor is not None:
                engine.z_predictor.eval()
            if engine.cluster_mode == "observed":
                engine.state.n_unseen += inputs.shape[0] if observed is None else int((observed < 0).sum())
            cluster = resolve_cluster(
                engine.cluster_mode, inputs, observed, engine.n_clusters or 0, engine.z_predictor, engine._generator
            )
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, cluster=cluster)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
