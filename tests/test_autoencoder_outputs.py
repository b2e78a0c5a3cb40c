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
"""write_autoencoder_outputs: TIFF maps equal to the reconstructions in the input orientation, the CSV, and errors."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from monai.transforms import LoadImage

from monai_armed.data import TiffFileReader
from monai_armed.handlers import write_autoencoder_outputs
from monai_armed.networks import ImageClusterClassifier, MixedEffectsAutoencoder, ZPredictor, random_effects_modules

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
    assert list(rows[0]) == ["image", "effects", "probability"] + [f"latent_fe_{k}" for k in range(LATENT)]
    assert [r["image"] for r in rows] == [f"/data/2021-03-0{i % 3}/cell_{i}.tif" for i in range(6)]
    fallback = "inferred" if with_z_predictor else "fixed"
    assert [r["effects"] for r in rows] == ["observed", "observed", fallback, "observed", fallback, "observed"]
    for row, want in zip(rows, expected):
        assert float(row["probability"]) == pytest.approx(want["probability"], abs=1e-6)
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
