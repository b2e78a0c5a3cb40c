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
"""The quick start (``make demo``): the MRI bundle's conventional and ARMED runs and the seen/unseen AUROC table."""

from __future__ import annotations

import json

import pytest

from monai_armed.quickstart import main

TINY = [
    "--epochs", "1", "--subjects-per-site", "6",
    "--set", "image_size=64", "filters=[4,8,8,16,16,32,32]", "hidden_channels=16", "adversary_hidden=[8]",
    "val_interval=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quickstart")


def test_quickstart_trains_both_models_and_prints_this_runs_auroc(root, capsys):
    tmp_path = root
    assert main(["--root", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    table = out[out.index("AUROC of this run") :].splitlines()
    assert table[1].split() == ["model", "seen", "sites", "unseen,", "fixed", "unseen,", "inferred"]
    for line, variant in zip(table[2:4], ("conventional", "armed")):
        metrics = json.loads((tmp_path / variant / "eval" / "metrics.json").read_text())
        printed = [float(v) for v in line.split()[1:]]
        expected = [metrics["seen"]["observed"]["auroc"], metrics["unseen"]["fixed"]["auroc"]]
        assert line.split()[0] == variant and printed[:2] == [round(v, 3) for v in expected]
        assert str(tmp_path / variant / "eval" / "figures") in out
        log = (tmp_path / variant / "train.log").read_text()
        assert "%|" not in log, "no progress bar in a log file"
    assert (tmp_path / "data" / "manifest.json").is_file(), "the data were generated once, beside the runs"


def test_quickstart_reports_a_failed_run_with_its_log(root, capsys):
    assert main(["--root", str(root), "--variants", "no_such_variant", *TINY]) == 1
    err = capsys.readouterr().err
    log = root / "no_such_variant" / "train.log"
    assert "the bundle run failed" in err and str(log) in err
    assert "unknown ARMED variant 'no_such_variant'" in log.read_text()


def test_repeated_set_options_all_reach_the_bundle_and_its_own_options_are_refused(tmp_path, monkeypatch, capsys):
    import monai_armed.quickstart as quickstart

    seen = []

    def run_bundle(bundle, run_root, log_file, **overrides):
        seen.append(overrides)
        (run_root / "eval").mkdir(parents=True)
        (run_root / "eval" / "metrics.json").write_text("{}")

    monkeypatch.setattr(quickstart, "ensure_mri_dataset", lambda *args, **kwargs: None)
    monkeypatch.setattr(quickstart, "run_bundle", run_bundle)
    monkeypatch.setattr(quickstart, "format_report_table", lambda *args, **kwargs: "")
    argv = ["--root", str(tmp_path), "--variants", "armed", "--set", "image_size=32", "--set", "filters=[8,16]"]
    assert main(argv) == 0
    assert seen[0]["image_size"] == 32 and seen[0]["filters"] == [8, 16] and seen[0]["variant"] == "armed"
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path), "--set", "variant=armed"])
    assert "the quick start sets variant itself; use --variants" in capsys.readouterr().err
