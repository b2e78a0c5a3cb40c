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
Checks of datalists before any long work starts.

:func:`validate_datalist` looks at every section a run will use (training, validation, test, unseen, inference) and
reports every problem it finds in one error: missing sections and keys, image files that are absent or unreadable,
labels of the wrong type or out of range, missing cluster ids. The item-level rules (labels, cluster ids) are the
ones :func:`monai_armed.data.load_image_datalist` and :func:`monai_armed.data.load_csv_datalist` apply.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from monai_armed.data.provenance import image_id
from monai_armed.utils import cluster_id, is_missing_value

__all__ = [
    "validate_datalist",
    "validate_segmentation_datalist",
    "check_section",
    "parse_label",
    "check_label_names",
    "read_datalist_sections",
    "resolve_image_paths",
    "check_intensity_use",
]

logger = logging.getLogger(__name__)

DEFAULT_REQUIRED_KEYS = ("image", "label", "cluster")
_ERROR_LINE = re.compile(r"[\w.]+(Error|Exception): ")


def check_label_names(label_names: Sequence[str] | None, source: str) -> list[str] | None:
    """``label_names`` as a list, checked to be distinct non-empty strings (``source`` names the run's data).

    Example::

        check_label_names(["CN", "AD"], "data.csv")   # ["CN", "AD"]
    """
    if label_names is None:
        return None
    if isinstance(label_names, str):
        raise ValueError(f"{source}: label_names must be a list of class names in index order, got {label_names!r}.")
    names = list(label_names)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"{source}: label_names must be non-empty class names in index order, got {names!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: label_names has duplicate class names: {names!r}.")
    return names


def parse_label(value: Any, where: str, label_names: Sequence[str] | None = None) -> Any:
    """A class label as a class index: a name in ``label_names`` becomes its position, a text integer (a CSV cell
    ``"1"`` or ``"1.0"``) an ``int``, and with ``label_names`` a whole number (a JSON ``1.0``) too; other numbers are
    returned as they are (a regression target).

    Raises a ``ValueError`` starting with ``where`` for a bool, a name that is not in ``label_names`` (or any name
    when there are none: then it says to pass ``label_names``), and, with ``label_names``, a number that is not an
    index of them.

    Example::

        parse_label("AD", "data.csv, line 3", ["CN", "AD"])   # 1
        parse_label("1", "data.csv, line 3")                  # 1
    """
    if isinstance(value, bool):
        raise ValueError(f"{where}: label {value!r} is a bool; expected an integer class index.")
    if isinstance(value, str):
        text = value.strip()
        if label_names is not None and text in label_names:
            return list(label_names).index(text)
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not number.is_integer():
            if label_names is None:
                raise ValueError(
                    f"{where}: label {value!r} is not an integer class index; to use class names, pass label_names "
                    "(the names in class-index order, e.g. ['CN', 'AD'])."
                )
            raise ValueError(
                f"{where}: label {value!r} is not one of label_names {list(label_names)} nor an integer class index."
            )
        value = int(number)
    if label_names is not None and isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if not float(value).is_integer():  # with class names, a number is a class index (a JSON 1.0 included)
            raise ValueError(
                f"{where}: label {value!r} is not one of label_names {list(label_names)} nor an integer class index."
            )
        value = int(value)
    if label_names is not None and isinstance(value, numbers.Integral) and not 0 <= value < len(label_names):
        raise ValueError(
            f"{where}: label {value} is out of range for label_names {list(label_names)}; "
            f"expected 0..{len(label_names) - 1}."
        )
    return value


def read_datalist_sections(path: str | os.PathLike) -> dict:
    """The JSON object of a datalist file; ``FileNotFoundError`` / ``ValueError`` naming the file otherwise.

    Example::

        sorted(read_datalist_sections("data/mri/datalist.json"))   # ["test", "training", "unseen", "validation"]
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"datalist file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            sections = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"datalist {path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(
                f"datalist {path} is not UTF-8 text (byte {e.start}: {e.reason}); re-save it as UTF-8."
            ) from None
    if not isinstance(sections, dict):
        raise ValueError(f"datalist {path} must be a JSON object of sections, got a {type(sections).__name__}.")
    return sections


def check_section(
    source: str,
    sections: Mapping[str, Any],
    name: str,
    required_keys: Sequence[str],
    label_names: Sequence[str] | None = None,
    n_classes: int | None = None,
    label_key: str | None = "label",
    cluster_key: str = "cluster",
) -> tuple[list[dict | None], list[Exception]]:
    """One datalist section's items with labels as class indices and cluster ids as text, and its problems.

    The section must be a non-empty list (else a ``KeyError`` problem); each item needs ``required_keys`` (else a
    ``KeyError``); a present label is parsed with :func:`parse_label` and, with ``n_classes``, must be an integer in
    ``[0, n_classes)``; a present cluster id must not be missing (empty, NaN, null) when ``cluster_key`` is required,
    and is dropped (logged) when it is not. An item with a problem is ``None`` in the returned list. Every message
    names ``source``, the section and the item.

    Example::

        items, problems = check_section("datalist.json", json.load(f), "training", ["image", "label", "cluster"])
        if problems:
            raise problems[0]
    """
    items = sections.get(name)
    if items is None or (isinstance(items, list) and not items):
        return [], [KeyError(f"datalist {source} has no (or an empty) {name!r} section; it has {sorted(sections)}.")]
    if not isinstance(items, list):
        return [], [
            ValueError(f"datalist {source}, section {name!r}: expected a list of items, got a {type(items).__name__}.")
        ]
    checked: list[dict | None] = []
    problems: list[Exception] = []
    n_without_cluster = 0
    for i, item in enumerate(items):
        where = f"datalist {source}, section {name!r}, item {i}"
        missing = [k for k in required_keys if not isinstance(item, dict) or k not in item]
        if missing:
            got = sorted(item) if isinstance(item, dict) else repr(item)
            problems.append(
                KeyError(f"{where}: missing key(s) {missing}; every item needs {list(required_keys)} (got {got}).")
            )
            checked.append(None)
            continue
        item = dict(item)
        try:
            if label_key is not None and label_key in item:
                item[label_key] = _class_index(item[label_key], f"{where}, key {label_key!r}", label_names, n_classes)
            if cluster_key in item and cluster_key not in required_keys and is_missing_value(item[cluster_key]):
                del item[cluster_key]  # unknown cluster: the Z-predictor's membership or fixed effects
                n_without_cluster += 1
            elif cluster_key in item:
                item[cluster_key] = cluster_id(item[cluster_key], f"{where}, key {cluster_key!r}")
        except ValueError as err:
            problems.append(err)
            item = None
        checked.append(item)
    if n_without_cluster:
        logger.warning(
            f"datalist {source}, section {name!r}: {n_without_cluster} item(s) have an empty {cluster_key!r}; they "
            "are treated as of unknown cluster (the Z-predictor's inferred membership, or fixed effects only)."
        )
    return checked, problems


def _class_index(value: Any, where: str, label_names: Sequence[str] | None, n_classes: int | None) -> Any:
    """:func:`parse_label`, then, with ``n_classes``, an integer in ``[0, n_classes)``."""
    value = parse_label(value, where, label_names)
    if n_classes is None:
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{where}: label {value!r} is not an integer class index; expected 0..{n_classes - 1}.")
    if not 0 <= value < n_classes:
        raise ValueError(f"{where}: label {value} is out of range; expected a class index 0..{n_classes - 1}.")
    return int(value)


def resolve_image_paths(items: list, base_dir: str | os.PathLike, image_key: str = "image") -> list:
    """Join each item's relative image path (or list of paths) to ``base_dir``, as MONAI's datalist loader does;
    other keys are left alone (a cluster id that happens to name a file stays the id). ``None`` items are skipped.

    Example::

        resolve_image_paths([{"image": "images/a.nii.gz"}], "/data/mri")   # [{"image": "/data/mri/images/a.nii.gz"}]
    """
    for item in items:
        value = item.get(image_key) if item is not None else None
        if isinstance(value, (str, os.PathLike)):
            item[image_key] = os.path.normpath(os.path.join(base_dir, value))
        elif isinstance(value, list) and value and all(isinstance(v, (str, os.PathLike)) for v in value):
            item[image_key] = [os.path.normpath(os.path.join(base_dir, v)) for v in value]
    return items


def _file_problems(
    where: str, value: Any, loader: Callable[[Any], Any] | None, read: dict[str, str | None]
) -> list[Exception]:
    """Problems of one item's image file(s): not a path, absent, or (with ``loader``) unreadable.

    ``read`` caches each file's outcome, so a file that several items share is read once.
    """
    paths = value if isinstance(value, list) else [value]
    if not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
        return [ValueError(f"{where}: {value!r} is not a file path; expected a path or a list of paths.")]
    problems = []
    for path in map(os.fspath, paths):
        if path not in read:
            read[path] = _read_problem(path, loader)
        if read[path] is not None:
            problems.append(ValueError(f"{where}: {read[path]}"))
    return problems


def _read_problem(path: str, loader: Callable[[Any], Any] | None) -> str | None:
    if not os.path.isfile(path):
        return f"file {path} not found; expected an existing image file."
    if loader is None:
        return None
    try:
        loader(path)
    except Exception as err:
        return f"could not read {path} ({_summary(err)}); expected a complete, readable image file."
    return None


def _summary(err: Exception, limit: int = 400) -> str:
    """One line for an exception whose message may hold tracebacks (MONAI's ``LoadImage`` lists every reader's):
    its first line and the first ``SomeError: ...`` line in it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = next((line for line in lines[1:] if _ERROR_LINE.match(line)), None)
    text = f"{type(err).__name__}: {lines[0] if lines else ''}" + (f" ... {cause}" if cause else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cluster_coverage(
    source: str,
    checked: Mapping[str, list[dict]],
    train_section: str | None,
    unseen_sections: Sequence[str],
    cluster_key: str,
) -> None:
    """Warn about clusters that the runs will treat differently from what the sections' names say."""
    if train_section not in checked:
        return
    seen = {item[cluster_key] for item in checked[train_section] if cluster_key in item}
    for name, items in checked.items():
        if name == train_section:
            continue
        ids = {item[cluster_key] for item in items if cluster_key in item}
        if name in unseen_sections:
            if ids & seen:
                logger.warning(
                    f"datalist {source}, section {name!r}: cluster(s) {sorted(ids & seen)} are also in section "
                    f"{train_section!r}, so they are evaluated as seen clusters."
                )
            continue
        new = sorted(ids - seen)
        if new:
            twins = sorted(c for c in seen if any(_same_number(c, n) for n in new))
            hint = f" Section {train_section!r} has {twins}: cluster ids are compared as text." if twins else ""
            n_items = sum(item.get(cluster_key) in new for item in items)
            logger.warning(
                f"datalist {source}, section {name!r}: {n_items} item(s) of cluster(s) {new} not in section "
                f"{train_section!r}; they are evaluated as unseen (-1).{hint}"
            )


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False


def validate_datalist(
    datalist: str | os.PathLike | Mapping[str, Sequence[Mapping]],
    sections: Mapping[str, Sequence[str]] | Sequence[str],
    n_classes: int | None = None,
    label_names: Sequence[str] | None = None,
    loader: Callable[[Any], Any] | None = None,
    train_section: str | None = "training",
    unseen_sections: Sequence[str] = ("unseen",),
    base_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str | None = "label",
    cluster_key: str = "cluster",
    max_problems: int = 50,
    all_classes: Sequence[str] = (),
) -> dict[str, list[dict]]:
    """
    Check every datalist section a run will use before the run starts, and report all problems in one error.

    For each section in ``sections``: it exists and is a non-empty list; each item has the section's required keys;
    its image file(s) exist and, with ``loader``, can be read; its label is a class index in ``[0, n_classes)`` (or a
    name in ``label_names``); its cluster id is not missing (empty, NaN, null); its image is not one of
    ``train_section``'s (the same file by its real path: the run would score what it trains on). Clusters of the other
    sections that are not in ``train_section`` are logged as a warning (they are evaluated as unseen), and so are
    clusters of ``unseen_sections`` that are in it.

    Reading each image with the loader the run uses is what catches a truncated or corrupt file (a ``.nii.gz`` whose
    header is intact but whose data ends early passes a header-only check); it reads every file once, so it costs
    about one epoch of loading (the generated MRI set, 576 NIfTI files of 0.3 MB: about 6 s on 2 CPU cores, against
    0.01 s for existence alone). Pass ``loader=None`` to check only that the files exist.

    Args:
        datalist: a datalist JSON file, or a mapping ``section -> items`` (e.g. a split of a CSV datalist).
        sections: the sections to check, with the keys each item needs (``{"unseen": ["image", "label"]}``); a
            list of names requires ``image``, ``label`` and ``cluster`` in each.
        n_classes: number of classes; labels must be integers in ``[0, n_classes)``. Default ``len(label_names)``,
            else labels are only parsed.
        label_names: class names in class-index order (``["CN", "AD"]``): string labels are mapped to their index.
        loader: called with each image path (e.g. ``monai_armed.transforms.CheckedLoadImage(image_only=True)``, or
            ``monai.transforms.LoadImage(reader=TiffFileReader(...), image_only=True)`` for TIFF); an exception
            is reported as an unreadable file.
        train_section: the section whose clusters the model learns (the vocabulary); ``None`` skips the coverage
            warnings.
        unseen_sections: sections meant to hold clusters absent from ``train_section``.
        base_dir: folder that relative image paths are relative to (default: the datalist file's folder; the
            working directory for a mapping).
        image_key, label_key, cluster_key: keys of the image path(s), label and cluster id (``label_key=None``: the
            labels are not parsed, e.g. mask paths, see :func:`validate_segmentation_datalist`).
        max_problems: at most this many problems are listed (the rest are counted).
        all_classes: sections that must hold every class (``n_classes`` of them), e.g. the validation section whose
            AUROC picks the best model: with one class it is undefined and no model would ever be kept.

    Returns:
        the checked sections: items with image paths joined to ``base_dir``, labels as class indices and cluster ids
        as text (:func:`monai_armed.utils.cluster_id`).

    Raises:
        ValueError: listing every problem found, each naming the datalist, section, item, key and what was expected.
        FileNotFoundError: when ``datalist`` is a path that does not exist.

    Example::

        validate_datalist(
            "data/mri/datalist.json",
            {"training": ["image", "label", "cluster"], "validation": ["image", "label", "cluster"],
             "test": ["image", "label", "cluster"], "unseen": ["image", "label"]},
            n_classes=2,
            loader=CheckedLoadImage(image_only=True),
        )
    """
    if isinstance(datalist, Mapping):
        source, content = "<in-memory datalist>", datalist
        folder = os.fspath(base_dir) if base_dir is not None else os.getcwd()
    else:
        source, content = os.fspath(datalist), read_datalist_sections(datalist)
        folder = os.fspath(base_dir) if base_dir is not None else os.path.dirname(os.path.abspath(source))
    names = check_label_names(label_names, source)
    if n_classes is None and names is not None:
        n_classes = len(names)
    if names is not None and n_classes != len(names):
        raise ValueError(f"{source}: n_classes={n_classes} but label_names has {len(names)} names {names}.")
    if isinstance(sections, str):  # one section's name, not a sequence of one-letter names
        sections = [sections]
    required = dict(sections) if isinstance(sections, Mapping) else {s: DEFAULT_REQUIRED_KEYS for s in sections}
    problems: list[Exception] = []
    checked: dict[str, list[dict]] = {}
    read: dict[str, str | None] = {}
    for section, keys in required.items():
        good, bad = check_section(source, content, section, keys, names, n_classes, label_key, cluster_key)
        problems += bad
        good = resolve_image_paths(good, folder, image_key)
        checked[section] = [item for item in good if item is not None]
        for i, item in enumerate(good):
            if item is not None and image_key in item:
                where = f"datalist {source}, section {section!r}, item {i}, key {image_key!r}"
                problems += _file_problems(where, item[image_key], loader, read)
    for section in all_classes if n_classes is not None and label_key is not None else ():
        found = sorted({item[label_key] for item in checked.get(section, []) if label_key in item})
        if checked.get(section) and len(found) < n_classes:
            problems.append(
                ValueError(
                    f"datalist {source}, section {section!r}: its labels are only {found}; it must hold every one of "
                    f"the {n_classes} classes (its AUROC decides which model is kept)."
                )
            )
    problems += _training_images_elsewhere(source, checked, train_section, image_key)
    if problems:
        listed = "\n".join(f"  - {p.args[0]}" for p in problems[:max_problems])
        more = f"\n  ... and {len(problems) - max_problems} more." if len(problems) > max_problems else ""
        raise ValueError(f"datalist {source}: {len(problems)} problem(s) found before the run:\n{listed}{more}")
    _cluster_coverage(source, checked, train_section, unseen_sections, cluster_key)
    logger.info(f"datalist {source}: sections {list(checked)} checked ({len(read)} image files).")
    return checked


def _training_images_elsewhere(
    source: str, checked: Mapping[str, Sequence[Mapping]], train_section: str | None, image_key: str
) -> list[ValueError]:
    """An item of another section whose image is one of ``train_section``'s (the same file, by its real path): a
    model would be validated or tested on an image it trains on."""
    if train_section is None or train_section not in checked:
        return []
    trained = {image_id(item[image_key]): i for i, item in enumerate(checked[train_section]) if image_key in item}
    problems = []
    for section, items in checked.items():
        for i, item in enumerate(items if section != train_section else ()):
            j = trained.get(image_id(item[image_key])) if image_key in item else None
            if j is not None:
                problems.append(
                    ValueError(
                        f"datalist {source}, section {section!r}, item {i}, key {image_key!r}: the image of "
                        f"{train_section!r} item {j} ({item[image_key]}); a section the run scores must not hold "
                        "training images."
                    )
                )
    return problems


def _mask_problem(
    where: str,
    image_path: Any,
    image_shape: tuple[int, ...] | None,
    mask_path: str,
    loader: Callable[[Any], Any],
    n_classes: int,
) -> tuple[str | None, bool]:
    """The problem of one image / mask pair (``None`` if fine) and whether the mask is empty; ``image_shape`` is the
    image's squeezed shape as loaded (``None``: not known, e.g. an image given as several files, not compared)."""
    if not os.path.isfile(mask_path):
        return f"{where}: mask file {mask_path} not found; expected an existing mask file.", False
    try:
        mask = np.asarray(loader(mask_path))
    except Exception as err:
        return f"{where}: could not read {mask_path} ({_summary(err)}).", False
    spatial = np.squeeze(mask).shape
    # a multichannel image: its spatial axes lead (channel-last, as TiffFileReader loads) or trail (channel-first)
    if image_shape is not None and spatial not in (image_shape[: len(spatial)], image_shape[-len(spatial) :]):
        return (
            f"{where}: the mask {mask_path} has shape {spatial} (as loaded) but the image {image_path} "
            f"has {image_shape}; a mask must label every pixel of its image."
        ), False
    values = np.unique(mask)
    bad = [int(v) if float(v).is_integer() else v for v in values.tolist() if not float(v).is_integer() or not 0 <= v < n_classes]
    if bad:
        return (
            f"{where}: the mask {mask_path} holds the values {bad[:5]}; expected class indices 0..{n_classes - 1}."
        ), False
    return None, values.size == 1 and values[0] == 0


def validate_segmentation_datalist(
    datalist: str | os.PathLike | Mapping[str, Sequence[Mapping]],
    sections: Mapping[str, Sequence[str]],
    n_classes: int,
    loader: Callable[[Any], Any],
    train_section: str | None = "training",
    unseen_sections: Sequence[str] = ("unseen",),
    base_dir: str | os.PathLike | None = None,
    image_key: str = "image",
    label_key: str = "label",
    cluster_key: str = "cluster",
    max_problems: int = 50,
) -> dict[str, list[dict]]:
    """:func:`validate_datalist` for segmentation, where an item's ``label`` is the path of its mask.

    Besides the images and clusters (:func:`validate_datalist`), every mask must exist, be readable with ``loader``,
    have its image's shape (the spatial axes of a channel-first or channel-last image) and hold class indices
    ``0..n_classes-1`` only; all problems are reported in one error, each naming the datalist, section, item and both
    files. Empty masks are allowed (an image without any object,
    where an empty prediction scores Dice 1); a cluster whose masks are all empty is logged as a warning, since it
    teaches the random effects only the background.

    Args:
        datalist: a datalist JSON file, or a mapping ``section -> items``.
        sections: the sections to check with the keys each item needs (``{"unseen": ["image", "label"]}``).
        n_classes: number of classes including the background.
        loader: reads an image or mask path (e.g. ``LoadImage(reader=TiffFileReader(...), image_only=True)``).
        train_section, unseen_sections, base_dir, image_key, label_key, cluster_key, max_problems: as for
            :func:`validate_datalist`.

    Returns:
        the checked sections, image and mask paths joined to the datalist's folder.

    Example::

        validate_segmentation_datalist("data/nuclei/datalist.json", {"training": ["image", "label", "cluster"]},
                                       n_classes=2, loader=LoadImage(reader=TiffFileReader(channels=1), image_only=True))
    """
    image_shapes: dict[str, tuple[int, ...]] = {}

    def read_image(path: str) -> Any:  # validate_datalist reads every image once: keep its shape for the masks
        image = loader(path)
        image_shapes[os.fspath(path)] = np.squeeze(np.asarray(image)).shape
        return image

    checked = validate_datalist(
        datalist,
        sections,
        loader=read_image,
        train_section=train_section,
        unseen_sections=unseen_sections,
        base_dir=base_dir,
        image_key=image_key,
        label_key=None,  # a mask path, not a class: checked below
        cluster_key=cluster_key,
        max_problems=max_problems,
    )
    source = "<in-memory datalist>" if isinstance(datalist, Mapping) else os.fspath(datalist)
    if base_dir is None:
        base_dir = os.getcwd() if isinstance(datalist, Mapping) else os.path.dirname(os.path.abspath(source))
    problems: list[str] = []
    empty_by_cluster: dict[str, list[bool]] = {}
    for section, items in checked.items():
        for i, item in enumerate(items):
            if label_key not in item:
                continue
            item[label_key] = os.path.normpath(os.path.join(base_dir, os.fspath(item[label_key])))
            where = f"datalist {source}, section {section!r}, item {i}, key {label_key!r}"
            image = item[image_key]
            shape = image_shapes.get(os.fspath(image)) if isinstance(image, (str, os.PathLike)) else None
            problem, empty = _mask_problem(where, image, shape, item[label_key], loader, n_classes)
            if problem is not None:
                problems.append(problem)
            elif cluster_key in item:
                empty_by_cluster.setdefault(item[cluster_key], []).append(empty)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:max_problems])
        more = f"\n  ... and {len(problems) - max_problems} more." if len(problems) > max_problems else ""
        raise ValueError(f"datalist {source}: {len(problems)} mask problem(s) found before the run:\n{listed}{more}")
    for cluster, empties in empty_by_cluster.items():
        if all(empties):
            logger.warning(f"datalist {source}: every mask of cluster {cluster!r} ({len(empties)}) is empty.")
    return checked


def check_intensity_use(
    dataset: Sequence[Mapping[str, Any]], intensity_max: float, key: str = "image", min_fraction: float = 0.25
) -> float:
    """Warn when images scaled by a fixed ``intensity_max`` (e.g. a dtype's maximum) use little of ``[0, 1]``.

    A fixed scale keeps each batch's brightness, a batch signature, but 12-bit camera data stored as uint16 and
    divided by 65535 reach the network as ``[0, 0.06]``: the reconstruction error then weighs little against the
    other losses. Give the scaling the largest value the camera records instead.

    Args:
        dataset: preprocessed items (e.g. a ``CacheDataset``) whose ``key`` holds the scaled images.
        intensity_max: the raw value that was scaled to 1 (named in the warning).
        key: the image key.
        min_fraction: warn when the largest scaled value of all images is below this.

    Returns:
        The largest scaled value.

    Example::

        check_intensity_use(train_cache, intensity_max=65535.0)   # warns for 12-bit data: pass intensity_max=4095
    """
    largest = max((float(np.max(np.asarray(item[key]))) for item in dataset), default=math.nan)
    if largest < min_fraction:
        logger.warning(
            f"the training images reach at most {largest:.3g} of the intensity range [0, {intensity_max:g}] that is "
            f"scaled to [0, 1] (brightest raw value about {largest * intensity_max:.6g}); if the camera records fewer "
            "bits than the file's dtype, set intensity_max to its largest value (e.g. --intensity_max 4095 for 12-bit "
            "data)."
        )
    return largest
