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
"""Print a seen/unseen table of the headline metric (accuracy, AUROC, Dice and HD95, or MSE and R²) from the
``metrics.json`` files written by the bundles' cluster-mode report.

Usage: ``python -m monai_armed.report conventional=runs/conventional/eval/metrics.json armed=runs/armed/eval/metrics.json``
"""

from __future__ import annotations

import json
import sys

from monai_armed.handlers.cluster_mode_report import format_report_table

__all__ = ["main"]


#: the metrics a table is printed for, by task: the first group with a value in the reports is printed (accuracy for
#: classifiers that report it, as the spirals bundle does; AUROC for binary reports without it)
_HEADLINE_METRICS = (("accuracy",), ("auroc",), ("dice", "hd95"), ("mse", "r2"))


def main(argv: list[str] | None = None) -> int:
    """Read ``NAME=PATH`` pairs and print one row per model: the accuracy per dataset / cluster mode for classifiers
    that report it, else the AUROC (binary reports), Dice and HD95 for segmentation, MSE and R² for regression.

    Example::

        main(["conventional=runs/conv/eval/metrics.json", "armed=runs/armed/eval/metrics.json"])
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or any("=" not in a for a in args):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    reports = {}
    for arg in args:
        name, path = arg.split("=", 1)
        try:
            with open(path) as f:
                reports[name] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            print(f"cannot read metrics of {name!r} from {path}: {e}", file=sys.stderr)
            return 1
    cells = [cell for report in reports.values() for modes in report.values() if isinstance(modes, dict)
             for cell in modes.values() if isinstance(cell, dict)]  # fmt: skip
    present = {key for cell in cells for key, value in cell.items() if value is not None}  # null everywhere: absent
    metrics = next((group for group in _HEADLINE_METRICS if any(m in present for m in group)), None)
    if metrics is None:
        print(f"the reports hold none of the metrics {[m for g in _HEADLINE_METRICS for m in g]}; they hold "
              f"{sorted(present)}.", file=sys.stderr)  # fmt: skip
        return 1
    for i, metric in enumerate(metrics):
        print(("\n" if i else "") + f"{metric} (seen = test split of the training clusters; unseen = held-out "
              "clusters; train = the training data)")  # fmt: skip
        print(format_report_table(reports, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
