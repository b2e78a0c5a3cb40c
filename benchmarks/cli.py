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
"""Argument types shared by the benchmark scripts: seed and model lists without repeats, JSON output paths."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["json_output", "name_list", "positive_int", "seed_list"]


def _distinct(values: list, what: str) -> list:
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got none.")
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:  # a repeat would count as another paired run and shrink the interval
        raise argparse.ArgumentTypeError(f"{what} {repeated} repeated; each must be given once.")
    return values


def seed_list(text: str) -> list[int]:
    """``"0,1,2"`` as ``[0, 1, 2]``; anything but distinct integers is a usage error.

    Example::

        parser.add_argument("--seeds", default="0,1,2", type=seed_list)
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        seeds = [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}.") from None
    return _distinct(seeds, "seeds")


def name_list(text: str) -> list[str]:
    """``"armed,conventional"`` as ``["armed", "conventional"]``; a repeated or empty list is a usage error.

    Example::

        parser.add_argument("--models", default="armed,conventional", type=name_list)
    """
    return _distinct([t.strip() for t in text.split(",") if t.strip()], "names")


def json_output(text: str) -> Path:
    """The path of a JSON file to write (``.json``), so a slip such as ``--json benchmarks/RESULTS.md`` cannot
    replace another file; ``-`` (standard output) is kept as it is.

    Example::

        parser.add_argument("--json", type=json_output, required=True)
    """
    if text != "-" and Path(text).suffix.lower() != ".json":
        raise argparse.ArgumentTypeError(f"the JSON output must be a .json file, got {text!r}.")
    return Path(text)


def positive_int(text: str) -> int:
    """An integer >= 1.

    Example::

        parser.add_argument("--repeats", type=positive_int, default=7)
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}.")
    return value
