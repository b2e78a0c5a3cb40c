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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from monai_armed.data.generated import (
    MANIFEST,
    claim_output_dir,
    ensure_generated,
    record_planned_files,
    write_manifest,
)
from monai_armed.data.spirals import make_spiral_random_radius, make_spiral_true_boundary, spirals_to_datalist
from monai_armed.data.tabular import save_csv_datalist
from monai_armed.data.validation import check_label_names, check_section, read_datalist_sections, resolve_image_paths
from monai_armed.utils import cluster_id, write_json

__all__ = [
    "load_image_datalist",
    "split_by_cluster",
    "make_spiral_dataset",
    "ensure_spiral_dataset",
    "spiral_radii_file",
    "spiral_true_boundaries",
]


def load_image_datalist(
    path: str | os.PathLike,
    data_list_key: str = "training",
    required_keys: Sequence[str] = ("image", "label", "cluster"),
    base_dir: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    image_key: str = "image",
) -> list[dict]:
    """One section of a MONAI datalist JSON of clustered images, with every item checked for ``required_keys``.

    Image paths (``image_key``: a path or a list of paths) are resolved against ``base_dir`` (default: the datalist's
    folder) as MONAI's ``load_decathlon_datalist`` does; no other key is rewritten as a path. Cluster ids become text
    (:func:`monai_armed.utils.cluster_id`: the JSON number ``3`` is ``"3"``, the same cluster as a CSV cell ``3``;
    ``"01"`` stays ``"01"``). Numeric labels stay numbers; string labels are mapped through ``label_names`` (class
    names in class-index order, e.g. ``["CN", "AD"]``; text integers such as ``"1"`` become ints).

    An empty or missing section, an item without one of the keys (e.g. no ``cluster``), a missing cluster id (empty,
    NaN, null) where ``cluster`` is required, or a label name that is not in ``label_names`` raises an error that
    names the file, the section and the item. Where ``cluster`` is not required (inference), an item with an empty
    one is kept without it (logged): ``ClusterIndexd(..., missing_as_unseen=True)`` then gives it the index ``-1``.
    To check every section and the image files at once, use :func:`monai_armed.data.validate_datalist`.

    Example::

        train = load_image_datalist("data/mri/datalist.json", "training")
        unseen = load_image_datalist("data/mri/datalist.json", "unseen", required_keys=("image", "label"))
        adni = load_image_datalist("adni/datalist.json", "training", label_names=["CN", "AD"])   # "AD" -> 1
    """
    source = os.fspath(path)
    sections = read_datalist_sections(source)
    names = check_label_names(label_names, source)
    items, problems = check_section(source, sections, data_list_key, required_keys, names)
    if problems:
        raise problems[0]
    folder = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(source))
    return resolve_image_paths(items, folder, image_key)


def split_by_cluster(
    datalist: Sequence[Mapping],
    n_unseen: int = 2,
    test_fraction: float = 0.2,
    seed: int = 0,
    unseen_clusters: Sequence[object] | None = None,
    cluster_key: str = "cluster",
    label_key: str = "label",
) -> dict[str, list]:
    """Split a datalist into ``train`` / ``test`` (seen clusters) and ``unseen`` (held-out clusters).

    The held-out clusters are ``unseen_clusters`` if given, else ``n_unseen`` clusters drawn with ``seed``; at least
    2 seen clusters must remain. The seen clusters' samples are split into train and test stratified on label x
    cluster (on the cluster alone, or not at all, when a label x cluster group has a single sample or the test part
    is too small to hold one of every group). Cluster ids are compared as text
    (:func:`monai_armed.utils.cluster_id`: ``3`` and ``"3"`` are one cluster, ``"01"`` and ``"1"`` two); a missing id
    raises an error naming the item.

    Example::

        split = split_by_cluster(datalist, n_unseen=2, test_fraction=0.2, seed=0)
        len(split["train"]), len(split["test"]), len(split["unseen"])
    """
    missing = [i for i, d in enumerate(datalist) if cluster_key not in d or label_key not in d]
    if missing:
        raise KeyError(
            f"datalist item {missing[0]} lacks {cluster_key!r} or {label_key!r}: {sorted(datalist[missing[0]])}."
        )
    ids = [cluster_id(d[cluster_key], f"datalist item {i}, key {cluster_key!r}") for i, d in enumerate(datalist)]
    clusters = np.array(ids)
    names = sorted(set(clusters))
    if unseen_clusters is None:
        if not 0 <= n_unseen < len(names) - 1:
            raise ValueError(f"n_unseen must leave at least 2 seen clusters; got {n_unseen} of {len(names)} clusters.")
        unseen = set(np.random.RandomState(seed).choice(names, size=n_unseen, replace=False).tolist())
    else:
        unseen = {cluster_id(c, "unseen_clusters") for c in unseen_clusters}
        unknown = sorted(unseen - set(names))
        if unknown:
            raise ValueError(f"unseen_clusters {unknown} are not in the datalist (clusters: {names}).")
        if len(names) - len(unseen) < 2:
            raise ValueError(
                f"unseen_clusters must leave at least 2 seen clusters; got {len(unseen)} of {len(names)} clusters."
            )
    held_out = np.isin(clusters, sorted(unseen))
    seen_index = np.flatnonzero(~held_out)
    n_test = math.ceil(test_fraction * len(seen_index))  # as scikit-learn rounds a fraction
    train_index, test_index = train_test_split(
        seen_index,
        test_size=test_fraction,
        stratify=_strata(datalist, seen_index, clusters, label_key, min(n_test, len(seen_index) - n_test)),
        random_state=seed,
    )
    return {
        "train": [datalist[i] for i in sorted(train_index)],
        "test": [datalist[i] for i in sorted(test_index)],
        "unseen": [datalist[i] for i in np.flatnonzero(held_out)],
    }


def _strata(
    datalist: Sequence[Mapping], index: np.ndarray, clusters: np.ndarray, label_key: str, smaller_part: int
) -> list[str] | None:
    """label x cluster strata; cluster alone, or none, when some stratum has fewer than 2 samples or there are more
    strata than the smaller of the train and test parts has samples (each part needs one of every stratum)."""
    for strata in ([f"{datalist[i][label_key]}_{clusters[i]}" for i in index], [clusters[i] for i in index]):
        counts = np.unique(strata, return_counts=True)[1]
        if counts.min() >= 2 and len(counts) <= smaller_part:
            return strata
    return None


_SPIRAL_CSV, _SPIRAL_RADII = "spirals.csv", "spirals_radii.json"


def _spiral_parameters(
    clusters: int, points_per_cluster: int, inter_cluster_sd: float, noise: float, seed: int
) -> dict[str, Any]:
    """The spiral generation parameters as plain JSON types (they identify a cached data set)."""
    if clusters < 1 or points_per_cluster < 2:
        raise ValueError(f"need clusters >= 1 and points_per_cluster >= 2, got {clusters} and {points_per_cluster}.")
    return {
        "clusters": int(clusters),
        "points_per_cluster": int(points_per_cluster),
        "inter_cluster_sd": float(inter_cluster_sd),
        "noise": float(noise),
        "seed": int(seed),
    }


def _owns_spiral_file(name: str) -> bool:
    return name in (_SPIRAL_CSV, _SPIRAL_RADII)


def make_spiral_dataset(
    out_dir: str | os.PathLike,
    clusters: int = 10,
    points_per_cluster: int = 1000,
    inter_cluster_sd: float = 0.3,
    noise: float = 0.1,
    seed: int = 48,
) -> Path:
    """Write the ARMED notebook's spiral data set into ``out_dir`` (always; see :func:`ensure_spiral_dataset`).

    Writes ``spirals.csv`` (``f0, f1, label, cluster``), ``spirals_radii.json`` (each cluster's spiral radius, see
    :func:`spiral_radii_file`) and, last, ``manifest.json``. Uses numpy's legacy global seed like the authors'
    notebook (``np.random.seed(seed)``), then restores the previous global random state. ``out_dir`` must be new, empty
    or an earlier output of this generator: a folder holding any other file raises
    :class:`~monai_armed.data.generated.ForeignFilesError` before anything is written.

    Returns:
        the path of ``spirals.csv``.

    Example::

        csv_path = make_spiral_dataset("data/spirals", clusters=3, points_per_cluster=100)
        datalist = load_csv_datalist(csv_path)
    """
    params = _spiral_parameters(clusters, points_per_cluster, inter_cluster_sd, noise, seed)
    out = claim_output_dir(out_dir, "spirals", _owns_spiral_file)
    (out / MANIFEST).unlink(missing_ok=True)
    record_planned_files(out, [_SPIRAL_CSV, _SPIRAL_RADII])
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        x, z, y, radii = make_spiral_random_radius(
            clusters, points_per_cluster, mean_radius=1.0, inter_cluster_sd=inter_cluster_sd, noise=noise
        )
    finally:
        np.random.set_state(state)
    write_json({"radii": {str(c): float(r) for c, r in enumerate(radii)}, "degrees": 360}, out / _SPIRAL_RADII)
    save_csv_datalist(spirals_to_datalist(x, z, y), out / _SPIRAL_CSV)
    write_manifest(out, params, [_SPIRAL_CSV], "spirals", radii=_SPIRAL_RADII)
    return out / _SPIRAL_CSV


def ensure_spiral_dataset(out_dir: str | os.PathLike, **params: Any) -> Path:
    """The spiral data set in ``out_dir``, generated by :func:`make_spiral_dataset` unless a complete one with the same
    parameters is already there (every file with its recorded size and hash).

    Returns:
        the path of ``spirals.csv``.

    Example::

        csv_path = ensure_spiral_dataset("data/spirals")                  # generates
        csv_path = ensure_spiral_dataset("data/spirals")                  # reuses
    """
    return ensure_generated(make_spiral_dataset, _spiral_parameters, out_dir, params, [_SPIRAL_CSV, _SPIRAL_RADII])


def spiral_radii_file(csv_path: str | os.PathLike) -> Path:
    """Where :func:`make_spiral_dataset` records each cluster's spiral radius (``<name>_radii.json``).

    Example::

        json.loads(spiral_radii_file("data/spirals.csv").read_text())["radii"]["3"]
    """
    path = Path(csv_path)
    return path.with_name(f"{path.stem}_radii.json")


def spiral_true_boundaries(csv_path: str | os.PathLike, cluster_names: Sequence[str]) -> dict[int, np.ndarray]:
    """The true class boundary of each cluster (index in ``cluster_names``) and of the mean radius (index ``-1``).

    A cluster's spirals are the unit spirals scaled by its radius, so its boundary is the unit boundary scaled the
    same way. Reads the radii that :func:`make_spiral_dataset` recorded; raises ``FileNotFoundError`` naming the file.

    Example::

        boundaries = spiral_true_boundaries("data/spirals.csv", vocabulary.clusters)
        plot_decision_boundaries(predict, [-1, 0, 1], "boundaries.png", true_boundary=boundaries)
    """
    radii_file = spiral_radii_file(csv_path)
    if not radii_file.is_file():
        raise FileNotFoundError(f"spiral radii file not found: {radii_file} (written by make_spiral_dataset).")
    record = json.loads(radii_file.read_text())
    unit = make_spiral_true_boundary(degrees=record["degrees"])
    boundaries = {-1: unit}
    for index, name in enumerate(cluster_names):
        if str(name) in record["radii"]:
            boundaries[index] = unit * record["radii"][str(name)]
    return boundaries
