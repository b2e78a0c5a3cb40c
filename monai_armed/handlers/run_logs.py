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
"""Names and folders that keep the tracking records of several runs in one bundle root apart."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

__all__ = ["tracking_run_name", "run_log_dir"]

RUN_PREFIX = "run_"


def tracking_run_name(log_root: str | os.PathLike, resume: bool = False) -> str | None:
    """The MLflow run name and TensorBoard folder name of a bundle run: ``run_<YYYYmmdd_HHMMSS_microseconds>`` for a
    new run; for a resumed one the name of the newest ``run_*`` folder in ``log_root``, the run it continues (``None``
    when there is none, e.g. without TensorBoard: MONAI's ``MLFlowHandler`` then continues an unfinished run).

    A new name per run keeps MONAI's ``MLFlowHandler`` from continuing the newest unfinished run when a fresh run
    starts: after an interrupted run, the fresh one would have appended its losses to the interrupted one's.

    Example::

        tracking_run_name("runs/mine/eval/tensorboard")               # "run_20261207_193012_048213"
        tracking_run_name("runs/mine/eval/tensorboard", resume=True)  # the newest run_* folder's name
    """
    if not resume:
        return RUN_PREFIX + datetime.now().strftime("%Y%m%d_%H%M%S_%f")
    root = Path(log_root)
    earlier = sorted(p.name for p in root.glob(f"{RUN_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return earlier[-1] if earlier else None


def run_log_dir(log_root: str | os.PathLike, run_name: str | None) -> str:
    """The TensorBoard folder of a run: ``log_root/run_name``, so that TensorBoard shows the runs of one bundle root
    side by side rather than drawing one run's curves over another's; ``log_root`` itself for ``run_name=None`` (a
    resumed run of an older version, which logged there).

    Example::

        run_log_dir("runs/mine/eval/tensorboard", "run_20261207_193012_048213")
    """
    return str(Path(log_root) / run_name) if run_name is not None else str(log_root)
