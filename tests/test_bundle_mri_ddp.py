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
"""``multi_gpu_train.json`` launched with torchrun: 2 gloo processes on the CPU against one process of ``train.json``.

Both runs start from the same weights (the same ``seed``; DDP also broadcasts rank 0's) and take the same number of
steps on the same global batch (2 ranks x 4 = 1 process x 8), but see the data in another order, with other
augmentations, random-effect draws and BatchNorm batches (4 rather than 8 images). Their per-epoch mean losses
(``LossHistory``) therefore differ by noise, whose size was measured with ``train.json`` alone: same seed, 8 other
data orders (a loader generator), against the reference order. Largest difference over 3 epochs:

=========  ======================  =====================  ===========
key        8 data orders (1 proc)  8 DDP sampler seeds    tolerance
=========  ======================  =====================  ===========
loss_kl    0.078                   0.056                  0.25
loss       0.114                   0.091                  0.25
loss_me    0.057                   0.038                  0.15
loss_fe    0.063                   0.051                  0.15
loss_adv   0.072                   0.087                  0.2
loss_gen   0.065                   0.085                  0.2
=========  ======================  =====================  ===========

The KL term is the sharp check: it falls by about 0.7 per epoch (4 steps), so a run with another number of steps per
epoch leaves the band (batch 4: 1.6 off at epoch 3, batch 16: 0.8), which the test shows with a batch-4 run. The task
losses barely move in 3 epochs on 29 images, so their bands only catch gross errors (a sum instead of a mean over the
ranks, NaN). The loss curve cannot show whether the ranks exchanged gradients (the KL gradient is the same on both),
so each rank also dumps its parameters after training and they must be bitwise identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow

from tests.bundle_workflow import torchrun_bundle
from tests.test_bundle_mri import CONFIGS, SMALL

REPO = Path(__file__).resolve().parents[1]
EPOCHS, LOCAL_BATCH, WORLD_SIZE = 3, 4, 2
TOLERANCE = {"loss_kl": 0.25, "loss": 0.25, "loss_me": 0.15, "loss_fe": 0.15, "loss_adv": 0.2, "loss_gen": 0.2}
# what rank 0 writes; rank 1 writes to "<dir>_rank1" folders (see _ddp), which must not appear
RANK0_FILES = {
    "models/model.pt",
    "models/model_best_val_auroc.pt",
    "models/clusters.json",
    "models/training_items.json",
    *(f"models/resume_checkpoint_epoch={epoch}.pt" for epoch in range(max(1, EPOCHS - 1), EPOCHS + 1)),  # last two
    "eval/loss_history.json",
    "eval/random_effects.json",
}


def _ddp(tmp: Path) -> tuple[Path, str, float]:
    """Runs multi_gpu_train.json with torchrun (2 CPU processes); returns the bundle root, the output, the seconds."""
    root, _, output, seconds = torchrun_bundle(
        CONFIGS,
        tmp,
        WORLD_SIZE,
        dataset_dir=str(tmp / "data"),  # generated here by rank 0 while rank 1 waits (see "initialize")
        **{**SMALL, "epochs": EPOCHS, "batch_size": LOCAL_BATCH},
    )
    return root, output, seconds


def _train_workflow(root: Path, data_dir: Path, batch_size: int, **override) -> ConfigWorkflow:
    """train.json in this process with the DDP run's settings."""
    return ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        dataset_dir=str(data_dir),
        **{**SMALL, "epochs": EPOCHS, "batch_size": batch_size},
        **override,
    )


def _single(tmp: Path, name: str, data_dir: Path, batch_size: int, **override) -> dict:
    """Trains train.json in this process with the DDP run's settings; returns its loss history."""
    root = tmp / name
    # train.json's handlers include LossHistory
    workflow = _train_workflow(root, data_dir, batch_size, run=["$@train#trainer.run()"], **override)
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return json.loads((root / "eval" / "loss_history.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mri_ddp")
    root, output, seconds = _ddp(tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the DDP processes; OpenMP threads only slow these small convolutions down
    try:
        histories = {
            "reference": _single(tmp, "reference", tmp / "data", WORLD_SIZE * LOCAL_BATCH),
            # same weights, another data order and other augmentations: the noise the tolerances are made for
            "other_order": _single(
                tmp,
                "other_order",
                tmp / "data",
                WORLD_SIZE * LOCAL_BATCH,
                **{"train#dataloader#generator": "$torch.Generator().manual_seed(7)"},
            ),
            # a global batch of 4 rather than 8: twice the steps per epoch
            "half_batch": _single(tmp, "half_batch", tmp / "data", LOCAL_BATCH),
        }
    finally:
        torch.set_num_threads(threads)
    print(f"torchrun with 2 processes: {seconds:.1f} s")
    return {"root": root, "probe": tmp / "probe", "output": output, **histories}


def _deviation(a: dict, b: dict, key: str) -> float:
    return max(abs(x - y) for x, y in zip(a[key], b[key], strict=True))


def test_ddp_loss_curve_matches_single_process(runs):
    ddp = json.loads((runs["root"] / "eval" / "loss_history.json").read_text())
    reference = runs["reference"]
    assert ddp["epoch"] == reference["epoch"] == list(range(1, EPOCHS + 1))
    for key, tolerance in TOLERANCE.items():
        assert _deviation(ddp, reference, key) <= tolerance, (key, ddp[key], reference[key])
        # the tolerance holds for a single-process run in another data order as well (it is not tailored to DDP)
        assert _deviation(runs["other_order"], reference, key) <= tolerance, key
    # the curve moves more than the tolerance allows, and another global batch leaves the band
    kl = reference["loss_kl"]
    assert kl[0] - kl[-1] > 2 * TOLERANCE["loss_kl"], kl
    assert abs(runs["half_batch"]["loss_kl"][-1] - kl[-1]) > 2 * TOLERANCE["loss_kl"], (
        runs["half_batch"]["loss_kl"],
        kl,
    )


def test_ranks_hold_identical_trained_parameters_and_buffers(runs):
    ranks = [torch.load(runs["probe"] / f"rank{r}.pt") for r in range(WORLD_SIZE)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name
    # the plain network was saved (no DDP "module." prefix) and it is the trained one
    saved = torch.load(runs["root"] / "models" / "model.pt", weights_only=True)
    for name, value in ranks[0].items():
        assert torch.equal(saved[name], value), name


def test_every_rank_validates_the_saved_model(runs, tmp_path):
    """The BatchNorm statistics are rank 0's on every rank at the epoch's end, and no validation image is counted
    twice: the distributed val_auroc (which picks model_best_val_auroc.pt) is the saved model's on the whole set."""
    metrics = [torch.load(runs["probe"] / f"metrics_rank{r}.pt") for r in range(WORLD_SIZE)]
    assert metrics[0]["val_auroc"] == metrics[1]["val_auroc"]
    workflow = _train_workflow(tmp_path, runs["root"].parent / "data", LOCAL_BATCH)
    network = workflow.parser.get_parsed_content("network")
    network.load_state_dict(torch.load(runs["root"] / "models" / "model.pt", weights_only=True))
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.run()
    assert evaluator.state.metrics["val_auroc"] == pytest.approx(metrics[0]["val_auroc"], abs=1e-6)


def test_rank0_writes_the_bundle_outputs_and_rank1_nothing(runs):
    root = runs["root"]
    written = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    events = {name for name in written if name.startswith("eval/tensorboard/")}
    assert written - events == RANK0_FILES
    assert len(events) == 1 and re.fullmatch(r"eval/tensorboard/run_[0-9_]+/events\.out\.tfevents\..*", next(iter(events)))
    assert not list(root.glob("*_rank1")), "rank 1 wrote bundle files"
    vocabulary = json.loads((root / "models" / "clusters.json").read_text())
    assert len(vocabulary["clusters"]) == 8
    # the data were generated once, by rank 0 while rank 1 waited at the barrier, and rank 1 reused them
    assert len(re.findall(r"generating the data set in", runs["output"])) == 1, runs["output"][-3000:]
