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

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

__all__ = ["TensorBatchLoader"]


class TensorBatchLoader:
    """Minibatches of in-memory tensors, for tabular data where a ``DataLoader``'s per-sample collation dominates.

    Holds each key as one stacked tensor and yields ``{key: tensor[index]}`` dictionaries, reshuffled every epoch with
    its own seeded generator. Works as ``train_data_loader`` / ``val_data_loader`` of MONAI engines.

    Args:
        data: a mapping ``{key: array (N, ...)}`` or a datalist (sequence of dicts with the same keys; numeric values).
        batch_size: samples per batch.
        shuffle: reshuffle at every epoch.
        drop_last: drop the last incomplete batch.
        seed: seed of the shuffling.
        keys: keys to keep from a datalist (default: all).

    Example::

        loader = TensorBatchLoader({"features": x, "label": y, "cluster": c}, batch_size=32, shuffle=True)
        for batch in loader:
            batch["features"].shape      # (32, F)
    """

    def __init__(
        self,
        data: Mapping[str, Sequence] | Sequence[Mapping],
        batch_size: int = 32,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        keys: Sequence[str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        columns = data if isinstance(data, Mapping) else _datalist_columns(data, keys)
        absent = [k for k in keys or () if k not in columns]
        if absent:
            raise KeyError(f"keys {absent} are not in the data; its keys are {sorted(columns)}.")
        self.data = {k: _column_tensor(k, v) for k, v in columns.items() if keys is None or k in keys}
        lengths = {k: len(v) for k, v in self.data.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all keys need the same number of samples, got {lengths}.")
        self.n_samples = next(iter(lengths.values()))
        if self.n_samples == 0:
            raise ValueError("TensorBatchLoader got no samples.")
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n_samples // self.batch_size
        return -(-self.n_samples // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        data = self.data
        if self.shuffle:  # one gather per epoch; the batches are then slices (views) of it
            order = torch.randperm(self.n_samples, generator=self.generator)
            data = {k: v[order] for k, v in data.items()}
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield {k: v[start : start + self.batch_size] for k, v in data.items()}


def _datalist_columns(datalist: Sequence[Mapping], keys: Sequence[str] | None) -> dict[str, list]:
    if not datalist:
        raise ValueError("TensorBatchLoader got an empty datalist.")
    names = list(keys) if keys is not None else list(datalist[0])
    for key in names:
        lacking = [i for i, item in enumerate(datalist) if key not in item]
        if lacking:
            hint = (
                " Give items without a cluster the index -1 with ClusterIndexd(..., missing_as_unseen=True)."
                if key == "cluster"
                else ""
            )
            raise KeyError(
                f"{len(lacking)} datalist item(s) lack key {key!r}, the first is item {lacking[0]} "
                f"(keys {sorted(datalist[lacking[0]])}); every item needs {names}.{hint}"
            )
    return {k: [item[k] for item in datalist] for k in names}


def _column_tensor(key: str, values: Sequence) -> torch.Tensor:
    """One key's values stacked into a tensor; text values (e.g. raw cluster ids) get an error naming the key."""
    array = np.asarray(values)
    if array.dtype.kind not in "biufc":
        raise TypeError(
            f"TensorBatchLoader key {key!r} holds non-numeric values ({array.dtype}, e.g. {array.flat[0]!r}); expected "
            "numbers. Map raw cluster ids to indices with ClusterIndexd first."
        )
    return torch.as_tensor(array)
