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
"""The generated-data cache (monai_armed.data.generated): manifest round trip and reuse only of complete runs."""

from __future__ import annotations

import json

from monai_armed.data.generated import MANIFEST, ensure_generated, parameter_hash, read_manifest, write_manifest


def _parameters(seed: int = 0, size: int = 4) -> dict:
    return {"seed": seed, "size": size}


def _make(out_dir, seed: int = 0, size: int = 4):
    """A toy generator: one data file, a datalist, the manifest last; counts its runs in ``runs.txt``."""
    (out_dir / "data.txt").write_text(str(seed * size))
    (out_dir / "datalist.json").write_text(json.dumps({"training": ["data.txt"]}))
    runs = out_dir / "runs.txt"
    runs.write_text(str(int(runs.read_text()) + 1 if runs.exists() else 1))
    write_manifest(out_dir, _parameters(seed, size), ["data.txt"], datalist="datalist.json")
    return out_dir / "datalist.json"


def test_manifest_round_trip(tmp_path):
    path = write_manifest(tmp_path, {"size": 4, "seed": 0}, ["a.tif"], datalist="datalist.json")
    assert path == tmp_path / MANIFEST
    manifest = read_manifest(tmp_path)
    assert list(manifest) == ["parameters", "hash", "datalist", "files"]
    assert manifest["hash"] == parameter_hash({"seed": 0, "size": 4})
    assert manifest["files"] == ["a.tif"] and manifest["datalist"] == "datalist.json"
    assert read_manifest(tmp_path / "missing") == {}


def test_ensure_generated_reuses_only_a_complete_run_with_the_same_parameters(tmp_path):
    assert ensure_generated(_make, _parameters, tmp_path, {"seed": 1}, ["datalist.json"]) == tmp_path / "datalist.json"
    ensure_generated(_make, _parameters, tmp_path, {"seed": 1}, ["datalist.json"])
    assert (tmp_path / "runs.txt").read_text() == "1", "same parameters, all files there: reused"
    ensure_generated(_make, _parameters, tmp_path, {"seed": 2}, ["datalist.json"])
    assert (tmp_path / "runs.txt").read_text() == "2", "other parameters: generated again"
    (tmp_path / "data.txt").unlink()
    ensure_generated(_make, _parameters, tmp_path, {"seed": 2}, ["datalist.json"])
    assert (tmp_path / "runs.txt").read_text() == "3", "a file of the manifest is missing: generated again"
