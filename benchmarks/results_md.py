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
"""Shared by the benchmark scripts: rewrite one marked section of benchmarks/RESULTS.md, keeping the others."""

from __future__ import annotations

import fcntl
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from monai_armed.utils import atomic_open

__all__ = ["replace_section"]

MD_HEADER = (
    "# monai_armed benchmarks\n\n"
    "Sections between `<!-- name:start -->` and `<!-- name:end -->` markers are rewritten by the benchmark scripts.\n"
)


def _marker_lines(text: str, marker: str) -> list[re.Match]:
    return list(re.finditer(rf"^{re.escape(marker)}$", text, re.M))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock beside ``path`` (``.<name>.lock``): two benchmarks that finish at once must not both
    read the old file and each write it back without the other's section."""
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Replace the section ``name`` of ``path`` by ``markdown`` (appended when missing; the file is created with a
    header when absent), writing atomically under a lock.

    The markers are lines of their own, ``<!-- name:start -->`` and ``<!-- name:end -->``; a section with one of
    them missing, or repeated, or in the wrong order raises a ``ValueError`` and nothing is written (replacing
    from a lone start marker to a new end marker would delete every section in between).

    Example::

        replace_section(Path("benchmarks/RESULTS.md"), "mri-sites", "## MRI sites\\n...")
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    with _locked(path):
        text = path.read_text() if path.exists() else MD_HEADER
        if not _marker_lines(text, start) and not _marker_lines(text, end):
            text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
        starts, ends = _marker_lines(text, start), _marker_lines(text, end)
        if len(starts) != 1 or len(ends) != 1 or ends[0].start() < starts[0].end():
            raise ValueError(
                f"{path}: section {name!r} has {len(starts)} start and {len(ends)} end marker line(s); expected one "
                f"'{start}' line before one '{end}' line. Mend the file; nothing was written."
            )
        with atomic_open(path) as f:
            f.write(f"{text[: starts[0].start()]}{start}\n{markdown}\n{end}{text[ends[0].end() :]}")
