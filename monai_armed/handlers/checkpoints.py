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

import os
import re
from pathlib import Path

__all__ = ["latest_checkpoint"]


def latest_checkpoint(directory: str | os.PathLike, prefix: str = "resume") -> str:
    """The checkpoint of the latest epoch that ``CheckpointSaver(file_prefix=prefix, epoch_level=True)`` wrote.

    Raises a ``FileNotFoundError`` naming the folder when there is none, so a resumed run fails before training.

    Example::

        CheckpointLoader(load_path=latest_checkpoint("models"), load_dict={"model": net, "trainer": trainer})
    """
    pattern = re.compile(rf"{re.escape(prefix)}_.*epoch=(\d+)\.pt")
    found = [(int(m.group(1)), p) for p in Path(directory).glob(f"{prefix}_*.pt") if (m := pattern.fullmatch(p.name))]
    if not found:
        raise FileNotFoundError(f"no checkpoint '{prefix}_*epoch=N.pt' to resume from in {directory}.")
    return str(max(found)[1])
