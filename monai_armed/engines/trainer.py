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

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from torch.nn.parallel import DistributedDataParallel

from monai_armed.engines.compiled import is_compiled, plain_tensor
from monai_armed.engines.distributed import ARMEDForward, broadcast_buffers
from monai_armed.engines.output import EpochMeans, IterationOutput, iteration_scalars
from monai_armed.engines.players import AdversaryPlayer, Player
from monai_armed.engines.prepare_batch import PrepareBatchCluster, prepare_cluster_batch
from monai_armed.inferers import armed_inference, is_windowed
from monai_armed.losses import LogitClassificationLoss
from monai_armed.losses.families import LikelihoodFamily
from monai_armed.networks.layers.random_effects import RandomEffects
from monai_armed.optimizers import LazyAdam
from monai_armed.utils import batch_checks, batch_checks_enabled

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import EventEnum
else:
    EventEnum, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum", as_type="base"
    )

__all__ = ["ARMEDTrainer", "ARMEDIterationEvents", "ARMEDKeys"]


class ARMEDIterationEvents(EventEnum):
    """Extra events fired by :class:`ARMEDTrainer` (after the standard ``IterationEvents``).

    Example::

        trainer.add_event_handler(ARMEDIterationEvents.ADVERSARY_COMPLETED, lambda e: print(e.state.output["loss_adv"]))
    """

    ADVERSARY_COMPLETED = "adversary_completed"


class ARMEDKeys:
    """Keys that ARMED engines add to ``engine.state.output`` besides MONAI's image / label / pred / loss.

    Example::

        StatsHandler(output_transform=from_engine([ARMEDKeys.LOSS_ME, ARMEDKeys.LOSS_GEN], first=True))
    """

    PRED_FE = "pred_fe"
    CLUSTER = "cluster"
    LOSS_ME = "loss_me"
    LOSS_FE = "loss_fe"
    LOSS_ADV = "loss_adv"
    LOSS_GEN = "loss_gen"
    LOSS_KL = "loss_kl"
    ADV_ACCURACY = "adv_accuracy"


class _PlayerSetting:
    """A trainer attribute that one of its players keeps (``trainer.adv_weight`` is the adversary's ``weight``); kept
    by the trainer while it has no such player, so a handler can set it either way."""

    def __init__(self, player: str, attribute: str, settable: bool = True) -> None:
        self.player, self.attribute, self.settable = player, attribute, settable

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, engine: Any, owner: type | None = None) -> Any:
        if engine is None:
            return self
        player = engine.__dict__.get("players", {}).get(self.player)
        return getattr(player, self.attribute) if player is not None else engine.__dict__.get(f"_{self.name}")

    def __set__(self, engine: Any, value: Any) -> None:
        if not self.settable:  # a network or optimizer given later would not be trained: its player is built once
            raise AttributeError(f"{self.name} is set when the trainer is built.")
        player = engine.__dict__.get("players", {}).get(self.player)
        if player is not None:
            setattr(player, self.attribute, value)
        engine.__dict__[f"_{self.name}"] = value


class ARMEDTrainer(SupervisedTrainer):
    """Ignite trainer for ARMED: a cluster-adversary step, then the main step of the mixed-effects network.

    Each iteration, from one forward pass of ``network.forward_armed(inputs, cluster)``:

    1. adversary step: ``adv_loss_function(adversary(features.detach()), cluster)`` updates the adversary only;
    2. main step on the scalar loss (the adversary is frozen but its updated weights are used)::

        loss = me_weight * task(pred_me) + fe_weight * task(pred_fe) - adv_weight * CE(adversary(features), cluster)
               + kl_weight * sum(KL of the random effects) / n_train

    With a per-sample negative log-likelihood as the task loss (a :class:`~monai_armed.losses.LikelihoodFamily`, or
    the default cross-entropy, which is the Bernoulli / categorical one) this is the per-sample ELBO, so the random
    effects are calibrated to the data and ``kl_weight`` is a plain multiplier (default 1). Before version 0.3 the KL
    was not divided by ``n_train``: an old ``kl_weight`` ``w`` is the new ``w * n_train``.

    ``adversary_update="simultaneous"`` instead trains both in one backward pass through a gradient-reversal layer
    (``adversary(grad_reverse(features, adv_weight))``), which is faster and differs only by the one-step lag.

    Every ARMED trainer runs this one iteration: the main network's forward pass and own loss (``_forward``,
    ``_main_loss``), then the own step of each *player* in :attr:`players` (here the adversary, an
    :class:`~monai_armed.engines.players.AdversaryPlayer`; the autoencoder trainer adds its image classifier), then the
    main step with the players' terms and the players frozen. A player holds its network, optimizer, loss, weight
    and number of steps; the trainer's ``adversary``, ``adv_optimizer``, ``adv_weight``, ``adversary_steps``, ... read
    and set the adversary player's (a handler can schedule ``adv_weight`` as before).

    Every loss part goes into ``engine.state.output`` (detached): ``loss``, ``loss_me``, ``loss_fe``, ``loss_adv``
    (the adversary's own loss), ``loss_gen`` (its loss in the main step), ``loss_kl`` (unweighted KL) and
    ``adv_accuracy`` (a logging-only value: computed when a handler runs inside or at the end of the iteration, and on
    the last iteration of every epoch); ``pred`` holds the mixed-effects and ``pred_fe`` the fixed-effects logits, and
    :attr:`output_scalars` the scalars alone. MONAI's handlers read the loss from the first item of a decollated output:
    with ``decollate=True`` MONAI repeats the scalars in every item; without, the output is an
    :class:`~monai_armed.engines.IterationOutput` (entries by key, ``output[0]`` the scalars). Either way
    ``from_engine(["loss"], first=True)`` (``--tracking mlflow``, the model zoo) gives the scalar loss, and without
    decollation the handlers' default ``lambda x: x[0]`` gives every loss part. With ``epoch_metrics`` the epoch means
    of the parts (``epoch_loss``, ``epoch_loss_me``, ...) and the learning rate (``lr``) go into
    ``engine.state.metrics`` at every epoch end before any handler runs, so the epoch logs of ``StatsHandler``,
    ``TensorBoardStatsHandler`` and ``MLFlowHandler`` record them. All weights are plain attributes, so a handler can
    schedule them. AMP (CUDA only: ``amp=True`` on another device is refused) uses one gradient scaler per backward
    pass: a sequential adversary's own step has its own, the simultaneous one shares the main step's. Gradient
    accumulation applies to both optimizers; with a sequential adversary it is not quite one large batch, since the
    adversary steps once per group and the group's earlier micro-batches play against its previous weights. Save
    ``adversary`` and ``adv_optimizer`` in the ``CheckpointSaver``'s ``save_dict`` beside the network to resume, and
    the ``loss_function`` too when it has parameters (a learned Gaussian scale).

    Distributed data parallel: wrap the network and the adversary with :func:`~monai_armed.engines.armed_ddp` (a plain
    ``DistributedDataParallel(network)`` is refused, because the trainer calls ``forward_armed``, which would bypass
    DDP's gradient synchronisation). The forward pass then runs through DDP and the adversary's own step through its
    DDP wrapper; the sequential main step reads the unwrapped, frozen adversary (nothing of it to reduce), the
    simultaneous one the wrapper. With gradient accumulation the processes synchronise once per optimizer step
    (``no_sync`` in between).
    Give the data loader a ``DistributedSampler``: MONAI's ``Workflow`` calls its ``set_epoch`` at every epoch start
    (for a ``torch.utils.data.DataLoader``). The logged losses are each process's own (local batch) values.

    Args:
        device: device of the engine.
        max_epochs: number of epochs.
        train_data_loader: iterable of dictionary batches with input, ``label`` and ``cluster`` (index, ``-1`` rows
            are left out of the adversary's loss).
        network: a network with ``forward_armed(x, cluster) -> ARMEDOutput`` (e.g. ``MixedEffectsMLP``), or
            ``armed_ddp(network, ...)`` for DDP.
        optimizer: optimizer of the network's parameters (fixed and random effects).
        loss_function: task loss on the network's output (the per-sample negative log-likelihood); default
            :class:`LogitClassificationLoss`. A :class:`~monai_armed.losses.LikelihoodFamily` (e.g. Gaussian for
            regression) gets ``weight`` and ``trials`` from the batch keys ``weight_key`` / ``trials_key``; its own
            parameters (the Gaussian residual scale) join ``optimizer`` when it does not hold them: its only
            parameter group (so a learning-rate scheduler drives them too), else a new group with its defaults. Its
            ``reduction`` is ``"mean"`` or ``"none"`` where there is a KL term (a sum would unbalance the ELBO and is
            refused).
        adversary: cluster classifier over the network's features, or ``None`` (no adversarial term);
            ``armed_ddp(adversary, ...)`` when the network is distributed.
        adv_optimizer: optimizer of the adversary; default ``Adam(lr=1e-3)``.
        adv_loss_function: adversary loss; default cross-entropy that ignores cluster ``-1`` (NaN for a batch of
            unseen rows only, which the weights survive but the logged losses do not; pass
            :func:`~monai_armed.engines.seen_cross_entropy`, 0 there, at the cost of a few more operations per step).
        me_weight: weight of the mixed-effects task loss.
        fe_weight: weight of the fixed-effects task loss.
        adv_weight: weight of the adversarial (generalisation) term, subtracted from the loss.
        kl_weight: multiplier of the ELBO's KL term ``sum(KL) / n_train`` (1: the ELBO).
        n_train: number of training rows ``N``; default ``len(train_data_loader.dataset)``.
        adversary_factor: with several grouping factors (``cluster`` a mapping), the one the adversary predicts;
            default the first.
        weight_key: batch key of per-row weights for a likelihood-family loss.
        trials_key: batch key of the number of trials (binomial family).
        adversary_update: ``"sequential"`` (default, as in the paper) or ``"simultaneous"``.
        adversary_steps: updates of the adversary per iteration (sequential mode), each on the same detached
            features; more than one keeps a fast-moving network from outrunning it. Needs ``accumulation_steps=1``.
        adversarial_objective: what the main step asks of the features against the (frozen) adversary:
            ``"negative_ce"`` (default, the paper's) subtracts ``adv_weight`` times the adversary's cross-entropy on
            the true clusters; ``"confusion"`` adds ``adv_weight`` times its cross-entropy against the uniform
            distribution over the seen clusters (Tzeng et al. 2015), which asks for features the adversary cannot
            tell apart instead of features it gets wrong (maximising its error can keep the clusters separable, only
            relabelled). ``"confusion"`` needs ``adversary_update="sequential"``.
        prepare_batch: default :class:`PrepareBatchCluster`; must return the cluster as keyword ``cluster`` and no
            other network arguments (refused: the network is called with the inputs and the cluster alone). Its
            input check (finite values), the loss's label checks and the networks' cluster-range checks read values
            back from the device; they run on the first batch of every run and, with ``validate_batches``, on every
            batch (:func:`~monai_armed.utils.batch_checks`).
        validate_batches: run the value checks on every batch rather than only the first (slower on a GPU).
        epoch_metrics: write the epoch means of the loss parts and the learning rate to ``engine.state.metrics``
            (:class:`~monai_armed.engines.output.EpochMeans`).
        kwargs: further ``SupervisedTrainer`` arguments (``optim_set_to_none``, default ``True`` here: gradients are
            released rather than zeroed; ``train_handlers``, ``key_train_metric``, ``amp``,
            ``decollate``, ``accumulation_steps``, ``inferer``, ...). ``compile=True`` (with ``compile_kwargs``)
            compiles ``forward_armed`` with ``torch.compile`` (MONAI's ``compile`` compiles ``forward``, which the
            trainer does not call, so a ``torch.compile(network)`` is refused) and gives it the inputs without their
            ``MetaTensor`` metadata, as MONAI does (``pred`` stays a plain tensor); the batches whose values are
            checked run eagerly (with ``validate_batches``, every batch: nothing is compiled, with a warning).
            Without DDP, a player's network is compiled by passing ``torch.compile(adversary)``.
            A windowed ``inferer`` (a ``SlidingWindowInferer`` over large images, say) runs ``forward_armed`` on each
            sample's windows with that sample's cluster (:func:`~monai_armed.inferers.armed_inference`; not with DDP).

    Example::

        net = MixedEffectsMLP(2, 1, n_clusters=10)
        adversary = ClusterAdversary(net.feature_channels, n_clusters=10, hidden_channels=(4, 4))
        trainer = ARMEDTrainer(
            device="cpu", max_epochs=10, train_data_loader=loader, network=net,
            optimizer=torch.optim.Adam(net.parameters(), 1e-3), adversary=adversary, adv_weight=0.5, kl_weight=1.0,
        )
        trainer.run()
    """

    adversary = _PlayerSetting("adversary", "module", settable=False)
    adv_optimizer = _PlayerSetting("adversary", "optimizer", settable=False)
    adv_scaler = _PlayerSetting("adversary", "scaler")
    adv_loss_function = _PlayerSetting("adversary", "loss_function")
    adv_weight = _PlayerSetting("adversary", "weight")
    adversary_update = _PlayerSetting("adversary", "update")
    adversarial_objective = _PlayerSetting("adversary", "objective")
    adversary_steps = _PlayerSetting("adversary", "steps")

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        adversary: nn.Module | None = None,
        adv_optimizer: torch.optim.Optimizer | None = None,
        adv_loss_function: Callable | None = None,
        me_weight: float = 1.0,
        fe_weight: float = 1.0,
        adv_weight: float = 1.0,
        kl_weight: float = 1.0,
        adversary_update: str = "sequential",
        prepare_batch: Callable | None = None,
        adversarial_objective: str = "negative_ce",
        adversary_steps: int = 1,
        epoch_metrics: bool = True,
        n_train: int | None = None,
        adversary_factor: str | None = None,
        weight_key: str | None = None,
        trials_key: str | None = None,
        validate_batches: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_wrappers(network, adversary)
        kwargs.setdefault("optim_set_to_none", True)
        n_train = _training_rows(train_data_loader) if n_train is None else int(n_train)
        if n_train is not None and n_train < 1:
            raise ValueError(f"n_train must be the number of training rows (>= 1), got {n_train}.")
        if adversary_update not in ("sequential", "simultaneous"):
            raise ValueError(f"adversary_update must be 'sequential' or 'simultaneous', got {adversary_update!r}.")
        if adversarial_objective not in ("negative_ce", "confusion"):
            raise ValueError(
                f"adversarial_objective must be 'negative_ce' or 'confusion', got {adversarial_objective!r}."
            )
        if adversarial_objective == "confusion" and adversary_update != "sequential":
            raise ValueError("adversarial_objective='confusion' needs adversary_update='sequential'.")
        if adversary_steps < 1 or (adversary_steps > 1 and kwargs.get("accumulation_steps", 1) != 1):
            raise ValueError(
                f"adversary_steps must be >= 1, and 1 with gradient accumulation; got {adversary_steps} with "
                f"accumulation_steps={kwargs.get('accumulation_steps', 1)}."
            )
        # set before the parent attaches the train handlers (_register_handlers), which the epoch means must precede
        self._epoch_means = EpochMeans() if epoch_metrics else None
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function if loss_function is not None else LogitClassificationLoss(),
            prepare_batch=prepare_batch if prepare_batch is not None else PrepareBatchCluster(),
            **kwargs,
        )
        self.register_events(*ARMEDIterationEvents)
        if self._epoch_means is not None:  # once: _register_handlers attached it already when there were handlers
            self._epoch_means.attach(self)
        self._attach_buffer_broadcast()
        # DDP runs forward_armed through the wrapper's forward (which MONAI compiles with ``compile``); a plain network
        # is called directly, so ``compile`` compiles forward_armed, not the forward MONAI compiled
        ddp = isinstance(network, DistributedDataParallel)
        self._eager_forward_armed = network if ddp else network.forward_armed
        self._forward_armed = self.network if ddp else self._eager_forward_armed
        if self.compile and not ddp:
            self._forward_armed = torch.compile(self._eager_forward_armed, **(kwargs.get("compile_kwargs") or {}))
        if isinstance(network, DistributedDataParallel) and is_windowed(self.inferer):
            raise ValueError(
                f"ARMEDTrainer with DistributedDataParallel cannot train through {type(self.inferer).__name__}: a "
                "windowed inferer calls the network several times per step, which would run several synchronised "
                "forward passes before one backward pass; train on patches with a SimpleInferer."
            )
        self._ddp_modules = tuple(m for m in (network, adversary) if isinstance(m, DistributedDataParallel))
        #: the networks trained around the main step, by name (``"adversary"``; the autoencoder adds
        #: ``"image_classifier"``), in the order of their own steps
        self.players: dict[str, Player] = {}
        self.adv_loss_function = adv_loss_function or nn.CrossEntropyLoss(ignore_index=-1)
        self.adv_weight, self.adversary_update, self.adversarial_objective = adv_weight, adversary_update, adversarial_objective
        self.adversary_steps = adversary_steps
        if adversary is not None:
            self.players["adversary"] = AdversaryPlayer(
                adversary, adv_optimizer, self.adv_loss_function, adv_weight, adversary_steps, adversary_update,
                adversarial_objective, ARMEDIterationEvents.ADVERSARY_COMPLETED,
            )  # fmt: skip
        if adversary is not None:
            _check_adversary_size(network, adversary, adversary_factor)
        _check_sparse_optimizer(network, optimizer)
        if self.amp and torch.device(device).type != "cuda":  # torch would disable both with a warning: fp32 silently
            raise ValueError(f"amp=True needs a CUDA device (CUDA autocast and gradient scaling), got device {device!r}.")
        self.me_weight, self.fe_weight, self.kl_weight = me_weight, fe_weight, kl_weight
        self.n_train, self.adversary_factor = n_train, adversary_factor
        self.loss_keys = {k: v for k, v in (("weight", weight_key), ("trials", trials_key)) if v is not None}
        if self.loss_keys and not isinstance(self.loss_function, LikelihoodFamily):
            raise ValueError(
                f"{' and '.join(f'{k}_key' for k in self.loss_keys)} need a likelihood-family loss_function (e.g. "
                f"GaussianLikelihood(), likelihood('binomial')) that takes them; got {type(self.loss_function).__name__}."
            )
        _check_loss_reduction(self.loss_function, network, kl_weight)
        _optimize_loss_parameters(self.loss_function, optimizer)
        self.validate_batches = validate_batches
        if self.compile and validate_batches:
            warnings.warn(
                "ARMEDTrainer: compile=True with validate_batches=True runs every batch eagerly (the checks read the "
                "device, which would split the compiled graph): nothing is compiled."
            )
        self._first_batch_checked = False
        self._single_row_guards: list[torch.utils.hooks.RemovableHandle] = []
        #: the scalar entries of the last iteration's output (loss parts), whatever ``decollate`` is
        self.output_scalars: dict[str, torch.Tensor] = {}
        self._loss_kwargs: dict[str, torch.Tensor] = {}
        self._record_logging_values = True

    def _register_handlers(self, handlers: Sequence) -> None:
        if self._epoch_means is not None:
            self._epoch_means.attach(self)
        self._attach_buffer_broadcast()
        super()._register_handlers(handlers)

    def _attach_buffer_broadcast(self) -> None:
        """At every epoch's end, before any handler (validation, checkpoints), DDP ranks take rank 0's buffers."""
        if not self.has_event_handler(_broadcast_ddp_buffers, Events.EPOCH_COMPLETED):
            self.add_event_handler(Events.EPOCH_COMPLETED, _broadcast_ddp_buffers)

    def run(self) -> None:  # type: ignore[override]
        if self.n_train is None and self.kl_weight:
            raise ValueError(
                "ARMEDTrainer needs the number of training rows to scale the KL (ELBO): the data loader has no sized "
                "dataset, so pass n_train=N."
            )
        if self.amp:
            for player in self.players.values():
                player.scaler = torch.amp.GradScaler("cuda")
        self._first_batch_checked = False
        super().run()

    def _iteration(self, engine: ARMEDTrainer, batchdata: dict[str, torch.Tensor]) -> IterationOutput | list:
        # the values of the run's first batch are checked; later ones only with validate_batches
        with batch_checks(engine.validate_batches or not engine._first_batch_checked):
            try:
                output = engine._checked_iteration(batchdata)
            finally:
                for guard in engine._single_row_guards:
                    guard.remove()
                engine._single_row_guards = []
        engine._first_batch_checked = True
        return output

    def _checked_iteration(self, batchdata: dict[str, torch.Tensor]) -> IterationOutput | list:
        engine = self
        inputs, targets, cluster = prepare_cluster_batch(engine, batchdata)
        if cluster is None:
            raise KeyError("ARMEDTrainer needs the cluster of every sample; prepare_batch returned none.")
        if targets is None:
            raise KeyError("ARMEDTrainer needs labels; the batch has none.")
        if not engine._first_batch_checked:
            engine._single_row_guards = _guard_single_row_batches(engine, len(inputs))
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets, ARMEDKeys.CLUSTER: cluster}
        engine._record_logging_values = engine._logging_values_read()
        engine._loss_kwargs = engine._batch_loss_kwargs(batchdata)
        if batch_checks_enabled() and isinstance(engine.loss_function, LikelihoodFamily):
            engine._check_family_inputs(targets)
        zero_grad, step = _accumulation_state(engine)
        if engine.compile:  # dynamo traces plain tensors (MONAI's engines strip the metadata too)
            inputs = plain_tensor(inputs)
        if not step and engine._ddp_modules:  # accumulate locally: DDP all-reduces once, in the step's backward
            with ExitStack() as stack:
                for module in engine._ddp_modules:
                    stack.enter_context(module.no_sync())
                engine._train_step(inputs, targets, cluster, zero_grad, step)
        else:
            engine._train_step(inputs, targets, cluster, zero_grad, step)
        engine.output_scalars = iteration_scalars(engine.state.output)  # before decollation mixes them with samples
        engine._fire_event(IterationEvents.MODEL_COMPLETED)  # decollates and post-processes when configured
        output = engine.state.output
        # a decollated output is MONAI's list already; a dict becomes one that MONAI's handler defaults can read
        engine.state.output = output if isinstance(output, list) else IterationOutput(output)
        return engine.state.output

    def _train_step(
        self, inputs: torch.Tensor, targets: torch.Tensor, cluster: torch.Tensor, zero_grad: bool, step: bool
    ) -> None:
        """One iteration (``zero_grad`` / ``step``: accumulation state): the main network's forward pass and loss, each
        sequential player's own step, then the main step with those players frozen."""
        scale = 1.0 / self.accumulation_steps
        players = self.players.values()
        for module in (self.network, *(player.module for player in players)):
            if not module.training:  # train() walks every submodule: skip it when nothing changed
                module.train()
        if zero_grad:
            for optimizer in (self.optimizer, *(player.optimizer for player in players)):
                optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        autocast = torch.autocast("cuda", **self.amp_kwargs) if self.amp else nullcontext()

        with autocast:
            out = self._forward(inputs, cluster)
            loss = self._main_loss(out, inputs, targets, cluster)  # checks the labels before any player steps
        self.state.output[Keys.PRED], self.state.output[ARMEDKeys.PRED_FE] = out.pred, out.pred_fe
        self._fire_event(IterationEvents.FORWARD_COMPLETED)

        target = self._adversary_target(cluster)
        playing = [player for player in players if player.takes_part(out)]
        try:
            for player in playing:
                if player.sequential:
                    with autocast:
                        own_inputs = player.inputs(out, inputs)
                    player.fit(self, own_inputs, target, autocast, scale, step)
            # sequential players are frozen for the main step: their own optimizers have already stepped
            with _frozen([p for player in playing if player.sequential for p in player.params]):
                with autocast:
                    terms = [player.main_term(self, out, target) for player in playing]
                    loss = self._total_loss(loss, terms, out.kl)
                self._fire_event(IterationEvents.LOSS_COMPLETED)
                self._backward(loss * scale if scale != 1.0 else loss, self.scaler)
        finally:
            for player in playing:
                player.release()
        self._fire_event(IterationEvents.BACKWARD_COMPLETED)
        if step:  # a simultaneous player's gradients come from the main backward, scaled by its scaler
            self._step([self.optimizer, *(p.optimizer for p in playing if not p.sequential)], self.scaler)

    @property
    def _batch_forward_armed(self) -> Callable:
        """The main network's ``forward_armed`` for this batch: compiled with ``compile``, except on the batches whose
        values are checked (their reads of the device would split the compiled graph for the whole run)."""
        return self._eager_forward_armed if self.compile and batch_checks_enabled() else self._forward_armed

    def _forward(self, inputs: torch.Tensor, cluster: Any) -> Any:
        """The main network's output for the batch (through the windowed inferer when there is one)."""
        return armed_inference(self.inferer, inputs, self._batch_forward_armed, cluster)

    def _main_loss(self, out: Any, inputs: torch.Tensor, targets: torch.Tensor, cluster: Any) -> torch.Tensor:
        """The main network's own loss before the players' terms and the KL: here the task loss."""
        return self._task_loss(out, targets)

    def _adversary_target(self, cluster: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The cluster index the players predict: of ``adversary_factor`` with several factors."""
        if not isinstance(cluster, torch.Tensor):
            factor = self.adversary_factor or next(iter(cluster))
            if factor not in cluster:
                raise KeyError(f"adversary_factor {factor!r} is not a grouping factor of the batch: {sorted(cluster)}.")
            cluster = cluster[factor]
        return cluster.argmax(1) if cluster.is_floating_point() else cluster

    def _batch_loss_kwargs(self, batchdata: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``weight`` / ``trials`` of a likelihood-family loss from their batch keys."""
        kwargs = {}
        for name, key in self.loss_keys.items():
            if key not in batchdata:
                raise KeyError(f"batch has no {name} key {key!r}; keys present: {sorted(batchdata)}.")
            kwargs[name] = torch.as_tensor(batchdata[key]).to(self.state.device, non_blocking=self.non_blocking)
        return kwargs

    def _check_family_inputs(self, targets: torch.Tensor) -> None:
        """The batch's response, trials and weights against what the likelihood family takes (a batch whose values
        are checked: the run's first, or every one with ``validate_batches``)."""
        label = getattr(self.prepare_batch, "label_key", None) or "label"
        trials, weight = self._loss_kwargs.get("trials"), self._loss_kwargs.get("weight")
        try:
            self.loss_function.validate_target(
                targets.detach(), trials=None if trials is None else trials.detach(), name=label,
                trials_name=str(self.loss_keys.get("trials")),
            )  # fmt: skip
            if weight is not None:  # a batch of zero weights is fine (masked rows): finite and >= 0 per row
                bad = (~torch.isfinite(weight) | (weight < 0)).reshape(-1)
                if bool(bad.any()):
                    row = int(bad.nonzero()[0])
                    raise ValueError(
                        f"column '{self.loss_keys['weight']}' row {row} has {float(weight.reshape(-1)[row])}; row "
                        "weights must be finite and >= 0."
                    )
        except ValueError as error:
            raise ValueError(f"a training batch's values (batch keys, rows within the batch): {error}") from None

    def _logging_values_read(self) -> bool:
        """Whether this iteration computes the values that only logging reads (the adversary's accuracy): when a
        handler runs inside or at the end of the iteration, and on the last iteration of every epoch or of the run
        (the output a run leaves behind)."""
        handlers = self._event_handlers
        for event in (*_OUTPUT_READING_EVENTS, *(player.event for player in self.players.values())):
            if handlers.get(event):
                return True
        length, max_iters = self.state.epoch_length, getattr(self.state, "max_iters", None)
        return length is None or self.state.iteration % length == 0 or self.state.iteration == max_iters

    def _check_task_loss_fits(self, pred: torch.Tensor) -> None:
        """On a checked batch, refuse a cross-entropy on one logit (it is 0 whatever the logit, so nothing trains)."""
        one_logit = pred.dim() >= 2 and pred.shape[1] == 1
        if batch_checks_enabled() and isinstance(self.loss_function, nn.CrossEntropyLoss) and one_logit:
            raise ValueError(
                "CrossEntropyLoss on a one-logit output is 0 whatever the logit (a softmax over one class): use "
                "LogitClassificationLoss or BCEWithLogitsLoss, or give the network two outputs."
            )

    def _task_loss(self, out: Any, targets: torch.Tensor) -> torch.Tensor:
        """``me_weight * task(pred) + fe_weight * task(pred_fe)``, logging each part."""
        output = self.state.output
        self._check_task_loss_fits(out.pred)
        loss = None
        for key, weight, pred in (
            (ARMEDKeys.LOSS_ME, self.me_weight, out.pred),
            (ARMEDKeys.LOSS_FE, self.fe_weight, out.pred_fe),
        ):
            if weight:
                part = self.loss_function(pred, targets, **self._loss_kwargs)
                part = part if part.dim() == 0 else part.mean()
                output[key] = part.detach()
                loss = weight * part if loss is None else loss + weight * part
        return loss if loss is not None else out.pred.new_zeros(())

    def _total_loss(
        self, loss: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor]], kl: torch.Tensor
    ) -> torch.Tensor:
        """The tensor to back-propagate: ``loss + kl_weight * kl / n_train`` plus the players' terms; logs the
        objective (which differs from it only where a gradient-reversal layer carries a player's sign)."""
        output = self.state.output
        objective = loss + (self.kl_weight / self.n_train) * kl if self.kl_weight else loss
        backward = objective
        for logged, backprop in terms:
            shared = objective is backward and logged is backprop
            backward = backward + backprop
            objective = backward if shared else objective + logged
        output[ARMEDKeys.LOSS_KL] = kl.detach()
        output[Keys.LOSS] = objective.detach()
        return backward

    def _fire_event(self, event_name: Any, *event_args: Any, **event_kwargs: Any) -> None:
        # Ignite formats a debug message for every event, handled or not (microseconds on every step): an event
        # without handlers only becomes the last event. The steps call this directly for the events inside an
        # iteration, without fire_event's check against every allowed event (tens of microseconds each).
        if not self._event_handlers.get(event_name):
            self.last_event_name = event_name
            return
        super()._fire_event(event_name, *event_args, **event_kwargs)

    @staticmethod
    def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()

    @staticmethod
    def _step(optimizers: Sequence[torch.optim.Optimizer], scaler: torch.amp.GradScaler | None) -> None:
        """Step the optimizers of one backward pass: through its gradient scaler (each unscales by its scale), which
        is then updated once."""
        for optimizer in optimizers:
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)
        if scaler is not None:
            scaler.update()


#: events whose handlers may read an iteration's output while it is current (besides the players' own events)
_OUTPUT_READING_EVENTS = (
    IterationEvents.FORWARD_COMPLETED,
    IterationEvents.LOSS_COMPLETED,
    IterationEvents.BACKWARD_COMPLETED,
    IterationEvents.MODEL_COMPLETED,
    Events.ITERATION_COMPLETED,
)


@contextmanager
def _frozen(params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Temporarily exclude ``params`` from autograd (restored even when the step raises)."""
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _check_wrappers(network: nn.Module, adversary: nn.Module | None) -> nn.Module | None:
    """Checks the network / adversary wrappers (plain, or both from ``armed_ddp``); returns the unwrapped adversary."""
    if isinstance(network, nn.DataParallel) or isinstance(adversary, nn.DataParallel):
        raise TypeError(
            "ARMEDTrainer does not support DataParallel: pass the unwrapped network and adversary, or train with "
            "DistributedDataParallel through monai_armed.engines.armed_ddp."
        )
    if isinstance(network, DistributedDataParallel):
        if not isinstance(network.module, ARMEDForward):
            raise TypeError(
                "ARMEDTrainer calls forward_armed, which DistributedDataParallel(network) would bypass (no gradient "
                "synchronisation); wrap the network with monai_armed.engines.armed_ddp(network, ...) instead."
            )
    elif is_compiled(network):
        raise TypeError(
            "ARMEDTrainer calls network.forward_armed, which torch.compile(network) does not compile (it compiles "
            "forward): pass the network itself with compile=True (and compile_kwargs for torch.compile's options)."
        )
    elif not callable(getattr(network, "forward_armed", None)):
        raise TypeError(
            f"ARMEDTrainer needs a network with forward_armed(x, cluster); {type(network).__name__} "
            "has none (monai_armed networks such as MixedEffectsMLP provide it)."
        )
    if adversary is not None and isinstance(network, DistributedDataParallel) != isinstance(
        adversary, DistributedDataParallel
    ):
        raise ValueError(
            "ARMEDTrainer needs the network and the adversary both plain or both DistributedDataParallel "
            f"(armed_ddp), got network={type(network).__name__}, adversary={type(adversary).__name__}; otherwise the "
            "processes train different adversaries."
        )
    return adversary.module if isinstance(adversary, DistributedDataParallel) else adversary


def _training_rows(loader: Any) -> int | None:
    """``N`` of the ELBO: the size of the loader's dataset (a ``DistributedSampler`` splits it, ``N`` stays whole);
    ``None`` when the loader does not tell."""
    if isinstance(getattr(loader, "n_samples", None), int):  # TensorBatchLoader
        return loader.n_samples
    try:
        return len(getattr(loader, "dataset", None))
    except TypeError:
        return None


def _broadcast_ddp_buffers(engine: ARMEDTrainer) -> None:
    for module in engine._ddp_modules:
        broadcast_buffers(module)


def _single_row_batch(loader: Any, first_rows: int, iterations: int | None) -> str | None:
    """Why a batch of this run will hold a single row (the loader's last one, when the run reaches it), else None. The
    rows a batch holds per item come from the first batch (a transform may return several crops per image)."""
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(batch_size, int) or getattr(loader, "drop_last", False):
        return None
    try:  # a DistributedSampler's length is the rank's share
        items = loader.n_samples if hasattr(loader, "n_samples") else len(loader.sampler)
        batches = len(loader)
    except (TypeError, AttributeError):  # a loader that does not say how many items it holds
        return None
    rows_per_item = first_rows // max(min(batch_size, items), 1)
    if (items % batch_size or batch_size) * rows_per_item != 1 or (iterations is not None and iterations < batches):
        return None
    return f"the training loader's batches of {batch_size} from {items} items leave a last batch of one row"


def _guard_single_row_batches(engine: ARMEDTrainer, first_rows: int) -> list[torch.utils.hooks.RemovableHandle]:
    """At the run's first batch: when a later batch will hold a single row, hooks that refuse, during this batch's
    forward passes (before any step), every ``BatchNorm1d`` that normalises over the batch alone (2-D input), which
    torch would refuse in training mode at that batch, at the end of an epoch."""
    state = engine.state
    iterations = state.epoch_length * state.max_epochs if state.epoch_length and state.max_epochs else None
    reason = _single_row_batch(engine.data_loader, first_rows, iterations)
    if reason is None:
        return []

    def refuse(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2:
                raise ValueError(
                    f"{reason}, which the BatchNorm1d {name!r} cannot normalise in training: pass drop_last=True to "
                    "the data loader or choose a batch size that does not leave one item."
                )

        return hook

    modules = {"network": engine.network, **{n: p.unwrapped for n, p in engine.players.items()}}
    return [
        sub.register_forward_pre_hook(refuse(f"{owner}.{name}"))
        for owner, module in modules.items()
        for name, sub in module.named_modules()
        if isinstance(sub, nn.BatchNorm1d)
    ]


def _optimize_loss_parameters(loss_function: Any, optimizer: torch.optim.Optimizer) -> None:
    """Add the loss's own parameters (e.g. a Gaussian residual scale) to ``optimizer`` when it does not hold them: to
    its only parameter group, so that a learning-rate scheduler built on it drives them too, or, when it has several
    groups (whose settings may not suit them: a frozen or sparse-table group), as a new group with the optimizer's
    defaults. A scheduler built on a several-group optimizer has no entry for a new group (``LambdaLR`` then fails at
    the end of the first epoch), so that case is refused."""
    if not isinstance(loss_function, nn.Module):
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in loss_function.parameters() if p.requires_grad and id(p) not in held]
    if not missing:
        return
    if len(optimizer.param_groups) == 1:
        optimizer.param_groups[0]["params"].extend(missing)  # torch's optimizers create a parameter's state lazily
        return
    if any("initial_lr" in group for group in optimizer.param_groups):  # set by every torch LR scheduler
        raise ValueError(
            f"the loss {type(loss_function).__name__} has parameters the optimizer does not hold, and a learning-rate "
            "scheduler already drives the optimizer's several parameter groups: give the optimizer a group for them "
            "before building the scheduler, e.g. {'params': list(loss_function.parameters())}."
        )
    optimizer.add_param_group({"params": missing})


def _check_loss_reduction(loss_function: Any, network: nn.Module, kl_weight: float) -> None:
    """Refuse a loss that sums over the batch (a likelihood family or a torch loss) where there is a KL term: the ELBO
    weighs the mean negative log-likelihood per sample against ``KL / n_train``, so a sum would weigh the data
    ``batch_size`` times too much."""
    has_random_effects = any(isinstance(m, RandomEffects) for m in network.modules())
    if getattr(loss_function, "reduction", None) == "sum" and kl_weight and has_random_effects:
        raise ValueError(
            f"{type(loss_function).__name__}(reduction='sum') makes the data term batch_size times too heavy against "
            "the KL term of the per-sample ELBO: use reduction='mean' (or 'none')."
        )


def _accumulation_state(engine: SupervisedTrainer) -> tuple[bool, bool]:
    """Whether this iteration zeroes the gradients and whether it steps the optimizers (``accumulation_steps``)."""
    acc = engine.accumulation_steps
    if acc == 1:
        return True, True
    epoch_length = engine.state.epoch_length
    local = (engine.state.iteration - 1) % epoch_length if epoch_length else engine.state.iteration - 1
    last = epoch_length is not None and local + 1 == epoch_length
    return local % acc == 0, (local + 1) % acc == 0 or last


def _check_adversary_size(network: nn.Module, adversary: nn.Module, adversary_factor: str | None) -> None:
    """Refuse an adversary whose number of classes is not that of the clusters it predicts, where the network says
    it: the levels of ``adversary_factor`` (or the first factor) of a network with several, or its clusters."""
    inner, judge = getattr(network, "module", network), getattr(adversary, "module", adversary)
    classes = getattr(judge, "n_clusters", None)
    names = getattr(inner, "factor_names", None)
    if names:
        factor = adversary_factor or names[0]
        if factor not in names:  # a factor of the batch without random effects: its size is the batch's to say
            return
        levels, what = inner.random_effects[factor].n_clusters, f"grouping factor {factor!r}"
    else:
        levels, what = getattr(inner, "n_clusters", None), "the network's clusters"
    if isinstance(classes, int) and isinstance(levels, int) and classes != levels:
        raise ValueError(
            f"the adversary predicts {classes} clusters but {what} has {levels} levels: build it with "
            f"n_clusters={levels}" + (" or set adversary_factor." if names else ".")
        )


def _check_sparse_optimizer(network: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse, before the first step, an optimizer that cannot take the sparse gradients of ``sparse=True`` random
    effects (torch's Adam family raises at the first step and suggests SparseAdam, which refuses the dense ones)."""
    sparse = [name for name, m in network.named_modules() if isinstance(m, RandomEffects) and m.sparse]
    # SparseAdam is refused too: the network's fixed effects are dense, and it refuses dense gradients
    if sparse and not isinstance(optimizer, (LazyAdam, torch.optim.SGD, torch.optim.Adagrad)):
        raise TypeError(
            f"the random effects {sparse} have sparse gradients (sparse=True), which {type(optimizer).__name__} "
            "cannot take: use monai_armed.optimizers.LazyAdam (Adam with sparse rows and dense parameters), or "
            "sparse=False."
        )
