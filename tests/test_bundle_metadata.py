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

import copy
import hashlib
import json
import re
from pathlib import Path

import jsonschema
import pytest
from monai.bundle import verify_metadata, verify_net_in_out
from packaging.version import Version

import monai_armed
from monai_armed.utils import META_SCHEMA_MD5, meta_schema_path

BUNDLES_DIR = Path(__file__).resolve().parents[1] / "bundles"
BUNDLES = sorted(BUNDLES_DIR.glob("*/configs/metadata.json"))
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
# the MD5 that MONAI's tests/testing_data/data_config.json pins for the published schema
PUBLISHED_SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"
DESCRIBED_FIELDS = ("image_classes", "label_classes", "pred_classes")
OUTPUT_WORD = {"logits": "logit", "probabilities": "probability"}


def bundle_metadata(name: str) -> dict:
    return json.loads((BUNDLES_DIR / name / "configs" / "metadata.json").read_text())


def schema_errors(metadata: dict) -> list[str]:
    """Every violation of the model zoo's published schema, as ``<path>: <message>``."""
    schema = json.loads(Path(meta_schema_path()).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(metadata)]


def armed_contract_errors(metadata: dict) -> list[str]:
    """What the schema does not enforce but an ARMED bundle's metadata must say (empty when all is well).

    The cluster is the network's second input (``forward(x, cluster)``, order matters in ``network_data_format``); every
    output's ``type`` is ``logits`` or ``probabilities`` and its ``channel_def`` says the same (a logit is not a
    probability: a logit's channel_def does not call it one), except a post-processed class map (``image`` /
    ``labels``, a segmentation) whose channel_def names its classes; probabilities lie in [0, 1]; the zoo's description
    fields and evaluation scores are filled.
    """
    errors = []
    fmt = metadata["network_data_format"]
    inputs = list(fmt["inputs"])
    if inputs[:2] != ["image", "cluster"]:
        errors.append(f"network_data_format.inputs must start with 'image', 'cluster' (forward(x, cluster)), got {inputs}")
    elif fmt["inputs"]["cluster"]["dtype"] != "int64" or fmt["inputs"]["cluster"]["value_range"][0] != -1:
        errors.append("network_data_format.inputs.cluster must be an int64 index whose range starts at -1 (unseen)")
    for section in ("outputs", "post_processed_outputs"):
        for name, spec in fmt.get(section, {}).items():
            where = f"network_data_format.{section}.{name}"
            said = " ".join(spec["channel_def"].values()).lower()
            if section == "post_processed_outputs" and (spec["type"], spec["format"]) == ("image", "labels"):
                if "class" not in said:  # a segmentation's class map
                    errors.append(f"{where}: a class map's channel_def must name its classes, got {spec['channel_def']}")
                continue
            if spec["type"] not in OUTPUT_WORD:
                errors.append(f"{where}.type must be one of {sorted(OUTPUT_WORD)}, got {spec['type']!r}")
                continue
            if OUTPUT_WORD[spec["type"]] not in said or (spec["type"] == "logits" and "probabilit" in said):
                errors.append(f"{where}: type {spec['type']!r} disagrees with channel_def {spec['channel_def']}")
            if spec["type"] == "probabilities" and spec["value_range"] != [0, 1]:
                errors.append(f"{where}.value_range of probabilities must be [0, 1], got {spec['value_range']}")
    for key in DESCRIBED_FIELDS:
        if not str(metadata.get(key, "")).strip():
            errors.append(f"{key} must describe the bundle's classes, got {metadata.get(key)!r}")
    scores = metadata.get("eval_metrics")
    if not scores or not all(isinstance(v, (int, float)) for v in scores.values()):
        errors.append(f"eval_metrics must map metric names to achieved scores, got {scores!r}")
    return errors


def test_every_bundle_is_checked():
    assert {p.parents[1].name for p in BUNDLES} == {
        "armed_spirals",
        "armed_mri_classification",
        "armed_microscopy_autoencoder",
        "armed_microscopy_segmentation",
    }


def test_shipped_schema_is_the_published_file():
    assert Path(meta_schema_path()).name == "meta_schema_20240725.json"
    assert hashlib.md5(Path(meta_schema_path()).read_bytes()).hexdigest() == PUBLISHED_SCHEMA_MD5 == META_SCHEMA_MD5


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_metadata_verifies_against_the_published_schema(meta_file):
    metadata = json.loads(meta_file.read_text())
    assert metadata["schema"] == SCHEMA_URL
    assert schema_errors(metadata) == []
    # MONAI's own check, offline: the schema file exists, so it is hash-checked instead of downloaded
    verify_metadata(meta_file=str(meta_file), filepath=meta_schema_path(), hash_val=META_SCHEMA_MD5)
    assert metadata["version"] in metadata["changelog"], "the model zoo requires the version in the changelog"
    assert "monai-armed" in metadata["required_packages_version"]


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_metadata_names_the_package_release_it_is_tested_with(meta_file):
    stated = Version(json.loads(meta_file.read_text())["required_packages_version"]["monai-armed"])
    package = Version(monai_armed.__version__)
    assert stated.release[:2] == package.release[:2] and stated <= package, (
        f"{meta_file} names monai-armed {stated}, but the bundle is tested with {package}: update "
        "required_packages_version (and the bundle's version and changelog)."
    )


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_metadata_describes_the_armed_network(meta_file):
    assert armed_contract_errors(json.loads(meta_file.read_text())) == []


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_network_matches_its_data_format_from_inference_json_alone(meta_file, tmp_path):
    """MONAI's verify_net_in_out on a bundle without a trained model: inference.json builds the network without data."""
    verify_net_in_out(
        net_id="network_def", meta_file=str(meta_file), config_file=str(meta_file.parent / "inference.json"),
        bundle_root=str(tmp_path),
    )  # fmt: skip
    assert not list(tmp_path.iterdir()), "nothing was generated or written"


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_eval_metrics_are_the_scores_the_bundle_readme_reports(meta_file):
    readme = (meta_file.parents[1] / "docs" / "README.md").read_text()
    performance = readme.split("## Performance", 1)[1].split("\n## ", 1)[0]
    for name, score in json.loads(meta_file.read_text())["eval_metrics"].items():
        assert re.search(rf"(?<![\d.]){re.escape(repr(score))}0*(?!\d)", performance), f"{name}={score} not in Performance"


def test_a_secondary_data_format_without_outputs_is_rejected():
    metadata = bundle_metadata("armed_mri_classification")
    metadata["cluster_data_format"] = {"inputs": copy.deepcopy(metadata["network_data_format"]["inputs"])}
    assert schema_errors(metadata) == ["cluster_data_format: 'outputs' is a required property"]


def test_metadata_without_outputs_fails_monai_verify_metadata(tmp_path):
    metadata = bundle_metadata("armed_spirals")
    del metadata["network_data_format"]["outputs"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match="'outputs' is a required property"):
        verify_metadata(meta_file=str(bad), filepath=meta_schema_path(), hash_val=META_SCHEMA_MD5)


def test_metadata_without_the_cluster_input_is_rejected():
    metadata = bundle_metadata("armed_mri_classification")
    del metadata["network_data_format"]["inputs"]["cluster"]
    assert armed_contract_errors(metadata) == [
        "network_data_format.inputs must start with 'image', 'cluster' (forward(x, cluster)), got ['image']"
    ]


def test_a_logit_output_called_probabilities_is_rejected():
    metadata = bundle_metadata("armed_mri_classification")
    metadata["network_data_format"]["outputs"]["pred"]["type"] = "probabilities"
    errors = armed_contract_errors(metadata)
    assert any(e.startswith("network_data_format.outputs.pred: type 'probabilities' disagrees") for e in errors), errors
    assert any("value_range of probabilities must be [0, 1], got []" in e for e in errors), errors


def test_unfilled_class_descriptions_and_scores_are_rejected():
    metadata = bundle_metadata("armed_microscopy_autoencoder")
    del metadata["pred_classes"]
    metadata["eval_metrics"] = {}
    assert armed_contract_errors(metadata) == [
        "pred_classes must describe the bundle's classes, got None",
        "eval_metrics must map metric names to achieved scores, got {}",
    ]


@pytest.mark.parametrize("meta_file", BUNDLES, ids=lambda p: p.parents[1].name)
def test_every_bundle_states_the_licence_of_its_data(meta_file):
    docs = meta_file.parents[1] / "docs"
    notice = (docs / "data_license.txt").read_text()
    assert "Apache-2.0" in notice
    assert "docs/data_license.txt" in (docs / "README.md").read_text()


def test_mri_data_licence_carries_the_icbm152_notice():
    notice = " ".join((BUNDLES_DIR / "armed_mri_classification/docs/data_license.txt").read_text().split())
    assert "ICBM152 2009a nonlinear symmetric" in notice
    assert "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute" in notice
    assert "provided that the above copyright notice appear in all copies" in notice
