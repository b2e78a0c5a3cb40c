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
"""Tests of LossWeightSchedule (monai_armed.handlers.loss_weight_schedule) on a real ARMEDAutoencoderTrainer."""

from __future__ import annotations

import math
import unittest

import pytest
from ignite.engine import Engine, Events
from parameterized import parameterized

from monai_armed.handlers import LossWeightSchedule
from tests.test_autoencoder_trainer import _images, _models, _trainer

pytestmark = pytest.mark.usefixtures("single_thread")


def _run_with_schedule(
    iterations: int, adv_weight: float, **schedule_kwargs
) -> tuple[list[float], list[float], object]:
    """Weights seen by each iteration's main step, and each iteration's ``loss - (its parts without the gen term)``."""
    net, adv, judge = _models("domain_adversarial")
    trainer = _trainer(_images(), net, adv, judge, iterations, weights={"adv_weight": adv_weight})
    LossWeightSchedule("adv_weight", **schedule_kwargs).attach(trainer)
    weights: list[float] = []
    gen_terms: list[float] = []

    def record(engine) -> None:
        out = engine.state.output
        weights.append(engine.adv_weight)
        rest = engine.recon_weight * float(out["loss_recon_fe"]) + engine.cls_weight * float(out["loss_fe"])
        gen_terms.append(rest - float(out["loss"]))  # = adv_weight * loss_gen for the negative cross-entropy

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    return weights, gen_terms, trainer


class TestLossWeightSchedule(unittest.TestCase):
    @parameterized.expand(
        [
            ("dann", {}, [0.0, 2 / (1 + math.exp(-2)) - 1, 2 / (1 + math.exp(-5)) - 1, 2 / (1 + math.exp(-10)) - 1]),
            ("linear", {"ramp_fraction": 0.5}, [0.0, 0.4, 1.0, 1.0]),
            ("constant", {}, [1.0, 1.0, 1.0, 1.0]),
        ]
    )
    def test_factor(self, schedule, kwargs, expected):
        handler = LossWeightSchedule(schedule=schedule, **kwargs)
        for p, want in zip([0.0, 0.2, 0.5, 1.0], expected):
            self.assertAlmostEqual(handler.factor(p), want, places=6)
        self.assertEqual(handler.factor(-1.0), handler.factor(0.0))
        self.assertEqual(handler.factor(2.0), handler.factor(1.0))

    def test_dann_ramp_drives_the_adversarial_term_of_the_trainer(self):
        weights, gen_terms, trainer = _run_with_schedule(10, 0.5, schedule="dann")
        expected = [0.5 * (2 / (1 + math.exp(-10 * i / 10)) - 1) for i in range(10)]
        for got, want in zip(weights, expected):
            self.assertAlmostEqual(got, want, places=6)
        self.assertEqual(weights[0], 0.0)
        self.assertTrue(all(b > a for a, b in zip(weights, weights[1:])))
        # the main step subtracts exactly the scheduled weight times the adversary's cross-entropy
        self.assertAlmostEqual(gen_terms[0], 0.0, places=5)
        self.assertTrue(all(g > 0 for g in gen_terms[1:]))
        self.assertEqual(trainer.state.metrics["adv_weight"], weights[-1])

    def test_value_overrides_the_trainer_weight(self):
        weights, _, _ = _run_with_schedule(4, 0.5, schedule="constant", value=0.2)
        self.assertEqual(weights, [0.2] * 4)

    def test_resumed_run_continues_the_ramp(self):
        handler = LossWeightSchedule("kl_weight", value=1.0, schedule="linear", ramp_fraction=1.0)
        engine = Engine(lambda e, b: None)
        engine.kl_weight = 1.0
        handler.attach(engine)
        seen: list[float] = []
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.kl_weight))
        engine.run(range(4), max_epochs=2)
        self.assertEqual(seen, [i / 8 for i in range(8)])
        # a run that starts from iteration 4 (a resumed checkpoint) picks up at p = 4 / 8
        fresh = Engine(lambda e, b: None)
        fresh.kl_weight = 1.0
        LossWeightSchedule("kl_weight", schedule="linear", ramp_fraction=1.0).attach(fresh)
        resumed: list[float] = []
        fresh.add_event_handler(Events.ITERATION_COMPLETED, lambda e: resumed.append(e.kl_weight))
        fresh.state.iteration, fresh.state.epoch, fresh.state.max_epochs = 4, 1, 2
        fresh.run(range(4), max_epochs=2)
        self.assertEqual(resumed, [i / 8 for i in range(4, 8)])

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "unknown loss weight schedule 'cosine'"):
            LossWeightSchedule(schedule="cosine")
        with self.assertRaisesRegex(ValueError, "must be positive"):
            LossWeightSchedule(gamma=0.0)
        engine = Engine(lambda e, b: None)
        LossWeightSchedule("adv_weight").attach(engine)
        with self.assertRaisesRegex(ValueError, "has no loss weight 'adv_weight'"):
            engine.run(range(2), max_epochs=1)


if __name__ == "__main__":
    unittest.main()
