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
"""Caching of generated data sets: a manifest with the generator's parameter hash, reused while it matches."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_armed.utils import write_json

__all__ = ["MANIFEST", "ensure_generated", "parameter_hash", "read_manifest", "write_manifest"]

#: name of the manifest file a generator writes last, listing its parameters, their hash and its files
MANIFEST = "manifest.json"


def parameter_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a generator's parameters.

    Example::

        parameter_hash({"seed": 0, "size": 64}) == parameter_hash({"size": 64, "seed": 0})   # True
    """
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a previous generation in ``out_dir``, or ``{}`` when there is none or it is unreadable.

    Example::

        read_manifest("data/mri").get("hash")
    """
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def write_manifest(out_dir: str | os.PathLike, params: Mapping[str, Any], files: Sequence[str], **records: str) -> Path:
    """Write the manifest that marks a generation in ``out_dir`` as complete (a generator writes it last).

    It holds ``params``, their :func:`parameter_hash`, the generated ``files`` and ``records`` (names of the
    generator's own record files, e.g. ``datalist="datalist.json"``).

    Example::

        write_manifest(out, params, ["images/a.nii.gz"], datalist="datalist.json", sites="sites.json")
    """
    manifest = {"parameters": dict(params), "hash": parameter_hash(params), **records, "files": list(files)}
    return Path(write_json(manifest, Path(out_dir) / MANIFEST))


def ensure_generated(
    make: Callable[..., Path],
    parameters: Callable[..., dict[str, Any]],
    out_dir: str | os.PathLike,
    params: Mapping[str, Any],
    required: Sequence[str],
) -> Path:
    """``out_dir / required[0]`` from a complete earlier ``make(out_dir, **params)``, else from a new one.

    The earlier run is reused when its manifest's hash equals that of ``parameters(...)`` of the same arguments (all
    but ``out_dir``, ``num_workers`` and ``progress``, which do not change the output), and every file in
    ``required`` and in the manifest's ``files`` exists.

    Args:
        make: the generator, ``make(out_dir, **params) -> path of its datalist``; it writes the manifest last.
        parameters: the generator's canonical parameter record (what its manifest hashes).
        out_dir: the output folder.
        params: keyword arguments of ``make``; an unknown one raises ``TypeError``.
        required: files the generator writes besides those in its manifest, the datalist first.

    Example::

        datalist = ensure_generated(make_mri_dataset, _parameters, "data/mri", {"seed": 0}, ["datalist.json"])
    """
    out = Path(out_dir)
    bound = inspect.signature(make).bind(out, **params)
    bound.apply_defaults()
    wanted = parameters(**{k: v for k, v in bound.arguments.items() if k not in ("out_dir", "num_workers", "progress")})
    manifest = read_manifest(out)
    files = [*required, *manifest.get("files", [])]
    if manifest.get("hash") == parameter_hash(wanted) and all((out / f).is_file() for f in files):
        return out / required[0]
    return make(out, **params)
