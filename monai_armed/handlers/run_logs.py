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


def tracking_run_name(resume: bool = False) -> str | None:
    """The MLflow run name and TensorBoard folder of a bundle run: ``run_<YYYYmmdd_HHMMSS_microseconds>`` for a new
    run, ``None`` for a resumed one.

    MONAI's ``MLFlowHandler`` without a run name continues the newest unfinished run of the experiment, which is what a
    resumed run wants and what a new run must not do: after an interrupted run, a fresh one would append its losses to
    the interrupted one's.

    Example::

        tracking_run_name()              # "run_20261207_193012_048213"
        tracking_run_name(resume=True)   # None: MLflow continues the interrupted run
    """
    return None if resume else RUN_PREFIX + datetime.now().strftime("%Y%m%d_%H%M%S_%f")


def run_log_dir(log_root: str | os.PathLike, run_name: str | None) -> str:
    """The TensorBoard folder of a run: ``log_root/run_name``, so that TensorBoard shows the runs of one bundle root
    side by side rather than drawing one run's curves over another's.

    ``run_name=None`` (a resumed run) gives the newest ``run_*`` folder in ``log_root``, where the interrupted run
    logged, or ``log_root`` itself when there is none.

    Example::

        run_log_dir("runs/mine/eval/tensorboard", tracking_run_name())   # ".../tensorboard/run_20261207_193012_048213"
    """
    root = Path(log_root)
    if run_name is not None:
        return str(root / run_name)
    earlier = sorted(p for p in root.glob(f"{RUN_PREFIX}*") if p.is_dir()) if root.is_dir() else []
    return str(earlier[-1] if earlier else root)
