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
A synthetic multi-batch nucleus-segmentation data set: fluorescence fields of view holding many nuclei, with their
masks, imaged in batches that each have their own acquisition and staining.

A field of view holds nuclei at a density drawn per field (sparse to crowded, so that many nuclei touch). Each
nucleus is an ellipse whose outline is modulated by a few Fourier harmonics, with its own size, orientation,
brightness and chromatin texture; a few are dim (out of the focal plane) but still part of the mask. Cytoplasmic
haze around the nuclei and small bright debris (not nuclei, not in the mask) make the boundary and the background
harder. The mask is the union of the nuclei (label 1) on background (label 0).

Each imaging batch has the acquisition signature of :mod:`monai_armed.data.microscopy` (illumination gradient,
vignetting, fringe, background, defocus blur, Poisson-Gaussian noise, gain, offset, gamma) and a staining signature:
the nuclear stain's intensity, the haze's strength and the debris' amount. ``batch_effect`` scales all of them.

Command line::

    python -m monai_armed.data.nuclei --out data/nuclei --seed 0 --size 128
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from monai_armed.data.generated import (
    MANIFEST,
    claim_output_dir,
    ensure_generated,
    generator_parser,
    record_planned_files,
    remove_stale_files,
    run_generator_cli,
    run_jobs,
    write_manifest,
)
from monai_armed.data.microscopy import _batch_signature, _imaging_dates, _smooth_noise, apply_batch_signature
from monai_armed.data.mri import _split_subjects
from monai_armed.data.tiff import save_tiff
from monai_armed.utils import write_json

__all__ = [
    "make_nucleus_batches",
    "render_nucleus_field",
    "make_nucleus_dataset",
    "ensure_nucleus_dataset",
]

# Bump when the generator changes what it writes, so that cached data sets are regenerated.
_GENERATOR_VERSION = 1
_DATALIST, _BATCHES, _IMAGES, _MASKS = "datalist.json", "batches.json", "images", "masks"
_DTYPES = ("uint8", "uint16")
# nucleus radii and blur widths are given for 128-pixel fields and scale with the field size
_REFERENCE_SIZE = 128
_OWN_FILE = re.compile(rf"{re.escape(_DATALIST)}|{re.escape(_BATCHES)}|({_IMAGES}|{_MASKS})/b\d+_v\d+\.tif")


def _stain_signature(rng: np.random.Generator, batch_effect: float) -> dict[str, float]:
    """One batch's staining: nuclear stain intensity, cytoplasmic haze and debris, scaled by ``batch_effect``."""
    e = batch_effect
    return {
        "stain": float(np.exp(e * rng.normal(0.0, 0.35))),
        "haze": float(0.05 + e * rng.uniform(0.0, 0.2)),
        "debris": float(e * rng.uniform(0.0, 1.0)),
    }


def make_nucleus_batches(
    n_seen: int = 6, n_unseen: int = 3, seed: int = 0, batch_effect: float = 1.0
) -> list[dict[str, Any]]:
    """
    Draw the imaging batches of a synthetic nucleus-segmentation study: date, acquisition and staining signatures.

    The seen batches come first (``b00``, ``b01``, ... in date order), then the unseen ones, whose dates are
    scattered among the seen ones.

    Args:
        n_seen: batches used for training (their fields go to training / validation / test); at least 2.
        n_unseen: held-out batches (all their fields go to the ``unseen`` split).
        seed: random seed; the table depends only on the arguments.
        batch_effect: strength of every acquisition and staining effect; 0 makes the batches identical.

    Returns:
        one dict per batch: ``batch`` (id such as ``"b03"``), ``date`` (the cluster name), ``seen``, ``signature``
        (see :func:`~monai_armed.data.microscopy.apply_batch_signature`) and ``stain`` (``stain``, ``haze``,
        ``debris``).

    Example::

        batches = make_nucleus_batches(n_seen=6, n_unseen=3, seed=0)
        [(b["date"], round(b["stain"]["stain"], 2)) for b in batches][:2]
    """
    if n_seen < 2 or n_unseen < 0:
        raise ValueError(f"need n_seen >= 2 and n_unseen >= 0 batches, got n_seen={n_seen}, n_unseen={n_unseen}.")
    if batch_effect < 0:
        raise ValueError(f"batch_effect must be >= 0, got {batch_effect}.")
    rng = np.random.default_rng([seed, 10])
    dates = _imaging_dates(rng, n_seen + n_unseen)
    unseen_at = set(rng.choice(n_seen + n_unseen, size=n_unseen, replace=False).tolist())
    ordered = [d for i, d in enumerate(dates) if i not in unseen_at] + [
        d for i, d in enumerate(dates) if i in unseen_at
    ]
    batches = []
    for index, day in enumerate(ordered):
        batch_rng = np.random.default_rng([seed, 11, index])
        batches.append(
            {
                "batch": f"b{index:02d}",
                "date": day,
                "seen": index < n_seen,
                "signature": _batch_signature(batch_rng, batch_effect),
                "stain": _stain_signature(batch_rng, batch_effect),
            }
        )
    return batches


def _nucleus(rng: np.random.Generator, size: int) -> dict[str, Any]:
    scale = size / _REFERENCE_SIZE
    radius = rng.uniform(3.5, 8.0) * scale
    return {
        "a": radius * rng.uniform(1.0, 1.5),
        "b": radius * rng.uniform(0.7, 1.0),
        "angle": rng.uniform(0.0, np.pi),
        "harmonics": rng.normal(0.0, 0.06, size=(3, 2)),
        "brightness": rng.uniform(0.45, 1.0) * (0.35 if rng.uniform() < 0.1 else 1.0),
    }


def _inside(n: Mapping[str, Any], dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Signed distance-like value, > 0 inside the nucleus outline (pixels)."""
    c, s = np.cos(n["angle"]), np.sin(n["angle"])
    u, v = dx * c + dy * s, -dx * s + dy * c
    theta = np.arctan2(v / n["b"], u / n["a"])
    modulation = 1.0 + sum(
        h[0] * np.cos((k + 2) * theta) + h[1] * np.sin((k + 2) * theta) for k, h in enumerate(n["harmonics"])
    )
    r = np.hypot(u / n["a"], v / n["b"])
    return (modulation - r) * min(n["a"], n["b"])


def render_nucleus_field(
    rng: np.random.Generator, size: int = 128, density: float | None = None, stain: Mapping[str, float] | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """
    Draw one clean field of view of nuclei and its mask.

    Nuclei are placed one by one at random; a candidate that would cover more than a quarter of an earlier nucleus is
    dropped, so nuclei touch and overlap a little but stay separable by eye.

    Args:
        rng: random generator.
        size: height and width in pixels.
        density: expected nuclei per 128 x 128 pixels (default: drawn per field between 10 and 40).
        stain: a batch's staining (``stain``, ``haze``, ``debris``; default neutral).

    Returns:
        ``(image, mask, count)``: float image in [0, 1], uint8 mask (1 = nucleus) and the number of nuclei.

    Example::

        image, mask, count = render_nucleus_field(np.random.default_rng(0), size=128)
    """
    stain = stain or {"stain": 1.0, "haze": 0.05, "debris": 0.0}
    density = rng.uniform(10.0, 40.0) if density is None else density
    n_wanted = rng.poisson(density * (size / _REFERENCE_SIZE) ** 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    image = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    texture = _smooth_noise(rng, size, 1.0 * size / _REFERENCE_SIZE)
    count = 0
    for _ in range(int(n_wanted)):
        nucleus = _nucleus(rng, size)
        cy, cx = rng.uniform(0, size, size=2)
        inside = _inside(nucleus, yy - cy, xx - cx)
        body = inside > 0
        if not body.any() or (mask & body).sum() > 0.25 * body.sum():
            continue
        soft = np.clip(inside / 1.5, 0.0, 1.0)  # a one-pixel soft edge
        level = nucleus["brightness"] * stain["stain"] * (0.85 + 0.15 * texture)
        image = np.maximum(image, soft * level)
        mask |= body
        count += 1
    haze = ndimage.gaussian_filter(mask.astype(float), 4.0 * size / _REFERENCE_SIZE)
    image = image + stain["haze"] * haze * (1.0 - mask)
    n_debris = rng.poisson(stain["debris"] * 6.0 * (size / _REFERENCE_SIZE) ** 2)
    for _ in range(int(n_debris)):
        cy, cx = rng.uniform(0, size, size=2)
        spot = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * (1.2 * size / _REFERENCE_SIZE) ** 2))
        image = image + rng.uniform(0.4, 0.9) * spot * (1.0 - mask)
    return np.clip(image, 0.0, 1.0), mask.astype(np.uint8), count


def _parameters(
    seed: int,
    n_seen: int,
    n_unseen: int,
    fields_per_batch: int,
    size: int,
    dtype: str,
    split: Sequence[float],
    batch_effect: float,
) -> dict[str, Any]:
    """The generation parameters as plain JSON types (they identify a cached data set), validated."""
    if n_seen < 2 or n_unseen < 0:
        raise ValueError(f"need n_seen >= 2 and n_unseen >= 0 batches, got n_seen={n_seen}, n_unseen={n_unseen}.")
    if fields_per_batch < 1:
        raise ValueError(f"fields_per_batch must be >= 1, got {fields_per_batch}.")
    if int(size) != size or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels, got {size}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    if len(split) != 3 or min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be (training, validation, test) fractions >= 0 with training > 0 summing to 1, got {split}."
        )
    if batch_effect < 0:
        raise ValueError(f"batch_effect must be >= 0, got {batch_effect}.")
    return {
        "generator_version": _GENERATOR_VERSION,
        "seed": int(seed),
        "n_seen": int(n_seen),
        "n_unseen": int(n_unseen),
        "fields_per_batch": int(fields_per_batch),
        "size": int(size),
        "dtype": dtype,
        "split": [float(f) for f in split],
        "batch_effect": float(batch_effect),
    }


def _render_job(job: dict[str, Any]) -> None:
    """Simulate and write one field of view and its mask (runs in worker processes)."""
    field_rng = np.random.default_rng([*job["seed"], 0])
    noise_rng = np.random.default_rng([*job["seed"], 1])
    clean, mask, _ = render_nucleus_field(field_rng, job["size"], job["density"], job["stain"])
    image = apply_batch_signature(clean, job["signature"], noise_rng)
    top = np.iinfo(job["dtype"]).max
    save_tiff(job["image"], np.rint(image * top).astype(job["dtype"]))
    save_tiff(job["mask"], mask)


def _owns(name: str) -> bool:
    """Whether a path relative to the output folder is one this generator writes."""
    return _OWN_FILE.fullmatch(name) is not None


def make_nucleus_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_seen: int = 6,
    n_unseen: int = 3,
    fields_per_batch: int = 12,
    size: int = 128,
    dtype: str = "uint8",
    split: Sequence[float] = (0.6, 0.15, 0.25),
    batch_effect: float = 1.0,
    num_workers: int | None = None,
    progress: bool = False,
) -> Path:
    """
    Generate the synthetic nucleus-segmentation data set in ``out_dir`` (always; see :func:`ensure_nucleus_dataset`).

    The defaults give 9 batches x 12 fields of 128 x 128 pixels, a few seconds on 2 CPUs. The files written are
    ``images/<batch>_v<NNN>.tif`` (the field, ``dtype``), ``masks/<batch>_v<NNN>.tif`` (uint8, 1 = nucleus),
    ``batches.json`` (the parameters and every batch's date and true signatures), ``datalist.json`` and last
    ``manifest.json``. Files are written atomically; a folder holding files this generator did not write is refused
    before anything is written (:class:`~monai_armed.data.generated.ForeignFilesError`).

    ``datalist.json`` holds ``training``, ``validation`` and ``test`` (the seen batches' fields, split per batch) and
    ``unseen`` (every field of the unseen batches). Each item is ``{"image", "label" (the mask's path), "cluster"
    (imaging date), "field" (id such as "b03_v007")}``, paths relative to the datalist's folder.

    Args:
        out_dir: output folder (created).
        seed: random seed.
        n_seen: training batches (at least 2).
        n_unseen: held-out batches.
        fields_per_batch: fields of view imaged per batch.
        size: field height and width in pixels (at least 32).
        dtype: ``"uint8"`` or ``"uint16"``: the stored intensities are ``round(image * max)``.
        split: (training, validation, test) fractions of each seen batch's fields, summing to 1.
        batch_effect: strength of the acquisition and staining effects (0 = identical batches).
        num_workers: worker processes (default: up to 4); results do not depend on it.
        progress: show a progress bar (tqdm, on stderr) when stderr is a terminal.

    Returns:
        the path of ``datalist.json``.

    Example::

        datalist = make_nucleus_dataset("data/nuclei", seed=0)
        loader = LoadImage(reader=TiffFileReader(channels=1), image_only=True)
        train = validate_segmentation_datalist(datalist, {"training": ["image", "label", "cluster"]}, n_classes=2,
                                               loader=loader)["training"]
    """
    params = _parameters(seed, n_seen, n_unseen, fields_per_batch, size, dtype, split, batch_effect)
    batches = make_nucleus_batches(n_seen, n_unseen, seed, batch_effect)
    out = claim_output_dir(out_dir, "nuclei", _owns)
    for folder in (_IMAGES, _MASKS):
        (out / folder).mkdir(exist_ok=True)
    for name in (MANIFEST, _DATALIST):
        (out / name).unlink(missing_ok=True)
    # _split_subjects stratifies on the id's prefix before "-": each seen batch is split on its own
    fields = [(f"{b['batch']}-{b['batch']}_v{i:03d}", 0) for b in batches if b["seen"] for i in range(fields_per_batch)]
    parts = _split_subjects(fields, split, np.random.default_rng([seed, 12]))
    split_of = {key.split("-", 1)[1]: part for key, part in parts.items()}
    datalist: dict[str, list] = {"training": [], "validation": [], "test": [], "unseen": []}
    jobs = []
    for index, batch in enumerate(batches):
        density_rng = np.random.default_rng([seed, 13, index])
        for number in range(fields_per_batch):
            name = f"{batch['batch']}_v{number:03d}"
            density = float(density_rng.uniform(10.0, 40.0))
            image, mask = f"{_IMAGES}/{name}.tif", f"{_MASKS}/{name}.tif"
            seed_key = [seed, 14, index, number]
            jobs.append(
                {
                    "image": str(out / image),
                    "mask": str(out / mask),
                    "seed": seed_key,
                    "size": params["size"],
                    "dtype": dtype,
                    "density": density,
                    "signature": batch["signature"],
                    "stain": batch["stain"],
                }
            )
            part = split_of[name] if batch["seen"] else "unseen"
            datalist[part].append({"image": image, "label": mask, "cluster": batch["date"], "field": name})
    files = sorted(f for items in datalist.values() for item in items for f in (item["image"], item["label"]))
    own = [*files, _BATCHES, _DATALIST]
    record_planned_files(out, own)
    run_jobs(_render_job, jobs, num_workers, progress, "nucleus fields", count=lambda job: 2)
    remove_stale_files(out, own)
    write_json({"parameters": params, "batches": batches}, out / _BATCHES)
    write_json(datalist, out / _DATALIST)
    write_manifest(out, params, files, "nuclei", datalist=_DATALIST, batches=_BATCHES)
    return out / _DATALIST


def ensure_nucleus_dataset(out_dir: str | os.PathLike, **params: Any) -> Path:
    """
    The synthetic nucleus-segmentation data set in ``out_dir``, generated by :func:`make_nucleus_dataset` unless a
    complete one with the same parameters is already there (its manifest's parameter hash matches and every file it
    lists exists with its recorded size and hash).

    Example::

        datalist = ensure_nucleus_dataset("data/nuclei", seed=0)   # generates (seconds)
        datalist = ensure_nucleus_dataset("data/nuclei", seed=0)   # reuses the files
    """
    return ensure_generated(make_nucleus_dataset, _parameters, out_dir, params, [_DATALIST, _BATCHES])


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m monai_armed.data.nuclei --out DIR [--seed S] [--size N] ...``.

    Prints the datalist's path on stdout (and a summary on stderr).

    Example::

        main(["--out", "data/nuclei", "--seed", "0"])
    """
    parser = generator_parser("monai_armed.data.nuclei", __doc__)
    parser.add_argument("--seen-batches", type=int, default=6)
    parser.add_argument("--unseen-batches", type=int, default=3)
    parser.add_argument("--fields-per-batch", type=int, default=12)
    parser.add_argument("--size", type=int, default=128, help="field height and width in pixels")
    parser.add_argument("--dtype", choices=_DTYPES, default="uint8")
    parser.add_argument("--split", type=float, nargs=3, default=(0.6, 0.15, 0.25), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--batch-effect", type=float, default=1.0)

    def params(args: argparse.Namespace) -> dict[str, Any]:
        return {
            "seed": args.seed,
            "n_seen": args.seen_batches,
            "n_unseen": args.unseen_batches,
            "fields_per_batch": args.fields_per_batch,
            "size": args.size,
            "dtype": args.dtype,
            "split": tuple(args.split),
            "batch_effect": args.batch_effect,
        }

    return run_generator_cli(parser, argv, params, make_nucleus_dataset, ensure_nucleus_dataset)


if __name__ == "__main__":
    main()
