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

import numpy as np
import torch

__all__ = [
    "CSV_FORMULA_PREFIXES",
    "META_SCHEMA_MD5",
    "MISSING_VALUE_TEXTS",
    "atomic_open",
    "batch_checks",
    "batch_checks_enabled",
    "cluster_id",
    "csv_cell",
    "is_missing_value",
    "meta_schema_path",
    "nan_to_none",
    "shape_str",
    "write_json",
]

META_SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
"""MD5 of the model zoo's ``meta_schema_20240725.json``, the value MONAI's own tests pin for that release asset."""

#: Cell texts that ``pandas.read_csv`` reads as a missing value by default (what pandas, R and spreadsheets write for
#: one); never a cluster id.
MISSING_VALUE_TEXTS = frozenset(
    {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
     "NULL", "NaN", "None", "n/a", "nan", "null"}
)  # fmt: skip


_BATCH_CHECKS = [True]


def batch_checks_enabled() -> bool:
    """Whether the per-batch checks that read values back from the device (finite inputs, label and cluster ranges)
    run; :func:`batch_checks` turns them off for a block (a trainer's steps after the first batch).

    Example::

        if batch_checks_enabled() and not bool(torch.isfinite(x).all()):
            raise ValueError("...")
    """
    return _BATCH_CHECKS[-1]


@contextmanager
def batch_checks(enabled: bool) -> Iterator[None]:
    """Run a block with the per-batch value checks on or off (restored afterwards, also on error).

    Reading a value back (``int(tensor)``, ``bool(tensor)``) synchronises a GPU and costs a little everywhere; the
    trainers check their first batch and, with ``validate_batches=True``, every batch.

    Example::

        with batch_checks(False):
            loss = loss_function(pred, label)      # no label-range read-back
    """
    _BATCH_CHECKS.append(bool(enabled))
    try:
        yield
    finally:
        _BATCH_CHECKS.pop()


@contextmanager
def atomic_open(path: str | os.PathLike, newline: str | None = None, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a file for writing so that ``path`` only ever holds a complete file.

    Writes go to a uniquely named temporary file beside ``path`` (created with the usual permissions, unlike
    ``tempfile.mkstemp``), which is flushed to disk and replaces ``path`` when the block ends without error; on error it
    is removed and an existing ``path`` is left as it was. Parent folders are created. A failed write (e.g. a full
    disk) raises an ``OSError`` that names ``path`` and says that the previous file is intact.

    Args:
        path: the file to write.
        newline: as for ``open`` (text mode).
        mode: ``"w"`` (text, UTF-8) or ``"wb"`` (binary).

    Example::

        with atomic_open("models/clusters.json") as f:
            json.dump(content, f)
        with atomic_open("models/model.pt", mode="wb") as f:
            torch.save(network.state_dict(), f)
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes text ('w') or bytes ('wb'), got mode {mode!r}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    text = {"newline": newline, "encoding": "utf-8"} if mode == "w" else {}
    try:
        with open(tmp, mode.replace("w", "x"), **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is left as it was" if path.exists() else f"no {path.name} was written"
        raise OSError(err.errno, f"could not write {path}: {err.strerror or err}; {kept}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


CSV_FORMULA_PREFIXES: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a CSV text cell as a formula (OWASP "CSV injection")."""


def csv_cell(value: Any) -> Any:
    """A value ready for ``csv.writer``: numbers unchanged, text that a spreadsheet would run as a formula escaped.

    Text (and any other object, as ``str(value)``) starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
    return gets a leading single quote, as OWASP recommends against CSV injection, so ``=HYPERLINK(...)`` is written
    as ``'=HYPERLINK(...)``. Numbers (``int``, ``float``, ``bool``, numpy scalars) are returned unchanged so they are
    written as numbers, ``-0.5`` as ``-0.5``; ``None`` stays ``None`` (an empty cell). Text made of digits stays text:
    a cluster id ``"01"`` is written ``01``, not ``1``.

    Example::

        writer.writerow([csv_cell(v) for v in ("=1+2", "-site", "01", -0.5, 3)])   # '=1+2,'-site,01,-0.5,3
    """
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:  # the number (or text) it holds
        value = value.item()
    if value is None or isinstance(value, numbers.Number):
        return value
    text = str(value)
    return "'" + text if text.startswith(CSV_FORMULA_PREFIXES) else text


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
    """Replace float NaN (and infinities) by ``None`` in nested dicts, lists and tuples (numpy floats included), so a
    report is strict JSON.

    Example::

        nan_to_none({"auroc": float("nan"), "f": [0.1, float("inf")]})   # {"auroc": None, "f": [0.1, None]}
    """
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    real = isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)  # numpy floats too
    return None if real and not math.isfinite(value) else value


def meta_schema_path() -> str:
    """Path of the model zoo's bundle-metadata schema shipped with monai_armed, for ``verify_metadata`` without a network.

    The file is ``meta_schema_20240725.json``, the schema every bundle's ``metadata.json`` names, kept verbatim
    (Apache-2.0, Project MONAI): published at
    https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json and
    copied from the first commit of the same file in Project-MONAI/project-monai.github.io (branch
    ``add_bundle_schema``); its MD5 is :data:`META_SCHEMA_MD5`, the hash MONAI's tests pin for the release asset.
    MONAI's ``verify_metadata`` downloads the schema named in ``metadata.json`` unless ``filepath`` already exists;
    with ``hash_val`` it also checks that the file is that schema.

    Example::

        from monai.bundle import verify_metadata
        verify_metadata(
            meta_file="bundles/armed_spirals/configs/metadata.json", filepath=meta_schema_path(), hash_val=META_SCHEMA_MD5
        )
    """
    return str(Path(__file__).parent / "resources" / "meta_schema_20240725.json")


def _scalar(raw: Any) -> Any:
    """A 0-d tensor or numpy scalar as the Python number it holds; anything else unchanged."""
    if isinstance(raw, torch.Tensor) and raw.numel() == 1:
        return raw.item()
    return raw.item() if hasattr(raw, "item") and getattr(raw, "ndim", None) == 0 else raw


def is_missing_value(raw: Any) -> bool:
    """Whether ``raw`` stands for a missing value: ``None``, a float NaN, pandas' ``NA`` / ``NaT``, or (stripped) one
    of ``MISSING_VALUE_TEXTS``.

    Example::

        is_missing_value(" NA "), is_missing_value(float("nan")), is_missing_value("site01")   # True, True, False
    """
    raw = _scalar(raw)
    if raw is None or type(raw).__name__ in ("NAType", "NaTType"):  # pandas' missing markers, without importing it
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
