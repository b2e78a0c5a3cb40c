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

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from monai_armed.data import make_mri_sites, simulate_mri_image
from monai_armed.transforms import CheckedLoadImage, CheckedLoadImaged, CoronalSlice, CoronalSliced


def _pipeline(**kwargs) -> Callable[[dict], dict]:
    """Load then slice, without Compose (which wraps every error in "applying transform ...")."""
    load, slicer = CheckedLoadImaged("image", ensure_channel_first=True), CoronalSliced("image", **kwargs)
    return lambda item: slicer(load(item))


def _save(data: np.ndarray, path: Path, affine: np.ndarray | None = None, codes: int = 4) -> str:
    image = nib.Nifti1Image(data, None)
    image.set_qform(None, code=0)
    image.set_sform(affine, code=0 if affine is None else codes)
    nib.save(image, path)
    return str(path)


def _centred_affine(shape: tuple, centre=(32.0, -6.0, -26.0)) -> np.ndarray:
    """1 mm RAS affine putting the array's middle voxel at ``centre``."""
    affine = np.eye(4)
    affine[:3, 3] = np.asarray(centre) - (np.asarray(shape[:3]) - 1) // 2
    return affine


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> nib.Nifti1Image:
    signature = make_mri_sites(seed=0)[1]["signature"]
    return simulate_mri_image(signature, 1.0, [1, 2], [3, 4], slab_mm=4.0)


def test_slice_of_a_generated_image(generated, tmp_path):
    path = tmp_path / "sub.nii.gz"
    nib.save(generated, path)
    out = _pipeline()({"image": str(path), "label": 1, "cluster": "site01"})
    image = out["image"]
    assert isinstance(image, MetaTensor) and image.shape == (1, 192, 192) and image.dtype == torch.float32
    assert float(image.min()) == 0.0 and float(image.max()) == 1.0
    assert image.meta["filename_or_obj"] == str(path) and out["label"] == 1 and out["cluster"] == "site01"
    # the 2nd-98th percentile scaling clips only the extremes
    assert 0.01 < float((image == 1).float().mean()) < 0.05
    # the brain fills the square along its longer side (cropped to its bounding box + 2 px)
    rows, cols = torch.nonzero(image[0] > 0, as_tuple=True)
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) >= 185
    small = _pipeline(spatial_size=(64, 48))({"image": str(path)})["image"]
    assert small.shape == (1, 64, 48)


def test_slice_is_the_same_in_any_storage_orientation(generated, tmp_path):
    original = tmp_path / "original.nii.gz"
    nib.save(generated, original)
    outs = [_pipeline()({"image": str(original)})["image"]]
    for codes in ("RAS", "LPS", "ASR"):
        turned = generated.as_reoriented(ornt_transform(io_orientation(generated.affine), axcodes2ornt(codes)))
        assert "".join(nib.aff2axcodes(turned.affine)) == codes
        nib.save(turned, tmp_path / f"{codes}.nii.gz")
        outs.append(_pipeline()({"image": str(tmp_path / f"{codes}.nii.gz")})["image"])
    for out in outs[1:]:
        np.testing.assert_allclose(out.numpy(), outs[0].numpy(), atol=1e-5)


def test_slice_position_and_display_orientation(tmp_path):
    shape = (64, 9, 64)
    data = np.zeros(shape, dtype=np.float32)
    data[8:56, :, 8:56] = 100.0  # a 48 mm "brain"
    middle = (shape[1] - 1) // 2
    data[36:56, middle, 36:56] = 300.0  # in the target plane only: right (+x) and superior (+z)
    path = _save(data, tmp_path / "phantom.nii.gz", _centred_affine(shape))
    out = _pipeline(spatial_size=52, min_size=16)({"image": path})["image"]
    assert out.meta["coronal_index"] == middle
    # 48 px brain + 2 px margin each side, already square: no resampling; rows run superior -> inferior and
    # columns left -> right, so the bright block sits top right
    image = out[0].numpy()
    np.testing.assert_allclose(image[4:20, -20:-4], 1.0)
    np.testing.assert_allclose(image[-20:-4, 4:20], 1.0 / 3.0, atol=1e-6)
    assert np.all(image[:2] == 0) and np.all(image[:, :2] == 0)
    # two slices away the block is absent
    off = _pipeline(spatial_size=52, min_size=16, world_coordinate=(32.0, -4.0, -26.0))({"image": path})["image"]
    assert off.meta["coronal_index"] == middle + 2
    np.testing.assert_allclose(off[0, 4:20, -20:-4].numpy(), off[0, -20:-4, 4:20].numpy())


def test_three_dimensional_slab(generated, tmp_path):
    path = tmp_path / "sub.nii.gz"
    nib.save(generated, path)
    out = _pipeline(spatial_dims=3, num_slices=4, spatial_size=96)({"image": str(path)})["image"]
    assert out.shape == (1, 96, 96, 4) and float(out.min()) == 0.0 and float(out.max()) == 1.0
    with pytest.raises(ValueError, match=r"slab of 8 coronal slices .* the image has 5"):
        _pipeline(spatial_dims=3, num_slices=8)({"image": str(path)})
    with pytest.raises(ValueError, match="spatial_dims must be 2"):
        CoronalSlice(spatial_dims=1)


def test_truncated_nifti_names_the_file(generated, tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(generated, good)
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(
        RuntimeError, match=r"could not read image '.*truncated\.nii\.gz' \(key 'image'\).*truncated or"
    ):
        _pipeline()({"image": str(bad)})
    with pytest.raises(RuntimeError, match="truncated.nii.gz"):
        CheckedLoadImage()(str(bad))
    with pytest.raises(FileNotFoundError, match=r"'.*missing\.nii\.gz' \(key 'image'\) not found"):
        _pipeline()({"image": str(tmp_path / "missing.nii.gz")})


def test_four_dimensional_image_is_rejected(tmp_path):
    path = _save(np.ones((16, 16, 16, 3), np.float32), tmp_path / "fmri.nii.gz", _centred_affine((16, 16, 16)))
    with pytest.raises(ValueError, match=r"fmri\.nii\.gz' \(key 'image'\): expected a 3D volume, got a 4D image"):
        _pipeline()({"image": path})
    # loaded without ensure_channel_first the header still tells
    with pytest.raises(ValueError, match="expected a 3D volume"):
        CoronalSlice()(CheckedLoadImage()(path))
    with pytest.raises(ValueError, match=r"expected a channel-first single-channel 3D volume \(1, X, Y, Z\)"):
        CoronalSlice()(MetaTensor(torch.ones(2, 8, 8, 8)))


def test_missing_or_singular_affine_is_rejected(tmp_path):
    data = np.ones((16, 16, 16), np.float32)
    no_affine = _save(data, tmp_path / "no_affine.nii.gz")
    with pytest.raises(ValueError, match=r"no_affine\.nii\.gz' \(key 'image'\): has no affine \(qform_code and sf"):
        _pipeline()({"image": no_affine})
    zero = _save(data, tmp_path / "zero.nii.gz", np.diag([0.0, 0.0, 0.0, 1.0]), codes=2)
    with pytest.raises(ValueError, match=r"zero\.nii\.gz' \(key 'image'\): unusable affine"):
        _pipeline()({"image": zero})
    flat = np.eye(4)
    flat[2, 2] = 0.0
    singular = _save(data, tmp_path / "singular.nii.gz", flat, codes=2)
    with pytest.raises(ValueError, match="singular.nii.gz.*unusable affine"):
        _pipeline()({"image": singular})
    with pytest.raises(TypeError, match="expected a MetaTensor with an affine"):
        CoronalSlice()(torch.ones(1, 8, 8, 8))


def test_coordinate_outside_or_image_too_small(tmp_path):
    far = _save(np.ones((4, 4, 4), np.float32), tmp_path / "far.nii.gz", np.eye(4))
    with pytest.raises(ValueError, match=r"far\.nii\.gz' \(key 'image'\): world coordinate .* outside the image"):
        _pipeline()({"image": far})
    tiny = _save(np.ones((8, 8, 8), np.float32), tmp_path / "tiny.nii.gz", _centred_affine((8, 8, 8)))
    with pytest.raises(ValueError, match=r"tiny\.nii\.gz.*spans only 8x8 pixels .* at least 32 .*far smaller"):
        _pipeline()({"image": tiny})
    empty = _save(np.zeros((40, 5, 40), np.float32), tmp_path / "empty.nii.gz", _centred_affine((40, 5, 40)))
    with pytest.raises(ValueError, match=r"empty\.nii\.gz.*has no positive voxel"):
        _pipeline()({"image": empty})


def test_errors_inside_compose_keep_the_message(tmp_path):
    path = _save(np.ones((4, 4, 4), np.float32), tmp_path / "far.nii.gz", np.eye(4))
    pipeline = Compose([CheckedLoadImaged("image", ensure_channel_first=True), CoronalSliced("image")])
    with pytest.raises(RuntimeError, match="applying transform") as caught:
        pipeline({"image": path})
    assert isinstance(caught.value.__cause__, ValueError)
    assert "far.nii.gz' (key 'image'): world coordinate" in str(caught.value.__cause__)
