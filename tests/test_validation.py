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

import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import LoadImage

from monai_armed.data import TiffFileReader, save_tiff, validate_datalist
from monai_armed.transforms import CheckedLoadImage

LOGGER = "monai_armed.data.validation"
SECTIONS = {
    "training": ["image", "label", "cluster"],
    "validation": ["image", "label", "cluster"],
    "test": ["image", "label", "cluster"],
    "unseen": ["image", "label"],
}


def _nifti(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.RandomState(seed).rand(6, 6, 4).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path.name


def _datalist(root: Path, sections: dict | None = None) -> Path:
    """Two sites in training, validation and test; a third site in unseen; one NIfTI file per item."""
    if sections is None:
        sections = {}
        for name, sites in (("training", "ab"), ("validation", "ab"), ("test", "ab"), ("unseen", "c")):
            sections[name] = [
                {"image": "images/" + _nifti(root / "images" / f"{name}{i}.nii.gz", i), "label": i % 2, "cluster": s}
                for i, s in enumerate(sites * 2)
            ]
    path = root / "datalist.json"
    path.write_text(json.dumps(sections))
    return path


def _sections(path: Path) -> dict:
    return json.loads(path.read_text())


def _problems(error: pytest.ExceptionInfo) -> list[str]:
    return [line[4:] for line in str(error.value).splitlines()[1:]]


def test_valid_datalist_returns_checked_sections(tmp_path):
    path = _datalist(tmp_path)
    checked = validate_datalist(path, SECTIONS, n_classes=2, loader=CheckedLoadImage(image_only=True))
    assert list(checked) == list(SECTIONS) and len(checked["training"]) == 4
    assert checked["test"][1] == {"image": str(tmp_path / "images" / "test1.nii.gz"), "label": 1, "cluster": "b"}
    # one section by its name
    assert list(validate_datalist(path, "training", n_classes=2, loader=CheckedLoadImage(image_only=True))) == [
        "training"
    ]


def test_truncated_image_in_test_section_is_found(tmp_path):
    path = _datalist(tmp_path)
    image = tmp_path / "images" / "test2.nii.gz"
    image.write_bytes(image.read_bytes()[:-60])  # the header survives, the data ends early
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    validate_datalist(path, SECTIONS, n_classes=2, loader=None)  # existence alone does not see it
    with pytest.raises(ValueError) as err:
        validate_datalist(path, SECTIONS, n_classes=2, loader=CheckedLoadImage(image_only=True))
    (problem,) = _problems(err)
    assert str(err.value).startswith(f"datalist {path}: 1 problem(s) found before the run")
    assert problem.startswith(f"datalist {path}, section 'test', item 2, key 'image': could not read {image}")
    assert "expected a complete, readable image file" in problem
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # MONAI falls back to PIL after the TIFF reader
def test_corrupt_tiff_found_with_the_tiff_loader(tmp_path):
    for name in ("a.tif", "b.tif"):
        save_tiff(tmp_path / name, np.arange(64, dtype=np.uint8).reshape(8, 8))
    (tmp_path / "b.tif").write_bytes((tmp_path / "b.tif").read_bytes()[:40])
    items = [{"image": "a.tif", "label": 0, "cluster": "d1"}, {"image": "b.tif", "label": 1, "cluster": "d2"}]
    path = _datalist(tmp_path, {"training": items})
    loader = LoadImage(reader=TiffFileReader(channels=1, dtypes=["uint8"]), image_only=True)
    with pytest.raises(ValueError) as err:
        validate_datalist(path, ["training"], n_classes=2, loader=loader)
    (problem,) = _problems(err)
    assert f"section 'training', item 1, key 'image': could not read {tmp_path / 'b.tif'}" in problem


def test_missing_unseen_section_and_empty_test_section(tmp_path):
    path = _datalist(tmp_path)
    sections = _sections(path)
    del sections["unseen"]
    sections["test"] = []
    path.write_text(json.dumps(sections))
    with pytest.raises(ValueError) as err:
        validate_datalist(path, SECTIONS, n_classes=2)
    assert _problems(err) == [
        f"datalist {path} has no (or an empty) 'test' section; it has ['test', 'training', 'validation'].",
        f"datalist {path} has no (or an empty) 'unseen' section; it has ['test', 'training', 'validation'].",
    ]


def test_all_problems_are_listed_with_section_item_and_key(tmp_path):
    path = _datalist(tmp_path)
    sections = _sections(path)
    sections["training"][1]["label"] = 2
    sections["training"][2]["label"] = "AD"
    sections["validation"][0]["cluster"] = ""
    del sections["validation"][3]["cluster"]
    sections["test"][3]["image"] = "images/absent.nii.gz"
    sections["unseen"][0]["label"] = True
    path.write_text(json.dumps(sections))
    with pytest.raises(ValueError) as err:
        validate_datalist(path, SECTIONS, n_classes=2)
    problems = _problems(err)
    assert str(err.value).startswith(f"datalist {path}: 6 problem(s)")
    expected = [
        "section 'training', item 1, key 'label': label 2 is out of range; expected a class index 0..1.",
        "section 'training', item 2, key 'label': label 'AD' is not an integer class index; to use class names, "
        "pass label_names",
        "section 'validation', item 0, key 'cluster': missing cluster id ''",
        "section 'validation', item 3: missing key(s) ['cluster']",
        f"section 'test', item 3, key 'image': file {tmp_path / 'images' / 'absent.nii.gz'} not found; expected an "
        "existing image file.",
        "section 'unseen', item 0, key 'label': label True is a bool; expected an integer class index.",
    ]
    assert len(problems) == len(expected)
    for problem, text in zip(problems, expected):
        assert problem.startswith(f"datalist {path}, ") and text in problem, (problem, text)


def test_problem_list_is_capped(tmp_path):
    path = _datalist(tmp_path)
    sections = _sections(path)
    for item in sections["training"] + sections["test"]:
        item["label"] = 7
    path.write_text(json.dumps(sections))
    with pytest.raises(ValueError) as err:
        validate_datalist(path, SECTIONS, n_classes=2, max_problems=3)
    assert str(err.value).startswith(f"datalist {path}: 8 problem(s)")
    assert len(_problems(err)) == 4 and str(err.value).endswith("... and 5 more.")


def test_label_names_map_names_and_set_the_number_of_classes(tmp_path):
    path = _datalist(tmp_path)
    sections = _sections(path)
    for item in sections["training"]:
        item["label"] = ["CN", "AD"][item["label"]]
    path.write_text(json.dumps(sections))
    checked = validate_datalist(path, SECTIONS, label_names=["CN", "AD"])
    assert [item["label"] for item in checked["training"]] == [0, 1, 0, 1]
    sections["test"][0]["label"] = 2
    path.write_text(json.dumps(sections))
    with pytest.raises(ValueError, match=r"item 0, key 'label': label 2 is out of range for label_names"):
        validate_datalist(path, SECTIONS, label_names=["CN", "AD"])
    with pytest.raises(ValueError, match=r"n_classes=3 but label_names has 2 names"):
        validate_datalist(path, SECTIONS, n_classes=3, label_names=["CN", "AD"])


def test_clusters_outside_training_are_warned_about(tmp_path, caplog):
    path = _datalist(tmp_path)
    sections = _sections(path)
    sections["test"][0]["cluster"] = "z"
    sections["validation"][1]["cluster"] = 3
    sections["training"][3]["cluster"] = "03"
    sections["unseen"][1]["cluster"] = "a"
    path.write_text(json.dumps(sections))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        checked = validate_datalist(path, SECTIONS, n_classes=2)
    assert checked["validation"][1]["cluster"] == "3"
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 3
    validation, test, unseen = messages
    assert "section 'validation': 1 item(s) of cluster(s) ['3'] not in section 'training'" in validation
    assert "evaluated as unseen (-1). Section 'training' has ['03']: cluster ids are compared as text." in validation
    assert "section 'test': 1 item(s) of cluster(s) ['z'] not in section 'training'" in test
    assert "compared as text" not in test
    assert "section 'unseen': cluster(s) ['a'] are also in section 'training'" in unseen


def test_in_memory_sections_and_optional_cluster(tmp_path):
    split = {
        "train": [{"features": [0.0], "label": 1, "cluster": 1}, {"features": [1.0], "label": 0, "cluster": "1"}],
        "inference": [{"features": [2.0], "cluster": None}, {"features": [3.0]}],
    }
    checked = validate_datalist(
        split, {"train": ["features", "label", "cluster"], "inference": ["features"]}, n_classes=2,
        train_section="train",
    )  # fmt: skip
    assert [item["cluster"] for item in checked["train"]] == ["1", "1"]
    assert checked["inference"] == [{"features": [2.0]}, {"features": [3.0]}]
    with pytest.raises(ValueError, match=r"<in-memory datalist>, section 'inference', item 1: missing key\(s\)"):
        validate_datalist(split, {"inference": ["features", "cluster"]})


def test_missing_datalist_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist file not found: .*none.json"):
        validate_datalist(tmp_path / "none.json", SECTIONS)


def test_a_section_that_must_hold_every_class_names_the_labels_it_has(tmp_path):
    path = _datalist(tmp_path)
    assert validate_datalist(path, SECTIONS, n_classes=2, all_classes=["validation"])["validation"]
    sections = _sections(path)
    for item in sections["validation"]:
        item["label"] = 1
    path.write_text(json.dumps(sections))
    with pytest.raises(ValueError) as error:
        validate_datalist(path, SECTIONS, n_classes=2, all_classes=["validation"])
    assert _problems(error) == [
        f"datalist {path}, section 'validation': its labels are only [1]; it must hold every one of the 2 classes (its "
        "AUROC decides which model is kept)."
    ]
    validate_datalist(path, SECTIONS, n_classes=2)  # only where asked


def test_a_training_image_in_another_section_is_refused_under_any_of_its_names(tmp_path):
    path = _datalist(tmp_path)
    sections = _sections(path)
    (tmp_path / "link").symlink_to(tmp_path / "images")
    sections["test"][0]["image"] = sections["training"][1]["image"]
    sections["validation"][1]["image"] = "link/" + Path(sections["training"][2]["image"]).name
    path.write_text(json.dumps(sections))
    with pytest.raises(ValueError) as error:
        validate_datalist(path, SECTIONS, n_classes=2)
    problems = _problems(error)
    assert len(problems) == 2
    assert "section 'validation', item 1, key 'image': the image of 'training' item 2" in problems[0]
    assert "section 'test', item 0, key 'image': the image of 'training' item 1" in problems[1]
