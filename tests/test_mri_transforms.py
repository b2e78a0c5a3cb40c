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

import logging
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform
from scipy import ndimage

from monai_armed.data import make_mri_sites, simulate_mri_image
from monai_armed.transforms import CheckedLoadImage, CheckedLoadImaged, CoronalSlice, CoronalSliced

LOGGER = "monai_armed.transforms.mri"


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


def _save_image(image: nib.Nifti1Image, path: Path) -> str:
    """Save with the affine as sform and qform (code 4, MNI152)."""
    image.set_sform(image.affine, code=4)
    image.set_qform(image.affine, code=4)
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


@pytest.fixture(scope="module")
def template() -> nib.Nifti1Image:
    """The 1 mm nilearn MNI152 template (skull-stripped, zero outside the brain)."""
    from nilearn.datasets import load_mni152_template

    return load_mni152_template(resolution=1)


@pytest.fixture(scope="module")
def mni_slab(template) -> nib.Nifti1Image:
    """The template's coronal slab y = -22 .. 10 mm (1 mm RAS voxels), around the paper's plane y = -6."""
    slab = template.slicer[:, 112:145, :]
    assert np.allclose(slab.affine[:3, 3], [-98.0, -22.0, -72.0])
    return nib.Nifti1Image(np.asarray(slab.dataobj, dtype=np.float32), slab.affine)


def _thick(image: nib.Nifti1Image, axis: int, factor: int = 4) -> nib.Nifti1Image:
    """``image`` acquired with ``factor`` times thicker voxels along ``axis``: block means, affine of the blocks."""
    data = np.moveaxis(np.asarray(image.dataobj), axis, -1)
    blocks = data.shape[-1] // factor
    data = data[..., : blocks * factor].reshape(*data.shape[:-1], blocks, factor).mean(-1)
    affine = image.affine.copy()
    affine[:3, 3] += affine[:3, axis] * (factor - 1) / 2  # a block's centre
    affine[:3, axis] *= factor
    return nib.Nifti1Image(np.moveaxis(data, -1, axis).astype(np.float32), affine)


def _brain_box(image: torch.Tensor, threshold: float = 0.2) -> np.ndarray:
    """(first row, last row, first column, last column) of the pixels above ``threshold``."""
    rows, cols = np.nonzero(image[0].numpy() > threshold)
    return np.array([rows.min(), rows.max(), cols.min(), cols.max()])


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


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


def test_a_slab_whose_brain_ends_inside_it_keeps_its_planes_in_place():
    # a 2 mm grid from -40 mm; the brain ends at y = -8 mm, inside the slab of planes y = -14, -12, ..., 0 mm
    x, y, z = np.meshgrid(*[np.arange(40) * 2.0 - 40] * 3, indexing="ij")
    volume = ((x**2 + z**2 < 900) & (y <= -8)).astype(np.float32)
    affine = torch.diag(torch.tensor([2.0, 2, 2, 1]))
    affine[:3, 3] = -40
    slab = CoronalSlice((0, -6, 0), spatial_size=16, spatial_dims=3, num_slices=8, min_size=4)(
        MetaTensor(torch.from_numpy(volume)[None], affine=affine)
    )
    assert [bool((slab[0, ..., k] > 0).any()) for k in range(8)] == [True] * 4 + [False] * 4


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


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_thick_slices_give_the_slice_of_the_one_mm_image(mni_slab, tmp_path, caplog, axis):
    reference = _pipeline(spatial_size=64)({"image": _save_image(mni_slab, tmp_path / "mni_1mm.nii")})["image"]
    thick_path = _save_image(_thick(mni_slab, axis), tmp_path / "mni_thick.nii")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        thick = _pipeline(spatial_size=64)({"image": thick_path})["image"]
    # resampled to 1 mm cubes before slicing: not squashed 4x along the thick axis, same anatomy and intensities
    assert thick.shape == reference.shape == (1, 64, 64)
    assert np.corrcoef(thick.numpy().ravel(), reference.numpy().ravel())[0, 1] > 0.95
    assert float((thick - reference).abs().mean()) < 0.06
    np.testing.assert_allclose(_brain_box(thick), _brain_box(reference), atol=2)
    # the plane y = -6 on the 1 mm grid from y = -22 (-20.5, the first 4 mm voxel's centre, when y is thick)
    assert reference.meta["coronal_index"] == 16 and thick.meta["coronal_index"] == (14 if axis == 1 else 16)
    assert not _warnings(caplog)
    # deterministic
    again = _pipeline(spatial_size=64)({"image": thick_path})["image"]
    assert torch.equal(again, thick)


def test_isotropic_mm_sets_the_slicing_grid(mni_slab, tmp_path):
    path = _save_image(mni_slab, tmp_path / "mni.nii")
    default = _pipeline(spatial_size=64)({"image": path})["image"]
    coarse = _pipeline(spatial_size=64, isotropic_mm=2.0)({"image": path})["image"]
    assert coarse.meta["coronal_index"] == 8  # (-6 - -22) / 2
    assert np.corrcoef(coarse.numpy().ravel(), default.numpy().ravel())[0, 1] > 0.9
    slab = _pipeline(spatial_size=64, spatial_dims=3, num_slices=4, isotropic_mm=2.0)({"image": path})["image"]
    assert slab.shape == (1, 64, 64, 4)
    # the slab counts slices of the resampled grid: 17 planes 2 mm apart span y -22 .. 10
    with pytest.raises(ValueError, match=r"mni\.nii' \(key 'image'\): the slab of 20 coronal .* the image has 17"):
        _pipeline(spatial_dims=3, num_slices=20, isotropic_mm=2.0)({"image": path})
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="isotropic_mm must be a positive voxel side"):
            CoronalSlice(isotropic_mm=bad)


def test_oblique_image_is_sliced_in_world_space_and_warned(mni_slab, tmp_path, caplog):
    reference = _pipeline(spatial_size=64)({"image": _save_image(mni_slab, tmp_path / "mni.nii")})["image"]
    # the same anatomy in world space, stored on voxel axes turned 12 degrees about y (an oblique acquisition)
    turn = np.radians(12.0)
    rotation = np.eye(4)
    rotation[[0, 0, 2, 2], [0, 2, 0, 2]] = np.cos(turn), np.sin(turn), -np.sin(turn), np.cos(turn)
    affine = rotation @ mni_slab.affine
    voxels = np.linalg.inv(mni_slab.affine) @ affine
    data = ndimage.affine_transform(np.asarray(mni_slab.dataobj), voxels, order=1)
    path = _save_image(nib.Nifti1Image(data, affine), tmp_path / "oblique.nii")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _pipeline(spatial_size=64)({"image": path})["image"]
    assert np.corrcoef(out.numpy().ravel(), reference.numpy().ravel())[0, 1] > 0.95
    (message,) = _warnings(caplog)
    assert "oblique.nii' (key 'image')" in message and "oblique affine" in message and "12.0 degrees" in message
    assert "register the image to MNI152 first (e.g. ANTs antsRegistration or FSL FLIRT)" in message


def test_scanner_space_placement_is_warned(mni_slab, tmp_path, caplog):
    affine = mni_slab.affine.copy()
    affine[:3, 3] += [60.0, 0.0, 30.0]
    path = _save_image(nib.Nifti1Image(np.asarray(mni_slab.dataobj), affine), tmp_path / "scanner.nii")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _pipeline(spatial_size=64)({"image": path})["image"]
    assert out.shape == (1, 64, 64)  # warned, not failed
    (message,) = _warnings(caplog)
    assert "scanner.nii' (key 'image') does not look like a skull-stripped brain registered to MNI152" in message
    assert "spans x -12..132, y -22..10, z -22..111 mm, more than 20 mm beyond the MNI152 brain" in message
    assert "centred at x = 60 mm" in message and "oblique" not in message
    # a raw scanner file whose origin is its first voxel: warned, then the coordinate is outside its field of view
    corner = _save_image(nib.Nifti1Image(np.asarray(mni_slab.dataobj), np.eye(4)), tmp_path / "corner.nii")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(ValueError, match="outside the image"):
        _pipeline()({"image": corner})
    assert "corner.nii" in _warnings(caplog)[0]


def test_implausible_brains_are_warned(mni_slab, tmp_path, caplog):
    data = np.asarray(mni_slab.dataobj)
    half = mni_slab.affine @ np.diag([0.5, 1.0, 0.5, 1.0])  # header voxel size wrong by 2
    half[:3, 3] += [49.0, 0.0, 36.0]
    unstripped = np.where(data > 0, data, 0.05).astype(np.float32)  # background kept: not skull-stripped
    zscored = ((data - data.mean()) / data.std()).astype(np.float32)
    cases = {
        "small.nii": (data, half, "the brain is 72 mm wide in x, less than 100 mm"),
        "unstripped.nii": (unstripped, mni_slab.affine, "spans x -98..98, y -22..10, z -72..116 mm, more than 20"),
        "zscored.nii": (zscored, mni_slab.affine, "of the non-zero voxels are negative (expected non-negative"),
    }
    for name, (values, affine, reason) in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            path = _save_image(nib.Nifti1Image(values, affine), tmp_path / name)
            _pipeline(spatial_size=64, min_size=16)({"image": path})
        (message,) = _warnings(caplog)
        assert f"{name}' (key 'image') does not look like" in message and reason in message, message


def test_warned_once_per_file(mni_slab, tmp_path, caplog):
    affine = mni_slab.affine.copy()
    affine[0, 3] += 60.0
    first = _save_image(nib.Nifti1Image(np.asarray(mni_slab.dataobj), affine), tmp_path / "first.nii")
    second = _save_image(nib.Nifti1Image(np.asarray(mni_slab.dataobj), affine), tmp_path / "second.nii")
    pipeline = _pipeline(spatial_size=32)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for path in (first, first, second, first):
            pipeline({"image": path})
    messages = _warnings(caplog)
    assert len(messages) == 2 and "first.nii" in messages[0] and "second.nii" in messages[1]


def test_mni_template_and_generated_images_are_not_warned(template, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        voxels = torch.as_tensor(np.asarray(template.dataobj, dtype=np.float32))
        whole = MetaTensor(voxels[None], affine=template.affine)
        whole.meta["filename_or_obj"] = "mni152.nii.gz"
        assert CoronalSlice(spatial_size=64)(whole).shape == (1, 64, 64)
        for index, site in enumerate(make_mri_sites(seed=0)):
            image = simulate_mri_image(site["signature"], 1.0, [0, index], [1, index], slab_mm=4.0)
            path = tmp_path / f"{site['site']}.nii.gz"
            nib.save(image, path)
            _pipeline(spatial_size=64)({"image": str(path)})
    assert not _warnings(caplog)


@pytest.mark.parametrize("bad, kind", [(np.nan, "1 NaN, 0 infinite"), (np.inf, "0 NaN, 1 infinite")])
def test_non_finite_voxels_name_the_file(tmp_path, bad, kind):
    data = np.ones((8, 8, 8), np.float32)
    data[3, 4, 5] = bad
    path = _save(data, tmp_path / "broken.nii.gz", _centred_affine((8, 8, 8)))
    expected = (
        rf"broken\.nii\.gz' \(key 'image'\) has 1 non-finite voxel\(s\) of 512 \({kind}\); expected finite intensities"
    )
    with pytest.raises(ValueError, match=expected):
        _pipeline()({"image": path})
    with pytest.raises(ValueError, match=r"broken\.nii\.gz' has 1 non-finite"):
        CheckedLoadImage(image_only=False)(path)


def test_two_dimensional_image_is_rejected(tmp_path):
    path = _save(np.ones((64, 64), np.float32), tmp_path / "slice.nii.gz", np.eye(4))
    with pytest.raises(
        ValueError, match=r"slice\.nii\.gz' \(key 'image'\): expected a 3D volume, got a 2D image of shape \(64, 64\)"
    ):
        _pipeline()({"image": path})
    with pytest.raises(ValueError, match=r"expected a channel-first single-channel 3D volume .*\(2D and 4D images"):
        CoronalSlice()(MetaTensor(torch.ones(1, 64, 64)))
