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
"""
The tutorial notebooks run top to bottom in a fresh kernel of the interpreter that runs the tests.

Each notebook keeps its settings in one code cell tagged ``parameters``; as papermill does, the test inserts a cell
after it that shrinks the data and the training (every cell still runs), so the test takes seconds, not minutes.
"""

from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
MRI_NOTEBOOK = TUTORIALS / "armed_mri_densenet.ipynb"
# small enough for seconds, large enough for every step: one seen and one unseen site per vendor (3 clusters)
MRI_QUICK = {
    "N_SEEN_SITES": 3,
    "N_UNSEEN_SITES": 3,
    "SUBJECTS_PER_SITE": 8,
    "IMAGE_SIZE": 64,
    "EPOCHS": 2,
    "BATCH_SIZE": 8,
}
MICROSCOPY_NOTEBOOK = TUTORIALS / "armed_microscopy_batches.ipynb"
# 4 seen batches (one of them confounded) and 1 unseen, 32 x 32 images (the smallest the generator draws)
MICROSCOPY_QUICK = {
    "N_SEEN_BATCHES": 4,
    "N_UNSEEN_BATCHES": 1,
    "CELLS_PER_BATCH": 8,
    "FRAMES_PER_CELL": 2,
    "IMAGE_SIZE": 32,
    "EPOCHS": 2,
    "BATCH_SIZE": 16,
}
SEGMENTATION_NOTEBOOK = TUTORIALS / "armed_segmentation.ipynb"
# 3 seen batches and 1 unseen, 48 x 48 fields, a 3-level UNet on 32 x 32 patches
SEGMENTATION_QUICK = {
    "N_SEEN_BATCHES": 3,
    "N_UNSEEN_BATCHES": 1,
    "FIELDS_PER_BATCH": 4,
    "IMAGE_SIZE": 48,
    "PATCH_SIZE": (32, 32),
    "CHANNELS": (4, 8, 16),
    "EPOCHS": 1,
    "BATCH_SIZE": 4,
}
# the settings every tutorial is executed with here; a notebook without an entry fails test_every_tutorial_is_run
QUICK_SETTINGS = {
    MRI_NOTEBOOK.name: MRI_QUICK,
    MICROSCOPY_NOTEBOOK.name: MICROSCOPY_QUICK,
    SEGMENTATION_NOTEBOOK.name: SEGMENTATION_QUICK,
}
_REPORT_MARKER = "TEST-REPORT:"


class _ThisInterpreterKernelSpecs(KernelSpecManager):
    """Kernel specs whose kernels run ``ipykernel`` on ``sys.executable``, whatever kernels are installed elsewhere.

    A ``python3`` spec in the user's Jupyter folder (searched before the virtual environment's) may point at another
    interpreter; this manager makes the tested notebook see the packages of the environment that runs the tests.

    Example::

        km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreterKernelSpecs())
    """

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            name=kernel_name,
            resource_dir="",
        )


def _parameters_cell(nb: nbformat.NotebookNode, path: Path) -> int:
    """Index of the one code cell tagged ``parameters``; a clear error when there is none or several.

    Example::

        index = _parameters_cell(nbformat.read(path, as_version=4), path)
    """
    found = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if len(found) != 1:
        raise AssertionError(f"{path.name}: expected exactly one code cell tagged 'parameters', found {len(found)}.")
    return found[0]


def _literal(value: object) -> str:
    """Source of ``value`` for the injected cell; a path becomes ``Path(...)`` (the notebooks import ``Path``)."""
    return f"Path({str(value)!r})" if isinstance(value, Path) else repr(value)


def _assigned_names(source: str) -> set[str]:
    return {
        t.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for t in node.targets
        if isinstance(t, ast.Name)
    }


def _execute_notebook(path: Path, work_dir: Path, overrides: dict, report: str) -> nbformat.NotebookNode:
    """Copy ``path`` into ``work_dir``, override settings after its parameters cell, run it there, return it.

    ``report`` is code appended as a last cell; what it prints after ``TEST-REPORT:`` is read back by
    :func:`_read_report`. Raises ``nbclient.exceptions.CellExecutionError`` (with the cell and traceback) on error.

    Example::

        nb = _execute_notebook(MRI_NOTEBOOK, tmp_path, {"EPOCHS": 1}, "print('TEST-REPORT:' + json.dumps({}))")
    """
    copy = work_dir / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    index = _parameters_cell(nb, path)
    unknown = set(overrides) - _assigned_names(nb.cells[index].source)
    assert not unknown, f"{path.name}: the parameters cell no longer sets {sorted(unknown)}; update the test."
    injected = "\n".join(f"{name} = {_literal(value)}" for name, value in overrides.items())
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}))
    nb.cells.append(nbformat.v4.new_code_cell(report))
    for i, cell in enumerate(nb.cells):  # the inserted cells need ids too
        cell["id"] = f"test-{i:02d}"
    km = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreterKernelSpecs())
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(work_dir)}})
    client.execute()
    return nb


def _read_report(nb: nbformat.NotebookNode) -> dict:
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith(_REPORT_MARKER)]
    assert lines, f"the report cell printed no {_REPORT_MARKER} line; its output was {text!r}"
    return json.loads(lines[-1][len(_REPORT_MARKER) :])


def _stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def _png_outputs(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


@pytest.mark.parametrize("path", sorted(TUTORIALS.glob("*.ipynb")), ids=lambda p: p.name)
def test_tutorials_are_committed_clean(path):
    """Committed notebooks are valid, carry no outputs and have one parameters cell and the python3 kernel."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{path.name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"
    _parameters_cell(nb, path)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


def test_every_tutorial_is_run():
    """A notebook added to tutorials/ needs quick settings and a test that executes it."""
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == sorted(QUICK_SETTINGS)


def test_mri_densenet_tutorial_runs(tmp_path, monkeypatch):
    """The MRI DenseNet tutorial runs on this interpreter and produces the comparison table and the figures."""
    # the kernel inherits the environment: its own runtime folder, and the notebook's inline figures (a CI's
    # MPLBACKEND=Agg would silence plt.show())
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    work = tmp_path / "work"
    report = (
        "import json as _json, sys as _sys\n"
        f"print({_REPORT_MARKER!r} + _json.dumps({{'executable': _sys.executable, 'work_dir': str(WORK_DIR), "
        "'reports': {m: {d: sorted(r[d]) for d in r} for m, r in reports.items()}, "
        "'unseen_auroc': {m: r['unseen']['fixed']['auroc'] for m, r in reports.items()}, "
        "'site_figures': site_figures, 'gradcam': str(gradcam_png), 'n_clusters': n_clusters, "
        "'tapped': armed.tapped_layers}))"
    )
    tmp_path.joinpath("notebook").mkdir()
    nb = _execute_notebook(
        MRI_NOTEBOOK, tmp_path / "notebook", {**QUICK_SETTINGS[MRI_NOTEBOOK.name], "WORK_DIR": work}, report
    )
    result = _read_report(nb)

    assert result["executable"] == sys.executable  # the notebook ran on the tested environment
    assert Path(result["work_dir"]) == work  # the injected settings took effect
    assert result["n_clusters"] == MRI_QUICK["N_SEEN_SITES"]
    expected = {"train": ["fixed", "observed"], "seen": ["fixed", "observed"], "unseen": ["fixed"]}
    assert result["reports"] == {"conventional": expected, "armed": expected}
    for model, auroc in result["unseen_auroc"].items():
        assert auroc is not None and 0.0 <= auroc <= 1.0, f"{model}: unseen AUROC {auroc}"
    assert result["tapped"] == ["features.transition1", "features.transition2", "class_layers.out:input"]

    text = _stream_text(nb)
    assert "unseen/fixed" in text and "seen/observed" in text  # the printed comparison tables
    assert "conventional" in text and "armed" in text
    assert "tapped layers for the adversary" in text  # net.report()
    for site in ("site00", "site01", "site02"):
        assert site in text  # the site table
    assert "GE" in text and "Philips" in text and "Siemens" in text

    figures = result["site_figures"]
    assert {"intercept_vs_patient_fraction", "random_scale_spread"} <= set(figures)
    for png in [result["gradcam"], *figures.values()]:
        assert Path(png).is_file() and Path(png).stat().st_size > 1000, png
        assert Path(png).parent == work / "figures"
    # slices per vendor, loss curves, the Grad-CAM figure and every site figure are shown inline
    assert _png_outputs(nb) >= 3 + len(figures)
    assert (work / "data" / "datalist.json").is_file()


def test_microscopy_batches_tutorial_runs(tmp_path, monkeypatch):
    """The microscopy tutorial trains both autoencoders, reports seen / unseen batches and runs TIFF inference."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    work = tmp_path / "work"
    report = (
        "import json as _json, sys as _sys\n"
        f"print({_REPORT_MARKER!r} + _json.dumps({{'executable': _sys.executable, 'work_dir': str(WORK_DIR), "
        "'modes': {m: {d: sorted(r[d]) for d in ('train', 'seen', 'unseen')} for m, r in reports.items()}, "
        "'latent': {m: sorted(r['latent']) for m, r in reports.items()}, "
        "'anova': {m: sorted(r['anova_f']) for m, r in reports.items()}, "
        "'unseen_auroc': {m: r['unseen']['fixed']['auroc'] for m, r in reports.items()}, "
        "'figures': figures, 'n_clusters': n_clusters, 'epochs': {'conventional': history_conventional['epoch'], "
        "'armed': history_armed['epoch']}, 'predictions': predictions, 'new_files': new_files, "
        "'membership_sums': membership.sum(1).tolist()}))"
    )
    tmp_path.joinpath("notebook").mkdir()
    nb = _execute_notebook(
        MICROSCOPY_NOTEBOOK,
        tmp_path / "notebook",
        {**QUICK_SETTINGS[MICROSCOPY_NOTEBOOK.name], "WORK_DIR": work},
        report,
    )
    result = _read_report(nb)

    assert result["executable"] == sys.executable
    assert Path(result["work_dir"]) == work
    assert result["n_clusters"] == MICROSCOPY_QUICK["N_SEEN_BATCHES"]
    epochs = list(range(1, MICROSCOPY_QUICK["EPOCHS"] + 1))
    assert result["epochs"] == {"conventional": epochs, "armed": epochs}
    assert result["modes"]["conventional"] == {
        "train": ["fixed", "observed"],
        "seen": ["fixed", "observed"],
        "unseen": ["fixed"],
    }
    assert result["modes"]["armed"] == {
        "train": ["fixed", "inferred", "observed"],
        "seen": ["fixed", "observed"],
        "unseen": ["fixed", "inferred"],
    }
    # the conventional model has one latent and one decoder; ARMED adds the random-effects ones
    assert result["latent"] == {"conventional": ["fe"], "armed": ["fe", "re"]}
    assert result["anova"] == {"conventional": ["fe", "original"], "armed": ["fe", "me", "original"]}
    for model, auroc in result["unseen_auroc"].items():
        assert auroc is not None and 0.0 <= auroc <= 1.0, f"{model}: unseen AUROC {auroc}"

    for model in ("conventional", "armed"):
        for png in result["figures"][model].values():
            assert Path(png).is_file() and Path(png).stat().st_size > 1000, png
            assert Path(png).parent == work / "figures" / model
        assert (work / "eval" / f"metrics_{model}.json").is_file()
    assert (work / "data" / "datalist.json").is_file() and (work / "data" / "batches.json").is_file()

    # inference on the new TIFFs of an unseen batch: inferred membership, one output row and three maps per file
    assert len(result["predictions"]) == len(result["new_files"]) == 4
    for row, path in zip(result["predictions"], result["new_files"]):
        assert row["image"] == path and row["effects"] == "inferred"
        assert 0.0 <= float(row["probability"]) <= 1.0
        for suffix in ("recon_fe", "recon_me", "batch_effect"):
            assert (work / "inference" / f"{Path(path).stem}_{suffix}.tif").is_file()
    assert result["membership_sums"] == pytest.approx([1.0] * 4, abs=1e-5)

    text = _stream_text(nb)
    assert "unseen/inferred" in text and "seen/observed" in text  # the printed comparison tables
    assert "ARMED fixed-effects reconstructions" in text  # the ANOVA table
    assert "confounded" in text  # the batch table
    # two data figures, the loss curves, reconstructions and embeddings of both models, the inference figure
    assert _png_outputs(nb) >= 8


def test_segmentation_tutorial_runs(tmp_path, monkeypatch):
    """The segmentation tutorial trains a plain UNet and its ARMED version and compares seen and unseen batches."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    work = tmp_path / "work"
    report = (
        "import json as _json, sys as _sys\n"
        f"print({_REPORT_MARKER!r} + _json.dumps({{'executable': _sys.executable, 'work_dir': str(WORK_DIR), "
        "'modes': {m: {d: sorted(r[d]) for d in r} for m, r in reports.items()}, "
        "'dice': {m: r['unseen']['fixed']['dice'] for m, r in reports.items()}, "
        "'figures': figures, 'n_clusters': n_clusters, 'head': armed.head_name}))"
    )
    tmp_path.joinpath("notebook").mkdir()
    nb = _execute_notebook(
        SEGMENTATION_NOTEBOOK,
        tmp_path / "notebook",
        {**QUICK_SETTINGS[SEGMENTATION_NOTEBOOK.name], "WORK_DIR": work},
        report,
    )
    result = _read_report(nb)

    assert result["executable"] == sys.executable
    assert Path(result["work_dir"]) == work
    assert result["n_clusters"] == SEGMENTATION_QUICK["N_SEEN_BATCHES"]
    assert result["head"] == "model.2.conv"  # the UNet's output convolution, found by the dry run
    assert result["modes"] == {
        "conventional": {"seen": ["fixed", "observed"], "unseen": ["fixed"]},
        "armed": {"seen": ["fixed", "observed"], "unseen": ["fixed", "inferred"]},
    }
    for model, dice in result["dice"].items():
        assert dice is not None and 0.0 <= dice <= 1.0, model
    names = sorted(Path(p).name for p in result["figures"])
    assert names == ["dice_per_batch.png", "fixed_vs_mixed.png", "overlays_seen.png", "overlays_unseen.png"]
    text = _stream_text(nb)
    assert "seen/observed" in text and "unseen/fixed" in text and "tapped layers for the adversary" in text
    assert _png_outputs(nb) >= 1 + len(names)  # the batches figure and every bundle figure
