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
MRI input transforms for the ARMED AD-vs-CN experiment: a loader whose errors name the file, and the paper's coronal
slice through the right hippocampus (MNI (32, -6, -26)), cropped to the brain, squared, resized and scaled to [0, 1].
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CropForeground,
    LoadImage,
    MapTransform,
    Orientation,
    Resize,
    ScaleIntensityRangePercentiles,
    SpatialPad,
    SpatialResample,
    Transform,
)
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import TransformBackends, ensure_tuple_rep
from nibabel.affines import obliquity

__all__ = [
    "CheckedLoadImage",
    "CheckedLoadImaged",
    "CheckedLoadImageD",
    "CheckedLoadImageDict",
    "CoronalSlice",
    "CoronalSliced",
    "CoronalSliceD",
    "CoronalSliceDict",
]

logger = logging.getLogger(__name__)

RIGHT_HIPPOCAMPUS_MNI = (32.0, -6.0, -26.0)

# Plausibility of MNI152 space, checked on the brain (the positive voxels) of every image. The nilearn MNI152 2009
# template's brain spans x [-72, 72], y [-107, 73], z [-72, 82] mm; a registered brain lies inside that box widened
# by MNI_TOLERANCE_MM on every side, is centred on the midline (|x| <= MIDLINE_TOLERANCE_MM) and is at least
# MIN_BRAIN_WIDTH_MM wide in x (the template's is 144 mm; coronal slabs are allowed, so y and z may be short).
MNI_BRAIN_BOX_MM = ((-72.0, 72.0), (-107.0, 73.0), (-72.0, 82.0))
MNI_TOLERANCE_MM = 20.0
MIDLINE_TOLERANCE_MM = 20.0
MIN_BRAIN_WIDTH_MM = 100.0
OBLIQUE_TOLERANCE_DEG = 1.0
"""Largest angle (degrees) between a voxel axis and its nearest world axis before an image is called oblique."""
MAX_NEGATIVE_FRACTION = 0.05
"""Largest fraction of negative voxels among the non-zero ones (interpolation ringing) before a warning."""


def _where(source: Any, key: Hashable | None) -> str:
    """``"image 'a.nii.gz' (key 'image')"`` for error messages."""
    text = f"image {str(source)!r}" if source is not None else "image (no file name in its metadata)"
    return text if key is None else f"{text} (key {key!r})"


class CheckedLoadImage(LoadImage):
    """
    :py:class:`monai.transforms.LoadImage` whose failures name the file and what was expected.

    MONAI passes on the reader's own exception, which for a truncated ``.nii.gz`` is a bare
    ``EOFError: Compressed file ended before the end-of-stream marker was reached``. This loader raises
    ``FileNotFoundError`` for a missing file and ``RuntimeError`` naming the file (and key) for an unreadable one,
    chained to the original exception. A floating-point image with NaN or infinite voxels (a failed registration or
    bias correction, a division by zero) raises ``ValueError`` naming the file, the key and how many voxels are
    not finite, instead of silently poisoning the intensity scaling and the loss. Arguments are those of
    ``LoadImage``.

    Example::

        loader = CheckedLoadImage(ensure_channel_first=True)
        image = loader("sub-01.nii.gz")   # MetaTensor (1, X, Y, Z)
    """

    def __call__(self, filename: Any, reader: Any = None, key: Hashable | None = None) -> Any:
        """Load ``filename``; ``key`` only enters error messages."""
        paths = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        for path in paths:
            if not Path(os.path.expanduser(str(path)) if self.expanduser else path).exists():
                raise FileNotFoundError(f"{_where(path, key)} not found; expected an existing image file.")
        try:
            loaded = super().__call__(filename, reader)
        except Exception as err:
            raise RuntimeError(
                f"could not read {_where(filename, key)}: {type(err).__name__}: {err}. Expected a complete, readable "
                "image file (e.g. NIfTI .nii / .nii.gz); the file may be truncated or corrupt."
            ) from err
        _check_finite(loaded[0] if isinstance(loaded, (tuple, list)) else loaded, filename, key)
        return loaded


def _check_finite(image: Any, source: Any, key: Hashable | None) -> None:
    """``ValueError`` naming the file, the key and the count if a floating-point image has NaN or Inf voxels."""
    data = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    if not data.is_floating_point():
        return
    finite = torch.isfinite(data)
    if bool(finite.all()):
        return
    n_nan = int(torch.isnan(data).sum())
    n_bad = int((~finite).sum())
    raise ValueError(
        f"{_where(source, key)} has {n_bad} non-finite voxel(s) of {data.numel()} ({n_nan} NaN, {n_bad - n_nan} "
        "infinite); expected finite intensities. Replace them (e.g. numpy.nan_to_num, or 0 outside the brain) or fix "
        "the processing step that produced them."
    )


class CheckedLoadImaged(MapTransform):
    """
    Dictionary-based wrapper of :py:class:`monai_armed.transforms.CheckedLoadImage`: loads each key's file into a
    ``MetaTensor`` (``image_only``) and, on failure, raises an error naming the file and the key.

    Args:
        keys: keys of the file names to load.
        reader: reader name, class or instance, as for ``LoadImage`` (default: chosen by file suffix).
        dtype: data type of the loaded image.
        ensure_channel_first: add / move the channel dimension to the front.
        allow_missing_keys: don't raise if a key is missing.
        kwargs: other ``LoadImage`` arguments (``simple_keys``, ``prune_meta_pattern``, reader options, ...).

    Example::

        load = CheckedLoadImaged("image", ensure_channel_first=True)
        item = load({"image": "sub-01.nii.gz", "label": 1})
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: Any = None,
        dtype: Any = np.float32,
        ensure_channel_first: bool = False,
        allow_missing_keys: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = CheckedLoadImage(
            reader=reader, image_only=True, dtype=dtype, ensure_channel_first=ensure_channel_first, **kwargs
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key], key=key)
        return d


class CoronalSlice(Transform):
    """
    The ARMED paper's MRI input (armed_method.md section 8.2): the coronal slice through a world coordinate (MNI mm,
    default the right hippocampus at (32, -6, -26)), cropped to the brain's bounding box plus ``margin`` pixels,
    zero-padded to a square, resized to ``spatial_size`` (bilinear) and scaled so that its ``lower``-``upper``
    percentiles map to [0, 1], clipped.

    The input is a channel-first single-channel 3D ``MetaTensor`` (as from ``LoadImage(ensure_channel_first=True)``)
    whose affine maps voxels to the world space of ``world_coordinate``; it is first reoriented to RAS, so any
    storage orientation works. Unless its voxels are already isotropic cubes of ``isotropic_mm`` aligned with the
    world axes, the coronal plane (or slab) is then resampled (linear interpolation, zero outside the image) onto a
    grid of ``isotropic_mm`` voxels aligned with the world axes with one plane exactly through the coordinate, so
    that a 1 x 1 x 4 mm image gives the same, unsquashed slice as a 1 mm one and an oblique affine is sliced along
    the world's coronal plane; only the planes needed are resampled. The brain is the positive voxels (skull-stripped
    images). The 2D output (1, H, W) has rows running superior to inferior and columns in increasing RAS x (patient
    left to right), so it shows as the familiar coronal view. With ``spatial_dims=3`` the output is the slab of
    ``num_slices`` coronal slices (``isotropic_mm`` apart) around the coordinate, (1, H, W, num_slices) with the last
    axis posterior to anterior, cropped and resized in plane only. The output is a ``MetaTensor`` carrying
    ``filename_or_obj`` and ``coronal_index``, the index of the plane along RAS y in the (isotropic) grid.

    Bad input raises ``TypeError`` / ``ValueError`` naming the file (the ``filename_or_obj`` metadata) and what was
    expected: a 2D, 4D or multi-channel image, a missing (qform and sform codes 0), singular or non-finite affine, a
    coordinate or slab outside the field of view, an empty slice, or a brain smaller than ``min_size`` pixels.
    An image that is sliced but is probably not in MNI152 space is logged (``logging`` warning of this module, once
    per file name and transform instance) with the reasons: an oblique affine (a voxel axis more than
    ``OBLIQUE_TOLERANCE_DEG`` from the world axes, typical of scanner space), a brain (positive voxels) reaching more
    than ``MNI_TOLERANCE_MM`` beyond the MNI152 brain's box, off the midline by more than ``MIDLINE_TOLERANCE_MM`` or
    narrower than ``MIN_BRAIN_WIDTH_MM`` in x (scanner space, wrong voxel size, not skull-stripped), or more than
    ``MAX_NEGATIVE_FRACTION`` of the non-zero voxels negative (z-scored intensities: the positive voxels are then
    not the brain).

    Args:
        world_coordinate: (x, y, z) in the image's world space (mm); the slice is the coronal (y) plane through it,
            and the whole point must lie inside the field of view.
        spatial_size: output size in plane, an int (square) or (H, W).
        spatial_dims: 2 for one slice, 3 for a slab.
        num_slices: slab thickness in slices when ``spatial_dims == 3``.
        margin: pixels added around the brain's bounding box.
        lower: lower intensity percentile mapped to 0.
        upper: upper intensity percentile mapped to 1.
        min_size: smallest accepted brain extent (the larger side of its bounding box, in pixels).
        mode: interpolation of the resize; default ``"bilinear"`` (2D) or ``"trilinear"`` (3D).
        require_header_transform: reject NIfTI images whose qform and sform codes are both 0 (the reader then
            invents an affine, so world coordinates are meaningless).
        isotropic_mm: voxel side (mm) of the grid the slice is taken from; ``None`` (default): the image's smallest
            voxel side, so no resolution is lost.

    Example::

        load = CheckedLoadImage(ensure_channel_first=True)
        image = CoronalSlice(world_coordinate=(32, -6, -26), spatial_size=192)(load("sub-01.nii.gz"))
        image.shape  # (1, 192, 192), values in [0, 1]
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        world_coordinate: Sequence[float] = RIGHT_HIPPOCAMPUS_MNI,
        spatial_size: Sequence[int] | int = 192,
        spatial_dims: int = 2,
        num_slices: int = 16,
        margin: int = 2,
        lower: float = 2.0,
        upper: float = 98.0,
        min_size: int = 32,
        mode: str | None = None,
        require_header_transform: bool = True,
        isotropic_mm: float | None = None,
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (a slice) or 3 (a slab), got {spatial_dims}.")
        if len(world_coordinate) != 3:
            raise ValueError(f"world_coordinate must be (x, y, z) in mm, got {world_coordinate}.")
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}.")
        if isotropic_mm is not None and not (np.isfinite(isotropic_mm) and isotropic_mm > 0):
            raise ValueError(f"isotropic_mm must be a positive voxel side in mm or None, got {isotropic_mm}.")
        self.world_coordinate = tuple(float(c) for c in world_coordinate)
        self.spatial_size = ensure_tuple_rep(spatial_size, 2)
        self.spatial_dims = spatial_dims
        self.num_slices = num_slices if spatial_dims == 3 else 1
        self.min_size = min_size
        self.require_header_transform = require_header_transform
        self.isotropic_mm = None if isotropic_mm is None else float(isotropic_mm)
        self.mode = mode or ("bilinear" if spatial_dims == 2 else "trilinear")
        self.orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        self.resample = SpatialResample(mode="bilinear", padding_mode="zeros", dtype=torch.float32)
        self.margin = margin
        self.crop = CropForeground(margin=margin, allow_smaller=True)
        self.scale = ScaleIntensityRangePercentiles(lower, upper, b_min=0.0, b_max=1.0, clip=True)
        self._checked: set[str] = set()  # file names already checked for MNI152 space

    def __call__(self, img: torch.Tensor, key: Hashable | None = None) -> MetaTensor:
        """Slice, crop, square, resize and scale ``img`` (1, X, Y, Z); ``key`` only enters error messages."""
        source = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
        where = _where(source, key)
        self._check_volume(img, where)
        ras = self.orient(img)
        self._warn_if_not_mni(ras, source, where)
        slab, index = self._coronal_slab(ras, where)
        # (C, X, D, Z) -> (C, Z, X, D), superior row first
        planes = slab.permute(0, 3, 1, 2).flip(1)
        if self.spatial_dims == 2:
            planes = planes[..., 0]
        if not bool((planes > 0).any()):
            raise ValueError(
                f"{where}: the coronal slice through y = {self.world_coordinate[1]} mm has no positive voxel; "
                "expected a skull-stripped brain image with the brain at that position."
            )
        if self.spatial_dims == 3:  # in plane only: the slab keeps its planes at their coordinates
            start, end = generate_spatial_bounding_box(planes.amax(-1), margin=self.margin, allow_smaller=True)
            cropped = planes[:, start[0] : end[0], start[1] : end[1]]
        else:
            cropped = self.crop(planes)
        height, width = cropped.shape[1:3]
        if max(height, width) < self.min_size:
            raise ValueError(
                f"{where}: the brain spans only {height}x{width} pixels in the coronal slice; expected at least "
                f"{self.min_size} (the image is far smaller than the crop, or of too low resolution)."
            )
        side = max(height, width)
        depth = (self.num_slices,) if self.spatial_dims == 3 else ()
        squared = SpatialPad((side, side, *depth))(cropped)
        resized = Resize((*self.spatial_size, *depth), mode=self.mode, anti_aliasing=False)(squared)
        out = self.scale(resized)
        meta = {"coronal_index": index} if source is None else {"filename_or_obj": source, "coronal_index": index}
        return MetaTensor(torch.as_tensor(out).float(), meta=meta)

    def _check_volume(self, img: torch.Tensor, where: str) -> None:
        """A single-channel 3D MetaTensor with a usable voxel-to-world affine, else a clear error."""
        if not isinstance(img, MetaTensor):
            raise TypeError(
                f"{where}: expected a MetaTensor with an affine (load it with LoadImage(d) or CheckedLoadImage(d)), "
                f"got {type(img).__name__}."
            )
        dim = img.meta.get("dim")
        if dim is not None:
            dim = np.asarray(dim).astype(int).ravel()
            rank = int(dim[0])
            if rank < 3 or (rank > 3 and int(np.prod(dim[4 : rank + 1])) > 1):
                advice = "select one volume first" if rank > 3 else "the slice is cut from the whole 3D brain volume"
                raise ValueError(
                    f"{where}: expected a 3D volume, got a {rank}D image of shape {tuple(dim[1 : rank + 1].tolist())}; "
                    f"{advice}."
                )
        if img.ndim != 4 or img.shape[0] != 1:
            raise ValueError(
                f"{where}: expected a channel-first single-channel 3D volume (1, X, Y, Z), got shape "
                f"{tuple(img.shape)}; load with ensure_channel_first=True (2D and 4D images are not supported)."
            )
        codes = [img.meta.get(k) for k in ("qform_code", "sform_code")]
        if self.require_header_transform and all(c is not None for c in codes) and all(int(c) == 0 for c in codes):
            raise ValueError(
                f"{where}: has no affine (qform_code and sform_code are both 0), so world coordinates cannot be "
                "mapped to voxels; expected an image with a voxel-to-world affine (e.g. registered to MNI space)."
            )
        affine = np.asarray(img.affine, dtype=np.float64)
        finite = affine.shape == (4, 4) and bool(np.all(np.isfinite(affine)))
        scale = float(np.abs(affine[:3, :3]).max()) if finite else 0.0
        if scale == 0.0 or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * scale**3:
            raise ValueError(
                f"{where}: unusable affine (singular, all-zero or non-finite voxel-to-world matrix) "
                f"{np.round(affine, 4).tolist()}; expected an invertible 4x4 affine mapping voxels to mm."
            )

    def _coronal_slab(self, ras: MetaTensor, where: str) -> tuple[torch.Tensor, int]:
        """The ``num_slices`` coronal planes (1, X, num_slices, Z) around the coordinate on an isotropic grid aligned
        with the world axes, and the RAS y index of the coordinate's plane in that grid."""
        affine = np.asarray(ras.affine, dtype=np.float64)
        shape = np.asarray(ras.shape[1:])
        self._check_inside(affine, shape, where)
        side = self.isotropic_mm or float(np.linalg.norm(affine[:3, :3], axis=0).min())
        if np.allclose(affine[:3, :3], side * np.eye(3), rtol=0.0, atol=1e-4 * side):
            index, first = self._slab_start(affine, shape, where)
            return ras.as_tensor()[:, :, first : first + self.num_slices, :].float(), index
        # world bounding box of the voxel centres (all 8 corners, for oblique affines)
        corners = np.stack(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), -1).reshape(-1, 3)
        world = corners @ affine[:3, :3].T + affine[:3, 3]
        low, high = world.min(0), world.max(0)
        y = self.world_coordinate[1]
        index = int(np.floor((y - low[1]) / side + 1e-6))
        planes = index + int(np.floor((high[1] - y) / side + 1e-6)) + 1
        first = index - self.num_slices // 2
        self._check_slab(index, first, planes, where)
        grid = np.diag([side, side, side, 1.0])
        grid[:3, 3] = [low[0], y + (first - index) * side, low[2]]
        size_x, size_z = (int(np.floor((high[a] - low[a]) / side + 1e-6)) + 1 for a in (0, 2))
        size = (size_x, self.num_slices, size_z)
        out = self.resample(ras.float(), dst_affine=torch.as_tensor(grid), spatial_size=size)
        return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out), index

    def _check_inside(self, affine: np.ndarray, shape: np.ndarray, where: str) -> None:
        """The world coordinate must fall on a voxel of the image."""
        voxel = np.linalg.solve(affine, [*self.world_coordinate, 1.0])[:3]
        if np.any(np.rint(voxel) < 0) or np.any(np.rint(voxel) >= shape):
            lo = affine[:3] @ np.array([0, 0, 0, 1.0])
            hi = affine[:3] @ np.array([*(shape - 1), 1.0])
            raise ValueError(
                f"{where}: world coordinate {self.world_coordinate} mm maps to voxel {np.round(voxel, 1).tolist()}, "
                f"outside the image of shape {tuple(shape.tolist())} (RAS), which spans {np.round(lo, 1).tolist()} "
                f"to {np.round(hi, 1).tolist()} mm; expected an image whose field of view contains the coordinate."
            )

    def _slab_start(self, affine: np.ndarray, shape: np.ndarray, where: str) -> tuple[int, int]:
        """Isotropic RAS voxels: the voxel index of the coronal plane nearest the coordinate and the slab's first."""
        index = int(np.rint(np.linalg.solve(affine, [*self.world_coordinate, 1.0])[1]))
        first = index - self.num_slices // 2
        self._check_slab(index, first, int(shape[1]), where)
        return index, first

    def _check_slab(self, index: int, first: int, planes: int, where: str) -> None:
        """The slab must lie inside the ``planes`` coronal planes of the image."""
        if first < 0 or first + self.num_slices > planes:
            raise ValueError(
                f"{where}: the slab of {self.num_slices} coronal slices around index {index} needs slices "
                f"{first} to {first + self.num_slices - 1}, but the image has {planes}; expected an image at least "
                f"that thick around the coordinate (or fewer num_slices)."
            )

    def _warn_if_not_mni(self, ras: MetaTensor, source: Any, where: str) -> None:
        """Log why ``ras`` is probably not a skull-stripped brain in MNI152 space, if it is not; each named file is
        checked once (images without a file name every time)."""
        if source is not None:
            if str(source) in self._checked:
                return
            self._checked.add(str(source))
        reasons = _not_mni_reasons(ras.as_tensor()[0], np.asarray(torch.as_tensor(ras.affine).cpu(), dtype=np.float64))
        if reasons:
            logger.warning(
                f"{where} does not look like a skull-stripped brain registered to MNI152 space: {'; '.join(reasons)}. "
                f"It is sliced at world coordinate {self.world_coordinate} mm anyway, which is the intended anatomy "
                "only in MNI152 space: register the image to MNI152 first (e.g. ANTs antsRegistration or FSL "
                "FLIRT) and skull-strip it."
            )


def _not_mni_reasons(volume: torch.Tensor, affine: np.ndarray) -> list[str]:
    """Why a RAS ``volume`` (X, Y, Z) with voxel-to-world ``affine`` is implausible as an MNI152 brain (or [])."""
    reasons = []
    angle = float(np.degrees(np.max(obliquity(affine))))
    if angle > OBLIQUE_TOLERANCE_DEG:
        reasons.append(
            f"oblique affine (a voxel axis is {angle:.1f} degrees from the world axes, more than "
            f"{OBLIQUE_TOLERANCE_DEG}; typical of scanner space)"
        )
    if float(volume.min()) < 0:
        negative = int((volume < 0).sum()) / int(torch.count_nonzero(volume))
        if negative > MAX_NEGATIVE_FRACTION:
            reasons.append(
                f"{negative:.0%} of the non-zero voxels are negative (expected non-negative intensities with a zero "
                "background, not z-scored: the positive voxels are taken as the brain)"
            )
    # the brain's bounding box from the maximum projections (one pass over the volume per projection)
    top, side = volume.amax(dim=2), volume.amax(dim=1)
    spans = [torch.nonzero(profile > 0).ravel().cpu().numpy() for profile in (top.amax(1), top.amax(0), side.amax(0))]
    if not all(span.size for span in spans):
        return reasons
    corners = np.stack(np.meshgrid(*[[s[0], s[-1]] for s in spans], indexing="ij"), -1).reshape(-1, 3)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    low, high = world.min(0), world.max(0)
    box = np.asarray(MNI_BRAIN_BOX_MM)
    if np.any(low < box[:, 0] - MNI_TOLERANCE_MM) or np.any(high > box[:, 1] + MNI_TOLERANCE_MM):
        extent = ", ".join(f"{c} {lo:.0f}..{hi:.0f}" for c, lo, hi in zip("xyz", low, high))
        mni = ", ".join(f"{c} {lo:.0f}..{hi:.0f}" for c, (lo, hi) in zip("xyz", MNI_BRAIN_BOX_MM))
        reasons.append(
            f"the brain (positive voxels) spans {extent} mm, more than {MNI_TOLERANCE_MM:.0f} mm beyond the MNI152 "
            f"brain ({mni} mm): scanner-space placement, or not skull-stripped"
        )
    centre = (low[0] + high[0]) / 2
    if abs(centre) > MIDLINE_TOLERANCE_MM:
        reasons.append(
            f"the brain is centred at x = {centre:.0f} mm, more than {MIDLINE_TOLERANCE_MM:.0f} mm off the MNI152 "
            "midline (x = 0)"
        )
    width = high[0] - low[0]
    if width < MIN_BRAIN_WIDTH_MM:
        reasons.append(
            f"the brain is {width:.0f} mm wide in x, less than {MIN_BRAIN_WIDTH_MM:.0f} mm (the MNI152 brain: 144 mm; "
            "wrong voxel size in the header, or not a whole brain)"
        )
    return reasons


class CoronalSliced(MapTransform):
    """
    Dictionary-based wrapper of :py:class:`monai_armed.transforms.CoronalSlice`; errors name the file and the key.

    Args:
        keys: keys of the images (channel-first 3D MetaTensors).
        world_coordinate: see ``CoronalSlice``.
        spatial_size: see ``CoronalSlice``.
        spatial_dims: see ``CoronalSlice``.
        num_slices: see ``CoronalSlice``.
        margin: see ``CoronalSlice``.
        lower: see ``CoronalSlice``.
        upper: see ``CoronalSlice``.
        min_size: see ``CoronalSlice``.
        mode: see ``CoronalSlice``.
        require_header_transform: see ``CoronalSlice``.
        isotropic_mm: see ``CoronalSlice``.
        allow_missing_keys: don't raise if a key is missing.

    Example::

        transform = Compose([
            CheckedLoadImaged("image", ensure_channel_first=True),
            CoronalSliced("image", world_coordinate=(32, -6, -26), spatial_size=192),
        ])
        transform({"image": "sub-01.nii.gz", "label": 1, "cluster": "site03"})["image"].shape  # (1, 192, 192)
    """

    backend = CoronalSlice.backend

    def __init__(
        self,
        keys: KeysCollection,
        world_coordinate: Sequence[float] = RIGHT_HIPPOCAMPUS_MNI,
        spatial_size: Sequence[int] | int = 192,
        spatial_dims: int = 2,
        num_slices: int = 16,
        margin: int = 2,
        lower: float = 2.0,
        upper: float = 98.0,
        min_size: int = 32,
        mode: str | None = None,
        require_header_transform: bool = True,
        isotropic_mm: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slicer = CoronalSlice(
            world_coordinate,
            spatial_size,
            spatial_dims,
            num_slices,
            margin,
            lower,
            upper,
            min_size,
            mode,
            require_header_transform,
            isotropic_mm,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.slicer(d[key], key=key)
        return d


CheckedLoadImageD = CheckedLoadImageDict = CheckedLoadImaged
CoronalSliceD = CoronalSliceDict = CoronalSliced
