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
"""The players of an ARMED iteration: networks that the trainers fit in their own step, before the main step, and
whose judgement of the main network then enters the main loss while they are frozen."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from monai_armed.losses import cluster_confusion_loss
from monai_armed.networks.layers.gradient_reversal import grad_reverse

__all__ = ["AdversaryPlayer", "ImageClassifierPlayer", "Player"]


class Player:
    """A network with its own optimizer, loss, weight and number of updates per iteration, trained by an ARMED trainer
    around the main network's step.

    Every iteration the trainer calls :meth:`fit` (``steps`` updates on :meth:`inputs`, before the main step) when the
    player is :attr:`sequential`, then adds :meth:`main_term` to the main loss with the player's parameters frozen. A
    player that is not sequential is trained by the main backward pass itself (through a gradient-reversal layer) and
    its optimizer steps with the main one. Subclasses say what the player learns from and what it adds to the main
    loss.

    Args:
        module: the player's network, or its :func:`~monai_armed.engines.armed_ddp` wrapper.
        optimizer: its optimizer; default ``Adam(lr=1e-3)``.
        loss_function: its loss on ``(logits, cluster target)``, in its own step and in the main term.
        weight: weight of its term in the main loss (a plain attribute: a handler can schedule it).
        steps: updates of the player per iteration (each on the same inputs).
        event: the event fired after its own step.
        output_key: key of its own loss in ``engine.state.output``.

    Example::

        player = AdversaryPlayer(ClusterAdversary(12, 10), None, nn.CrossEntropyLoss(ignore_index=-1), weight=0.5)
        player.fit(trainer, player.inputs(out, images), cluster, nullcontext(), scale=1.0, step=True)
    """

    sequential = True

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_function: Callable,
        weight: float = 1.0,
        steps: int = 1,
        event: Any = None,
        output_key: str = "",
    ) -> None:
        self.module = module
        #: the network itself (DDP unwrapped): the frozen main-step call has nothing for DDP to reduce
        self.unwrapped = module.module if isinstance(module, DistributedDataParallel) else module
        self.optimizer = optimizer if optimizer is not None else torch.optim.Adam(module.parameters(), lr=1e-3)
        self.loss_function, self.weight, self.steps = loss_function, weight, steps
        self.event, self.output_key = event, output_key
        self.params = list(module.parameters())
        self.scaler: torch.amp.GradScaler | None = None

    def takes_part(self, out: Any) -> bool:
        """Whether the player plays this iteration (given the main network's output)."""
        return True

    def inputs(self, out: Any, images: torch.Tensor) -> Any:
        """What the player learns from in its own step (detached from the main network)."""
        raise NotImplementedError

    def fit(self, engine: Any, inputs: Any, target: torch.Tensor, autocast: Any, scale: float, step: bool) -> None:
        """The player's own ``steps`` updates (``step``: whether the optimizer steps under gradient accumulation)."""
        for repeat in range(self.steps):
            if repeat:
                self.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with autocast:
                logits = self.module(inputs)
                loss = self.loss_function(logits, target)
            engine._backward(loss * scale if scale != 1.0 else loss, self.scaler)
            if step:
                engine._step([self.optimizer], self.scaler)
        self.record(engine, logits, target, loss)
        if self.event is not None:
            engine._fire_event(self.event)

    def record(self, engine: Any, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Writes the player's own loss to ``engine.state.output``."""
        engine.state.output[self.output_key] = loss.detach()

    def main_term(self, engine: Any, out: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The player's term in the main objective and the tensor to back-propagate for it (the same tensor unless a
        gradient-reversal layer carries the sign)."""
        raise NotImplementedError

    def release(self) -> None:
        """Drops what the player kept for the iteration (the trainer calls it when the iteration ends or fails)."""


class AdversaryPlayer(Player):
    """The cluster adversary: learns the cluster from the detached fixed-effects features; the main step subtracts
    ``weight`` times its cross-entropy on the live features (``objective="negative_ce"``, the paper's) or adds
    ``weight`` times its cross-entropy against the uniform distribution (``"confusion"``).

    Args:
        module: cluster classifier over ``out.features``, or its ``armed_ddp`` wrapper.
        optimizer: its optimizer; default ``Adam(lr=1e-3)``.
        loss_function: its loss; ``-1`` (unseen) rows must be ignored.
        weight: ``adv_weight``.
        steps: updates per iteration.
        update: ``"sequential"`` (its own step, then frozen in the main step) or ``"simultaneous"`` (one backward pass
            through a gradient-reversal layer).
        objective: ``"negative_ce"`` or ``"confusion"``.
        event: the event fired after its own step.

    Example::

        player = AdversaryPlayer(ClusterAdversary(net.feature_channels, 10), None, nn.CrossEntropyLoss(ignore_index=-1))
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_function: Callable,
        weight: float = 1.0,
        steps: int = 1,
        update: str = "sequential",
        objective: str = "negative_ce",
        event: Any = None,
    ) -> None:
        super().__init__(module, optimizer, loss_function, weight, steps, event, output_key="loss_adv")
        self.update, self.objective = update, objective
        self._pooled: tuple[Any, list[torch.Tensor]] | None = None  # (the main output, its pooled features)

    @property
    def sequential(self) -> bool:  # type: ignore[override]
        return self.update == "sequential"

    def _features(self, out: Any) -> Sequence[torch.Tensor]:
        """The main network's features as the adversary reads them: pooled once per iteration where it can say how
        (:meth:`~monai_armed.networks.blocks.ClusterAdversary.pool_features`), for its own step and the main one."""
        pool = getattr(self.unwrapped, "pool_features", None)
        return pool(out.features) if callable(pool) else out.features

    def inputs(self, out: Any, images: torch.Tensor) -> list[torch.Tensor]:
        pooled = list(self._features(out))
        self._pooled = (out, pooled)
        return [f.detach() for f in pooled]

    def release(self) -> None:
        self._pooled = None

    def record(self, engine: Any, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> None:
        """Its loss, and its accuracy on the seen rows where logging reads it."""
        super().record(engine, logits, target, loss)
        if engine._record_logging_values:
            correct = logits.detach().argmax(1) == target  # never true for unseen (-1) rows
            engine.state.output["adv_accuracy"] = correct.sum() / (target >= 0).sum().clamp(min=1)

    def main_term(self, engine: Any, out: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cached, self._pooled = self._pooled, None
        features = cached[1] if cached is not None and cached[0] is out else self._features(out)
        if not self.sequential:  # the reversal layer gives the features -weight times the gradient
            logits = self.module([grad_reverse(f, self.weight) for f in features])
            loss_gen = self.loss_function(logits, target)
            self.record(engine, logits, target, loss_gen)
            engine.state.output["loss_gen"] = loss_gen.detach()
            return -self.weight * loss_gen.detach(), loss_gen
        logits = self.unwrapped(features)
        if self.objective == "confusion":
            loss_gen = cluster_confusion_loss(logits, target)
            term = self.weight * loss_gen
        else:
            loss_gen = self.loss_function(logits, target)
            term = -self.weight * loss_gen
        engine.state.output["loss_gen"] = loss_gen.detach()
        return term, term


class ImageClassifierPlayer(Player):
    """The image cluster classifier of the ARMED autoencoder: learns the cluster from the real images; the main step
    adds ``weight`` times its cross-entropy on the random-effects reconstruction (which must keep the batch look).

    Args:
        module: image -> cluster logits network, or its ``armed_ddp`` wrapper.
        optimizer: its optimizer; default ``Adam(lr=1e-3)``.
        loss_function: its loss (``-1`` rows ignored).
        weight: ``image_cluster_weight``.
        event: the event fired after its own step.

    Example::

        player = ImageClassifierPlayer(ImageClusterClassifier(2, 1, 6), None, seen_cross_entropy, weight=1e-3)
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        loss_function: Callable,
        weight: float = 1.0,
        event: Any = None,
    ) -> None:
        super().__init__(module, optimizer, loss_function, weight, 1, event, output_key="loss_image_classifier")

    def takes_part(self, out: Any) -> bool:
        return getattr(out, "recon_re", None) is not None

    def inputs(self, out: Any, images: torch.Tensor) -> torch.Tensor:
        return images

    def main_term(self, engine: Any, out: Any, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        part = self.loss_function(self.unwrapped(out.recon_re), target)
        engine.state.output["loss_image_cluster"] = part.detach()
        term = self.weight * part if self.weight else part.new_zeros(())
        return term, term
