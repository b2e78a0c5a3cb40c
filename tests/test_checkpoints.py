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
"""Atomic checkpoints, checked resume files and resumable best-model tracking (monai_armed.handlers.checkpoints), and
the random states of a run (monai_armed.handlers.RandomStates)."""

from __future__ import annotations

import errno
import json
import logging
import random
import struct
import zipfile

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.handlers import CheckpointLoader
from monai.transforms import Compose, RandFlipd, RandGaussianNoised

from monai_armed.data import TensorBatchLoader
from monai_armed.handlers import AtomicCheckpointSaver, RandomStates, checkpoint_load_dict, latest_checkpoint
from monai_armed.utils import write_json


def _trainer(net: torch.nn.Module) -> Engine:
    """An engine whose every iteration changes the network's weights."""

    def step(engine, batch):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)
        return {}

    return Engine(step)


def _disk_full(monkeypatch, after: int = 10):
    """torch.save writes ``after`` bytes, then fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        f.write(b"x" * after)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)


def test_a_full_disk_leaves_the_previous_model_intact(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 1)
    trainer = _trainer(net)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt").attach(trainer)
    trainer.run([0, 1], max_epochs=1)
    good = (tmp_path / "model.pt").read_bytes()
    _disk_full(monkeypatch)
    trainer = _trainer(net)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt").attach(trainer)
    with pytest.raises(OSError) as err:
        trainer.run([0, 1], max_epochs=1)
    assert "could not write" in str(err.value) and "model.pt" in str(err.value)
    assert "No space left on device" in str(err.value) and "previous model.pt is left as it was" in str(err.value)
    assert (tmp_path / "model.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "no temporary file is left behind"


def test_a_full_disk_leaves_the_previous_metrics_intact(tmp_path, monkeypatch):
    path = write_json({"auroc": 0.8}, tmp_path / "metrics.json")

    def dump(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump)
    with pytest.raises(OSError, match="could not write .*metrics.json.*previous metrics.json is left as it was"):
        write_json({"auroc": 0.9}, path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"auroc": 0.8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_interval_checkpoints_are_pruned_across_a_resume_and_an_earlier_runs_are_set_aside(tmp_path, caplog):
    net = torch.nn.Linear(2, 1)
    (tmp_path / "resume_notes.txt").write_text("mine")
    (tmp_path / "other_checkpoint_epoch=1.pt").write_bytes(b"not ours")

    def run(epochs: int, resume: bool = False) -> None:
        trainer = _trainer(net)
        saver = AtomicCheckpointSaver(
            str(tmp_path), {"model": net, "trainer": trainer}, file_prefix="resume", save_interval=1, n_saved=2
        )
        if resume:
            CheckpointLoader(latest_checkpoint(tmp_path), {"model": net, "trainer": trainer}).attach(trainer)
        saver.attach(trainer)
        trainer.run([0], max_epochs=epochs)

    run(3)
    run(5, resume=True)  # continues at epoch 4: the interrupted run's epoch 2 and 3 are pruned as its own
    listing = ["other_checkpoint_epoch=1.pt", "resume_checkpoint_epoch=4.pt", "resume_checkpoint_epoch=5.pt",
               "resume_notes.txt"]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    # a fresh, shorter run: its own checkpoints are kept, the earlier run's are moved aside, and resume picks this one
    with caplog.at_level(logging.WARNING):
        run(2)
    (aside,) = (tmp_path / "earlier_runs").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == listing[1:3]
    assert "moved 2 checkpoint(s) of another run" in caplog.text
    assert latest_checkpoint(tmp_path) == str(tmp_path / "resume_checkpoint_epoch=2.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "earlier_runs", "other_checkpoint_epoch=1.pt", "resume_checkpoint_epoch=1.pt", "resume_checkpoint_epoch=2.pt",
        "resume_notes.txt",
    ]  # fmt: skip
    # another fresh run within the same second gets its own folder: nothing set aside is replaced
    run(2)
    assert sorted(len(list(folder.iterdir())) for folder in (tmp_path / "earlier_runs").iterdir()) == [2, 2]


def test_a_run_resumed_from_set_aside_checkpoints_sets_aside_the_later_ones(tmp_path):
    """Resuming the earlier run (its files moved back) while a longer run's checkpoints are there: those, beyond the
    resumed epoch, are set aside instead of being pruned as this run's."""
    net = torch.nn.Linear(2, 1)

    def saver_for(trainer: Engine) -> AtomicCheckpointSaver:
        return AtomicCheckpointSaver(
            str(tmp_path), {"model": net, "trainer": trainer}, file_prefix="resume", save_interval=1, n_saved=2
        )

    first = _trainer(net)
    saver_for(first).attach(first)
    first.run([0], max_epochs=3)
    kept = tmp_path / "kept"
    kept.mkdir()
    for path in tmp_path.glob("resume_*.pt"):
        path.rename(kept / path.name)
    longer = _trainer(net)
    saver_for(longer).attach(longer)
    longer.run([0], max_epochs=6)  # its epochs 5 and 6 stay
    resumed = _trainer(net)
    CheckpointLoader(str(kept / "resume_checkpoint_epoch=3.pt"), {"model": net, "trainer": resumed}).attach(resumed)
    saver_for(resumed).attach(resumed)
    resumed.run([0], max_epochs=4)
    assert sorted(p.name for p in tmp_path.glob("resume_*.pt")) == ["resume_checkpoint_epoch=4.pt"]
    (aside,) = (tmp_path / "earlier_runs").iterdir()
    assert sorted(p.name for p in aside.iterdir()) == ["resume_checkpoint_epoch=5.pt", "resume_checkpoint_epoch=6.pt"]
    with pytest.raises(ValueError, match="n_saved"):
        AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_interval=1, n_saved=0)


def test_a_truncated_resume_checkpoint_falls_back_to_the_previous_one(tmp_path):
    net = torch.nn.Linear(2, 1)
    for epoch in (1, 2, 3):
        torch.save({"model": net.state_dict(), "epoch": epoch}, tmp_path / f"resume_checkpoint_epoch={epoch}.pt")
    newest = tmp_path / "resume_checkpoint_epoch=3.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"resume_checkpoint_epoch=2.pt: skipped resume_checkpoint_epoch=3.pt is unread"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "resume_checkpoint_epoch=2.pt")
    assert latest_checkpoint(tmp_path, verify=False) == str(newest)
    for epoch in (1, 2):
        (tmp_path / f"resume_checkpoint_epoch={epoch}.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no readable checkpoint to resume from in .*epoch=3.pt is unreadable"):
        latest_checkpoint(tmp_path)


def test_a_resume_checkpoint_with_damaged_bytes_of_full_length_is_skipped(tmp_path):
    """torch.load does not check the zip records' CRCs: damaged weights loaded and the run resumed from them (found by
    helper 54: 4 bytes overwritten, 'Restored all variables', every tensor of the final model different)."""
    net = torch.nn.Linear(2, 1)
    for epoch in (1, 2):
        torch.save({"model": net.state_dict(), "epoch": epoch}, tmp_path / f"resume_checkpoint_epoch={epoch}.pt")
    newest = tmp_path / "resume_checkpoint_epoch=2.pt"
    with zipfile.ZipFile(newest) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename)
    content = bytearray(newest.read_bytes())
    extra = int.from_bytes(content[record.header_offset + 28 : record.header_offset + 30], "little")  # local header
    start = record.header_offset + 30 + len(record.filename.encode()) + extra
    content[start : start + 4] = struct.pack("<f", 1000.0)
    newest.write_bytes(bytes(content))
    assert torch.load(newest, weights_only=True)["model"]["weight"].flatten()[0] == 1000.0  # loads: the damage is silent
    with pytest.warns(UserWarning, match=r"skipped resume_checkpoint_epoch=2.pt is unreadable \(the record .*/data/"):
        assert latest_checkpoint(tmp_path) == str(tmp_path / "resume_checkpoint_epoch=1.pt")
    # torch's documented option to save without checksums writes 0: such records are not checked (helper 56)
    from torch.utils.serialization import config

    config.save.compute_crc32 = False
    try:
        torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "resume_checkpoint_epoch=3.pt")
    finally:
        config.save.compute_crc32 = True
    assert latest_checkpoint(tmp_path) == str(tmp_path / "resume_checkpoint_epoch=3.pt")
    # a legacy (non-zip) checkpoint, which latest_checkpoint accepts, is read without mmap (helper 57)
    legacy = tmp_path / "legacy.pt"
    torch.save({"model": net.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    assert list(checkpoint_load_dict({"model": net, "run_params": object()}, legacy, ["run_params"])) == ["model"]


def test_best_model_tracking_survives_a_resume(tmp_path):
    net = torch.nn.Linear(2, 1)
    scores = iter([0.5, 0.9, 0.7])

    def evaluator_with(saver: AtomicCheckpointSaver) -> Engine:
        evaluator = Engine(lambda engine, batch: None)
        evaluator.state.best_metric, evaluator.state.best_metric_epoch = -1, -1

        @evaluator.on(Events.EPOCH_COMPLETED)
        def score(engine):
            engine.state.metrics["auroc"] = next(scores)
            if engine.state.metrics["auroc"] > engine.state.best_metric:
                engine.state.best_metric = engine.state.metrics["auroc"]
                engine.state.best_metric_epoch = engine.state.epoch

        saver.attach(evaluator)
        return evaluator

    def best_saver() -> AtomicCheckpointSaver:
        return AtomicCheckpointSaver(
            str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="auroc", key_metric_filename="best.pt"
        )

    first = best_saver()
    evaluator = evaluator_with(first)
    for value in (1.0, 2.0):
        torch.nn.init.constant_(net.weight, value)
        evaluator.run([0], max_epochs=1)
    state = first.state_dict()
    assert state["best_metric"] == 0.9 and state["key_metric"]["_saved"][0][0] == 0.9
    best = (tmp_path / "best.pt").read_bytes()
    resumed = best_saver()
    evaluator = evaluator_with(resumed)
    resumed.load_state_dict(state)
    assert evaluator.state.best_metric == 0.9
    torch.nn.init.constant_(net.weight, 3.0)
    evaluator.run([0], max_epochs=1)  # 0.7 < 0.9: the best model of before the resume stays
    assert (tmp_path / "best.pt").read_bytes() == best
    assert torch.equal(torch.load(tmp_path / "best.pt", weights_only=True)["weight"], torch.full((1, 2), 2.0))


def _pipeline():
    data = [{"image": np.full((1, 4, 4), float(i), np.float32)} for i in range(8)]
    transform = Compose([RandFlipd("image", prob=0.5, spatial_axis=0), RandGaussianNoised("image", prob=1.0)])
    loader = DataLoader(Dataset(data, transform), batch_size=4, shuffle=True)
    tabular = TensorBatchLoader({"x": torch.arange(10.0)}, batch_size=3, shuffle=True, seed=1)
    return loader, tabular


def _draws(loader, tabular) -> list:
    return [
        random.random(),
        np.random.rand(),
        torch.rand(2),
        [batch["image"] for batch in loader],
        [batch["x"] for batch in tabular],
    ]


def test_random_states_restore_every_stream_and_load_weights_only(tmp_path):
    loader, tabular = _pipeline()
    _draws(loader, tabular)
    states = RandomStates([loader, tabular])
    torch.save({"rng": states.state_dict()}, tmp_path / "ckpt.pt")
    expected = _draws(loader, tabular)
    fresh_loader, fresh_tabular = _pipeline()  # a new run: its own transforms and generators
    RandomStates([fresh_loader, fresh_tabular]).load_state_dict(
        torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"]
    )
    again = _draws(fresh_loader, fresh_tabular)
    assert again[0] == expected[0] and again[1] == expected[1] and torch.equal(again[2], expected[2])
    assert all(torch.equal(a, b) for a, b in zip(again[3], expected[3])), "same shuffles and augmentations"
    assert all(torch.equal(a, b) for a, b in zip(again[4], expected[4])), "same TensorBatchLoader order"


def test_random_states_refuse_another_pipeline():
    loader, tabular = _pipeline()
    state = RandomStates([loader, tabular]).state_dict()
    with pytest.raises(ValueError, match="resume with the same configuration"):
        RandomStates([tabular]).load_state_dict(state)


def test_random_states_of_several_ranks_in_one_process_restore_rank_0s_and_warn(caplog):
    """A DDP checkpoint (every rank's states) resumed by one process: it continues rank 0's streams, with a warning."""
    torch.manual_seed(3)
    rank0 = RandomStates().state_dict()
    expected = torch.rand(3)
    torch.manual_seed(4)
    rank1 = RandomStates().state_dict()
    with caplog.at_level(logging.WARNING, logger="monai_armed.handlers.random_states"):
        RandomStates().load_state_dict({"ranks": [rank0, rank1]})
    assert torch.equal(torch.rand(3), expected)
    assert "holds the random states of 2 process(es), this run has 1: rank 0 takes its own" in caplog.text
