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
"""The project's main job in one command: the MRI bundle on its generated multi-site data, a conventional CNN and ARMED
trained on 8 sites, then scored on held-out subjects of those sites (seen) and on 4 sites never seen (unseen).

Usage: ``python -m monai_armed.quickstart [--root runs/mri] [--epochs N] [--subjects-per-site N] [--data-seed S]
[--set KEY=JSON ...]``
(``make demo`` runs it). Each bundle run's log goes to ``<root>/<variant>/train.log``; the table printed at the end
holds this run's AUROCs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from monai_armed.data import ensure_mri_dataset
from monai_armed.handlers.cluster_mode_report import format_report_table

__all__ = ["main", "run_bundle"]

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "armed_mri_classification"
#: the columns of the printed table: seen sites with their own site, unseen sites without one / with the inferred one
COLUMNS = {"seen/observed": "seen sites", "unseen/fixed": "unseen, fixed", "unseen/inferred": "unseen, inferred"}


def run_bundle(bundle: Path, root: Path, log_file: Path, **overrides: object) -> None:
    """Run ``bundle``'s ``train.json`` in a subprocess with ``overrides`` (``--key value``), its output to ``log_file``.

    Raises ``RuntimeError`` with the log's last lines when the run fails.

    Example::

        run_bundle(BUNDLE, Path("runs/mri/armed"), Path("runs/mri/armed/train.log"), variant="armed")
    """
    configs = bundle / "configs"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs / "train.json")]
    command += ["--meta_file", str(configs / "metadata.json"), "--logging_file", str(configs / "logging.conf")]
    command += ["--bundle_root", str(root)]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise RuntimeError(f"the bundle run failed (exit {done.returncode}); the end of {log_file}:\n{tail}")


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the data once, train and evaluate each variant, print the seen/unseen AUROC table.

    Example::

        main(["--root", "runs/mri", "--epochs", "10"])
    """
    parser = argparse.ArgumentParser(prog="python -m monai_armed.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/mri", help="output folder: data/ and one folder per variant")
    parser.add_argument("--variants", nargs="+", default=["conventional", "armed"], help="models to compare")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the bundle's, 40)")
    parser.add_argument("--subjects-per-site", type=int, default=48, help="generated subjects per site")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the generated data set")
    parser.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=JSON",
        help="other bundle options, e.g. image_size=64 'filters=[8,16]' (may be repeated)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    root = Path(args.root)
    start = time.perf_counter()
    print("ARMED quick start: AD vs CN from T1w MRI, 8 training sites (vendor confounded with diagnosis), 4 unseen sites")
    print(f"generating the multi-site MRI data set in {root / 'data'} (reused when it is already there) ...", flush=True)
    ensure_mri_dataset(root / "data", seed=args.data_seed, subjects_per_site=args.subjects_per_site, progress=False)
    print(f"  done ({time.perf_counter() - start:.0f} s)")
    overrides = {"dataset_dir": str(root / "data"), "data_seed": args.data_seed}
    overrides["subjects_per_site"] = args.subjects_per_site
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    own_options = {"variant": "--variants", "dataset_dir": "--root", "data_seed": "--data-seed",
                   "subjects_per_site": "--subjects-per-site", "epochs": "--epochs"}  # fmt: skip
    for option in args.set:
        key, sep, value = option.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=JSON pairs such as image_size=64, got {option!r}.")
        if key in own_options:
            parser.error(f"--set {key}=... : the quick start sets {key} itself; use {own_options[key]}.")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    reports = {}
    for variant in args.variants:
        run_root = root / variant
        log_file = run_root / "train.log"
        begin = time.perf_counter()
        print(f"training and evaluating {variant} (log: {log_file}) ...", flush=True)
        try:
            run_bundle(BUNDLE, run_root, log_file, variant=variant, **overrides)
        except RuntimeError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"  done ({time.perf_counter() - begin:.0f} s)")
        reports[variant] = json.loads((run_root / "eval" / "metrics.json").read_text())
    print(f"\nAUROC of this run ({time.perf_counter() - start:.0f} s in all):")
    print(format_report_table(reports, metric="auroc", columns=COLUMNS))
    print("\nfigures (per-site intercepts, random-effect spread, Grad-CAM of fixed vs mixed effects):")
    for variant in args.variants:
        print(f"  {root / variant / 'eval' / 'figures'}")
    print("One seed says little: compare with the 5-seed benchmark in README.md (python benchmarks/mri_sites.py).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
