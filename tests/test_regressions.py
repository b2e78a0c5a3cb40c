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
"""Regression tests for bugs found in review (each failed before its fix)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from monai_armed.data import TensorBatchLoader
from monai_armed.handlers import RandomEffectsSummary
from monai_armed.losses import LogitClassificationLoss
from monai_armed.metrics import classification_summary
from monai_armed.networks import MixedEffectsMLP, RandomEffects, random_effects_summary
from monai_armed.transforms import ClusterVocabulary
from tests.test_engines import _models, _problem, _trainer


def test_rejected_batch_leaves_adversary_trainable_and_unchanged():
    x, y, c = _problem(16)
    y[2] = 2
    net, adv = _models()
    before = [p.detach().clone() for p in adv.parameters()]
    with pytest.raises(ValueError, match="label outside the classes"):
        _trainer(TensorBatchLoader({"features": x, "label": y, "cluster": c}, batch_size=16), net, adv, epochs=1).run()
    assert all(p.requires_grad for p in adv.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, adv.parameters()))


@pytest.mark.parametrize("mode", ["sequential", "simultaneous"])
def test_logged_loss_is_the_objective_in_both_modes(mode):
    x, y, c = _problem(64)
    net, adv = _models()
    trainer = _trainer(
        TensorBatchLoader({"features": x, "label": y, "cluster": c}, batch_size=64),
        net,
        adv,
        epochs=1,
        adversary_update=mode,
        adv_weight=0.7,
        kl_weight=1e-3,
    )
    trainer.run()
    out = trainer.state.output
    expected = out["loss_me"] + out["loss_fe"] - 0.7 * out["loss_gen"] + 1e-3 * out["loss_kl"] / 64  # ELBO: KL / N
    assert torch.allclose(out["loss"], expected, atol=1e-5)


def test_cluster_names_must_match_cluster_count():
    with pytest.raises(ValueError, match="3 cluster names for 4 clusters"):
        classification_summary(
            torch.zeros(4, 1), torch.tensor([1, 1, 1, 0]), torch.tensor([0, 3, -1, 1]), 4, ["a", "b", "c"]
        )


def test_empty_batch():
    assert RandomEffects(3, 2)(torch.zeros(0, dtype=torch.long)).shape == (0, 2)
    with pytest.raises(ValueError, match="empty batch"):
        LogitClassificationLoss()(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))


def test_vocabulary_with_non_integer_digit_like_ids_sorts_as_strings():
    assert ClusterVocabulary.from_ids(["--3", "1", "²"]).clusters == sorted(["--3", "1", "²"])
    assert ClusterVocabulary.from_ids([10, 9, -2]).clusters == ["-2", "9", "10"]


def test_random_effects_summary_written_once_per_epoch(tmp_path):
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

    net = MixedEffectsMLP(2, 1, n_clusters=3)
    engine = Engine(lambda e, b: None)
    RandomEffectsSummary(net, tmp_path / "re.json", summary_writer=Writer()).attach(engine)
    engine.run([0], max_epochs=2)
    assert len(calls) == len(set(calls)) and {step for _, step in calls} == {1, 2}


def test_summary_of_network_without_random_effects_keeps_cluster_names():
    net = MixedEffectsMLP.from_variant("conventional", in_features=2, out_channels=1, n_clusters=3)
    assert random_effects_summary(net)["clusters"] == ["0", "1", "2"]


def test_trainer_rejects_data_parallel_wrapper():
    net, adv = _models()
    with pytest.raises(TypeError, match="unwrapped network"):
        _trainer(TensorBatchLoader({"features": torch.zeros(4, 2)}, batch_size=2), torch.nn.DataParallel(net), adv)


def test_check_cluster_index_is_shared_by_lookup_and_one_hot():
    from monai_armed.networks import cluster_one_hot
    from monai_armed.networks.layers import check_cluster_index

    assert check_cluster_index(torch.tensor([2, -1, 0]), 3) == -1
    assert check_cluster_index(torch.zeros(0, dtype=torch.long), 3) == 0
    assert cluster_one_hot(torch.zeros(0, dtype=torch.long), 3).shape == (0, 3)
    for fn in (lambda i: RandomEffects(3, 2)(i), lambda i: cluster_one_hot(i, 3)):
        with pytest.raises(IndexError, match=r"cluster index 3 is out of range: expected -1 \(unseen\) or 0..2"):
            fn(torch.tensor([0, 3]))


def test_prepare_cluster_batch_handles_two_and_four_element_batches():
    from types import SimpleNamespace

    from monai_armed.engines import prepare_cluster_batch

    x, y, c = torch.zeros(2, 2), torch.zeros(2), torch.tensor([0, 1])
    state = SimpleNamespace(device="cpu")
    four = SimpleNamespace(
        state=state, non_blocking=False, to_kwargs={}, prepare_batch=lambda *a, **k: (x, y, (), {"cluster": c})
    )
    two = SimpleNamespace(state=state, non_blocking=False, to_kwargs={}, prepare_batch=lambda *a, **k: (x, y))
    assert prepare_cluster_batch(four, {})[2] is c
    assert prepare_cluster_batch(two, {})[2] is None
    with pytest.raises(ValueError, match="Must provide batch data"):
        prepare_cluster_batch(two, None)
