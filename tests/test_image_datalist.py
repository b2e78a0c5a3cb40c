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

import csv
import json

import pytest
import torch

from monai_armed.data import load_image_datalist, save_predictions_csv


def _write(tmp_path, content) -> str:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return str(path)


def test_paths_resolve_against_the_datalist_folder_and_labels_stay_numbers(tmp_path):
    path = _write(tmp_path, {"training": [{"image": "images/a.nii.gz", "label": 1, "cluster": "site0"}]})
    (item,) = load_image_datalist(path, "training")
    assert item == {"image": str(tmp_path / "images" / "a.nii.gz"), "label": 1, "cluster": "site0"}


def test_missing_cluster_names_file_section_and_item(tmp_path):
    items = [{"image": "a.nii", "label": 0, "cluster": "s"}, {"image": "b.nii", "label": 1}]
    path = _write(tmp_path, {"training": items})
    with pytest.raises(KeyError, match=r"datalist.json, section 'training', item 1: missing key\(s\) \['cluster'\]"):
        load_image_datalist(path, "training")
    assert len(load_image_datalist(path, "training", required_keys=["image", "label"])) == 2


def test_missing_file_section_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist file not found: .*nope.json"):
        load_image_datalist(str(tmp_path / "nope.json"))
    path = _write(tmp_path, {"training": [{"image": "a", "label": 0, "cluster": 1}]})
    with pytest.raises(KeyError, match=r"has no \(or an empty\) 'unseen' section; it has \['training'\]"):
        load_image_datalist(path, "unseen")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_image_datalist(str(bad))


def test_prediction_csv_carries_id_columns(tmp_path):
    datalist = [{"image": "a.nii", "cluster": "s1"}, {"image": "b.nii"}]
    out = save_predictions_csv(tmp_path / "p.csv", datalist, torch.tensor([0.25, 0.75]), id_keys=["image"])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"image": "a.nii", "cluster": "s1", "p_class1": "0.250000"},
        {"image": "b.nii", "cluster": "", "p_class1": "0.750000"},
    ]
