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

import numpy as np
import pytest
import torch

from monai_armed.data import ensure_spiral_dataset, load_csv_datalist, save_predictions_csv, split_by_cluster
from monai_armed.networks import MixedEffectsMLP, load_network_checkpoint
from monai_armed.report import main as report_main


def _datalist(n_clusters: int = 5, per_cluster: int = 40) -> list[dict]:
    rng = np.random.RandomState(0)
    return [
        {"features": rng.randn(2).astype(np.float32), "label": i % 2, "cluster": f"s{c}"}
        for c in range(n_clusters)
        for i in range(per_cluster)
    ]


def test_split_by_cluster_holds_out_whole_clusters():
    split = split_by_cluster(_datalist(), n_unseen=2, test_fraction=0.25, seed=1)
    seen = {d["cluster"] for d in split["train"]} | {d["cluster"] for d in split["test"]}
    unseen = {d["cluster"] for d in split["unseen"]}
    assert len(unseen) == 2 and not seen & unseen and len(seen) == 3
    assert len(split["unseen"]) == 80 and len(split["train"]) + len(split["test"]) == 120
    assert len(split["test"]) == 30
    # stratified on label x cluster: each seen cluster keeps half positives in the test split
    for cluster in seen:
        labels = [d["label"] for d in split["test"] if d["cluster"] == cluster]
        assert sum(labels) * 2 == len(labels)


def test_split_by_cluster_named_unseen_and_errors():
    data = _datalist()
    assert {d["cluster"] for d in split_by_cluster(data, unseen_clusters=["s4"])["unseen"]} == {"s4"}
    with pytest.raises(ValueError, match=r"unseen_clusters \['nope'\] are not in the datalist"):
        split_by_cluster(data, unseen_clusters=["nope"])
    with pytest.raises(ValueError, match="at least 2 seen clusters"):
        split_by_cluster(data, n_unseen=4)
    with pytest.raises(ValueError, match=r"unseen_clusters must leave at least 2 seen clusters; got 4 of 5"):
        split_by_cluster(data, unseen_clusters=["s1", "s2", "s3", "s4"])
    with pytest.raises(KeyError, match="datalist item 0 lacks 'cluster'"):
        split_by_cluster([{"features": [0.0], "label": 1}])


def test_split_compares_cluster_ids_as_text():
    data = _datalist(n_clusters=3, per_cluster=10)
    for item, name in zip(data, [1, "01", "s2"] * 10):
        item["cluster"] = name
    split = split_by_cluster(data, unseen_clusters=[1], test_fraction=0.2)
    assert {d["cluster"] for d in split["unseen"]} == {1} and len(split["unseen"]) == 10  # "01" is another cluster
    data[7]["cluster"] = float("nan")
    with pytest.raises(ValueError, match="datalist item 7, key 'cluster': missing cluster id"):
        split_by_cluster(data, n_unseen=1)


def test_split_falls_back_when_a_stratum_has_one_sample():
    data = _datalist(n_clusters=3, per_cluster=10)
    data[0]["label"] = 1 - data[0]["label"]
    data.append({"features": np.zeros(2, np.float32), "label": 1, "cluster": "lonely"})
    data.append({"features": np.zeros(2, np.float32), "label": 0, "cluster": "lonely"})
    split = split_by_cluster(data, n_unseen=0, test_fraction=0.3)
    assert len(split["train"]) + len(split["test"]) == len(data)


def test_split_falls_back_when_the_test_part_cannot_hold_every_stratum():
    # 16 label x cluster strata (8 clusters), 4 test items: stratified on the cluster alone would also need 8
    data = [{"features": [0.0], "label": i % 2, "cluster": f"c{i // 4}"} for i in range(40)]
    split = split_by_cluster(data, n_unseen=2, test_fraction=0.1, seed=0)
    assert len(split["test"]) == 4 and len(split["train"]) + len(split["test"]) + len(split["unseen"]) == 40


def test_ensure_spiral_dataset_writes_once_and_keeps_numpy_state(tmp_path):
    np.random.seed(7)
    expected_next = np.random.rand()
    np.random.seed(7)
    path = ensure_spiral_dataset(tmp_path, clusters=3, points_per_cluster=20)
    assert path == tmp_path / "spirals.csv"
    assert np.random.rand() == expected_next
    data = load_csv_datalist(path)
    assert len(data) == 60 and {d["cluster"] for d in data} == {"0", "1", "2"}
    mtime = path.stat().st_mtime_ns
    ensure_spiral_dataset(tmp_path, clusters=3, points_per_cluster=20)
    assert path.stat().st_mtime_ns == mtime, "same parameters: reused"
    ensure_spiral_dataset(tmp_path, clusters=5, points_per_cluster=20)
    assert len(load_csv_datalist(path)) == 100, "other parameters: generated again"


def test_spiral_generation_refuses_a_folder_with_the_users_csv(tmp_path):
    from monai_armed.data import ForeignFilesError

    mine = tmp_path / "spirals.csv"
    mine.write_text("f0,f1,label,cluster\n0.5,0.1,1,siteA\n")
    before = mine.read_bytes()
    with pytest.raises(ForeignFilesError, match="spirals.csv.*--generate_default_data False"):
        ensure_spiral_dataset(tmp_path, clusters=3, points_per_cluster=20)
    assert mine.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["spirals.csv"]


def test_an_edited_spirals_csv_is_never_overwritten(tmp_path):
    from monai_armed.data import ForeignFilesError

    path = ensure_spiral_dataset(tmp_path, clusters=2, points_per_cluster=4)
    edited = path.read_text().replace(",0,0\n", ",1,0\n", 1)
    path.write_text(edited)
    for settings in ({"points_per_cluster": 4}, {"points_per_cluster": 6}):  # the same data set, or another one
        with pytest.raises(ForeignFilesError, match="spirals.csv was changed since the spirals generator wrote it"):
            ensure_spiral_dataset(tmp_path, clusters=2, **settings)
        assert path.read_text() == edited


def test_save_predictions_csv(tmp_path):
    data = [{"cluster_id": "a"}, {"cluster_id": "b"}]
    path = save_predictions_csv(tmp_path / "p.csv", data, torch.tensor([0.25, 0.75]), raw_cluster_key="cluster_id")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"cluster": "a", "p_class1": "0.250000"}, {"cluster": "b", "p_class1": "0.750000"}]
    with pytest.raises(ValueError, match="3 predictions for 2 samples"):
        save_predictions_csv(tmp_path / "q.csv", data, np.zeros(3))
    assert not (tmp_path / "q.csv").exists()


def test_load_network_checkpoint_errors(tmp_path):
    net = MixedEffectsMLP(2, 1, n_clusters=3)
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*missing.pt"):
        load_network_checkpoint(net, str(tmp_path / "missing.pt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt could not be read"):
        load_network_checkpoint(net, str(tmp_path / "corrupt.pt"))
    torch.save({"model": net.state_dict()}, tmp_path / "wrapped.pt")
    other = MixedEffectsMLP(2, 1, n_clusters=3)
    load_network_checkpoint(other, str(tmp_path / "wrapped.pt"), n_clusters=3)
    assert torch.equal(other.random_effects.loc, net.random_effects.loc)
    with pytest.raises(ValueError, match="network has 3 clusters but 4 were expected"):
        load_network_checkpoint(other, str(tmp_path / "wrapped.pt"), n_clusters=4)


def test_report_cli(tmp_path, capsys):
    metrics = {"seen": {"observed": {"accuracy": 0.8}}, "unseen": {"fixed": {"accuracy": 0.7}}}
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    assert report_main([f"armed={tmp_path / 'm.json'}"]) == 0
    out = capsys.readouterr().out
    assert "seen/observed" in out and "0.800" in out and "0.700" in out
    assert report_main([f"armed={tmp_path / 'nope.json'}"]) == 1
    assert report_main(["no-equals-sign"]) == 2
    regression = {"seen": {"observed": {"mse": 0.25, "mae": 0.4, "r2": 0.9}}, "unseen": {"fixed": {"mse": 1.5, "r2": None}}}
    (tmp_path / "r.json").write_text(json.dumps(regression))
    assert report_main([f"lmm={tmp_path / 'r.json'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mse (seen") and "\nr2 (seen" in out and "accuracy" not in out
    assert "0.250" in out and "1.500" in out and "0.900" in out
    # a classifier that reports accuracy (spirals): accuracy; a binary report without it (MRI): AUROC, null values
    # counting as absent; a segmentation report: Dice and HD95
    spirals = {"seen": {"observed": {"accuracy": 0.8, "auroc": 0.91}}}
    (tmp_path / "c.json").write_text(json.dumps(spirals))
    assert report_main([f"armed={tmp_path / 'c.json'}"]) == 0
    assert capsys.readouterr().out.startswith("accuracy (seen")
    binary = {"seen": {"observed": {"auroc": 0.91, "balanced_accuracy": 0.8}}, "unseen": {"fixed": {"auroc": 0.72}}}
    (tmp_path / "b.json").write_text(json.dumps(binary))
    segmentation = {"seen": {"observed": {"dice": 0.85, "hd95": 3.5}}, "unseen": {"fixed": {"dice": 0.8, "hd95": 4.0}}}
    (tmp_path / "s.json").write_text(json.dumps(segmentation))
    assert report_main([f"armed={tmp_path / 'b.json'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("auroc (seen") and "0.910" in out and "0.720" in out and "balanced" not in out
    assert report_main([f"unet={tmp_path / 's.json'}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dice (seen") and "\nhd95 (seen" in out and "0.850" in out and "4.000" in out
    (tmp_path / "x.json").write_text(json.dumps({"seen": {"observed": {"loss": 1.0}}}))
    assert report_main([f"other={tmp_path / 'x.json'}"]) == 1
    assert "they hold ['loss']" in capsys.readouterr().err


def test_atomic_open_keeps_the_old_file_on_error(tmp_path):
    from monai_armed.utils import atomic_open

    path = tmp_path / "sub" / "out.txt"
    with atomic_open(path) as f:
        f.write("first")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "first" and [p.name for p in path.parent.iterdir()] == ["out.txt"]


def test_spiral_true_boundaries_scale_with_each_cluster_radius(tmp_path):
    from monai_armed.data import make_spiral_true_boundary, spiral_radii_file, spiral_true_boundaries

    path = ensure_spiral_dataset(tmp_path, clusters=3, points_per_cluster=20)
    radii = json.loads(spiral_radii_file(path).read_text())["radii"]
    boundaries = spiral_true_boundaries(path, ["2", "0"])
    unit = make_spiral_true_boundary(degrees=360)
    assert set(boundaries) == {-1, 0, 1}
    np.testing.assert_allclose(boundaries[-1], unit)
    np.testing.assert_allclose(boundaries[0], unit * radii["2"])
    np.testing.assert_allclose(boundaries[1], unit * radii["0"])
    with pytest.raises(FileNotFoundError, match="other_radii.json"):
        spiral_true_boundaries(tmp_path / "other.csv", ["0"])


def test_decision_boundaries_accept_one_boundary_per_cluster(tmp_path):
    from monai_armed.visualize import plot_decision_boundaries

    def predict(x, c):
        return torch.sigmoid(x[:, 0])

    boundary = np.stack([np.linspace(-1, 1, 20), np.zeros(20)], axis=1)
    path = plot_decision_boundaries(predict, [-1, 0, 1], tmp_path / "b.png", step=0.2, true_boundary={0: boundary})
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
