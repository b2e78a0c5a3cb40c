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
"""The one trainer skeleton: players own their settings, the trainer's names reach them, the adversary reads pooled
features once per iteration, and logging-only values are computed where something reads them."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events

from monai_armed.data import TensorBatchLoader
from monai_armed.engines import AdversaryPlayer, ARMEDTrainer, ImageClassifierPlayer, PrepareBatchCluster
from monai_armed.handlers import LossWeightSchedule
from monai_armed.networks import ClusterAdversary, MixedEffectsMLP


def _trainer(epochs: int = 2, **kwargs) -> ARMEDTrainer:
    torch.manual_seed(0)
    net = MixedEffectsMLP.from_variant("armed", in_features=2, out_channels=1, n_clusters=3)
    adversary = ClusterAdversary(net.feature_channels, 3, (8,))
    g = torch.Generator().manual_seed(0)
    data = {"features": torch.randn(40, 2, generator=g), "label": torch.randint(0, 2, (40,), generator=g),
            "cluster": torch.arange(40) % 3}  # fmt: skip
    return ARMEDTrainer(
        device="cpu", max_epochs=epochs, train_data_loader=TensorBatchLoader(data, batch_size=8), network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2), adversary=adversary, adv_weight=0.5,
        prepare_batch=PrepareBatchCluster("features"), decollate=False, epoch_metrics=False, **kwargs,
    )  # fmt: skip


def test_trainer_names_read_and_set_the_adversary_player():
    trainer = _trainer(adversary_steps=2)
    player = trainer.players["adversary"]
    assert isinstance(player, AdversaryPlayer) and list(trainer.players) == ["adversary"]
    assert trainer.adversary is player.module and trainer.adv_optimizer is player.optimizer
    assert (player.weight, player.steps, player.update) == (0.5, 2, "sequential")
    trainer.adv_weight = 0.25
    assert player.weight == 0.25, "a handler scheduling trainer.adv_weight sets the player's weight"
    with pytest.raises(AttributeError, match="adversary is set when the trainer is built"):
        trainer.adversary = ClusterAdversary(4, 3)
    LossWeightSchedule("adv_weight", value=1.0, schedule="linear").attach(trainer)
    trainer.run()
    assert player.weight == pytest.approx(1.0)


def test_without_an_adversary_the_settings_stay_on_the_trainer():
    trainer = _trainer()
    net = trainer.network
    bare = ARMEDTrainer(
        device="cpu", max_epochs=1, train_data_loader=trainer.data_loader, network=net, adv_weight=0.0,
        optimizer=torch.optim.Adam(net.parameters()), prepare_batch=PrepareBatchCluster("features"), decollate=False,
    )  # fmt: skip
    assert bare.players == {} and bare.adversary is None and bare.adv_optimizer is None
    with pytest.raises(AttributeError, match="adversary is set when the trainer is built"):
        bare.adversary = ClusterAdversary(4, 3)  # would never be trained
    bare.adv_weight = 0.3
    assert bare.adv_weight == 0.3
    bare.run()
    assert "loss_adv" not in bare.state.output


def test_pool_features_is_the_global_mean_and_the_adversary_reads_pooled_maps_unchanged():
    maps = [torch.randn(4, 3, 5, 6), torch.randn(4, 2)]
    pooled = ClusterAdversary.pool_features(maps)
    torch.testing.assert_close(pooled[0], maps[0].mean((2, 3)))
    assert pooled[1] is maps[1]
    adversary = ClusterAdversary(5, 3, (4,))
    torch.testing.assert_close(adversary(maps), adversary(pooled))
    assert ClusterAdversary.pool_features(torch.zeros(0, 3, 2, 2))[0].shape == (0, 3)


def test_adversary_player_pools_once_for_both_steps():
    player = AdversaryPlayer(ClusterAdversary(3, 2, (4,)), None, torch.nn.CrossEntropyLoss())
    calls = []
    pool = player.unwrapped.pool_features
    # counts the calls that pool a feature map (the forward pass passes pooled (B, n) features through)
    player.unwrapped.pool_features = lambda features: calls.extend(1 for f in features if f.dim() > 2) or pool(features)

    class Out:
        features = [torch.randn(6, 3, 4, 4, requires_grad=True)]

    class Engine:
        state = type("State", (), {"output": {}})()
        _record_logging_values = True

    inputs = player.inputs(Out, None)
    assert not inputs[0].requires_grad and inputs[0].shape == (6, 3)
    term, backprop = player.main_term(Engine, Out, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert calls == [1] and term is backprop and term.requires_grad
    player.main_term(Engine, Out, torch.tensor([0, 1, 0, 1, 0, 1]))
    assert calls == [1, 1], "the pooled features are used once, then pooled again"


def test_adversary_accuracy_is_computed_where_it_is_read():
    trainer = _trainer(epochs=1)
    seen = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append("adv_accuracy" in (e.state.output or {})))
    trainer.run()
    assert "adv_accuracy" in trainer.state.output, "the last iteration of the epoch keeps it"
    assert 0.0 <= float(trainer.state.output["adv_accuracy"]) <= 1.0
    assert seen[1:-1] and not any(seen[1:]), "no handler reads the output: the other iterations skip it"

    read = _trainer(epochs=1)
    values = []
    read.add_event_handler(Events.ITERATION_COMPLETED, lambda e: values.append(float(e.state.output["adv_accuracy"])))
    read.run()
    assert len(values) == read.state.epoch_length and all(0.0 <= v <= 1.0 for v in values)


def test_image_classifier_player_plays_only_with_a_random_effects_reconstruction():
    player = ImageClassifierPlayer(torch.nn.Linear(4, 2), None, torch.nn.CrossEntropyLoss(), weight=0.0)
    assert not player.takes_part(type("Out", (), {"recon_re": None})())
    assert player.takes_part(type("Out", (), {"recon_re": torch.zeros(1)})())
    images = torch.zeros(2, 4)
    assert player.inputs(None, images) is images


def test_postprocessing_without_decollation_reads_the_iteration_as_a_dict():
    from monai.transforms import Activationsd

    trainer = _trainer(epochs=1, postprocessing=Activationsd(keys="pred", sigmoid=True))
    trainer.run()
    pred = trainer.state.output["pred"]
    assert bool(((pred > 0) & (pred < 1)).all()), "the sigmoid of the post-processing reached the prediction"
    assert "loss" in trainer.state.output[0], "the scalars are still the first item for MONAI's handlers"


def test_half_precision_feature_maps_pool_without_overflow():
    maps = torch.full((2, 8, 16, 16, 16), 20.0, dtype=torch.float16)  # a float16 sum of one channel would be inf
    pooled = ClusterAdversary.pool_features(maps)[0]
    assert pooled.dtype == torch.float16 and bool(torch.isfinite(pooled).all())
    torch.testing.assert_close(pooled.float(), torch.full((2, 8), 20.0))


def test_a_failing_adversary_step_releases_the_pooled_features():
    trainer = _trainer(epochs=1)
    player = trainer.players["adversary"]

    def fail(*args, **kwargs):
        assert player._pooled is not None, "the features are pooled for both steps"
        raise RuntimeError("adversary step failed")

    player.fit = fail
    with pytest.raises(RuntimeError, match="adversary step failed"):
        trainer.run()
    assert player._pooled is None, "no graph of the failed iteration is kept"
