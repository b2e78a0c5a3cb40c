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

import json
from pathlib import Path

import pytest
from monai.bundle import verify_metadata

from monai_armed.utils import meta_schema_path

BUNDLES = sorted(Path(__file__).resolve().parents[1].glob("bundles/*/configs/metadata.json"))


def test_every_bundle_is_checked():
    assert {p.parents[1].name for p in BUNDLES} >= {"armed_spirals"}


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_metadata_verifies_offline_with_the_shipped_schema(meta_file):
    verify_metadata(meta_file=str(meta_file), filepath=meta_schema_path())
    metadata = json.loads(meta_file.read_text())
    assert metadata["version"] in metadata["changelog"], "the model zoo requires the version in the changelog"
    assert "monai-armed" in metadata["required_packages_version"]


def test_metadata_missing_a_mandatory_key_is_rejected(tmp_path):
    metadata = json.loads(BUNDLES[0].read_text())
    del metadata["network_data_format"]["outputs"]["pred"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="'pred' is a required property"):
        verify_metadata(meta_file=str(bad), filepath=meta_schema_path())
