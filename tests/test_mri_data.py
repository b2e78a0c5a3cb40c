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

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist

import monai_armed.data.mri as mri
from monai_armed.data import (
    MNI_RIGHT_HIPPOCAMPUS,
    ForeignFilesError,
    ensure_mri_dataset,
    make_mri_dataset,
    make_mri_sites,
    simulate_mri_image,
)

# a tiny configuration: 5 sites x 4 subjects, 3-slice slabs (about 2 s)
TINY = {"n_seen_sites": 3, "n_unseen_sites": 2, "subjects_per_site": 4, "slab_mm": 2.0, "num_workers": 0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_mri_dataset(tmp_path_factory.mktemp("mri"), seed=0, **TINY)


def _all_items(datalist: Path) -> list[dict]:
    return [item for items in json.loads(datalist.read_text()).values() for item in items]


def _ras(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    canonical = nib.as_closest_canonical(image)
    return np.asarray(canonical.dataobj, dtype=np.float64), canonical.affine


def _roi(image: nib.Nifti1Image, low: tuple, high: tuple, y: float = MNI_RIGHT_HIPPOCAMPUS[1]) -> np.ndarray:
    """Voxels of the coronal plane at MNI ``y`` inside the x/z box ``low``-``high`` (mm)."""
    data, affine = _ras(image)
    inverse = np.linalg.inv(affine)
    lo = np.rint(inverse @ [low[0], y, low[1], 1]).astype(int)
    hi = np.rint(inverse @ [high[0], y, high[1], 1]).astype(int)
    return data[lo[0] : hi[0] + 1, lo[1], lo[2] : hi[2] + 1]


def _csf_fraction(image: nib.Nifti1Image) -> float:
    """Fraction of dark (CSF) voxels around the lateral ventricles at y = -6: grows with ventricle size."""
    data, _ = _ras(image)
    roi = _roi(image, (-20, 8), (20, 32))
    return float(np.mean(roi < 0.5 * np.median(data[data > 0])))


def test_datalist_schema_and_paths(tiny):
    content = json.loads(tiny.read_text())
    assert set(content) == {"training", "validation", "test", "unseen"}
    assert all(content[k] for k in content), {k: len(v) for k, v in content.items()}
    sites = {s["site"]: s for s in json.loads((tiny.parent / "sites.json").read_text())["sites"]}
    assert len(_all_items(tiny)) == 5 * 4
    for item in _all_items(tiny):
        assert set(item) == {"image", "label", "cluster", "subject", "vendor", "repeat", "severity"}
        assert not Path(item["image"]).is_absolute() and (tiny.parent / item["image"]).is_file()
        assert item["label"] in (0, 1) and item["cluster"] in sites
        assert item["vendor"] == sites[item["cluster"]]["vendor"]
        assert item["subject"].startswith(item["cluster"] + "-")
    # MONAI resolves the relative paths against the datalist's folder
    loaded = load_decathlon_datalist(tiny, is_segmentation=False, data_list_key="training")
    assert Path(loaded[0]["image"]).is_absolute() and Path(loaded[0]["image"]).is_file()


def test_split_by_subject_and_unseen_sites(tiny):
    content = json.loads(tiny.read_text())
    sites = {s["site"]: s for s in json.loads((tiny.parent / "sites.json").read_text())["sites"]}
    split_of: dict[str, set] = {}
    for split, items in content.items():
        for item in items:
            split_of.setdefault(item["subject"], set()).add(split)
            assert (split == "unseen") == (not sites[item["cluster"]]["seen"])
    assert all(len(splits) == 1 for splits in split_of.values())
    assert {i["cluster"] for i in content["unseen"]} == {s for s in sites if not sites[s]["seen"]}
    # the unseen sites cover both vendor groups (enriched and depleted in AD)
    assert {i["vendor"] for i in content["unseen"]} == {"GE", "Philips"}


def test_repeats_stay_with_their_subject(tmp_path):
    datalist = make_mri_dataset(
        tmp_path, n_seen_sites=2, n_unseen_sites=1, subjects_per_site=3, images_per_subject=2, slab_mm=0, num_workers=0
    )
    items = _all_items(datalist)
    assert len(items) == 3 * 3 * 2
    by_subject: dict[str, list] = {}
    for split, split_items in json.loads(datalist.read_text()).items():
        for item in split_items:
            by_subject.setdefault(item["subject"], []).append((split, item["repeat"]))
    assert all(len({s for s, _ in v}) == 1 and sorted(r for _, r in v) == [0, 1] for v in by_subject.values())
    # two scans of one subject: same anatomy, different noise
    a = np.asarray(nib.load(tmp_path / "images/site00_sub000_img0.nii.gz").dataobj, dtype=float)
    b = np.asarray(nib.load(tmp_path / "images/site00_sub000_img1.nii.gz").dataobj, dtype=float)
    assert not np.array_equal(a, b) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.9


def test_deterministic_given_seed(tmp_path):
    params = {"n_seen_sites": 2, "n_unseen_sites": 1, "subjects_per_site": 2, "slab_mm": 0.0, "num_workers": 0}
    first = make_mri_dataset(tmp_path / "a", seed=3, **params)
    again = make_mri_dataset(tmp_path / "b", seed=3, **params)
    other = make_mri_dataset(tmp_path / "c", seed=4, **params)
    files = sorted(p.relative_to(first.parent) for p in first.parent.rglob("*") if p.is_file())
    assert len(files) == 6 + 4  # images, datalist, sites, manifest, ownership file
    for name in files:
        assert (first.parent / name).read_bytes() == (again.parent / name).read_bytes(), name
    image = "images/site00_sub000_img0.nii.gz"
    a = np.asarray(nib.load(first.parent / image).dataobj)
    c = np.asarray(nib.load(other.parent / image).dataobj)
    assert not np.array_equal(a, c)


def test_cache_reuses_and_regenerates(tmp_path):
    params = {"n_seen_sites": 2, "n_unseen_sites": 1, "subjects_per_site": 2, "slab_mm": 0.0}
    datalist = ensure_mri_dataset(tmp_path, **params)
    image = tmp_path / "images/site00_sub000_img0.nii.gz"
    stamp, content = image.stat().st_mtime_ns, image.read_bytes()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # same parameters (num_workers does not count): nothing is rewritten
    assert ensure_mri_dataset(tmp_path, num_workers=1, **params) == datalist
    assert image.stat().st_mtime_ns == stamp
    # changed parameters: regenerated, new hash, new images
    ensure_mri_dataset(tmp_path, **{**params, "atrophy": 0.8})
    assert json.loads((tmp_path / "manifest.json").read_text())["hash"] != manifest["hash"]
    assert image.read_bytes() != content
    # fewer subjects: stale images and leftovers of interrupted writes are removed
    (tmp_path / "images/.site00_sub000_img0.nii.gz.0123abcd.tmp").write_bytes(b"partial")
    ensure_mri_dataset(tmp_path, **{**params, "subjects_per_site": 1})
    assert not (tmp_path / "images/site00_sub001_img0.nii.gz").exists()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "site00_sub000_img0.nii.gz",
        "site01_sub000_img0.nii.gz",
        "site02_sub000_img0.nii.gz",
    ]
    # a file the generator did not write: refused, nothing touched
    (tmp_path / "images/notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        ensure_mri_dataset(tmp_path, **{**params, "subjects_per_site": 2})
    assert (tmp_path / "images/notes.txt").read_text() == "mine"
    assert not (tmp_path / "images/site00_sub001_img0.nii.gz").exists()
    (tmp_path / "images/notes.txt").unlink()
    # a truncated image is noticed
    image = tmp_path / "images/site00_sub000_img0.nii.gz"
    content = image.read_bytes()
    image.write_bytes(content[: len(content) // 2])
    with pytest.raises(ForeignFilesError, match="site00_sub000_img0.nii.gz was changed since the mri generator"):
        ensure_mri_dataset(tmp_path, **{**params, "subjects_per_site": 1})
    image.unlink()  # a changed file is never overwritten; a missing one is written again
    ensure_mri_dataset(tmp_path, **{**params, "subjects_per_site": 1})
    assert image.read_bytes() == content
    # a missing file is noticed
    (tmp_path / "images/site01_sub000_img0.nii.gz").unlink()
    ensure_mri_dataset(tmp_path, **{**params, "subjects_per_site": 1})
    assert (tmp_path / "images/site01_sub000_img0.nii.gz").is_file()
    with pytest.raises(TypeError, match="subjects"):
        ensure_mri_dataset(tmp_path, subjects=3)


def test_interrupted_run_leaves_no_datalist(tmp_path, monkeypatch):
    params = {"n_seen_sites": 2, "n_unseen_sites": 1, "subjects_per_site": 2, "slab_mm": 0.0, "num_workers": 0}
    ensure_mri_dataset(tmp_path, **params)
    calls = []

    def crash(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(mri, "_render_job", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_mri_dataset(tmp_path, **{**params, "seed": 1})
    assert not (tmp_path / "datalist.json").exists() and not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    datalist = ensure_mri_dataset(tmp_path, **{**params, "seed": 1})
    assert json.loads((tmp_path / "manifest.json").read_text())["parameters"]["seed"] == 1
    assert len(_all_items(datalist)) == 6


def test_disease_widens_ventricles_and_changes_hippocampi_only():
    neutral = make_mri_sites(seed=0, site_effect=0.0)[0]["signature"]
    scanner = make_mri_sites(seed=0)[1]["signature"]
    for signature in (neutral, scanner):
        for subject in range(3):
            cn = simulate_mri_image(signature, 0.0, [7, subject], [8, subject], slab_mm=0)
            ad = simulate_mri_image(signature, 1.0, [7, subject], [8, subject], slab_mm=0)
            assert _csf_fraction(ad) > 1.15 * _csf_fraction(cn)
    cn = simulate_mri_image(neutral, 0.0, [7, 0], [8, 0], slab_mm=0)
    ad = simulate_mri_image(neutral, 1.0, [7, 0], [8, 0], slab_mm=0)
    change = {
        name: np.mean(np.abs(_roi(ad, *box) - _roi(cn, *box)))
        for name, box in {
            "right_hippocampus": ((18, -34), (38, -14)),
            "left_hippocampus": ((-38, -34), (-18, -14)),
            "cortex": ((-20, 55), (20, 70)),
        }.items()
    }
    scale = np.median(_ras(cn)[0][_ras(cn)[0] > 0])
    assert change["right_hippocampus"] > 0.02 * scale and change["left_hippocampus"] > 0.02 * scale
    assert change["cortex"] < 1e-3 * scale
    # no atrophy: the label leaves no trace
    flat = simulate_mri_image(neutral, 1.0, [7, 0], [8, 0], atrophy=0.0, slab_mm=0)
    np.testing.assert_array_equal(np.asarray(flat.dataobj), np.asarray(cn.dataobj))


def test_labels_and_severity_in_the_dataset(tiny):
    items = _all_items(tiny)
    severity = {label: [i["severity"] for i in items if i["label"] == label] for label in (0, 1)}
    assert min(len(v) for v in severity.values()) >= 4
    assert np.mean(severity[1]) > np.mean(severity[0]) + 0.5


def test_sites_have_their_own_scanner_signature(tiny):
    sites = json.loads((tiny.parent / "sites.json").read_text())["sites"]
    medians: dict[str, list] = {}
    for item in _all_items(tiny):
        image = nib.load(tiny.parent / item["image"])
        signature = next(s["signature"] for s in sites if s["site"] == item["cluster"])
        np.testing.assert_allclose(image.header.get_zooms(), signature["spacing_mm"], atol=1e-4)
        assert "".join(nib.aff2axcodes(image.affine)) == signature["axcodes"]
        data = np.asarray(image.dataobj, dtype=float)
        medians.setdefault(item["cluster"], []).append(np.log(np.median(data[data > 0])))
    within = np.mean([np.var(v) for v in medians.values()])
    between = np.var([np.mean(v) for v in medians.values()])
    assert between > 20 * within, (between, within)
    # without site effects all scanners are identical
    plain = make_mri_sites(seed=0, site_effect=0.0)
    neutral = [{k: v for k, v in s["signature"].items() if k != "noise"} for s in plain]  # noise type moot at sd 0
    assert all(n == neutral[0] for n in neutral)
    assert plain[0]["signature"]["noise_sd"] == 0 and plain[0]["signature"]["spacing_mm"] == [1.0, 1.0, 1.0]


def test_vendor_confounding_as_configured():
    sites = make_mri_sites(seed=0, subjects_per_site=40)
    seen = [s for s in sites if s["seen"]]
    fraction = {v: np.mean([s["ad_fraction"] for s in seen if s["vendor"] == v]) for v in ("GE", "Philips", "Siemens")}
    assert fraction["GE"] > 0.65 and fraction["Philips"] < 0.35 and fraction["Siemens"] < 0.35
    unseen = [s for s in sites if not s["seen"]]
    assert {s["ad_fraction_target"] for s in unseen} == {0.5}, "unseen sites are not confounded by default"
    assert abs(np.mean([s["ad_fraction"] for s in unseen]) - 0.5) < 0.1
    for site in sites:
        assert site["ad_fraction"] == pytest.approx(np.mean(site["labels"]))
        assert abs(site["ad_fraction"] - site["ad_fraction_target"]) < 0.2
    exact = make_mri_sites(
        seed=1,
        n_seen_sites=4,
        n_unseen_sites=2,
        subjects_per_site=10,
        vendor_ad_fraction={"A": 0.9, "B": 0.1},
        site_fraction_sd=0.0,
        unseen_ad_fraction=None,
    )
    assert [(s["vendor"], s["seen"], sum(s["labels"])) for s in exact] == [
        ("A", True, 9),
        ("B", True, 1),
        ("A", True, 9),
        ("B", True, 1),
        ("A", False, 9),
        ("B", False, 1),
    ]
    with pytest.raises(ValueError, match=r"vendor_ad_fraction\['A'\] must be in \[0, 1\]"):
        make_mri_sites(vendor_ad_fraction={"A": 1.5})
    with pytest.raises(ValueError, match=r"unseen_ad_fraction must be in \[0, 1\] or None, got 1.2"):
        make_mri_sites(unseen_ad_fraction=1.2)


def test_slab_affine_maps_mni_and_whole_brain_option():
    signature = make_mri_sites(seed=0, site_effect=0.0)[0]["signature"]
    slab = simulate_mri_image(signature, 0.0, 1, 2, slab_mm=16.0)
    assert slab.shape[1] == 17 and slab.get_data_dtype() == np.int16
    assert int(slab.header["sform_code"]) == 4 and int(slab.header["qform_code"]) == 4
    centre = slab.affine @ [0, 8, 0, 1]
    assert centre[1] == pytest.approx(MNI_RIGHT_HIPPOCAMPUS[1])
    whole = simulate_mri_image(signature, 0.0, 1, 2, slab_mm=None)
    assert whole.shape[1] > 150
    # the slab is the matching part of the whole brain
    index = int(np.rint(np.linalg.inv(whole.affine) @ centre)[1])
    np.testing.assert_allclose(np.asarray(slab.dataobj)[:, 8], np.asarray(whole.dataobj)[:, index], atol=1)


def test_command_line(tmp_path, capsys):
    datalist = mri.main(
        [
            "--out",
            str(tmp_path),
            "--seen-sites",
            "2",
            "--unseen-sites",
            "1",
            "--subjects-per-site",
            "2",
            "--slab-mm",
            "0",
            "--vendor",
            "GE=1",
            "--vendor",
            "Siemens=0",
            "--unseen-ad-fraction",
            "vendor",
            "--num-workers",
            "0",
        ]
    )
    assert datalist == tmp_path / "datalist.json" and str(datalist) in capsys.readouterr().out
    labels = {i["vendor"]: set() for i in _all_items(datalist)}
    for item in _all_items(datalist):
        labels[item["vendor"]].add(item["label"])
    assert labels == {"GE": {1}, "Siemens": {0}}


def test_bad_parameters(tmp_path):
    with pytest.raises(ValueError, match="images_per_subject must be >= 1"):
        make_mri_dataset(tmp_path / "out", images_per_subject=0)
    with pytest.raises(ValueError, match="split_fractions"):
        make_mri_dataset(tmp_path / "out", split_fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="n_seen_sites >= 1"):
        make_mri_sites(n_seen_sites=0)
    assert not (tmp_path / "out").exists()
