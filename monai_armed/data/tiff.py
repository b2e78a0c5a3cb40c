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

"""A MONAI ``ImageReader`` for TIFF files built on tifffile, and an atomic TIFF writer.

MONAI 1.6.1 reads TIFF only through ITK or Pillow (or, for RGB whole-slide images, ``WSIReader``).
:class:`TiffFileReader` reads grayscale and RGB images, multi-page stacks and pyramid levels with tifffile alone, and
returns them in the layout MONAI's other readers use, so that ``LoadImage(d)`` and ``EnsureChannelFirst(d)`` work.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
import uuid
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.utils import MetaKeys, OptionalImportError, SpaceKeys, ensure_tuple, optional_import

tifffile, has_tifffile = optional_import("tifffile")

__all__ = ["TIFF_SUFFIXES", "TiffFileReader", "TiffImage", "save_tiff"]

TIFF_SUFFIXES: tuple[str, ...] = (".tif", ".tiff")
"""File name endings :meth:`TiffFileReader.verify_suffix` accepts (compared case-insensitively; covers ``.ome.tif``)."""

# Millimetres per unit, for the TIFF ResolutionUnit tag (2 inch, 3 cm, and tifffile's 4 mm, 5 µm) ...
_MM_PER_RESOLUTION_UNIT = {2: 25.4, 3: 10.0, 4: 1.0, 5: 1e-3}
# ... and for the unit strings of ImageJ descriptions and OME-XML PhysicalSize*Unit attributes.
_MM_PER_UNIT_NAME = {
    "inch": 25.4,
    "in": 25.4,
    "m": 1000.0,
    "meter": 1000.0,
    "metre": 1000.0,
    "cm": 10.0,
    "centimeter": 10.0,
    "centimetre": 10.0,
    "mm": 1.0,
    "millimeter": 1.0,
    "millimetre": 1.0,
    "µm": 1e-3,
    "um": 1e-3,
    "micron": 1e-3,
    "microns": 1e-3,
    "micrometer": 1e-3,
    "micrometre": 1e-3,
    "nm": 1e-6,
    "nanometer": 1e-6,
    "nanometre": 1e-6,
}
_CHANNEL_AXES = "SC"  # tifffile axis codes: S = samples per pixel (RGB), C = channel planes (OME, ImageJ)


@dataclass
class TiffImage:
    """One image series read by :meth:`TiffFileReader.read`: the pixels as tifffile returns them, plus metadata.

    Attributes:
        filename: the path it was read from.
        array: the pixel array in tifffile's order (planes first, then Y, X, then samples), e.g. ``(Z, Y, X)``.
        axes: tifffile's axis code per axis of ``array``, e.g. ``"YX"``, ``"ZYX"``, ``"IYX"``, ``"YXS"``.
        spacing: the pixel size found in the file per spatial axis code (``"X"``, ``"Y"``, ``"Z"``); axes without
            one are absent and count as 1.
        spacing_unit: ``"mm"`` when ``spacing`` was converted to millimetres, ``"unknown"`` when the file names no
            physical unit (``spacing`` then holds 1 / resolution as stored).
        photometric: the TIFF photometric interpretation in lower case, e.g. ``"minisblack"`` or ``"rgb"``.
        series: the index of the tifffile series read.
        level: the pyramid level read (0 is full resolution).
        error: the problem found after the file opened as a TIFF (undecodable or truncated data, a missing
            series / level), which :meth:`TiffFileReader.get_data` raises; None when the image is complete.

    Example::

        image = TiffFileReader().read("cell.tif")
        print(image.axes, image.array.shape, image.spacing)
    """

    filename: str
    array: np.ndarray
    axes: str
    spacing: dict[str, float] = field(default_factory=dict)
    spacing_unit: str = "unknown"
    photometric: str = "minisblack"
    series: int = 0
    level: int = 0
    error: Exception | None = None


class _FileSelectionError(ValueError):
    """A readable TIFF that lacks the requested series / level, or has no image: not reported as unreadable."""


class TiffFileReader(ImageReader):
    """Load TIFF files (grayscale or RGB, single page or multi-page stacks, pyramid levels) with tifffile.

    Axis order follows MONAI's ``PILReader`` and ``ITKReader``: with ``reverse_indexing=True`` (the default) the
    spatial axes are reversed, so a 2D TIFF stored as ``(H, W)`` loads as ``(W, H)``, exactly as ``PILReader`` loads
    the same picture from a PNG, and a stack ``(Z, Y, X)`` loads as ``(X, Y, Z)`` like a NIfTI volume. Samples per
    pixel (RGB) or a channel axis always go last, and ``original_channel_dim`` is ``-1``; for grayscale it is
    ``float("nan")`` (MONAI 1.6.1's "no channel"), so ``LoadImage(..., ensure_channel_first=True)`` gives
    ``(1, W, H)`` / ``(1, X, Y, Z)`` for grayscale and ``(3, W, H)`` for RGB. A list of files is stacked on a new
    leading channel axis (grayscale) or concatenated along the channel axis (RGB), as MONAI's readers do.

    Pixels keep their stored dtype (uint8, uint16, int16, float32, ...); ``LoadImage`` converts them (to float32 by
    default) without rescaling, so scale intensities in the pipeline, e.g. with ``ScaleIntensityRanged``.

    The meta dict from :meth:`get_data` holds ``spatial_shape``, ``original_channel_dim``, ``affine`` and
    ``original_affine`` (4x4, diagonal pixel sizes), ``spacing`` (per spatial axis, in output order), ``pixdim``
    (NIfTI layout: ``[1, sx, sy, sz, 1, 1, 1, 1]``), ``spacing_unit`` (``"mm"`` or ``"unknown"``), ``space``,
    ``dtype`` (the stored dtype's name), ``n_pages`` (2D planes in the series read), ``axes`` (tifffile codes in
    output order, e.g. ``"XY"``, ``"XYS"``), ``photometric``, ``series``, ``level`` and ``filename_or_obj``.
    Pixel sizes come from OME-XML ``PhysicalSize{X,Y,Z}``, else ImageJ ``unit`` / ``spacing`` with the resolution
    tags, else the ``XResolution`` / ``YResolution`` / ``ResolutionUnit`` tags, converted to millimetres when the
    file names a unit; pyramid levels scale them by the level's downsampling.

    Errors name the file. :meth:`read` raises when a file cannot be opened as a TIFF (missing, a folder, another
    format, a corrupt header); ``LoadImage`` then tries its other readers and reports them all in one
    ``RuntimeError``. Problems found once the file is open as a TIFF (data that cannot be decoded, a truncated file,
    a missing series / level, a file that holds no image, such as a 16-byte file with a TIFF header and nothing else)
    and the checks of ``channels`` / ``dtypes`` / ``spatial_dims`` / emptiness are raised as ``ValueError`` by
    :meth:`get_data`, which ``LoadImage`` does not catch: otherwise it would fall back to ``PILReader``, which silently
    loads only the first page of a broken stack or of a multi-page file.

    By default any number of planes is read (a multi-page file loads as a 3D stack). A pipeline built for 2D images
    should pass ``spatial_dims=2``: a multi-page TIFF then raises, naming the file, the number of planes found and
    the shape, instead of flowing on as a 3D volume into 2D transforms.

    Args:
        channels: the number of channels (samples per pixel) every image must have, e.g. 1 to require grayscale;
            None accepts any.
        dtypes: the stored dtypes allowed, e.g. ``("uint8", "uint16")``; None accepts any.
        spatial_dims: the number of spatial axes every image must have: 2 for one 2D plane per file (a multi-page
            stack is an error), 3 for a stack of planes (a single plane is an error); None (default) accepts 2 or 3.
        series: which tifffile series (image) of the file to read.
        level: which pyramid level of that series to read; 0 is full resolution.
        reverse_indexing: reverse the spatial axes (``(H, W)`` -> ``(W, H)``) to match MONAI's other readers; False
            keeps tifffile's numpy order.
        strict: treat errors that tifffile logs while reading (a broken chain of pages, a stack that fails to
            reshape: the signs of a truncated file, which tifffile otherwise reads partially) as an unreadable file.
            False accepts whatever tifffile could read.
        kwargs: keyword arguments for ``tifffile.TiffFile``, e.g. ``is_ome=False``.

    Raises:
        ValueError: for an invalid option or an argument ``tifffile.TiffFile`` does not take.

    Example::

        from monai.transforms import LoadImaged

        reader = TiffFileReader(channels=1, dtypes=("uint8",), spatial_dims=2)
        load = LoadImaged(keys="image", reader=reader, ensure_channel_first=True)
        image = load({"image": "cell_0001.tif"})["image"]  # MetaTensor (1, W, H), float32
        # equivalently, by name (also from a bundle config): LoadImaged(keys="image", ensure_channel_first=True,
        #     reader="monai_armed.data.tiff.TiffFileReader", channels=1, spatial_dims=2)
    """

    def __init__(
        self,
        channels: int | None = None,
        dtypes: Sequence[str] | str | None = None,
        spatial_dims: int | None = None,
        series: int = 0,
        level: int = 0,
        reverse_indexing: bool = True,
        strict: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # Bad options raise ValueError, not TypeError: LoadImage swallows a TypeError from a reader's constructor
        # and silently builds the reader with default arguments instead.
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"TiffFileReader: channels must be a positive int or None, got {channels!r}.")
        if spatial_dims is not None and (isinstance(spatial_dims, bool) or spatial_dims not in (2, 3)):
            raise ValueError(f"TiffFileReader: spatial_dims must be 2, 3 or None, got {spatial_dims!r}.")
        for name, value in (("series", series), ("level", level)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TiffFileReader: {name} must be an int >= 0, got {value!r}.")
        _check_tifffile_kwargs(kwargs)
        self.channels = channels
        self.dtypes = None if dtypes is None else tuple(_dtype_name(d) for d in ensure_tuple(dtypes))
        self.spatial_dims = spatial_dims
        self.series = series
        self.level = level
        self.reverse_indexing = reverse_indexing
        self.strict = strict
        self.kwargs = kwargs

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        """Whether every file name ends in ``.tif`` or ``.tiff`` (any case) and tifffile is installed.

        Args:
            filename: a file name or a sequence of file names.

        Returns:
            True when this reader can be chosen for the file(s) by suffix.

        Example::

            TiffFileReader().verify_suffix("a.OME.TIFF")  # True
        """
        names = ensure_tuple(filename)
        return has_tifffile and len(names) > 0 and all(f"{n}".lower().endswith(TIFF_SUFFIXES) for n in names)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> TiffImage | list[TiffImage]:
        """Read the pixels and metadata of one TIFF file or several.

        Args:
            data: a file name or a sequence of file names.
            kwargs: keyword arguments for ``tifffile.TiffFile``, overriding those given to the constructor.

        Returns:
            A :class:`TiffImage`, or a list of them for several files.

        Raises:
            FileNotFoundError: a file does not exist.
            ValueError: a file is a folder or cannot be opened as a TIFF (another format, a corrupt header); the
                message names the file. Later problems are kept in :attr:`TiffImage.error` for :meth:`get_data`.
            OptionalImportError: tifffile is not installed.

        Example::

            image = TiffFileReader().read("stack.tif")
        """
        if not has_tifffile:
            raise OptionalImportError("TiffFileReader needs the 'tifffile' package (pip install tifffile).")
        _check_tifffile_kwargs(kwargs)
        options = {**self.kwargs, **kwargs}
        images = [self._read_file(os.fspath(name), options) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img: TiffImage | Sequence[TiffImage]) -> tuple[np.ndarray, dict]:
        """Check the image(s) against ``channels`` / ``dtypes`` and return the array and meta dict MONAI expects.

        Args:
            img: a :class:`TiffImage` from :meth:`read`, or a sequence of them (stacked as channels).

        Returns:
            The array (spatial axes first, channel axis last if any) and its meta dict.

        Raises:
            ValueError: an image could not be read in full (:attr:`TiffImage.error`: undecodable or truncated data,
                a missing series / level, no image in the file), is empty, has another number of channels than
                ``channels``, a dtype not in ``dtypes``, another number of spatial axes than ``spatial_dims`` (e.g. a
                multi-page stack where one plane is expected), more than 3 spatial axes, or (several files) another
                shape or pixel size than the first; the message names the file.

        Example::

            reader = TiffFileReader()
            array, meta = reader.get_data(reader.read("cell.tif"))
        """
        images = [img] if isinstance(img, TiffImage) else list(img)
        if not images:
            raise ValueError("TiffFileReader.get_data: got no images.")
        for image in images:
            if image.error is not None:
                raise image.error
        arrays, metas = zip(*(self._to_monai_layout(image) for image in images))
        meta = metas[0]
        for image, other in zip(images[1:], metas[1:]):
            _check_stackable(images[0].filename, meta, image.filename, other)
        if len(arrays) == 1:
            return arrays[0], meta
        if np.isnan(meta[MetaKeys.ORIGINAL_CHANNEL_DIM]):
            meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
            return np.stack(arrays, axis=0), meta
        return np.concatenate(arrays, axis=-1), meta

    def _read_file(self, name: str, options: dict[str, Any]) -> TiffImage:
        """Read one file; failures before the file is known to be a TIFF raise, later ones are stored (see class)."""
        if not os.path.exists(name):
            raise FileNotFoundError(f"TIFF file not found: '{name}'.")
        if os.path.isdir(name):
            raise ValueError(f"'{name}' is a folder, not a TIFF file.")
        with _tifffile_errors_logged() as logged:
            try:
                tif = tifffile.TiffFile(name, **options)
            except MemoryError:
                raise
            except Exception as e:
                raise _unreadable(name, e) from e
            # The file is a TIFF from here on, so problems are raised by get_data: raised here, they would make
            # LoadImage fall back to its other readers, and PILReader would silently load page 1 of a broken stack.
            try:
                with tif:
                    image = self._read_series(tif, name)
            except MemoryError:
                raise
            except _FileSelectionError as e:
                return TiffImage(name, np.empty(0), "", error=e)
            except Exception as e:
                return TiffImage(name, np.empty(0), "", error=_unreadable(name, e))
        if logged and self.strict:
            image.error = ValueError(
                f"'{name}' is not a readable TIFF file: tifffile reported '{logged[0]}' (truncated or corrupt?). "
                "Pass strict=False to TiffFileReader to accept what could be read."
            )
        return image

    def _read_series(self, tif: Any, name: str) -> TiffImage:
        """Read the chosen series and level of an open ``tifffile.TiffFile``."""
        n_series = len(tif.series)
        if n_series == 0:
            size = os.path.getsize(name)
            raise _FileSelectionError(
                f"'{name}' is empty: it holds no images (the file has a TIFF header but is {size} bytes long; "
                "truncated, or not written completely?)."
            )
        if self.series >= n_series:
            raise _FileSelectionError(f"'{name}' has {n_series} image series; series={self.series} does not exist.")
        series = tif.series[self.series]
        levels = series.levels
        if self.level >= len(levels):
            raise _FileSelectionError(
                f"'{name}' series {self.series} has {len(levels)} pyramid level(s); level={self.level} does not exist."
            )
        chosen = levels[self.level]
        array = np.asarray(chosen.asarray())
        axes = chosen.axes if len(chosen.axes) == array.ndim else "Q" * (array.ndim - 2) + "YX"
        spacing, unit = _physical_spacing(tif, levels[0].keyframe, name, self.series)
        if self.level > 0:  # sizes in the metadata are those of level 0
            for code, full, reduced in zip(levels[0].axes, levels[0].shape, chosen.shape):
                if code in spacing and reduced > 0:
                    spacing[code] *= full / reduced
        photometric = getattr(chosen.keyframe.photometric, "name", str(chosen.keyframe.photometric)).lower()
        return TiffImage(name, array, axes, spacing, unit, photometric, self.series, self.level)

    def _to_monai_layout(self, image: TiffImage) -> tuple[np.ndarray, dict]:
        """Validate one image and move its axes into MONAI's order; returns the array and its meta dict."""
        name, array, axes = image.filename, image.array, image.axes
        if array.size == 0:
            raise ValueError(f"'{name}' is empty: its image has shape {tuple(array.shape)}.")
        # tifffile names a length-1 axis of the shape it recorded 'Q' (an (H, W, 1) plane is 'YXQ'): not a plane axis
        singleton = [i for i, code in enumerate(axes) if code == "Q" and array.shape[i] == 1]
        if singleton and array.ndim - len(singleton) >= 2:
            array = np.squeeze(array, axis=tuple(singleton))
            axes = "".join(code for i, code in enumerate(axes) if i not in singleton)
        dtype = array.dtype.name
        if self.dtypes is not None and dtype not in self.dtypes:
            raise ValueError(f"'{name}' holds {dtype} pixels; allowed dtypes are {', '.join(self.dtypes)}.")
        channel_axes = [i for i, code in enumerate(axes) if code in _CHANNEL_AXES]
        if len(channel_axes) > 1:
            raise ValueError(f"'{name}' has more than one channel axis (axes '{axes}'); expected at most one.")
        n_channels = array.shape[channel_axes[0]] if channel_axes else 1
        if self.channels is not None and n_channels != self.channels:
            raise ValueError(f"'{name}': {_channel_mismatch(self.channels, n_channels, axes, image.photometric)}.")
        spatial = [i for i in range(array.ndim) if i not in channel_axes]
        if self.spatial_dims is not None and len(spatial) != self.spatial_dims:
            raise ValueError(f"'{name}' {_spatial_mismatch(self.spatial_dims, array.shape, axes, spatial)}.")
        if len(spatial) > 3:
            raise ValueError(
                f"'{name}' has {len(spatial)} spatial axes (axes '{axes}'); at most 3 are supported, "
                "choose another series / level or reduce the file."
            )
        if self.reverse_indexing:
            spatial = spatial[::-1]
        array = np.transpose(array, spatial + channel_axes)
        if not array.dtype.isnative:
            array = array.astype(array.dtype.newbyteorder("="))
        out_axes = "".join(axes[i] for i in spatial + channel_axes)
        return array, _meta_dict(image, array, out_axes, n_spatial=len(spatial))


def _meta_dict(image: TiffImage, array: np.ndarray, axes: str, n_spatial: int) -> dict:
    """MONAI's meta dict for ``array``, the pixels of ``image`` moved to the axis order ``axes``."""
    spacing = np.asarray([image.spacing.get(code, 1.0) for code in axes[:n_spatial]], dtype=np.float64)
    affine = np.eye(4)
    affine[range(n_spatial), range(n_spatial)] = spacing
    pixdim = np.ones(8)  # NIfTI layout, which MONAI's inverse transforms update in place: [qfac, sx, sy, sz, ...]
    pixdim[1 : 1 + n_spatial] = spacing
    return {
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:n_spatial]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if array.ndim == n_spatial else -1,
        MetaKeys.AFFINE: affine,
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.PIXDIM: pixdim,
        MetaKeys.ORIGINAL_PIXDIM: pixdim.copy(),
        "spacing": spacing,
        "spacing_unit": image.spacing_unit,
        "dtype": image.array.dtype.name,
        "n_pages": int(np.prod([array.shape[k] for k, code in enumerate(axes) if code not in "YX" + _CHANNEL_AXES])),
        "axes": axes,
        "photometric": image.photometric,
        "series": image.series,
        "level": image.level,
        "filename_or_obj": image.filename,
    }


def save_tiff(path: PathLike, array: Any, **kwargs: Any) -> str:
    """Write an array to a TIFF file atomically (a temporary file beside ``path``, then ``os.replace``).

    The array is written in numpy order as tifffile expects, ``(Y, X)``, ``(Z, Y, X)`` or ``(Y, X, 3)`` with
    ``photometric="rgb"``; :class:`TiffFileReader` reads it back transposed (``reverse_indexing=True``) or unchanged
    (``reverse_indexing=False``). Grayscale is the default (``photometric="minisblack"``), so a stack whose last axis
    has 3 or 4 entries is not mistaken for RGB. Parent folders are created; on error ``path`` is left as it was.

    Args:
        path: the TIFF file to write.
        array: the pixels (a numpy array, or anything ``np.asarray`` accepts, e.g. a CPU tensor).
        kwargs: keyword arguments for ``tifffile.imwrite``, e.g. ``photometric="rgb"``,
            ``resolution=(px_per_mm, px_per_mm), resolutionunit="MILLIMETER"`` or ``compression="zlib"``.

    Returns:
        ``path`` as a string.

    Raises:
        OptionalImportError: tifffile is not installed.

    Example::

        save_tiff("data/cell_0001.tif", (np.random.rand(256, 256) * 255).astype(np.uint8))
    """
    if not has_tifffile:
        raise OptionalImportError("save_tiff needs the 'tifffile' package (pip install tifffile).")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temporary name keeps the suffix, as tifffile picks OME / ImageJ output from it (".ome.tif")
    tmp = path.with_name(f".{uuid.uuid4().hex}.{path.name}")
    kwargs.setdefault("photometric", "minisblack")
    try:
        tifffile.imwrite(tmp, np.asarray(array), **kwargs)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return str(path)


def _unreadable(name: str, cause: BaseException) -> ValueError:
    """The error for a file tifffile cannot read, naming the file and tifffile's reason."""
    error = ValueError(f"'{name}' is not a readable TIFF file ({type(cause).__name__}: {cause}).")
    error.__cause__ = cause
    return error


def _check_tifffile_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise ValueError for a keyword that ``tifffile.TiffFile`` does not take (checked only when it is installed)."""
    if not kwargs or not has_tifffile:
        return
    accepted = {p.name for p in inspect.signature(tifffile.TiffFile).parameters.values() if p.kind == p.KEYWORD_ONLY}
    unknown = [k for k in kwargs if k not in accepted and not k.startswith("is_")]
    if unknown:
        raise ValueError(
            f"TiffFileReader: tifffile.TiffFile takes no argument(s) {unknown}; accepted: {sorted(accepted)} and is_* flags."
        )


def _dtype_name(dtype: Any) -> str:
    """The canonical numpy name of ``dtype`` (``"u2"`` -> ``"uint16"``), or a ValueError naming the bad entry."""
    try:
        return np.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"TiffFileReader: dtypes entry {dtype!r} is not a numpy dtype name such as 'uint8'.") from e


def _channel_mismatch(expected: int, found: int, axes: str, photometric: str) -> str:
    """Explain that an image has ``found`` channels where ``expected`` were required."""
    want = "a grayscale (1-channel) image" if expected == 1 else f"a {expected}-channel image"
    if found == 1:
        got = "a grayscale (1-channel) image"
    elif "S" in axes:
        got = f"{found} samples per pixel ({photometric.upper()})"
    else:
        got = f"{found} channels (axis 'C')"
    return f"expected {want}, got {got}"


def _spatial_mismatch(expected: int, shape: tuple[int, ...], axes: str, spatial: list[int]) -> str:
    """Explain that an image of ``shape`` (tifffile ``axes``) has other spatial axes than ``expected`` (2 or 3)."""
    planes = math.prod(shape[i] for i in spatial if axes[i] not in "YX")
    found = f"(axes '{axes}', shape {tuple(shape)})"
    if expected == 2:
        return (
            f"holds {planes} planes {found}; expected one 2D plane (spatial_dims=2). Save each plane as its own file, "
            "or read the file as a stack with spatial_dims=3"
        )
    if len(spatial) == 2:
        return f"holds a single 2D plane {found}; expected a 3D stack of planes (spatial_dims=3)"
    return f"has {len(spatial)} spatial axes {found}; expected 3 (spatial_dims=3)"


def _check_stackable(first_name: str, first: dict, name: str, meta: dict) -> None:
    """Raise ValueError unless two images can be stacked as channels: same shape, pixel size and channel layout."""
    shape_a, shape_b = first[MetaKeys.SPATIAL_SHAPE], meta[MetaKeys.SPATIAL_SHAPE]
    if len(shape_a) != len(shape_b) or not np.array_equal(shape_a, shape_b):
        raise ValueError(
            f"cannot stack '{name}' (spatial shape {tuple(shape_b.tolist())}) with '{first_name}' "
            f"({tuple(shape_a.tolist())})."
        )
    if not np.allclose(first[MetaKeys.AFFINE], meta[MetaKeys.AFFINE]):
        raise ValueError(
            f"cannot stack '{name}' (spacing {meta['spacing'].tolist()}) with '{first_name}' "
            f"({first['spacing'].tolist()}): pixel sizes differ."
        )
    if np.isnan(first[MetaKeys.ORIGINAL_CHANNEL_DIM]) != np.isnan(meta[MetaKeys.ORIGINAL_CHANNEL_DIM]):
        raise ValueError(f"cannot stack '{name}' with '{first_name}': one is grayscale, the other has channels.")


def _physical_spacing(tif: Any, page: Any, name: str, series: int) -> tuple[dict[str, float], str]:
    """Pixel size per axis code from OME-XML, ImageJ metadata or the resolution tags of ``page``, in mm if known.

    Returns:
        ``(spacing, unit)`` where ``unit`` is ``"mm"``, or ``"unknown"`` when some size has no physical unit (the
        sizes are then as stored, 1 / resolution).
    """
    # (size, mm per unit or None) per axis code
    sizes: dict[str, tuple[float, float | None]] = {}
    x_res, y_res = page.resolution
    tag_unit = _MM_PER_RESOLUTION_UNIT.get(int(page.resolutionunit))
    imagej = tif.imagej_metadata or {}
    if tag_unit is None and "unit" in imagej:  # ImageJ stores resolution per its own unit, with ResolutionUnit NONE
        tag_unit = _mm_per_unit(imagej["unit"])
    for code, resolution in (("X", x_res), ("Y", y_res)):
        # tifffile reports 1 pixel per inch when the tag is absent (the TIFF default), which is no information
        if f"{code}Resolution" in page.tags and resolution > 0:
            sizes[code] = (1.0 / resolution, tag_unit)
    if imagej.get("spacing"):
        sizes["Z"] = (float(imagej["spacing"]), _mm_per_unit(imagej.get("unit", "")))
    if tif.is_ome and tif.ome_metadata:
        sizes.update(_ome_physical_sizes(tif.ome_metadata, name, series))
    if all(unit is not None for _, unit in sizes.values()):
        return {code: size * unit for code, (size, unit) in sizes.items()}, "mm"
    return {code: size for code, (size, _) in sizes.items()}, "unknown"


def _ome_physical_sizes(ome_xml: str, name: str, series: int) -> dict[str, tuple[float, float | None]]:
    """``PhysicalSize{X,Y,Z}`` of the ``series``-th OME ``Pixels`` element, with mm per unit (default µm)."""
    try:
        root = ElementTree.fromstring(ome_xml)
    except ElementTree.ParseError as e:
        warnings.warn(f"'{name}': ignoring unparsable OME-XML metadata ({e}); pixel sizes come from the TIFF tags.")
        return {}
    pixels = [element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"]
    if series >= len(pixels):
        return {}
    attributes = pixels[series].attrib
    sizes = {}
    for code in "XYZ":
        value = attributes.get(f"PhysicalSize{code}")
        try:
            size = float(value) if value is not None else 0.0
        except ValueError:
            continue
        if size > 0:
            sizes[code] = (size, _mm_per_unit(attributes.get(f"PhysicalSize{code}Unit", "µm")))
    return sizes


def _mm_per_unit(unit: str) -> float | None:
    """Millimetres per ``unit`` (``"micron"``, ``"µm"``, ``"\\u00B5m"``, ``"cm"``, ...), or None if unknown."""
    key = f"{unit}".strip().lower().replace("\\u00b5", "µ").replace("\u03bc", "µ")
    return _MM_PER_UNIT_NAME.get(key)


class _ErrorRecords(logging.Handler):
    """Collects the messages of ERROR records emitted by the current thread."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextmanager
def _tifffile_errors_logged() -> Iterator[list[str]]:
    """Yield a list that fills with the errors tifffile logs (not raises) in this thread, e.g. for truncated files."""
    logger = logging.getLogger("tifffile")
    handler = _ErrorRecords()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
