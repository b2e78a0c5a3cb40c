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
"""write_autoencoder_outputs: TIFF maps equal to the reconstructions in the input orientation, the CSV, the
out-of-distribution flag and its threshold, and errors."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from monai.data import DataLoader, Dataset
from monai.transforms import LoadImage

from torch import nn

from monai_armed.data import TiffFileReader
from monai_armed.engines import ARMEDEvaluator, AutoencoderInferer
from monai_armed.handlers import AutoencoderOutputWriter, fit_ood_threshold, read_ood_threshold, write_autoencoder_outputs
from monai_armed.networks import ImageClusterClassifier, MixedEffectsAutoencoder, ZPredictor, random_effects_modules
from monai_armed.networks.nets.autoencoder import AECOutput

N_CLUSTERS = 3
IN_SHAPE = (1, 32, 16)  # (C, W, H) as TiffFileReader gives it; not square, so a transposed map would not fit
LATENT = 5


pytestmark = pytest.mark.usefixtures("single_thread")


def _net(variant: str = "armed") -> MixedEffectsAutoencoder:
    torch.manual_seed(0)
    net = MixedEffectsAutoencoder(
        2, IN_SHAPE, 1, n_clusters=N_CLUSTERS, variant=variant, channels=(4, 8), strides=(2, 2), latent_size=LATENT
    )
    with torch.no_grad():  # clusters differ clearly, so a wrong cluster gives another reconstruction
        for module in random_effects_modules(net).values():
            module.loc.normal_(0.0, 0.5)
    return net.eval()


def _z_predictor() -> ZPredictor:
    torch.manual_seed(1)
    backbone = ImageClusterClassifier(2, 1, N_CLUSTERS, channels=(4,))
    return ZPredictor(n_clusters=N_CLUSTERS, backbone=backbone).eval()


def _batches(cluster: list[int] | None, seed: int = 0, batch_size: int = 4, path_key: str = "image_path") -> list[dict]:
    """Batches of random images named ``/data/<date>/cell_<i>.tif``, with ``cluster`` unless it is None."""
    n = 6 if cluster is None else len(cluster)
    image = torch.rand(n, *IN_SHAPE, generator=torch.Generator().manual_seed(seed))
    batches = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        batch = {
            "image": image[start:stop],
            path_key: [f"/data/2021-03-0{i % 3}/cell_{i}.tif" for i in range(start, stop)],
        }
        if cluster is not None:
            batch["cluster"] = torch.tensor(cluster[start:stop])
        batches.append(batch)
    return batches


def _read(path: Path) -> torch.Tensor:
    """A written map as the bundle's preprocessing loads it: ``(1, W, H)``."""
    return LoadImage(reader=TiffFileReader(), image_only=True, ensure_channel_first=True)(str(path)).as_tensor()


def _rows(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def _expected(net, batches: list[dict], z_predictor: ZPredictor | None) -> list[dict]:
    """Per image: reconstructions, probability and FE latent with the cluster resolved by hand."""
    expected = []
    for batch in batches:
        x = batch["image"]
        cluster = batch.get("cluster", torch.full((x.shape[0],), -1))
        if z_predictor is not None:  # seen rows: their cluster; unseen or missing ones: the soft membership
            one_hot = F.one_hot(cluster.clamp(min=0), N_CLUSTERS).float()
            cluster = torch.where((cluster < 0).unsqueeze(1), z_predictor.membership(x), one_hot)
        recon = net.reconstruct(x, cluster)
        prob = torch.sigmoid(net(x, cluster)).reshape(-1)
        latent = net.encode(x).fe
        for i in range(x.shape[0]):
            expected.append(
                {
                    "recon_fe": recon.fe[i],
                    "recon_me": recon.me[i] if recon.me is not None else None,
                    "probability": float(prob[i]),
                    "latent": latent[i],
                    "recon_mse_fe": float(((recon.fe[i] - x[i]) ** 2).mean()),
                }
            )
    return expected


@pytest.mark.parametrize("with_z_predictor", [True, False])
def test_maps_are_the_reconstructions_in_the_input_orientation(tmp_path, with_z_predictor):
    net = _net()
    z_predictor = _z_predictor() if with_z_predictor else None
    cluster = [0, 1, -1, 2, -1, 0]
    batches = _batches(cluster)
    csv_path = write_autoencoder_outputs(net, batches, tmp_path, z_predictor=z_predictor)
    assert csv_path == str(tmp_path / "predictions.csv")
    expected = _expected(net, batches, z_predictor)
    for i, want in enumerate(expected):
        maps = {name: _read(tmp_path / f"cell_{i}_{name}.tif") for name in ("recon_fe", "recon_me", "batch_effect")}
        assert tifffile.imread(tmp_path / f"cell_{i}_recon_fe.tif").dtype == np.float32
        assert maps["recon_fe"].shape == IN_SHAPE and maps["recon_fe"].dtype == torch.float32
        torch.testing.assert_close(maps["recon_fe"], want["recon_fe"])
        torch.testing.assert_close(maps["recon_me"], want["recon_me"])
        torch.testing.assert_close(maps["batch_effect"], maps["recon_me"] - maps["recon_fe"])
        assert maps["batch_effect"].abs().max() > 1e-3, "the random effects change the reconstruction"
    rows = _rows(tmp_path)
    columns = ["image", "effects", "probability", "recon_mse_fe", "ood"] + [f"latent_fe_{k}" for k in range(LATENT)]
    assert list(rows[0]) == columns
    assert [r["image"] for r in rows] == [f"/data/2021-03-0{i % 3}/cell_{i}.tif" for i in range(6)]
    fallback = "inferred" if with_z_predictor else "fixed"
    assert [r["effects"] for r in rows] == ["observed", "observed", fallback, "observed", fallback, "observed"]
    for row, want in zip(rows, expected):
        assert float(row["probability"]) == pytest.approx(want["probability"], abs=1e-6)
        assert float(row["recon_mse_fe"]) == pytest.approx(want["recon_mse_fe"], rel=1e-5)
        assert row["ood"] == "", "no threshold given: the flag is empty, not 0"
        latent = [float(row[f"latent_fe_{k}"]) for k in range(LATENT)]
        np.testing.assert_allclose(latent, want["latent"].numpy(), rtol=1e-6, atol=1e-6)


def test_unseen_rows_differ_between_z_predictor_and_fixed_effects(tmp_path):
    net, batches = _net(), _batches([-1, -1])
    write_autoencoder_outputs(net, batches, tmp_path / "inferred", z_predictor=_z_predictor())
    write_autoencoder_outputs(net, batches, tmp_path / "fixed")
    inferred, fixed = _read(tmp_path / "inferred" / "cell_0_recon_me.tif"), _read(
        tmp_path / "fixed" / "cell_0_recon_me.tif"
    )
    assert (inferred - fixed).abs().max() > 1e-4
    torch.testing.assert_close(
        _read(tmp_path / "inferred" / "cell_0_recon_fe.tif"), _read(tmp_path / "fixed" / "cell_0_recon_fe.tif")
    )


def test_missing_cluster_key_falls_back_for_every_image(tmp_path, caplog):
    net, z_predictor = _net(), _z_predictor()
    batches = _batches(None)
    with caplog.at_level("WARNING", logger="monai_armed.handlers.autoencoder_outputs"):
        write_autoencoder_outputs(net, batches, tmp_path, z_predictor=z_predictor)
    assert "6 of 6 images had no seen batch: inferred effects were used for them" in caplog.text
    assert [r["effects"] for r in _rows(tmp_path)] == ["inferred"] * 6
    want = _expected(net, batches, z_predictor)[4]
    torch.testing.assert_close(_read(tmp_path / "cell_4_recon_me.tif"), want["recon_me"])


def test_fixed_effects_only_variant_writes_only_recon_fe(tmp_path):
    net = _net("conventional")
    batches = _batches([0, -1, 2])
    write_autoencoder_outputs(net, batches, tmp_path, z_predictor=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cell_0_recon_fe.tif",
        "cell_1_recon_fe.tif",
        "cell_2_recon_fe.tif",
        "predictions.csv",
    ]
    torch.testing.assert_close(_read(tmp_path / "cell_1_recon_fe.tif"), _expected(net, batches, None)[1]["recon_fe"])
    assert [r["effects"] for r in _rows(tmp_path)] == ["observed", "fixed", "observed"]


def test_path_key_and_ome_tiff_names(tmp_path):
    batches = _batches([0, 1], path_key="source")
    batches[0]["source"] = ["/data/a/first.ome.tif", "/data/b/second.TIFF"]
    write_autoencoder_outputs(_net(), batches, tmp_path, path_key="source")
    assert (tmp_path / "first_recon_fe.tif").is_file() and (tmp_path / "second_batch_effect.tif").is_file()
    assert [r["image"] for r in _rows(tmp_path)] == ["/data/a/first.ome.tif", "/data/b/second.TIFF"]


def test_missing_path_key_is_named_and_nothing_is_half_written(tmp_path):
    batches = _batches([0, 1, 2, 0, 1, 2])  # batches of 4 and 2
    del batches[1]["image_path"]
    with pytest.raises(KeyError, match=r"needs 'image' and 'image_path' in each batch, got \['cluster', 'image'\]"):
        write_autoencoder_outputs(_net(), batches, tmp_path)
    assert not (tmp_path / "predictions.csv").exists(), "no CSV for a run that failed"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files are left"
    with pytest.raises(KeyError, match="'filename'"):
        write_autoencoder_outputs(_net(), _batches([0]), tmp_path / "other", path_key="filename")


def test_empty_loader_and_colliding_names_raise(tmp_path):
    with pytest.raises(ValueError, match="the loader gave no images"):
        write_autoencoder_outputs(_net(), [], tmp_path / "empty")
    assert not (tmp_path / "empty" / "predictions.csv").exists()
    batches = _batches([0, 1])
    batches[0]["image_path"] = ["/data/2021-03-01/cell.tif", "/data/2021-03-02/cell.tif"]
    with pytest.raises(ValueError, match="'/data/2021-03-02/cell.tif' and '/data/2021-03-01/cell.tif' have the same"):
        write_autoencoder_outputs(_net(), batches, tmp_path / "same")
    assert not (tmp_path / "same" / "predictions.csv").exists()


def test_inferer_and_writer_reject_what_they_cannot_handle(tmp_path):
    from monai.inferers import SimpleInferer

    from monai_armed.engines import ARMEDEvaluator, AutoencoderInferer
    from monai_armed.handlers import AutoencoderOutputWriter
    from monai_armed.networks import MixedEffectsMLP

    x = torch.rand(2, *IN_SHAPE)
    out = AutoencoderInferer()(x, _net(), cluster=torch.tensor([0, 1]))
    torch.testing.assert_close(out.recon_re, _net().reconstruct(x, torch.tensor([0, 1])).me)
    with pytest.raises(TypeError, match="needs a network with forward_autoencoder.*MixedEffectsMLP has none"):
        AutoencoderInferer()(torch.rand(2, 4), MixedEffectsMLP(4, 1, n_clusters=2))
    evaluator = ARMEDEvaluator(
        "cpu",
        _batches([0, 1]),
        _net(),
        inferer=SimpleInferer(),
        decollate=False,
        val_handlers=[AutoencoderOutputWriter(tmp_path)],
    )
    with pytest.raises(TypeError, match="pred to be an AECOutput, got Tensor; give the evaluator inferer="):
        evaluator.run()
    assert not list(tmp_path.iterdir()), "nothing is written for a run that cannot write its maps"


def _flat_mse(x: torch.Tensor, recon: torch.Tensor) -> np.ndarray:
    return ((recon - x) ** 2).flatten(1).mean(1).double().numpy()


def test_fit_ood_threshold_is_the_quantile_of_the_training_errors(tmp_path):
    net = _net().train()  # fitting evaluates in eval mode and gives the network back in its mode
    batches = _batches([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    with torch.no_grad():
        net.eval()
        mse = np.concatenate([_flat_mse(b["image"], net.reconstruct(b["image"]).fe) for b in batches])
        net.train()
    assert np.unique(mse.round(8)).size == mse.size, "distinct errors, so the quantile is not trivially the max"
    out = tmp_path / "models" / "ood_threshold.json"
    content = fit_ood_threshold(net, batches, out, quantile=0.9)
    assert net.training
    assert content["threshold"] == pytest.approx(float(np.quantile(mse, 0.9)), rel=1e-6)
    assert mse.min() < content["threshold"] < mse.max()
    assert content["n_images"] == 10 and content["quantile"] == 0.9 and content["metric"] == "recon_mse_fe"
    assert content["mse_max"] == pytest.approx(float(mse.max()), rel=1e-6)
    assert json.loads(out.read_text()) == content
    assert read_ood_threshold(out) == content
    assert fit_ood_threshold(net, batches, quantile=1.0)["threshold"] == pytest.approx(float(mse.max()), rel=1e-6)


@pytest.mark.parametrize("quantile", [0.0, 1.5, -0.1, True, "0.99"])
def test_fit_ood_threshold_rejects_a_bad_quantile(tmp_path, quantile):
    with pytest.raises(ValueError, match=r"quantile must be a number in \(0, 1\]"):
        fit_ood_threshold(_net(), _batches([0]), tmp_path / "t.json", quantile=quantile)
    assert not (tmp_path / "t.json").exists()


def test_fit_ood_threshold_on_no_images_or_a_diverged_model_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="the loader gave no images"):
        fit_ood_threshold(_net(), [], tmp_path / "t.json")
    net = _net()
    with torch.no_grad():
        next(net.fixed_effects.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="6 of 6 images have a non-finite reconstruction error"):
        fit_ood_threshold(net, _batches(None), tmp_path / "t.json")
    assert not list(tmp_path.iterdir())


class _LowPassAutoencoder(nn.Module):
    """A stand-in for a trained autoencoder with a known behaviour: it reconstructs the low frequencies of an image
    (4x4 block means, upsampled), so smooth cells come back almost unchanged and images with fine texture (noise,
    speckle, stripes) do not."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # gives the module a device; 1 leaves the reconstruction as is

    def forward_autoencoder(self, x: torch.Tensor, cluster: torch.Tensor | None = None) -> AECOutput:
        recon = self.scale * F.interpolate(F.avg_pool2d(x, 4), size=x.shape[2:], mode="bilinear", align_corners=False)
        latent = F.avg_pool2d(x, 8).flatten(1)
        logits = latent.mean(1, keepdim=True)
        return AECOutput(logits, logits, None, recon, None, latent, None, [latent], None, x.new_zeros(()))


def _cells(n: int, seed: int) -> torch.Tensor:
    """Smooth ``(n, *IN_SHAPE)`` images in [0, 1]: a dim background and one Gaussian cell at a random place."""
    g = torch.Generator().manual_seed(seed)
    w, h = torch.meshgrid(torch.arange(32.0), torch.arange(16.0), indexing="ij")
    cw, ch = 8 + 16 * torch.rand(n, 1, 1, generator=g), 4 + 8 * torch.rand(n, 1, 1, generator=g)
    amplitude = 0.5 + 0.4 * torch.rand(n, 1, 1, generator=g)
    return (0.1 + amplitude * torch.exp(-((w - cw) ** 2 + (h - ch) ** 2) / 32.0)).unsqueeze(1)


def _named(images: torch.Tensor, prefix: str) -> list[dict]:
    return [{"image": images, "image_path": [f"{prefix}_{i}.tif" for i in range(len(images))]}]


def test_out_of_distribution_images_are_flagged_and_in_distribution_ones_are_not(tmp_path, caplog):
    net = _LowPassAutoencoder()
    threshold_file = tmp_path / "models" / "ood_threshold.json"
    threshold = fit_ood_threshold(net, [{"image": _cells(200, seed=0)}], threshold_file, quantile=0.99)["threshold"]
    images = {
        "cell": _cells(8, seed=1),  # new cells of the training distribution
        "noise": torch.rand(3, *IN_SHAPE, generator=torch.Generator().manual_seed(2)),
        "speckle": torch.where(torch.rand(2, *IN_SHAPE, generator=torch.Generator().manual_seed(3)) < 0.2, 1.0, _cells(2, 4)),
        "checkerboard": (torch.arange(32).view(32, 1) + torch.arange(16)).remainder(2).float().expand(2, 1, 32, 16),
    }
    batches = [batch for name, x in images.items() for batch in _named(x, name)]
    with caplog.at_level(logging.INFO, logger="monai_armed.handlers.autoencoder_outputs"):
        write_autoencoder_outputs(net, batches, tmp_path / "out", ood_threshold=str(threshold_file))
    rows = _rows(tmp_path / "out")
    flagged = {r["image"] for r in rows if r["ood"] == "1"}
    far = ("noise", "speckle", "checkerboard")
    assert flagged == {f"{name}_{i}.tif" for name in far for i in range(len(images[name]))}
    assert {r["ood"] for r in rows if r["image"].startswith("cell")} == {"0"}
    for row in rows:  # the flag is the written error against the threshold
        assert (float(row["recon_mse_fe"]) > threshold) == (row["ood"] == "1"), row["image"]
    expected = f"7 of 15 images are out of distribution (ood = 1): their fixed-effects reconstruction MSE is above {threshold:.6g}"
    assert expected in caplog.text
    # a number works as well as the file
    write_autoencoder_outputs(net, batches, tmp_path / "number", ood_threshold=threshold)
    assert [r["ood"] for r in _rows(tmp_path / "number")] == [r["ood"] for r in rows]


def test_missing_threshold_file_warns_and_leaves_the_flag_empty(tmp_path, caplog):
    missing = tmp_path / "models" / "ood_threshold.json"
    with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.autoencoder_outputs"):
        write_autoencoder_outputs(_net(), _batches([0, 1]), tmp_path / "out", ood_threshold=missing)
    assert f"No out-of-distribution threshold file '{missing}'" in caplog.text
    rows = _rows(tmp_path / "out")
    assert [r["ood"] for r in rows] == ["", ""] and all(float(r["recon_mse_fe"]) > 0 for r in rows)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not a readable out-of-distribution threshold file (invalid JSON"),
        ('{"quantile": 0.99}', "key 'threshold' must be a finite number, got None"),
        ('{"threshold": "0.1"}', "key 'threshold' must be a finite number, got '0.1'"),
        ('{"threshold": NaN}', "key 'threshold' must be a finite number, got nan"),
        ('{"threshold": -1.0}', "key 'threshold' must be >= 0 (a mean squared error), got -1.0"),
        ("[0.1]", "key 'threshold' must be a finite number, got None"),
    ],
)
def test_bad_threshold_file_names_the_file_before_anything_is_written(tmp_path, content, message):
    path = tmp_path / "ood_threshold.json"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        write_autoencoder_outputs(_net(), _batches([0, 1]), tmp_path / "out", ood_threshold=path)
    assert f"'{path}'" in str(error.value) and message in str(error.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("threshold", [-0.1, float("nan"), float("inf"), [0.1]])
def test_bad_threshold_value_is_rejected(tmp_path, threshold):
    with pytest.raises(ValueError, match="ood_threshold must be"):
        AutoencoderOutputWriter(tmp_path, ood_threshold=threshold)


def test_csv_escapes_formula_file_names_and_keeps_numbers_numeric(tmp_path):
    batches = _batches([0, 1, 2])
    batches[0]["image_path"] = ["=HYPERLINK(1).tif", "-cell.tif", "@cell.tif"]
    write_autoencoder_outputs(_net(), batches, tmp_path, ood_threshold=1.0)
    with open(tmp_path / "predictions.csv", newline="") as f:
        text = f.read()
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["image"] for r in rows] == ["'=HYPERLINK(1).tif", "'-cell.tif", "'@cell.tif"]
    assert (tmp_path / "=HYPERLINK(1)_recon_fe.tif").is_file(), "only the CSV cell is escaped, not the file name"
    assert [r["ood"] for r in rows] == ["0", "0", "0"]
    latents = [r[f"latent_fe_{k}"] for r in rows for k in range(LATENT)]
    negative = [cell for cell in latents if cell.startswith("-")]
    assert negative, "some latent values are negative"
    assert all(float(cell) < 0 for cell in negative), "negative numbers are written as numbers, not escaped text"


def test_threshold_file_is_written_atomically_and_replaces_only_itself(tmp_path):
    out = tmp_path / "models" / "ood_threshold.json"
    out.parent.mkdir()
    (out.parent / "model.pt").write_bytes(b"weights")
    before = hashlib.sha256(b"weights").hexdigest()
    fit_ood_threshold(_net(), _batches([0, 1]), out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt", "ood_threshold.json"]
    assert hashlib.sha256((out.parent / "model.pt").read_bytes()).hexdigest() == before


@torch.no_grad()
def test_unseen_rows_get_the_fixed_effects_prediction_as_without_a_cluster():
    net = _net()
    x = _batches([0])[0]["image"].repeat(3, 1, 1, 1)
    cluster = torch.tensor([-1, 1, -1])
    fixed = net(x, None)
    mixed = net(x, cluster)
    torch.testing.assert_close(mixed[[0, 2]], fixed[[0, 2]])
    assert (mixed[1] - fixed[1]).abs().max() > 1e-4, "a seen row goes through the mixer"
    torch.testing.assert_close(net.forward_autoencoder(x, cluster).pred, mixed)


def test_effects_column_names_the_evaluator_cluster_mode(tmp_path):
    net, batches, z_predictor = _net(), _batches([0, 1, -1]), _z_predictor()
    x = batches[0]["image"]
    with torch.no_grad():
        expected = {"fixed": net(x, None), "inferred": net(x, z_predictor.membership(x))}
    for mode, logits in expected.items():
        evaluator = ARMEDEvaluator(
            "cpu", batches, net, z_predictor=z_predictor, inferer=AutoencoderInferer(), decollate=False,
            cluster_mode=mode,
        )  # fmt: skip
        AutoencoderOutputWriter(tmp_path / mode).attach(evaluator)
        evaluator.run()
        rows = _rows(tmp_path / mode)
        assert [r["effects"] for r in rows] == [mode] * 3
        want = torch.sigmoid(logits).reshape(-1).numpy()
        np.testing.assert_allclose([float(r["probability"]) for r in rows], want, rtol=1e-5)


def test_an_output_never_replaces_an_input_image(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    batches = _batches([0, 1])
    for path, image in zip(("cell.tif", "cell_recon_fe.tif"), batches[0]["image"]):
        tifffile.imwrite(folder / path, image[0].numpy())
    batches[0]["image_path"] = [str(folder / "cell.tif"), str(folder / "cell_recon_fe.tif")]
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    with pytest.raises(ValueError, match=r"the output '.*cell_recon_fe.tif' would overwrite the input image"):
        write_autoencoder_outputs(_net(), batches, folder)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before


def test_a_listed_input_named_like_an_output_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    items = []
    for i, name in enumerate(("a.tif", "b.tif", "a_batch_effect.tif")):
        tifffile.imwrite(folder / name, np.full((16, 32), i, np.float32))
        items.append({"image": str(folder / name), "image_path": str(folder / name), "cluster": i})
    loader = DataLoader(Dataset(items, transform=lambda d: {**d, "image": torch.rand(*IN_SHAPE)}), batch_size=1)
    with pytest.raises(ValueError, match="a_batch_effect.tif' would overwrite the input image"):
        write_autoencoder_outputs(_net(), loader, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["a.tif", "a_batch_effect.tif", "b.tif"], "nothing written"


@torch.no_grad()
def test_every_channel_of_a_multichannel_reconstruction_is_written(tmp_path):
    torch.manual_seed(0)
    net = MixedEffectsAutoencoder(
        2, (3, *IN_SHAPE[1:]), 1, n_clusters=N_CLUSTERS, channels=(4, 8), strides=(2, 2), latent_size=LATENT
    ).eval()
    x = torch.rand(2, 3, *IN_SHAPE[1:], generator=torch.Generator().manual_seed(0))
    batches = [{"image": x, "cluster": torch.tensor([0, 2]), "image_path": ["/d/a.tif", "/d/b.tif"]}]
    write_autoencoder_outputs(net, batches, tmp_path)
    recon = net.reconstruct(x, torch.tensor([0, 2]))
    reader = LoadImage(reader=TiffFileReader(channels=3), image_only=True, ensure_channel_first=True)
    torch.testing.assert_close(reader(str(tmp_path / "b_recon_fe.tif")).as_tensor(), recon.fe[1])
    torch.testing.assert_close(reader(str(tmp_path / "a_recon_me.tif")).as_tensor(), recon.me[0])
