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
"""Which images trained a model and how its inputs were prepared, kept beside its checkpoint, so that an evaluation
refuses to score training images and an inference refuses inputs prepared otherwise."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_armed.data.generated import file_record
from monai_armed.utils import write_json

__all__ = [
    "PREPROCESSING_FILE",
    "TRAINING_ITEMS_FILE",
    "TRAINING_SPLIT_FILE",
    "check_evaluated_items",
    "check_preprocessing",
    "check_training_split",
    "image_content",
    "image_id",
    "record_preprocessing",
    "record_training_items",
    "record_training_split",
    "recorded_preprocessing",
]

logger = logging.getLogger(__name__)

#: file name, in the checkpoint folder, of the training images' record
TRAINING_ITEMS_FILE = "training_items.json"
#: file name, in the checkpoint folder, of what decided a tabular training run's split
TRAINING_SPLIT_FILE = "training_split.json"
#: file name, in the checkpoint folder, of how the training run prepared its images
PREPROCESSING_FILE = "preprocessing.json"


def image_id(value: Any, resolve_links: bool = True) -> str:
    """An item's image as one comparable string: its real path (absolute, normalised, symbolic links resolved; paths
    joined for a multi-file image), so that one file listed under two names is one image. ``resolve_links=False``
    gives the id that records written before 0.7 hold (links not resolved).

    Example::

        image_id("data/./img/../img/a.nii.gz") == image_id("data/img/a.nii.gz")   # True
    """
    if isinstance(value, (list, tuple)):
        return "|".join(image_id(v, resolve_links) for v in value)
    if not isinstance(value, (str, os.PathLike)):
        return str(value)
    path = os.fspath(value)
    return os.path.realpath(path) if resolve_links else os.path.normpath(os.path.abspath(path))


def image_content(value: Any) -> str | None:
    """An item's image by content: the SHA-256 of its file (of each file, joined, for a multi-file image), or ``None``
    when it is not a path to an existing file. The same bytes under another path (a moved or copied data folder, a
    regenerated data set) give the same id.

    Example::

        image_content("data/img/a.nii.gz") == image_content("copy/of/data/img/a.nii.gz")   # True for a copy
    """
    if isinstance(value, (list, tuple)):
        parts = [image_content(v) for v in value]
        return None if not parts or None in parts else "|".join(parts)  # type: ignore[arg-type]
    if not isinstance(value, (str, os.PathLike)) or not os.path.isfile(value):
        return None
    return file_record(value)["sha256"]


def record_training_items(items: Sequence[Mapping[str, Any]], ckpt_dir: str | os.PathLike, image_key: str = "image") -> str:
    """Write the images of the training ``items`` to ``ckpt_dir/training_items.json`` (atomically), by path and by
    content (:func:`image_content`); returns its path.

    Example::

        record_training_items(sections["train"], "runs/nuclei/armed/models")
    """
    values = [item[image_key] for item in items if image_key in item]
    images = sorted({image_id(value) for value in values})
    contents = sorted({content for value in values if (content := image_content(value)) is not None})
    return write_json({"image_key": image_key, "images": images, "contents": contents}, Path(ckpt_dir) / TRAINING_ITEMS_FILE)


def check_evaluated_items(
    sections: Mapping[str, Sequence[Mapping[str, Any]]],
    ckpt_dir: str | os.PathLike,
    training_section: str = "train",
    image_key: str = "image",
) -> None:
    """Refuse an evaluation that would score images the model in ``ckpt_dir`` trained on.

    Every section but ``training_section`` is compared with the record that :func:`record_training_items` wrote when
    the model was trained, by path and by the content of its files (:func:`image_content`), so that a moved or copied
    data or run folder is recognised; an image that is a folder (a DICOM series) is compared by path alone. An
    evaluated image with the same bytes as a training image counts as a training image.
    A bundle's evaluation rebuilds its data from the training config: generated data asked for with other settings
    than the training run's (seed, size, number of images) are generated anew, and their test sections can then hold
    the model's training images. Without a record (a model trained before monai-armed 0.5.2) a warning says that
    nothing was checked; a record without contents (before 0.8.1) is compared by path alone, with a warning.

    Raises:
        ValueError: naming, per section, how many images the model trained on and the first of them.

    Example::

        check_evaluated_items({"test": sections["test"], "unseen": sections["unseen"]}, "runs/nuclei/armed/models")
    """
    record = Path(ckpt_dir) / TRAINING_ITEMS_FILE
    if not record.is_file():
        logger.warning(f"{record} does not exist: the evaluated images are not checked against the training images.")
        return
    recorded = json.loads(record.read_text())
    trained, contents = set(recorded["images"]), recorded.get("contents")
    if contents is None:
        logger.warning(f"{record} lists the training images by path alone (written before monai-armed 0.8.1): "
                       "a training image under another path (a moved or copied data folder) is not recognised.")  # fmt: skip
    contents = set(contents or ())

    def trained_on(value: Any) -> bool:
        if image_id(value) in trained or image_id(value, resolve_links=False) in trained:
            return True
        return bool(contents) and image_content(value) in contents

    overlaps = []
    for name, items in sections.items():
        if name == training_section:
            continue
        seen = [image_id(item[image_key]) for item in items if image_key in item and trained_on(item[image_key])]
        if seen:
            overlaps.append(f"section {name!r}: {len(seen)} of {len(items)} images, e.g. {seen[0]}")
    if overlaps:
        raise ValueError(
            f"the model in {ckpt_dir} was trained on images that this evaluation would score ({'; '.join(overlaps)}; "
            f"training images listed in {record}). Generated data asked for with other settings than the training "
            "run's are generated anew: give the evaluation the training run's data overrides, or evaluate on images "
            "the model has not trained on."
        )


def _split_record(csv_file: str | os.PathLike, settings: Mapping[str, Any]) -> dict[str, Any]:
    # through JSON, so that what is compared is what the record holds (a tuple reads back as a list)
    return json.loads(json.dumps({"csv_sha256": file_record(csv_file)["sha256"], **{k: settings[k] for k in sorted(settings)}}))


def record_training_split(ckpt_dir: str | os.PathLike, csv_file: str | os.PathLike, **settings: Any) -> str:
    """Write what decides a tabular training run's split into ``ckpt_dir/training_split.json`` (atomically): the
    CSV's content hash, its path and the split settings (JSON values); returns the file's path.

    Example::

        record_training_split("runs/spirals/models", "data/spirals.csv", n_unseen_clusters=2, test_fraction=0.2)
    """
    record = {"csv_file": os.fspath(csv_file), **_split_record(csv_file, settings)}
    return write_json(record, Path(ckpt_dir) / TRAINING_SPLIT_FILE)


def check_training_split(ckpt_dir: str | os.PathLike, csv_file: str | os.PathLike, **settings: Any) -> None:
    """Refuse an evaluation whose split would differ from the training run's: another CSV (by content) or other split
    settings would put training rows among the scored ones, or score clusters the model saw as unseen. Without a
    record (a model trained before monai-armed 0.5.3) a warning says that nothing was checked.

    Raises:
        ValueError: naming each setting that differs, with the training run's value and this one's.

    Example::

        check_training_split("runs/spirals/models", "data/spirals.csv", n_unseen_clusters=2, test_fraction=0.2)
    """
    path = Path(ckpt_dir) / TRAINING_SPLIT_FILE
    if not path.is_file():
        logger.warning(f"{path} does not exist: the evaluated rows are not checked against the training split.")
        return
    trained = json.loads(path.read_text())
    now = _split_record(csv_file, settings)
    differ = [
        f"the CSV: {csv_file} is not the content of {trained.get('csv_file')} the model trained on"
        for key in ("csv_sha256",) if trained.get(key) != now[key]
    ] + _differences(trained, {k: v for k, v in now.items() if k != "csv_sha256"})  # fmt: skip
    if differ:
        raise ValueError(
            f"the model in {ckpt_dir} was trained on another split than this evaluation's ({'; '.join(differ)}): its "
            "scored rows could be training rows. Give the evaluation the training run's data overrides."
        )


def _differences(trained: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``"key: training value in training, this value now"`` for each setting that differs."""
    return [f"{key}: {trained.get(key)!r} in training, {value!r} now" for key, value in now.items() if trained.get(key) != value]


def record_preprocessing(ckpt_dir: str | os.PathLike, **settings: Any) -> str:
    """Write how a model's inputs were prepared (JSON values, e.g. ``image_dtype`` and ``intensity_max``, or a table's
    ``feature_columns``) to ``ckpt_dir/preprocessing.json`` (atomically), for :func:`check_preprocessing`; returns the
    file's path.

    Example::

        record_preprocessing("runs/cells/models", image_dtype="uint16", intensity_max=4095.0)
    """
    return write_json(json.loads(json.dumps(settings)), Path(ckpt_dir) / PREPROCESSING_FILE)


def recorded_preprocessing(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings :func:`record_preprocessing` wrote beside a model, or ``{}`` without a record (a model trained
    before monai-armed 0.8): an inference takes the training run's settings from it.

    Example::

        recorded_preprocessing("runs/spirals/models").get("feature_columns", ["f0", "f1"])
    """
    path = Path(ckpt_dir) / PREPROCESSING_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def check_preprocessing(ckpt_dir: str | os.PathLike, **settings: Any) -> None:
    """Refuse an evaluation or inference that prepares its inputs otherwise than the model's training did (e.g. 12-bit
    images scaled by 65535 after training on 4095, or other feature columns of a table: every prediction shifts,
    silently). Without a record (a model trained before monai-armed 0.7) a warning says that nothing was checked.

    Raises:
        ValueError: naming each setting that differs, with the training run's value and this one's.

    Example::

        check_preprocessing("runs/cells/models", image_dtype="uint16", intensity_max=4095.0)
    """
    path = Path(ckpt_dir) / PREPROCESSING_FILE
    if not path.is_file():
        logger.warning(f"{path} does not exist: the input preprocessing is not checked against the training run's.")
        return
    differ = _differences(json.loads(path.read_text()), json.loads(json.dumps(settings)))
    if differ:
        raise ValueError(
            f"the model in {ckpt_dir} was trained on inputs prepared otherwise ({'; '.join(differ)}): give this run "
            f"the training run's {', '.join(settings)} (or the options that decide them, e.g. a table's id_columns)."
        )
