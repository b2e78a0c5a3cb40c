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

from pathlib import Path

from monai_armed.utils import atomic_open

__all__ = ["replace_section"]

MD_HEADER = (
    "# monai_armed benchmarks\n\n"
    "Sections between `<!-- name:start -->` and `<!-- name:end -->` markers are rewritten by the benchmark scripts.\n"
)


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Replace the section ``name`` of ``path`` by ``markdown`` (appended when missing; the file is created with a
    header when absent), writing atomically.

    Example::

        replace_section(Path("benchmarks/RESULTS.md"), "mri-sites", "## MRI sites\\n...")
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else MD_HEADER
    if start not in text or end not in text:
        text = text.rstrip("\n") + f"\n\n{start}\n{end}\n"
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with atomic_open(path) as f:
        f.write(f"{head}{start}\n{markdown}\n{end}{tail}")
