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
"""The synthetic multi-batch nucleus-segmentation data set and the segmentation datalist checks."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import tifffile
from monai.transforms import LoadImage

from monai_armed.data import (
    ForeignFilesError,
    TiffFileReader,
    ensure_nucleus_dataset,
    make_nucleus_batches,
    make_nucleus_dataset,
    render_nucleus_field,
    validate_segmentation_datalist,
)
from monai_armed.data.nuclei import main

SMALL = {"n_seen": 2, "n_unseen": 1, "fields_per_batch": 4, "size": 48}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("nuclei")
    return out, json.loads(ensure_nucleus_dataset(out, seed=3, num_workers=1, **SMALL).read_text())


def _digest(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.tif"))}


def test_datalist_sections_masks_and_batches(tiny):
    out, datalist = tiny
    assert sum(len(v) for k, v in datalist.items() if k != "unseen") == 2 * 4 and len(datalist["unseen"]) == 4
    batches = json.loads((out / "batches.json").read_text())["batches"]
    seen = {b["date"] for b in batches if b["seen"]}
    assert {i["cluster"] for k in ("training", "validation", "test") for i in datalist[k]} <= seen
    assert {i["cluster"] for i in datalist["unseen"]}.isdisjoint(seen)
    for item in datalist["training"]:
        image, mask = tifffile.imread(out / item["image"]), tifffile.imread(out / item["label"])
        assert image.shape == mask.shape == (48, 48) and image.dtype == np.uint8 and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        if mask.any():  # nuclei are brighter than the background around them
            assert image[mask == 1].mean() > image[mask == 0].mean()


def test_deterministic_and_independent_of_workers(tmp_path):
    make_nucleus_dataset(tmp_path / "a", seed=1, num_workers=1, **SMALL)
    make_nucleus_dataset(tmp_path / "b", seed=1, num_workers=2, **SMALL)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    make_nucleus_dataset(tmp_path / "c", seed=2, num_workers=1, **SMALL)
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_fields_hold_many_nuclei_some_touching():
    rng = np.random.default_rng(0)
    _, mask, count = render_nucleus_field(rng, size=128, density=40.0)
    assert count >= 20
    from scipy import ndimage

    _, components = ndimage.label(mask)
    assert components < count, "touching nuclei merge into one connected component of the mask"
    _, empty, none = render_nucleus_field(np.random.default_rng(1), size=64, density=0.0)
    assert none == 0 and not empty.any()


def test_batch_effect_zero_makes_batches_identical():
    batches = make_nucleus_batches(n_seen=3, n_unseen=1, seed=0, batch_effect=0.0)
    assert all(b["signature"] == batches[0]["signature"] for b in batches)  # -0.0 == 0.0
    assert all(b["stain"] == batches[0]["stain"] for b in batches)
    strong = make_nucleus_batches(n_seen=3, n_unseen=1, seed=0)
    assert len({b["stain"]["stain"] for b in strong}) == 4
    assert [b["date"] for b in strong] == [b["date"] for b in batches]


def test_cache_and_foreign_files(tmp_path):
    datalist = ensure_nucleus_dataset(tmp_path / "data", num_workers=1, **SMALL)
    before = datalist.stat().st_mtime_ns
    assert ensure_nucleus_dataset(tmp_path / "data", num_workers=1, **SMALL).stat().st_mtime_ns == before
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        ensure_nucleus_dataset(tmp_path / "user", **SMALL)
    assert (tmp_path / "user" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_seen": 1}, "need n_seen >= 2"),
        ({"size": 16}, "size must be an integer >= 32"),
        ({"dtype": "float32"}, "dtype must be one of"),
        ({"batch_effect": -1.0}, "batch_effect must be >= 0"),
        ({"fields_per_batch": 0}, "fields_per_batch must be >= 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        make_nucleus_dataset(tmp_path, **{**SMALL, **params})
    assert not list(tmp_path.iterdir()), "nothing is written"


def test_command_line(tmp_path, capsys):
    path = main(["--out", str(tmp_path / "cli"), "--seen-batches", "2", "--unseen-batches", "1",
                 "--fields-per-batch", "2", "--size", "32", "--num-workers", "1", "--dtype", "uint16"])  # fmt: skip
    assert capsys.readouterr().out.strip() == str(path)
    item = json.loads(path.read_text())["unseen"][0]
    assert tifffile.imread(tmp_path / "cli" / item["image"]).dtype == np.uint16


def test_segmentation_datalist_warns_about_a_batch_of_empty_masks(tiny, tmp_path, caplog):
    out, datalist = tiny
    loader = LoadImage(reader=TiffFileReader(channels=1), image_only=True)
    sections = {k: [dict(i, image=str(out / i["image"]), label=str(out / i["label"])) for i in v] for k, v in datalist.items()}
    empty = tmp_path / "empty.tif"
    tifffile.imwrite(empty, np.zeros((48, 48), np.uint8))
    cluster = sections["training"][0]["cluster"]
    for items in sections.values():
        for item in items:
            if item["cluster"] == cluster:
                item["label"] = str(empty)
    required = {"training": ["image", "label", "cluster"], "unseen": ["image", "label"]}
    with caplog.at_level(logging.WARNING, logger="monai_armed.data.validation"):
        checked = validate_segmentation_datalist(sections, required, n_classes=2, loader=loader)
    assert f"every mask of cluster {cluster!r}" in caplog.text
    assert checked["training"][0]["label"] == str(empty)
    sections["unseen"][1]["label"] = str(tmp_path / "missing.tif")
    with pytest.raises(ValueError, match=r"section 'unseen', item 1, key 'label': mask file .*missing.tif not found"):
        validate_segmentation_datalist(sections, required, n_classes=2, loader=loader)


def test_segmentation_datalist_compares_mask_and_image_sizes_for_path_objects(tiny, tmp_path):
    out, datalist = tiny
    loader = LoadImage(reader=TiffFileReader(channels=1), image_only=True)
    sections = {k: [dict(i, image=out / i["image"], label=str(out / i["label"])) for i in v] for k, v in datalist.items()}
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, np.zeros((20, 24), np.uint8))
    sections["training"][0]["label"] = str(small)
    required = {"training": ["image", "label", "cluster"], "unseen": ["image", "label"]}
    with pytest.raises(ValueError, match=r"small.tif has shape \(24, 20\) \(as loaded\) but the image .* has \("):
        validate_segmentation_datalist(sections, required, n_classes=2, loader=loader)


def test_segmentation_datalist_accepts_channel_last_and_channel_first_colour_images(tmp_path):
    loader = LoadImage(reader=TiffFileReader(), image_only=True)  # RGB loads channel-last: (W, H, 3)
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((4, 6, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "mask.tif", np.ones((4, 6), np.uint8))
    tifffile.imwrite(tmp_path / "wrong.tif", np.ones((6, 4), np.uint8))
    item = {"image": str(tmp_path / "rgb.tif"), "label": str(tmp_path / "mask.tif"), "cluster": "a"}
    required = {"training": ["image", "label", "cluster"]}
    for reader in (loader, LoadImage(reader=TiffFileReader(), image_only=True, ensure_channel_first=True)):
        checked = validate_segmentation_datalist({"training": [item]}, required, n_classes=2, loader=reader)
        assert checked["training"][0]["label"] == item["label"]
    with pytest.raises(ValueError, match=r"wrong.tif has shape \(4, 6\) \(as loaded\) but the image .* has \(6, 4, 3\)"):
        validate_segmentation_datalist({"training": [dict(item, label=str(tmp_path / "wrong.tif"))]}, required,
                                       n_classes=2, loader=loader)  # fmt: skip
