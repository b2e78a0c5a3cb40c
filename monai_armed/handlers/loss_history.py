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

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.engines.autoencoder_trainer import AEC_LOSS_KEYS
from monai_armed.engines.output import ScalarSums
from monai_armed.engines.trainer import ARMEDKeys
from monai_armed.utils import write_json

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["LOSS_KEYS", "LossHistory"]

#: the scalar parts of an ``ARMEDTrainer`` or ``ARMEDAutoencoderTrainer`` output (``SupervisedTrainer``: ``loss``)
LOSS_KEYS = tuple(
    dict.fromkeys(
        (
            "loss",
            ARMEDKeys.LOSS_ME,
            ARMEDKeys.LOSS_FE,
            ARMEDKeys.LOSS_ADV,
            ARMEDKeys.LOSS_GEN,
            ARMEDKeys.LOSS_KL,
            ARMEDKeys.ADV_ACCURACY,
            *AEC_LOSS_KEYS,
        )
    )
)


class LossHistory:
    """Records the per-epoch mean of scalar entries of ``engine.state.output`` (the loss parts) and writes them as JSON.

    At every iteration it adds up the chosen scalars (on the engine's device, so no per-iteration host sync); at every
    epoch end it appends their means over the epoch's iterations to :attr:`history` and writes ``output_file`` as
    ``{"epoch": [1, 2, ...], "loss": [...], "loss_kl": [...], ...}`` (one list per key, ``null`` for an epoch in which
    a key was absent). Decollated outputs (a list of per-sample dicts, in which MONAI replicates the scalars) are read
    from their first item.

    Under ``torch.distributed`` (e.g. DDP, where each process logs the losses of its own shard) the sums and counts are
    all-reduced, so the means are over the iterations of every process (of those that output the key), and only rank 0
    writes the file; attach the handler in every process then (the reduction is a collective call). With equal local
    batches (a ``DistributedSampler``) this is the mean per-iteration loss over the global batches.

    A resumed run (e.g. a ``CheckpointLoader`` that restores the trainer's epoch) keeps the epochs of an existing
    ``output_file`` that precede the first epoch it trains; an epoch trained again replaces the one recorded.

    Args:
        output_file: JSON path, or ``None`` to keep the history in memory only.
        keys: entries to record; each must be in every iteration's output. ``None`` (default): those of
            :data:`LOSS_KEYS` that the output has (e.g. no adversarial terms without an adversary).
        average_processes: all-reduce over the processes when ``torch.distributed`` is initialised; ``False``
            records each process's own losses (rank 0's file holds rank 0's).

    Example::

        history = LossHistory("eval/loss_history.json")
        history.attach(trainer)
        trainer.run()
        history.history["loss_me"]              # [0.69, 0.61, ...], one mean per epoch
    """

    def __init__(
        self,
        output_file: str | os.PathLike | None,
        keys: Sequence[str] | None = None,
        average_processes: bool = True,
    ) -> None:
        if isinstance(keys, str):
            raise TypeError(f"LossHistory keys must be a sequence of output keys, got the string {keys!r}.")
        self.output_file = output_file
        self.keys = tuple(keys) if keys is not None else None
        self.average_processes = average_processes
        self.history: dict[str, list[float | None]] = {"epoch": []}
        self._sums = ScalarSums()
        self._first_epoch = True

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.collect, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.finalize)

    def reset(self, engine: Engine) -> None:
        """Starts an epoch; at the first epoch of a resumed run, reloads the earlier epochs from ``output_file``."""
        self._sums.reset()
        if self._first_epoch:
            self._first_epoch = False
            if engine.state.epoch > 1 and not self.history["epoch"]:
                self._reload(engine.state.epoch)

    def collect(self, engine: Engine) -> None:
        """Adds the chosen scalars of this iteration's output."""
        output = engine.state.output
        if isinstance(output, (list, tuple)) and output:
            output = output[0]  # decollated: every item holds the same scalars
        if not isinstance(output, Mapping):
            raise TypeError(
                f"LossHistory needs engine.state.output to be a dict (or a decollated list of dicts), "
                f"got {type(output).__name__}."
            )
        if self.keys is None:
            keys = [k for k in LOSS_KEYS if k in output]
        else:
            missing = [k for k in self.keys if k not in output]
            if missing:
                raise KeyError(f"LossHistory: engine.state.output has no {missing}; it has {sorted(map(str, output))}.")
            keys = list(self.keys)
        for key in keys:
            value = torch.as_tensor(output[key]).detach()
            if value.numel() != 1:
                raise ValueError(
                    f"LossHistory records scalars; engine.state.output[{key!r}] has shape {tuple(value.shape)}."
                )
            self._sums.add(key, value)

    def finalize(self, engine: Engine) -> dict[str, float] | None:
        """Appends this epoch's means to :attr:`history`, writes ``output_file`` (rank 0); returns the means."""
        keys = list(self.keys) if self.keys is not None else list(LOSS_KEYS)
        distributed = dist.is_available() and dist.is_initialized()
        reduce = self.average_processes and distributed and dist.get_world_size() > 1
        if not self._sums.sums and not reduce:
            return None
        # every process reduces one value per possible key (zero when absent), so the collective has one shape
        sums, counts = self._sums.totals(keys, self._sums.device() or _reduce_device())
        if reduce:
            totals = torch.cat([sums, counts])
            dist.all_reduce(totals)
            sums, counts = totals[: len(keys)], totals[len(keys) :]
        means = {k: s / n for k, s, n in zip(keys, sums.tolist(), counts.tolist()) if n > 0}
        if not means:
            return None
        self._append(engine.state.epoch, means)
        if self.output_file is not None and (not distributed or dist.get_rank() == 0):
            write_json(self.history, self.output_file)
        return means

    def _append(self, epoch: int, means: Mapping[str, float]) -> None:
        # an engine restored to an earlier epoch (the same handler on a resumed or restarted run) trains it again
        keep = [i for i, e in enumerate(self.history["epoch"]) if e < epoch]
        if len(keep) < len(self.history["epoch"]):
            self.history = {k: [v[i] for i in keep] for k, v in self.history.items()}
        n_before = len(self.history["epoch"])
        self.history["epoch"].append(epoch)
        for key in means:
            self.history.setdefault(key, [None] * n_before)
        for key, values in self.history.items():
            if key != "epoch":
                values.append(means.get(key))

    def _reload(self, epoch: int) -> None:
        """Keeps the epochs before ``epoch`` of an existing ``output_file`` (a resumed run)."""
        if self.output_file is None or not os.path.isfile(self.output_file):
            return
        try:
            with open(self.output_file, encoding="utf-8") as f:
                previous: Any = json.load(f)
            epochs = [int(e) for e in previous["epoch"]]
            columns = {k: list(v) for k, v in previous.items() if k != "epoch"}
            if any(len(v) != len(epochs) for v in columns.values()):
                raise ValueError("columns of different lengths")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"LossHistory: cannot resume from {self.output_file}: expected JSON with an 'epoch' list and one list "
                f"per key of the same length ({error}); move the file away to start a new history."
            ) from error
        keep = [i for i, e in enumerate(epochs) if e < epoch]
        self.history = {"epoch": [epochs[i] for i in keep], **{k: [v[i] for i in keep] for k, v in columns.items()}}


def _reduce_device() -> torch.device:
    """Where a process that recorded nothing puts its zeros for the all-reduce (NCCL reduces CUDA tensors only)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
