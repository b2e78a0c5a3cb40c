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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.engines.compiled import is_compiled, plain_tensor, with_meta_of
from monai_armed.engines.distributed import gather_shards, is_sharded, unwrap_armed
from monai_armed.engines.prepare_batch import PrepareBatchCluster, prepare_cluster_batch
from monai_armed.engines.trainer import ARMEDKeys
from monai_armed.inferers import cluster_inference
from monai_armed.metrics.regression import REGRESSION_METRICS, regression_metrics
from monai_armed.networks.utils import cluster_one_hot

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["ARMEDEvaluator", "CLUSTER_MODES", "TASKS", "resolve_cluster"]

#: ``observed``: the sample's own cluster; ``fixed``: no random effects; ``inferred``: soft membership from a
#: Z-predictor; ``randomized``: a random seen cluster per sample (ablation: do the random effects carry information?).
CLUSTER_MODES = ("observed", "fixed", "inferred", "randomized")

#: one factor's index / membership tensor, or one per grouping factor by name
ClusterArg = torch.Tensor | Mapping[str, torch.Tensor]

#: what an evaluator's predictions are: class logits, the predicted mean of a continuous outcome, or logit maps
TASKS = ("classification", "regression", "segmentation")


def resolve_cluster(
    mode: str,
    inputs: torch.Tensor,
    cluster: ClusterArg | None,
    n_clusters: int | Mapping[str, int],
    z_predictor: nn.Module | None = None,
    generator: torch.Generator | None = None,
    inferred_factor: str | None = None,
) -> ClusterArg | None:
    """The ``cluster`` argument to give an ARMED network for one batch in one of ``CLUSTER_MODES``.

    In ``observed`` mode, samples of unseen clusters (index ``-1``) fall back to the Z-predictor's soft membership when
    one is given, else to fixed effects (the ``-1`` is passed on, which gives a zero random effect). A batch without
    any cluster falls back the same way.

    Several grouping factors (``cluster`` a mapping ``factor -> index``, or ``n_clusters`` a mapping ``factor ->
    number of levels``): the Z-predictor infers one factor, ``inferred_factor`` (default the first). ``inferred`` gives
    that factor the Z-predictor's membership (zero effect without a Z-predictor) and keeps the others observed;
    ``observed`` gives its unseen rows the membership, while an unseen level of another factor gets a zero effect for
    that factor only; ``randomized`` draws every factor's level among its seen levels (needs ``n_clusters`` as a
    mapping); ``fixed`` is ``None``.

    Example::

        cluster = resolve_cluster("observed", x, torch.tensor([0, -1]), n_clusters=10, z_predictor=zp)
        logits = net(x, cluster)        # row 1 uses the Z-predictor's membership
        cluster = resolve_cluster("inferred", x, {"site": site, "subject": subject}, {"site": 4, "subject": 20},
                                  z_predictor=site_zp, inferred_factor="site")   # subject stays observed
    """
    if mode == "fixed":
        return None
    if isinstance(cluster, Mapping) or (cluster is None and isinstance(n_clusters, Mapping)):
        return _resolve_factors(mode, inputs, cluster, n_clusters, z_predictor, generator, inferred_factor)
    if isinstance(n_clusters, Mapping):  # one index tensor for a one-factor model
        if len(n_clusters) != 1:
            raise ValueError(
                f"cluster is one tensor but the model has the grouping factors {list(n_clusters)}: pass a mapping."
            )
        n_clusters = next(iter(n_clusters.values()))
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


def _resolve_factors(
    mode: str,
    inputs: torch.Tensor,
    cluster: Mapping[str, torch.Tensor] | None,
    n_clusters: int | Mapping[str, int],
    z_predictor: nn.Module | None,
    generator: torch.Generator | None,
    inferred_factor: str | None,
) -> dict[str, torch.Tensor] | None:
    """:func:`resolve_cluster` for several grouping factors (a mapping ``factor -> index``)."""
    levels = dict(n_clusters) if isinstance(n_clusters, Mapping) else None
    batch = inputs.shape[0]
    if mode == "randomized":
        if levels is None:
            raise ValueError(
                "cluster_mode 'randomized' with several grouping factors needs n_clusters as a mapping factor -> "
                f"number of levels, got {n_clusters!r}."
            )
        return {
            f: torch.randint(0, n, (batch,), generator=generator, device="cpu").to(inputs.device)
            for f, n in levels.items()
        }
    factors = list(cluster) if cluster is not None else list(levels)
    factor = inferred_factor if inferred_factor is not None else factors[0]
    if factor not in factors:
        raise KeyError(f"inferred_factor {factor!r} is not a grouping factor of the batch: {factors}.")
    if cluster is None and z_predictor is None:
        return None
    unseen_index = torch.full((batch,), -1, dtype=torch.int64, device=inputs.device)
    resolved = dict(cluster) if cluster is not None else dict.fromkeys(factors, unseen_index)
    index = resolved[factor]
    if mode == "inferred":
        resolved[factor] = z_predictor.membership(inputs) if z_predictor is not None else unseen_index
        return resolved
    if z_predictor is None or index.is_floating_point():
        return resolved
    unseen = index < 0
    if not bool(unseen.any()):
        return resolved
    n = levels[factor] if levels is not None and factor in levels else z_predictor.n_clusters
    soft = cluster_one_hot(index, n, inputs.dtype if inputs.is_floating_point() else torch.float32)
    resolved[factor] = torch.where(unseen.unsqueeze(1), z_predictor.membership(inputs).to(soft.dtype), soft)
    return resolved


@contextmanager
def _eval_mode_only(module: nn.Module | None) -> Iterator[None]:
    """``module`` in eval mode for the block, its mode restored after (gradients untouched, unlike MONAI's
    ``eval_mode``, which also disables them)."""
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train()


def _has_prediction(network: nn.Module) -> bool:
    """Whether the network picks its prediction from a structured output (:meth:`ARMED.prediction`)."""
    return callable(getattr(network, "prediction", None))


def _network_levels(network: nn.Module) -> int | dict[str, int] | None:
    """The number of seen clusters of a network: ``n_clusters``, or per factor for a several-factor model (a
    ``MixedModelNet``: one ``RandomEffects`` per factor in ``random_effects``)."""
    if getattr(network, "n_clusters", None) is not None:
        return network.n_clusters
    layers = getattr(network, "random_effects", None)
    if isinstance(layers, nn.ModuleDict) and all(hasattr(layer, "n_clusters") for layer in layers.values()):
        return {factor: layer.n_clusters for factor, layer in layers.items()}
    return None


class ARMEDEvaluator(SupervisedEvaluator):
    """Evaluates an ARMED network on one dataset in one of four cluster modes (``CLUSTER_MODES``).

    ``cluster_mode`` is an attribute, so one evaluator can be rerun in several modes. ``engine.state.output`` holds
    ``pred`` (logits in that mode), ``label`` and ``cluster`` (the observed index). The number of samples that fell
    back from ``observed`` to inferred / fixed effects because their cluster was unseen is logged at the end of each
    run and kept in ``engine.state.n_unseen``.

    Several grouping factors (a ``prepare_batch`` such as ``PrepareBatchCluster(cluster_key=["site", "subject"])``
    that gives the mapping ``factor -> index``, and a network such as ``MixedModelNet``): the Z-predictor infers one
    factor, ``inferred_factor``, and the others stay observed (see :func:`resolve_cluster`); ``randomized`` draws every
    factor. ``engine.state.n_unseen`` then counts the samples with an unseen level of any factor, and
    ``engine.state.n_unseen_by_factor`` each factor's.

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
        n_clusters: number of seen clusters, or ``{factor: number of levels}`` with several factors (default:
            ``network.n_clusters``, or the levels of each of the network's ``random_effects``), needed by
            ``randomized``.
        seed: seed of the random clusters of ``randomized`` (reset at every run, so runs are reproducible).
        prepare_batch: default ``PrepareBatchCluster(require_cluster=False)``.
        inferred_factor: with several grouping factors, the one the Z-predictor infers (default the first).
        task: ``"classification"`` (default), ``"regression"`` or ``"segmentation"`` (``TASKS``; segmentation
            declares logit maps, which :class:`~monai_armed.handlers.ClusterModeReport` scores by Dice and HD95).
        kwargs: further ``SupervisedEvaluator`` arguments (``key_val_metric``, ``val_handlers``, ``decollate``,
            ``inferer``, ...). An ``inferer`` other than ``SimpleInferer`` (a ``SlidingWindowInferer``) calls the
            network on each sample's windows with that sample's cluster
            (:func:`~monai_armed.inferers.cluster_inference`). A network with a ``prediction`` method (``ARMED``)
            gives ``pred`` from its output (ViT's logits, not its hidden states). With ``compile=True`` (or a
            ``torch.compile(network)``) the network gets the inputs without their ``MetaTensor`` metadata and ``pred``
            the inputs' metadata back, as in MONAI.

    Example::

        evaluator = ARMEDEvaluator(device="cpu", val_data_loader=unseen_loader, network=net, z_predictor=zp,
                                   cluster_mode="inferred", key_val_metric={"acc": Accuracy(...)})
        evaluator.run()
        evaluator.cluster_mode = "fixed"
        evaluator.run()

        evaluator = ARMEDEvaluator(device="cpu", val_data_loader=loader, network=mixed_model_net, z_predictor=site_zp,
                                   prepare_batch=PrepareBatchCluster("features", cluster_key=["site", "subject"],
                                                                     require_cluster=False),
                                   inferred_factor="site", cluster_mode="inferred")

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
        n_clusters: int | Mapping[str, int] | None = None,
        seed: int = 0,
        prepare_batch: Callable | None = None,
        inferred_factor: str | None = None,
        task: str = "classification",
        **kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}.")
        self.task = task
        # set before the parent attaches the val handlers (_register_handlers), which the task metrics must precede
        self._task_metrics_attached = False
        self._regression_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        # before the parent attaches the val handlers, which check their tables against the clusters
        self.z_predictor = z_predictor
        self.n_clusters = n_clusters if n_clusters is not None else _network_levels(unwrap_armed(network))
        if isinstance(self.n_clusters, Mapping):
            self.n_clusters = dict(self.n_clusters)
            if inferred_factor is not None and inferred_factor not in self.n_clusters:
                raise ValueError(
                    f"inferred_factor {inferred_factor!r} is not one of the grouping factors {list(self.n_clusters)}."
                )
            # the network's first factor, whatever the order of the batch's cluster keys
            inferred_factor = inferred_factor if inferred_factor is not None else next(iter(self.n_clusters))
            n_z = getattr(z_predictor, "n_clusters", None)
            if n_z is not None and n_z != self.n_clusters[inferred_factor]:
                raise ValueError(
                    f"the Z-predictor has {n_z} clusters but the factor {inferred_factor!r} it infers has "
                    f"{self.n_clusters[inferred_factor]} levels; name the factor with inferred_factor."
                )
        elif isinstance(self.n_clusters, int) and z_predictor is not None:
            n_z = getattr(z_predictor, "n_clusters", None)
            if n_z is not None and n_z != self.n_clusters:
                raise ValueError(f"the Z-predictor has {n_z} clusters but the network has {self.n_clusters}.")
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            network=network,
            prepare_batch=prepare_batch if prepare_batch is not None else PrepareBatchCluster(require_cluster=False),
            **kwargs,
        )
        self.inferred_factor = inferred_factor
        self.seed = seed
        self.cluster_mode = cluster_mode
        self._generator = torch.Generator()
        self.state.n_unseen = 0
        self.state.n_unseen_by_factor = {}
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
        """``mse``, ``mae`` and ``r2`` of this run's labelled predictions into ``state.metrics`` (regression); with a
        ``DistributedSampler`` over every process's rows (each holds its shard of the validation set, and every process
        runs the evaluator)."""
        if self.task != "regression":
            return
        rows = self._regression_rows
        pred = torch.cat([p for p, _ in rows]) if rows else torch.zeros(0, 1)
        label = torch.cat([y for _, y in rows]) if rows else torch.zeros(0)
        if is_sharded(self.data_loader):  # every rank holds its shard and runs this: gather (a collective call)
            pred, label = (gather_shards(t, self.state.device) for t in (pred, label))
        for key in REGRESSION_METRICS:  # a run without labelled rows leaves no earlier run's values behind
            self.state.metrics.pop(key, None)
        if pred.shape[0] == 0:
            return
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
        self.state.n_unseen_by_factor = {}
        super().run(global_epoch)
        if self.state.n_unseen and self.cluster_mode == "observed":
            fallback = "inferred" if self.z_predictor is not None else "fixed"
            by_factor = self.state.n_unseen_by_factor
            if by_factor:
                z_factor = self.inferred_factor if self.inferred_factor is not None else next(iter(by_factor))
                parts = [f"{f} {n} ({fallback if f == z_factor else 'zero'})" for f, n in by_factor.items() if n]
                self.logger.info("samples with an unseen level, per grouping factor (its effect): " + ", ".join(parts))
            else:
                self.logger.info(
                    f"{self.state.n_unseen} samples of unseen clusters were evaluated with {fallback} effects."
                )

    def _iteration(self, engine: ARMEDEvaluator, batchdata: dict[str, torch.Tensor]) -> dict:
        inputs, targets, observed = prepare_cluster_batch(engine, batchdata)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, ARMEDKeys.CLUSTER: observed}
        autocast = torch.autocast("cuda", **engine.amp_kwargs) if engine.amp else nullcontext()
        with engine.mode(engine.network), _eval_mode_only(engine.z_predictor), autocast:  # both restored afterwards
            if engine.cluster_mode == "observed":
                engine._count_unseen(inputs.shape[0], observed)
            cluster = resolve_cluster(
                engine.cluster_mode,
                inputs,
                observed,
                engine.n_clusters or 0,
                engine.z_predictor,
                engine._generator,
                engine.inferred_factor,
            )
            compiled = engine.compile or is_compiled(engine.network)  # dynamo traces plain tensors, as in MONAI
            out = cluster_inference(engine.inferer, plain_tensor(inputs) if compiled else inputs, engine.network, cluster)
            plain = unwrap_armed(engine.network)  # DataParallel / DDP hold the network's prediction rule inside
            pred = plain.prediction(out) if _has_prediction(plain) else out
            engine.state.output[Keys.PRED] = with_meta_of(pred, inputs) if compiled else pred
        if engine.task == "regression" and targets is not None:
            pred = engine.state.output[Keys.PRED].detach().float().cpu()
            engine._regression_rows.append((pred.reshape(pred.shape[0], -1), targets.detach().float().cpu()))
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def _count_unseen(self, batch: int, observed: ClusterArg | None) -> None:
        several = isinstance(observed, Mapping) or (observed is None and isinstance(self.n_clusters, Mapping))
        if not several:
            self.state.n_unseen += batch if observed is None else int((observed < 0).sum())
            return
        if observed is None:
            self.state.n_unseen += batch
            unseen = dict.fromkeys(self.n_clusters, batch)
        else:
            rows = {f: c < 0 if not c.is_floating_point() else torch.zeros_like(c[:, 0], dtype=torch.bool)
                    for f, c in observed.items()}
            self.state.n_unseen += int(torch.stack(list(rows.values())).any(0).sum())
            unseen = {f: int(r.sum()) for f, r in rows.items()}
        for f, n in unseen.items():
            self.state.n_unseen_by_factor[f] = self.state.n_unseen_by_factor.get(f, 0) + n
