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

"""Tests of TiffFileReader (monai_armed.data.tiff): layout, metadata, LoadImage integration and errors."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from monai.transforms import LoadImage, LoadImaged

from monai_armed.data.tiff import TiffFileReader, TiffImage, save_tiff

__all__: list[str] = []

DOTTED = "monai_armed.data.tiff.TiffFileReader"


def _pixels(shape, dtype) -> np.ndarray:
    """Distinct values per pixel, so that any transposition or page mix-up shows."""
    values = np.arange(math.prod(shape)).reshape(shape)
    if np.issubdtype(np.dtype(dtype), np.floating):
        return (values / 7.0 - 3.0).astype(dtype)
    return (values % np.iinfo(dtype).max).astype(dtype)


def _read(path, **options):
    reader = TiffFileReader(**options)
    return reader.get_data(reader.read(path))


def _truncated_stack(tmp_path, contiguous: bool) -> str:
    """A 4-page uint8 stack cut in half: tifffile raises on it (contiguous) or reads one page and logs (otherwise)."""
    full = save_tiff(tmp_path / "full.tif", _pixels((4, 32, 32), np.uint8), metadata={} if contiguous else None)
    data = open(full, "rb").read()
    path = tmp_path / "truncated.tif"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7)])
def test_round_trip_reverses_spatial_axes_and_keeps_dtype(tmp_path, dtype, shape):
    original = _pixels(shape, dtype)
    path = save_tiff(tmp_path / "image.tif", original)
    array, meta = _read(path)
    np.testing.assert_array_equal(array, original.T)
    assert array.dtype == np.dtype(dtype) and meta["dtype"] == dtype
    np.testing.assert_array_equal(meta["spatial_shape"], shape[::-1])
    assert math.isnan(meta["original_channel_dim"])
    assert meta["n_pages"] == (shape[0] if len(shape) == 3 else 1)
    assert meta["axes"][:2] == "XY" and meta["filename_or_obj"] == path
    np.testing.assert_array_equal(meta["affine"], np.eye(4))


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7)])
def test_reverse_indexing_false_keeps_tifffile_order(tmp_path, shape):
    original = _pixels(shape, np.uint16)
    array, meta = _read(save_tiff(tmp_path / "image.tif", original), reverse_indexing=False)
    np.testing.assert_array_equal(array, original)
    np.testing.assert_array_equal(meta["spatial_shape"], shape)


def test_load_image_with_reader_object_gives_channel_first_float32(tmp_path):
    original = _pixels((5, 7), np.uint16)
    path = save_tiff(tmp_path / "image.tif", original)
    image = LoadImage(reader=TiffFileReader(channels=1), ensure_channel_first=True)(path)
    assert image.shape == (1, 7, 5) and image.dtype == torch.float32
    np.testing.assert_array_equal(image[0].numpy(), original.T.astype(np.float32))
    assert image.meta["filename_or_obj"] == path and image.meta["dtype"] == "uint16"


def test_load_imaged_with_dotted_path_forwards_reader_arguments(tmp_path):
    path = save_tiff(tmp_path / "image.tif", _pixels((3, 5, 7), np.uint8))
    item = LoadImaged(keys="image", reader=DOTTED, ensure_channel_first=True, dtype=None)({"image": path})
    assert item["image"].shape == (1, 7, 5, 3) and item["image"].dtype == torch.uint8
    strict = LoadImaged(keys="image", reader=DOTTED, dtypes=("uint16",))
    with pytest.raises(ValueError, match=re.escape(f"'{path}' holds uint8 pixels; allowed dtypes are uint16")):
        strict({"image": path})


def test_bundle_config_reader_by_dotted_path(tmp_path):
    path = save_tiff(tmp_path / "image.tif", _pixels((6, 4), np.uint8))
    config = {"load": {"_target_": "LoadImaged", "keys": "image", "reader": DOTTED, "ensure_channel_first": True}}
    load = ConfigParser(config).get_parsed_content("load")
    assert load({"image": path})["image"].shape == (1, 4, 6)


def test_agrees_with_pil_reader_on_the_same_picture(tmp_path):
    from PIL import Image

    original = _pixels((6, 9), np.uint8)
    Image.fromarray(original).save(tmp_path / "image.png")
    tiff = save_tiff(tmp_path / "image.tif", original)
    from_png = LoadImage(reader="PILReader", ensure_channel_first=True)(str(tmp_path / "image.png"))
    from_tiff = LoadImage(reader=TiffFileReader(), ensure_channel_first=True)(tiff)
    assert from_tiff.shape == from_png.shape == (1, 9, 6)
    torch.testing.assert_close(from_tiff.as_tensor(), from_png.as_tensor())
    np.testing.assert_array_equal(from_tiff.meta["spatial_shape"], from_png.meta["spatial_shape"])


def test_rgb_puts_samples_last_and_channel_first_after_load(tmp_path):
    original = _pixels((5, 7, 3), np.uint8)
    path = save_tiff(tmp_path / "rgb.tif", original, photometric="rgb")
    array, meta = _read(path)
    np.testing.assert_array_equal(array, np.transpose(original, (1, 0, 2)))
    assert meta["original_channel_dim"] == -1 and meta["photometric"] == "rgb" and meta["axes"] == "XYS"
    np.testing.assert_array_equal(meta["spatial_shape"], (7, 5))
    assert LoadImage(reader=TiffFileReader(channels=3), ensure_channel_first=True)(path).shape == (3, 7, 5)


def test_rgb_when_grayscale_required_names_the_file(tmp_path):
    path = save_tiff(tmp_path / "rgb.tif", _pixels((5, 7, 3), np.uint8), photometric="rgb")
    message = f"'{path}': expected a grayscale (1-channel) image, got 3 samples per pixel (RGB)"
    with pytest.raises(ValueError, match=re.escape(message)):
        _read(path, channels=1)
    with pytest.raises(ValueError, match=re.escape(message)):  # LoadImage surfaces it, not PILReader's result
        LoadImage(reader=TiffFileReader(channels=1))(path)


def test_grayscale_when_rgb_required(tmp_path):
    path = save_tiff(tmp_path / "gray.tif", _pixels((5, 7), np.uint8))
    with pytest.raises(ValueError, match="expected a 3-channel image, got a grayscale"):
        _read(path, channels=3)


def test_channel_axis_goes_last_and_too_many_spatial_axes_fail(tmp_path):
    path = tmp_path / "channels.ome.tif"
    original = _pixels((2, 5, 7), np.uint16)
    tifffile.imwrite(path, original, ome=True, photometric="minisblack", metadata={"axes": "CYX"})
    array, meta = _read(str(path))
    np.testing.assert_array_equal(array, np.transpose(original, (2, 1, 0)))
    assert meta["original_channel_dim"] == -1 and meta["axes"] == "XYC"
    with pytest.raises(
        ValueError, match=re.escape("expected a grayscale (1-channel) image, got 2 channels (axis 'C')")
    ):
        _read(str(path), channels=1)
    hyperstack = tmp_path / "tzyx.tif"
    tifffile.imwrite(hyperstack, _pixels((2, 3, 5, 7), np.uint16), imagej=True, metadata={"axes": "TZYX"})
    with pytest.raises(ValueError, match=re.escape(f"'{hyperstack}' has 4 spatial axes (axes 'TZYX'); at most 3")):
        _read(str(hyperstack))


def test_spacing_from_resolution_tags_in_millimetres(tmp_path):
    # 20 pixels per cm along X, 40 along Y: 0.5 mm by 0.25 mm pixels
    path = save_tiff(
        tmp_path / "image.tif", _pixels((5, 7), np.uint8), resolution=(20, 40), resolutionunit="CENTIMETER"
    )
    _, meta = _read(path)
    np.testing.assert_allclose(meta["spacing"], [0.5, 0.25])
    np.testing.assert_allclose(meta["pixdim"][1:3], [0.5, 0.25])
    np.testing.assert_allclose(np.diag(meta["affine"]), [0.5, 0.25, 1.0, 1.0])
    assert meta["spacing_unit"] == "mm"
    np.testing.assert_array_equal(meta["spatial_shape"], (7, 5))
    _, numpy_order = _read(path, reverse_indexing=False)
    np.testing.assert_allclose(numpy_order["spacing"], [0.25, 0.5])
    image = LoadImage(reader=TiffFileReader(), ensure_channel_first=True)(path)
    np.testing.assert_allclose(image.pixdim[:2].numpy(), [0.5, 0.25])


def test_spacing_without_unit_is_reported_as_unknown(tmp_path):
    path = save_tiff(tmp_path / "image.tif", _pixels((5, 7), np.uint8), resolution=(2, 4), resolutionunit="NONE")
    _, meta = _read(path)
    np.testing.assert_allclose(meta["spacing"], [0.5, 0.25])
    assert meta["spacing_unit"] == "unknown"


def test_no_resolution_tags_means_unit_spacing(tmp_path):
    from PIL import Image

    path = tmp_path / "no_tags.tif"  # Pillow writes no resolution tags; the TIFF default unit (inch) must not apply
    Image.fromarray(_pixels((5, 7), np.uint8)).save(path)
    array, meta = _read(str(path))
    np.testing.assert_array_equal(array, _pixels((5, 7), np.uint8).T)
    np.testing.assert_array_equal(meta["spacing"], [1.0, 1.0])


def test_imagej_unit_and_slice_spacing(tmp_path):
    path = tmp_path / "stack.tif"
    metadata = {"axes": "ZYX", "spacing": 2.0, "unit": "micron"}
    tifffile.imwrite(path, _pixels((3, 5, 7), np.uint16), imagej=True, resolution=(2, 4), metadata=metadata)
    _, meta = _read(str(path))
    np.testing.assert_allclose(meta["spacing"], [0.5e-3, 0.25e-3, 2e-3])  # X, Y, Z in mm
    assert meta["spacing_unit"] == "mm" and meta["n_pages"] == 3


def test_ome_physical_size(tmp_path):
    path = tmp_path / "stack.ome.tif"
    metadata = {"axes": "ZYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.25, "PhysicalSizeZ": 2.0}
    tifffile.imwrite(path, _pixels((3, 5, 7), np.float32), ome=True, photometric="minisblack", metadata=metadata)
    _, meta = _read(str(path))
    np.testing.assert_allclose(meta["spacing"], [0.5e-3, 0.25e-3, 2e-3])  # µm by default -> mm


def test_pyramid_level_and_missing_level_or_series(tmp_path):
    path = str(tmp_path / "pyramid.tif")
    full = _pixels((16, 12), np.uint16)
    with tifffile.TiffWriter(path) as tif:
        tif.write(full, subifds=1, photometric="minisblack", resolution=(10, 10), resolutionunit="MILLIMETER")
        tif.write(full[::2, ::2], subfiletype=1, photometric="minisblack")
    array, meta = _read(path, level=1)
    np.testing.assert_array_equal(array, full[::2, ::2].T)
    np.testing.assert_allclose(meta["spacing"], [0.2, 0.2])  # 0.1 mm at level 0, downsampled by 2
    with pytest.raises(ValueError, match=re.escape(f"'{path}' series 0 has 2 pyramid level(s); level=2 does not")):
        _read(path, level=2)
    with pytest.raises(ValueError, match=re.escape(f"'{path}' has 1 image series; series=1 does not exist")):
        LoadImage(reader=TiffFileReader(series=1))(path)


def test_several_files_stack_as_channels(tmp_path):
    first = save_tiff(tmp_path / "a.tif", _pixels((5, 7), np.uint8))
    second = save_tiff(tmp_path / "b.tif", _pixels((5, 7), np.uint8)[::-1])
    array, meta = _read([first, second])
    assert array.shape == (2, 7, 5) and meta["original_channel_dim"] == 0
    np.testing.assert_array_equal(array[1], _pixels((5, 7), np.uint8)[::-1].T)
    assert LoadImage(reader=TiffFileReader(), ensure_channel_first=True)([first, second]).shape == (2, 7, 5)
    other = save_tiff(tmp_path / "c.tif", _pixels((5, 8), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"cannot stack '{other}' (spatial shape (8, 5)) with '{first}'")):
        _read([first, other])


def test_disallowed_dtype_names_file_found_and_allowed(tmp_path):
    path = save_tiff(tmp_path / "image.tif", _pixels((5, 7), np.float32))
    with pytest.raises(ValueError, match=re.escape(f"'{path}' holds float32 pixels; allowed dtypes are uint8, uint16")):
        _read(path, dtypes=("uint8", "u2"))
    assert _read(path, dtypes="float32")[0].dtype == np.float32


def test_empty_image_names_the_file(tmp_path):
    path = str(tmp_path / "empty.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns that a zero-size image is nonconformant
        tifffile.imwrite(path, np.zeros((0, 0), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is empty")):
        _read(path)


def test_random_bytes_are_not_a_readable_tiff(tmp_path):
    path = tmp_path / "noise.tif"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is not a readable TIFF file")):
        TiffFileReader().read(str(path))
    # LoadImage tries its other readers and reports them all; our message and the file name are in it
    with pytest.raises(RuntimeError, match=re.escape(f"'{path}' is not a readable TIFF file")):
        LoadImage(reader=TiffFileReader())(str(path))


def _load_one_plane(path) -> torch.Tensor:
    """Load ``path`` as the microscopy bundle does: ``LoadImaged`` with a reader for one grayscale 2D plane."""
    load = LoadImaged(keys="image", reader=TiffFileReader(channels=1, spatial_dims=2), ensure_channel_first=True)
    return load({"image": str(path)})["image"]


@pytest.mark.parametrize("imagej", [False, True])
def test_multi_page_tiff_where_one_plane_is_expected_names_file_and_planes(tmp_path, imagej):
    path = save_tiff(tmp_path / "stack.tif", _pixels((3, 8, 6), np.uint8), metadata={} if imagej else None)
    axes = "QYX" if imagej else "IYX"
    expected = f"'{path}' holds 3 planes (axes '{axes}', shape (3, 8, 6)); expected one 2D plane (spatial_dims=2)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        _load_one_plane(path)
    # without spatial_dims the stack loads as a 3D volume, which 2D transforms would take for a 3-plane image
    assert LoadImage(reader=TiffFileReader(channels=1), image_only=True)(path).shape == (6, 8, 3)
    assert LoadImage(reader=TiffFileReader(spatial_dims=3), image_only=True)(path).shape == (6, 8, 3)


def test_single_plane_passes_spatial_dims_2_and_fails_spatial_dims_3(tmp_path):
    path = save_tiff(tmp_path / "plane.tif", _pixels((8, 6), np.uint8))
    assert _load_one_plane(path).shape == (1, 6, 8)
    rgb = save_tiff(tmp_path / "rgb.tif", _pixels((8, 6, 3), np.uint8), photometric="rgb")
    assert _read(rgb, spatial_dims=2)[0].shape == (6, 8, 3), "samples per pixel are not planes"
    expected = f"'{path}' holds a single 2D plane (axes 'YX', shape (8, 6)); expected a 3D stack of planes"
    with pytest.raises(ValueError, match=re.escape(expected)):
        LoadImage(reader=TiffFileReader(spatial_dims=3))(path)


def test_a_plane_saved_with_a_trailing_length_one_axis_is_a_plane(tmp_path):
    pixels = _pixels((8, 6), np.uint8)
    path = save_tiff(tmp_path / "plane1.tif", pixels[..., None])  # tifffile records axes 'YXQ'
    array, meta = TiffFileReader(spatial_dims=2).get_data(TiffFileReader().read(path))
    assert meta["axes"] == "XY"
    np.testing.assert_array_equal(array, pixels.T)
    assert _load_one_plane(path).shape == (1, 6, 8)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("header_only", b"II*\x00" + bytes(12), "is empty: it holds no images (the file has a TIFF header but is 16 bytes"),
        ("big_endian", b"MM\x00*" + bytes(12), "is empty: it holds no images (the file has a TIFF header but is 16 bytes"),
        ("ifd_past_end", b"II*\x00" + (1000).to_bytes(4, "little") + bytes(8), "is empty: it holds no images"),
        ("empty_ifd", b"II*\x00" + (8).to_bytes(4, "little") + bytes(8), "is empty: its image has shape (0,)"),
        ("random", np.random.default_rng(1).bytes(16), "is not a readable TIFF file"),
    ],
)
def test_sixteen_byte_tiff_names_the_file(tmp_path, name, content, expected):
    path = tmp_path / f"{name}.tif"
    path.write_bytes(content)
    assert len(content) == 16
    # a file with a TIFF header raises ValueError from get_data; random bytes make LoadImage try (and report) its
    # other readers in a RuntimeError
    with pytest.raises((ValueError, RuntimeError)) as error:
        _load_one_plane(path)
    assert f"'{path}' {expected}" in str(error.value)


@pytest.mark.parametrize("contiguous", [True, False])
def test_truncated_tiff_names_the_file_and_is_not_loaded_by_another_reader(tmp_path, contiguous):
    path = _truncated_stack(tmp_path, contiguous)
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is not a readable TIFF file")):
        _read(path)
    # without the deferral to get_data, LoadImage would fall back to PILReader and return page 1 as a 2D image
    with pytest.raises(ValueError, match=re.escape(f"'{path}' is not a readable TIFF file")):
        LoadImage(reader=TiffFileReader())(path)


def test_truncated_stack_partial_read_when_not_strict(tmp_path):
    path = _truncated_stack(tmp_path, contiguous=False)
    array, meta = _read(path, strict=False)
    np.testing.assert_array_equal(array, _pixels((4, 32, 32), np.uint8)[0].T)
    assert meta["n_pages"] == 1


def test_missing_file_and_folder(tmp_path):
    missing = str(tmp_path / "missing.tif")
    with pytest.raises(FileNotFoundError, match=re.escape(f"TIFF file not found: '{missing}'")):
        TiffFileReader().read(missing)
    with pytest.raises(RuntimeError, match=re.escape(f"TIFF file not found: '{missing}'")):
        LoadImage(reader=TiffFileReader())(missing)
    folder = tmp_path / "folder.tif"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder, not a TIFF file"):
        TiffFileReader().read(str(folder))


@pytest.mark.parametrize(
    "names, expected",
    [
        ("a.tif", True),
        ("A.TIFF", True),
        ("scan.ome.tif", True),
        ("scan.ome.tiff", True),
        (["a.tif", "b.tiff"], True),
        (["a.tif", "b.png"], False),
        ("a.tiff.gz", False),
        ("a.png", False),
        ("tif", False),
    ],
)
def test_verify_suffix(names, expected):
    assert TiffFileReader().verify_suffix(names) is expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"channels": 0}, "channels must be a positive int or None, got 0"),
        ({"series": -1}, "series must be an int >= 0, got -1"),
        ({"spatial_dims": 1}, "spatial_dims must be 2, 3 or None, got 1"),
        ({"spatial_dims": True}, "spatial_dims must be 2, 3 or None, got True"),
        ({"dtypes": ("uint8", "pixels")}, "dtypes entry 'pixels' is not a numpy dtype name"),
        ({"not_an_option": True}, "tifffile.TiffFile takes no argument(s) ['not_an_option']"),
    ],
)
def test_invalid_options(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TiffFileReader(**options)


def test_read_returns_tiff_image_with_tifffile_axes(tmp_path):
    path = save_tiff(tmp_path / "stack.tif", _pixels((3, 5, 7), np.uint8), metadata=None)
    image = TiffFileReader().read(path)
    assert isinstance(image, TiffImage) and image.axes == "IYX" and image.error is None
    assert [type(i) for i in TiffFileReader().read([path, path])] == [TiffImage, TiffImage]


def test_save_tiff_is_atomic_and_creates_folders(tmp_path):
    path = tmp_path / "sub" / "image.tif"
    assert save_tiff(path, torch.arange(6, dtype=torch.uint8).reshape(2, 3)) == str(path)
    with pytest.raises(KeyError):
        save_tiff(path, np.array([[object()]]))  # tifffile has no TIFF sample format for Python objects
    np.testing.assert_array_equal(tifffile.imread(path), np.arange(6).reshape(2, 3))  # the old file survives
    assert [p.name for p in path.parent.iterdir()] == ["image.tif"]  # no temporary file left behind
