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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from monai.utils import evenly_divisible_all_gather
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from monai_armed.engines.compiled import is_compiled

__all__ = ["ARMEDForward", "armed_ddp", "broadcast_buffers", "gather_shards", "gathers_shards", "is_sharded", "unwrap_armed"]


class ARMEDForward(nn.Module):
    """Adapter whose ``forward(x, cluster)`` is ``network.forward_armed(x, cluster)``, so DDP can wrap it.

    ``DistributedDataParallel`` synchronises gradients only for what runs through its own ``forward``; calling
    ``ddp.module.forward_armed`` directly would train each process on its own gradients. Wrapping this adapter instead
    (see :func:`armed_ddp`) routes ``forward_armed`` through DDP. The adapter holds no parameters of its own: save and
    evaluate the plain ``network`` (its ``state_dict`` keys carry an extra ``network.`` prefix).

    Args:
        network: a network with ``forward_armed(x, cluster) -> ARMEDOutput`` (e.g. ``MixedEffectsMLP``), not wrapped.

    Example::

        ddp = DistributedDataParallel(ARMEDForward(net), device_ids=[rank])
        out = ddp(x, cluster)               # ARMEDOutput; backward all-reduces the gradients of net
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if isinstance(network, (DistributedDataParallel, nn.DataParallel)):
            raise TypeError(
                f"ARMEDForward wraps the plain network, got a {type(network).__name__}; pass its .module "
                "(monai_armed.engines.armed_ddp adds the DistributedDataParallel wrapper)."
            )
        if not callable(getattr(network, "forward_armed", None)):
            raise TypeError(
                f"ARMEDForward needs a network with forward_armed(x, cluster); {type(network).__name__} has none."
            )
        self.network = network

    def forward(self, x: torch.Tensor, cluster: torch.Tensor) -> Any:
        return self.network.forward_armed(x, cluster)


def armed_ddp(module: nn.Module | None, **ddp_kwargs: Any) -> DistributedDataParallel | None:
    """Wrap an ``ARMEDTrainer`` module in ``DistributedDataParallel`` (after ``init_process_group``).

    A network with ``forward_armed`` is wrapped through :class:`ARMEDForward`, so that the trainer's forward pass runs
    through DDP and the gradients of the fixed and random effects are averaged over the processes. Any other module
    (the cluster adversary) is wrapped as it is; ``None`` (no adversary) stays ``None``. Pass the results to
    :class:`ARMEDTrainer` as ``network`` and ``adversary``; keep the plain modules for the optimizers, checkpoints,
    evaluators and handlers (the parameters are the same tensors).

    ``find_unused_parameters`` is not needed with the default loss weights: every parameter of ``MixedEffectsMLP``
    enters the main loss (the random effects through the mixed-effects output and the KL term, whose look-up gives
    every cluster a, possibly zero, gradient) and every adversary parameter enters its own loss. Pass
    ``find_unused_parameters=True`` when a weight of 0 drops part of the network from the loss (e.g. ``me_weight=0``
    with ``kl_weight=0`` leaves the random effects unused); DDP otherwise stops with "Expected to have finished
    reduction in the prior iteration".

    Args:
        module: the network, the adversary, or ``None``; not already wrapped.
        ddp_kwargs: ``DistributedDataParallel`` arguments (``device_ids``, ``find_unused_parameters``, ...).

    Example::

        # multi_gpu_train.json, merged on top of train.json (launch with torchrun):
        # "train#trainer#network": "$monai_armed.engines.armed_ddp(@network, device_ids=[@device])",
        # "train#trainer#adversary": "$monai_armed.engines.armed_ddp(@adversary, device_ids=[@device])",
        torch.distributed.init_process_group("nccl")
        trainer = ARMEDTrainer(
            ..., network=armed_ddp(net, device_ids=[rank]), optimizer=Adam(net.parameters()),
            adversary=armed_ddp(adversary, device_ids=[rank]), adv_optimizer=Adam(adversary.parameters()),
        )
    """
    if module is None:
        return None
    if isinstance(module, (DistributedDataParallel, nn.DataParallel)):
        raise TypeError(
            f"armed_ddp wraps the plain module, got a {type(module).__name__}; keep the configured network and "
            "adversary unwrapped (armed_ddp adds the DistributedDataParallel wrapper)."
        )
    wrapped = ARMEDForward(module) if callable(getattr(module, "forward_armed", None)) else module
    return DistributedDataParallel(wrapped, **ddp_kwargs)


def unwrap_armed(module: nn.Module) -> nn.Module:
    """The plain module inside ``torch.compile`` / ``DistributedDataParallel`` / :class:`ARMEDForward` wrappers
    (itself when unwrapped).

    Example::

        unwrap_armed(armed_ddp(net)) is net       # True
    """
    if is_compiled(module):
        module = module._orig_mod
    if isinstance(module, (DistributedDataParallel, nn.DataParallel)):
        module = module.module
    return module.network if isinstance(module, ARMEDForward) else module


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy the buffers (BatchNorm running statistics) of a ``DistributedDataParallel`` module from process ``src`` (a
    rank within the module's process group) to every process; nothing for another module, or for one built with
    ``broadcast_buffers=False``.

    DDP broadcasts rank 0's buffers at the start of each forward pass, so after the last step of an epoch every rank
    holds the statistics of its own last batch: a distributed validation would then mix as many models as there are
    ranks, and rank 0 would save another model than the one validated. ``ARMEDTrainer`` calls this at the end of
    every epoch, before validation and checkpoints.

    Example::

        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: broadcast_buffers(ddp_network))
    """
    if not isinstance(module, DistributedDataParallel) or not module.broadcast_buffers:
        return
    group = module.process_group
    source = torch.distributed.get_global_rank(group, src) if group is not None else src  # src is the group's rank
    for buffer in module.module.buffers():
        torch.distributed.broadcast(buffer, source, group=group)


def is_sharded(loader: Any) -> bool:
    """Whether ``loader`` reads one shard of the data per process (a ``DistributedSampler`` in a process group of
    several processes): what an evaluator's handlers then collect is each process's shard, unless gathered
    (:func:`gathers_shards`).

    Example::

        is_sharded(DataLoader(items, sampler=monai.data.DistributedSampler(items, even_divisible=False)))  # torchrun: True
    """
    sampler = getattr(loader, "sampler", None)
    return (
        isinstance(sampler, DistributedSampler) and dist.is_available() and dist.is_initialized()
        and dist.get_world_size() > 1
    )  # fmt: skip


def gathers_shards(loader: Any, gather_processes: bool, owner: str) -> bool:
    """Whether a handler that collects an evaluator's outputs gathers them from every process: when ``loader`` is
    sharded (:func:`is_sharded`) and the handler was asked to (``gather_processes``, which needs it attached in every
    process: the gathering is a collective call, and a handler attached on rank 0 alone would wait for ever). A sharded
    loader without it gives that process's shard alone, and a sampler that evens its shards by repeating items counts
    those twice once gathered: both are warned about (once per process).

    Example::

        if gathers_shards(engine.state.dataloader, self.gather_processes, "PerClusterAccuracy"):
            pred = gather_shards(pred, engine.state.device)
    """
    if not is_sharded(loader):
        return False
    if not gather_processes:
        warnings.warn(
            f"{owner}: the evaluator's loader reads one shard per process, so its results cover process "
            f"{dist.get_rank()}'s shard alone; pass gather_processes=True and attach it in every process for the "
            "whole set."
        )
        return False
    padding = getattr(loader.sampler, "total_size", 0) - len(loader.sampler.dataset)
    if padding:
        what = f"repeats {padding} item(s), which are counted twice" if padding > 0 else f"drops {-padding} item(s)"
        warnings.warn(
            f"{owner}: the DistributedSampler {what} to even the shards; evaluate with "
            "monai.data.DistributedSampler(even_divisible=False)."
        )
    return True


def gather_shards(tensor: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Every process's ``tensor`` (lengths may differ) concatenated along the first dimension in rank order, on the
    CPU; a collective call (``device``: where NCCL needs the tensors).

    Example::

        pred = gather_shards(local_pred, engine.state.device)   # the whole validation set on every rank
    """
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    return evenly_divisible_all_gather(tensor.to(on), concat=True).cpu()
