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
"""Generated data sets (monai_armed.data.generated): owned folders, manifests with sizes and hashes, reuse only of
complete and intact runs, workers that die with their parent."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from monai_armed.data import ensure_microscopy_dataset, ensure_mri_dataset, make_mri_dataset
from monai_armed.data.generated import (
    MANIFEST,
    OWNER_FILE,
    ForeignFilesError,
    claim_output_dir,
    ensure_generated,
    parameter_hash,
    read_manifest,
    record_planned_files,
    remove_stale_files,
    write_manifest,
)


def _parameters(seed: int = 0, size: int = 4) -> dict:
    return {"seed": seed, "size": size}


def _owns(name: str) -> bool:
    return name in ("data.txt", "datalist.json")


def _make(out_dir, seed: int = 0, size: int = 4):
    """A toy generator: claims its folder, writes one data file, a datalist, the manifest last; counts its runs."""
    out = claim_output_dir(out_dir, "toy", _owns)
    (out / "data.txt").write_text(str(seed * size) * 10)
    (out / "datalist.json").write_text(json.dumps({"training": ["data.txt"]}))
    runs = out.parent / f"{out.name}_runs.txt"
    runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
    write_manifest(out, _parameters(seed, size), ["data.txt"], "toy", datalist="datalist.json")
    return out / "datalist.json"


def _runs(out: Path) -> int:
    return int((out.parent / f"{out.name}_runs.txt").read_text())


def _checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_manifest_records_size_and_hash_of_every_file(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"12345")
    (tmp_path / "datalist.json").write_text("{}")
    path = write_manifest(tmp_path, {"size": 4, "seed": 0}, ["a.tif"], "toy", datalist="datalist.json")
    assert path == tmp_path / MANIFEST
    manifest = read_manifest(tmp_path)
    assert list(manifest) == ["generator", "parameters", "hash", "datalist", "files"]
    assert manifest["hash"] == parameter_hash({"seed": 0, "size": 4})
    assert manifest["files"]["a.tif"] == {"size": 5, "sha256": hashlib.sha256(b"12345").hexdigest()}
    assert set(manifest["files"]) == {"a.tif", "datalist.json"}
    assert read_manifest(tmp_path / "missing") == {}


def test_ensure_generated_reuses_only_a_complete_intact_run_with_the_same_parameters(tmp_path):
    out = tmp_path / "data"
    assert ensure_generated(_make, _parameters, out, {"seed": 1}, ["datalist.json"]) == out / "datalist.json"
    assert (out / OWNER_FILE).is_file()
    ensure_generated(_make, _parameters, out, {"seed": 1}, ["datalist.json"])
    assert _runs(out) == 1, "same parameters, all files intact: reused"
    ensure_generated(_make, _parameters, out, {"seed": 2}, ["datalist.json"])
    assert _runs(out) == 2, "other parameters: generated again"
    (out / "data.txt").unlink()
    ensure_generated(_make, _parameters, out, {"seed": 2}, ["datalist.json"])
    assert _runs(out) == 3, "a file of the manifest is missing: generated again"
    # a changed data file may be a user's edit: refused, untouched; deleted, it is written again
    for changed in ("2", "9" * 20):
        (out / "data.txt").write_text(changed)
        with pytest.raises(ForeignFilesError, match=r"data.txt was changed since the toy generator wrote it"):
            ensure_generated(_make, _parameters, out, {"seed": 2}, ["datalist.json"])
        assert _runs(out) == 3 and (out / "data.txt").read_text() == changed
    (out / "data.txt").unlink()
    ensure_generated(_make, _parameters, out, {"seed": 2}, ["datalist.json"])
    assert _runs(out) == 4 and (out / "data.txt").read_text() == "8" * 10


def test_a_folder_with_the_users_files_is_refused_before_anything_is_written(tmp_path):
    user = tmp_path / "my_data"
    (user / "images").mkdir(parents=True)
    (user / "datalist.json").write_text(json.dumps({"training": [{"image": "images/a.nii.gz", "label": 1}]}))
    (user / "manifest.json").write_text(json.dumps({"scanner": "mine"}))
    (user / "images" / "a.nii.gz").write_bytes(b"my scan")
    before = _checksums(user)
    with pytest.raises(ForeignFilesError) as err:
        ensure_generated(_make, _parameters, user, {"seed": 1}, ["datalist.json"])
    message = str(err.value)
    assert str(user) in message and "--generate_default_data False" in message
    assert "datalist.json" in message or "images/a.nii.gz" in message or "manifest.json" in message
    assert _checksums(user) == before and not (tmp_path / "my_data_runs.txt").exists()


def test_the_real_generators_refuse_a_users_dataset_dir(tmp_path):
    user = tmp_path / "site_data"
    user.mkdir()
    (user / "datalist.json").write_text('{"training": []}')
    (user / "manifest.json").write_text('{"mine": true}')
    (user / "scan.nii.gz").write_bytes(b"\x1f\x8b my own scan")
    before = _checksums(user)
    with pytest.raises(ForeignFilesError, match="site_data.*--generate_default_data False"):
        ensure_mri_dataset(user, n_seen_sites=2, n_unseen_sites=1, subjects_per_site=2, slab_mm=0.0)
    with pytest.raises(ForeignFilesError, match="site_data.*--generate_default_data False"):
        ensure_microscopy_dataset(user, n_seen=2, n_unseen=1, cells_per_batch=2, frames_per_cell=1)
    assert _checksums(user) == before


def test_an_edited_record_is_never_overwritten(tmp_path):
    out = tmp_path / "data"
    ensure_generated(_make, _parameters, out, {"seed": 1}, ["datalist.json"])
    (out / "datalist.json").write_text(json.dumps({"training": [], "note": "my edit"}))
    before = _checksums(out)
    with pytest.raises(ForeignFilesError, match="datalist.json was changed"):
        ensure_generated(_make, _parameters, out, {"seed": 1}, ["datalist.json"])
    assert _checksums(out) == before


def test_another_generators_folder_is_refused(tmp_path):
    out = tmp_path / "data"
    claim_output_dir(out, "mri", lambda name: False)
    with pytest.raises(ForeignFilesError, match=OWNER_FILE):
        claim_output_dir(out, "microscopy", lambda name: True)


def test_a_manifest_of_an_older_version_is_adopted(tmp_path):
    """Manifests before 0.5 listed the data files only and named the records (the datalist) by key."""
    (tmp_path / "data.txt").write_text("x")
    (tmp_path / "datalist.json").write_text("{}")
    params = _parameters(3)
    old = {"parameters": params, "hash": parameter_hash(params), "datalist": "datalist.json", "files": ["data.txt"]}
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    claim_output_dir(tmp_path, "toy", lambda name: False)
    journal = {"data.txt": None, "datalist.json": None}
    assert json.loads((tmp_path / OWNER_FILE).read_text()) == {"generator": "toy", "files": journal}


def test_a_folder_of_version_0_7_adopts_the_generators_names_into_its_journal(tmp_path):
    """An owner file without a journal (0.7.0 and earlier, e.g. an interrupted run): files named like the generator's
    are taken as its own, once; from then on only the journal counts."""
    (tmp_path / OWNER_FILE).write_text(json.dumps({"generator": "toy"}))
    (tmp_path / "data.txt").write_text("x")
    claim_output_dir(tmp_path, "toy", _owns)
    assert json.loads((tmp_path / OWNER_FILE).read_text())["files"] == {"data.txt": None}
    (tmp_path / "datalist.json").write_text("{}")  # named like the generator's, written by the user
    with pytest.raises(ForeignFilesError, match="datalist.json"):
        claim_output_dir(tmp_path, "toy", _owns)


def test_remove_stale_files_removes_only_what_the_journal_lists(tmp_path):
    out = claim_output_dir(tmp_path / "data", "toy", _owns)
    record_planned_files(out, ["data.txt", "datalist.json"])
    names = ("data.txt", "datalist.json", f".data.txt.{'a' * 32}.tmp", f".{'b' * 32}.data.txt", "old.txt", "x.txt")
    for name in names:
        (out / name).write_text("x")
    removed = remove_stale_files(out, ["datalist.json", "x.txt"])
    assert sorted(removed) == sorted(["data.txt", f".data.txt.{'a' * 32}.tmp", f".{'b' * 32}.data.txt"])
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNER_FILE, "datalist.json", "old.txt", "x.txt"])
    assert json.loads((out / OWNER_FILE).read_text())["files"] == {"datalist.json": None}


def _make_interrupted(out_dir, fail: bool, names: tuple[str, ...] = ("a.txt", "b.txt")):
    """A toy generator that journals ``names``, writes them one by one and, with ``fail``, dies after the first."""
    out = claim_output_dir(out_dir, "toy", lambda name: False)
    record_planned_files(out, [*names, "datalist.json"])
    for name in names:
        (out / name).write_text(name)
        if fail:
            raise KeyboardInterrupt
    remove_stale_files(out, [*names, "datalist.json"])
    (out / "datalist.json").write_text(json.dumps(list(names)))
    write_manifest(out, {"names": list(names)}, list(names), "toy", datalist="datalist.json")
    return out


def test_an_interrupted_generation_is_resumed_and_its_stale_files_removed(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        _make_interrupted(out, fail=True)
    assert (out / "a.txt").is_file() and not (out / "b.txt").exists()
    _make_interrupted(out, fail=False, names=("b.txt", "c.txt"))  # a.txt: journaled by the interrupted run
    assert sorted(p.name for p in out.iterdir()) == sorted([OWNER_FILE, MANIFEST, "b.txt", "c.txt", "datalist.json"])
    journal = json.loads((out / OWNER_FILE).read_text())["files"]
    assert journal == read_manifest(out)["files"] and set(journal) == {"b.txt", "c.txt", "datalist.json"}


@pytest.mark.parametrize("owner_of_version_0_7", [False, True])
def test_a_users_file_named_like_a_generated_one_is_never_deleted(tmp_path, owner_of_version_0_7):
    out = tmp_path / "cells"
    params = {"n_seen": 2, "n_unseen": 1, "cells_per_batch": 2, "frames_per_cell": 1, "size": 32, "num_workers": 1}
    ensure_microscopy_dataset(out, **params)
    if owner_of_version_0_7:  # no journal: the manifest of the last complete run lists the generator's files
        (out / OWNER_FILE).write_text(json.dumps({"generator": "microscopy"}))
    mine = out / "images" / "b07_p0_c099_f0.tif"  # the generator's naming pattern; not one of its files
    mine.write_bytes(b"my own cell")
    before = _checksums(out)
    with pytest.raises(ForeignFilesError, match="b07_p0_c099_f0.tif"):
        ensure_microscopy_dataset(out, **{**params, "seed": 1})
    assert _checksums(out) == before


def _process_state(pid: int) -> str | None:
    """'R', 'S', 'Z', ... from /proc, or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_until(condition, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_workers_die_with_a_killed_generation_and_a_rerun_completes(tmp_path):
    out = tmp_path / "mri"
    params = {"n_seen_sites": 2, "n_unseen_sites": 1, "subjects_per_site": 6, "slab_mm": 4.0}
    script = textwrap.dedent(
        f"""
        from monai_armed.data import make_mri_dataset
        make_mri_dataset({str(out)!r}, num_workers=2, progress=False, **{params!r})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    generation = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=Path(__file__).resolve().parents[1])
    try:
        assert _wait_until(lambda: len(_children(generation.pid)) >= 2), "the generation started no workers"
        workers = _children(generation.pid)
        generation.send_signal(signal.SIGKILL)
        generation.wait()
    finally:
        if generation.poll() is None:
            generation.kill()
    assert _wait_until(lambda: all(_process_state(pid) in (None, "Z") for pid in workers), 10.0), [
        (pid, _process_state(pid)) for pid in workers
    ]
    datalist = ensure_mri_dataset(out, num_workers=0, **params)
    assert not list(out.rglob("*.tmp"))
    fresh = make_mri_dataset(tmp_path / "fresh", num_workers=0, **params)
    assert read_manifest(out)["files"] == read_manifest(fresh.parent)["files"]
    assert datalist.read_text() == fresh.read_text()
