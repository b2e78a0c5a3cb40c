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
A synthetic multi-batch live-cell microscopy data set of two melanoma phenotypes, after the ARMED paper's melanoma
experiment (patient-derived cells imaged on many dates, where the imaging date is a batch effect).

Cells are drawn procedurally: a star-shaped body (an ellipse modulated by a few Fourier harmonics), a bright membrane
rim, cytoplasm whose brightness follows the cell's thickness and carries a smooth texture, a dimmer nucleus,
protrusions and short-lived blebs. Phenotype 1 ("low" metastatic efficiency, label 1 as in the paper) is more
elongated and rougher. It has more protrusions, mostly along its long axis, and a larger nucleus-to-cell ratio than
phenotype 0 ("high"). The two distributions overlap, and ``phenotype_effect`` scales the differences (0 removes
them). Each cell is imaged in a few frames of one batch, like a short time lapse: the shape drifts a little between
frames, and blebs come and go.

Each imaging batch (a date) has its own acquisition signature, made of:

- a planar illumination gradient and radial vignetting;
- a faint low-frequency fringe;
- the background level;
- defocus blur;
- Poisson-Gaussian noise (photon scale and read noise);
- gain, offset and gamma.

``batch_effect`` scales all of them (0 makes the batches identical). Some seen batches image only one phenotype
(confounding, as in the paper, where not every PDX was imaged on every date). The unseen batches image both. The
images are single-channel TIFF files, uint8 by default or uint16.

Command line::

    python -m monai_armed.data.microscopy --out data/microscopy --seed 0 --size 64
"""

from __future__ import annotations

import argparse
import copy
import os
import re
from collections.abc import Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.special import expit

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
from monai_armed.data.mri import _split_subjects
from monai_armed.data.tiff import save_tiff
from monai_armed.utils import write_json

__all__ = [
    "PHENOTYPES",
    "make_microscopy_batches",
    "make_cell_morphology",
    "render_cell",
    "apply_batch_signature",
    "simulate_cell_image",
    "make_microscopy_dataset",
    "ensure_microscopy_dataset",
]

PHENOTYPES = ("high", "low")
"""Phenotype names by label: 0 = high, 1 = low metastatic efficiency (label 1 = "low", as in the paper)."""

# Bump when the generator changes what it writes, so that cached data sets are regenerated.
_GENERATOR_VERSION = 1
_DATALIST, _BATCHES, _IMAGES = "datalist.json", "batches.json", "images"
_DTYPES = ("uint8", "uint16")
# pixel widths (blur, membrane, texture grain) are given for 64-pixel images and scale with the image size
_REFERENCE_SIZE = 64
_FIRST_DATE = date(2020, 1, 6)
# the files this generator names; it refuses a folder holding others and never deletes them
_OWN_FILE = re.compile(rf"{re.escape(_DATALIST)}|{re.escape(_BATCHES)}|{_IMAGES}/b\d+_p\d_c\d+_f\d+\.tif")


def _batch_signature(rng: np.random.Generator, batch_effect: float) -> dict[str, float]:
    """One imaging batch's acquisition signature, every deviation from the neutral one scaled by ``batch_effect``.

    The same random numbers are drawn whatever ``batch_effect`` is, so a batch keeps its character (direction of
    its gradient, brighter or darker background, ...) as the effect strength changes.
    """
    e = batch_effect
    neutral = e == 0
    angle, fringe_angle, fringe_phase = rng.uniform(0.0, 2.0 * np.pi, size=3)
    fringe_cycles = rng.uniform(1.5, 4.0)
    return {
        "illumination_angle": 0.0 if neutral else float(angle),
        "illumination_slope": float(e * rng.uniform(0.05, 0.3)),
        "vignetting": float(e * rng.uniform(0.0, 0.3)),
        "fringe_amplitude": float(e * rng.uniform(0.01, 0.05)),
        "fringe_cycles": 0.0 if neutral else float(fringe_cycles),
        "fringe_angle": 0.0 if neutral else float(fringe_angle),
        "fringe_phase": 0.0 if neutral else float(fringe_phase),
        "background": float(0.08 * np.exp(e * rng.normal(0.0, 0.5))),
        "blur_sigma": float(0.5 + e * rng.uniform(0.0, 1.2)),
        "photons": float(150.0 * np.exp(e * rng.normal(0.0, 0.6))),
        "read_noise": float(0.01 * np.exp(e * rng.normal(0.0, 0.5))),
        "gain": float(np.exp(e * rng.normal(0.0, 0.2))),
        "offset": float(e * rng.normal(0.0, 0.03)),
        "gamma": float(np.exp(e * rng.normal(0.0, 0.2))),
    }


def _imaging_dates(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct, increasing ISO dates 1 to 14 days apart, starting within 2020-2021."""
    start = _FIRST_DATE + timedelta(days=int(rng.integers(0, 730)))
    offsets = np.cumsum(np.concatenate([[0], rng.integers(1, 15, size=max(n - 1, 0))]))
    return [(start + timedelta(days=int(d))).isoformat() for d in offsets]


def make_microscopy_batches(
    n_seen: int = 8,
    n_unseen: int = 3,
    seed: int = 0,
    batch_effect: float = 1.0,
    cells_per_batch: int = 24,
    n_confounded: int | None = None,
) -> list[dict[str, Any]]:
    """
    Draw the imaging batches of a synthetic live-cell study: date, acquisition signature and the cells' phenotypes.

    The batches' dates are distinct and increasing; the unseen batches' dates are scattered among the seen ones. The
    seen batches come first (``b00``, ``b01``, ... in date order), then the unseen ones. ``n_confounded`` seen batches,
    chosen at random, image a single phenotype (alternately ``high`` and ``low``, starting at random). Every other
    batch images both phenotypes in equal numbers (one more of a random one when ``cells_per_batch`` is odd).

    Args:
        n_seen: batches used for training (their cells go to training / validation / test); at least 2.
        n_unseen: held-out batches (all their cells go to the ``unseen`` split).
        seed: random seed; the table depends only on the arguments.
        batch_effect: strength of every acquisition effect; 0 makes all batches identical, 1 is the default
            strength. Changing it keeps the dates, the phenotypes and the batches' relative character.
        cells_per_batch: cells imaged in each batch; at least 2.
        n_confounded: seen batches that image only one phenotype; default ``n_seen // 4``, at most ``n_seen - 1``.

    Returns:
        one dict per batch: ``batch`` (id such as ``"b03"``), ``date`` (``"2021-03-04"``, the cluster name),
        ``seen``, ``confounded``, ``phenotypes`` (names imaged), ``labels`` (one 0/1 per cell, 1 = ``low``) and
        ``signature`` (acquisition parameters; see :func:`apply_batch_signature`).

    Raises:
        ValueError: when a count or ``batch_effect`` is out of range.

    Example::

        batches = make_microscopy_batches(n_seen=8, n_unseen=3, seed=0)
        [(b["date"], b["phenotypes"]) for b in batches][:2]
    """
    if n_seen < 2 or n_unseen < 0:
        raise ValueError(f"need n_seen >= 2 and n_unseen >= 0 batches, got n_seen={n_seen}, n_unseen={n_unseen}.")
    if cells_per_batch < 2:
        raise ValueError(f"cells_per_batch must be >= 2 (a mixed batch images both phenotypes), got {cells_per_batch}.")
    n_confounded = n_seen // 4 if n_confounded is None else n_confounded
    if not 0 <= n_confounded <= n_seen - 1:
        raise ValueError(
            f"n_confounded must be in [0, n_seen - 1] = [0, {n_seen - 1}] so that a seen batch images both "
            f"phenotypes, got {n_confounded}."
        )
    if batch_effect < 0:
        raise ValueError(f"batch_effect must be >= 0, got {batch_effect}.")
    rng = np.random.default_rng([seed, 0])
    dates = _imaging_dates(rng, n_seen + n_unseen)
    unseen_at = set(rng.choice(n_seen + n_unseen, size=n_unseen, replace=False).tolist())
    ordered = [d for i, d in enumerate(dates) if i not in unseen_at] + [
        d for i, d in enumerate(dates) if i in unseen_at
    ]
    confounded = sorted(rng.choice(n_seen, size=n_confounded, replace=False).tolist())
    first = int(rng.integers(2))
    single = {index: (first + k) % 2 for k, index in enumerate(confounded)}
    batches = []
    for index, day in enumerate(ordered):
        batch_rng = np.random.default_rng([seed, 1, index])
        signature = _batch_signature(batch_rng, batch_effect)
        if index in single:
            labels = [single[index]] * cells_per_batch
        else:
            n_low = cells_per_batch // 2 + (int(batch_rng.integers(2)) if cells_per_batch % 2 else 0)
            labels = batch_rng.permutation(np.arange(cells_per_batch) < n_low).astype(int).tolist()
        batches.append(
            {
                "batch": f"b{index:02d}",
                "date": day,
                "seen": index < n_seen,
                "confounded": index in single,
                "phenotypes": [PHENOTYPES[p] for p in sorted(set(labels))],
                "labels": labels,
                "signature": signature,
            }
        )
    return batches


def _check_phenotype(phenotype: int) -> int:
    """The phenotype label as an int, or a ValueError naming the valid labels."""
    if phenotype not in (0, 1) or isinstance(phenotype, bool):
        raise ValueError(
            f"phenotype must be a label 0 ({PHENOTYPES[0]!r}) or 1 ({PHENOTYPES[1]!r}), got {phenotype!r}."
        )
    return int(phenotype)


def make_cell_morphology(phenotype: int, rng: np.random.Generator, phenotype_effect: float = 1.0) -> dict[str, Any]:
    """
    Draw one cell's shape and brightness (a plain JSON-able dict) for :func:`render_cell`.

    Lengths are fractions of the image size (``centre``, ``radius``) or of the cell radius (protrusion lengths,
    nucleus ``ratio`` and ``offset``); angles are in radians. With ``d = phenotype * phenotype_effect``, the
    ``low`` phenotype (1) differs from the ``high`` one (0) in these ways:

    - the mean log aspect ratio is higher by ``0.22 d``;
    - the outline is rougher (by ``60 d`` %);
    - it has ``1.4 d`` more protrusions on average, a fraction ``min(0.6 d, 0.9)`` of them along the long axis;
    - the nucleus-to-cell radius ratio is higher by ``0.07 d``.

    Args:
        phenotype: label, 0 (``high``) or 1 (``low``).
        rng: random generator.
        phenotype_effect: strength of the phenotype differences (0: both phenotypes are drawn alike).

    Returns:
        the morphology: ``phenotype``, ``centre`` (y, x offset from the image centre), ``radius``, ``log_aspect``,
        ``orientation``, ``harmonics`` ([order, amplitude, phase] rows), ``protrusions`` ([angle, length, width]
        rows), ``nucleus`` (``ratio``, ``log_aspect``, ``orientation``, ``offset``), brightness levels
        ``cytoplasm``, ``rim`` and ``nucleus_level``, and ``texture_seed``.

    Raises:
        ValueError: for a phenotype other than 0 or 1, or a negative ``phenotype_effect``.

    Example::

        morphology = make_cell_morphology(1, np.random.default_rng(0))
        len(morphology["protrusions"])
    """
    phenotype = _check_phenotype(phenotype)
    if phenotype_effect < 0:
        raise ValueError(f"phenotype_effect must be >= 0, got {phenotype_effect}.")
    d = phenotype * phenotype_effect
    orientation = float(rng.uniform(0.0, np.pi))
    roughness = 0.035 * (1.0 + 0.6 * d)
    harmonics = [
        [k, float(abs(rng.normal(0.0, roughness)) / np.sqrt(k - 2)), float(rng.uniform(0, 2 * np.pi))]
        for k in range(3, 8)
    ]
    protrusions = []
    for _ in range(min(int(rng.poisson(0.6 + 1.4 * d)), 6)):
        if rng.uniform() < min(0.6 * d, 0.9):
            angle = orientation + np.pi * int(rng.integers(2)) + rng.normal(0.0, 0.35)
        else:
            angle = rng.uniform(0.0, 2.0 * np.pi)
        protrusions.append([float(angle % (2 * np.pi)), float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.08, 0.18))])
    return {
        "phenotype": phenotype,
        "centre": np.clip(rng.normal(0.0, 0.035, size=2), -0.08, 0.08).tolist(),
        "radius": float(0.2 * np.exp(rng.normal(0.0, 0.1))),
        "log_aspect": float(abs(rng.normal(0.12 + 0.22 * d, 0.14))),
        "orientation": orientation,
        "harmonics": harmonics,
        "protrusions": protrusions,
        "nucleus": {
            "ratio": float(np.clip(rng.normal(0.40 + 0.07 * d, 0.05), 0.25, 0.7)),
            "log_aspect": float(abs(rng.normal(0.0, 0.12))),
            "orientation": float(orientation + rng.normal(0.0, 0.4)),
            "offset": [float(rng.normal(0.0, 0.12)), float(rng.normal(0.0, 0.05))],  # along, across the long axis
        },
        "cytoplasm": float(rng.uniform(0.22, 0.34)),
        "rim": float(rng.uniform(0.2, 0.32)),
        "nucleus_level": float(rng.uniform(0.35, 0.6)),
        "texture_seed": int(rng.integers(2**31)),
    }


def _next_frame(morphology: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """The same cell a frame later: small drifts of position, orientation, outline, protrusions and nucleus."""
    m = copy.deepcopy(dict(morphology))
    m["centre"] = np.clip(np.asarray(m["centre"]) + rng.normal(0.0, 0.01, size=2), -0.1, 0.1).tolist()
    m["radius"] = float(m["radius"] * np.exp(rng.normal(0.0, 0.02)))
    m["log_aspect"] = float(abs(m["log_aspect"] + rng.normal(0.0, 0.03)))
    m["orientation"] = float(m["orientation"] + rng.normal(0.0, 0.06))
    m["harmonics"] = [
        [k, float(a * np.exp(rng.normal(0.0, 0.15))), float(p + rng.normal(0.0, 0.2))] for k, a, p in m["harmonics"]
    ]
    m["protrusions"] = [
        [
            float((a + rng.normal(0.0, 0.08)) % (2 * np.pi)),
            float(np.clip(length * np.exp(rng.normal(0.0, 0.2)), 0.1, 0.9)),
            w,
        ]
        for a, length, w in m["protrusions"]
    ]
    m["nucleus"]["orientation"] = float(m["nucleus"]["orientation"] + rng.normal(0.0, 0.05))
    m["nucleus"]["offset"] = (np.asarray(m["nucleus"]["offset"]) + rng.normal(0.0, 0.01, size=2)).tolist()
    return m


def _outline_radius(m: Mapping[str, Any], theta: np.ndarray, r0: float) -> np.ndarray:
    """Radius (pixels) of the cell outline at polar angles ``theta``: ellipse x harmonics + protrusion bumps."""
    half = m["log_aspect"] / 2.0
    a, b = r0 * np.exp(half), r0 * np.exp(-half)  # same area as the circle of radius r0
    t = theta - m["orientation"]
    radius = a * b / np.sqrt((b * np.cos(t)) ** 2 + (a * np.sin(t)) ** 2)
    radius = radius * (1.0 + sum(amp * np.cos(k * (theta - phase)) for k, amp, phase in m["harmonics"]))
    for angle, length, width in m["protrusions"]:
        delta = (theta - angle + np.pi) % (2.0 * np.pi) - np.pi  # wrapped to [-pi, pi)
        radius = radius + length * r0 * np.exp(-0.5 * (delta / width) ** 2)
    return radius


def _outline_distance(m: Mapping[str, Any], dy: np.ndarray, dx: np.ndarray, r0: float) -> np.ndarray:
    """Approximate signed distance (pixels, positive inside) to the star-shaped outline.

    The radial gap to the outline is projected on the outline's normal, so the membrane keeps its width where the
    outline is oblique to the radius (the ends of elongated cells, the sides of protrusions). The outline and its
    slope are tabulated finely in angle and interpolated, which is much cheaper than evaluating them per pixel.
    """
    rho, theta = np.hypot(dy, dx), np.arctan2(dy, dx)
    angles = np.linspace(-np.pi, np.pi, 16 * dy.shape[-1] + 1)  # 0.2 pixel apart at the image edge
    table = _outline_radius(m, angles, r0)
    radius = np.interp(theta, angles, table)
    slope = np.interp(theta, angles, np.gradient(table, angles))
    return (radius - rho) / np.sqrt(1.0 + (slope / np.maximum(radius, 1e-6)) ** 2)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian noise smoothed with ``sigma`` pixels and rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma, mode="wrap")
    return field / max(float(field.std()), 1e-12)


def render_cell(
    morphology: Mapping[str, Any], rng: np.random.Generator, size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """
    Draw a cell without acquisition effects: a float image in [0, 1] (dark background) and the cell's mask.

    The cytoplasm's brightness grows with the distance from the membrane (a thicker cell holds more dye) and carries
    a smooth texture: the cell's own, fixed by ``texture_seed``, mixed with a frame-specific part. The nucleus is
    dimmer than the cytoplasm. The membrane is a bright rim about two pixels wide (at 64 pixels). ``rng`` draws the
    frame's blebs (round bulges of the membrane, 0.6 per frame on average, alike for both phenotypes) and its part
    of the texture.

    Args:
        morphology: from :func:`make_cell_morphology`.
        rng: random generator for the frame-specific details.
        size: image height and width in pixels.

    Returns:
        ``(image, mask)``: float64 ``(size, size)`` image and bool ``(size, size)`` cell mask (body, protrusions
        and blebs).

    Example::

        rng = np.random.default_rng(0)
        image, mask = render_cell(make_cell_morphology(0, rng), rng, size=64)
    """
    scale = size / _REFERENCE_SIZE
    m = morphology
    cy, cx = (size - 1) / 2.0 + np.asarray(m["centre"], dtype=float) * size
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    dy, dx = yy - cy, xx - cx
    r0 = m["radius"] * size
    inside = _outline_distance(m, dy, dx, r0)
    for _ in range(int(rng.poisson(0.6))):
        phi = rng.uniform(0.0, 2.0 * np.pi)
        bleb = r0 * rng.uniform(0.12, 0.22)
        reach = float(_outline_radius(m, np.array([phi]), r0)[0]) + 0.4 * bleb
        inside = np.maximum(inside, bleb - np.hypot(dy - reach * np.sin(phi), dx - reach * np.cos(phi)))
    body = expit(inside / (0.4 * scale))
    rim = np.exp(-0.5 * (inside / (0.9 * scale)) ** 2)
    thickness = np.clip(inside / (0.45 * r0), 0.0, 1.0)
    grain = 1.5 * scale
    texture = 0.8 * _smooth_noise(np.random.default_rng(m["texture_seed"]), size, grain)
    texture += 0.6 * _smooth_noise(rng, size, grain)
    cytoplasm = m["cytoplasm"] * (0.45 + 0.55 * thickness) * (1.0 + 0.25 * texture)
    nucleus = m["nucleus"]
    cos_o, sin_o = np.cos(m["orientation"]), np.sin(m["orientation"])
    along, across = np.asarray(nucleus["offset"]) * r0
    ny, nx = cy + along * sin_o + across * cos_o, cx + along * cos_o - across * sin_o
    n_half = nucleus["log_aspect"] / 2.0
    n_a, n_b = nucleus["ratio"] * r0 * np.exp(n_half), nucleus["ratio"] * r0 * np.exp(-n_half)
    cos_n, sin_n = np.cos(nucleus["orientation"]), np.sin(nucleus["orientation"])
    u, v = (xx - nx) * cos_n + (yy - ny) * sin_n, -(xx - nx) * sin_n + (yy - ny) * cos_n
    nucleus_inside = (1.0 - np.hypot(u / n_a, v / n_b)) * min(n_a, n_b)
    # the nucleus stays behind the membrane even when drawn off centre in a thin cell
    in_nucleus = expit(nucleus_inside / (0.6 * scale)) * expit((inside - 1.5 * scale) / (0.5 * scale))
    nucleoplasm = m["nucleus_level"] * m["cytoplasm"] * (1.0 + 0.15 * texture)
    image = body * (cytoplasm * (1.0 - in_nucleus) + nucleoplasm * in_nucleus) + m["rim"] * rim
    return np.clip(image, 0.0, 1.0), inside > 0


def apply_batch_signature(image: np.ndarray, signature: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    """
    Image a clean cell with one batch's acquisition: the returned float image is in [0, 1].

    The steps are:

    1. add the ``background`` (medium autofluorescence);
    2. multiply by the illumination, i.e. the planar gradient (``illumination_slope`` from the centre to an edge,
       towards ``illumination_angle``) times the vignetting (``1 - vignetting * r**2 / 2``, r = 1 at an edge
       centre) times the fringe (``fringe_amplitude``, ``fringe_cycles`` across the image);
    3. blur with a Gaussian of ``blur_sigma`` pixels (at 64 pixels; scaled with the image size);
    4. add Poisson noise of ``photons`` per unit intensity and Gaussian read noise of s.d. ``read_noise``;
    5. apply ``gain`` and ``offset``, clip to [0, 1], then raise to the power ``gamma``.

    Args:
        image: clean ``(size, size)`` image in [0, 1] (from :func:`render_cell`).
        signature: a batch's ``signature`` (from :func:`make_microscopy_batches`).
        rng: random generator (the noise).

    Returns:
        float64 image of the same shape, in [0, 1].

    Example::

        batch = make_microscopy_batches(seed=0)[0]
        rng = np.random.default_rng(0)
        clean, _ = render_cell(make_cell_morphology(0, rng), rng)
        observed = apply_batch_signature(clean, batch["signature"], rng)
    """
    size = image.shape[-1]
    s = signature
    yy, xx = np.mgrid[0:size, 0:size].astype(float) * 2.0 / (size - 1) - 1.0
    towards = np.cos(s["illumination_angle"]) * xx + np.sin(s["illumination_angle"]) * yy
    illumination = (1.0 + s["illumination_slope"] * towards) * (1.0 - s["vignetting"] * (xx**2 + yy**2) / 2.0)
    across = np.cos(s["fringe_angle"]) * xx + np.sin(s["fringe_angle"]) * yy
    illumination *= 1.0 + s["fringe_amplitude"] * np.cos(np.pi * s["fringe_cycles"] * across + s["fringe_phase"])
    signal = (s["background"] + image) * np.maximum(illumination, 0.0)
    signal = ndimage.gaussian_filter(signal, s["blur_sigma"] * size / _REFERENCE_SIZE, mode="reflect")
    counts = rng.poisson(signal * s["photons"]) / s["photons"] + rng.normal(0.0, s["read_noise"], size=signal.shape)
    return np.clip(s["gain"] * counts + s["offset"], 0.0, 1.0) ** s["gamma"]


def simulate_cell_image(
    phenotype: int,
    batch: Mapping[str, Any] | None,
    rng: np.random.Generator,
    size: int = 64,
    morphology: Mapping[str, Any] | None = None,
    phenotype_effect: float = 1.0,
) -> np.ndarray:
    """
    One cell of a phenotype imaged in a batch: :func:`make_cell_morphology` (unless ``morphology`` is given), then
    :func:`render_cell` and :func:`apply_batch_signature`.

    Args:
        phenotype: label, 0 (``high``) or 1 (``low``).
        batch: a batch dict from :func:`make_microscopy_batches` (or its ``signature``); ``None`` returns the
            clean cell without acquisition effects.
        rng: random generator (shape, unless ``morphology`` is given, then frame details and noise).
        size: image height and width in pixels.
        morphology: a cell drawn earlier (e.g. the previous frame of a time lapse); must be of ``phenotype``.
        phenotype_effect: strength of the phenotype differences when the morphology is drawn here.

    Returns:
        float64 ``(size, size)`` image in [0, 1] (before quantisation).

    Raises:
        ValueError: for a bad phenotype, a morphology of another phenotype or ``size < 8``.

    Example::

        batch = make_microscopy_batches(seed=0)[0]
        image = simulate_cell_image(1, batch, np.random.default_rng(0), size=64)
    """
    phenotype = _check_phenotype(phenotype)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}.")
    if morphology is None:
        morphology = make_cell_morphology(phenotype, rng, phenotype_effect)
    elif morphology.get("phenotype") != phenotype:
        raise ValueError(f"morphology is of phenotype {morphology.get('phenotype')!r}, not the requested {phenotype}.")
    image, _ = render_cell(morphology, rng, size)
    if batch is None:
        return image
    return apply_batch_signature(image, batch["signature"] if "signature" in batch else batch, rng)


def _parameters(
    seed: int,
    n_seen: int,
    n_unseen: int,
    cells_per_batch: int,
    frames_per_cell: int,
    size: int,
    dtype: str,
    split: Sequence[float],
    batch_effect: float,
    phenotype_effect: float,
    n_confounded: int | None,
) -> dict[str, Any]:
    """The generation parameters as plain JSON types (they identify a cached data set), validated."""
    if n_seen < 2 or n_unseen < 0:
        raise ValueError(f"need n_seen >= 2 and n_unseen >= 0 batches, got n_seen={n_seen}, n_unseen={n_unseen}.")
    if cells_per_batch < 2:
        raise ValueError(f"cells_per_batch must be >= 2 (a mixed batch images both phenotypes), got {cells_per_batch}.")
    if frames_per_cell < 1:
        raise ValueError(f"frames_per_cell must be >= 1, got {frames_per_cell}.")
    if int(size) != size or size < 32:
        raise ValueError(f"size must be an integer >= 32 pixels (the paper used 256), got {size}.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}.")
    if len(split) != 3 or min(split) < 0 or split[0] <= 0 or abs(sum(split) - 1.0) > 1e-6:
        raise ValueError(
            f"split must be (training, validation, test) fractions >= 0 with training > 0 summing to 1, got {split}."
        )
    if batch_effect < 0 or phenotype_effect < 0:
        raise ValueError(
            f"batch_effect and phenotype_effect must be >= 0, got batch_effect={batch_effect}, "
            f"phenotype_effect={phenotype_effect}."
        )
    confounded = n_seen // 4 if n_confounded is None else int(n_confounded)
    if not 0 <= confounded <= n_seen - 1:
        raise ValueError(f"n_confounded must be in [0, n_seen - 1] = [0, {n_seen - 1}], got {n_confounded}.")
    return {
        "generator_version": _GENERATOR_VERSION,
        "seed": int(seed),
        "n_seen": int(n_seen),
        "n_unseen": int(n_unseen),
        "cells_per_batch": int(cells_per_batch),
        "frames_per_cell": int(frames_per_cell),
        "size": int(size),
        "dtype": dtype,
        "split": [float(f) for f in split],
        "batch_effect": float(batch_effect),
        "phenotype_effect": float(phenotype_effect),
        "n_confounded": confounded,
    }


def _render_job(job: dict[str, Any]) -> None:
    """Simulate and write every frame of one cell (runs in worker processes).

    Shape and noise have separate random streams, so a cell looks the same whatever the batch effect.
    """
    shape_rng = np.random.default_rng([*job["seed"], 0])
    noise_rng = np.random.default_rng([*job["seed"], 1])
    morphology = make_cell_morphology(job["label"], shape_rng, job["phenotype_effect"])
    top = np.iinfo(job["dtype"]).max
    for frame, path in enumerate(job["paths"]):
        if frame:
            morphology = _next_frame(morphology, shape_rng)
        clean, _ = render_cell(morphology, shape_rng, job["size"])
        image = apply_batch_signature(clean, job["signature"], noise_rng)
        save_tiff(path, np.rint(image * top).astype(job["dtype"]))


def _owns(name: str) -> bool:
    """Whether a path relative to the output folder is one this generator writes."""
    return _OWN_FILE.fullmatch(name) is not None


def make_microscopy_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_seen: int = 8,
    n_unseen: int = 3,
    cells_per_batch: int = 24,
    frames_per_cell: int = 4,
    size: int = 64,
    dtype: str = "uint8",
    split: Sequence[float] = (0.7, 0.1, 0.2),
    batch_effect: float = 1.0,
    phenotype_effect: float = 1.0,
    n_confounded: int | None = None,
    num_workers: int | None = None,
    progress: bool = False,
) -> Path:
    """
    Generate the synthetic live-cell data set in ``out_dir`` (always; see :func:`ensure_microscopy_dataset`).

    The defaults give 11 batches x 24 cells x 4 frames = 1056 images of 64 x 64 pixels, a few seconds on 2 CPUs;
    ``size=256`` gives the paper's image size. The files written are:

    - ``images/<batch>_p<label>_c<NNN>_f<F>.tif``;
    - ``batches.json``: the parameters, the phenotype names and every batch with its date, phenotypes, cell labels
      and true acquisition signature, to relate learned random effects to the real ones;
    - ``datalist.json``;
    - last, ``manifest.json``: the parameters, their hash and the files.

    Every file is written atomically. The old manifest and datalist are removed first, so an interrupted run
    leaves no datalist and :func:`ensure_microscopy_dataset` redoes it. The result depends only on the arguments,
    not on ``num_workers``. ``out_dir`` must be new, empty or an earlier output of this generator: a folder holding
    any other file (e.g. a user's own data set) raises :class:`~monai_armed.data.generated.ForeignFilesError` before
    anything is written.

    ``datalist.json`` holds four sections:

    - ``training``, ``validation`` and ``test``: the seen batches' cells, split by cell with all of a cell's frames
      together, stratified on batch x phenotype;
    - ``unseen``: every cell of the unseen batches.

    Each item is ``{"image": path relative to the datalist's folder, "label": 0 (high) or 1 (low), "cluster":
    imaging date, "cell": cell id such as "b03_p1_c012", "phenotype": "high" or "low", "frame": frame index}``.
    :func:`monai_armed.data.load_image_datalist` (or MONAI's ``load_decathlon_datalist``) resolves the paths.

    Args:
        out_dir: output folder (created).
        seed: random seed.
        n_seen: training batches (at least 2).
        n_unseen: held-out batches.
        cells_per_batch: cells imaged per batch (at least 2).
        frames_per_cell: time-lapse frames per cell (all in the cell's split).
        size: image height and width in pixels (at least 32).
        dtype: ``"uint8"`` or ``"uint16"``: the stored intensities are ``round(image * max)``.
        split: (training, validation, test) fractions of the seen batches' cells, summing to 1.
        batch_effect: strength of the acquisition effects (0 = identical batches).
        phenotype_effect: strength of the morphological phenotype differences (0 = none: only the confounded
            batches then tie the label to anything in the image).
        n_confounded: seen batches imaging a single phenotype (default ``n_seen // 4``).
        num_workers: worker processes (default: up to 4, as many as there are CPUs); results do not depend on it.
        progress: show a progress bar (tqdm, on stderr) when stderr is a terminal.

    Returns:
        the path of ``datalist.json``.

    Raises:
        ValueError: for an argument out of range (the message names it).

    Example::

        datalist = make_microscopy_dataset("data/microscopy", seed=0)
        train = load_image_datalist(datalist, "training")
    """
    params = _parameters(
        seed,
        n_seen,
        n_unseen,
        cells_per_batch,
        frames_per_cell,
        size,
        dtype,
        split,
        batch_effect,
        phenotype_effect,
        n_confounded,
    )
    batches = make_microscopy_batches(n_seen, n_unseen, seed, batch_effect, cells_per_batch, params["n_confounded"])
    out = claim_output_dir(out_dir, "microscopy", _owns)
    (out / _IMAGES).mkdir(exist_ok=True)
    for name in (MANIFEST, _DATALIST):
        (out / name).unlink(missing_ok=True)

    def cell_id(batch: Mapping[str, Any], index: int) -> str:
        return f"{batch['batch']}_p{batch['labels'][index]}_c{index:03d}"

    # _split_subjects stratifies on the id's prefix before "-" (here batch x phenotype) and the label
    seen_cells = [
        (f"{cell_id(b, i).rsplit('_', 1)[0]}-{cell_id(b, i)}", label)
        for b in batches
        if b["seen"]
        for i, label in enumerate(b["labels"])
    ]
    split_of = {
        key.split("-", 1)[1]: part
        for key, part in _split_subjects(seen_cells, split, np.random.default_rng([seed, 2])).items()
    }
    datalist: dict[str, list] = {"training": [], "validation": [], "test": [], "unseen": []}
    jobs = []
    for index, batch in enumerate(batches):
        for cell, label in enumerate(batch["labels"]):
            name = cell_id(batch, cell)
            paths = [f"{_IMAGES}/{name}_f{frame}.tif" for frame in range(frames_per_cell)]
            jobs.append(
                {
                    "paths": [str(out / p) for p in paths],
                    "seed": [seed, 3, index, cell],
                    "label": label,
                    "signature": batch["signature"],
                    "size": params["size"],
                    "dtype": dtype,
                    "phenotype_effect": params["phenotype_effect"],
                }
            )
            part = split_of[name] if batch["seen"] else "unseen"
            for frame, path in enumerate(paths):
                datalist[part].append(
                    {
                        "image": path,
                        "label": int(label),
                        "cluster": batch["date"],
                        "cell": name,
                        "phenotype": PHENOTYPES[label],
                        "frame": frame,
                    }
                )
    files = sorted(item["image"] for items in datalist.values() for item in items)
    own = [*files, _BATCHES, _DATALIST]
    record_planned_files(out, own)
    run_jobs(_render_job, jobs, num_workers, progress, "cell images", count=lambda job: len(job["paths"]))
    remove_stale_files(out, own)
    write_json({"parameters": params, "phenotypes": list(PHENOTYPES), "batches": batches}, out / _BATCHES)
    write_json(datalist, out / _DATALIST)
    write_manifest(out, params, files, "microscopy", datalist=_DATALIST, batches=_BATCHES)
    return out / _DATALIST


def ensure_microscopy_dataset(out_dir: str | os.PathLike, **params: Any) -> Path:
    """
    The synthetic live-cell data set in ``out_dir``, generated by :func:`make_microscopy_dataset` unless a complete
    one with the same parameters is already there (its manifest's parameter hash matches and every file it lists
    exists).

    Args:
        out_dir: output folder.
        params: keyword arguments of :func:`make_microscopy_dataset` (``num_workers`` and ``progress`` do not affect
            the data, so they do not invalidate the cache).

    Returns:
        the path of ``datalist.json``.

    Raises:
        TypeError: for an unknown keyword argument.
        ValueError: for an argument out of range.

    Example::

        datalist = ensure_microscopy_dataset("data/microscopy", seed=0)   # generates (seconds)
        datalist = ensure_microscopy_dataset("data/microscopy", seed=0)   # reuses the files
    """
    return ensure_generated(make_microscopy_dataset, _parameters, out_dir, params, [_DATALIST, _BATCHES])


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m monai_armed.data.microscopy --out DIR [--seed S] [--size N] ...``.

    Prints the datalist's path on stdout (and a summary on stderr).

    Example::

        main(["--out", "data/microscopy", "--seed", "0"])
    """
    parser = generator_parser("monai_armed.data.microscopy", __doc__)
    parser.add_argument("--seen-batches", type=int, default=8)
    parser.add_argument("--unseen-batches", type=int, default=3)
    parser.add_argument("--cells-per-batch", type=int, default=24)
    parser.add_argument("--frames-per-cell", type=int, default=4)
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels (paper: 256)")
    parser.add_argument("--dtype", choices=_DTYPES, default="uint8")
    parser.add_argument("--split", type=float, nargs=3, default=(0.7, 0.1, 0.2), metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--batch-effect", type=float, default=1.0)
    parser.add_argument("--phenotype-effect", type=float, default=1.0)
    parser.add_argument("--confounded", type=int, default=None, help="seen batches imaging one phenotype")

    def params(args: argparse.Namespace) -> dict[str, Any]:
        return {
            "seed": args.seed,
            "n_seen": args.seen_batches,
            "n_unseen": args.unseen_batches,
            "cells_per_batch": args.cells_per_batch,
            "frames_per_cell": args.frames_per_cell,
            "size": args.size,
            "dtype": args.dtype,
            "split": tuple(args.split),
            "batch_effect": args.batch_effect,
            "phenotype_effect": args.phenotype_effect,
            "n_confounded": args.confounded,
        }

    return run_generator_cli(parser, argv, params, make_microscopy_dataset, ensure_microscopy_dataset)


if __name__ == "__main__":
    main()
