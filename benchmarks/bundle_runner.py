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
"""Shared by the bundle benchmark scripts: train one model with a bundle's ``train.json``, options, JSON and RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from cli import json_output, name_list, seed_list  # noqa: E402
from results_md import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from monai_armed.utils import write_json

__all__ = ["benchmark_parser", "bundle_wall_seconds", "parse_benchmark_args", "run_benchmark", "run_train_config"]

WALL_FILE = "benchmark_wall_seconds.json"
SETTINGS_FILE = "benchmark_settings.json"


def run_train_config(configs: Path, root: Path, run: Sequence[str], **overrides: Any) -> dict:
    """Run ``configs/train.json`` with ``run`` expressions in ``root``; returns ``root/eval/metrics.json``.

    A model whose ``metrics.json`` already exists is not trained again (benchmarks resume after an interruption) when
    it was trained with the same ``run`` and ``overrides``, which are recorded beside it; a run with other settings,
    or without a record, is refused (a cached model of other settings or other data would enter the table silently).
    The wall time of the run is kept beside it too (:func:`bundle_wall_seconds`).

    Example::

        metrics = run_train_config(CONFIGS, Path("out/seed0/armed"), ["$@train#trainer.run()", "$@report.run()"],
                                   variant="armed", seed=0)
    """
    metrics_file, settings_file = root / "eval" / "metrics.json", root / "eval" / SETTINGS_FILE
    settings = json.loads(json.dumps({"run": list(run), **overrides}, sort_keys=True, default=str))
    if metrics_file.exists():
        recorded = json.loads(settings_file.read_text()) if settings_file.exists() else None
        if recorded != settings:
            changed = sorted(k for k in {*settings, *(recorded or {})} if (recorded or {}).get(k) != settings.get(k))
            raise RuntimeError(
                f"{root} holds a trained model of other settings ({'no record of them' if recorded is None else changed}"
                "); delete that folder or choose another --work-dir."
            )
        return json.loads(metrics_file.read_text())
    start = time.perf_counter()
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
    write_json({"seconds": time.perf_counter() - start}, root / "eval" / WALL_FILE)
    write_json(settings, settings_file)
    return json.loads(metrics_file.read_text())


def bundle_wall_seconds(root: Path) -> float | None:
    """Wall time of the :func:`run_train_config` run that trained ``root`` (``None`` if it was not recorded).

    Example::

        seconds = bundle_wall_seconds(Path("out/seed0/armed"))
    """
    path = root / "eval" / WALL_FILE
    return float(json.loads(path.read_text())["seconds"]) if path.exists() else None


def interleaved_step_seconds(trainers: dict[str, Any], repeats: int, iterations: int) -> dict[str, list[float]]:
    """Seconds per step of each Ignite trainer, one epoch of ``iterations`` steps each in turn (A, B, A, B ...),
    ``repeats`` rounds after one warm-up round that is not kept.

    Example::

        seconds = interleaved_step_seconds({"armed": armed, "conventional": conv}, repeats=7, iterations=5)
    """
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    for repeat in range(repeats + 1):
        for name, trainer in trainers.items():
            trainer.state.max_epochs = trainer.state.epoch + 1
            start = time.perf_counter()
            trainer.run()
            if repeat:
                seconds[name].append((time.perf_counter() - start) / iterations)
    return seconds


def benchmark_parser(
    doc: str, models: Sequence[str], seeds: str, work_dir: Path, section: str
) -> argparse.ArgumentParser:
    """The options every bundle benchmark has (``--json``, ``--seeds``, ``--models``, ``--work-dir``, ``--threads``,
    ``--section``, ``--no-results-md``); the script adds its own.

    Example::

        parser = benchmark_parser(__doc__, MODELS, "0,1,2", ROOT / "benchmarks/out/mri_sites", "mri-sites")
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=json_output, required=True, help="output JSON")
    parser.add_argument("--seeds", default=seeds, type=seed_list)
    parser.add_argument("--models", default=",".join(models), type=name_list)
    parser.add_argument("--work-dir", type=Path, default=work_dir)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust timings on a shared CPU)")
    parser.add_argument("--section", default=section)
    parser.add_argument("--no-results-md", action="store_true")
    return parser


def parse_benchmark_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], models: Sequence[str]
) -> argparse.Namespace:
    """Parsed arguments; an unknown model name is a usage error.

    Example::

        args = parse_benchmark_args(parser, ["--json", "out.json"], MODELS)
    """
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if m not in models]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(models)}")
    return args


def run_benchmark(
    script: str,
    argv: Sequence[str],
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict],
    render: Callable[[dict], str],
    results_md: Path,
) -> dict:
    """Run a benchmark, stamp its command, date and wall time, write its JSON and its ``RESULTS.md`` section.

    Example::

        return run_benchmark("benchmarks/mri_sites.py", argv, args, run, render_section, RESULTS_MD)
    """
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = run(args)
    results["protocol"]["command"] = shlex.join(["python", script, *argv])
    results["protocol"]["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    results["protocol"]["total_wall_seconds"] = time.perf_counter() - start
    write_json(results, args.json)
    if not args.no_results_md:
        replace_section(results_md, args.section, render(results))
    print(render(results), flush=True)
    return results
