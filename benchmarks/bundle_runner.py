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
"""Shared by the benchmark scripts: train and evaluate one model with a bundle's own ``train.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

__all__ = ["run_train_config"]


def run_train_config(configs: Path, root: Path, run: Sequence[str], **overrides: Any) -> dict:
    """Run ``configs/train.json`` with ``run`` expressions in ``root``; returns ``root/eval/metrics.json``.

    A model whose ``metrics.json`` already exists is not trained again (benchmarks resume after an interruption).

    Example::

        metrics = run_train_config(CONFIGS, Path("out/seed0/armed"), ["$@train#trainer.run()", "$@report.run()"],
                                   variant="armed", seed=0)
    """
    metrics_file = root / "eval" / "metrics.json"
    if metrics_file.exists():
        return json.loads(metrics_file.read_text())
    workflow = ConfigWorkflow(
        config_file=str(configs / "train.json"),
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type="train",
        bundle_root=str(root),
        run=list(run),
        **overrides,
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads(metrics_file.read_text())
