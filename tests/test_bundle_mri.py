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
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export
from monai.data import load_net_with_metadata

from monai_armed.networks import ARMED, ARMEDCNN, load_network_checkpoint
from tests.bundle_workflow import Interrupted, assert_same_training, bundle_workflow, check_tracking, interrupt_before_epoch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "armed_mri_classification"
CONFIGS = BUNDLE / "configs"
SMALL = {
    "subjects_per_site": 6,
    "epochs": 2,
    "image_size": 64,
    "filters": [4, 8, 8, 16, 16, 32, 32],
    "hidden_channels": 16,
    "adversary_hidden": [8],
    "val_interval": 1,
}


def _workflow(config_files, root: Path, workflow_type: str = "train", **override) -> ConfigWorkflow:
    return bundle_workflow(CONFIGS, config_files, root, workflow_type, **override)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mri_bundle")
    workflow = _workflow(["train.json"], root, tracking="mlflow", **SMALL)
    workflow.run()
    workflow.finalize()
    return root


def test_train_writes_checkpoints_metrics_and_figures(trained):
    root = trained
    for name in ("model.pt", "zpredictor.pt", "clusters.json", "model_best_val_auroc.pt"):
        assert (root / "models" / name).is_file(), name
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    assert set(metrics["seen"]) == {"observed", "fixed", "randomized"}
    assert set(metrics["unseen"]) == {"fixed", "inferred"}
    seen = metrics["seen"]["observed"]
    assert {"auroc", "balanced_accuracy", "sensitivity", "specificity", "threshold", "per_cluster"} <= set(seen)
    assert seen["threshold"] == metrics["train"]["observed"]["threshold"], "the Youden point comes from training"
    assert set(seen["per_cluster"]) <= set(json.loads((root / "models" / "clusters.json").read_text())["clusters"])
    assert metrics["unseen"]["fixed"]["n"] == 4 * 6
    for figure in ("intercept_vs_patient_fraction", "random_scale_spread", "gradcam"):
        assert (root / "eval" / "figures" / f"{figure}.png").stat().st_size > 1000, figure
    history = json.loads((root / "eval" / "loss_history.json").read_text())
    assert history["epoch"] == [1, 2] and all(v > 0 for v in history["loss_me"]) and len(history["loss_kl"]) == 2
    summary = json.loads((root / "eval" / "random_effects.json").read_text())
    assert set(summary["groups"]) == {"random_slope", "random_intercept"}


def test_tracking_records_losses_lr_validation_and_report(trained):
    parts = ("loss", "loss_me", "loss_fe", "loss_adv", "loss_gen", "loss_kl", "adv_accuracy")
    check_tracking(trained, parts, SMALL["epochs"], "val_auroc", "seen/fixed/auroc")


def test_train_zpredictor_run_id_retrains_only_the_zpredictor(trained):
    models = trained / "models"
    before = {name: (models / name).stat().st_mtime_ns for name in ("model.pt", "zpredictor.pt")}
    _workflow(["train.json"], trained, run_id="train_zpredictor", **SMALL).run()
    assert (models / "model.pt").stat().st_mtime_ns == before["model.pt"]
    assert (models / "zpredictor.pt").stat().st_mtime_ns > before["zpredictor.pt"]
    state = torch.load(models / "zpredictor.pt", weights_only=True)
    assert state["backbone.out.weight"].shape[0] == 8, "one output per seen site"


def test_evaluate_reloads_and_reproduces_the_metrics(trained):
    root = trained
    before = json.loads((root / "eval" / "metrics.json").read_text())
    _workflow(["train.json", "evaluate.json"], root, **SMALL).run()
    after = json.loads((root / "eval" / "metrics.json").read_text())
    for dataset, mode in (("seen", "observed"), ("seen", "fixed"), ("unseen", "fixed")):  # not the Z-predictor's
        assert after[dataset][mode]["auroc"] == pytest.approx(before[dataset][mode]["auroc"]), (dataset, mode)
    assert set(after["unseen"]) == {"fixed", "inferred"}, "the saved Z-predictor is reloaded"


def _inference(root: Path, datalist: Path, key: str = "test") -> list[dict]:
    small = {k: SMALL[k] for k in ("image_size", "filters", "hidden_channels")}
    _workflow(["inference.json"], root, "inference", datalist_file=str(datalist), data_list_key=key, **small).run()
    with open(root / "eval" / "predictions.csv") as f:
        return list(csv.DictReader(f))


def test_inference_with_seen_unknown_and_missing_sites(trained, caplog):
    root = trained
    datalist = root / "data" / "datalist.json"
    with caplog.at_level("WARNING", logger="monai_armed.transforms.cluster_index"):
        rows = _inference(root, datalist, "unseen")  # sites never seen in training: Z-predictor membership
    assert "cluster 'site08' is not in the vocabulary (8 clusters): treated as unseen (-1)" in caplog.text
    assert len(rows) == 24 and {"image", "cluster", "p_class1"} <= set(rows[0])
    assert all(0.0 <= float(r["p_class1"]) <= 1.0 for r in rows)
    items = json.loads(datalist.read_text())["test"]
    for d in items:
        d["image"] = str(datalist.parent / d["image"])
    no_site = root / "no_site.json"
    no_site.write_text(json.dumps({"test": [{k: v for k, v in d.items() if k != "cluster"} for d in items]}))
    without = _inference(root, no_site)
    assert len(without) == len(items) and all(r["cluster"] == "" for r in without)


def test_datalist_without_cluster_names_the_file(trained, tmp_path):
    items = json.loads((trained / "data" / "datalist.json").read_text())
    items["training"][3].pop("cluster")
    bad = tmp_path / "datalist.json"
    bad.write_text(json.dumps(items))
    workflow = _workflow(["train.json"], tmp_path, generate_default_data=False, dataset_dir=str(tmp_path), **SMALL)
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    message = str(error.value.__cause__)
    assert "datalist.json" in message and "item 3" in message and "missing key(s) ['cluster']" in message


def test_checkpoint_for_other_sites_is_rejected(trained):
    other = ARMED(ARMEDCNN(filters=SMALL["filters"], hidden_channels=16), n_clusters=5, in_shape=(1, 64, 64))
    with pytest.raises(ValueError, match="trained with 8 clusters but the network has 5"):
        load_network_checkpoint(other, str(trained / "models" / "model.pt"))


def test_network_exports_with_ckpt_export_from_inference_json_alone(trained, tmp_path):
    root = tmp_path / "exported"  # the trained model and its vocabulary, no data: nothing is read or generated
    shutil.copytree(trained / "models", root / "models")
    small = {k: SMALL[k] for k in ("image_size", "filters", "hidden_channels")}
    export = {
        "net_id": "network_def",
        "filepath": str(tmp_path / "model.ts"),
        "ckpt_file": str(root / "models" / "model.pt"),
        "meta_file": str(CONFIGS / "metadata.json"),
        "config_file": str(CONFIGS / "inference.json"),
        "bundle_root": str(root),
        "input_shape": [1, 1, 64, 64],
        **small,
    }
    with pytest.raises(RuntimeError, match="_norm_names"):  # the wrapper's hooks cannot be scripted: trace it
        ckpt_export(**export)
    ckpt_export(use_trace=True, **export)
    exported, meta, _ = load_net_with_metadata(str(tmp_path / "model.ts"))
    network = _workflow(["inference.json"], root, "inference", **small).parser.get_parsed_content("network_def")
    load_network_checkpoint(network, str(root / "models" / "model.pt"))
    x = torch.rand(2, 1, 64, 64)
    torch.testing.assert_close(exported(x), network.eval()(x))  # the fixed-effects prediction
    assert meta["version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert sorted(p.name for p in root.iterdir()) == ["models"]



def test_configs_pass_monai_property_checks(trained):
    assert _workflow(["train.json"], trained, **SMALL).check_properties() == []
    inference = _workflow(
        ["inference.json"], trained, "inference", datalist_file=str(trained / "data" / "datalist.json")
    )
    assert inference.check_properties() == []


def test_a_resumed_run_equals_an_uninterrupted_one(trained, tmp_path):
    settings = {**SMALL, "epochs": 4, "generate_default_data": False, "dataset_dir": str(trained / "data")}
    full = _workflow(["train.json"], tmp_path / "full", **settings)
    interrupt_before_epoch(full, None)  # builds the run's objects in the same order as below
    full.run()
    cut = _workflow(["train.json"], tmp_path / "cut", **settings)
    interrupt_before_epoch(cut, 3)
    with pytest.raises(RuntimeError) as crash:
        cut.run()
    assert isinstance(crash.value.__cause__, Interrupted)
    best = tmp_path / "cut" / "models" / "model_best_val_auroc.pt"
    best_before = best.read_bytes()
    _workflow(["train.json"], tmp_path / "cut", resume=True, **settings).run()
    assert_same_training(
        tmp_path / "full",
        tmp_path / "cut",
        ["model.pt", "zpredictor.pt", "model_best_val_auroc.pt", "resume_checkpoint_epoch=4.pt"],
        ["metrics.json", "loss_history.json", "random_effects.json"],
    )
    resumed = torch.load(tmp_path / "cut" / "models" / "resume_checkpoint_epoch=4.pt", weights_only=True)
    tracking = resumed["best_model_tracking"]
    full = torch.load(tmp_path / "full" / "models" / "resume_checkpoint_epoch=4.pt", weights_only=True)
    assert tracking == full["best_model_tracking"] and tracking["best_metric_epoch"] >= 1
    if tracking["best_metric_epoch"] <= 2:  # the best model came before the interruption: the resumed run kept it
        assert best.read_bytes() == best_before


def _checksums(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _user_copy(trained: Path, folder: Path) -> Path:
    """The generated data set as a user's own: its datalist and images, no generator files."""
    folder.mkdir()
    shutil.copytree(trained / "data" / "images", folder / "images")
    shutil.copy(trained / "data" / "datalist.json", folder / "datalist.json")
    return folder


def test_users_dataset_dir_with_generation_left_on_is_refused_before_any_write(trained, tmp_path):
    user = _user_copy(trained, tmp_path / "my_mri")
    before = _checksums(user)
    workflow = _workflow(["train.json"], tmp_path / "run", dataset_dir=str(user), **SMALL)
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    message = str(error.value.__cause__)
    assert str(user) in message and "--generate_default_data False" in message and "did not write" in message
    assert _checksums(user) == before
    assert not (tmp_path / "run" / "models").exists() and not (tmp_path / "run" / "eval").exists()


def test_every_section_and_image_is_checked_before_training(trained, tmp_path):
    user = _user_copy(trained, tmp_path / "my_mri")
    sections = json.loads((user / "datalist.json").read_text())
    del sections["unseen"]
    truncated = user / sections["test"][0]["image"]
    truncated.write_bytes(truncated.read_bytes()[:2000])
    image = nib.load(user / sections["test"][1]["image"])
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[5, 5, 2] = np.nan
    header = image.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, image.affine, header), user / "images" / "nan.nii.gz")
    sections["test"][1]["image"] = "images/nan.nii.gz"
    sections["validation"][0]["label"] = "MCI"
    (user / "datalist.json").write_text(json.dumps(sections))
    workflow = _workflow(["train.json"], tmp_path / "run", generate_default_data=False, dataset_dir=str(user), **SMALL)
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    message = str(error.value.__cause__)
    assert "4 problem(s) found before the run" in message
    assert "has no (or an empty) 'unseen' section" in message
    assert "section 'test', item 0" in message and truncated.name in message
    assert "section 'test', item 1" in message and "nan.nii.gz" in message and "non-finite" in message
    assert "section 'validation', item 0" in message and "'MCI'" in message and "['CN', 'AD']" in message
    assert not (tmp_path / "run" / "models").exists(), "nothing was trained or written"


def test_labels_given_as_names_are_mapped(trained, tmp_path):
    user = _user_copy(trained, tmp_path / "my_mri")
    sections = json.loads((user / "datalist.json").read_text())
    for items in sections.values():
        for item in items:
            item["label"] = ["CN", "AD"][item["label"]]
    (user / "datalist.json").write_text(json.dumps(sections))
    workflow = _workflow(["train.json"], tmp_path / "run", generate_default_data=False, dataset_dir=str(user), **SMALL)
    train = workflow.parser.get_parsed_content("sections#train")
    original = json.loads((trained / "data" / "datalist.json").read_text())["training"]
    assert [item["label"] for item in train] == [item["label"] for item in original]
