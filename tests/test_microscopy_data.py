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
"""Tests of the synthetic multi-batch live-cell microscopy generator (monai_armed.data.microscopy)."""

from __future__ import annotations

import json
import re
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import monai_armed.data.microscopy as microscopy
from monai_armed.data import ForeignFilesError, load_image_datalist
from monai_armed.data.microscopy import (
    PHENOTYPES,
    apply_batch_signature,
    ensure_microscopy_dataset,
    main,
    make_cell_morphology,
    make_microscopy_batches,
    make_microscopy_dataset,
    render_cell,
    simulate_cell_image,
)

# 5 batches x 4 cells x 2 frames of 32 x 32 pixels, one confounded seen batch (a fraction of a second)
TINY = {
    "n_seen": 3,
    "n_unseen": 2,
    "cells_per_batch": 4,
    "frames_per_cell": 2,
    "size": 32,
    "n_confounded": 1,
    "num_workers": 0,
}
KEYS = {"image", "label", "cluster", "cell", "phenotype", "frame"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return ensure_microscopy_dataset(tmp_path_factory.mktemp("microscopy"), seed=0, **TINY)


def _sections(datalist: Path) -> dict[str, list[dict]]:
    return json.loads(datalist.read_text())


def _items(datalist: Path) -> list[dict]:
    return [item for items in _sections(datalist).values() for item in items]


def _batches(datalist: Path) -> dict[str, dict]:
    return {b["date"]: b for b in json.loads((datalist.parent / "batches.json").read_text())["batches"]}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _border_mean(image: np.ndarray) -> float:
    """Mean of the 3-pixel frame of an image (background: cells stay near the centre), in [0, 1]."""
    scaled = image.astype(float) / np.iinfo(image.dtype).max
    return float(
        np.mean(
            np.concatenate(
                [scaled[:3].ravel(), scaled[-3:].ravel(), scaled[3:-3, :3].ravel(), scaled[3:-3, -3:].ravel()]
            )
        )
    )


def _elongation(mask: np.ndarray) -> float:
    """Log ratio of the principal second moments of a mask (0 for a disc)."""
    low, high = np.linalg.eigvalsh(np.cov(np.stack(np.nonzero(mask)).astype(float)))
    return float(np.log(high / low))


def _roughness(mask: np.ndarray) -> float:
    """Perimeter squared over area (about 4 pi for a smooth disc; protrusions raise it)."""
    perimeter = np.sum(mask ^ ndimage.binary_erosion(mask))
    return float(perimeter**2 / mask.sum())


def test_datalist_schema_and_paths(tiny):
    sections = _sections(tiny)
    assert set(sections) == {"training", "validation", "test", "unseen"}
    assert all(sections.values()), {k: len(v) for k, v in sections.items()}
    batches = _batches(tiny)
    items = _items(tiny)
    assert len(items) == 5 * 4 * 2
    for item in items:
        assert set(item) == KEYS
        assert not Path(item["image"]).is_absolute() and (tiny.parent / item["image"]).is_file()
        assert item["label"] in (0, 1) and item["phenotype"] == PHENOTYPES[item["label"]]
        assert item["cluster"] in batches and date.fromisoformat(item["cluster"])
        batch = batches[item["cluster"]]
        match = re.fullmatch(r"(b\d\d)_p([01])_c(\d{3})", item["cell"])
        assert match and match[1] == batch["batch"] and int(match[2]) == item["label"]
        assert batch["labels"][int(match[3])] == item["label"]
        assert item["image"] == f"images/{item['cell']}_f{item['frame']}.tif"
    # the package's datalist reader resolves the relative paths against the datalist's folder
    train = load_image_datalist(tiny, "training", required_keys=("image", "label", "cluster", "cell"))
    assert Path(train[0]["image"]).is_absolute() and Path(train[0]["image"]).is_file()


def test_split_by_cell_and_unseen_batches(tiny):
    split_of: dict[str, set] = {}
    frames: dict[str, list] = {}
    batches = _batches(tiny)
    for split, items in _sections(tiny).items():
        for item in items:
            split_of.setdefault(item["cell"], set()).add(split)
            frames.setdefault(item["cell"], []).append(item["frame"])
            assert (split == "unseen") == (not batches[item["cluster"]]["seen"])
    assert all(len(splits) == 1 for splits in split_of.values()), "a cell is in more than one split"
    assert all(sorted(f) == [0, 1] for f in frames.values())
    unseen = {d for d, b in batches.items() if not b["seen"]}
    assert len(unseen) == 2 and {i["cluster"] for i in _sections(tiny)["unseen"]} == unseen
    # the unseen batches image both phenotypes
    assert {i["label"] for i in _sections(tiny)["unseen"]} == {0, 1}


def test_split_fractions_stratified_on_batch_and_phenotype(tmp_path):
    params = {"n_seen": 4, "n_unseen": 0, "cells_per_batch": 20, "frames_per_cell": 1, "size": 32, "num_workers": 0}
    sections = _sections(make_microscopy_dataset(tmp_path, seed=1, n_confounded=1, **params))
    counts = {k: len(v) for k, v in sections.items()}
    assert counts["unseen"] == 0 and sum(counts.values()) == 80
    assert abs(counts["training"] - 56) <= 3 and abs(counts["validation"] - 8) <= 3 and abs(counts["test"] - 16) <= 3
    strata = {(i["cluster"], i["label"]) for items in sections.values() for i in items}
    for split in ("training", "test"):
        assert {(i["cluster"], i["label"]) for i in sections[split]} == strata, f"a stratum is missing from {split}"


def test_batches_dates_and_confounding():
    batches = make_microscopy_batches(n_seen=8, n_unseen=3, seed=0, cells_per_batch=24)
    assert make_microscopy_batches(n_seen=8, n_unseen=3, seed=0, cells_per_batch=24) == batches
    assert [b["batch"] for b in batches] == [f"b{i:02d}" for i in range(11)]
    assert [b["seen"] for b in batches] == [True] * 8 + [False] * 3
    dates = [date.fromisoformat(b["date"]) for b in batches]
    assert len(set(dates)) == 11
    assert dates[:8] == sorted(dates[:8]) and dates[8:] == sorted(dates[8:])
    assert [b["date"] for b in make_microscopy_batches(n_seen=8, n_unseen=3, seed=1)] != [b["date"] for b in batches]
    # default: n_seen // 4 seen batches image a single phenotype, one of each; every other batch is balanced
    confounded = [b for b in batches if b["confounded"]]
    assert len(confounded) == 2 and all(b["seen"] for b in confounded)
    assert sorted(b["phenotypes"] for b in confounded) == [["high"], ["low"]]
    for batch in batches:
        assert len(batch["labels"]) == 24
        assert batch["phenotypes"] == [PHENOTYPES[p] for p in sorted(set(batch["labels"]))]
        if batch["confounded"]:
            assert len(set(batch["labels"])) == 1
        else:
            assert sum(batch["labels"]) == 12 and batch["phenotypes"] == ["high", "low"]
    none = make_microscopy_batches(n_seen=4, n_unseen=1, n_confounded=0, cells_per_batch=5)
    assert not any(b["confounded"] for b in none) and all(sum(b["labels"]) in (2, 3) for b in none)


def test_confounded_batch_in_dataset_has_one_phenotype(tiny):
    labels: dict[str, set] = {}
    for item in _items(tiny):
        labels.setdefault(item["cluster"], set()).add(item["label"])
    for day, batch in _batches(tiny).items():
        assert labels[day] == ({batch["labels"][0]} if batch["confounded"] else {0, 1}), day
    assert sum(b["confounded"] for b in _batches(tiny).values()) == 1


def test_deterministic_and_independent_of_workers(tmp_path):
    params = {**TINY, "n_unseen": 1}
    first = make_microscopy_dataset(tmp_path / "a", seed=3, **params)
    again = make_microscopy_dataset(tmp_path / "b", seed=3, **{**params, "num_workers": 2})
    other = make_microscopy_dataset(tmp_path / "c", seed=4, **params)
    files = _files(first.parent)
    assert len(files) == 4 * 4 * 2 + 4  # images, datalist, batches, manifest, ownership file
    assert _files(again.parent) == files
    image = _items(first)[0]["image"]
    assert (other.parent / image).read_bytes() != files[image]


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_dtype_on_disk(tmp_path, dtype):
    datalist = make_microscopy_dataset(tmp_path, seed=0, dtype=dtype, **TINY)
    images = [tifffile.imread(datalist.parent / item["image"]) for item in _items(datalist)]
    assert all(image.dtype == np.dtype(dtype) and image.shape == (32, 32) for image in images)
    assert max(int(image.max()) for image in images) > (255 if dtype == "uint16" else 100)


def test_uint16_is_a_finer_quantisation_of_the_same_images(tmp_path):
    low = make_microscopy_dataset(tmp_path / "u8", seed=0, dtype="uint8", **TINY)
    high = make_microscopy_dataset(tmp_path / "u16", seed=0, dtype="uint16", **TINY)
    for item in _items(low)[:10]:
        a = tifffile.imread(low.parent / item["image"]) / 255.0
        b = tifffile.imread(high.parent / item["image"]) / 65535.0
        np.testing.assert_allclose(a, b, atol=0.5 / 255 + 0.5 / 65535)


def test_batch_effect_strength_sets_batch_differences(tmp_path):
    spread = {}
    for effect in (0.0, 1.0):
        datalist = make_microscopy_dataset(tmp_path / str(effect), seed=0, batch_effect=effect, **TINY)
        background: dict[str, list] = {}
        for item in _items(datalist):
            image = tifffile.imread(datalist.parent / item["image"])
            background.setdefault(item["cluster"], []).append(_border_mean(image))
        means = [np.mean(v) for v in background.values()]
        within = np.mean([np.std(v) for v in background.values()])
        spread[effect] = (float(np.std(means)), float(within))
    (between_0, within_0), (between_1, within_1) = spread[0.0], spread[1.0]
    assert between_0 < 0.003 and between_0 < 2 * within_0, spread  # no batch effect: only sampling noise
    assert between_1 > 0.015 and between_1 > 10 * within_1, spread  # batches differ far more than their images
    # without a batch effect every batch has the same signature; with it, all differ
    neutral = [b["signature"] for b in make_microscopy_batches(seed=0, batch_effect=0.0)]
    assert all(s == neutral[0] for s in neutral)
    assert neutral[0]["gain"] == 1.0 and neutral[0]["illumination_slope"] == 0.0 and neutral[0]["gamma"] == 1.0
    signatures = [b["signature"] for b in make_microscopy_batches(seed=0)]
    assert len({json.dumps(s, sort_keys=True) for s in signatures}) == len(signatures)


def test_batch_effect_keeps_dates_cells_and_splits(tmp_path):
    params = {**TINY, "n_unseen": 1}
    sections = {e: _sections(make_microscopy_dataset(tmp_path / str(e), batch_effect=e, **params)) for e in (0.0, 2.0)}
    assert sections[0.0] == sections[2.0]


def test_phenotypes_differ_in_morphology_in_the_intended_direction():
    rng = np.random.default_rng(0)
    stats: dict[tuple[float, int], list] = {}
    for effect in (1.0, 0.0):
        for label in (0, 1):
            for _ in range(120):
                morphology = make_cell_morphology(label, rng, phenotype_effect=effect)
                image, mask = render_cell(morphology, rng, size=64)
                assert image.shape == (64, 64) and 0.0 <= image.min() and image.max() <= 1.0
                stats.setdefault((effect, label), []).append(
                    [_elongation(mask), _roughness(mask), morphology["nucleus"]["ratio"]]
                )
    mean = {key: np.mean(value, axis=0) for key, value in stats.items()}
    sd = np.std(stats[(1.0, 0)] + stats[(1.0, 1)], axis=0)
    effect_size = (mean[(1.0, 1)] - mean[(1.0, 0)]) / sd
    # "low" (1) cells are more elongated, rougher (protrusions) and have larger nuclei; the groups overlap
    assert np.all(effect_size > 0.5) and np.all(effect_size < 2.5), effect_size
    assert np.all(np.abs(mean[(0.0, 1)] - mean[(0.0, 0)]) / sd < 0.3), "phenotype_effect=0 should remove differences"


def test_simulated_cell_is_centred_and_imaged_in_range():
    batch = make_microscopy_batches(seed=0)[0]
    rng = np.random.default_rng(5)
    for label in (0, 1):
        morphology = make_cell_morphology(label, rng)
        clean, mask = render_cell(morphology, np.random.default_rng(1), size=64)
        centre = np.array(ndimage.center_of_mass(mask))
        assert np.all(np.abs(centre - 31.5) < 10) and 150 < mask.sum() < 64 * 64 / 3
        assert clean[mask].mean() > 3 * clean[~mask].mean()  # the cell is brighter than the empty background
        image = simulate_cell_image(label, batch, np.random.default_rng(1), morphology=morphology)
        assert image.shape == (64, 64) and 0.0 <= image.min() and image.max() <= 1.0
        # a batch dict or its signature give the same image; None gives the clean cell
        again = simulate_cell_image(label, batch["signature"], np.random.default_rng(1), morphology=morphology)
        np.testing.assert_array_equal(image, again)
        np.testing.assert_array_equal(
            simulate_cell_image(label, None, np.random.default_rng(1), morphology=morphology), clean
        )
    large = simulate_cell_image(1, batch, np.random.default_rng(2), size=256)
    assert large.shape == (256, 256)
    observed = apply_batch_signature(np.zeros((64, 64)), batch["signature"], np.random.default_rng(0))
    assert observed.shape == (64, 64) and observed.mean() > 0.0  # background and noise


def test_frames_of_a_cell_are_a_time_lapse(tiny):
    def load(cell: str, frame: int) -> np.ndarray:
        return tifffile.imread(tiny.parent / f"images/{cell}_f{frame}.tif").astype(float).ravel()

    same, other = [], []
    for batch in _batches(tiny).values():
        cells = [f"{batch['batch']}_p{label}_c{i:03d}" for i, label in enumerate(batch["labels"])]
        for i, cell in enumerate(cells):
            assert not np.array_equal(load(cell, 0), load(cell, 1))
            same.append(np.corrcoef(load(cell, 0), load(cell, 1))[0, 1])
            other.append(np.corrcoef(load(cell, 0), load(cells[(i + 1) % len(cells)], 0))[0, 1])
    # two frames of a cell are much alike (the shape drifts a little); two cells of a batch much less so
    assert np.mean(np.greater(same, other)) > 0.9 and np.mean(same) > np.mean(other) + 0.1, (same, other)


def test_cache_reuses_and_regenerates(tmp_path):
    params = dict(TINY)
    datalist = ensure_microscopy_dataset(tmp_path, **params)
    image = tmp_path / _items(datalist)[0]["image"]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    content = image.read_bytes()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # same parameters (num_workers and progress do not count): nothing is rewritten
    assert ensure_microscopy_dataset(tmp_path, **{**params, "num_workers": 2, "progress": True}) == datalist
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    # a changed parameter: regenerated, new hash, new images
    ensure_microscopy_dataset(tmp_path, **{**params, "batch_effect": 0.5})
    assert json.loads((tmp_path / "manifest.json").read_text())["hash"] != manifest["hash"]
    assert image.read_bytes() != content
    # fewer frames: stale images and leftovers of interrupted writes go
    (tmp_path / f"images/.{'0' * 32}.{image.name}").write_bytes(b"partial")  # a save_tiff temporary of a generated file
    ensure_microscopy_dataset(tmp_path, **{**params, "frames_per_cell": 1})
    names = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(names) == 5 * 4 and all(n.endswith("_f0.tif") for n in names)
    # a missing file is noticed
    (tmp_path / "images" / names[3]).unlink()
    ensure_microscopy_dataset(tmp_path, **{**params, "frames_per_cell": 1})
    assert (tmp_path / "images" / names[3]).is_file()
    # a file the generator did not write: refused, nothing touched
    (tmp_path / "images/notes.txt").write_text("mine")
    with pytest.raises(ForeignFilesError, match="notes.txt"):
        ensure_microscopy_dataset(tmp_path, **params)
    assert (tmp_path / "images/notes.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == sorted([*names, "notes.txt"])
    with pytest.raises(TypeError, match="cells"):
        ensure_microscopy_dataset(tmp_path, cells=3)


def test_interrupted_run_leaves_no_datalist(tmp_path, monkeypatch):
    ensure_microscopy_dataset(tmp_path, **TINY)
    calls = []
    render = microscopy._render_job

    def crash(job):
        calls.append(job)
        if len(calls) == 3:
            raise KeyboardInterrupt
        render(job)

    monkeypatch.setattr(microscopy, "_render_job", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_microscopy_dataset(tmp_path, **{**TINY, "seed": 1})
    assert not (tmp_path / "datalist.json").exists() and not (tmp_path / "manifest.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    datalist = ensure_microscopy_dataset(tmp_path, **{**TINY, "seed": 1})
    assert json.loads((tmp_path / "manifest.json").read_text())["parameters"]["seed"] == 1
    assert len(_items(datalist)) == 40


def test_metadata_holds_parameters_and_signatures(tiny):
    content = json.loads((tiny.parent / "batches.json").read_text())
    manifest = json.loads((tiny.parent / "manifest.json").read_text())
    assert content["parameters"] == manifest["parameters"]
    assert content["parameters"]["size"] == 32 and content["parameters"]["split"] == [0.7, 0.1, 0.2]
    assert content["phenotypes"] == ["high", "low"]
    expected = make_microscopy_batches(n_seen=3, n_unseen=2, seed=0, cells_per_batch=4, n_confounded=1)
    assert content["batches"] == expected
    assert {"background", "gain", "gamma", "blur_sigma", "photons", "read_noise"} <= set(expected[0]["signature"])
    assert sorted(manifest["files"]) == sorted([*(i["image"] for i in _items(tiny)), "batches.json", "datalist.json"])


def test_command_line(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--seen-batches", "2", "--unseen-batches", "1", "--cells-per-batch", "2"]
    argv += ["--frames-per-cell", "1", "--size", "32", "--dtype", "uint16", "--num-workers", "0", "--seed", "2"]
    datalist = main(argv)
    assert capsys.readouterr().out.strip() == str(datalist) and datalist == tmp_path / "datalist.json"
    items = _items(datalist)
    assert len(items) == 3 * 2 and tifffile.imread(datalist.parent / items[0]["image"]).dtype == np.uint16
    parameters = json.loads((tmp_path / "manifest.json").read_text())["parameters"]
    assert parameters["seed"] == 2 and parameters["dtype"] == "uint16" and parameters["n_confounded"] == 0
    stamp = datalist.stat().st_mtime_ns
    assert main(argv) == datalist and datalist.stat().st_mtime_ns == stamp  # cached
    main([*argv, "--force"])
    assert datalist.stat().st_mtime_ns != stamp
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--dtype", "float32"])


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_seen": 1}, "n_seen >= 2"),
        ({"n_unseen": -1}, "n_unseen >= 0"),
        ({"cells_per_batch": 1}, "cells_per_batch must be >= 2"),
        ({"frames_per_cell": 0}, "frames_per_cell must be >= 1"),
        ({"size": 16}, "size must be an integer >= 32"),
        ({"size": 40.5}, "size must be an integer >= 32"),
        ({"dtype": "float32"}, r"dtype must be one of \['uint8', 'uint16'\], got 'float32'"),
        ({"split": (0.5, 0.1, 0.1)}, "summing to 1"),
        ({"split": (0.7, 0.3)}, "split must be"),
        ({"split": (0.0, 0.5, 0.5)}, "training > 0"),
        ({"batch_effect": -1.0}, "batch_effect and phenotype_effect must be >= 0"),
        ({"phenotype_effect": -0.5}, "phenotype_effect=-0.5"),
        ({"n_confounded": 3}, r"n_confounded must be in \[0, n_seen - 1\] = \[0, 2\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, params, message):
    with pytest.raises(ValueError, match=message):
        make_microscopy_dataset(tmp_path, **{**TINY, **params})
    with pytest.raises(ValueError, match=message):
        ensure_microscopy_dataset(tmp_path, **{**TINY, **params})
    assert not (tmp_path / "images").exists(), "arguments are checked before anything is written"


def test_bad_cell_arguments_raise_clear_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"phenotype must be a label 0 \('high'\) or 1 \('low'\), got 2"):
        simulate_cell_image(2, None, rng)
    with pytest.raises(ValueError, match="phenotype must be a label"):
        make_cell_morphology("low", rng)
    with pytest.raises(ValueError, match="morphology is of phenotype 0, not the requested 1"):
        simulate_cell_image(1, None, rng, morphology=make_cell_morphology(0, rng))
    with pytest.raises(ValueError, match="phenotype_effect must be >= 0"):
        make_cell_morphology(0, rng, phenotype_effect=-1.0)
    with pytest.raises(ValueError, match="n_seen >= 2"):
        make_microscopy_batches(n_seen=1)
    with pytest.raises(ValueError, match="n_confounded must be in"):
        make_microscopy_batches(n_seen=4, n_confounded=4)
