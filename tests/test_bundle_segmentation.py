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
"""The armed_microscopy_segmentation bundle end to end on a tiny generated data set, and its errors on bad user data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigWorkflow

from monai_armed.data import ensure_nucleus_dataset, save_tiff
from tests.bundle_workflow import bundle_workflow, check_tracking, error_messages, export_network

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "armed_microscopy_segmentation" / "configs"
#: the network's size, shared by train / evaluate / inference
NETWORK = {"channels": [4, 8, 16], "strides": [2, 2], "patch_size": [32, 32]}
TRAINING = {"adversary_hidden": [8], "epochs": 2, "batch_size": 4, "learning_rate": 0.01, "val_interval": 1}
N_SEEN, N_UNSEEN, FIELDS, SIZE = 3, 2, 4, 48


def _workflow(config_files, root: Path, workflow_type: str = "train", **override) -> ConfigWorkflow:
    return bundle_workflow(CONFIGS, config_files, root, workflow_type, **override)


def _train_overrides(dataset_dir: Path, **override) -> dict:
    return {"generate_default_data": False, "dataset_dir": str(dataset_dir), **NETWORK, **TRAINING, **override}


def _inference(root: Path, datalist: Path, key: str, **override) -> list[dict]:
    over = {"datalist_file": str(datalist), "data_list_key": key, **NETWORK, **override}
    _workflow(["inference.json"], root, "inference", **over).run()
    with open(root / "eval" / "inference" / "segmentation.csv", newline="") as f:
        return list(csv.DictReader(f))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One tiny generated data set: 3 seen + 2 unseen batches of 4 fields of 48 x 48 pixels."""
    out = tmp_path_factory.mktemp("nuclei") / "data"
    ensure_nucleus_dataset(out, seed=0, n_seen=N_SEEN, n_unseen=N_UNSEEN, fields_per_batch=FIELDS, size=SIZE)
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("armed_seg")
    workflow = _workflow(["train.json"], root, tracking="mlflow", **_train_overrides(data_dir))
    workflow.run()
    workflow.finalize()
    return root, json.loads((root / "eval" / "metrics.json").read_text())


def test_train_writes_checkpoints_metrics_per_batch_dice_and_figures(trained):
    root, metrics = trained
    assert {p.name for p in (root / "models").glob("*.pt")} >= {"model.pt", "zpredictor.pt"}
    assert json.loads((root / "models" / "clusters.json").read_text())["n_clusters"] == N_SEEN
    assert set(metrics) == {"seen", "unseen"}
    assert set(metrics["seen"]) == {"observed", "fixed", "randomized"}
    assert set(metrics["unseen"]) == {"fixed", "inferred"}
    assert metrics["unseen"]["fixed"]["n"] == N_UNSEEN * FIELDS
    clusters = json.loads((root / "models" / "clusters.json").read_text())["clusters"]
    for dataset, modes in metrics.items():
        for mode, summary in modes.items():
            assert 0.0 <= summary["dice"] <= 1.0, (dataset, mode)
            expected = set(clusters) if dataset == "seen" else {"unseen"}
            assert set(summary["per_cluster"]) <= expected and summary["per_cluster"], (dataset, mode)
    history = json.loads((root / "eval" / "loss_history.json").read_text())
    assert history["epoch"] == [1, 2] and history["loss"][-1] < history["loss"][0]
    for figure in ("overlays_seen", "overlays_unseen", "fixed_vs_mixed", "dice_per_batch"):
        assert (root / "eval" / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure
    effects = json.loads((root / "eval" / "random_effects.json").read_text())
    assert effects  # the per-batch posterior of the head's random effects


def test_tracking_records_losses_dice_and_report(trained):
    root, _ = trained
    check_tracking(root, {"loss", "loss_me", "loss_fe", "loss_gen", "loss_kl"}, TRAINING["epochs"], "val_mean_dice",
                   "unseen/fixed/dice")  # fmt: skip


def test_evaluate_reproduces_the_metrics_from_the_checkpoint(trained, data_dir):
    root, before = trained
    _workflow(["train.json", "evaluate.json"], root, **_train_overrides(data_dir)).run()
    after = json.loads((root / "eval" / "metrics.json").read_text())
    for dataset in before:
        for mode in ("observed", "fixed", "inferred"):
            if mode in before[dataset]:
                assert after[dataset][mode]["dice"] == pytest.approx(before[dataset][mode]["dice"], abs=1e-6)


def test_evaluate_refuses_to_score_the_models_training_images(trained, data_dir, tmp_path):
    root, _ = trained
    record = json.loads((root / "models" / "training_items.json").read_text())
    sections = json.loads((data_dir / "datalist.json").read_text())
    assert record["images"] == sorted(str(data_dir / item["image"]) for item in sections["training"])
    # the data as a regeneration with other settings could leave them: a training field now in the test section
    # (and no longer in the training one: a datalist holding it in both is refused by its own validation)
    _user_dataset(data_dir, tmp_path)
    moved = json.loads((tmp_path / "datalist.json").read_text())
    moved["test"].append(moved["training"].pop(0))
    (tmp_path / "datalist.json").write_text(json.dumps(moved))
    shutil.copytree(root / "models", tmp_path / "models")
    workflow = _workflow(["train.json", "evaluate.json"], tmp_path, **_train_overrides(tmp_path))
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    message = error_messages(error.value)
    assert f"was trained on images that this evaluation would score (section 'test': 1 of {len(moved['test'])} images" in message
    assert not (tmp_path / "eval" / "metrics.json").exists(), "refused before the report"


def test_inference_writes_masks_of_any_input_size_and_statistics(trained, data_dir, tmp_path):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    sections = json.loads((data_dir / "datalist.json").read_text())
    field = tifffile.imread(data_dir / sections["unseen"][0]["image"])
    rng = np.random.default_rng(0)
    # a larger uint16 field that uses a small part of its range, and one smaller than the training patches
    large = np.clip(np.tile(field, (2, 3)).astype(np.uint16) * 12 + 300 + rng.integers(0, 9, (2 * SIZE, 3 * SIZE)), 0, 4095)
    save_tiff(tmp_path / "odd" / "large.tif", large.astype(np.uint16))
    save_tiff(tmp_path / "odd" / "small.tif", field[:20, :28])
    items = [{"image": str(data_dir / sections["unseen"][0]["image"]), "cluster": sections["unseen"][0]["cluster"]},
             {"image": str(data_dir / sections["test"][0]["image"]), "cluster": sections["test"][0]["cluster"]},
             {"image": str(tmp_path / "odd" / "large.tif")}, {"image": str(tmp_path / "odd" / "small.tif")}]  # fmt: skip
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}))
    rows = _inference(tmp_path, tmp_path / "datalist.json", "test", unseen_effects="inferred")
    assert [r["effects"] for r in rows] == ["inferred", "observed", "inferred", "inferred"]
    default = _inference(tmp_path, tmp_path / "datalist.json", "test")  # fixed effects for images of unseen batches
    assert [r["effects"] for r in default] == ["fixed", "observed", "fixed", "fixed"]
    assert list(rows[0]) == ["image", "effects", "height", "width", "fraction_1", "objects_1", "mean_area_1"]
    out = tmp_path / "eval" / "inference"  # the files of the last run
    for row, shape in zip(default, [(SIZE, SIZE), (SIZE, SIZE), (2 * SIZE, 3 * SIZE), (20, 28)]):
        mask = tifffile.imread(out / f"{Path(row['image']).stem}_seg.tif")
        assert mask.dtype == np.uint8 and mask.shape == shape, row["image"]
        assert set(np.unique(mask)) <= {0, 1}
        assert (int(row["height"]), int(row["width"])) == shape
        assert float(row["fraction_1"]) == pytest.approx(float(mask.mean()))


def test_inference_refuses_two_images_of_one_name_before_writing(trained, data_dir, tmp_path):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    field = tifffile.imread(data_dir / json.loads((data_dir / "datalist.json").read_text())["unseen"][0]["image"])
    for folder in ("day1", "day2"):
        save_tiff(tmp_path / folder / "field.tif", field)
    items = [{"image": str(tmp_path / "day1" / "field.tif")}, {"image": str(tmp_path / "day2" / "field.tif")}]
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}))
    with pytest.raises(RuntimeError) as error:
        _inference(tmp_path, tmp_path / "datalist.json", "test")
    message = error_messages(error.value)
    assert f"'{tmp_path / 'day2' / 'field.tif'}' and '{tmp_path / 'day1' / 'field.tif'}' have the same file name stem" in message
    out = tmp_path / "eval" / "inference"
    assert (sorted(out.iterdir()) if out.exists() else []) == [], "refused before the first mask was written"


def test_inference_image_dtype_is_checked_before_the_run(tmp_path):
    image = tmp_path / "field16.tif"
    save_tiff(image, (np.arange(SIZE * SIZE).reshape(SIZE, SIZE) % 4000).astype(np.uint16))
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": str(image)}]}))
    over = {"datalist_file": str(datalist), "data_list_key": "test", **NETWORK}
    accepted = _workflow(["inference.json"], tmp_path, "inference", image_dtype="uint16", **over)
    assert accepted.parser.get_parsed_content("datalist") == [{"image": str(image)}]
    refused = _workflow(["inference.json"], tmp_path, "inference", image_dtype="uint8", **over)
    with pytest.raises(RuntimeError) as error:  # the config parser's, raised from the datalist's ValueError
        refused.parser.get_parsed_content("datalist")
    message = error_messages(error.value)
    assert f"datalist {datalist}, section 'test', item 0, key 'image'" in message
    assert "holds uint16 pixels; allowed dtypes are uint8" in message


def test_every_variant_trains_by_one_switch(data_dir, tmp_path):
    for variant in ("conventional", "domain_adversarial"):
        root = tmp_path / variant
        _workflow(["train.json"], root, **_train_overrides(data_dir, variant=variant, epochs=1)).run()
        state = torch.load(root / "models" / "model.pt", weights_only=True)  # one object: saved unwrapped
        assert any(k.startswith("network.") for k in state) and not [k for k in state if k.startswith("random_")]
        assert not (root / "models" / "zpredictor.pt").exists()
        metrics = json.loads((root / "eval" / "metrics.json").read_text())
        assert metrics["seen"]["observed"]["dice"] == metrics["seen"]["fixed"]["dice"], variant
        assert set(metrics["unseen"]) == {"fixed"}


def test_a_model_with_swapped_norms_runs_inference(data_dir, tmp_path):
    _workflow(["train.json"], tmp_path, **_train_overrides(data_dir, swap_norm=True, epochs=1)).run()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert any(".random_effects." in k for k in state), "ClusterScaleBias layers were trained"
    rows = _inference(tmp_path, data_dir / "datalist.json", "test", swap_norm=True)
    assert {r["effects"] for r in rows} == {"observed"} and len(rows) > 0


def test_train_and_inference_configs_pass_monai_property_checks(trained, data_dir):
    root, _ = trained
    assert _workflow(["train.json"], root, **_train_overrides(data_dir)).check_properties() == []
    over = {"datalist_file": str(data_dir / "datalist.json"), "data_list_key": "test", **NETWORK}
    workflow = _workflow(["inference.json"], root, "inference", **over)
    assert workflow.check_properties() == []
    assert type(workflow.inferer).__name__ == "SlidingWindowInferer"


def _user_dataset(data_dir: Path, root: Path, mask: np.ndarray | None = None) -> Path:
    """``root/datalist.json``: the generated datalist with absolute paths, the first training mask replaced."""
    sections = json.loads((data_dir / "datalist.json").read_text())
    for items in sections.values():
        for item in items:
            item["image"], item["label"] = str(data_dir / item["image"]), str(data_dir / item["label"])
    bad = root / "bad_mask.tif"
    if mask is not None:
        save_tiff(bad, mask)
        sections["training"][0]["label"] = str(bad)
    (root / "datalist.json").write_text(json.dumps(sections))
    return bad


def test_training_images_smaller_than_the_patch_are_padded(data_dir, tmp_path):
    _user_dataset(data_dir, tmp_path)
    sections = json.loads((tmp_path / "datalist.json").read_text())
    first = sections["training"][0]
    small_image, small_mask = tmp_path / "small.tif", tmp_path / "small_mask.tif"
    save_tiff(small_image, tifffile.imread(first["image"])[:20, :28])
    save_tiff(small_mask, tifffile.imread(first["label"])[:20, :28])
    first["image"], first["label"] = str(small_image), str(small_mask)
    (tmp_path / "datalist.json").write_text(json.dumps(sections))
    workflow = _workflow(["train.json"], tmp_path, **_train_overrides(tmp_path, epochs=1, batch_size=len(sections["training"])))
    workflow.run()  # one batch holding every training field, the small one padded to the 32 x 32 patch
    assert workflow.trainer.state.iteration == 1
    assert (tmp_path / "models" / "model.pt").exists()


@pytest.mark.parametrize(
    "mask, expected",
    [
        (np.zeros((SIZE, SIZE + 8), np.uint8), f"has shape ({SIZE + 8}, {SIZE}) (as loaded) but the image"),
        (np.full((SIZE, SIZE), 3, np.uint8), "holds the values [3]; expected class indices 0..1"),
    ],
)
def test_bad_mask_names_the_files_before_training(data_dir, tmp_path, mask, expected):
    bad = _user_dataset(data_dir, tmp_path, mask)
    workflow = _workflow(["train.json"], tmp_path, **_train_overrides(tmp_path, epochs=1))
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    message = error_messages(error.value)
    assert f"section 'training', item 0, key 'label': the mask {bad}" in message and expected in message
    assert not (tmp_path / "models" / "model.pt").exists(), "refused before training"


def test_network_exports_with_ckpt_export_as_documented(trained, tmp_path):
    """The README's traced export: the TorchScript UNet gives the fixed-effects logits at the patch size and at a
    whole field's size."""
    root, _ = trained
    export = {"use_trace": True, "input_shape": [1, 1, *NETWORK["patch_size"]], **NETWORK}
    exported, export_root = export_network(CONFIGS, root / "models", tmp_path, **export)
    network = _workflow(["inference.json"], export_root, "inference", **NETWORK).parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(export_root / "models" / "model.pt", weights_only=True))
    for size in (NETWORK["patch_size"], [48, 64]):
        x = torch.rand(2, 1, *size)
        torch.testing.assert_close(exported(x), network.eval()(x))
