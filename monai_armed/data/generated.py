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
Generated data sets: folders a generator owns, a manifest that records every file's size and hash, reuse of a
complete earlier run, and worker processes that die with their parent.

A generator writes only into a folder it owns: one that was new or empty when it started (it then writes an
ownership file, :data:`OWNER_FILE`, before anything else), or one that holds its ownership file or an earlier
manifest of its own. The ownership file keeps a journal of the files the generator wrote or is about to write; a
folder with any file the journal or the manifest does not list (even one named like a generated file) is refused
before anything is touched, so a user's data set is never deleted or overwritten, and neither is a generated file that
changed after its generation (an edit).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import hashlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from tqdm import tqdm

from monai_armed.utils import write_json

__all__ = [
    "MANIFEST",
    "OWNER_FILE",
    "ForeignFilesError",
    "claim_output_dir",
    "ensure_generated",
    "file_record",
    "parameter_hash",
    "read_manifest",
    "record_planned_files",
    "remove_stale_files",
    "generator_parser",
    "run_generator_cli",
    "run_jobs",
    "verify_manifest",
    "write_manifest",
]

logger = logging.getLogger(__name__)

#: name of the manifest file a generator writes last, listing its parameters, their hash and its files
MANIFEST = "manifest.json"
#: name of the file that marks a folder as a generator's own; written before anything else
OWNER_FILE = ".monai_armed_generated.json"

# temporary files of atomic writes: ".<name>.<hex>.tmp" (atomic_open, NIfTI) and ".<hex>.<name>" (TIFF)
_TEMPORARY = (re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8,}\.tmp"), re.compile(r"\.[0-9a-f]{32}\.(?P<name>.+)"))
#: how a bundle is given a user's own data instead of the generated set
_OWN_DATA = (
    "pass its file, --csv_file FILE in the spirals bundle or --datalist_file FILE in the imaging bundles, or put it in "
    "this folder under the name the bundle reads (spirals.csv, datalist.json) with --generate_default_data False"
)
_CHUNK = 1 << 20
#: manifest keys that are not the name of one of the generator's records
_MANIFEST_KEYS = ("generator", "parameters", "hash", "files")


class ForeignFilesError(FileExistsError):
    """A generator was asked to write into a folder that holds files it did not write (nothing was changed)."""


def parameter_hash(params: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a generator's parameters.

    Example::

        parameter_hash({"seed": 0, "size": 64}) == parameter_hash({"size": 64, "seed": 0})   # True
    """
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of a file, as the manifest records it.

    Example::

        file_record("data/mri/images/site01_sub000_img0.nii.gz")["size"]
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a previous generation in ``out_dir``, or ``{}`` when there is none or it is unreadable.

    Example::

        read_manifest("data/mri").get("hash")
    """
    try:
        manifest = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(
    out_dir: str | os.PathLike, params: Mapping[str, Any], files: Sequence[str], generator: str = "", **records: str
) -> Path:
    """Write the manifest that marks a generation in ``out_dir`` as complete (a generator writes it last).

    It holds the ``generator``'s name, ``params`` and their :func:`parameter_hash`, the names of the generator's own
    ``records`` (e.g. ``datalist="datalist.json"``) and, under ``files``, the size and SHA-256 of every generated file
    and record (:func:`file_record`), so that a missing, truncated or changed file is noticed. The same records go into
    the journal of the folder's :data:`OWNER_FILE`, where there is one.

    Example::

        write_manifest(out, params, ["images/a.nii.gz"], "mri", datalist="datalist.json", sites="sites.json")
    """
    out = Path(out_dir)
    names = [*files, *records.values()]
    manifest = {
        "generator": generator,
        "parameters": dict(params),
        "hash": parameter_hash(params),
        **records,
        "files": {name: file_record(out / name) for name in names},
    }
    path = Path(write_json(manifest, out / MANIFEST))
    _update_journal(out, lambda journal: {**{k: v for k, v in journal.items() if (out / k).is_file()}, **manifest["files"]})
    return path


def verify_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with the files of a previous generation (``None`` if each has its recorded size and hash).

    Example::

        problem = verify_manifest("data/mri", read_manifest("data/mri"))   # e.g. "images/a.nii.gz is missing"
    """
    files = manifest.get("files")
    if not isinstance(files, Mapping) or not files:
        return f"{MANIFEST} lists no file sizes and hashes (written by an older version)"
    out = Path(out_dir)
    for name, record in files.items():
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size} bytes, {record.get('size')} were written (truncated or replaced)"
    for name, record in files.items():
        if file_record(out / name)["sha256"] != record.get("sha256"):
            return f"{name} has changed since it was written (its SHA-256 differs)"
    return None


def _real_name(relative: str) -> str:
    """The file a temporary file of an atomic write was for (``images/.a.tif.<hex>.tmp`` -> ``images/a.tif``)."""
    folder, _, name = relative.rpartition("/")
    for pattern in _TEMPORARY:
        match = pattern.fullmatch(name)
        if match:
            return f"{folder}/{match['name']}" if folder else match["name"]
    return relative


def _is_own_manifest(manifest: Mapping[str, Any], generator: str) -> bool:
    """A manifest this generator wrote (also one of the versions that did not yet name the generator)."""
    params = manifest.get("parameters")
    if not isinstance(params, Mapping) or manifest.get("hash") != parameter_hash(params):
        return False
    return manifest.get("generator", generator) == generator


def _files_under(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() or p.is_symlink())


def _read_owner(out: Path) -> dict[str, Any] | None:
    """The folder's :data:`OWNER_FILE` (``{"generator": name, "files": {path: record or None}}``), or ``None``."""
    try:
        owner = json.loads((out / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _journal(owner: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The files an owner file says its generator wrote or was about to write; ``None`` for a file of version <= 0.7.0,
    which listed none."""
    files = owner.get("files") if owner else None
    return dict(files) if isinstance(files, Mapping) else None


def _write_owner(out: Path, generator: str, files: Mapping[str, Any]) -> None:
    write_json({"generator": generator, "files": dict(sorted(files.items()))}, out / OWNER_FILE)


def _update_journal(out: Path, change: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
    """Replace the journal of ``out``'s :data:`OWNER_FILE` by ``change(journal)``; nothing without an owner file."""
    owner = _read_owner(out)
    if owner is not None:
        _write_owner(out, owner.get("generator", ""), change(_journal(owner) or {}))


def claim_output_dir(out_dir: str | os.PathLike, generator: str, owns: Callable[[str], bool]) -> Path:
    """Make sure ``generator`` may write into ``out_dir``; raise :class:`ForeignFilesError` before touching anything.

    ``out_dir`` may be written when it is new or empty (it is created and marked with :data:`OWNER_FILE`), or when it
    holds the generator's :data:`OWNER_FILE` or manifest, and every file in it is one the generator wrote or was about
    to write: it is listed in the owner file's journal (see :func:`record_planned_files`) or in the previous manifest,
    or it is a temporary file of an interrupted atomic write of such a file. A file merely *named* like a generated one
    is the user's and makes the folder foreign. Every file whose size and hash were recorded (the data files and
    records such as ``datalist.json``) must also still have them, or be missing: a user's edit (or a damaged file,
    which cannot be told from one) is never overwritten; a missing file is simply written again.

    Args:
        out_dir: the output folder.
        generator: the generator's name, written into :data:`OWNER_FILE` and the manifest.
        owns: whether a relative path (e.g. ``"images/site01_sub000_img0.nii.gz"``) is a name the generator writes;
            consulted only for a folder of version 0.7.0 or earlier (no journal) without a manifest, i.e. left by an
            interrupted run, whose files nothing else lists.

    Example::

        claim_output_dir("data/mri", "mri", lambda name: name in ("datalist.json", "sites.json"))
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ForeignFilesError(f"{out} is a file, not a folder; the generated data set needs a folder.")
    found = _files_under(out) if out.is_dir() else []
    if not found:
        out.mkdir(parents=True, exist_ok=True)
        _write_owner(out, generator, {})
        return out
    manifest = read_manifest(out)
    own_manifest = _is_own_manifest(manifest, generator)
    owner_record = _read_owner(out)
    owner = owner_record.get("generator") if owner_record else None
    journal = _journal(owner_record)
    listed = manifest.get("files", ()) if own_manifest else ()
    known = dict(journal or {})
    known.update(listed.items() if isinstance(listed, Mapping) else dict.fromkeys(listed))
    if own_manifest:  # its records (datalist.json, ...), named by key; manifests before 0.5 listed data files only
        known.update({v: known.get(v) for k, v in manifest.items() if k not in _MANIFEST_KEYS and isinstance(v, str)})
    fixed = {OWNER_FILE, MANIFEST}
    if owner is not None and owner != generator:
        foreign = [OWNER_FILE]
    elif owner is None and not own_manifest:
        foreign = [name for name in found if name not in fixed] or found
    else:
        # a folder of 0.7.0 or earlier has no journal: its manifest lists the files of its last complete run; only a run
        # interrupted before its manifest leaves nothing but the generator's naming rule to go by
        legacy = journal is None and not own_manifest
        foreign = []
        for name in found:
            real = _real_name(name)
            if real in fixed or real in known:
                continue
            if legacy and owns(real):
                known[real] = None
            else:
                foreign.append(name)
    if foreign:
        raise ForeignFilesError(
            f"{out} holds files that the {generator} generator did not write, e.g. {foreign[0]!r} ({len(foreign)} "
            f"such file(s)); refusing to generate the default data set there, and nothing in the folder was changed. "
            f"To train on your own data, {_OWN_DATA}; to generate the default data, choose a new or empty --dataset_dir."
        )
    for name, record in known.items():
        if isinstance(record, Mapping) and (out / name).is_file() and file_record(out / name) != record:
            raise ForeignFilesError(
                f"{out / name} was changed since the {generator} generator wrote it; refusing to overwrite it "
                f"(nothing in {out} was changed). To train on the edited data, {_OWN_DATA}; to generate the default "
                "data, choose a new or empty --dataset_dir (or delete the changed file: a missing file is written "
                "again)."
            )
    _write_owner(out, generator, known)
    return out


def record_planned_files(out_dir: str | os.PathLike, names: Iterable[str]) -> None:
    """Add ``names`` (relative posix paths) to the journal in ``out_dir``'s :data:`OWNER_FILE` before the generator
    writes them, so that a file of an interrupted generation is known as the generator's own, and only such files are
    ever removed (:func:`remove_stale_files`). Their recorded hashes are dropped: they are about to be written again.

    Example::

        out = claim_output_dir("data/mri", "mri", owns)
        record_planned_files(out, ["images/a.nii.gz", "datalist.json"])
    """
    _update_journal(Path(out_dir), lambda journal: {**journal, **dict.fromkeys(names)})


def remove_stale_files(out_dir: str | os.PathLike, keep: Iterable[str]) -> list[str]:
    """Delete the files in ``out_dir`` that the generator's journal lists (files it wrote, see
    :func:`record_planned_files`) and a new generation no longer lists in ``keep``, and temporary files of interrupted
    writes of the generator's files; everything else is left alone. Returns the removed relative paths.

    Example::

        remove_stale_files("data/mri", files)
    """
    out, keep = Path(out_dir), set(keep)
    journal = _journal(_read_owner(out)) or {}
    removed = []
    for name in _files_under(out):
        real = _real_name(name)
        own = real in journal or real in keep or real in (MANIFEST, OWNER_FILE)
        if (real != name and own) or (real == name and real in journal and real not in keep):
            (out / name).unlink()
            removed.append(name)
    gone = set(removed)
    _update_journal(out, lambda journal: {k: v for k, v in journal.items() if k not in gone})
    return removed


def ensure_generated(
    make: Callable[..., Path],
    parameters: Callable[..., dict[str, Any]],
    out_dir: str | os.PathLike,
    params: Mapping[str, Any],
    required: Sequence[str],
) -> Path:
    """``out_dir / required[0]`` from a complete earlier ``make(out_dir, **params)``, else from a new one.

    The earlier run is reused when its manifest's hash equals that of ``parameters(...)`` of the same arguments (all
    but ``out_dir``, ``num_workers`` and ``progress``, which do not change the output), every file in ``required``
    exists and every file the manifest lists has its recorded size and hash (:func:`verify_manifest`); otherwise the
    reason is logged and ``make`` runs again (it refuses a folder that is not its own, or a file changed since it wrote
    it, see :func:`claim_output_dir`).

    Args:
        make: the generator, ``make(out_dir, **params) -> path of its datalist``; it writes the manifest last.
        parameters: the generator's canonical parameter record (what its manifest hashes).
        out_dir: the output folder.
        params: keyword arguments of ``make``; an unknown one raises ``TypeError``.
        required: files the generator writes besides its data files, the datalist first.

    Example::

        datalist = ensure_generated(make_mri_dataset, _parameters, "data/mri", {"seed": 0}, ["datalist.json"])
    """
    out = Path(out_dir)
    bound = inspect.signature(make).bind(out, **params)
    bound.apply_defaults()
    wanted = parameters(**{k: v for k, v in bound.arguments.items() if k not in ("out_dir", "num_workers", "progress")})
    manifest = read_manifest(out)
    if manifest.get("hash") == parameter_hash(wanted):
        missing = [name for name in required if not (out / name).is_file()]
        problem = f"{missing[0]} is missing" if missing else verify_manifest(out, manifest)
        if problem is None:
            return out / required[0]
        logger.warning(f"regenerating the data set in {out}: {problem}.")
    else:
        logger.info(f"generating the data set in {out}.")
    return make(out, **params)


def _exit_with_parent(parent_pid: int, initializer: Callable[[], Any] | None) -> None:
    """Worker start-up: the worker is killed when its parent dies, even by ``kill -9`` (no orphans holding memory)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError, TypeError):
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    if initializer is not None:
        initializer()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def run_jobs(
    render: Callable[[dict[str, Any]], Any],
    jobs: Sequence[dict[str, Any]],
    num_workers: int | None = None,
    progress: bool = False,
    desc: str = "images",
    count: Callable[[dict[str, Any]], int] | None = None,
    initializer: Callable[[], Any] | None = None,
    min_parallel_jobs: int = 2,
) -> None:
    """Run ``render(job)`` for every job, in worker processes when ``num_workers > 1``.

    Workers die with the calling process (``PR_SET_PDEATHSIG`` on Linux, a watcher thread elsewhere), so killing a
    generation leaves no orphans. The progress bar (tqdm, on stderr) is shown only on a terminal.

    Args:
        render: function of one job; module-level, so that worker processes can run it.
        jobs: the jobs, each with its own seeds (the result must not depend on the number of workers).
        num_workers: worker processes (default: up to 4, as many as there are CPUs).
        progress: show a progress bar when stderr is a terminal.
        desc: the progress bar's label.
        count: images a job writes (default 1), for the progress bar.
        initializer: run once in each worker (e.g. to load a template).
        min_parallel_jobs: fewer jobs than this run in this process.

    Example::

        run_jobs(_render_job, jobs, num_workers=2, progress=True, desc="MRI images")
    """
    workers = min(4, os.cpu_count() or 1) if num_workers is None else num_workers
    workers = min(workers, len(jobs)) if len(jobs) >= min_parallel_jobs else 1
    counts = [count(job) if count is not None else 1 for job in jobs]
    with tqdm(total=sum(counts), desc=desc, unit="image", disable=None if progress else True) as bar:
        if workers <= 1:
            for job, n in zip(jobs, counts):
                render(job)
                bar.update(n)
            return
        with ProcessPoolExecutor(workers, initializer=_exit_with_parent, initargs=(os.getpid(), initializer)) as pool:
            for n, _ in zip(counts, pool.map(render, jobs, chunksize=4)):
                bar.update(n)


def generator_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """The command line of a data generator module: ``--out`` and ``--seed``; the module adds its own options and
    :func:`run_generator_cli` those every generator has (``--num-workers``, ``--progress``, ``--force``).

    Example::

        parser = generator_parser("monai_armed.data.nuclei", __doc__)
        parser.add_argument("--size", type=int, default=128)
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.strip().split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def run_generator_cli(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    params: Callable[[argparse.Namespace], dict[str, Any]],
    make: Callable[..., Path],
    ensure: Callable[..., Path],
) -> Path:
    """Parse ``argv``, generate (``make`` with ``--force``, else ``ensure``, which reuses a complete data set) into
    ``--out`` with ``params(args)``, print the datalist's path on stdout and the section sizes on stderr.

    Example::

        return run_generator_cli(parser, argv, lambda a: {"seed": a.seed}, make_nucleus_dataset, ensure_nucleus_dataset)
    """
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching data set exists")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    kwargs = {**params(args), "num_workers": args.num_workers, "progress": args.progress}
    datalist = (make if args.force else ensure)(args.out, **kwargs)
    counts = {k: len(v) for k, v in json.loads(Path(datalist).read_text()).items()}
    print(datalist)
    print(f"{counts} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    return datalist
