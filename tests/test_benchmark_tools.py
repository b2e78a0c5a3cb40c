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
"""The benchmarks' shared tools: argument types, the RESULTS.md section writer and the cache of trained bundles."""

from __future__ import annotations

import argparse
import json
import multiprocessing
from pathlib import Path

import pytest

from tests.benchmark_scripts import import_benchmarks


@pytest.fixture(scope="module")
def tools():
    return import_benchmarks("cli", "results_md", "bundle_runner")


def test_seed_and_model_lists_refuse_repeats_and_the_json_output_must_be_json(tools):
    cli, _, _ = tools
    assert cli.seed_list("0, 1,2") == [0, 1, 2] and cli.name_list("armed,conventional") == ["armed", "conventional"]
    for parse, text, message in (
        (cli.seed_list, "0,0", r"seeds \[0\] repeated"),  # a repeat would count as another paired seed
        (cli.seed_list, "a,b", "comma-separated integers"),
        (cli.seed_list, ",", "got none"),
        (cli.name_list, "armed,armed,conventional", r"names \['armed'\] repeated"),
        (cli.json_output, "benchmarks/RESULTS.md", "must be a .json file"),
        (cli.positive_int, "0", "integer >= 1"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)
    assert cli.json_output("-") == Path("-")


def _section_text(name: str, body: str) -> str:
    return f"<!-- {name}:start -->\n{body}\n<!-- {name}:end -->\n"


def test_a_section_with_a_lost_end_marker_is_refused_and_the_file_kept(tools, tmp_path):
    _, results_md, _ = tools
    path = tmp_path / "RESULTS.md"
    replace_section = results_md.replace_section
    replace_section(path, "a", "first")
    replace_section(path, "b", "second")
    replace_section(path, "a", "first again")
    text = path.read_text()
    assert _section_text("a", "first again") in text and _section_text("b", "second") in text
    broken = text.replace("<!-- a:end -->\n", "")
    path.write_text(broken)
    with pytest.raises(ValueError, match="section 'a' has 1 start and 0 end marker line"):
        replace_section(path, "a", "lost")
    assert path.read_text() == broken
    # the header's prose names the markers: only lines of their own are markers
    replace_section(path, "name", "body")
    assert path.read_text().startswith(results_md.MD_HEADER) and _section_text("name", "body") in path.read_text()


def _write_sections(path: str, prefix: str, count: int) -> None:
    (results_md,) = import_benchmarks("results_md")
    for i in range(count):
        results_md.replace_section(Path(path), f"{prefix}{i}", f"body {i}")


def test_two_writers_at_once_keep_each_others_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_sections, args=(str(path), p, 40)) for p in ("x", "y")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    text = path.read_text()
    assert all(f"<!-- {p}{i}:start -->" in text for p in ("x", "y") for i in range(40))


def test_a_cached_bundle_run_of_other_settings_is_refused(tools, tmp_path):
    _, _, bundle_runner = tools
    root = tmp_path / "seed0" / "armed"
    (root / "eval").mkdir(parents=True)
    (root / "eval" / "metrics.json").write_text(json.dumps({"seen": {}}))
    run = ["$@train#trainer.run()"]
    with pytest.raises(RuntimeError, match="other settings \\(no record of them\\); delete that folder"):
        bundle_runner.run_train_config(tmp_path, root, run, epochs=3)
    (root / "eval" / bundle_runner.SETTINGS_FILE).write_text(json.dumps({"run": run, "epochs": 1}))
    with pytest.raises(RuntimeError, match=r"other settings \(\['epochs'\]\)"):
        bundle_runner.run_train_config(tmp_path, root, run, epochs=3)
    assert bundle_runner.run_train_config(tmp_path, root, run, epochs=1) == {"seen": {}}


def test_microscopy_benchmark_reports_intervals_and_paired_differences():
    """Each AUROC as mean [95% t-interval] over seeds, and each model minus the conventional AEC paired by seed (a
    seed without a score is left out of the pair, and shown as '-')."""
    (microscopy,) = import_benchmarks("microscopy_batches")

    def run(seen, unseen, fixed):
        return {"seen": {"auroc": seen}, "unseen": {"auroc": unseen}, "unseen_fixed": {"auroc": fixed}}

    results = {
        "models": {
            "conventional": {"per_seed": [run(0.9, 0.7, 0.7), run(0.88, 0.75, 0.75), run(0.89, 0.72, 0.72)]},
            "armed": {"per_seed": [run(0.91, 0.8, 0.79), run(0.9, 0.74, 0.76), run(0.92, None, 0.77)]},
        }
    }
    rows = {line.split(" | ")[0][2:]: line for line in microscopy.interval_lines(results) if line.startswith("| ")}
    assert rows["conventional"].startswith("| conventional | 0.890 [0.865, 0.915] | 0.723 [0.661, 0.786] |")
    assert rows["armed"].endswith("| 0.045 [-0.654, 0.744] (+0.100, -0.010, -) |")
