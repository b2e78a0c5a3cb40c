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
"""The record of a model's training images and the evaluation's check against it."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from monai_armed.data import TRAINING_ITEMS_FILE, check_evaluated_items, record_training_items


def test_record_and_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = [{"image": "a.tif"}, {"image": str(tmp_path / "b.tif")}, {"image": ["c1.nii", "c2.nii"]}]
    path = record_training_items(train, tmp_path / "models")
    assert path == str(tmp_path / "models" / TRAINING_ITEMS_FILE)
    images = json.loads((tmp_path / "models" / TRAINING_ITEMS_FILE).read_text())["images"]
    assert images == sorted([str(tmp_path / "a.tif"), str(tmp_path / "b.tif"), f"{tmp_path / 'c1.nii'}|{tmp_path / 'c2.nii'}"])
    check_evaluated_items({"train": train, "test": [{"image": "d.tif"}], "unseen": []}, tmp_path / "models")
    with pytest.raises(ValueError, match=r"section 'test': 2 of 3 images, e\.g\. .*b\.tif; section 'unseen': 1 of 1"):
        test = [{"image": "d.tif"}, {"image": "./b.tif"}, {"image": "sub/../a.tif"}]
        check_evaluated_items({"test": test, "unseen": [{"image": ["c1.nii", "c2.nii"]}]}, tmp_path / "models")


def test_a_training_image_under_a_symbolic_link_or_in_an_older_record_is_found(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.tif").write_bytes(b"a")
    (tmp_path / "link").symlink_to(tmp_path / "images")
    record_training_items([{"image": str(tmp_path / "images" / "a.tif")}], tmp_path / "models")
    with pytest.raises(ValueError, match=r"section 'test': 1 of 1 images"):
        check_evaluated_items({"test": [{"image": str(tmp_path / "link" / "a.tif")}]}, tmp_path / "models")
    # a record written before 0.7 holds normalised paths, links unresolved: still compared
    (tmp_path / "models" / TRAINING_ITEMS_FILE).write_text(json.dumps({"images": [str(tmp_path / "link" / "a.tif")]}))
    with pytest.raises(ValueError, match=r"section 'test': 1 of 1 images"):
        check_evaluated_items({"test": [{"image": str(tmp_path / "link" / "a.tif")}]}, tmp_path / "models")


def test_a_training_image_in_a_moved_or_copied_folder_is_found_by_content(tmp_path, caplog):
    """Paths alone missed a training image after the data folder moved (found by helper 50: an evaluation in a copied
    run folder regenerated its data and scored 20 training images)."""
    data = tmp_path / "data"
    data.mkdir()
    for name, content in (("a.tif", b"aaaa"), ("b1.nii", b"b1"), ("b2.nii", b"b2")):
        (data / name).write_bytes(content)
    train = [{"image": str(data / "a.tif")}, {"image": [str(data / "b1.nii"), str(data / "b2.nii")]}]
    record_training_items(train, tmp_path / "models")
    shutil.copytree(data, tmp_path / "copy")
    (tmp_path / "copy" / "new.tif").write_bytes(b"another image")
    copy = tmp_path / "copy"
    check_evaluated_items({"test": [{"image": str(copy / "new.tif")}, {"image": [str(copy / "b1.nii")]}]}, tmp_path / "models")
    with pytest.raises(ValueError, match=r"section 'test': 2 of 3 images, e\.g\. .*copy/a\.tif"):
        both = [str(copy / "b1.nii"), str(copy / "b2.nii")]
        test = [{"image": str(copy / "a.tif")}, {"image": str(copy / "new.tif")}, {"image": both}]
        check_evaluated_items({"test": test}, tmp_path / "models")
    # a record written before 0.8.1 has no contents: compared by path, with a warning that says so
    record = tmp_path / "models" / TRAINING_ITEMS_FILE
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "contents"}))
    with caplog.at_level(logging.WARNING):
        check_evaluated_items({"test": [{"image": str(copy / "a.tif")}]}, tmp_path / "models")
    assert "by path alone" in caplog.text


def test_a_model_without_a_record_is_evaluated_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        check_evaluated_items({"test": [{"image": "a.tif"}]}, tmp_path / "models")
    assert "training_items.json does not exist" in caplog.text


def test_training_split_record_refuses_another_csv_or_settings(tmp_path, caplog):
    from monai_armed.data import check_training_split, record_training_split

    csv = tmp_path / "data.csv"
    csv.write_text("f0,label,cluster\n0.1,1,a\n")
    models = tmp_path / "models"
    models.mkdir()
    with caplog.at_level("WARNING"):
        check_training_split(models, csv, test_fraction=0.2)  # no record yet: a warning, nothing refused
    assert "training_split.json does not exist" in caplog.text
    record_training_split(models, csv, test_fraction=0.2, feature_columns=("f0",))
    check_training_split(models, csv, test_fraction=0.2, feature_columns=("f0",))  # a tuple matches its JSON list
    with pytest.raises(ValueError, match="test_fraction: 0.2 in training, 0.5 now"):
        check_training_split(models, csv, test_fraction=0.5, feature_columns=("f0",))
    csv.write_text("f0,label,cluster\n0.2,1,a\n")
    with pytest.raises(ValueError, match="data.csv is not the content of"):
        check_training_split(models, csv, test_fraction=0.2, feature_columns=("f0",))
