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
"""Records a run's settings beside its curves, so that runs can be compared by setting in MLflow and TensorBoard."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

__all__ = ["RunParams"]

logger = logging.getLogger(__name__)

#: the longest parameter value MLflow stores
MLFLOW_VALUE_LENGTH = 6000


def _value(text: str) -> Any:
    """A recorded setting as a value to compare (``"1"`` and ``"1.0"`` alike, dicts in any order), else its text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _text(value: Any) -> str:
    """A setting as the text MLflow stores: JSON for lists and dicts (``["f0", "f1"]``), ``str`` otherwise."""
    if isinstance(value, (list, tuple, dict)):
        try:  # numpy numbers as numbers
            return json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item))
        except (TypeError, ValueError):
            pass
    return str(value)


class RunParams:
    """Records a run's settings (variant, loss weights, learning rate, data, ...) when training starts: as parameters
    of the MLflow run of every ``MLFlowHandler`` that has opened one, and as a text table (``run_params``) in
    TensorBoard. MONAI's ``MLFlowHandler`` records only ``max_epochs`` and ``epoch_length``; with these, ``mlflow ui``
    can sort and compare runs by any setting.

    A resumed run (the same MLflow run) keeps the values it first recorded: MLflow refuses to change a parameter, so
    a setting that now differs (e.g. ``epochs`` raised to train further) is named in a warning and not logged again.
    A value longer than MLflow's 6000 characters is refused before training starts.

    Put it in the resume checkpoints' ``save_dict`` (as ``"run_params"``): its ``state_dict`` is the settings, and a
    resumed run's ``CheckpointLoader`` compares them with its own before the first step. A setting that differs and is
    not ``resumable`` is an error naming each one, since the run would no longer continue the checkpoint's (a learning
    rate that the restored optimizer ignores, a batch size or loss weight that changes from the next epoch on); a
    ``resumable`` one (``epochs``, raised to train further) is named in a warning. Values are compared as JSON (``1``
    equals ``1.0``, a dict's order does not count).

    Attach it after the engine's ``MLFlowHandler`` (e.g. in the bundle's ``run`` list), so that their runs are open.

    Args:
        params: the settings, names to JSON-like values.
        summary_writer: a TensorBoard ``SummaryWriter`` (anything with ``add_text``), or ``None``.
        mlflow_handlers: MONAI ``MLFlowHandler`` objects, e.g. those ``--tracking mlflow`` adds to ``train#handlers``.
        resumable: the settings a resumed run may change.

    Example::

        "run_params": {"_target_": "monai_armed.handlers.RunParams",
                       "params": {"variant": "@variant", "learning_rate": "@learning_rate"},
                       "summary_writer": "@tensorboard_writer",
                       "mlflow_handlers": "$[h for h in @train#handlers if isinstance(h, monai.handlers.MLFlowHandler)]"}
        run: ["$@run_params.attach(@train#trainer)", "$@train#trainer.run()"]
    """

    def __init__(
        self,
        params: Mapping[str, Any],
        summary_writer: Any = None,
        mlflow_handlers: Sequence[Any] = (),
        resumable: Sequence[str] = ("epochs",),
    ) -> None:
        self.params = {str(name): _text(value) for name, value in params.items()}
        too_long = [name for name, value in self.params.items() if len(value) > MLFLOW_VALUE_LENGTH]
        if too_long:
            raise ValueError(f"RunParams: the values of {too_long} are longer than MLflow's {MLFLOW_VALUE_LENGTH} characters.")
        self.summary_writer = summary_writer
        self.mlflow_handlers = [h for h in mlflow_handlers if h is not None]
        self.resumable = set(resumable)
        self._loaded, self._verified = False, True

    def attach(self, engine: Engine) -> None:
        if not engine.has_event_handler(self, Events.STARTED):
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if engine is not None and engine.state.epoch > 0 and not self._loaded:  # resumed from a checkpoint without them
            self._verified = False
        step = 0 if engine is None else engine.state.iteration
        if self.summary_writer is not None:
            rows = "\n".join(f"| {name} | {value} |" for name, value in self.params.items())
            self.summary_writer.add_text("run_params", f"| setting | value |\n|---|---|\n{rows}", step)
        for handler in self.mlflow_handlers:
            if getattr(handler, "cur_run", None) is not None:
                self._log_mlflow(handler)

    def state_dict(self) -> dict[str, Any]:
        """The settings, for the resume checkpoints (``verified``: false after a resume from a checkpoint without them,
        whose run's settings nothing confirmed)."""
        return {"params": dict(self.params), "verified": self._verified}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Compare the settings of the run that wrote a checkpoint with this run's: a resumed run with other settings
        (but ``resumable`` ones) is refused."""
        self._loaded = True
        recorded = state_dict["params"]
        if not state_dict.get("verified", True):
            self._verified = False
            logger.warning("RunParams: the checkpoint's settings were recorded by a run resumed from a checkpoint of "
                           "monai-armed 0.8.0 or earlier, which held none: they are not checked.")  # fmt: skip
            return
        changed = {name: (recorded[name], value) for name, value in self.params.items()
                   if name in recorded and recorded[name] != value and _value(recorded[name]) != _value(value)}  # fmt: skip
        refused = [f"{name}: {old} in training, {new} now" for name, (old, new) in changed.items() if name not in self.resumable]
        if refused:
            raise ValueError(
                f"RunParams: the checkpoint being resumed was trained with other settings ({'; '.join(refused)}): the "
                "run would not continue it. Resume with the training run's settings, or start a new run (resume False)."
            )
        if changed:
            logger.warning(f"RunParams: resuming with {'; '.join(f'{n}: {o} -> {v}' for n, (o, v) in changed.items())}.")

    def _log_mlflow(self, handler: Any) -> None:
        from mlflow.entities import Param  # an MLFlowHandler with a run exists, so mlflow is installed

        run_id = handler.cur_run.info.run_id
        logged = handler.client.get_run(run_id).data.params
        changed = [f"{name}: {logged[name]} -> {value}" for name, value in self.params.items() if logged.get(name, value) != value]
        if changed:
            logger.warning(f"RunParams: MLflow run {run_id} keeps the settings it recorded first; now {'; '.join(changed)}.")
        new = [Param(name, value) for name, value in self.params.items() if name not in logged]
        if new:
            handler.client.log_batch(run_id=run_id, params=new)
