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

from monai_armed.data import load_csv_datalist, load_image_datalist, save_csv_datalist, save_predictions_csv
from monai_armed.transforms import ClusterVocabulary


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


def test_cluster_ids_become_text_like_a_csvs(tmp_path):
    clusters = [3, "01", "001", 1, 10, "site a", 2.0]
    items = [{"image": f"{i}.nii", "label": i % 2, "cluster": c} for i, c in enumerate(clusters)]
    path = _write(tmp_path, {"training": items})
    loaded = load_image_datalist(path)
    assert [item["cluster"] for item in loaded] == ["3", "01", "001", "1", "10", "site a", "2.0"]
    # the same data as a CSV gives the same ids and the same vocabulary
    rows = [{"features": [float(i)], "label": i % 2, "cluster": c} for i, c in enumerate(clusters)]
    save_csv_datalist(rows, tmp_path / "same.csv")
    from_csv = load_csv_datalist(tmp_path / "same.csv")
    assert [item["cluster"] for item in from_csv] == [item["cluster"] for item in loaded]
    vocabulary = ClusterVocabulary.from_datalist(loaded)
    assert vocabulary == ClusterVocabulary.from_datalist(from_csv)
    assert vocabulary.clusters == ["001", "01", "1", "10", "2.0", "3", "site a"]


@pytest.mark.parametrize("cluster", [None, "", " ", "NaN", "NA"])
def test_missing_cluster_id_names_file_section_and_item(tmp_path, cluster):
    items = [{"image": "a.nii", "label": 0, "cluster": "s"}, {"image": "b.nii", "label": 1, "cluster": cluster}]
    path = _write(tmp_path, {"training": items, "unseen": items})
    with pytest.raises(ValueError) as err:
        load_image_datalist(path, "training")
    assert "datalist.json, section 'training', item 1, key 'cluster': missing cluster id" in str(err.value)
    # where the cluster is optional (inference), the item is kept without one
    unseen = load_image_datalist(path, "unseen", required_keys=["image"])
    assert [item.get("cluster") for item in unseen] == ["s", None]


def test_nan_cluster_in_json(tmp_path):
    path = tmp_path / "nan.json"
    path.write_text('{"test": [{"image": "a.nii", "label": 0, "cluster": NaN}]}')
    with pytest.raises(ValueError, match=r"nan.json, section 'test', item 0, key 'cluster': missing cluster id nan"):
        load_image_datalist(str(path), "test")


def test_string_labels_need_label_names(tmp_path):
    items = [{"image": "a.nii", "label": "CN", "cluster": "s"}, {"image": "b.nii", "label": "AD", "cluster": "s"}]
    path = _write(tmp_path, {"training": items + [{"image": "c.nii", "label": "MCI", "cluster": "s"}]})
    with pytest.raises(ValueError) as err:
        load_image_datalist(path)
    assert "section 'training', item 0, key 'label': label 'CN' is not an integer class index" in str(err.value)
    assert "pass label_names" in str(err.value)
    with pytest.raises(ValueError, match=r"item 2, key 'label': label 'MCI' is not one of label_names \['CN', 'AD'\]"):
        load_image_datalist(path, label_names=["CN", "AD"])
    path = _write(tmp_path, {"training": items + [{"image": "c.nii", "label": 1, "cluster": "s"}]})
    assert [item["label"] for item in load_image_datalist(path, label_names=["CN", "AD"])] == [0, 1, 1]
    # JSON numbers with a fraction part are class indices too when there are class names
    path = _write(tmp_path, {"training": items + [{"image": "c.nii", "label": 1.0, "cluster": "s"}]})
    assert [item["label"] for item in load_image_datalist(path, label_names=["CN", "AD"])] == [0, 1, 1]
    for bad, message in ((5.0, "label 5 is out of range for label_names"), (0.5, "label 0.5 is not one of label_names")):
        path = _write(tmp_path, {"training": items + [{"image": "c.nii", "label": bad, "cluster": "s"}]})
        with pytest.raises(ValueError, match=rf"item 2, key 'label': {message}"):
            load_image_datalist(path, label_names=["CN", "AD"])


def test_no_key_but_the_image_is_read_as_a_path(tmp_path):
    (tmp_path / "site0").write_text("a file named like the cluster")
    path = _write(tmp_path, {"training": [{"image": ["t1.nii", "t2.nii"], "label": 0, "cluster": "site0"}]})
    (item,) = load_image_datalist(path)
    assert item["image"] == [str(tmp_path / "t1.nii"), str(tmp_path / "t2.nii")] and item["cluster"] == "site0"


def test_prediction_csv_carries_id_columns(tmp_path):
    datalist = [{"image": "a.nii", "cluster": "s1"}, {"image": "b.nii"}]
    out = save_predictions_csv(tmp_path / "p.csv", datalist, torch.tensor([0.25, 0.75]), id_keys=["image"])
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"image": "a.nii", "cluster": "s1", "p_class1": "0.250000"},
        {"image": "b.nii", "cluster": "", "p_class1": "0.750000"},
    ]
