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
    Transform,
)
from monai.utils import TransformBackends, ensure_tuple_rep

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

RIGHT_HIPPOCAMPUS_MNI = (32.0, -6.0, -26.0)


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
    chained to the original exception. Arguments are those of ``LoadImage``.

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
            return super().__call__(filename, reader)
        except Exception as err:
            raise RuntimeError(
                f"could not read {_where(filename, key)}: {type(err).__name__}: {err}. Expected a complete, readable "
                "image file (e.g. NIfTI .nii / .nii.gz); the file may be truncated or corrupt."
            ) from err


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
    storage orientation works. The brain is the positive voxels (skull-stripped images). The 2D output (1, H, W)
    has rows running superior to inferior and columns in increasing RAS x (patient left to right), so it shows as
    the familiar coronal view. With ``spatial_dims=3`` the output is the slab of ``num_slices`` coronal slices
    around the coordinate, (1, H, W, num_slices) with the last axis posterior to anterior, cropped and resized in
    plane only. The output is a ``MetaTensor`` carrying ``filename_or_obj`` and the RAS slice index
    (``coronal_index``).

    Bad input raises ``TypeError`` / ``ValueError`` naming the file (the ``filename_or_obj`` metadata) and what was
    expected: a 4D or multi-channel image, a missing (qform and sform codes 0), singular or non-finite affine, a
    coordinate or slab outside the field of view, an empty slice, or a brain smaller than ``min_size`` pixels.

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
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (a slice) or 3 (a slab), got {spatial_dims}.")
        if len(world_coordinate) != 3:
            raise ValueError(f"world_coordinate must be (x, y, z) in mm, got {world_coordinate}.")
        if num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {num_slices}.")
        self.world_coordinate = tuple(float(c) for c in world_coordinate)
        self.spatial_size = ensure_tuple_rep(spatial_size, 2)
        self.spatial_dims = spatial_dims
        self.num_slices = num_slices if spatial_dims == 3 else 1
        self.min_size = min_size
        self.require_header_transform = require_header_transform
        self.mode = mode or ("bilinear" if spatial_dims == 2 else "trilinear")
        self.orient = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))
        self.crop = CropForeground(margin=margin, allow_smaller=True)
        self.scale = ScaleIntensityRangePercentiles(lower, upper, b_min=0.0, b_max=1.0, clip=True)

    def __call__(self, img: torch.Tensor, key: Hashable | None = None) -> MetaTensor:
        """Slice, crop, square, resize and scale ``img`` (1, X, Y, Z); ``key`` only enters error messages."""
        source = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
        where = _where(source, key)
        self._check_volume(img, where)
        ras = self.orient(img)
        index, first = self._slab_start(ras, where)
        slab = ras.as_tensor()[:, :, first : first + self.num_slices, :].float()
        # (C, X, D, Z) -> (C, Z, X, D), superior row first
        planes = slab.permute(0, 3, 1, 2).flip(1)
        if self.spatial_dims == 2:
            planes = planes[..., 0]
        if not bool((planes > 0).any()):
            raise ValueError(
                f"{where}: the coronal slice through y = {self.world_coordinate[1]} mm has no positive voxel; "
                "expected a skull-stripped brain image with the brain at that position."
            )
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
            if rank > 3 and int(np.prod(dim[4 : rank + 1])) > 1:
                raise ValueError(
                    f"{where}: expected a 3D volume, got a {rank}D image of shape {tuple(dim[1 : rank + 1].tolist())}; "
                    "select one volume first."
                )
        if img.ndim != 4 or img.shape[0] != 1:
            raise ValueError(
                f"{where}: expected a channel-first single-channel 3D volume (1, X, Y, Z), got shape "
                f"{tuple(img.shape)}; load with ensure_channel_first=True (4D images are not supported)."
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

    def _slab_start(self, ras: MetaTensor, where: str) -> tuple[int, int]:
        """RAS voxel index of the coronal plane and the first slice of the slab; errors if outside the image."""
        shape = np.asarray(ras.shape[1:])
        voxel = np.linalg.solve(np.asarray(ras.affine, dtype=np.float64), [*self.world_coordinate, 1.0])[:3]
        rounded = np.rint(voxel).astype(int)
        if np.any(rounded < 0) or np.any(rounded >= shape):
            lo = np.asarray(ras.affine)[:3] @ np.array([0, 0, 0, 1.0])
            hi = np.asarray(ras.affine)[:3] @ np.array([*(shape - 1), 1.0])
            raise ValueError(
                f"{where}: world coordinate {self.world_coordinate} mm maps to voxel {np.round(voxel, 1).tolist()}, "
                f"outside the image of shape {tuple(shape.tolist())} (RAS), which spans {np.round(lo, 1).tolist()} "
                f"to {np.round(hi, 1).tolist()} mm; expected an image whose field of view contains the coordinate."
            )
        first = int(rounded[1]) - self.num_slices // 2
        if first < 0 or first + self.num_slices > shape[1]:
            raise ValueError(
                f"{where}: the slab of {self.num_slices} coronal slices around index {rounded[1]} needs slices "
                f"{first} to {first + self.num_slices - 1}, but the image has {shape[1]}; expected an image at least "
                f"that thick around the coordinate (or fewer num_slices)."
            )
        return int(rounded[1]), first


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
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.slicer(d[key], key=key)
        return d


CheckedLoadImageD = CheckedLoadImageDict = CheckedLoadImaged
CoronalSliceD = CoronalSliceDict = CoronalSliced
