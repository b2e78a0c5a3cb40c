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
"""Checkpoints that are never half-written, resume files that are checked before use, and best-model tracking that
survives a resume."""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from monai.handlers import CheckpointSaver
from monai.utils import IgniteInfo, min_version, optional_import

from monai_armed.utils import atomic_open

idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)
if TYPE_CHECKING:
    from ignite.engine import Engine, Events
    from ignite.handlers import DiskSaver
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
    DiskSaver, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "DiskSaver")

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "checkpoint_load_dict", "latest_checkpoint"]

logger = logging.getLogger(__name__)


class AtomicDiskSaver(DiskSaver):
    """Ignite save handler that writes each checkpoint to a temporary file beside it, then renames it into place.

    A crash or a full disk therefore never leaves a truncated file under a checkpoint's name, and an existing file of
    the same name (a fixed ``filename`` such as ``model.pt``) is replaced only by a complete new one. Only the process
    of rank 0 writes. Files keep the usual permissions (ignite's own atomic mode makes them private to the user).

    Args:
        dirname: the folder (created).
        filename: a fixed file name for every save (default: the name ignite's ``Checkpoint`` gives).

    Example::

        Checkpoint({"model": net}, AtomicDiskSaver("models", "model.pt"))
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, atomic=True, create_dir=True, require_empty=False)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if idist.get_rank() != 0:
            return
        with atomic_open(Path(self.dirname) / (self.filename or filename), mode="wb") as f:
            torch.save(checkpoint, f)

    def remove(self, filename: str) -> None:
        # a fixed name is replaced by the next complete save: removing it first would leave nothing if that save fails
        if self.filename is None and idist.get_rank() == 0:
            (Path(self.dirname) / filename).unlink(missing_ok=True)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` with atomic writes, pruning that survives a resume, and resumable best-model tracking.

    - Every file is written by :class:`AtomicDiskSaver`: the previous ``model.pt`` (or best-metric model) stays intact
      until its replacement is complete, and a failed write (e.g. a full disk) raises an ``OSError`` naming the file.
    - With ``save_interval`` and a ``file_prefix``, only the newest ``n_saved`` interval checkpoints with that prefix
      are kept, counting the files in ``save_dir``, so a resumed run also prunes the ones its interrupted run wrote.
      A fresh (not resumed) run first moves an earlier run's checkpoints with that prefix into a new
      ``save_dir/earlier_runs/<time>/`` (logged), and a resumed run those beyond the point it resumed from: kept, but
      no longer counted, pruned or picked by a later resume, which so continues this run and not another one.
    - :meth:`state_dict` / :meth:`load_state_dict` hold the key-metric tracking (the scores of the saved best models)
      and the best metric of the engine it is attached to. Put the saver into a resume checkpoint's ``save_dict`` and
      a resumed run will not overwrite ``model_best_*.pt`` with a worse score.

    Arguments are those of MONAI's ``CheckpointSaver``.

    Example::

        best = AtomicCheckpointSaver("models", {"model": net}, save_key_metric=True, key_metric_filename="best.pt")
        best.attach(evaluator)
        resume = AtomicCheckpointSaver("models", {"model": net, "trainer": trainer, "best": best}, file_prefix="resume",
                                       save_interval=1, n_saved=2)
        resume.attach(trainer)
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        name: str | None = None,
        file_prefix: str = "",
        save_final: bool = False,
        final_filename: str | None = None,
        save_key_metric: bool = False,
        key_metric_name: str | None = None,
        key_metric_n_saved: int = 1,
        key_metric_filename: str | None = None,
        key_metric_save_state: bool = False,
        key_metric_greater_or_equal: bool = False,
        key_metric_negative_sign: bool = False,
        epoch_level: bool = True,
        save_interval: int = 0,
        n_saved: int | None = None,
    ) -> None:
        if n_saved is not None and n_saved < 1:
            raise ValueError(f"n_saved must be >= 1 or None (keep all), got {n_saved}.")
        prune_here = bool(file_prefix) and n_saved is not None
        super().__init__(
            save_dir=save_dir,
            save_dict=save_dict,
            name=name,
            file_prefix=file_prefix,
            save_final=save_final,
            final_filename=final_filename,
            save_key_metric=save_key_metric,
            key_metric_name=key_metric_name,
            key_metric_n_saved=key_metric_n_saved,
            key_metric_filename=key_metric_filename,
            key_metric_save_state=key_metric_save_state,
            key_metric_greater_or_equal=key_metric_greater_or_equal,
            key_metric_negative_sign=key_metric_negative_sign,
            epoch_level=epoch_level,
            save_interval=save_interval,
            n_saved=None if prune_here else n_saved,
        )
        for checkpoint, filename in (
            (self._final_checkpoint, final_filename),
            (self._key_metric_checkpoint, key_metric_filename),
            (self._interval_checkpoint, None),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)
        score = "epoch" if epoch_level else "iteration"
        self._prune = re.compile(rf"{re.escape(file_prefix)}_.*_{score}=(\d+)\.pt") if prune_here else None
        self._keep, self._epoch_level = n_saved, epoch_level
        self._engine: Engine | None = None

    def attach(self, engine: Engine) -> None:
        self._engine = engine
        super().attach(engine)
        if self._prune is not None:
            engine.add_event_handler(Events.STARTED, self._run_started)
            engine.add_event_handler(Events.EPOCH_STARTED, self._set_aside_earlier_run)

    def _run_started(self, engine: Engine) -> None:
        self._first_epoch = True

    def _set_aside_earlier_run(self, engine: Engine) -> None:
        # at the run's first epoch, after any checkpoint loader (attached to STARTED) has restored the state
        if not getattr(self, "_first_epoch", False):
            return
        self._first_epoch = False
        if idist.get_rank() != 0:
            return
        # a fresh run owns none of the checkpoints there; a resumed one none beyond the point it resumed from
        resumed_at = engine.state.epoch - 1 if self._epoch_level else engine.state.iteration
        found = [(int(m.group(1)), p) for p in Path(self.save_dir).iterdir() if (m := self._prune.fullmatch(p.name))]
        earlier = sorted(p for number, p in found if engine.state.iteration == 0 or number > resumed_at)
        if not earlier:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = Path(self.save_dir) / "earlier_runs" / stamp
        for suffix in range(1, 1000):  # never into the folder of another set-aside within the same second
            if not target.exists():
                break
            target = target.with_name(f"{stamp}-{suffix}")
        target.mkdir(parents=True)
        for path in earlier:
            os.replace(path, target / path.name)
        logger.warning(
            "moved %d checkpoint(s) of another run (%s) to %s, so that this run's resume checkpoints are the only ones "
            "there; to continue that run, move this run's out and its back, then resume.",
            len(earlier), ", ".join(p.name for p in earlier), target,
        )

    def interval_completed(self, engine: Engine) -> None:
        super().interval_completed(engine)
        if self._prune is not None and idist.get_rank() == 0:
            found = sorted(
                (int(m.group(1)), p) for p in Path(self.save_dir).iterdir() if (m := self._prune.fullmatch(p.name))
            )
            for _, stale in found[: -self._keep]:
                stale.unlink(missing_ok=True)

    def state_dict(self) -> dict[str, Any]:
        """The key-metric tracking and the attached engine's best metric (plain types, ``weights_only`` loadable)."""
        state: dict[str, Any] = {}
        if self._key_metric_checkpoint is not None:
            state["key_metric"] = self._key_metric_checkpoint.state_dict()
        if self._engine is not None and hasattr(self._engine.state, "best_metric"):
            state["best_metric"] = float(self._engine.state.best_metric)
            state["best_metric_epoch"] = int(self._engine.state.best_metric_epoch)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (also a bare ignite ``Checkpoint`` state, as MONAI's saver takes)."""
        if "_saved" in state_dict:  # MONAI's key_metric_save_state format
            state_dict = {"key_metric": state_dict}
        if "key_metric" in state_dict:
            if self._key_metric_checkpoint is None:
                warnings.warn("no key metric checkpoint saver to resume the key metric tracking list.")
            else:
                self._key_metric_checkpoint.load_state_dict(state_dict["key_metric"])
        if self._engine is not None and "best_metric" in state_dict:
            self._engine.state.best_metric = state_dict["best_metric"]
            self._engine.state.best_metric_epoch = state_dict["best_metric_epoch"]


def _readable(path: Path) -> str | None:
    """Why a checkpoint cannot be loaded (``None`` when every record matches its checksum and it loads with
    ``weights_only=True``). ``torch.load`` does not check the zip records' CRCs: a file of full length with damaged
    bytes would load, and resume from wrong weights."""
    try:
        if zipfile.is_zipfile(path):  # torch.save's format since 1.6; a legacy file has no checksums to test
            damaged = _damaged_record(path)
            if damaged is not None:
                return f"the record {damaged} does not match its checksum (damaged bytes)"
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, unpickling error, I/O error: all mean "not usable"
        return f"{type(err).__name__}: {err}"
    return None if isinstance(content, Mapping) else f"holds a {type(content).__name__}, not a dictionary of states"


def _damaged_record(path: Path) -> str | None:
    """The first record of a zip checkpoint whose bytes do not match its CRC, or ``None``; records saved without one
    (``torch.utils.serialization.config.save.compute_crc32 = False`` writes 0) are not checked."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size > 0:
                continue
            try:
                with archive.open(info) as record:
                    while record.read(1 << 24):
                        pass
            except zipfile.BadZipFile:
                return info.filename
    return None


def checkpoint_load_dict(
    load_dict: Mapping[str, Any], path: str | os.PathLike | None, optional: Sequence[str] = ()
) -> dict[str, Any]:
    """``load_dict`` for a ``CheckpointLoader`` of ``path``, without the ``optional`` entries the checkpoint does not
    hold (one written before they were saved), each named in a warning; ignite would refuse the whole checkpoint.

    Example::

        CheckpointLoader(path, checkpoint_load_dict({"model": net, "run_params": run_params}, path, ["run_params"]))
    """
    if path is None:
        return dict(load_dict)
    held = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))  # legacy: no mmap
    missing = [key for key in optional if key in load_dict and key not in held]
    if missing:
        logger.warning(f"{path} holds no {missing} (a checkpoint of an earlier monai-armed): not restored or checked.")
    return {key: value for key, value in load_dict.items() if key not in missing}


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "resume", verify: bool = True) -> str:
    """The newest usable checkpoint that ``CheckpointSaver(file_prefix=prefix, epoch_level=True)`` wrote.

    With ``verify``, each candidate from the newest epoch down is checked (its zip records' checksums) and loaded
    (``weights_only=True``); an unreadable one (truncated, damaged) is skipped with a warning naming it and the reason,
    and the previous good one is returned. Raises a ``FileNotFoundError`` naming the folder when there is no
    checkpoint, or none is readable, so a resumed run fails before training.

    Example::

        CheckpointLoader(load_path=latest_checkpoint("models"), load_dict={"model": net, "trainer": trainer})
    """
    pattern = re.compile(rf"{re.escape(prefix)}_.*epoch=(\d+)\.pt")
    found = sorted(
        ((int(m.group(1)), p) for p in Path(directory).glob(f"{prefix}_*.pt") if (m := pattern.fullmatch(p.name))),
        reverse=True,
    )
    if not found:
        raise FileNotFoundError(f"no checkpoint '{prefix}_*epoch=N.pt' to resume from in {directory}.")
    if not verify:
        return str(found[0][1])
    problems = []
    for _, path in found:
        problem = _readable(path)
        if problem is None:
            if problems:
                warnings.warn(f"resuming from {path}: skipped {'; '.join(problems)}.")
            return str(path)
        problems.append(f"{path.name} is unreadable ({problem})")
    raise FileNotFoundError(f"no readable checkpoint to resume from in {directory}: {'; '.join(problems)}.")
