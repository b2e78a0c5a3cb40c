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
"""AutoencoderReport: thresholds, reconstruction errors, latent scores and cluster modes against direct computations."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from monai_armed.handlers import AutoencoderReport
from monai_armed.metrics import (
    anova_f_by_cluster,
    binary_metrics,
    image_quality_metrics,
    latent_cluster_scores,
    youden_threshold,
)
from monai_armed.networks import ImageClusterClassifier, MixedEffectsAutoencoder, ZPredictor, random_effects_modules
from tests.test_cluster_mode_report import assert_attached_once

N_CLUSTERS = 3
BINARY_KEYS = ("auroc", "balanced_accuracy", "sensitivity", "specificity", "threshold", "n", "n_positive")


def _net(variant: str = "armed") -> MixedEffectsAutoencoder:
    torch.manual_seed(0)
    net = MixedEffectsAutoencoder(
        2, (1, 32, 32), 1, n_clusters=N_CLUSTERS, variant=variant, channels=(4, 8), strides=(2, 2), latent_size=6
    )
    with torch.no_grad():  # clusters differ clearly, so every mode gives other outputs
        for module in random_effects_modules(net).values():
            module.loc.normal_(0.0, 0.5)
    return net


def _z_predictor() -> ZPredictor:
    torch.manual_seed(1)
    z_predictor = ZPredictor(n_clusters=N_CLUSTERS, backbone=ImageClusterClassifier(2, 1, N_CLUSTERS, channels=(4,)))
    return z_predictor.eval()  # the report restores this mode; the direct computations need eval's BatchNorm


def _batches(n: int, seed: int, cluster: torch.Tensor | None = None, label: torch.Tensor | None = None) -> list[dict]:
    """Dictionary batches of 8 random 32 x 32 images; clusters 0, 1, 2, 0, ... unless given."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, 32, 32, generator=g)
    label = torch.randint(0, 2, (n,), generator=g) if label is None else label
    cluster = torch.arange(n) % N_CLUSTERS if cluster is None else cluster
    return [
        {"image": image[i : i + 8], "label": label[i : i + 8], "cluster": cluster[i : i + 8]} for i in range(0, n, 8)
    ]


def _stack(batches: list[dict], key: str) -> torch.Tensor:
    return torch.cat([b[key] for b in batches])


def _observed_with_z_predictor(x: torch.Tensor, cluster: torch.Tensor, z_predictor: ZPredictor) -> torch.Tensor:
    """Seen rows: one-hot of their cluster; unseen rows (-1): the Z-predictor's soft membership."""
    one_hot = F.one_hot(cluster.clamp(min=0), N_CLUSTERS).float()
    return torch.where((cluster < 0).unsqueeze(1), z_predictor.membership(x), one_hot)


@torch.no_grad()
def _direct(net, batches: list[dict], cluster_of) -> dict:
    """Labels, positive probabilities and reconstruction MSEs computed straight from the network."""
    net.eval()
    x, observed = _stack(batches, "image"), _stack(batches, "cluster")
    cluster = cluster_of(x, observed)
    recon = net.reconstruct(x, cluster)
    own = recon.me if recon.me is not None else recon.fe
    return {
        "label": _stack(batches, "label").numpy(),
        "prob": torch.sigmoid(net(x, cluster)).reshape(-1).numpy(),
        "mse": float(((own.double() - x.double()) ** 2).mean()),
        "mse_fe": float(((recon.fe.double() - x.double()) ** 2).mean()),
    }


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return {
        "train": _batches(32, 0, cluster=torch.tensor([0, 1, 2, -1] * 8)),  # a few unseen rows, left out of latent
        "seen": _batches(24, 1),
        "unseen": _batches(16, 2, cluster=torch.full((16,), -1)),
    }


@pytest.fixture(scope="module")
def armed_report(data, tmp_path_factory):
    net, z_predictor = _net(), _z_predictor()
    out = tmp_path_factory.mktemp("report") / "metrics.json"
    modes = {"seen": ["observed", "fixed", "randomized"], "unseen": ["fixed", "inferred"]}
    report = AutoencoderReport(net, data, modes=modes, z_predictor=z_predictor, output_file=out, seed=3)
    return report, report.run(), out


def test_every_dataset_and_mode_is_reported(armed_report):
    report, results, out = armed_report
    assert list(results) == ["train", "seen", "unseen", "latent", "anova_f"], "the threshold dataset comes first"
    assert set(results["train"]) == {"observed", "fixed", "randomized", "inferred"}, "train runs every needed mode"
    assert set(results["seen"]) == {"observed", "fixed", "randomized"} and set(results["unseen"]) == {
        "fixed",
        "inferred",
    }
    for dataset in ("train", "seen", "unseen"):
        for mode, summary in results[dataset].items():
            assert set(summary) == {*BINARY_KEYS, "mse", "mse_fe"}, (dataset, mode)
    assert results["seen"]["fixed"]["n"] == 24 and results["unseen"]["inferred"]["n"] == 16
    assert set(results["latent"]) == {"fe", "re"} and set(results["latent"]["fe"]) == {
        "davies_bouldin",
        "calinski_harabasz",
    }
    assert set(results["anova_f"]) == {"original", "fe", "me"}
    assert set(results["anova_f"]["me"]) == {"brightness", "contrast", "sharpness", "snr"}
    assert json.loads(out.read_text()) == results


def test_thresholds_of_other_datasets_come_from_train_in_the_same_mode(armed_report, data):
    report, results, _ = armed_report
    net, z_predictor = report.network, report.z_predictor
    cluster_of = {
        "observed": lambda x, c: _observed_with_z_predictor(x, c, z_predictor),
        "fixed": lambda x, c: None,
        "inferred": lambda x, c: z_predictor.membership(x),
    }
    for dataset, mode in (("seen", "observed"), ("seen", "fixed"), ("unseen", "inferred"), ("unseen", "fixed")):
        train = _direct(net, data["train"], cluster_of[mode])
        threshold = youden_threshold(train["label"], train["prob"])
        assert results["train"][mode]["threshold"] == pytest.approx(threshold, abs=1e-6), mode
        other = _direct(net, data[dataset], cluster_of[mode])
        expected = binary_metrics(other["label"], other["prob"], threshold=threshold)
        assert {k: results[dataset][mode][k] for k in BINARY_KEYS} == pytest.approx(expected, abs=1e-6), (dataset, mode)
    assert results["seen"]["randomized"]["threshold"] == results["train"]["randomized"]["threshold"]
    assert results["seen"]["observed"]["threshold"] != results["seen"]["fixed"]["threshold"], "modes differ"


def test_mse_is_the_direct_reconstruction_error(armed_report, data):
    report, results, _ = armed_report
    net, z_predictor = report.network, report.z_predictor
    observed = _direct(net, data["seen"], lambda x, c: c)
    fixed = _direct(net, data["seen"], lambda x, c: None)
    inferred = _direct(net, data["unseen"], lambda x, c: z_predictor.membership(x))
    assert results["seen"]["observed"]["mse"] == pytest.approx(observed["mse"], rel=1e-5)
    assert results["seen"]["fixed"]["mse"] == pytest.approx(fixed["mse"], rel=1e-5)
    assert results["unseen"]["inferred"]["mse"] == pytest.approx(inferred["mse"], rel=1e-5)
    assert results["seen"]["observed"]["mse"] != pytest.approx(results["seen"]["fixed"]["mse"], rel=1e-4)
    for mode in ("observed", "fixed", "randomized"):  # the fixed-effects reconstruction ignores the cluster
        assert results["seen"][mode]["mse_fe"] == pytest.approx(observed["mse_fe"], rel=1e-5)


def test_latent_scores_use_the_seen_rows_of_train(armed_report, data):
    report, results, _ = armed_report
    x, cluster = _stack(data["train"], "image"), _stack(data["train"], "cluster")
    seen = cluster >= 0
    with torch.no_grad():
        latents = report.network.encode(x, cluster)
    assert results["latent"]["fe"] == pytest.approx(latent_cluster_scores(latents.fe[seen], cluster[seen]), rel=1e-5)
    assert results["latent"]["re"] == pytest.approx(latent_cluster_scores(latents.re[seen], cluster[seen]), rel=1e-5)
    with_unseen = latent_cluster_scores(latents.fe, cluster)  # -1 would count as a fourth batch
    assert results["latent"]["fe"]["calinski_harabasz"] != pytest.approx(with_unseen["calinski_harabasz"], rel=1e-3)


@pytest.mark.parametrize("with_z_predictor", [True, False])
def test_unseen_rows_of_observed_use_the_z_predictor_or_fixed_effects(with_z_predictor):
    net = _net()
    z_predictor = _z_predictor() if with_z_predictor else None
    mixed = _batches(24, 4, cluster=torch.tensor([0, -1, 1, -1, 2, -1] * 4))
    report = AutoencoderReport(
        net, {"mixed": mixed}, modes={"mixed": ["observed"]}, z_predictor=z_predictor, threshold_dataset=None,
        latent_dataset="mixed",
    )  # fmt: skip
    summary = report.run()["mixed"]["observed"]
    if with_z_predictor:
        expected = _direct(net, mixed, lambda x, c: _observed_with_z_predictor(x, c, z_predictor))
    else:  # -1 is passed on: zero random effects for the unseen rows
        expected = _direct(net, mixed, lambda x, c: c)
    assert summary["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert summary["auroc"] == pytest.approx(binary_metrics(expected["label"], expected["prob"])["auroc"], abs=1e-6)
    other = _direct(net, mixed, (lambda x, c: c) if with_z_predictor else (lambda x, c: c.clamp(min=0)))
    assert summary["mse"] != pytest.approx(other["mse"], rel=1e-4), "the check tells the two resolutions apart"


def test_fixed_effects_only_variant_has_no_random_effects_outputs(data):
    net = _net("domain_adversarial")
    results = AutoencoderReport(net, data).run()
    assert set(results["seen"]) == {"observed", "fixed", "randomized"}, "no 'inferred' without a Z-predictor"
    for dataset in ("train", "seen", "unseen"):
        for mode, summary in results[dataset].items():
            assert summary["mse"] == summary["mse_fe"], (dataset, mode)
    assert results["seen"]["observed"]["auroc"] == results["seen"]["fixed"]["auroc"], "the cluster is ignored"
    assert set(results["latent"]) == {"fe"} and set(results["anova_f"]) == {"original", "fe"}


def test_randomized_mode_is_reproducible_with_the_same_seed(data):
    net = _net()
    datasets = {"train": data["train"], "seen": data["seen"]}
    first = AutoencoderReport(net, datasets, seed=7).run()
    again = AutoencoderReport(net, datasets, seed=7).run()
    other = AutoencoderReport(net, datasets, seed=8).run()
    assert again["seen"]["randomized"] == first["seen"]["randomized"]
    assert other["seen"]["randomized"]["mse"] != pytest.approx(first["seen"]["randomized"]["mse"], rel=1e-6)
    assert other["seen"]["observed"] == first["seen"]["observed"], "the seed only affects the randomized mode"


def test_nan_metrics_are_written_as_null(data, tmp_path):
    one_class = _batches(16, 5, label=torch.ones(16, dtype=torch.long))
    out = tmp_path / "eval" / "metrics.json"
    results = AutoencoderReport(_net(), {"train": data["train"], "one_class": one_class}, output_file=out).run()
    fixed = results["one_class"]["fixed"]
    assert math.isnan(binary_metrics([1, 1], [0.2, 0.7], threshold=0.5)["auroc"]), "binary_metrics gives NaN here"
    assert fixed["auroc"] is None and fixed["balanced_accuracy"] is None and fixed["specificity"] is None
    assert 0.0 <= fixed["sensitivity"] <= 1.0 and fixed["n_positive"] == 16
    text = out.read_text()
    assert "NaN" not in text and json.loads(text) == results


def test_save_figures_needs_run_and_writes_both_pngs(data, tmp_path):
    report = AutoencoderReport(
        _net(), {"train": data["train"], "seen": data["seen"]}, cluster_names=["d0", "d1", "d2"],
        label_names=["high", "low"],
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"call run\(\) first"):
        report.save_figures(tmp_path)
    report.run()
    paths = report.save_figures(tmp_path / "figures", dataset="seen")
    assert set(paths) == {"reconstructions", "latent_embedding"}
    for name, path in paths.items():
        assert path == str(tmp_path / "figures" / f"{name}.png")
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_constructor_rejects_unknown_datasets(data):
    net = _net()
    with pytest.raises(ValueError, match=r"threshold_dataset 'val' is not one of the datasets \['seen', 'train'\]"):
        AutoencoderReport(net, {"train": data["train"], "seen": data["seen"]}, threshold_dataset="val")
    with pytest.raises(ValueError, match=r"latent_dataset 'train' is not one of the datasets \['seen'\]"):
        AutoencoderReport(net, {"seen": data["seen"]}, threshold_dataset=None)
    # a misspelt ANOVA dataset left the ANOVA out silently (found by helper 51)
    with pytest.raises(ValueError, match=r"anova_dataset 'tset' is not one of the datasets \['seen', 'train'\]"):
        AutoencoderReport(net, {"train": data["train"], "seen": data["seen"]}, anova_dataset="tset")
    assert AutoencoderReport(net, {"train": data["train"]}).anova_dataset is None, "no 'seen' dataset: no ANOVA"
    both = {"train": data["train"], "seen": data["seen"]}
    assert AutoencoderReport(net, both, anova_dataset=None).anova_dataset is None, "None turns the ANOVA off"
    assert AutoencoderReport(net, both).anova_dataset == "seen"
    with pytest.raises(ValueError, match=r"anova_dataset 'seen' is not one of the datasets \['train'\]"):
        AutoencoderReport(net, {"train": data["train"]}, anova_dataset="seen")  # asked for by name: refused


def test_modes_of_no_dataset_are_named_and_attach_is_idempotent(data, caplog):
    with caplog.at_level(logging.WARNING):
        report = AutoencoderReport(_net(), {"train": data["train"], "test": data["seen"]}, modes={"tets": ["fixed"]})
    assert "modes given for ['tets'], which name no dataset" in caplog.text
    assert report.modes["test"] == ["observed", "fixed", "randomized"]
    assert_attached_once(report)


def test_empty_dataset_and_single_class_threshold_dataset_are_named(data):
    with pytest.raises(ValueError, match="dataset 'seen' gave no batches"):
        AutoencoderReport(_net(), {"train": data["train"], "seen": []}).run()
    one_class = _batches(16, 6, label=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="threshold dataset 'train' holds a single class.*for 'seen'"):
        AutoencoderReport(_net(), {"train": one_class, "seen": data["seen"]}).run()
    alone = AutoencoderReport(_net(), {"train": one_class}).run()["train"]["fixed"]  # its own threshold: NaN
    assert alone["threshold"] is None and alone["auroc"] is None


def test_batch_without_cluster_names_the_keys_and_restores_the_mode(data):
    net, z_predictor = _net(), _z_predictor()
    net.train()
    z_predictor.train()
    no_cluster = [{"image": b["image"], "label": b["label"]} for b in data["seen"]]
    report = AutoencoderReport(net, {"train": no_cluster}, z_predictor=z_predictor)
    with pytest.raises(
        KeyError, match=r"needs 'image', 'label' and 'cluster' batches, got \['image', 'label'\] in dataset 'train'"
    ):
        report.run()
    assert net.training and z_predictor.training, "train mode is restored after an error"
    report = AutoencoderReport(net, {"train": data["train"]}, z_predictor=z_predictor)
    report.run()
    assert all(m.training for m in net.modules()) and z_predictor.training, "and after a run"
    net.eval()
    report.run()
    assert not any(m.training for m in net.modules()), "eval mode stays eval mode"


def test_anova_compares_the_seen_batches_only(tmp_path):
    net = _net("conventional")
    cluster = torch.tensor([0, 1, -1, 0, 1, -1, 0, 1] * 2)
    data = {"train": _batches(16, 0, cluster=cluster), "seen": _batches(16, 1, cluster=cluster)}
    results = AutoencoderReport(net, data, modes={"seen": ["fixed"]}).run()
    x, seen = _stack(data["seen"], "image"), cluster >= 0
    want = anova_f_by_cluster(image_quality_metrics(x[seen].numpy()), cluster[seen].numpy())
    assert results["anova_f"]["original"] == pytest.approx(want)


def test_a_single_seen_batch_gives_null_batch_scores_with_a_warning(caplog):
    net = _net("conventional")
    one = {"train": _batches(16, 0, cluster=torch.zeros(16, dtype=torch.long)), "seen": _batches(8, 1)}
    with caplog.at_level("WARNING", logger="monai_armed.handlers.autoencoder_report"):
        results = AutoencoderReport(net, one, modes={"seen": ["fixed"]}).run()
    assert results["latent"] == {"fe": {"davies_bouldin": None, "calinski_harabasz": None}}
    assert "'train' has 1 seen batch(es) in 16 images" in caplog.text
    assert results["seen"]["fixed"]["n"] == 8, "the rest of the report is still written"


def test_multichannel_images_are_reported():
    torch.manual_seed(0)
    net = MixedEffectsAutoencoder(2, (3, 32, 32), 1, n_clusters=N_CLUSTERS, channels=(4, 8), strides=(2, 2), latent_size=6)
    batches = _batches(24, 0)
    for batch in batches:
        batch["image"] = batch["image"].repeat(1, 3, 1, 1) * torch.tensor([1.0, 0.5, 0.25]).reshape(1, 3, 1, 1)
    results = AutoencoderReport(net, {"train": batches, "seen": batches}, modes={"seen": ["observed"]}).run()
    grey = _stack(batches, "image").mean(1).numpy()
    want = anova_f_by_cluster(image_quality_metrics(grey), _stack(batches, "cluster").numpy())
    assert results["anova_f"]["original"] == pytest.approx(want)
    assert set(results["anova_f"]) == {"original", "fe", "me"}


def test_volumes_and_an_anova_dataset_without_seen_batches_are_reported(caplog):
    torch.manual_seed(0)
    net = MixedEffectsAutoencoder(3, (1, 16, 16, 16), 1, n_clusters=N_CLUSTERS, channels=(4, 8), strides=(2, 2), latent_size=6)
    g = torch.Generator().manual_seed(0)
    volumes = [
        {"image": torch.rand(6, 1, 16, 16, 16, generator=g), "label": torch.tensor([0, 1] * 3), "cluster": torch.arange(6) % 3}
        for _ in range(2)
    ]
    unseen = [{**volumes[0], "cluster": torch.full((6,), -1)}]
    results = AutoencoderReport(net, {"train": volumes, "seen": volumes}, modes={"seen": ["observed"]}).run()
    want = anova_f_by_cluster(image_quality_metrics(_stack(volumes, "image").numpy()), _stack(volumes, "cluster").numpy())
    assert results["anova_f"]["original"] == pytest.approx(want)
    with caplog.at_level("WARNING", logger="monai_armed.handlers.autoencoder_report"):
        results = AutoencoderReport(net, {"train": volumes, "unseen": unseen}, anova_dataset="unseen").run()
    assert results["anova_f"]["fe"] == dict.fromkeys(("brightness", "contrast", "sharpness", "snr"))
    assert "dataset 'unseen' has 0 seen batch(es)" in caplog.text
