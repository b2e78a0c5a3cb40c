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
"""The armed_microscopy_autoencoder bundle end to end on a tiny generated data set, and its errors on bad user data."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigWorkflow
from monai.transforms import LoadImage

from monai_armed.data import TiffFileReader, ensure_microscopy_dataset, save_tiff
from monai_armed.engines import AEC_LOSS_KEYS
from tests.bundle_workflow import bundle_workflow, check_tracking, error_messages, export_network

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "armed_microscopy_autoencoder" / "configs"
#: the network's size, shared by train / evaluate / inference
NETWORK = {"image_size": 32, "channels": [4, 8], "strides": [2, 2], "latent_size": 8}
#: tiny training: 3 epochs at a high learning rate make the reconstruction loss fall reliably
TRAINING = {"adversary_hidden": [8], "epochs": 3, "batch_size": 8, "learning_rate": 0.01}
N_SEEN, N_UNSEEN, CELLS, FRAMES = 4, 2, 6, 2


def _workflow(config_files, root: Path, workflow_type: str = "train", **override) -> ConfigWorkflow:
    return bundle_workflow(CONFIGS, config_files, root, workflow_type, **override)


def _train_overrides(dataset_dir: Path, **override) -> dict:
    return {"generate_default_data": False, "dataset_dir": str(dataset_dir), **NETWORK, **TRAINING, **override}


def _inference(root: Path, datalist: Path, key: str, **override) -> list[dict]:
    over = {"datalist_file": str(datalist), "data_list_key": key, **NETWORK, **override}
    _workflow(["inference.json"], root, "inference", **over).run()
    with open(root / "eval" / "inference" / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One tiny generated data set for the module: 4 seen + 2 unseen batches, 6 cells x 2 frames each, 32 x 32."""
    out = tmp_path_factory.mktemp("microscopy") / "data"
    ensure_microscopy_dataset(
        out, seed=0, n_seen=N_SEEN, n_unseen=N_UNSEEN, cells_per_batch=CELLS, frames_per_cell=FRAMES, size=32
    )
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("armed")
    workflow = _workflow(["train.json"], root, tracking="mlflow", **_train_overrides(data_dir))
    workflow.run()
    workflow.finalize()
    return root, json.loads((root / "eval" / "metrics.json").read_text())


def test_train_writes_checkpoint_vocabulary_metrics_history_and_figures(trained):
    root, metrics = trained
    assert set(torch.load(root / "models" / "model.pt", weights_only=True)) == {"model", "zpredictor"}
    assert json.loads((root / "models" / "clusters.json").read_text())["n_clusters"] == N_SEEN
    threshold = json.loads((root / "models" / "ood_threshold.json").read_text())
    assert threshold["metric"] == "recon_mse_fe" and threshold["quantile"] == 0.99
    assert threshold["n_images"] == metrics["train"]["fixed"]["n"], "fitted on every training image"
    assert 0.0 < threshold["mse_median"] <= threshold["threshold"] <= threshold["mse_max"]
    assert set(metrics) == {"train", "seen", "unseen", "latent", "anova_f"}
    assert set(metrics["seen"]) == {"observed", "fixed", "randomized"}
    assert set(metrics["unseen"]) == {"fixed", "inferred"}
    assert set(metrics["train"]) == {"observed", "fixed", "randomized", "inferred"}, "every mode needs its threshold"
    assert metrics["unseen"]["fixed"]["n"] == N_UNSEEN * CELLS * FRAMES
    for mode, summary in metrics["seen"].items():
        assert summary["threshold"] == metrics["train"][mode]["threshold"], mode
        assert 0.0 < summary["mse"] < 0.5 and 0.0 < summary["mse_fe"] < 0.5, mode
    assert set(metrics["latent"]) == {"fe", "re"} and set(metrics["anova_f"]) == {"original", "fe", "me"}
    history = json.loads((root / "eval" / "loss_history.json").read_text())
    assert history["epoch"] == [1, 2, 3]
    assert history["loss_recon_fe"][-1] < history["loss_recon_fe"][0], "the reconstruction improves"
    for figure in ("reconstructions", "latent_embedding"):
        assert (root / "eval" / "figures" / f"{figure}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", figure


@torch.no_grad()
def test_ood_threshold_is_the_quantile_of_the_training_reconstruction_errors(trained, data_dir):
    root, _ = trained
    workflow = _workflow(["train.json", "evaluate.json"], root, **_train_overrides(data_dir))
    workflow.parser.get_parsed_content("load_checkpoints")
    network = workflow.parser.get_parsed_content("network").eval()
    errors = []
    for batch in workflow.parser.get_parsed_content("evaluation#loaders#train"):
        x = batch["image"].float()
        errors.append(((network.reconstruct(x).fe - x) ** 2).flatten(1).mean(1))
    errors = torch.cat(errors).double().numpy()
    threshold = json.loads((root / "models" / "ood_threshold.json").read_text())
    assert threshold["n_images"] == len(errors)
    assert threshold["threshold"] == pytest.approx(float(np.quantile(errors, 0.99)), rel=1e-5)


def test_tracking_records_losses_lr_and_report(trained):
    root, _ = trained
    parts = AEC_LOSS_KEYS  # the armed variant: every part
    check_tracking(root, parts, TRAINING["epochs"], None, "latent/fe/davies_bouldin")


def test_evaluate_reproduces_the_metrics_from_the_checkpoint(trained, data_dir):
    root, before = trained
    _workflow(["train.json", "evaluate.json"], root, **_train_overrides(data_dir)).run()
    after = json.loads((root / "eval" / "metrics.json").read_text())
    for dataset in ("train", "seen", "unseen"):
        assert set(after[dataset]) == set(before[dataset]), dataset
        for mode in before[dataset]:
            for key in ("auroc", "mse"):
                assert after[dataset][mode][key] == pytest.approx(before[dataset][mode][key], abs=1e-6), (dataset, mode)
    assert after["latent"]["fe"] == pytest.approx(before["latent"]["fe"], rel=1e-5)


def test_inference_on_unseen_batches_writes_inferred_maps(trained, data_dir):
    root, _ = trained
    rows = _inference(root, data_dir / "datalist.json", "unseen")
    assert len(rows) == N_UNSEEN * CELLS * FRAMES
    assert {r["effects"] for r in rows} == {"inferred"}, "unseen batches get the Z-predictor's membership"
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in rows)
    assert list(rows[0])[:5] == ["image", "effects", "probability", "recon_mse_fe", "ood"]
    assert [f"latent_fe_{k}" for k in range(NETWORK["latent_size"])] == list(rows[0])[5:]
    assert all(float(r["recon_mse_fe"]) > 0.0 for r in rows) and {r["ood"] for r in rows} <= {"0", "1"}
    out = root / "eval" / "inference"
    assert len(list(out.glob("*.tif"))) == 3 * len(rows)
    stem = Path(rows[0]["image"]).name[: -len(".tif")]
    load = LoadImage(reader=TiffFileReader(dtypes="float32"), image_only=True, ensure_channel_first=True)
    maps = {name: load(str(out / f"{stem}_{name}.tif")) for name in ("recon_fe", "recon_me", "batch_effect")}
    assert maps["recon_fe"].shape == (1, 32, 32) and 0.0 <= float(maps["recon_me"].min()) <= 1.0
    torch.testing.assert_close(maps["batch_effect"], maps["recon_me"] - maps["recon_fe"])


def test_inference_flags_noise_and_saturated_images_and_runs_without_a_threshold_file(trained, data_dir, tmp_path, caplog):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    sections = json.loads((data_dir / "datalist.json").read_text())
    cells = [{"image": str(data_dir / item["image"])} for item in sections["test"][:6]]
    rng = np.random.default_rng(0)
    far = {
        "noise_0": rng.choice(np.array([0, 255], np.uint8), (32, 32)),  # salt and pepper
        "noise_1": rng.choice(np.array([0, 255], np.uint8), (32, 32)),
        "saturated": np.full((32, 32), 255, np.uint8),
    }
    for name, pixels in far.items():
        save_tiff(tmp_path / "odd" / f"{name}.tif", pixels)
    items = cells + [{"image": str(tmp_path / "odd" / f"{name}.tif")} for name in far]
    (tmp_path / "datalist.json").write_text(json.dumps({"test": items}))
    with caplog.at_level(logging.INFO, logger="monai_armed.handlers.autoencoder_outputs"):
        rows = _inference(tmp_path, tmp_path / "datalist.json", "test")
    flags = {Path(r["image"]).stem: r["ood"] for r in rows}
    assert [flags[name] for name in far] == ["1", "1", "1"], flags
    assert {flags[Path(item["image"]).stem] for item in cells} == {"0"}, "test cells of seen batches are not flagged"
    assert f"3 of {len(items)} images are out of distribution" in caplog.text
    # a model trained before the threshold file existed: inference still runs, the flag is left empty
    (tmp_path / "models" / "ood_threshold.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.autoencoder_outputs"):
        rows = _inference(tmp_path, tmp_path / "datalist.json", "test")
    assert {r["ood"] for r in rows} == {""} and all(float(r["recon_mse_fe"]) > 0.0 for r in rows)
    assert "No out-of-distribution threshold file" in caplog.text


def test_conventional_variant_has_no_random_effects(data_dir, tmp_path):
    _workflow(["train.json"], tmp_path, **_train_overrides(data_dir, variant="conventional", epochs=1)).run()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)  # one object: saved unwrapped
    assert "zpredictor" not in state and any(k.startswith("fixed_effects.") for k in state)
    assert not [k for k in state if k.startswith("random_effects.")]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["unseen"]) == {"fixed"} and "inferred" not in metrics["train"]
    assert set(metrics["latent"]) == {"fe"} and set(metrics["anova_f"]) == {"original", "fe"}
    assert metrics["seen"]["observed"]["mse"] == metrics["seen"]["observed"]["mse_fe"]
    rows = _inference(tmp_path, data_dir / "datalist.json", "unseen", variant="conventional")
    assert {r["effects"] for r in rows} == {"fixed"}
    assert not list((tmp_path / "eval" / "inference").glob("*_recon_me.tif"))


def test_train_config_passes_monai_property_checks(trained, data_dir):
    root, _ = trained
    workflow = _workflow(["train.json"], root, **_train_overrides(data_dir))
    assert workflow.check_properties() == []
    assert workflow.max_epochs == TRAINING["epochs"]


def test_inference_config_passes_monai_property_checks(trained, data_dir):
    root, _ = trained
    over = {"datalist_file": str(data_dir / "datalist.json"), "data_list_key": "test", **NETWORK}
    workflow = _workflow(["inference.json"], root, "inference", **over)
    assert workflow.check_properties() == []
    assert type(workflow.evaluator).__name__ == "ARMEDEvaluator"
    assert type(workflow.inferer).__name__ == "AutoencoderInferer"


def _user_dataset(
    data_dir: Path, root: Path, bad_image: Path | None = None, drop_cluster_of: int | None = None
) -> None:
    """``root/datalist.json``: the generated datalist with absolute paths, one training item broken."""
    sections = json.loads((data_dir / "datalist.json").read_text())
    for items in sections.values():
        for item in items:
            item["image"] = str(data_dir / item["image"])
    if bad_image is not None:
        sections["training"][0]["image"] = str(bad_image)
    if drop_cluster_of is not None:
        sections["training"][drop_cluster_of].pop("cluster")
    (root / "datalist.json").write_text(json.dumps(sections))


def _train_error(root: Path, **override) -> str:
    workflow = _workflow(["train.json"], root, **_train_overrides(root, epochs=1, **override))
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    return error_messages(error.value)


def test_datalist_item_without_cluster_names_the_file_and_item(data_dir, tmp_path):
    _user_dataset(data_dir, tmp_path, drop_cluster_of=3)
    message = _train_error(tmp_path)
    assert f"datalist {tmp_path / 'datalist.json'}, section 'training', item 3: missing key(s) ['cluster']" in message


def _write_bad_tiff(kind: str, path: Path, data_dir: Path) -> None:
    if kind == "corrupt":  # a real TIFF cut in half, as by an interrupted copy
        valid = next((data_dir / "images").glob("*.tif")).read_bytes()
        path.write_bytes(valid[: len(valid) // 2])
    elif kind == "rgb":
        save_tiff(path, np.zeros((32, 32, 3), np.uint8), photometric="rgb")
    elif kind == "uint16":
        save_tiff(path, np.full((32, 32), 1000, np.uint16))
    elif kind == "multipage":
        save_tiff(path, np.zeros((3, 32, 32), np.uint8))
    elif kind == "16 bytes":  # a TIFF header and nothing else
        path.write_bytes(b"II*\x00" + bytes(12))
    else:
        with warnings.catch_warnings():  # tifffile warns that a zero-size image is not conformant, and writes it
            warnings.simplefilter("ignore")
            save_tiff(path, np.zeros((0, 0), np.uint8))


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("corrupt", "is not a readable TIFF file"),
        ("rgb", "expected a grayscale (1-channel) image, got 3 samples per pixel (RGB)"),
        ("uint16", "holds uint16 pixels; allowed dtypes are uint8"),
        ("multipage", "holds 3 planes (axes 'QYX', shape (3, 32, 32)); expected one 2D plane (spatial_dims=2)"),
        ("16 bytes", "is empty: it holds no images (the file has a TIFF header but is 16 bytes long"),
        ("empty", "is empty: its image has shape (0, 0)"),
    ],
)
def test_bad_tiff_in_the_datalist_names_the_file(data_dir, tmp_path, kind, expected):
    bad = tmp_path / f"{kind}.tif"
    _write_bad_tiff(kind, bad, data_dir)
    _user_dataset(data_dir, tmp_path, bad_image=bad)
    message = _train_error(tmp_path)
    assert f"'{bad}'" in message and expected in message


def test_image_dtype_uint16_reads_and_scales_uint16_data(tmp_path):
    datalist = ensure_microscopy_dataset(
        tmp_path / "data16", n_seen=2, n_unseen=1, cells_per_batch=10, frames_per_cell=1, size=32, dtype="uint16"
    )
    workflow = _workflow(["train.json"], tmp_path, datalist_file=str(datalist), image_dtype="uint16", **NETWORK)
    item = workflow.parser.get_parsed_content("train#cache")[0]
    raw = tifffile.imread(workflow.parser.get_parsed_content("sections#train")[0]["image"])
    assert raw.dtype == np.uint16 and raw.max() > 255, "the stored intensities use the 16-bit range"
    assert item["image"].shape == (1, 32, 32)
    np.testing.assert_allclose(item["image"][0].numpy(), raw.T / 65535.0, rtol=1e-5, atol=1e-6)


def test_twelve_bit_data_warn_until_intensity_max_is_set(tmp_path, caplog):
    from monai_armed.data import check_intensity_use

    datalist = ensure_microscopy_dataset(
        tmp_path / "data16", n_seen=2, n_unseen=1, cells_per_batch=6, frames_per_cell=1, size=32, dtype="uint16"
    )
    for item in json.loads(Path(datalist).read_text())["training"]:  # a 12-bit camera: values up to 4095
        path = Path(datalist).parent / item["image"] if not Path(item["image"]).is_absolute() else Path(item["image"])
        raw = tifffile.imread(path).astype(np.float64)
        save_tiff(path, (raw / raw.max() * 4095).astype(np.uint16))
    for override, warned in (({}, True), ({"intensity_max": 4095}, False)):
        workflow = _workflow(["train.json"], tmp_path, datalist_file=str(datalist), image_dtype="uint16", **NETWORK, **override)
        caplog.clear()
        with caplog.at_level("WARNING", logger="monai_armed.data.validation"):
            cache, scale = (workflow.parser.get_parsed_content(key) for key in ("train#cache", "intensity_max"))
            largest = check_intensity_use(cache, scale)
        assert ("--intensity_max 4095" in caplog.text) == warned, override
        assert largest == pytest.approx(4095 / 65535 if warned else 1.0, rel=1e-3)
    assert "$monai_armed.data.check_intensity_use(@train::cache, @intensity_max)" in workflow.parser["run"]


def test_image_classifier_uses_the_bundle_norm_and_a_last_single_image_is_dropped(data_dir, tmp_path):
    workflow = _workflow(["train.json"], tmp_path, **_train_overrides(data_dir, batch_size=7))
    norms = [m for m in workflow.parser.get_parsed_content("image_classifier").modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 and m.eps == 1e-3 for m in norms), "the bundle's norm, not Keras' 0.01"
    n_train = len(workflow.parser.get_parsed_content("sections#train"))
    loader = workflow.parser.get_parsed_content("train#dataloader")
    assert loader.drop_last == (n_train % 7 == 1)
    assert all(len(batch["image"]) > 1 for batch in loader)


def test_evaluation_and_inference_must_prepare_images_as_training_did(trained, data_dir, tmp_path):
    root, _ = trained
    record = json.loads((root / "models" / "preprocessing.json").read_text())
    assert record == {"image_dtype": "uint8", "intensity_max": 255.0}
    shutil.copytree(root / "models", tmp_path / "models")
    # 12-bit data trained with intensity_max 4095, evaluated or predicted without it: every prediction shifts silently
    (tmp_path / "models" / "preprocessing.json").write_text(json.dumps({**record, "intensity_max": 4095.0}))
    for run in (
        lambda: _workflow(["train.json", "evaluate.json"], tmp_path, **_train_overrides(data_dir)).run(),
        lambda: _inference(tmp_path, data_dir / "datalist.json", "unseen"),
    ):
        with pytest.raises(RuntimeError) as error:
            run()
        assert "intensity_max: 4095.0 in training, 255.0 now" in str(error.value.__cause__)
    assert not (tmp_path / "eval" / "metrics.json").exists() and not (tmp_path / "eval" / "inference").exists()


def test_checkpoint_for_another_number_of_clusters_is_rejected_by_evaluate(trained, data_dir, tmp_path):
    root, _ = trained
    shutil.copytree(root / "models", tmp_path / "models")
    vocabulary = json.loads((root / "models" / "clusters.json").read_text())
    clusters = vocabulary["clusters"] + ["2099-01-01"]
    (tmp_path / "models" / "clusters.json").write_text(json.dumps({"clusters": clusters, "n_clusters": len(clusters)}))
    workflow = _workflow(["train.json", "evaluate.json"], tmp_path, **_train_overrides(data_dir))
    with pytest.raises(RuntimeError) as error:
        workflow.run()
    assert isinstance(error.value.__cause__, ValueError)
    message = str(error.value.__cause__)
    assert "model.pt was trained with 4 clusters but the network has 5" in message


def test_network_exports_with_ckpt_export_from_inference_json_alone(trained, tmp_path):
    root, _ = trained
    shape = [1, 1, NETWORK["image_size"], NETWORK["image_size"]]
    export = {"key_in_ckpt": "model", "use_trace": True, "input_shape": shape, **NETWORK}
    exported, export_root = export_network(CONFIGS, root / "models", tmp_path, **export)
    network = _workflow(["inference.json"], export_root, "inference", **NETWORK).parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(export_root / "models" / "model.pt", weights_only=True)["model"])
    x = torch.rand(3, 1, NETWORK["image_size"], NETWORK["image_size"])
    torch.testing.assert_close(exported(x), network.eval()(x))  # the fixed-effects phenotype logit
