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

import pytest
import torch
import torch.nn as nn

from monai_armed.engines.mldg import MLDG_DEFAULTS, _epoch_schedule, train_mldg


def _toy_problem(points: int = 240) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two clusters, shifted copies of one problem separable with a margin by the line x0 + x1 = 0."""
    g = torch.Generator().manual_seed(7)
    clusters = torch.arange(points) % 2
    labels = (torch.arange(points) // 2 % 2).float()
    side = (2 * labels - 1).unsqueeze(1)
    x = side * (torch.randn(points, 2, generator=g).abs() + 0.2)
    return x + 0.1 * clusters.unsqueeze(1).float(), labels, clusters


def _mlp(out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, out))


def _weights(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


@pytest.fixture(scope="module")
def trained():
    x, y, z = _toy_problem()
    net = _mlp()
    history = train_mldg(net, x, y, z, epochs=6, cluster_batch_size=8, inner_lr=1e-2, outer_lr=2e-2)
    return net, history, (x, y, z)


def test_defaults():
    assert MLDG_DEFAULTS == {
        "epochs": 10,
        "cluster_batch_size": 4,
        "inner_lr": 1e-3,
        "outer_lr": 1e-3,
        "meta_test_weight": 1.0,
    }


def test_accuracy_on_separable_toy(trained):
    net, _, (x, y, _) = trained
    with torch.no_grad():
        accuracy = ((net(x).squeeze(1) > 0).float() == y).float().mean()
    assert accuracy > 0.9


def test_history_loss_decreases(trained):
    _, history, _ = trained
    assert set(history) == {"loss", "meta_test_loss"}
    assert len(history["loss"]) == len(history["meta_test_loss"]) == 6
    assert history["loss"][-1] < history["loss"][0]


def test_schedule_covers_each_cluster_once_then_repeats_its_own():
    clusters = torch.tensor([0] * 5 + [1] * 11 + [2] * 2)
    schedule, test_clusters = _epoch_schedule(clusters, 3, 4, torch.Generator().manual_seed(0))
    assert schedule.shape == (3, 3, 4) and test_clusters.shape == (3,)
    for k in range(3):
        first = schedule[k, : -(-int((clusters == k).sum()) // 4)]
        first = first[first >= 0]
        assert sorted(first.tolist()) == (clusters == k).nonzero().flatten().tolist()
        used = schedule[k][schedule[k] >= 0]
        assert bool((clusters[used] == k).all())


def test_second_order_runs_and_differs_from_first_order():
    x, y, z = _toy_problem(64)
    start = _weights(_mlp())
    second, first = _mlp(), _mlp()
    kwargs = dict(epochs=1, cluster_batch_size=8, inner_lr=0.5, outer_lr=1e-2)
    train_mldg(second, x, y, z, first_order=False, **kwargs)
    train_mldg(first, x, y, z, first_order=True, **kwargs)
    assert not torch.allclose(_weights(second), start)
    assert not torch.allclose(_weights(second), _weights(first))


def test_multiclass_default_loss_and_custom_loss():
    x, y, z = _toy_problem(64)
    net = _mlp(out=3)
    history = train_mldg(net, x, y.long(), z, epochs=1, cluster_batch_size=8)
    assert len(history["loss"]) == 1
    calls = []

    def loss(logits, target):
        calls.append(logits.shape[0])
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), target)

    train_mldg(_mlp(), x, y, z, epochs=1, cluster_batch_size=8, loss_function=loss)
    assert len(calls) == 2 * 4 and calls[:2] == [8, 8]


def test_same_seed_is_deterministic():
    x, y, z = _toy_problem(64)
    nets = [_mlp() for _ in range(3)]
    for net, seed in zip(nets, (3, 3, 4)):
        train_mldg(net, x, y, z, epochs=2, cluster_batch_size=8, seed=seed, outer_lr=1e-2)
    assert torch.equal(_weights(nets[0]), _weights(nets[1]))
    assert not torch.equal(_weights(nets[0]), _weights(nets[2]))


@pytest.mark.parametrize(
    "n_labels, clusters, message",
    [
        (9, torch.tensor([0, 1] * 5), "same length, got 10, 9 and 10"),
        (10, torch.zeros(10, dtype=torch.long), "MLDG needs at least 2 clusters"),
        (10, torch.tensor([0, 1, -1, 0, 1, 0, 1, 0, 1, 0]), r"unseen \(-1\) clusters cannot be used for training"),
        (10, torch.tensor([0.2, 0.7] * 5), "fractional values"),
    ],
)
def test_bad_inputs_raise(n_labels, clusters, message):
    with pytest.raises(ValueError, match=message):
        train_mldg(_mlp(), torch.randn(10, 2), torch.zeros(n_labels), clusters, epochs=1)


def test_a_cluster_batch_of_zero_is_refused():
    with pytest.raises(ValueError, match="cluster_batch_size must be >= 1"):
        train_mldg(_mlp(), torch.randn(10, 2), torch.zeros(10), torch.tensor([0, 1] * 5), cluster_batch_size=0)
