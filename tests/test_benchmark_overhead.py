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
"""benchmarks/overhead.py compares like with like: its four candidates (the package's trainer, the minimal eager loop,
the package's modules in a plain loop, the package's trainer taking the minimal step) take the same steps."""

from __future__ import annotations

import pytest

from tests.benchmark_scripts import import_benchmarks


@pytest.fixture(scope="module")
def overhead():
    return import_benchmarks("overhead", "spirals")


def test_candidates_take_the_same_steps(overhead):
    module, spirals = overhead
    data = spirals.make_data()
    train_index, _ = spirals.fold_splits(data)[0]
    train = spirals.subset(data, train_index[: 4 * spirals.BATCH_SIZE])
    assert module.max_parameter_difference(train, seed=283) == 0.0


def test_minimal_step_trainer_trains_and_logs_its_loss(overhead):
    module, spirals = overhead
    data = spirals.make_data()
    train = spirals.subset(data, spirals.fold_splits(data)[0][0][: 2 * spirals.BATCH_SIZE])
    network, adversary, weights = spirals.build_model(spirals.MODELS["armed"], spirals.N_CLUSTERS, 0)
    trainer = module.minimal_step_trainer(network, adversary, weights, train, loader_seed=0, epochs=1)
    before = [p.detach().clone() for p in trainer.minimal.params]
    trainer.run()
    assert trainer.state.iteration == 2
    assert float(trainer.output_scalars["loss"]) > 0  # the paper's objective on a fresh network: BCE terms dominate
    assert all(not bool((a == b.detach()).all()) for a, b in zip(before, trainer.minimal.params))
