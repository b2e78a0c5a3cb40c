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
A synthetic multi-site T1-weighted MRI data set for AD vs CN classification, after the ARMED paper's ADNI experiment.

Subjects are random smooth deformations of the MNI152 2009 1 mm template that ships with nilearn (no network). An AD
label shrinks both hippocampi and widens the lateral ventricles. Each site is a scanner with its own signature
(bias field, gamma, grey/white-matter contrast, noise, blur, voxel size, intensity scale, a small registration
residual, storage orientation), and sites belong to vendor groups whose patient fraction differs, so that vendor
look and diagnosis are confounded as in the paper (GE sites majority AD, Philips/Siemens sites majority CN).

By default only a coronal slab around the paper's slice plane (MNI y = -6) is simulated and written, which keeps the
data set small and quick to make on a CPU; ``slab_mm=None`` writes whole brains. Images are skull-stripped (zero
outside the brain) int16 NIfTI files whose affine maps voxels to MNI millimetres.

Command line::

    python -m monai_armed.data.mri --out data/mri --seed 0 --subjects-per-site 24
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, ornt_transform
from scipy import ndimage

from monai_armed.data.generated import (
    MANIFEST,
    claim_output_dir,
    ensure_generated,
    record_planned_files,
    remove_stale_files,
    run_jobs,
    write_manifest,
)
from monai_armed.utils import write_json

__all__ = [
    "MNI_RIGHT_HIPPOCAMPUS",
    "DEFAULT_VENDOR_AD_FRACTION",
    "make_mri_sites",
    "simulate_mri_image",
    "make_mri_dataset",
    "ensure_mri_dataset",
]

MNI_RIGHT_HIPPOCAMPUS = (32.0, -6.0, -26.0)
"""The paper's slice coordinate (MNI mm): a coronal slice through the right hippocampus."""

DEFAULT_VENDOR_AD_FRACTION = {"GE": 0.75, "Philips": 0.25, "Siemens": 0.25}
"""Patient (AD) fraction of each vendor group: GE sites enriched in AD, Philips/Siemens sites depleted."""

# Bump when the generator changes what it writes, so that cached data sets are regenerated.
_GENERATOR_VERSION = 1
_DATALIST, _SITES, _IMAGES = "datalist.json", "sites.json", "images"

# Anatomy in MNI mm: axis segments of the right hippocampus (head to tail) and the right lateral ventricle body; the
# left ones are their mirror images (x -> -x). Gaussian widths of the atrophy fields around them.
_HIPPOCAMPUS = ((26.0, -4.0, -22.0), (30.0, -36.0, -2.0))
_VENTRICLE = ((11.0, -30.0, 22.0), (11.0, 15.0, 18.0))
_HIPPOCAMPUS_WIDTH, _VENTRICLE_WIDTH = 6.0, 6.0
_VENTRICLE_RATIO = 0.8  # ventricle expansion per unit of hippocampal contraction
_BRAIN_CENTRE = np.array([0.0, -17.0, 5.0])  # centre of the template's brain bounding box; size changes scale about it

# Field of view written (MNI mm, voxel centres span it): the template brain spans x [-72, 72], y [-107, 73],
# z [-72, 82]; the margin leaves room for size variation and registration residuals.
_FOV = ((-80.0, 80.0), (-112.0, 78.0), (-78.0, 88.0))
_CONTROL_SPACING = 16.0  # mm between the control points of the random smooth deformation
# the files this generator names; it refuses a folder holding others and never deletes them
_OWN_FILE = re.compile(rf"{re.escape(_DATALIST)}|{re.escape(_SITES)}|{_IMAGES}/site\d+_sub\d+_img\d+\.nii\.gz")


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The MNI152 T1 (scaled to [0, 1], zero outside the brain) and grey-matter templates and their shared affine."""
    from nilearn.datasets import load_mni152_gm_template, load_mni152_template

    t1 = load_mni152_template(resolution=1)
    gm = load_mni152_gm_template(resolution=1)
    t1_data = np.asarray(t1.dataobj, dtype=np.float32)
    gm_data = np.asarray(gm.dataobj, dtype=np.float32)
    return t1_data / t1_data.max(), gm_data / max(float(gm_data.max()), 1e-6), np.asarray(t1.affine, dtype=np.float64)


def _vendor_signature(rng: np.random.Generator) -> dict[str, Any]:
    """A vendor's base scanner signature; its sites scatter around it."""
    direction = rng.normal(size=9)
    return {
        "gamma": float(rng.uniform(0.7, 1.4)),
        "tissue_contrast": float(rng.uniform(0.0, 0.3)),
        "bias_amplitude": float(rng.uniform(0.08, 0.25)),
        "bias_direction": (direction / np.linalg.norm(direction)).tolist(),
        "noise": str(rng.choice(["rician", "gaussian"])),
        "noise_sd": float(rng.uniform(0.008, 0.03)),
        "blur_mm": float(rng.uniform(0.0, 1.0)),
        "spacing_mm": [float(rng.choice([1.0, 1.1, 1.2])), 1.0, float(rng.choice([1.0, 1.1, 1.2]))],
        "intensity_scale": float(rng.uniform(400.0, 2500.0)),
    }


def _site_signature(vendor: Mapping[str, Any], rng: np.random.Generator, site_effect: float) -> dict[str, Any]:
    """One site's signature: the vendor's plus site-level scatter, scaled by ``site_effect`` (0 = no scanner effects)."""
    direction = np.asarray(vendor["bias_direction"]) + 0.5 * rng.normal(size=9)
    amplitude = vendor["bias_amplitude"] * rng.uniform(0.8, 1.2)
    gamma = vendor["gamma"] * np.exp(rng.normal(0.0, 0.07))
    contrast = np.clip(vendor["tissue_contrast"] + rng.normal(0.0, 0.03), 0.0, 0.5)
    noise_sd = vendor["noise_sd"] * np.exp(rng.normal(0.0, 0.15))
    blur = max(vendor["blur_mm"] + rng.normal(0.0, 0.15), 0.0)
    scale = vendor["intensity_scale"] * np.exp(rng.normal(0.0, 0.1))
    shift = rng.normal(0.0, 1.5, size=3)
    axcodes = str(rng.choice(["RAS", "LAS", "LPS"]))  # how the site's conversion pipeline stores voxels
    spacing = 1.0 + (np.asarray(vendor["spacing_mm"]) - 1.0) * site_effect
    return {
        "gamma": float(gamma**site_effect),
        "tissue_contrast": float(contrast * site_effect),
        "bias_coefficients": (site_effect * amplitude * direction / np.linalg.norm(direction)).tolist(),
        "noise": vendor["noise"],
        "noise_sd": float(noise_sd * site_effect),
        "blur_mm": float(blur * site_effect),
        "spacing_mm": [round(float(s), 4) for s in spacing],
        "intensity_scale": float(1000.0 * (scale / 1000.0) ** site_effect),
        "fov_shift_mm": (shift * site_effect).tolist(),
        "axcodes": axcodes if site_effect > 0 else "RAS",
    }


def _vendor_table(vendor_ad_fraction: Mapping[str, float] | None) -> dict[str, float]:
    """Validated vendor -> AD fraction mapping (the default when ``None``)."""
    table = dict(DEFAULT_VENDOR_AD_FRACTION if vendor_ad_fraction is None else vendor_ad_fraction)
    if not table:
        raise ValueError("vendor_ad_fraction needs at least one vendor, e.g. {'GE': 0.75, 'Siemens': 0.25}.")
    for vendor, fraction in table.items():
        if not 0.0 <= float(fraction) <= 1.0:
            raise ValueError(f"vendor_ad_fraction[{vendor!r}] must be in [0, 1], got {fraction}.")
    return {str(v): float(f) for v, f in table.items()}


def make_mri_sites(
    seed: int = 0,
    n_seen_sites: int = 8,
    n_unseen_sites: int = 4,
    subjects_per_site: int = 24,
    vendor_ad_fraction: Mapping[str, float] | None = None,
    site_fraction_sd: float = 0.05,
    site_effect: float = 1.0,
    unseen_ad_fraction: float | None = 0.5,
) -> list[dict[str, Any]]:
    """
    Draw the sites (scanners) of a synthetic multi-site MRI study: vendor, scanner signature and subject labels.

    Vendors are assigned in turn (``vendor_ad_fraction``'s order) separately to the seen and the unseen sites, so
    both sets hold every vendor group when they have enough sites. The seen sites are confounded: a seen site's AD
    fraction is its vendor's plus
    ``N(0, site_fraction_sd)`` (clipped to [0.05, 0.95]); exactly ``round(fraction * subjects_per_site)`` of its
    subjects are AD, in random order.

    Args:
        seed: random seed; the table depends only on the arguments.
        n_seen_sites: sites used for training (their subjects go to training / validation / test).
        n_unseen_sites: held-out sites (all their subjects go to the ``unseen`` split).
        subjects_per_site: subjects at each site.
        vendor_ad_fraction: vendor group -> patient fraction; default :data:`DEFAULT_VENDOR_AD_FRACTION`.
        site_fraction_sd: scatter of the sites' patient fractions around their vendor's.
        site_effect: strength of every scanner effect; 0 makes all scanners identical (RAS, 1 mm, no bias or
            noise), 1 is the default strength.
        unseen_ad_fraction: target patient fraction of every unseen site, whatever its vendor (0.5: as in the paper,
            where the training sites were chosen for their vendor/diagnosis confound and the other sites were not),
            or ``None`` for the vendors' fractions (unseen sites confounded like the seen ones); each site scatters
            around its target by ``site_fraction_sd``, unseen sites too.

    Returns:
        one dict per site: ``site`` (id such as ``"site03"``), ``vendor``, ``seen``, ``ad_fraction_target``,
        ``ad_fraction``, ``labels`` (one 0/1 per subject, 1 = AD) and ``signature`` (scanner parameters).

    Example::

        sites = make_mri_sites(seed=0, n_seen_sites=8, n_unseen_sites=4, subjects_per_site=24)
        [(s["site"], s["vendor"], s["ad_fraction"]) for s in sites][:2]
    """
    vendors = _vendor_table(vendor_ad_fraction)
    if n_seen_sites < 1 or n_unseen_sites < 0 or subjects_per_site < 1:
        raise ValueError(
            "need n_seen_sites >= 1, n_unseen_sites >= 0 and subjects_per_site >= 1, got "
            f"{n_seen_sites}, {n_unseen_sites} and {subjects_per_site}."
        )
    if site_effect < 0:
        raise ValueError(f"site_effect must be >= 0, got {site_effect}.")
    if unseen_ad_fraction is not None and not 0 <= unseen_ad_fraction <= 1:
        raise ValueError(f"unseen_ad_fraction must be in [0, 1] or None, got {unseen_ad_fraction}.")
    names = list(vendors)
    bases = {v: _vendor_signature(np.random.default_rng([seed, 0, i])) for i, v in enumerate(names)}
    assigned = [names[i % len(names)] for i in range(n_seen_sites)] + [
        names[i % len(names)] for i in range(n_unseen_sites)
    ]
    sites = []
    for index, vendor in enumerate(assigned):
        rng = np.random.default_rng([seed, 1, index])
        seen = index < n_seen_sites
        target = vendors[vendor] if seen or unseen_ad_fraction is None else float(unseen_ad_fraction)
        fraction = (
            float(np.clip(target + rng.normal(0.0, site_fraction_sd), 0.05, 0.95)) if site_fraction_sd else target
        )
        n_ad = int(round(fraction * subjects_per_site))
        labels = rng.permutation(np.arange(subjects_per_site) < n_ad).astype(int).tolist()
        sites.append(
            {
                "site": f"site{index:02d}",
                "vendor": vendor,
                "seen": seen,
                "ad_fraction_target": target,
                "ad_fraction": n_ad / subjects_per_site,
                "labels": labels,
                "signature": _site_signature(bases[vendor], rng, site_effect),
            }
        )
    return sites


def _axis(
    bounds: tuple[float, float], spacing: float, centre: float | None = None, extent: float | None = None
) -> np.ndarray:
    """Voxel-centre coordinates along one axis: ``bounds`` at ``spacing``, or ``extent`` mm centred on ``centre``."""
    if centre is not None and extent is not None:
        half = int(np.floor(extent / (2 * spacing)))
        return centre + spacing * np.arange(-half, half + 1)
    low, high = bounds
    half = int(np.floor((high - low) / (2 * spacing)))
    return (low + high) / 2 + spacing * np.arange(-half, half + 1)


def _interpolation_matrix(n_control: int, positions: np.ndarray) -> np.ndarray:
    """Weights ``(len(positions), n_control)`` of cubic-spline interpolation between control points."""
    eye = np.eye(n_control)
    return np.stack([ndimage.map_coordinates(e, [positions], order=3, mode="nearest") for e in eye], axis=1)


def _random_warp(
    rng: np.random.Generator, rms_mm: float, axes: Sequence[np.ndarray], origin: np.ndarray, extent: Sequence[int]
) -> np.ndarray:
    """A smooth random displacement field ``(3, nx, ny, nz)`` (mm) on the grid ``axes``, RMS ``rms_mm``.

    Control points every ``_CONTROL_SPACING`` mm from ``origin`` over ``extent`` mm carry smoothed random vectors;
    the field is their cubic-spline interpolation, which is separable on a regular grid and so costs little.
    """
    shape = [int(np.ceil(n / _CONTROL_SPACING)) + 2 for n in extent]
    control = ndimage.gaussian_filter(rng.normal(size=(3, *shape)), sigma=(0, 1, 1, 1), mode="nearest")
    control *= rms_mm / max(float(np.sqrt(np.mean(control**2))), 1e-12)
    weights = [_interpolation_matrix(n, (a - o) / _CONTROL_SPACING) for n, a, o in zip(shape, axes, origin)]
    return np.einsum("ia,jb,kc,dabc->dijk", *weights, control, optimize=True)


def _nearest_on_segment(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """The point of segment ``start``-``end`` nearest to each of ``points`` ``(3, ...)``."""
    direction = end - start
    shape = (3,) + (1,) * (points.ndim - 1)
    t = np.einsum("c,c...->...", direction, points - start.reshape(shape)) / float(direction @ direction)
    return start.reshape(shape) + np.clip(t, 0.0, 1.0) * direction.reshape(shape)


def _radial_field(points: np.ndarray, segment: tuple, width: float, amount: float) -> np.ndarray:
    """Sampling displacement that contracts (``amount > 0``) or expands (``< 0``) the tissue around a segment.

    Points are mapped to template positions ``p + amount * w(d) * d`` with ``d`` the offset from the segment and ``w``
    a Gaussian of ``width`` mm: sampling farther out near the axis makes the structure look smaller. The map stays
    one-to-one for ``-1 < amount < 2.7``.
    """
    offset = points - _nearest_on_segment(points, np.asarray(segment[0]), np.asarray(segment[1]))
    weight = np.exp(-np.sum(offset**2, axis=0) / (2 * width**2))
    return amount * weight * offset


def _mirror(segment: tuple) -> tuple:
    """The left-hemisphere copy of a right-hemisphere segment."""
    return tuple((-p[0], p[1], p[2]) for p in segment)


def _anatomy(rng: np.random.Generator, severity: float, atrophy: float, size_sd: float) -> dict[str, Any]:
    """A subject's anatomy parameters: global size, left/right hippocampal contraction, ventricle expansion."""
    sides = 1.0 + 0.1 * rng.normal(size=2)
    hippocampus = np.clip(atrophy * severity * sides, 0.0, 2.0)
    return {
        "scale": (1.0 + size_sd * rng.normal()) * np.exp(0.015 * rng.normal(size=3)),
        "hippocampus": hippocampus.tolist(),
        "ventricle": np.clip(_VENTRICLE_RATIO * hippocampus, 0.0, 0.9).tolist(),
        "warp_seed": int(rng.integers(2**31)),
    }


def _bias(axes: Sequence[np.ndarray], coefficients: Sequence[float]) -> np.ndarray:
    """Smooth multiplicative bias field: ``exp`` of a quadratic polynomial of scanner coordinates (scaled by 80 mm)."""
    x, y, z = np.ix_(*[a / 80.0 for a in axes])
    terms = (x, y, z, x**2, y**2, z**2, x * y, x * z, y * z)
    return np.exp(sum(c * t for c, t in zip(coefficients, terms)))


def _reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """Store a RAS array in ``axcodes`` order (as a scanner might), keeping the voxel-to-world mapping."""
    image = nib.Nifti1Image(data, affine).as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(axcodes)))
    return np.asarray(image.dataobj), image.affine


def simulate_mri_image(
    signature: Mapping[str, Any],
    severity: float,
    anatomy_seed: int | Sequence[int],
    image_seed: int | Sequence[int],
    atrophy: float = 0.4,
    slab_mm: float | None = 16.0,
    slab_centre_y: float = MNI_RIGHT_HIPPOCAMPUS[1],
    deformation_mm: float = 2.0,
    size_sd: float = 0.04,
) -> nib.Nifti1Image:
    """
    Simulate one skull-stripped T1-weighted image of one subject on one scanner.

    The subject is the MNI152 template under a random smooth deformation, a global size change and, in proportion to
    ``atrophy * severity``, hippocampal contraction and lateral-ventricle expansion (all drawn from
    ``anatomy_seed``). The scanner ``signature`` (from :func:`make_mri_sites`) then sets the voxel grid, a
    registration residual, grey/white contrast, gamma, bias field, blur, intensity scale and noise, with small
    per-image jitter and the noise drawn from ``image_seed``.

    Args:
        signature: a site's ``signature`` dict.
        severity: disease severity, about 1 for a typical AD subject and 0 for no atrophy.
        anatomy_seed: seed (or seed sequence) of the subject's anatomy; the same seed gives the same subject.
        image_seed: seed of this acquisition (noise, jitter).
        atrophy: hippocampal contraction at ``severity == 1`` (the fraction by which sampling reaches out at the
            hippocampal axis); ventricles widen by 0.8 times as much.
        slab_mm: thickness of the coronal slab written around ``slab_centre_y``; ``None`` writes the whole brain.
        slab_centre_y: MNI y (mm) of the slab centre; a voxel centre lies on it.
        deformation_mm: RMS of the random smooth deformation.
        size_sd: standard deviation of the global size factor.

    Returns:
        an int16 ``Nifti1Image`` whose affine (sform and qform, code MNI152) maps voxels to MNI mm.

    Example::

        site = make_mri_sites(seed=0)[0]
        image = simulate_mri_image(site["signature"], severity=1.0, anatomy_seed=[0, 1], image_seed=[0, 2])
        image.shape  # (nx, 17, nz) for the default 16 mm slab
    """
    t1, gm, template_affine = _template()
    anatomy = _anatomy(np.random.default_rng(anatomy_seed), severity, atrophy, size_sd)
    rng = np.random.default_rng(image_seed)
    spacing = np.asarray(signature["spacing_mm"], dtype=float)
    axes = [
        _axis(_FOV[0], spacing[0]),
        _axis(_FOV[1], spacing[1]) if slab_mm is None else _axis(_FOV[1], spacing[1], slab_centre_y, slab_mm),
        _axis(_FOV[2], spacing[2]),
    ]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))
    # scanner world -> template position: registration residual, global size, random warp, then the atrophy fields
    shift = np.asarray(signature["fov_shift_mm"]) + rng.normal(0.0, 0.5, size=3)
    centre = _BRAIN_CENTRE.reshape(3, 1, 1, 1)
    points = centre + (grid + shift.reshape(3, 1, 1, 1) - centre) / anatomy["scale"].reshape(3, 1, 1, 1)
    template_origin = template_affine[:3, 3]
    warp_rng = np.random.default_rng(anatomy["warp_seed"])
    points += _random_warp(warp_rng, deformation_mm, axes, template_origin, t1.shape)
    for side, segment in enumerate((_HIPPOCAMPUS, _mirror(_HIPPOCAMPUS))):
        points += _radial_field(points, segment, _HIPPOCAMPUS_WIDTH, anatomy["hippocampus"][side])
    for side, segment in enumerate((_VENTRICLE, _mirror(_VENTRICLE))):
        points -= _radial_field(points, segment, _VENTRICLE_WIDTH, anatomy["ventricle"][side])
    inverse = np.linalg.inv(template_affine[:3, :3])
    voxels = np.einsum("ij,j...->i...", inverse, points - template_origin.reshape(3, 1, 1, 1))
    intensity = ndimage.map_coordinates(t1, voxels, order=1, mode="constant", cval=0.0)
    brain = intensity > 0.05
    if signature["tissue_contrast"] > 0:
        grey = ndimage.map_coordinates(gm, voxels, order=1, mode="constant", cval=0.0)
        intensity *= 1.0 - signature["tissue_contrast"] * grey
    intensity **= signature["gamma"]
    coefficients = np.asarray(signature["bias_coefficients"]) + 0.01 * rng.normal(size=9)
    intensity *= _bias(axes, coefficients)
    if signature["blur_mm"] > 0:
        intensity = ndimage.gaussian_filter(intensity, sigma=signature["blur_mm"] / spacing, mode="nearest")
    scale = signature["intensity_scale"] * np.exp(rng.normal(0.0, 0.03))
    intensity *= scale
    noise_sd = signature["noise_sd"] * scale
    if noise_sd > 0:
        real = intensity + rng.normal(0.0, noise_sd, size=intensity.shape)
        if signature["noise"] == "rician":
            intensity = np.hypot(real, rng.normal(0.0, noise_sd, size=intensity.shape))
        else:
            intensity = np.maximum(real, 0.0)
    data = np.where(brain, np.clip(np.rint(intensity), 0, np.iinfo(np.int16).max), 0).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [a[0] for a in axes]
    data, affine = _reorient(data, affine, signature["axcodes"])
    image = nib.Nifti1Image(data, affine)
    image.set_sform(affine, code=4)
    image.set_qform(affine, code=4)
    image.header.set_xyzt_units("mm")
    return image


def _severity(rng: np.random.Generator, label: int) -> float:
    """Disease severity: AD about N(1, 0.35), CN about N(0.2, 0.2) (ageing), clipped; the groups overlap a little."""
    mean, sd = (1.0, 0.35) if label else (0.2, 0.2)
    return float(np.clip(rng.normal(mean, sd), 0.0, 2.0))


def _split_subjects(
    subjects: list[tuple[str, int]], fractions: Sequence[float], rng: np.random.Generator
) -> dict[str, str]:
    """Assign seen subjects to training / validation / test, stratified on site x label.

    Subjects are ordered by stratum (random order inside each) and split along a low-discrepancy (golden-ratio)
    sequence, so every stratum gets close to the target fractions and the totals match them closely even when
    strata hold only a few subjects.
    """
    strata: dict[tuple[str, int], list[str]] = {}
    for subject, label in subjects:
        strata.setdefault((subject.split("-")[0], label), []).append(subject)
    ordered = [s for key in sorted(strata) for s in rng.permutation(strata[key]).tolist()]
    bounds = np.cumsum(fractions) / np.sum(fractions)
    position = (rng.uniform() + np.arange(len(ordered)) * (np.sqrt(5.0) - 1.0) / 2.0) % 1.0
    names = ("training", "validation", "test")
    return {s: names[int(np.searchsorted(bounds, u, side="right"))] for s, u in zip(ordered, position)}


def _parameters(
    seed: int,
    n_seen_sites: int,
    n_unseen_sites: int,
    subjects_per_site: int,
    images_per_subject: int,
    atrophy: float,
    slab_mm: float | None,
    vendor_ad_fraction: Mapping[str, float] | None,
    site_fraction_sd: float,
    site_effect: float,
    deformation_mm: float,
    size_sd: float,
    split_fractions: Sequence[float],
    unseen_ad_fraction: float | None,
) -> dict[str, Any]:
    """The generation parameters as plain JSON types (they identify a cached data set)."""
    if images_per_subject < 1:
        raise ValueError(f"images_per_subject must be >= 1, got {images_per_subject}.")
    if slab_mm is not None and slab_mm < 0:
        raise ValueError(f"slab_mm must be >= 0 or None (whole brain), got {slab_mm}.")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or split_fractions[0] <= 0:
        raise ValueError(
            f"split_fractions must be (training, validation, test) with training > 0, got {split_fractions}."
        )
    if not 0 <= atrophy < 2.0:
        raise ValueError(f"atrophy must be in [0, 2), got {atrophy}.")
    return {
        "generator_version": _GENERATOR_VERSION,
        "seed": int(seed),
        "n_seen_sites": int(n_seen_sites),
        "n_unseen_sites": int(n_unseen_sites),
        "subjects_per_site": int(subjects_per_site),
        "images_per_subject": int(images_per_subject),
        "atrophy": float(atrophy),
        "slab_mm": None if slab_mm is None else float(slab_mm),
        "slab_centre_y": MNI_RIGHT_HIPPOCAMPUS[1],
        "vendor_ad_fraction": [[v, f] for v, f in _vendor_table(vendor_ad_fraction).items()],
        "site_fraction_sd": float(site_fraction_sd),
        "unseen_ad_fraction": None if unseen_ad_fraction is None else float(unseen_ad_fraction),
        "site_effect": float(site_effect),
        "deformation_mm": float(deformation_mm),
        "size_sd": float(size_sd),
        "split_fractions": [float(f) for f in split_fractions],
    }


def _write_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write a gzipped NIfTI atomically and reproducibly (no time stamp or file name in the gzip header)."""
    payload = gzip.compress(image.to_bytes(), compresslevel=6, mtime=0)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _render_job(job: dict[str, Any]) -> None:
    """Simulate and write one image (runs in worker processes)."""
    image = simulate_mri_image(
        job["signature"],
        job["severity"],
        job["anatomy_seed"],
        job["image_seed"],
        atrophy=job["atrophy"],
        slab_mm=job["slab_mm"],
        deformation_mm=job["deformation_mm"],
        size_sd=job["size_sd"],
    )
    _write_nifti(image, Path(job["path"]))


def _owns(name: str) -> bool:
    """Whether a path relative to the output folder is one this generator writes."""
    return _OWN_FILE.fullmatch(name) is not None


def make_mri_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    n_seen_sites: int = 8,
    n_unseen_sites: int = 4,
    subjects_per_site: int = 24,
    images_per_subject: int = 1,
    atrophy: float = 0.4,
    slab_mm: float | None = 16.0,
    vendor_ad_fraction: Mapping[str, float] | None = None,
    site_fraction_sd: float = 0.05,
    site_effect: float = 1.0,
    deformation_mm: float = 2.0,
    size_sd: float = 0.04,
    split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
    unseen_ad_fraction: float | None = 0.5,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """
    Generate the synthetic multi-site MRI data set in ``out_dir`` (always; see :func:`ensure_mri_dataset` to reuse).

    Writes ``images/<site>_sub<NNN>_img<R>.nii.gz``, ``sites.json`` (vendors, patient fractions and scanner
    signatures), ``datalist.json`` and, last, ``manifest.json`` (parameters, their hash, the files). Every file is
    written atomically and the old manifest and datalist are removed first, so an interrupted run leaves no datalist
    and is redone by :func:`ensure_mri_dataset`. The result depends only on the arguments (not on ``num_workers``).
    ``out_dir`` must be new, empty or an earlier output of this generator: a folder holding any other file (e.g. a
    user's own data set) raises :class:`~monai_armed.data.generated.ForeignFilesError` before anything is written.

    ``datalist.json`` holds ``training``, ``validation`` and ``test`` (subjects of the seen sites, split by subject
    and stratified on site x label) and ``unseen`` (every subject of the unseen sites). Each item is
    ``{"image": path relative to the datalist's folder, "label": 1 (AD) or 0 (CN), "cluster": site id,
    "subject": subject id, "vendor": vendor, "repeat": image index of the subject}``; MONAI's
    ``load_decathlon_datalist(path, is_segmentation=False, data_list_key=...)`` resolves the paths.

    Args:
        out_dir: output folder (created).
        seed: random seed.
        n_seen_sites: training sites.
        n_unseen_sites: held-out sites.
        subjects_per_site: subjects per site.
        images_per_subject: scans per subject (same anatomy, new noise and jitter); all go to the subject's split.
        atrophy: strength of the disease effect (hippocampal contraction at severity 1); 0 removes it.
        slab_mm: thickness of the coronal slab around MNI y = -6 (``None``: whole brains, about 10 times larger).
        vendor_ad_fraction: vendor group -> patient fraction; default :data:`DEFAULT_VENDOR_AD_FRACTION`.
        site_fraction_sd: scatter of the sites' patient fractions around their vendor's.
        site_effect: strength of the scanner effects (0 = identical scanners).
        deformation_mm: RMS of each subject's random smooth deformation.
        size_sd: standard deviation of each subject's global size factor.
        split_fractions: (training, validation, test) fractions of the seen sites' subjects.
        unseen_ad_fraction: patient fraction of the unseen sites (``None``: their vendors', i.e. confounded too).
        num_workers: worker processes (default: up to 4, as many as there are CPUs); results do not depend on it.
        progress: show a progress bar (tqdm, on stderr) when stderr is a terminal.

    Returns:
        the path of ``datalist.json``.

    Example::

        datalist = make_mri_dataset("data/mri", seed=0, subjects_per_site=24)
        train = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key="training")
    """
    params = _parameters(
        seed,
        n_seen_sites,
        n_unseen_sites,
        subjects_per_site,
        images_per_subject,
        atrophy,
        slab_mm,
        vendor_ad_fraction,
        site_fraction_sd,
        site_effect,
        deformation_mm,
        size_sd,
        split_fractions,
        unseen_ad_fraction,
    )
    sites = make_mri_sites(
        seed,
        n_seen_sites,
        n_unseen_sites,
        subjects_per_site,
        vendor_ad_fraction,
        site_fraction_sd,
        site_effect,
        unseen_ad_fraction,
    )
    out = claim_output_dir(out_dir, "mri", _owns)
    (out / _IMAGES).mkdir(exist_ok=True)
    for name in (MANIFEST, _DATALIST):
        (out / name).unlink(missing_ok=True)
    seen_subjects = [(f"{s['site']}-sub{i:03d}", lab) for s in sites if s["seen"] for i, lab in enumerate(s["labels"])]
    split_of = _split_subjects(seen_subjects, split_fractions, np.random.default_rng([seed, 3]))
    datalist: dict[str, list] = {"training": [], "validation": [], "test": [], "unseen": []}
    jobs = []
    for index, site in enumerate(sites):
        for subject, label in enumerate(site["labels"]):
            subject_id = f"{site['site']}-sub{subject:03d}"
            severity = _severity(np.random.default_rng([seed, 2, index, subject]), label)
            for repeat in range(images_per_subject):
                relative = f"{_IMAGES}/{site['site']}_sub{subject:03d}_img{repeat}.nii.gz"
                jobs.append(
                    {
                        "path": str(out / relative),
                        "signature": site["signature"],
                        "severity": severity,
                        "anatomy_seed": [seed, 4, index, subject],
                        "image_seed": [seed, 5, index, subject, repeat],
                        "atrophy": atrophy,
                        "slab_mm": slab_mm,
                        "deformation_mm": deformation_mm,
                        "size_sd": size_sd,
                    }
                )
                split = split_of[subject_id] if site["seen"] else "unseen"
                datalist[split].append(
                    {
                        "image": relative,
                        "label": int(label),
                        "cluster": site["site"],
                        "subject": subject_id,
                        "vendor": site["vendor"],
                        "repeat": repeat,
                        "severity": round(severity, 4),
                    }
                )
    files = sorted(item["image"] for items in datalist.values() for item in items)
    own = [*files, _SITES, _DATALIST]
    record_planned_files(out, own)
    run_jobs(_render_job, jobs, num_workers, progress, "MRI images", initializer=_template, min_parallel_jobs=16)
    remove_stale_files(out, own)
    vendors = {
        v: {"ad_fraction": f, "sites": [s["site"] for s in sites if s["vendor"] == v]}
        for v, f in params["vendor_ad_fraction"]
    }
    write_json({"parameters": params, "vendors": vendors, "sites": sites}, out / _SITES)
    write_json(datalist, out / _DATALIST)
    write_manifest(out, params, files, "mri", datalist=_DATALIST, sites=_SITES)
    return out / _DATALIST


def ensure_mri_dataset(out_dir: str | os.PathLike, **params: Any) -> Path:
    """
    The synthetic MRI data set in ``out_dir``, generated by :func:`make_mri_dataset` unless a complete one with the
    same parameters is already there (its manifest's parameter hash matches and every file it lists exists).

    Args:
        out_dir: output folder.
        params: keyword arguments of :func:`make_mri_dataset` (``num_workers`` and ``progress`` do not affect the
            data, so they do not invalidate the cache).

    Returns:
        the path of ``datalist.json``.

    Example::

        datalist = ensure_mri_dataset("data/mri", seed=0)   # generates (about a minute on 2 CPUs)
        datalist = ensure_mri_dataset("data/mri", seed=0)   # reuses the files
    """
    return ensure_generated(make_mri_dataset, _parameters, out_dir, params, [_DATALIST, _SITES])


def _parse_vendor(text: str) -> tuple[str, float]:
    """``"GE=0.75"`` -> ``("GE", 0.75)``."""
    name, sep, fraction = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected VENDOR=FRACTION such as GE=0.75, got {text!r}.")
    return name, float(fraction)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line: ``python -m monai_armed.data.mri --out DIR [--seed S] [--subjects-per-site N] ...``.

    Example::

        main(["--out", "data/mri", "--seed", "0"])
    """
    parser = argparse.ArgumentParser(prog="python -m monai_armed.data.mri", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seen-sites", type=int, default=8)
    parser.add_argument("--unseen-sites", type=int, default=4)
    parser.add_argument("--subjects-per-site", type=int, default=24)
    parser.add_argument("--images-per-subject", type=int, default=1)
    parser.add_argument("--atrophy", type=float, default=0.4)
    parser.add_argument("--slab-mm", default="16", help="coronal slab thickness in mm, or 'none' for whole brains")
    parser.add_argument("--vendor", type=_parse_vendor, action="append", help="VENDOR=AD_FRACTION, repeatable")
    parser.add_argument("--site-effect", type=float, default=1.0)
    parser.add_argument(
        "--unseen-ad-fraction", default="0.5", help="patient fraction of the unseen sites, or 'vendor' (confounded)"
    )
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching data set exists")
    args = parser.parse_args(argv)
    params = {
        "seed": args.seed,
        "n_seen_sites": args.seen_sites,
        "n_unseen_sites": args.unseen_sites,
        "subjects_per_site": args.subjects_per_site,
        "images_per_subject": args.images_per_subject,
        "atrophy": args.atrophy,
        "slab_mm": None if args.slab_mm.lower() == "none" else float(args.slab_mm),
        "vendor_ad_fraction": dict(args.vendor) if args.vendor else None,
        "site_effect": args.site_effect,
        "unseen_ad_fraction": None if args.unseen_ad_fraction.lower() == "vendor" else float(args.unseen_ad_fraction),
        "num_workers": args.num_workers,
        "progress": True,
    }
    start = time.perf_counter()
    datalist = (make_mri_dataset if args.force else ensure_mri_dataset)(args.out, **params)
    counts = {k: len(v) for k, v in json.loads(datalist.read_text()).items()}
    print(f"{datalist} {counts} ({time.perf_counter() - start:.1f} s)")
    return datalist


if __name__ == "__main__":
    main()
