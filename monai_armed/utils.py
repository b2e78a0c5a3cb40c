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

from __future__ import annotations

import json
import math
import numbers
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "MISSING_VALUE_TEXTS",
    "atomic_open",
    "cluster_id",
    "is_missing_value",
    "meta_schema_path",
    "nan_to_none",
    "shape_str",
    "write_json",
]

#: Cell texts that ``pandas.read_csv`` reads as a missing value by default (what pandas, R and spreadsheets write for
#: one); never a cluster id.
MISSING_VALUE_TEXTS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip


@contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a text file for writing so that ``path`` only ever holds a complete file.

    Writes go to a uniquely named temporary file beside ``path`` (created with the usual permissions, unlike
    ``tempfile.mkstemp``), which replaces ``path`` when the block ends without error; on error it is removed and an
    existing ``path`` is left as it was. Parent folders are created.

    Example::

        with atomic_open("models/clusters.json") as f:
            json.dump(content, f)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", newline=newline, encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shape_str(x: torch.Tensor) -> str:
    """A tensor's shape as ``"(4, 3)"`` for error messages (TorchScript-compatible, unlike ``tuple(x.shape)``).

    Example::

        raise ValueError(f"expected (batch, 3), got {shape_str(x)}.")
    """
    return "(" + ", ".join([str(d) for d in x.shape]) + ")"


def write_json(content: Any, path: str | os.PathLike) -> str:
    """Write JSON atomically (a temporary file then ``os.replace``), creating parent folders; returns the path.

    Example::

        write_json({"accuracy": 0.8}, "eval/metrics.json")
    """
    with atomic_open(path) as f:
        json.dump(content, f, indent=2)
    return str(path)


def nan_to_none(value: Any) -> Any:
    """Replace float NaN (and infinities) by ``None`` in nested dicts and lists, so a report is strict JSON.

    Example::

        nan_to_none({"auroc": float("nan"), "f": [0.1, float("inf")]})   # {"auroc": None, "f": [0.1, None]}
    """
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def meta_schema_path() -> str:
    """Path of the bundle-metadata JSON schema shipped with monai_armed, for ``verify_metadata`` without a network.

    MONAI's ``verify_metadata`` downloads the schema named in ``metadata.json`` unless ``filepath`` already exists;
    pointing ``filepath`` at this file validates offline against the mandatory keys and tensor specifiers of the
    model-zoo schema.

    Example::

        from monai.bundle import verify_metadata
        verify_metadata(meta_file="bundles/armed_spirals/configs/metadata.json", filepath=meta_schema_path())
    """
    return str(Path(__file__).parent / "resources" / "meta_schema.json")


def _scalar(raw: Any) -> Any:
    """A 0-d tensor or numpy scalar as the Python number it holds; anything else unchanged."""
    if isinstance(raw, torch.Tensor) and raw.numel() == 1:
        return raw.item()
    return raw.item() if hasattr(raw, "item") and getattr(raw, "ndim", None) == 0 else raw


def is_missing_value(raw: Any) -> bool:
    """Whether ``raw`` stands for a missing value: ``None``, a float NaN, or (stripped) one of ``MISSING_VALUE_TEXTS``.

    Example::

        is_missing_value(" NA "), is_missing_value(float("nan")), is_missing_value("site01")   # True, True, False
    """
    raw = _scalar(raw)
    if raw is None:
        return True
    if isinstance(raw, float):
        return math.isnan(raw)
    return isinstance(raw, str) and raw.strip() in MISSING_VALUE_TEXTS


def cluster_id(raw: Any, where: str = "cluster id") -> str:
    """The text of a raw cluster id: the one form under which ids are stored, compared and saved.

    A string is kept as its stripped text, so ``"01"``, ``"001"`` and ``"1"`` are three clusters; a number becomes
    ``str`` of it, so ``3`` (a JSON number, a numpy or 0-d tensor integer) is ``"3"``, the same cluster as a CSV cell
    ``3``, and a float ``3.0`` is ``"3.0"``, the same cluster as a CSV cell ``3.0`` (as pandas writes an integer column
    that held a NaN). A missing value (see :func:`is_missing_value`), a bool or any other type raises a
    ``ValueError`` that starts with ``where``.

    Example::

        cluster_id(3), cluster_id(" 03 "), cluster_id(3.0)      # ("3", "03", "3.0")
        cluster_id("", where="data.csv, line 7")                 # ValueError: data.csv, line 7: ...
    """
    value = _scalar(raw)
    if is_missing_value(value):
        raise ValueError(
            f"{where}: missing cluster id {raw!r}; expected a non-empty id (the site, scanner, batch or subject of the "
            "sample). Empty, NaN, NA, null and None are read as missing."
        )
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: cluster id {raw!r} ({type(raw).__name__}); expected a string or a number.")
