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
"""What the handlers that write one set of files and one CSV row per evaluated image share."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.engines.distributed import gathers_shards
from monai_armed.engines.trainer import ARMEDKeys
from monai_armed.utils import atomic_open, csv_cell

if TYPE_CHECKING:
    from ignite.engine import Engine, Events
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)

__all__ = ["ImageOutputWriter", "file_stem"]

logger = logging.getLogger(__name__)


def file_stem(path: str) -> str:
    """A file name without its (possibly double) image suffix: ``"a/b.ome.tif"`` -> ``"b"``.

    Example::

        file_stem("data/images/b03_v001.tif")      # "b03_v001"
    """
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".tiff", ".tif", ".nii.gz", ".nii", ".png", ".npy"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class ImageOutputWriter:
    """Base of the evaluator handlers that write files per image (named after its source file) and a CSV.

    Subclasses implement ``__call__(engine)`` (one iteration's files, appending one dict per image to :attr:`rows`,
    with :meth:`claim_stem` for each name and :meth:`effects` for the random effects used) and may extend
    :meth:`_summarize` (logging before the CSV is written). Every batch must hold ``image`` and ``path_key``
    (checked before anything of it is written); two images with one file name stem are an error, raised when the run
    starts where the evaluator's dataset lists its items' ``image`` paths (MONAI's datasets do), else before the
    second one's files; the CSV is written atomically when the run completes. Under DDP with a sharded loader (a
    ``DistributedSampler``) every process writes its shard's files and rank 0 the CSV: of its own shard, or with
    ``gather_processes`` of every shard (attach the writer in every process then: a collective call).

    Args:
        output_dir: folder of the files and of the CSV.
        path_key: batch key of the source paths (``CopyItemsd(keys="image", names="image_path")`` before loading).
        csv_name: file name of the CSV in ``output_dir``.
        gather_processes: under DDP with a sharded loader, one CSV of every process's images.

    Example::

        class Writer(ImageOutputWriter):
            def __call__(self, engine):
                paths = engine.state.batch[self.path_key]
                for path, effects in zip(paths, self.effects(engine, len(paths))):
                    self.rows.append({"image": path, "effects": effects, "stem": self.claim_stem(str(path))})
    """

    #: what a cluster is called in the log messages (an imaging ``batch``, a ``site``)
    cluster_word = "cluster"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        path_key: str = "image_path",
        csv_name: str = "outputs.csv",
        gather_processes: bool = False,
    ) -> None:
        self.output_dir, self.path_key, self.csv_name = Path(output_dir), path_key, csv_name
        self.gather_processes = gather_processes
        self.rows: list[dict[str, Any]] = []
        self._source_of: dict[str, str] = {}  # output stem -> the image it was written for
        self._inputs: set[Path] = set()  # the images read, which no output may replace

    #: the suffixes of the files written per image (after its stem), checked against the inputs before writing
    output_suffixes: tuple[str, ...] = ()

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            return
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_STARTED, self._check_batch)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_csv)

    def __call__(self, engine: Engine) -> None:
        raise NotImplementedError

    def _reset(self, engine: Engine) -> None:
        self.rows, self._source_of, self._inputs = [], {}, set()
        # the dataset's image paths, when it lists them, are checked before the first file is written
        items = getattr(getattr(engine.state.dataloader, "dataset", None), "data", None)
        if isinstance(items, (list, tuple)):
            paths = [item.get("image") if isinstance(item, Mapping) else None for item in items]
            paths = [os.fspath(path) for path in paths if isinstance(path, (str, os.PathLike))]
            for path in paths:
                self.claim_stem(path)
            for stem in self._source_of:
                for suffix in self.output_suffixes:
                    self.output_path(stem, suffix)
            self._source_of = {}
        self.output_path(Path(self.csv_name).stem, Path(self.csv_name).suffix)

    def _check_batch(self, engine: Engine) -> None:
        batch = engine.state.batch
        if "image" not in batch or self.path_key not in batch:
            raise KeyError(
                f"{type(self).__name__} needs 'image' and {self.path_key!r} in each batch, got {sorted(batch)}."
            )

    @staticmethod
    def fallback(engine: Engine) -> str:
        """The effects an image without a seen cluster gets: ``inferred`` with a Z-predictor, else ``fixed``."""
        return "inferred" if getattr(engine, "z_predictor", None) is not None else "fixed"

    def effects(self, engine: Engine, n: int) -> list[str]:
        """Per image of the iteration: ``observed`` (its seen cluster) or the evaluator's :meth:`fallback`; every
        image gets the evaluator's ``cluster_mode`` when that is not ``observed``."""
        mode = getattr(engine, "cluster_mode", "observed")
        if mode != "observed":
            return [mode] * n
        observed = engine.state.output.get(ARMEDKeys.CLUSTER)
        if isinstance(observed, Mapping):
            raise TypeError(
                f"{type(self).__name__} handles one grouping factor; the evaluator's cluster is a mapping of the "
                f"factors {list(observed)}."
            )
        fallback = self.fallback(engine)
        return [fallback] * n if observed is None else ["observed" if int(c) >= 0 else fallback for c in observed]

    def claim_stem(self, path: str) -> str:
        """The output name of an image; two images with one name would overwrite each other's files: an error."""
        stem = file_stem(path)
        if stem in self._source_of:
            raise ValueError(
                f"{type(self).__name__}: '{path}' and '{self._source_of[stem]}' have the same file name stem "
                f"{stem!r}, so their outputs in '{self.output_dir}' would overwrite each other; give the images "
                "unique names."
            )
        self._source_of[stem] = path
        self._inputs.add(Path(path).resolve())
        return stem

    def output_path(self, stem: str, suffix: str) -> Path:
        """``output_dir / (stem + suffix)``; an error when that file is one of the images read (an output folder that
        holds the inputs, and an input named like another's output)."""
        path = self.output_dir / f"{stem}{suffix}"
        if path.resolve() in self._inputs:
            raise ValueError(
                f"{type(self).__name__}: the output '{path}' would overwrite the input image of that name; write the "
                "outputs to a folder that does not hold the inputs (output_dir), or rename the image."
            )
        return path

    def _summarize(self, engine: Engine) -> None:
        if getattr(engine, "cluster_mode", "observed") != "observed":  # every row says the mode; nothing fell back
            return
        fallbacks = sum(r["effects"] != "observed" for r in self.rows)
        if fallbacks:
            logger.warning(
                f"{fallbacks} of {len(self.rows)} images had no seen {self.cluster_word}: {self.fallback(engine)} effects were "
                "used for them."
            )

    def _write_csv(self, engine: Engine) -> None:
        if gathers_shards(engine.state.dataloader, self.gather_processes, type(self).__name__):
            shards: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(shards, self.rows)  # every process wrote its shard's files: one CSV of them all
            self.rows = [row for shard in shards for row in shard]
        if not self.rows:
            raise ValueError(f"{type(self).__name__}: the evaluator gave no images.")
        self._summarize(engine)
        if idist.get_rank() != 0:
            return
        with atomic_open(self.output_dir / self.csv_name, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows({key: csv_cell(value) for key, value in row.items()} for row in self.rows)

    @property
    def csv_path(self) -> str:
        """Path of the CSV."""
        return str(self.output_dir / self.csv_name)


def _tiff_layout(array: np.ndarray) -> dict[str, Any]:
    """``save_tiff`` arguments of a ``(C, *spatial)`` map in the loader's order: spatial axes reversed to the TIFF's
    ``([Z,] Y, X)`` as :class:`~monai_armed.data.TiffFileReader` reads it, one channel dropped, several kept as the
    TIFF's axis ``C``; the dtype is kept."""
    array = np.ascontiguousarray(np.transpose(array, (0, *range(array.ndim - 1, 0, -1))))
    if array.shape[0] == 1:
        return {"array": array[0]}
    return {"array": array, "metadata": {"axes": "C" + "ZYX"[-(array.ndim - 1) :]}}
