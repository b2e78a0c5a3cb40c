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
import torch.nn.functional as F

from monai_armed.networks.layers import RandomEffects
from monai_armed.optimizers import LazyAdam


def _quadratic_grads(param: torch.Tensor, step: int) -> torch.Tensor:
    return torch.sin(param * (step + 1)) + 0.1 * step


def test_dense_parameters_follow_adam():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    scalar_a = torch.nn.Parameter(torch.tensor(0.7))
    scalar_b = torch.nn.Parameter(torch.tensor(0.7))
    lazy = LazyAdam([a, scalar_a], lr=0.05)
    adam = torch.optim.Adam([b, scalar_b], lr=0.05)
    for step in range(6):
        a.grad, b.grad = _quadratic_grads(a.detach(), step), _quadratic_grads(b.detach(), step)
        scalar_a.grad = scalar_b.grad = torch.tensor(0.3 - step)
        lazy.step()
        adam.step()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(scalar_a, scalar_b)


def test_sparse_rows_update_like_adam_on_their_own_gradients():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(6, 2))
    start = table.detach().clone()
    lazy = LazyAdam([table], lr=0.1)
    # row 4 only from step 3 on; rows 0 and 1 every step; the others never
    reference = torch.nn.Parameter(start[4].clone())
    adam = torch.optim.Adam([reference], lr=0.1)
    for step in range(6):
        index = torch.tensor([0, 1, 1] + ([4] if step >= 3 else []))
        loss = (F.embedding(index, table, sparse=True) ** 2).sum() * (step + 1)
        lazy.zero_grad()
        loss.backward()
        assert table.grad.is_sparse
        lazy.step()
        if step >= 3:
            adam.zero_grad()
            ((reference**2).sum() * (step + 1)).backward()
            adam.step()
    torch.testing.assert_close(table.detach()[[2, 3, 5]], start[[2, 3, 5]], rtol=0, atol=0)
    torch.testing.assert_close(table.detach()[4], reference.detach(), rtol=1e-5, atol=1e-6)
    assert not torch.equal(table.detach()[0], start[0])


def test_sparse_random_effects_train_with_lazy_adam():
    torch.manual_seed(0)
    re = RandomEffects(1000, 3, covariance="full", learn_prior_scale=True, level_counts=torch.full((1000,), 5.0),
                       sparse=True)
    optimizer = LazyAdam(re.parameters(), lr=0.01)
    before = re.loc.detach().clone()
    index = torch.tensor([3, 3, 17])
    loss = re(index).sum() + re.kl_divergence(index)
    loss.backward()
    assert re.loc.grad.is_sparse and re.rho.grad.is_sparse and re.tril.grad.is_sparse
    assert not re.log_prior_scale.grad.is_sparse
    optimizer.step()
    changed = (re.loc.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [3, 17]


@pytest.mark.parametrize("covariance", ["diagonal", "full"])
def test_unseen_rows_of_a_sparse_table_touch_no_level(covariance):
    # a -1 row was gathered as level 0 (then zeroed): the sparse gradient listed level 0, and LazyAdam stepped it
    torch.manual_seed(0)
    re = RandomEffects(5, 2, covariance=covariance, level_counts=torch.full((5,), 4.0), sparse=True)
    optimizer = LazyAdam(re.parameters(), lr=0.1)
    index = torch.tensor([3, -1, 3, -1])
    design = torch.ones(4, 2)
    for train in (True, False):
        re.train(train)
        optimizer.zero_grad()
        mean, var = re.linear_predictor(index, design)
        effects = re(index)
        assert effects[[1, 3]].abs().sum() == 0 and mean[1] == 0 and var[3] == 0
        (effects.sum() + mean.sum() + var.sum() + re.kl_divergence(index)).backward()
        for table in (re.loc, re.rho) + ((re.tril,) if covariance == "full" else ()):
            assert table.grad.coalesce().indices().unique().tolist() == [3]
    before = re.loc.detach().clone()
    optimizer.step()
    assert (re.loc.detach() != before).any(1).nonzero().flatten().tolist() == [3]
    assert optimizer.state[re.loc]["step"].tolist() == [0, 0, 0, 1, 0]
    with torch.no_grad():  # a batch of unseen rows alone: zero effects and KL
        assert re(torch.tensor([-1, -1])).abs().sum() == 0 and re.kl_divergence(torch.tensor([-1])) == 0


def test_a_batch_of_unseen_rows_alone_moves_no_level_of_a_sparse_table():
    from monai_armed.utils import batch_checks

    torch.manual_seed(0)
    re = RandomEffects(5, 2, level_counts=torch.ones(5), sparse=True).train()
    optimizer = LazyAdam(re.parameters(), lr=0.1)
    (re(torch.tensor([0, 1])).sum() + re.kl_divergence(torch.tensor([0, 1]))).backward()
    optimizer.step()
    before = re.loc.detach().clone()
    for checked in (True, False):  # a CPU batch is read for free, checked or not
        with batch_checks(checked):
            optimizer.zero_grad()
            unseen = torch.tensor([-1, -1])
            effects, (mean, var) = re(unseen), re.linear_predictor(unseen, torch.ones(2, 2))
            assert effects.abs().sum() == 0 and mean.abs().sum() == 0 and var.abs().sum() == 0
            assert not effects.requires_grad and not re.kl_divergence(unseen).requires_grad  # no level in the graph
            optimizer.step()
    torch.testing.assert_close(re.loc.detach(), before, rtol=0, atol=0)  # level 0 was not stepped by its momentum


def test_a_zeroed_sparse_gradient_is_a_no_op():
    table = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = LazyAdam([table], lr=0.1)
    F.embedding(torch.tensor([1]), table, sparse=True).sum().backward()
    optimizer.step()
    after_first = table.detach().clone()
    optimizer.zero_grad(set_to_none=False)  # MONAI's default leaves a sparse gradient with no entries
    optimizer.step()
    assert torch.equal(table.detach(), after_first)


def test_dense_float64_parameters_match_adam_to_double_precision():
    # the bias corrections are computed in float64: in float32, 1 - 0.999 shrank every early step by 1e-5
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(a.detach().clone())
    lazy, adam = LazyAdam([a], lr=1e-2), torch.optim.Adam([b], lr=1e-2)
    for step in range(20):
        a.grad, b.grad = _quadratic_grads(a.detach(), step), _quadratic_grads(b.detach(), step)
        lazy.step()
        adam.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_channels_last_parameters_step_like_adam():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    reference = torch.nn.Conv2d(3, 4, 3)
    reference.load_state_dict(conv.state_dict())
    lazy, adam = LazyAdam(conv.parameters(), lr=0.1), torch.optim.Adam(reference.parameters(), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        for net, optimizer, image in ((conv, lazy, x.to(memory_format=torch.channels_last)), (reference, adam, x)):
            optimizer.zero_grad()
            net(image).pow(2).sum().backward()
            optimizer.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv.weight, reference.weight, rtol=1e-4, atol=1e-6)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="lr >= 0"):
        LazyAdam([torch.nn.Parameter(torch.zeros(1))], lr=-1.0)
    frozen = torch.nn.Parameter(torch.ones(2))
    optimizer = LazyAdam([frozen], lr=0.0)  # a frozen group, or a warm-up's first value
    frozen.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(frozen.detach(), torch.ones(2))


def test_refuses_another_optimizers_state_and_unsupported_sparse_gradients():
    weight = torch.nn.Parameter(torch.zeros(3, 2))
    adam = torch.optim.Adam([weight])
    weight.grad = torch.ones(3, 2)
    adam.step()
    lazy = LazyAdam([weight])
    lazy.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="another optimizer's state_dict"):
        lazy.step()
    vector = torch.nn.Parameter(torch.zeros(5))
    vector.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2), (5,), check_invariants=True)
    with pytest.raises(ValueError, match="rows of a matrix"):
        LazyAdam([vector]).step()


def test_rowwise_second_moment_is_one_value_per_row():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(50, 8))
    bias = torch.nn.Parameter(torch.zeros(8))
    optimizer = LazyAdam([table, bias], lr=0.1, rowwise=True)
    index = torch.tensor([1, 7, 7])
    loss = (F.embedding(index, table, sparse=True) - 1).pow(2).sum() + bias.pow(2).sum()
    loss.backward()
    before = table.detach().clone()
    optimizer.step()
    assert optimizer.state[table]["exp_avg_sq"].shape == (50, 1)
    assert optimizer.state[bias]["exp_avg_sq"].shape == (8,)
    # the first step of a row moves each entry by lr * g / rms(g of the row): a smaller step for its smaller entries
    grad = 2 * (before[[1]] - 1)
    expected = before[1] - 0.1 * grad[0] / grad[0].pow(2).mean().sqrt()
    torch.testing.assert_close(table.detach()[1], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(table.detach()[[0, 2]], before[[0, 2]], rtol=0, atol=0)
