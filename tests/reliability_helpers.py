"""Checks shared by the reliability tests: "every file marked complete is exactly right".

A download root may hold only what the engine means to leave there: ``metadata.csv``,
one ``LICENSE`` per collection folder, the published series folders (each holding
exactly the files its journal entry lists, with those sizes and MD5s) and ``.nbia/``.
Anything else (a temporary file, a half-written series, an empty folder, a duplicate or
torn ``metadata.csv`` row) is a leftover of a fault the engine did not clean up.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath

import pytest

from enginehelpers import downloaded_series
from nbia_retriever.engine.journal import Journal
from nbia_retriever.models import SeriesState
from nbia_retriever.report import METADATA_HEADER

CLI = [sys.executable, "-m", "nbia_retriever.cli"]


def metadata_rows(root: Path) -> list[list[str]]:
    """The rows of ``metadata.csv`` (header checked and dropped); [] when absent."""
    path = root / "metadata.csv"
    if not path.exists():
        return []
    data = path.read_bytes()
    if not data:  # killed between creating it and its first write: no rows yet
        return []
    assert data.endswith(b"\n"), "metadata.csv ends in a torn row"
    rows = list(csv.reader(data.decode("utf-8-sig").splitlines()))
    assert tuple(rows[0]) == METADATA_HEADER, "metadata.csv header missing or repeated"
    body = rows[1:]
    for row in body:
        assert len(row) == len(METADATA_HEADER), f"malformed metadata.csv row {row!r}"
    return body


def journal_complete(root: Path) -> dict[str, tuple[str, dict[str, tuple[int, str]]]]:
    """uid -> (relpath, {file name: (size, md5)}) of every series the journal calls complete."""
    found: dict[str, tuple[str, dict[str, tuple[int, str]]]] = {}
    for path in sorted((root / ".nbia").glob("journal*.sqlite")):
        with Journal(path) as journal:
            for entry in journal.entries(SeriesState.COMPLETE):
                found[entry.uid] = (entry.relpath,
                                    {f.name: (f.size, f.md5) for f in entry.files})
    return found


def assert_root_clean(root: Path, *, complete: Iterable[str] = (),
                      expected: dict[str, dict[str, str]] | None = None,
                      settled: bool = True) -> None:
    """Everything under ``root`` is accounted for, and complete means exactly right.

    ``complete``: the series that must be complete. ``expected``: the archive's
    {uid: {md5: name}} to compare published series with, byte for byte. ``settled=False``
    is the state right after a crash: a series folder may be published but not yet
    journaled (then it must be complete and byte-identical all the same), and
    ``metadata.csv`` may lack the rows of series journaled just before the crash.
    """
    must = set(complete)
    journal = journal_complete(root)
    assert must <= set(journal), f"not complete: {sorted(must - set(journal))}"
    folders = {PurePosixPath(relpath): files for relpath, files in journal.values()}
    # Every published file is listed by its journal entry, with that size and MD5.
    for folder, files in folders.items():
        path = root / folder
        assert path.is_dir(), f"journal says complete but {folder} is missing"
        present = {p.name for p in path.iterdir()}
        assert present == set(files), f"{folder}: {sorted(present ^ set(files))}"
        for name, (size, md5) in files.items():
            data = (path / name).read_bytes()
            # An adopted folder (found on disk, already complete) is recorded unhashed:
            # its content is checked against the archive below, byte for byte.
            assert len(data) == size and md5 in ("", hashlib.md5(data).hexdigest()), \
                f"{folder}/{name} differs from its journal record"
    # Nothing else outside .nbia: only metadata.csv, collection LICENSEs and the ancestors
    # of series folders.
    if not settled:
        folders.update(_unjournaled_folders(root, set(folders), expected))
    ancestors = {p for f in folders for p in f.parents}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        if rel.parts[:1] == (".nbia",):
            dirnames[:] = []
            continue
        if rel in folders:
            dirnames[:] = []
            continue
        if not settled and not any(f for _, _, f in os.walk(dirpath)):
            dirnames[:] = []  # a crash between creating a series' parents and publishing
            continue
        assert rel in ancestors or rel == PurePosixPath(".") or (
            not settled and len(rel.parts) == 1), f"stray folder {rel}"
        for name in filenames:
            allowed = (rel == PurePosixPath(".") and name == "metadata.csv") or (
                len(rel.parts) == 1 and name == "LICENSE")
            assert allowed, f"stray file {rel / name}"
    # metadata.csv: one row per complete series, no duplicates, locations that exist.
    rows = metadata_rows(root)
    uids = [r[0] for r in rows]
    assert len(uids) == len(set(uids)), "duplicate metadata.csv rows"
    if settled:
        assert set(uids) == set(journal), "metadata.csv disagrees with the journal"
    else:
        assert set(uids) <= set(journal), "metadata.csv lists a series not complete"
    for row in rows:
        assert row[15] == "./" + journal[row[0]][0]
    if expected is not None:
        got = downloaded_series(root)
        for uid in journal:
            assert got.get(uid) == expected[uid], f"series {uid} differs from the archive"


def _unjournaled_folders(root: Path, known: set[PurePosixPath],
                         expected: dict[str, dict[str, str]] | None
                         ) -> dict[PurePosixPath, dict[str, tuple[int, str]]]:
    """Series folders published by a run that died before journaling them.

    Each must hold one whole series, byte-identical to the archive: the engine verifies
    before it renames, so anything less is a half-published series.
    """
    found: dict[PurePosixPath, dict[str, tuple[int, str]]] = {}
    for dcm in root.rglob("*.dcm"):
        rel = PurePosixPath(dcm.parent.relative_to(root).as_posix())
        if rel.parts[:1] == (".nbia",) or rel in known or rel in found:
            continue
        series = downloaded_series(dcm.parent)
        assert len(series) == 1, f"{rel}: images of {len(series)} series in one folder"
        uid, files = next(iter(series.items()))
        if expected is not None:
            assert files == expected[uid], f"{rel}: an incomplete or wrong series published"
        found[rel] = {p.name: (p.stat().st_size, hashlib.md5(p.read_bytes()).hexdigest())
                      for p in dcm.parent.iterdir()}
    return found


def tree(root: Path, *, skip: Iterable[str] = ("metadata.csv",)) -> dict[str, bytes]:
    """Every file below ``root`` by relative path, but the run's state (``.nbia``) and
    the files named in ``skip`` (CSVs that hold the time of each download)."""
    skipped = set(skip)
    found: dict[str, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".nbia"]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if rel not in skipped:
                found[rel] = path.read_bytes()
    return found


def staging_leftovers(root: Path) -> list[str]:
    staging = root / ".nbia" / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []


def run_cli(args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 120,
            **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, check=False, **kw)  # type: ignore[call-overload]


_SERVE = "import sys; from nbia_retriever.server import serve_command; serve_command(sys.argv[1:])"


@contextlib.contextmanager
def serving(args: Sequence[str]) -> Iterator[list[str]]:
    """``serve ARGS`` in a child process: the lines of its banner (up to "Press Ctrl+C",
    the server is up then); on leaving, a SIGTERM, which must end it cleanly (exit 0)."""
    proc = subprocess.Popen([sys.executable, "-c", _SERVE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.startswith("Press Ctrl+C"):
                break
        yield lines
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    assert proc.returncode == 0


def banner_url(lines: Sequence[str], label: str) -> str:
    """The URL the banner gives after ``label`` (``"API:"``, ``"S3:"`` ...)."""
    return next(line.split()[1] for line in lines if line.startswith(label))


def exit_signal(code: int) -> str:
    """A readable exit code for assertion messages (``-9`` -> ``SIGKILL``)."""
    return signal.Signals(-code).name if code < 0 else str(code)


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on a new folder ``where`` (skips the test where
    mounting is not allowed), unmounted at the end."""
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)
