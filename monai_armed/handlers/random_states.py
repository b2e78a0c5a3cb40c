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
"""The random-number state of a training run, as a checkpoint entry, so that a resumed run continues exactly."""

from __future__ import annotations

import logging
import random
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.transforms import Randomizable

__all__ = ["RandomStates"]

logger = logging.getLogger(__name__)

# objects whose insides hold no random state of a data pipeline (and can be large)
_LEAVES = (str, bytes, int, float, bool, type(None), torch.Tensor, np.ndarray, torch.nn.Module, types.ModuleType, type)
# containers longer than this hold data items, not transforms
_MAX_CONTAINER = 64
_MAX_DEPTH = 10


def _numpy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A numpy ``RandomState.get_state(legacy=False)`` dict with its key array as a tensor (``weights_only`` safe)."""
    return {**state, "state": {**state["state"], "key": torch.from_numpy(state["state"]["key"].astype(np.int64))}}


def _from_numpy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    key = np.asarray(state["state"]["key"].numpy(), dtype=np.uint32)
    return {**state, "state": {**state["state"], "key": key}}


def _children(obj: Any) -> Sequence[Any]:
    if isinstance(obj, Mapping):
        return list(obj.values()) if len(obj) <= _MAX_CONTAINER else []
    if isinstance(obj, (list, tuple)):
        return list(obj) if len(obj) <= _MAX_CONTAINER else []
    attributes = getattr(obj, "__dict__", None)
    # private attributes are caches and iterators (e.g. CacheDataset._cache), not parts of the pipeline
    return [v for k, v in attributes.items() if not k.startswith("_")] if isinstance(attributes, dict) else []


def _walk(obj: Any, seen: set[int], depth: int = 0) -> Iterator[Any]:
    if depth > _MAX_DEPTH or isinstance(obj, _LEAVES) or id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    if not isinstance(obj, torch.Generator):
        for child in _children(obj):
            yield from _walk(child, seen, depth + 1)


class RandomStates:
    """Captures and restores every random-number state a training run draws from, as an entry of a checkpoint.

    :meth:`state_dict` holds Python's ``random``, numpy's global state, torch's CPU (and CUDA) generator, the
    ``RandomState`` of every MONAI ``Randomizable`` transform and every ``torch.Generator`` reachable from ``sources``
    (data loaders, datasets, transforms, e.g. a shuffling :class:`~monai_armed.data.TensorBatchLoader`). A
    ``DataLoader`` with ``shuffle=True`` and no generator draws each epoch's order from torch's global generator, and
    its workers' seeds too, so those are covered. Put it into the ``save_dict`` of the resume checkpoint (saved at the
    end of an epoch, after validation) and into the ``load_dict`` of the ``CheckpointLoader``: the resumed run then
    draws the same shuffles, augmentations and random-effect samples as an uninterrupted one.

    Everything is stored as tensors and plain Python types, so the checkpoint loads with ``weights_only=True``.

    Under ``torch.distributed`` each rank draws its own streams (seed each rank differently, e.g. ``seed + rank``, so
    that the ranks' random-effect samples, dropout and augmentations are not copies of each other), while only rank 0
    saves the checkpoint. :meth:`attach` it to the trainer on every rank, after the validation handlers and before the
    checkpoint saver: at each epoch's end the ranks then exchange their states, rank 0's checkpoint holds every rank's
    (``{"ranks": [state of rank 0, state of rank 1, ...]}``) and each rank restores its own. A rank that a checkpoint
    holds no state of (one of a single process or of fewer ranks, e.g. from monai-armed 0.7) starts from rank
    ``rank % n``'s and re-seeds every stream from it and its own rank: no two ranks draw the same numbers. Whenever
    the checkpoint's number of processes differs from the run's, a warning says that the run does not continue exactly.

    Args:
        sources: objects to search for randomizable transforms and generators (public attributes, containers of up
            to 64 items, 10 levels deep; private attributes such as caches are skipped).

    Example::

        rng = RandomStates([train_loader])
        saver = CheckpointSaver("models", {"model": net, "trainer": trainer, "rng": rng}, save_interval=1,
                                file_prefix="resume")
        loader = CheckpointLoader("models/resume_checkpoint_epoch=2.pt", {"model": net, "trainer": trainer, "rng": rng})
        rng.attach(trainer)   # under torch.distributed, on every rank, before saver.attach(trainer) on rank 0
    """

    def __init__(self, sources: Sequence[Any] = ()) -> None:
        self.sources = list(sources)
        self._ranks: list[dict[str, Any]] | None = None

    def attach(self, engine: Engine) -> None:
        """Exchange the ranks' states at every epoch's end (a collective: on every rank) when ``torch.distributed`` is
        initialised with several ranks; otherwise nothing is attached."""
        if _world_size() > 1:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.gather)

    def gather(self, engine: Engine | None = None) -> None:
        """Collect every rank's current state (a collective) for the next :meth:`state_dict` of rank 0."""
        ranks: list[Any] = [None] * _world_size()
        dist.all_gather_object(ranks, self._local_state_dict())
        self._ranks = ranks

    def _stateful(self) -> tuple[list[Randomizable], list[torch.Generator]]:
        seen: set[int] = set()
        found = [item for source in self.sources for item in _walk(source, seen)]
        transforms = [t for t in found if isinstance(t, Randomizable) and isinstance(t.R, np.random.RandomState)]
        generators = [g for g in found if isinstance(g, torch.Generator)]
        return transforms, generators

    def state_dict(self) -> dict[str, Any]:
        """This process's states or, after :meth:`gather`, every rank's (this rank's taken now)."""
        local = self._local_state_dict()
        if self._ranks is None:
            return local
        ranks = list(self._ranks)
        ranks[_rank()] = local
        return {"ranks": ranks}

    def _local_state_dict(self) -> dict[str, Any]:
        transforms, generators = self._stateful()
        state: dict[str, Any] = {
            "python": random.getstate(),
            "numpy": _numpy_state(np.random.get_state(legacy=False)),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state(t.R.get_state(legacy=False)) for t in transforms],
            "generators": [g.get_state() for g in generators],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore this process's states: its own rank's from a checkpoint of several ranks. A rank the checkpoint has
        no state of (a checkpoint of one process, or of fewer ranks) starts from one that it has and then re-seeds
        every stream from it and its own rank, so that no two ranks draw the same numbers."""
        rank, ranks = _rank(), state_dict["ranks"] if "ranks" in state_dict else [state_dict]
        source = rank % len(ranks)
        self._restore(ranks[source])
        if len(ranks) != _world_size():
            how = f"re-seeds its streams from those of rank {source} and its own rank" if source != rank else "takes its own"
            logger.warning(
                f"the checkpoint holds the random states of {len(ranks)} process(es), this run has {_world_size()}: rank "
                f"{rank} {how}, so the run does not continue exactly as the checkpoint's would."
            )
        if source != rank:
            self._reseed(rank)

    def _reseed(self, rank: int) -> None:
        """Re-seed every stream from a number drawn from the restored torch stream and ``rank``."""
        transforms, generators = self._stateful()
        key = int(torch.randint(0, 2**62, (1,)).item())
        seeds = [int(s) for s in np.random.SeedSequence([key, rank]).generate_state(3 + len(transforms) + len(generators))]
        random.seed(seeds[0])
        np.random.seed(seeds[1])
        torch.manual_seed(seeds[2])  # CUDA too
        for transform, seed in zip(transforms, seeds[3:]):
            transform.R.seed(seed)
        for generator, seed in zip(generators, seeds[3 + len(transforms) :]):
            generator.manual_seed(seed)

    def _restore(self, state_dict: Mapping[str, Any]) -> None:
        transforms, generators = self._stateful()
        saved_transforms, saved_generators = state_dict["transforms"], state_dict["generators"]
        if len(transforms) != len(saved_transforms) or len(generators) != len(saved_generators):
            raise ValueError(
                f"the checkpoint holds the random states of {len(saved_transforms)} randomizable transform(s) and "
                f"{len(saved_generators)} generator(s), but this run's data pipeline has {len(transforms)} and "
                f"{len(generators)}: resume with the same configuration as the interrupted run."
            )
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state(_from_numpy_state(state_dict["numpy"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        for transform, saved in zip(transforms, saved_transforms):
            transform.R.set_state(_from_numpy_state(saved))
        for generator, saved in zip(generators, saved_generators):
            generator.set_state(saved)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
