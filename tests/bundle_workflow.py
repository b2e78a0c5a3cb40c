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
"""Shared by the bundle tests: an initialised ``ConfigWorkflow`` of a bundle's config files."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigWorkflow

__all__ = ["bundle_workflow"]


def bundle_workflow(
    configs: Path, config_files: list[str], root: Path, workflow_type: str = "train", **override
) -> ConfigWorkflow:
    """``configs/<config_files>`` with ``configs/metadata.json``, no logging config, run in ``root``; initialised.

    Example::

        workflow = bundle_workflow(CONFIGS, ["train.json", "evaluate.json"], tmp_path, epochs=1)
        workflow.run()
    """
    workflow = ConfigWorkflow(
        config_file=[str(configs / f) for f in config_files],
        meta_file=str(configs / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        bundle_root=str(root),
        **override,
    )
    workflow.initialize()
    return workflow
