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

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.engines.prepare_batch import PrepareBatchCluster, prepare_cluster_batch
from monai_armed.engines.trainer import ARMEDKeys
from monai_armed.metrics.regression import REGRESSION_METRICS, regression_metrics
from monai_armed.networks.utils import cluster_one_hot

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ARMEDEvaluator", "CLUSTER_MODES", "TASKS", "resolve_cluster"]

#: ``observed``: the sample's own cluster; ``fixed``: no random effects; ``inferred``: soft membership from a
#: Z-predictor; ``randomized``: a random seen cluster per sample (ablation: do the random effects carry information?).
CLUSTER_MODES = ("observed", "fixed", "inferred", "randomized")

#: what an evaluator's predictions are: class logits, or the predicted mean of a continuous outcome
TASKS = ("classification", "regression")


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

    ``task="regression"`` declares that ``pred`` is the predicted mean of a continuous label (the output of a network
    trained with :class:`~monai_armed.losses.GaussianLikelihood`): at the end of every run the evaluator then writes
    ``mse``, ``mae`` and ``r2`` (:func:`~monai_armed.metrics.regression_metrics`, ``nan`` when undefined) of the
    labelled samples to ``engine.state.metrics``, before the ``val_handlers`` run, so ``StatsHandler`` and the
    tracking handlers log them; :class:`~monai_armed.handlers.ClusterModeReport` and
    :class:`~monai_armed.handlers.PerClusterRegression` read ``task`` for their per-cluster tables. The task is given,
    not inferred from the loss: the network's output alone does not tell a one-logit classifier from a regressor.
    Classification (the default) is unchanged: its metrics come from ``key_val_metric``.

    Args:
        device: device of the engine.
        val_data_loader: iterable of dictionary batches (input, optional ``label``, optional ``cluster``).
        network: network called as ``network(inputs, cluster=...)``.
        cluster_mode: one of ``CLUSTER_MODES``.
        z_predictor: optional :class:`ZPredictor`, needed by ``inferred`` and used for unseen clusters in ``observed``.
        n_clusters: number of seen clusters (default: ``network.n_clusters``), needed by ``randomized``.
        seed: seed of the random clusters of ``randomized`` (reset at every run, so runs are reproducible).
        prepare_batch: default ``PrepareBatchCluster(require_cluster=False)``.
        task: ``"classification"`` (default) or ``"regression"`` (``TASKS``).
        kwargs: further ``SupervisedEvaluator`` arguments (``key_val_metric``, ``val_handlers``, ``decollate``, ...).

    Example::

        evaluator = ARMEDEvaluator(device="cpu", val_data_loader=unseen_loader, network=net, z_predictor=zp,
                                   cluster_mode="inferred", key_val_metric={"acc": Accuracy(...)})
        evaluator.run()
        evaluator.cluster_mode = "fixed"
        evaluator.run()

        regression = ARMEDEvaluator(device="cpu", val_data_loader=loader, network=net, task="regression")
        regression.run()
        regression.state.metrics["mse"], regression.state.metrics["r2"]
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
        task: str = "classification",
        **kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        self.task = task
        # set before the parent attaches the val handlers (_register_handlers), which the task metrics must precede
        self._task_metrics_attached = False
        self._regression_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
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
        self._attach_task_metrics()  # when there were no val handlers

    def _register_handlers(self, handlers: Sequence) -> None:
        self._attach_task_metrics()
        super()._register_handlers(handlers)

    def _attach_task_metrics(self) -> None:
        if self._task_metrics_attached:
            return
        self._task_metrics_attached = True
        self.add_event_handler(Events.EPOCH_STARTED, lambda engine: engine._regression_rows.clear())
        self.add_event_handler(Events.EPOCH_COMPLETED, ARMEDEvaluator._write_regression_metrics)

    def _write_regression_metrics(self) -> None:
        """``mse``, ``mae`` and ``r2`` of this run's labelled predictions into ``state.metrics`` (regression)."""
        if self.task != "regression" or not self._regression_rows:
            return
        pred = torch.cat([p for p, _ in self._regression_rows])
        label = torch.cat([y for _, y in self._regression_rows])
        metrics = regression_metrics(pred, label)
        self.state.metrics.update({k: math.nan if metrics[k] is None else metrics[k] for k in REGRESSION_METRICS})

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
        if engine.task == "regression" and targets is not None:
            pred = engine.state.output[Keys.PRED].detach().float().cpu()
            engine._regression_rows.append((pred.reshape(pred.shape[0], -1), targets.detach().float().cpu()))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
