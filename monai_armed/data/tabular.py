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
"""
CSV datalists for users' own tabular data.

A tabular CSV has one row per sample, numeric feature columns, a label column (class indices, or class names with
``label_names``; a continuous outcome with ``task="regression"``) and a cluster column (any identifier of the group the
sample belongs to, e.g. a site or a subject, kept as text). Loading it gives a MONAI-style datalist of
``{"features": float32 array, "label": int (float for regression), "cluster": str}`` dicts.
"""

from __future__ import annotations

import codecs
import csv
import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_armed.data.validation import check_label_names, parse_label
from monai_armed.utils import atomic_open, cluster_id, csv_cell, is_missing_value

__all__ = [
    "TABULAR_TASKS",
    "check_output_path",
    "csv_feature_columns",
    "load_csv_datalist",
    "save_csv_datalist",
    "save_predictions_csv",
    "datalist_to_arrays",
]

#: what a label column holds: class labels, or a continuous outcome (a regression's)
TABULAR_TASKS = ("classification", "regression")

logger = logging.getLogger(__name__)


def _repeated(names: Sequence[Any]) -> list[Any]:
    """The names that occur more than once, sorted."""
    return sorted({name for name in names if names.count(name) > 1})


def _read_header(reader: Iterator[list[str]], path: str) -> list[str]:
    """Return the stripped header row, rejecting empty files and duplicate column names."""
    header = next(reader, None)
    if header is None:
        raise ValueError(f"{path}: the file is empty; expected a header row followed by data rows.")
    header = [name.strip() for name in header]
    duplicates = _repeated(header)
    if duplicates:
        raise ValueError(f"{path}: duplicate column name(s) {duplicates} in the header.")
    return header


def _resolve_feature_columns(
    header: list[str],
    feature_columns: Sequence[str] | None,
    label_column: str | None,
    cluster_column: str | None,
    path: str,
    id_columns: Sequence[str] = (),
) -> list[str]:
    """Check that the requested columns exist and return the feature column names."""
    if isinstance(id_columns, str):
        raise ValueError(f"{path}: id_columns is a list of column names, got the string {id_columns!r}.")
    other = [c for c in (label_column, cluster_column, *id_columns) if c is not None]
    if feature_columns is None:
        feature_columns = [name for name in header if name not in other]
        if not feature_columns:
            raise ValueError(f"{path}: no feature columns besides {other}.")
    if not feature_columns:
        raise ValueError(f"{path}: feature_columns is empty; name at least one feature column.")
    leaking = [c for c in other if c in feature_columns]
    if leaking:
        raise ValueError(f"{path}: feature_columns include {leaking}, the label / cluster / id column(s) of the rows.")
    wanted = [*feature_columns, *other]
    missing = [name for name in wanted if name not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the columns present are {header}.")
    return list(feature_columns)


def _parse_feature(value: str, where: str, kind: str = "feature") -> float:
    """Parse one numeric cell, a feature or a continuous label (``kind``); ``where`` names the file, line and column
    for the error message."""
    if not value.strip():
        raise ValueError(f"{where}: empty {kind} value; NaN {kind}s are not allowed.")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}: {kind} value {value!r} is not a number.") from None
    if math.isnan(number):
        raise ValueError(f"{where}: {kind} value {value!r}; NaN {kind}s are not allowed.")
    if math.isinf(number):
        raise ValueError(f"{where}: {kind} value {value!r}; infinite {kind}s are not allowed.")
    return number


def _check_task(task: str) -> None:
    if task not in TABULAR_TASKS:
        raise ValueError(f"task must be one of {TABULAR_TASKS}, got {task!r}.")


def _decode_error(path: str, encoding: str, err: UnicodeDecodeError) -> ValueError:
    """A ``ValueError`` naming the file, the line and byte offset where it stops being ``encoding``, and the fix."""
    raw = Path(path).read_bytes()
    try:
        raw.decode(encoding)
        offset = err.start
    except UnicodeDecodeError as whole:  # offsets relative to the file, not to the reader's buffer
        skips_bom = codecs.lookup(encoding).name == "utf-8-sig" and raw.startswith(codecs.BOM_UTF8)
        offset = whole.start + (len(codecs.BOM_UTF8) if skips_bom else 0)
    line = raw.count(b"\n", 0, offset) + 1
    name = "UTF-8" if codecs.lookup(encoding).name in ("utf-8", "utf-8-sig") else encoding
    return ValueError(
        f"{path}, line {line} (byte {offset}): the file is not valid {name} (byte {raw[offset:offset + 1]!r}: "
        f"{err.reason}). Re-save it as UTF-8, or pass the file's encoding, e.g. encoding='latin-1'."
    )


def load_csv_datalist(
    path: str | os.PathLike,
    feature_columns: Sequence[str] | None = None,
    label_column: str | None = "label",
    cluster_column: str | None = "cluster",
    label_names: Sequence[str] | None = None,
    require_cluster: bool = True,
    encoding: str = "utf-8-sig",
    task: str = "classification",
    n_classes: int | None = None,
    id_columns: Sequence[str] = (),
    line_key: str | None = None,
) -> list[dict]:
    """
    Load a tabular CSV file into a datalist.

    Cluster ids are kept as the exact (stripped) text of their cell, so ``01``, ``001`` and ``1`` are three clusters
    and the ids agree with a JSON datalist's (:func:`monai_armed.utils.cluster_id`: the JSON number ``3`` is ``"3"``,
    like the cell ``3``; the cell ``3.0`` is ``"3.0"``, like the JSON number ``3.0``).

    Args:
        path: CSV file with a header row.
        feature_columns: names of the feature columns, in the order they should appear in the feature
            vector. ``None`` uses every column except ``label_column`` and ``cluster_column``, in file order.
        label_column: name of the label column (class labels, or the continuous outcome of a regression); ``None``
            for unlabelled data (inference).
        cluster_column: name of the cluster (random-effect group) column; ``None`` when clusters are unknown
            (the model then uses fixed effects, or a Z-predictor's inferred membership).
        label_names: class names in class-index order (e.g. ``["CN", "AD"]``): a label cell holding a name becomes
            its index. Without it, labels must be integer class indices.
        require_cluster: every row needs a cluster id (training). ``False`` (inference): a file without
            ``cluster_column``, or a row whose cell is empty or NA, gives items without ``"cluster"``; this is logged,
            and the model then uses the Z-predictor's inferred membership or fixed effects for them
            (``ClusterIndexd(..., missing_as_unseen=True)`` gives them the index ``-1``).
        encoding: text encoding of the file; the default reads UTF-8 with or without a byte-order mark.
        task: ``"classification"`` (default: class labels) or ``"regression"``: every label cell is a finite number
            (a continuous outcome, e.g. for :class:`~monai_armed.losses.GaussianLikelihood`), kept as a ``float``.
        n_classes: the classes the model predicts (classification): every label must be in ``0..n_classes - 1``, so
            a label the model cannot learn fails here, naming its line, before any training.
        id_columns: columns that identify a row (e.g. ``["patient_id"]``): each item keeps the cell's text under the
            column's name, and they are never features (``feature_columns=None`` leaves them out).
        line_key: when given, each item keeps the line of the file it came from under this key (the header is line 1;
            blank lines are skipped, so this is what joins a prediction back to its row).

    Returns:
        one dict per data row: ``{"features": float32 array (F,), "label": int, "cluster": str}`` (``"label"`` a
        ``float`` for regression), plus the ``id_columns`` and ``line_key`` asked for.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not valid ``encoding``, is empty or has no data rows, a column is missing, a row
            has the wrong number of cells, a feature is empty, NaN, infinite or not a number, a label is not an
            integer or one of ``label_names`` (or outside ``0..n_classes - 1``; regression: is empty, NaN, infinite or
            not a number), or a cluster id is missing (empty, NaN, NA). The message names the file, and the line and
            column where relevant.

    Example::

        datalist = load_csv_datalist("patients.csv", feature_columns=["age", "bmi"], cluster_column="site")
        datalist[0]  # {"features": array([63., 27.1], dtype=float32), "label": 1, "cluster": "site_a"}
        load_csv_datalist("patients.csv", label_column="diagnosis", label_names=["CN", "AD"])  # "AD" -> 1
        load_csv_datalist("new_patients.csv", label_column=None, require_cluster=False)        # no cluster column
        load_csv_datalist("patients.csv", label_column="systolic_bp", task="regression")[0]["label"]   # 131.5
        load_csv_datalist("patients.csv", id_columns=["patient_id"], line_key="csv_line")[0]["patient_id"]   # "P001"
    """
    path = os.fspath(path)
    _check_task(task)
    if task == "regression" and label_names is not None:
        raise ValueError(f"{path}: label_names name classes; a regression (task='regression') has a continuous label.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV datalist file not found: {path}")
    names = check_label_names(label_names, path)
    if n_classes is not None and (task == "regression" or n_classes < 2):
        raise ValueError(f"{path}: n_classes is for classification with at least 2 classes, got {n_classes}.")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"{path}: unknown text encoding {encoding!r}; expected e.g. 'utf-8' or 'latin-1'.") from None
    # utf-8-sig drops the byte-order mark that spreadsheet programs put in front of the first column name.
    with open(path, newline="", encoding=encoding) as f:
        try:
            datalist, n_without_cluster = _read_rows(
                csv.reader(f), path, feature_columns, label_column, cluster_column, names, require_cluster, task,
                n_classes, id_columns, line_key,
            )
        except UnicodeDecodeError as err:
            raise _decode_error(path, encoding, err) from None
    if not datalist:
        raise ValueError(f"{path}: the file has a header but no data rows.")
    if n_without_cluster:
        logger.warning(
            f"{path}: {n_without_cluster} of {len(datalist)} rows have no cluster id (column {cluster_column!r}); "
            "their predictions use the Z-predictor's inferred membership, or fixed effects only."
        )
    return datalist


def _read_rows(
    reader: Iterator[list[str]],
    path: str,
    feature_columns: Sequence[str] | None,
    label_column: str | None,
    cluster_column: str | None,
    label_names: list[str] | None,
    require_cluster: bool,
    task: str = "classification",
    n_classes: int | None = None,
    id_columns: Sequence[str] = (),
    line_key: str | None = None,
) -> tuple[list[dict], int]:
    """The datalist of a CSV reader's rows, and how many have an empty cluster cell (``require_cluster=False``)."""
    header = _read_header(reader, path)
    if cluster_column is not None and cluster_column not in header and not require_cluster:
        logger.warning(
            f"{path}: no cluster column {cluster_column!r}, so the clusters are unknown: predictions use the "
            "Z-predictor's inferred membership, or fixed effects only."
        )
        cluster_column = None
    features = _resolve_feature_columns(header, feature_columns, label_column, cluster_column, path, id_columns)
    feature_idx = [header.index(name) for name in features]
    reserved = {"features", "label", "cluster"}
    clashing = [key for key in (*id_columns, line_key) if key in reserved]
    if clashing:
        raise ValueError(f"{path}: id_columns / line_key {clashing} would replace the items' own keys {sorted(reserved)}.")
    repeated = _repeated([*id_columns, *([line_key] if line_key is not None else [])])
    if repeated:
        raise ValueError(f"{path}: {repeated} named twice among id_columns {list(id_columns)} and line_key {line_key!r}.")
    id_idx = [header.index(name) for name in id_columns]
    datalist, n_without_cluster = [], 0
    last_line = reader.line_num
    for row in reader:
        # a quoted cell may hold line breaks: a record's line is the first of its lines
        first_line, last_line = last_line + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        line = f"{path}, line {first_line}"
        if len(row) != len(header):
            raise ValueError(f"{line}: expected {len(header)} cells as in the header, found {len(row)}.")
        values = [_parse_feature(row[i], f"{line}, column {name!r}") for i, name in zip(feature_idx, features)]
        item: dict = {"features": np.asarray(values, dtype=np.float32)}
        item.update((name, row[i].strip()) for i, name in zip(id_idx, id_columns))
        if line_key is not None:
            item[line_key] = first_line
        if label_column is not None:
            cell, where = row[header.index(label_column)], f"{line}, column {label_column!r}"
            if task == "regression":
                item["label"] = _parse_feature(cell, where, kind="label")
            else:
                item["label"] = parse_label(cell, where, label_names)
                if n_classes is not None and not 0 <= item["label"] < n_classes:
                    raise ValueError(
                        f"{where}: label {cell.strip()!r} is outside the model's classes; expected "
                        f"{', '.join(str(k) for k in range(n_classes))}."
                    )
        if cluster_column is not None:
            cell = row[header.index(cluster_column)]
            if require_cluster or not is_missing_value(cell):
                item["cluster"] = cluster_id(cell, f"{line}, column {cluster_column!r}")
            else:
                n_without_cluster += 1
        datalist.append(item)
    return datalist, n_without_cluster


def csv_feature_columns(
    path: str | os.PathLike,
    feature_columns: Sequence[str] | None = None,
    label_column: str | None = "label",
    cluster_column: str | None = "cluster",
    id_columns: Sequence[str] = (),
    encoding: str = "utf-8-sig",
) -> list[str]:
    """The feature columns :func:`load_csv_datalist` reads from ``path`` with these arguments, in order (``None``:
    every column but the label, cluster and id columns); only the header is read. A bundle records them beside its
    model (:func:`~monai_armed.data.record_preprocessing`) so that inference reads the same columns.

    Example::

        csv_feature_columns("patients.csv", id_columns=["patient_id"])   # ["age", "bmi"]
    """
    path = os.fspath(path)
    with open(path, newline="", encoding=encoding) as f:
        try:
            header = _read_header(csv.reader(f), path)
        except UnicodeDecodeError as err:
            raise _decode_error(path, encoding, err) from None
    label, cluster = (c if c in header else None for c in (label_column, cluster_column))
    return _resolve_feature_columns(header, feature_columns, label, cluster, path, id_columns)


def _feature_rows(datalist: Sequence[dict], features_key: str) -> list[np.ndarray]:
    """Return each item's features as a 1-D array, checking that they all have the same length."""
    if not datalist:
        raise ValueError("the datalist is empty.")
    rows = [np.asarray(item[features_key], dtype=np.float64).reshape(-1) for item in datalist]
    lengths = sorted({len(row) for row in rows})
    if len(lengths) > 1:
        raise ValueError(f"all items must have the same number of features, found lengths {lengths}.")
    return rows


def save_csv_datalist(
    datalist: Sequence[dict], path: str | os.PathLike, feature_names: Sequence[str] | None = None
) -> None:
    """
    Write a datalist to a CSV file readable by :func:`load_csv_datalist`.

    The file is first written to a temporary file in the same directory and then moved over ``path``, so
    an error never leaves a half-written file behind.

    Args:
        datalist: dicts with ``"features"`` (1-D, same length for all items), ``"label"`` and ``"cluster"``; a
            whole-number label is written as an integer, another (a regression's continuous label) exactly as a float.
        path: destination CSV file; its directory must exist.
        feature_names: names of the feature columns; defaults to ``f0``, ..., ``f{F-1}``.

    Example::

        save_csv_datalist([{"features": np.array([0.5, 1.0]), "label": 1, "cluster": "site_a"}], "data.csv")
        load_csv_datalist("data.csv")[0]["cluster"]  # "site_a"
    """
    path = os.fspath(path)
    rows = _feature_rows(datalist, "features")
    names = [f"f{i}" for i in range(len(rows[0]))] if feature_names is None else list(feature_names)
    if len(names) != len(rows[0]):
        raise ValueError(f"{path}: got {len(names)} feature names for {len(rows[0])} features.")
    if {"label", "cluster"} & set(names):
        raise ValueError(f"{path}: feature names must not include 'label' or 'cluster', got {names}.")
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*names, "label", "cluster"])
        for item, row in zip(datalist, rows):
            writer.writerow([*row.tolist(), _label_cell(item["label"]), item["cluster"]])


def _label_cell(label: Any) -> int | float:
    """A label as written to a CSV cell: whole numbers as integers (class indices), others as floats."""
    value = float(label)
    return int(value) if value.is_integer() else value


def datalist_to_arrays(
    datalist: Sequence[dict], features_key: str = "features", task: str = "classification"
) -> tuple[np.ndarray, np.ndarray, list]:
    """
    Stack a datalist into arrays.

    Args:
        datalist: dicts with ``features_key`` (1-D, same length for all items), ``"label"`` and ``"cluster"``.
        features_key: key of the feature vector in each item.
        task: ``"classification"`` (class indices) or ``"regression"`` (continuous labels).

    Returns:
        ``(X, y, clusters)``: features ``float32 (N, F)``, labels ``int64 (N,)`` (``float32`` for regression) and the
        list of cluster ids.

    Raises:
        ValueError: for a classification label that is not a whole number (it names the item).

    Example::

        X, y, clusters = datalist_to_arrays(load_csv_datalist("data.csv"))
        X, y, clusters = datalist_to_arrays(load_csv_datalist("bp.csv", task="regression"), task="regression")
    """
    _check_task(task)
    X = np.stack(_feature_rows(datalist, features_key)).astype(np.float32)
    labels = np.asarray([item["label"] for item in datalist], dtype=np.float64)
    if task == "regression":
        return X, labels.astype(np.float32), [item["cluster"] for item in datalist]
    fractional = np.flatnonzero(labels != np.round(labels))
    if fractional.size:
        first = int(fractional[0])
        raise ValueError(
            f"item {first} has the label {datalist[first]['label']!r}, not a class index; pass task='regression' for "
            "a continuous label."
        )
    return X, labels.astype(np.int64), [item["cluster"] for item in datalist]


def check_output_path(output: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse, before a run, an output file that is one of its inputs (it would be replaced by the results).

    Example::

        check_output_path("eval/predictions.csv", ["eval/predictions.csv"])   # ValueError
    """
    target = Path(output).resolve()
    for source in inputs:
        if Path(source).resolve() == target:
            raise ValueError(
                f"the output {output} is the input {source}: writing it would replace the input. Choose another "
                "output file (output_file) or move the input."
            )


def save_predictions_csv(
    path: str | os.PathLike,
    datalist: Sequence[dict],
    probability: torch.Tensor | np.ndarray,
    raw_cluster_key: str = "cluster",
    id_keys: Sequence[str] = (),
) -> str:
    """Write one row per sample: its ``id_keys`` values (e.g. the image path), its raw cluster id (if any) and the
    predicted probability of each class.

    ``probability`` is ``(N,)`` (binary: probability of class 1) or ``(N, C)``, written as numbers with 6 decimals.
    Id and cluster cells are written as given (a cluster ``"01"`` stays ``01``; numeric ids stay numbers), except that
    text starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading ``'`` so a spreadsheet does
    not run it as a formula (:func:`~monai_armed.utils.csv_cell`). Written atomically.

    Example::

        save_predictions_csv("eval/predictions.csv", datalist, positive_probability(logits))
        save_predictions_csv("eval/predictions.csv", image_datalist, prob, id_keys=["image"])
    """
    prob = np.asarray(probability.detach().cpu() if isinstance(probability, torch.Tensor) else probability)
    if len(prob) != len(datalist):
        raise ValueError(f"{len(prob)} predictions for {len(datalist)} samples.")
    prob = prob.reshape(len(prob), -1)
    names = ["p_class1"] if prob.shape[1] == 1 else [f"p_class{i}" for i in range(prob.shape[1])]
    header = [*id_keys, "cluster", *names]
    repeated = _repeated(header)
    if repeated:
        raise ValueError(f"{path}: the columns {repeated} would appear twice in {header}; rename the id_keys.")
    if raw_cluster_key in id_keys:
        raise ValueError(
            f"{path}: the id key {raw_cluster_key!r} is where the raw cluster ids are kept (raw_cluster_key), so the "
            "items' own values under it were replaced; rename that id column."
        )
    with atomic_open(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for item, row in zip(datalist, prob):
            text = [csv_cell(item.get(k, "")) for k in (*id_keys, raw_cluster_key)]
            writer.writerow([*text, *(f"{v:.6f}" for v in row)])
    return str(path)
