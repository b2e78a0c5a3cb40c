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
import logging
import os

import numpy as np
import pytest
import torch

from monai_armed.data import (
    csv_feature_columns,
    datalist_to_arrays,
    load_csv_datalist,
    save_csv_datalist,
    save_predictions_csv,
)
from monai_armed.transforms import ClusterVocabulary
from monai_armed.utils import csv_cell


def _write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_round_trip_default_names(tmp_path):
    datalist = [
        {"features": np.array([0.1, -2.5, 3e-8], dtype=np.float32), "label": 1, "cluster": 3},
        {"features": np.array([1.0, 0.0, 7.25], dtype=np.float32), "label": 0, "cluster": "site b"},
    ]
    path = tmp_path / "out.csv"
    save_csv_datalist(datalist, path)
    assert path.read_text().splitlines()[0] == "f0,f1,f2,label,cluster"
    loaded = load_csv_datalist(path)
    for original, item in zip(datalist, loaded):
        assert item["features"].dtype == np.float32
        np.testing.assert_array_equal(item["features"], original["features"])
        assert item["label"] == original["label"] and item["cluster"] == str(original["cluster"])
    assert [f.name for f in tmp_path.iterdir()] == ["out.csv"]


def test_round_trip_named_features_and_arrays(tmp_path):
    datalist = [{"features": [float(i), 2.0 * i], "label": i % 2, "cluster": f"s{i % 3}"} for i in range(5)]
    path = tmp_path / "named.csv"
    save_csv_datalist(datalist, path, feature_names=["age", "bmi"])
    X, y, clusters = datalist_to_arrays(load_csv_datalist(path, feature_columns=["bmi", "age"]))
    assert X.dtype == np.float32 and X.shape == (5, 2) and y.dtype == np.int64
    np.testing.assert_array_equal(X[:, 0], [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(y, [0, 1, 0, 1, 0])
    assert clusters == ["s0", "s1", "s2", "s0", "s1"]


def test_custom_columns_and_default_feature_selection(tmp_path):
    path = _write(tmp_path, "site,x,outcome,y\nA,1.5,1,2\nB,-1,0.0,3\n")
    loaded = load_csv_datalist(path, label_column="outcome", cluster_column="site")
    np.testing.assert_array_equal(loaded[0]["features"], [1.5, 2])
    assert [item["label"] for item in loaded] == [1, 0]
    assert [item["cluster"] for item in loaded] == ["A", "B"]


def test_id_columns_are_kept_as_text_and_never_features(tmp_path):
    path = _write(tmp_path, "pid,x,label,cluster,y\n007,1.5,1,A,2\n\n=8,-1,0,B,3\n", name="ids.csv")
    loaded = load_csv_datalist(path, id_columns=["pid"], line_key="csv_line")
    np.testing.assert_array_equal(loaded[0]["features"], [1.5, 2])
    assert [(item["pid"], item["csv_line"]) for item in loaded] == [("007", 2), ("=8", 4)]
    assert csv_feature_columns(path, id_columns=["pid"]) == ["x", "y"]
    assert csv_feature_columns(path, ["y", "x"], label_column=None, cluster_column="site") == ["y", "x"]
    with pytest.raises(ValueError, match=r"ids.csv: feature_columns include \['pid'\], the label / cluster / id"):
        load_csv_datalist(path, feature_columns=["x", "pid"], id_columns=["pid"])
    with pytest.raises(ValueError, match=r"ids.csv: missing column\(s\) \['patient'\]"):
        load_csv_datalist(path, id_columns=["patient"])
    with pytest.raises(ValueError, match="ids.csv: id_columns is a list of column names, got the string 'pid'"):
        load_csv_datalist(path, id_columns="pid")
    with pytest.raises(ValueError, match=r"ids.csv: id_columns / line_key \['label'\] would replace"):
        load_csv_datalist(path, feature_columns=["x"], line_key="label")
    with pytest.raises(ValueError, match=r"ids.csv: \['pid'\] named twice among id_columns \['pid'\] and line_key"):
        load_csv_datalist(path, id_columns=["pid"], line_key="pid")
    with pytest.raises(ValueError, match=r"\['pid'\] named twice"):
        load_csv_datalist(path, id_columns=["pid", "pid"])
    with pytest.raises(ValueError, match=r"the columns \['p_class1'\] would appear twice"):
        save_predictions_csv(tmp_path / "p.csv", [{"p_class1": "a"}], np.array([0.5]), id_keys=["p_class1"])
    with pytest.raises(ValueError, match="the id key 'cluster_id' is where the raw cluster ids are kept"):
        save_predictions_csv(tmp_path / "p.csv", [{"cluster_id": "A"}], np.array([0.5]), "cluster_id", ["cluster_id"])
    assert not (tmp_path / "p.csv").exists()


def test_a_records_line_is_its_first_when_a_quoted_cell_spans_lines(tmp_path):
    path = _write(tmp_path, 'pid,x,label,cluster\n"a\nb",1,0,A\nc,2,1,B\n"",,,\nd,oops,1,B\n', name="multi.csv")
    with pytest.raises(ValueError, match=r"multi.csv, line 6, column 'x'"):
        load_csv_datalist(path, id_columns=["pid"], line_key="csv_line")
    path.write_text(path.read_text().replace("oops", "3"))
    loaded = load_csv_datalist(path, id_columns=["pid"], line_key="csv_line")
    assert [(item["pid"], item["csv_line"]) for item in loaded] == [("a\nb", 2), ("c", 4), ("d", 6)]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        load_csv_datalist(tmp_path / "nothere.csv")


def test_empty_file(tmp_path):
    path = _write(tmp_path, "", name="blank.csv")
    with pytest.raises(ValueError, match="blank.csv.*empty"):
        load_csv_datalist(path)


def test_header_only(tmp_path):
    path = _write(tmp_path, "f0,label,cluster\n", name="head.csv")
    with pytest.raises(ValueError, match="head.csv.*no data rows"):
        load_csv_datalist(path)


def test_missing_column_lists_missing_and_present(tmp_path):
    path = _write(tmp_path, "f0,f1,label\n1,2,0\n", name="nocluster.csv")
    with pytest.raises(ValueError) as err:
        load_csv_datalist(path, feature_columns=["f0", "f9"])
    message = str(err.value)
    assert "nocluster.csv" in message and "'f9'" in message and "'cluster'" in message
    assert "['f0', 'f1', 'label']" in message


def test_empty_feature_columns_and_the_label_among_the_features_are_refused(tmp_path):
    path = _write(tmp_path, "f0,f1,label,cluster\n1,2,0,a\n", name="leak.csv")
    with pytest.raises(ValueError, match="leak.csv: feature_columns is empty"):
        load_csv_datalist(path, feature_columns=[])
    with pytest.raises(ValueError, match=r"leak.csv: feature_columns include \['label'\], the label / cluster / id column"):
        load_csv_datalist(path, feature_columns=["f0", "label"])


@pytest.mark.parametrize(
    "cell,expected",
    [("abc", "not a number"), ("", "NaN features are not allowed"), ("nan", "NaN features are not allowed")],
)
def test_bad_feature_value_names_file_line_column(tmp_path, cell, expected):
    path = _write(tmp_path, f"f0,f1,label,cluster\n1,2,0,a\n3,{cell},1,b\n", name="bad.csv")
    with pytest.raises(ValueError) as err:
        load_csv_datalist(path)
    message = str(err.value)
    assert "bad.csv" in message and "line 3" in message and "'f1'" in message and expected in message


def test_infinite_feature(tmp_path):
    path = _write(tmp_path, "f0,label,cluster\ninf,0,a\n", name="inf.csv")
    with pytest.raises(ValueError, match="inf.csv, line 2, column 'f0'.*infinite"):
        load_csv_datalist(path)


@pytest.mark.parametrize("label", ["1.5", "yes", ""])
def test_non_integer_label(tmp_path, label):
    path = _write(tmp_path, f"f0,label,cluster\n1,{label},a\n", name="labels.csv")
    with pytest.raises(ValueError, match="labels.csv, line 2, column 'label'.*not an integer"):
        load_csv_datalist(path)


def test_continuous_label_for_regression(tmp_path):
    text = "f0,y,site\n1,1.5,a\n2,-2,b\n3, 3e-1 ,a\n4,131.25,b\n"
    path = _write(tmp_path, text, name="bp.csv")
    datalist = load_csv_datalist(path, label_column="y", cluster_column="site", task="regression")
    assert [item["label"] for item in datalist] == [1.5, -2.0, 0.3, 131.25]
    assert all(type(item["label"]) is float for item in datalist)
    assert [item["cluster"] for item in datalist] == ["a", "b", "a", "b"]
    with pytest.raises(ValueError, match="bp.csv, line 2, column 'y'.*not an integer"):
        load_csv_datalist(path, label_column="y", cluster_column="site")  # classification refuses it, as before
    X, y, clusters = datalist_to_arrays(datalist, task="regression")
    assert y.dtype == np.float32 and y.tolist() == pytest.approx([1.5, -2.0, 0.3, 131.25])
    with pytest.raises(ValueError, match="item 0 has the label 1.5, not a class index; pass task='regression'"):
        datalist_to_arrays(datalist)
    # continuous labels survive a round trip exactly; whole numbers are written as integers
    out = tmp_path / "out.csv"
    save_csv_datalist(datalist, out)
    assert [row[1] for row in csv.reader(out.open())][1:] == ["1.5", "-2", "0.3", "131.25"]
    assert [item["label"] for item in load_csv_datalist(out, task="regression")] == [1.5, -2.0, 0.3, 131.25]


@pytest.mark.parametrize(
    "cell,expected",
    [
        ("abc", "label value 'abc' is not a number"),
        ("", "empty label value; NaN labels are not allowed"),
        ("nan", "NaN labels are not allowed"),
        ("-inf", "infinite labels are not allowed"),
    ],
)
def test_bad_continuous_label_names_file_line_column(tmp_path, cell, expected):
    path = _write(tmp_path, f"f0,label,cluster\n1,0.5,a\n2,{cell},b\n", name="bad_y.csv")
    with pytest.raises(ValueError) as err:
        load_csv_datalist(path, task="regression")
    message = str(err.value)
    assert "bad_y.csv, line 3, column 'label'" in message and expected in message


def test_regression_task_arguments(tmp_path):
    path = _write(tmp_path, "f0,label,cluster\n1,0.5,a\n")
    with pytest.raises(ValueError, match="label_names name classes; a regression"):
        load_csv_datalist(path, label_names=["CN", "AD"], task="regression")
    with pytest.raises(ValueError, match=r"task must be one of \('classification', 'regression'\), got 'ordinal'"):
        load_csv_datalist(path, task="ordinal")
    assert load_csv_datalist(path, label_column=None, task="regression")[0].keys() == {"features", "cluster"}


def test_ragged_row(tmp_path):
    path = _write(tmp_path, "f0,label,cluster\n1,0\n", name="ragged.csv")
    with pytest.raises(ValueError, match="ragged.csv, line 2.*expected 3 cells"):
        load_csv_datalist(path)


def test_empty_cluster(tmp_path):
    path = _write(tmp_path, "f0,label,cluster\n1,0, \n", name="nocl.csv")
    with pytest.raises(ValueError, match="nocl.csv, line 2, column 'cluster'"):
        load_csv_datalist(path)


@pytest.mark.parametrize("cell", ["", " ", "nan", "NaN", "NA", "N/A", "null", "None"])
def test_missing_cluster_id_names_the_line(tmp_path, cell):
    path = _write(tmp_path, f"f0,label,cluster\n1,0,a\n2,1,{cell}\n", name="gaps.csv")
    with pytest.raises(ValueError) as err:
        load_csv_datalist(path)
    assert "gaps.csv, line 3, column 'cluster': missing cluster id" in str(err.value)


def test_cluster_ids_are_the_cells_text(tmp_path):
    path = _write(tmp_path, "f0,label,cluster\n1,0,01\n2,1,001\n3,0, 1 \n4,1,3.0\n5,0,site a\n")
    assert [item["cluster"] for item in load_csv_datalist(path)] == ["01", "001", "1", "3.0", "site a"]
    assert ClusterVocabulary.from_datalist(load_csv_datalist(path)).clusters == ["001", "01", "1", "3.0", "site a"]


def test_labels_by_name(tmp_path):
    path = _write(tmp_path, "f0,dx,cluster\n1,CN,a\n2, AD ,a\n3,1,b\n", name="names.csv")
    loaded = load_csv_datalist(path, label_column="dx", label_names=["CN", "AD"])
    assert [item["label"] for item in loaded] == [0, 1, 1]
    with pytest.raises(ValueError) as err:
        load_csv_datalist(path, label_column="dx")
    assert "names.csv, line 2, column 'dx': label 'CN' is not an integer class index" in str(err.value)
    assert "pass label_names" in str(err.value)


def test_unknown_label_name_or_index_names_the_line(tmp_path):
    path = _write(tmp_path, "f0,dx,cluster\n1,CN,a\n2,MCI,a\n", name="mci.csv")
    with pytest.raises(ValueError, match=r"mci.csv, line 3, column 'dx': label 'MCI' is not one of label_names"):
        load_csv_datalist(path, label_column="dx", label_names=["CN", "AD"])
    path = _write(tmp_path, "f0,dx,cluster\n1,2,a\n", name="two.csv")
    with pytest.raises(ValueError, match=r"two.csv, line 2, column 'dx': label 2 is out of range .*expected 0..1"):
        load_csv_datalist(path, label_column="dx", label_names=["CN", "AD"])
    with pytest.raises(ValueError, match="label_names has duplicate"):
        load_csv_datalist(path, label_column="dx", label_names=["CN", "CN"])


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_undecodable_csv_names_file_line_and_encoding(tmp_path, bom):
    path = tmp_path / "latin.csv"
    path.write_bytes(bom + "f0,label,cluster\n1,0,a\n2,1,Universit\u00e9\n".encode("latin-1"))
    before = path.read_bytes()
    with pytest.raises(ValueError) as err:
        load_csv_datalist(path)
    message = str(err.value)
    offset = before.index(b"\xe9")
    assert f"latin.csv, line 3 (byte {offset}): the file is not valid UTF-8" in message
    assert "encoding='latin-1'" in message and "Re-save it as UTF-8" in message
    assert [item["cluster"] for item in load_csv_datalist(path, encoding="latin-1")][-1] == "Universit\u00e9"
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="latin.csv: unknown text encoding 'latin-99'"):
        load_csv_datalist(path, encoding="latin-99")


def test_optional_cluster_column_absent(tmp_path, caplog):
    path = _write(tmp_path, "f0,f1\n1,2\n3,4\n", name="new.csv")
    with pytest.raises(ValueError, match=r"new.csv: missing column\(s\) \['cluster'\]"):
        load_csv_datalist(path, label_column=None)
    with caplog.at_level(logging.WARNING, logger="monai_armed.data.tabular"):
        loaded = load_csv_datalist(path, label_column=None, require_cluster=False)
    assert [sorted(item) for item in loaded] == [["features"], ["features"]]
    np.testing.assert_array_equal(loaded[1]["features"], [3, 4])
    (message,) = [r.getMessage() for r in caplog.records]
    assert "new.csv: no cluster column 'cluster'" in message and "fixed effects" in message


def test_optional_cluster_cells_may_be_empty(tmp_path, caplog):
    path = _write(tmp_path, "f0,cluster\n1,a\n2,\n3,NA\n4,b\n", name="mixed.csv")
    with caplog.at_level(logging.WARNING, logger="monai_armed.data.tabular"):
        loaded = load_csv_datalist(path, label_column=None, require_cluster=False)
    assert [item.get("cluster") for item in loaded] == ["a", None, None, "b"]
    assert "2 of 4 rows have no cluster id" in caplog.records[0].getMessage()


def test_save_failure_leaves_no_file(tmp_path):
    path = tmp_path / "partial.csv"
    datalist = [{"features": [1.0], "label": 0, "cluster": "a"}, {"features": [2.0], "label": "x", "cluster": "b"}]
    with pytest.raises(ValueError):
        save_csv_datalist(datalist, path)
    assert os.listdir(tmp_path) == []


def test_save_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "keep.csv"
    good = [{"features": [1.0], "label": 0, "cluster": "a"}]
    save_csv_datalist(good, path)
    before = path.read_text()
    with pytest.raises(ValueError):
        save_csv_datalist(good + [{"features": [2.0], "label": "x", "cluster": "b"}], path)
    assert path.read_text() == before and os.listdir(tmp_path) == ["keep.csv"]


def test_save_rejects_inconsistent_inputs(tmp_path):
    with pytest.raises(ValueError, match="same number of features"):
        save_csv_datalist([{"features": [1.0], "label": 0, "cluster": 0}, {"features": [1.0, 2.0]}], tmp_path / "a.csv")
    with pytest.raises(ValueError, match="a.csv.*2 feature names for 1 features"):
        save_csv_datalist([{"features": [1.0], "label": 0, "cluster": 0}], tmp_path / "a.csv", ["u", "v"])
    with pytest.raises(ValueError, match="empty"):
        save_csv_datalist([], tmp_path / "a.csv")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "value, expected",
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1", "'+1"),
        ("-site", "'-site"),
        ("@x", "'@x"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("site-a", "site-a"),
        ("01", "01"),
        ("", ""),
    ],
)
def test_csv_cell_escapes_formula_text(value, expected):
    assert csv_cell(value) == expected


@pytest.mark.parametrize("number", [-0.5, 3, -7, np.float32(-1.25), np.int64(-2), True])
def test_csv_cell_keeps_numbers_as_numbers(number):
    assert csv_cell(number) is number


def test_csv_cell_and_nan_to_none_read_zero_dimensional_arrays_tuples_and_numpy_floats():
    from monai_armed.utils import nan_to_none

    assert csv_cell(np.array(-1.0)) == -1.0 and csv_cell(torch.tensor(-0.5)) == -0.5
    assert csv_cell(np.array("=a")) == "'=a"
    report = nan_to_none({"ci": (0.5, float("nan")), "auroc": np.float32("nan"), "f": [np.float64("inf"), 2]})
    assert report == {"ci": [0.5, None], "auroc": None, "f": [None, 2]}


def test_save_predictions_csv_escapes_text_cells_and_keeps_numbers(tmp_path):
    datalist = [
        {"image": '=HYPERLINK("http://evil","x")', "subject": -3, "cluster": "+1"},
        {"image": "-scan.nii", "subject": 12, "cluster": "@x"},
        {"image": "a.nii", "subject": "s-1", "cluster": "01"},
    ]
    path = save_predictions_csv(tmp_path / "p.csv", datalist, torch.tensor([0.25, 0.5, 0.75]), id_keys=["image", "subject"])
    with open(path, newline="") as f:
        text = f.read()
    assert text.splitlines()[1:] == [
        '"\'=HYPERLINK(""http://evil"",""x"")",-3,\'+1,0.250000',
        "'-scan.nii,12,'@x,0.500000",
        "a.nii,s-1,01,0.750000",
    ]
    rows = list(csv.DictReader(text.splitlines()))
    assert float(rows[0]["subject"]) == -3.0 and float(rows[1]["p_class1"]) == 0.5
    assert rows[2]["cluster"] == "01", "a cluster id of digits stays text, not the number 1"


def test_an_output_that_is_an_input_is_refused(tmp_path):
    from monai_armed.data import check_output_path

    data = tmp_path / "rows.csv"
    data.write_text("f0,label,cluster\n1,0,a\n")
    check_output_path(tmp_path / "predictions.csv", [data])
    with pytest.raises(ValueError, match="the output .*rows.csv is the input .*rows.csv: writing it would replace the input"):
        check_output_path(tmp_path / "sub" / ".." / "rows.csv", [data])
    assert data.read_text() == "f0,label,cluster\n1,0,a\n"
