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


def _text(value: Any) -> str:
    """A setting as the text MLflow stores: JSON for lists and dicts (``["f0", "f1"]``), ``str`` otherwise."""
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value)
        except TypeError:
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

    Attach it after the engine's ``MLFlowHandler`` (e.g. in the bundle's ``run`` list), so that their runs are open.

    Args:
        params: the settings, names to JSON-like values.
        summary_writer: a TensorBoard ``SummaryWriter`` (anything with ``add_text``), or ``None``.
        mlflow_handlers: MONAI ``MLFlowHandler`` objects, e.g. those ``--tracking mlflow`` adds to ``train#handlers``.

    Example::

        "run_params": {"_target_": "monai_armed.handlers.RunParams",
                       "params": {"variant": "@variant", "learning_rate": "@learning_rate"},
                       "summary_writer": "@tensorboard_writer",
                       "mlflow_handlers": "$[h for h in @train#handlers if isinstance(h, monai.handlers.MLFlowHandler)]"}
        run: ["$@run_params.attach(@train#trainer)", "$@train#trainer.run()"]
    """

    def __init__(self, params: Mapping[str, Any], summary_writer: Any = None, mlflow_handlers: Sequence[Any] = ()) -> None:
        self.params = {str(name): _text(value) for name, value in params.items()}
        too_long = [name for name, value in self.params.items() if len(value) > MLFLOW_VALUE_LENGTH]
        if too_long:
            raise ValueError(f"RunParams: the values of {too_long} are longer than MLflow's {MLFLOW_VALUE_LENGTH} characters.")
        self.summary_writer = summary_writer
        self.mlflow_handlers = [h for h in mlflow_handlers if h is not None]

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        step = 0 if engine is None else engine.state.iteration
        if self.summary_writer is not None:
            rows = "\n".join(f"| {name} | {value} |" for name, value in self.params.items())
            self.summary_writer.add_text("run_params", f"| setting | value |\n|---|---|\n{rows}", step)
        for handler in self.mlflow_handlers:
            if getattr(handler, "cur_run", None) is not None:
                self._log_mlflow(handler)

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
