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
"""How ARMED trainers hand their iteration scalars (the loss parts) to MONAI's logging handlers."""

from __future__ import annotations

import numbers
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EPOCH_METRIC_PREFIX", "EpochMeans", "IterationOutput", "ScalarSums", "iteration_scalars"]

#: prefix of the per-epoch means that ARMED trainers write to ``engine.state.metrics`` (``epoch_loss``, ...)
EPOCH_METRIC_PREFIX = "epoch_"


def _is_scalar(value: Any) -> bool:
    """A number or a 0-dim tensor: a per-iteration value, not a per-sample batch entry."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


class _Scalars(dict):
    """The one item of an :class:`IterationOutput`; a missing key says where the batch entries are."""

    def __missing__(self, key: Any) -> Any:
        raise KeyError(
            f"{key!r}: the first item of an ARMED trainer's output holds only the iteration's scalars "
            f"{sorted(map(str, self))}; read batch entries by key (output_transform=lambda out: (out['pred'], "
            "out['label'])) or train with decollate=True."
        )


class IterationOutput(list):
    """``engine.state.output`` of an ARMED trainer that does not decollate: the iteration's entries by key, and a list
    whose one item holds the iteration's scalars (the loss parts).

    MONAI's handlers read the loss from the first item of a decollated output: ``StatsHandler``,
    ``TensorBoardStatsHandler`` and ``MLFlowHandler`` default to ``output_transform=lambda x: x[0]``, and bundle tracking
    (``--tracking mlflow``) and the model zoo configure ``from_engine(["loss"], first=True)``. On a plain dict the first
    fails and the second returns a tuple. Here ``output[0]`` is a dict of the scalar entries (numbers and 0-dim
    tensors: ``loss``, ``loss_me``, ``loss_adv``, ...), so those defaults log every loss part as a scalar, while the batch
    entries are read as from a dict: ``output["pred"]``, ``"loss_gen" in output``, ``output.items()``, ``output.get``.
    Iterating or ``len`` follow the list (one item); use :meth:`keys` for the entries.

    Args:
        entries: the iteration's entries (batch tensors and scalars).

    Example::

        output = IterationOutput({"pred": torch.zeros(4, 1), "loss": torch.tensor(0.7)})
        output["pred"].shape                                    # (4, 1)
        output[0]                                               # {"loss": tensor(0.7)}
        monai.handlers.from_engine(["loss"], first=True)(output)    # tensor(0.7)
    """

    def __init__(self, entries: Mapping[str, Any] | None = None) -> None:
        self._scalars = _Scalars()
        super().__init__([self._scalars])
        self._entries: dict[str, Any] = {}
        for key, value in (entries or {}).items():
            self[key] = value

    @property
    def scalars(self) -> dict[str, Any]:
        """The scalar entries (the list's one item)."""
        return self._scalars

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, slice)):
            return super().__getitem__(key)
        return self._entries[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if isinstance(key, (int, slice)):
            raise TypeError(f"IterationOutput entries are set by key, got the index {key!r}.")
        self._entries[key] = value
        if _is_scalar(value):
            self._scalars[key] = value
        elif key in self._scalars:
            del self._scalars[key]

    def __delitem__(self, key: Any) -> None:
        if isinstance(key, (int, slice)):
            raise TypeError(f"IterationOutput entries are deleted by key, got the index {key!r}.")
        del self._entries[key]
        self._scalars.pop(key, None)

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def get(self, key: str, default: Any = None) -> Any:
        return self._entries.get(key, default)

    def keys(self) -> KeysView:
        return self._entries.keys()

    def values(self) -> ValuesView:
        return self._entries.values()

    def items(self) -> ItemsView:
        return self._entries.items()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._entries!r})"


def iteration_scalars(output: Any) -> dict[str, Any]:
    """The scalar entries (numbers, 0-dim tensors) of an engine output: an :class:`IterationOutput`, a dict, or the
    first item of MONAI's decollated list (which repeats the scalars in every item, but also holds each sample's own
    numbers, such as its label: an ARMED trainer keeps its scalars alone in ``output_scalars``); ``{}`` otherwise.

    Example::

        TensorBoardStatsHandler(log_dir="runs", output_transform=iteration_scalars)    # the loss parts
    """
    if isinstance(output, IterationOutput):
        return dict(output.scalars)
    if isinstance(output, (list, tuple)) and output:
        output = output[0]
    if not isinstance(output, Mapping):
        return {}
    return {key: value for key, value in output.items() if _is_scalar(value)}


class ScalarSums:
    """Running sums and counts of scalars per key, kept on their device (no host sync per iteration).

    Example::

        sums = ScalarSums()
        sums.add("loss", torch.tensor(0.5)); sums.add("loss", 0.7)
        sums.means()                                   # {"loss": 0.6}
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def add(self, key: str, value: Any) -> None:
        """Adds one scalar (a number or a one-element tensor) under ``key``."""
        value = torch.as_tensor(value).detach().reshape(()).float()
        self.sums[key] = self.sums[key] + value.to(self.sums[key].device) if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def device(self) -> torch.device | None:
        """The device of the sums (``None`` when nothing was added)."""
        return next(iter(self.sums.values())).device if self.sums else None

    def totals(self, keys: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The sums and counts of ``keys`` as two tensors on ``device``, zero for a key never added (one shape for
        every process of an all-reduce)."""
        zero = torch.zeros((), device=device)
        sums = torch.stack([self.sums.get(k, zero).to(device) for k in keys])
        counts = torch.tensor([float(self.counts.get(k, 0)) for k in keys], device=device)
        return sums, counts

    def means(self) -> dict[str, float]:
        """The mean of every key added (one host sync)."""
        keys = list(self.sums)
        if not keys:
            return {}
        sums, counts = self.totals(keys, self.device())
        return {k: s / n for k, s, n in zip(keys, sums.tolist(), counts.tolist())}


class EpochMeans:
    """Writes, at every epoch end, the epoch's mean of each iteration scalar to ``engine.state.metrics`` as
    ``epoch_<name>``, and the learning rate of ``engine.optimizer`` as ``lr`` (``lr_group_<i>`` for further parameter
    groups), where the standard handlers' epoch logs (and ``--tracking mlflow``) pick them up.

    ARMED trainers attach it before their ``train_handlers``, so it runs first at ``EPOCH_COMPLETED``. Sums stay on the
    device (no host sync per iteration). The means are each process's own under DDP.

    Example::

        EpochMeans().attach(trainer)
        trainer.run()
        trainer.state.metrics["epoch_loss_me"], trainer.state.metrics["lr"]
    """

    def __init__(self) -> None:
        self.sums = ScalarSums()

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self.collect, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.publish)

    def reset(self, engine: Engine) -> None:
        self.sums.reset()

    def collect(self, engine: Engine) -> None:
        # an ARMED trainer keeps the scalars apart from the decollated per-sample items, where they are indistinguishable
        scalars = getattr(engine, "output_scalars", None)
        for key, value in (scalars if scalars is not None else iteration_scalars(engine.state.output)).items():
            self.sums.add(key, value)

    def publish(self, engine: Engine) -> dict[str, float]:
        """Writes (and returns) this epoch's means and the current learning rates."""
        values = {f"{EPOCH_METRIC_PREFIX}{k}": v for k, v in self.sums.means().items()}
        optimizer = getattr(engine, "optimizer", None)
        for i, group in enumerate(getattr(optimizer, "param_groups", [])):
            values["lr" if i == 0 else f"lr_group_{i}"] = float(group["lr"])
        engine.state.metrics.update(values)
        return values
