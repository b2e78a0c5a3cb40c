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

from collections.abc import Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["LazyAdam"]


class LazyAdam(Optimizer):
    """Adam that accepts dense and sparse gradients and, for sparse ones, updates only the rows they touch.

    A random-effects table with a million levels gets a sparse gradient of the few rows in a batch (``RandomEffects(...,
    sparse=True)``); ``torch.optim.Adam`` refuses sparse gradients and ``torch.optim.SparseAdam`` refuses dense ones.
    Here each row keeps its own step count, so a row is updated exactly as Adam would update a parameter that received
    only that row's gradients (no decay of the moments of rows a step did not touch, and a first update of the usual
    size ``lr`` however late a level first appears). A dense gradient counts as a step of every row, so dense
    parameters follow plain Adam. The cost of a step is proportional to the rows touched, not to the table.

    ``rowwise=True`` keeps one second-moment value per row of a table (the mean of the row's squared gradients, as
    row-wise Adagrad does for embedding tables) instead of one per entry, which saves a third of the optimizer's
    memory on a large random-effects table; vectors and scalars keep Adam's per-entry moments.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: Adam's moment decay rates.
        eps: term added to the denominator.
        rowwise: one second moment per row of a matrix parameter (see above).

    Example::

        net = MixedEffectsMLP(10, 1, n_clusters=1_000_000, re_kwargs={"sparse": True})
        optimizer = LazyAdam(net.parameters(), lr=1e-3)
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rowwise: bool = False,
    ) -> None:
        if lr < 0 or eps <= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LazyAdam needs lr >= 0, eps > 0 and betas in [0, 1), got lr={lr}, betas={betas}, eps={eps}.")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "rowwise": rowwise})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        beta1, beta2 = group["betas"]
        # a channels_last (non-contiguous) parameter is stepped as a contiguous copy and written back
        work = param if param.is_contiguous() else param.contiguous()
        table = work.view(1, -1) if work.dim() < 2 else work.view(work.shape[0], -1)
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros(table.shape[0], dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(work)
            rowwise = group["rowwise"] and param.dim() >= 2
            state["exp_avg_sq"] = param.new_zeros(table.shape[0], 1) if rowwise else torch.zeros_like(work)
        if state["step"].dim() != 1:
            raise ValueError(
                "LazyAdam: the optimizer state holds a single step count per parameter, as torch.optim.Adam's does; "
                "LazyAdam keeps one per row and cannot continue from another optimizer's state_dict."
            )
        if state["step"].device != param.device:  # load_state_dict leaves a per-row tensor where it was saved
            state["step"] = state["step"].to(param.device)
        exp_avg = state["exp_avg"].view(table.shape)
        exp_avg_sq = state["exp_avg_sq"].view(table.shape[0], -1)
        grad = param.grad
        if grad.is_sparse:
            if grad.sparse_dim() != 1 or param.dim() < 2:
                raise ValueError(
                    f"LazyAdam takes sparse gradients over the rows of a matrix (nn.Embedding(sparse=True)); got one "
                    f"with {grad.sparse_dim()} sparse dimension(s) for a parameter of shape {tuple(param.shape)}."
                )
            grad = grad.coalesce()
            rows = grad.indices()[0]
            if rows.numel() == 0:  # a zeroed sparse gradient: nothing touched this step
                return
            values = grad.values().reshape(rows.shape[0], table.shape[1])
        else:
            rows = None
            values = grad.reshape(table.shape)
        steps = state["step"] if rows is None else state["step"][rows]
        steps = steps + 1
        avg = (exp_avg if rows is None else exp_avg[rows]).mul(beta1).add_(values, alpha=1 - beta1)
        squares = values * values
        if exp_avg_sq.shape[1] != squares.shape[1]:  # row-wise second moment
            squares = squares.mean(1, keepdim=True)
        avg_sq = (exp_avg_sq if rows is None else exp_avg_sq[rows]).mul(beta2).add_(squares, alpha=1 - beta2)
        # in float64, as torch's Adam computes them: beta2 = 0.999 in float32 shrinks the first steps by 1e-5
        exponent = steps.double().unsqueeze(1)
        correction1 = (1 - beta1**exponent).to(avg.dtype)
        correction2 = (1 - beta2**exponent).to(avg.dtype)
        update = (avg / correction1) / ((avg_sq / correction2).sqrt_().add_(group["eps"]))
        if rows is None:
            state["step"].copy_(steps)
            exp_avg.copy_(avg)
            exp_avg_sq.copy_(avg_sq)
            table.sub_(update, alpha=group["lr"])
        else:
            state["step"][rows] = steps
            exp_avg[rows] = avg
            exp_avg_sq[rows] = avg_sq
            table.index_add_(0, rows, update, alpha=-group["lr"])
        if work is not param:
            param.copy_(work)
