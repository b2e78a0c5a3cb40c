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
"""benchmarks/gpu_throughput.py's code path on the CPU (tiny settings): every candidate trains through the data
pipeline and the JSON holds the throughput and the ratios; GPU-only options are refused on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def _run(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(SCRIPT), "--json", str(tmp_path / "out.json"), *options]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def test_smoke_run_writes_throughput_and_ratios(tmp_path):
    done = _run(tmp_path, "--device", "cpu", "--amp", "none", "--smoke", "--channels-last")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert set(result["candidates"]) == {"mri_conventional", "mri_armed", "segmentation_conventional", "segmentation_armed"}
    for candidate in result["candidates"].values():
        assert candidate["images_per_second"] > 0 and len(candidate["seconds_per_epoch"]) == 1
        assert candidate["gpu_utilisation_percent"] is None, "no GPU sampled on a CPU run"
    assert result["mri_step_ratio"] > 0 and result["segmentation_step_ratio"] > 0
    assert result["protocol"]["smoke"] and result["protocol"]["channels_last"]


def test_gpu_options_are_refused_without_a_gpu(tmp_path):
    done = _run(tmp_path, "--device", "cpu", "--amp", "bf16", "--smoke")
    assert done.returncode == 2 and "--amp needs a CUDA device" in done.stderr
    if not torch.cuda.is_available():
        done = _run(tmp_path, "--smoke")
        assert done.returncode == 2 and "--device cuda needs a CUDA GPU" in done.stderr
    assert not (tmp_path / "out.json").exists()
