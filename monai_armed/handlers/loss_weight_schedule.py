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
"""Ramp a trainer's loss weight (the adversarial weight, typically) up over training."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from monai.utils import IgniteInfo, min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["LossWeightSchedule", "LOSS_WEIGHT_SCHEDULES"]

#: Ramp shapes: the fraction of the final weight at training progress ``p`` in ``[0, 1]`` (``gamma`` shapes "dann").
LOSS_WEIGHT_SCHEDULES = ("constant", "linear", "dann")


class LossWeightSchedule:
    """Sets a loss weight of the trainer (an attribute such as ``adv_weight``) from the training progress.

    Before every iteration the weight becomes ``value * f(p)``, where ``p`` is the fraction of all iterations done
    (``(iteration - 1) / (max_epochs * epoch_length)``) and ``f`` is the schedule:

    - ``"dann"``: ``2 / (1 + exp(-gamma * p)) - 1``, the ramp of domain-adversarial training (Ganin et al. 2016):
      0 at the start, about 0.76 at ``p = 0.2`` and 1 at the end for ``gamma = 10``. The encoder first learns
      features for the task and the reconstruction while the adversary learns to read the cluster, and the
      adversarial pressure grows only once the adversary is informative, which keeps the two from a runaway
      game early on;
    - ``"linear"``: ``min(1, p / ramp_fraction)``;
    - ``"constant"``: 1 (the weight stays at ``value``).

    The weight follows the iteration counter, so a resumed run picks up the schedule where it stopped. The current
    value is also written to ``engine.state.metrics[name]`` for the loggers.

    Args:
        name: attribute of the engine to set (``adv_weight``, ``kl_weight``, ``image_cluster_weight``, ...).
        value: the final weight; ``None`` takes the engine's value when the run starts.
        schedule: one of :data:`LOSS_WEIGHT_SCHEDULES`.
        gamma: steepness of the ``"dann"`` ramp.
        ramp_fraction: fraction of training over which ``"linear"`` rises.

    Raises:
        ValueError: an unknown schedule, a non-positive ``gamma`` or ``ramp_fraction``, or an engine without the
            attribute ``name``.

    Example::

        trainer = ARMEDAutoencoderTrainer(..., adv_weight=0.03)
        LossWeightSchedule("adv_weight", schedule="dann").attach(trainer)   # 0 -> 0.03 over training
        # bundle: {"_target_": "monai_armed.handlers.LossWeightSchedule", "name": "adv_weight", "schedule": "dann"}
    """

    def __init__(
        self,
        name: str = "adv_weight",
        value: float | None = None,
        schedule: str = "dann",
        gamma: float = 10.0,
        ramp_fraction: float = 0.5,
    ) -> None:
        if schedule not in LOSS_WEIGHT_SCHEDULES:
            raise ValueError(f"unknown loss weight schedule {schedule!r}; expected one of {LOSS_WEIGHT_SCHEDULES}.")
        if gamma <= 0 or ramp_fraction <= 0:
            raise ValueError(f"gamma and ramp_fraction must be positive, got {gamma} and {ramp_fraction}.")
        self.name, self.value, self.schedule = name, value, schedule
        self.gamma, self.ramp_fraction = float(gamma), float(ramp_fraction)

    def attach(self, engine: Engine) -> None:
        # trainers attach their ``train_handlers`` before they set their weights: read the weight when the run starts
        engine.add_event_handler(Events.STARTED, self._read_final_value)
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def _read_final_value(self, engine: Engine) -> None:
        if not hasattr(engine, self.name):
            raise ValueError(
                f"LossWeightSchedule: the engine {type(engine).__name__} has no loss weight {self.name!r} to schedule."
            )
        if self.value is None:
            self.value = float(getattr(engine, self.name))

    def factor(self, progress: float) -> float:
        """``f(p)``, the fraction of the final weight at training progress ``p`` (clipped to ``[0, 1]``)."""
        p = min(max(float(progress), 0.0), 1.0)
        if self.schedule == "dann":
            return 2.0 / (1.0 + math.exp(-self.gamma * p)) - 1.0
        if self.schedule == "linear":
            return min(1.0, p / self.ramp_fraction)
        return 1.0

    def __call__(self, engine: Engine) -> None:
        total = max(1, engine.state.max_epochs * engine.state.epoch_length)
        weight = self.value * self.factor((engine.state.iteration - 1) / total)
        setattr(engine, self.name, weight)
        engine.state.metrics[self.name] = weight
