"""``verify``: re-check a finished download against its journal(s).

Silent corruption after the fact (a bad disk, a sync tool, a careless script) is as bad
as a broken download. The journals know the name, size and MD5 of every file they
published, so this re-hashes them and lists what is missing, altered or unexpected.
Every series is counted once, whichever journals (shards, re-runs) name it; a file item
(a DRS object or PathDB slide published as ``Collection/Patient/name``, issue 24) is
checked like a series of one file. Files
adopted from an existing tree were never hashed by us: their sizes are checked here,
their content by ``verify --server`` (:mod:`nbia_retriever.verify_server`).

Every command that takes a download root also takes the folder the user typed after
``-d`` (:func:`find_download_root`): its single root is picked, and when it holds
several they are listed, one a line, for the user to choose (nothing is guessed).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .engine.journal import Journal, JournalEntry
from .engine.staging import looks_like_dicom
from .errors import AmbiguousRootError, DestinationError
from .layout import root_folder_name
from .models import SeriesState, is_file_uid
from .ondisk import STATE_DIR, journal_paths


def download_roots(folder: Path) -> list[Path]:
    """The download roots directly inside ``folder`` (folders holding ``.nbia/``), in
    name order; links are not followed (a planted one is no root of the user's)."""
    try:
        children = sorted(Path(folder).iterdir())
    except OSError:
        return []
    return [child for child in children
            if not child.is_symlink() and child.is_dir()
            and (child / STATE_DIR).is_dir() and not (child / STATE_DIR).is_symlink()]


def find_download_root(folder: str | os.PathLike[str],
                       manifest_root_name: str | None = None) -> Path:
    """The download root meant by ``folder``: itself when it holds ``.nbia/``, else the
    root its manifest would make there (``manifest_root_name``), else its one download
    root (the ``-d`` folder of a download). Raises :class:`AmbiguousRootError` listing
    them when it holds several, :class:`DestinationError` when it holds none.

    Read-only (the view calls it for the folder typed in its form, as ``verify`` and
    ``merge-reports`` do for theirs)."""
    base = Path(folder)
    if (base / STATE_DIR).is_dir():
        return base
    if manifest_root_name is not None:
        candidate = base / root_folder_name(manifest_root_name)
        if (candidate / STATE_DIR).is_dir():
            return candidate
    roots = download_roots(base)
    if len(roots) == 1:
        return roots[0]
    if roots:
        raise AmbiguousRootError(base, roots)
    raise DestinationError(f"{base}: no download here (no {STATE_DIR}/ in it, nor in a "
                           "folder inside it)")


@dataclass
class VerifyResult:
    series: int = 0
    files: int = 0
    problems: list[str] = field(default_factory=list)
    unhashed: int = 0
    #: One line per journal whose rows named folders outside the root (not checked).
    warnings: list[str] = field(default_factory=list)
    #: The root checked (named in the next step).
    root: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        extra = (f"; {self.unhashed} adopted files checked by size only (verify --server "
                 "checks their content)") if self.unhashed else ""
        line = f"verified {self.series} series, {self.files} files: {status}{extra}"
        if self.ok:
            return line
        # A re-run would not help: the journal says these series are complete.
        root = shlex.quote(str(self.root)) if self.root is not None else "ROOT"
        return (f"{line}\nnext: nbia-retriever verify {root} --server --repair downloads "
                "the damaged series again (a re-run of the download would not: its "
                "journal says they are complete)")


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _starts_like_dicom(path: Path) -> bool:
    """Whether a ``.dcm`` file starts like DICOM: an adopted tree's files were never
    hashed, and an error page saved as ``.dcm`` (by another tool, or planted) would
    otherwise pass on its size alone. (``--quick`` reads it only for such files.)"""

    try:
        with path.open("rb") as handle:
            return looks_like_dicom(handle.read(132))
    except OSError:
        return False


def complete_entries(root: Path, warnings: list[str] | None = None
                     ) -> Iterator[JournalEntry]:
    """Every complete series of every journal of ``root``, each series once (the entry
    completed last wins). Rows naming a folder outside the root never come out: one line
    per journal that had some goes to ``warnings``."""
    paths = journal_paths(root)
    if not paths:
        raise FileNotFoundError(f"{root}: no download journal here (expected {STATE_DIR}/)")
    latest: dict[str, JournalEntry] = {}
    for path in paths:
        with Journal(path, readonly=True) as journal:
            for entry in journal.entries(SeriesState.COMPLETE):
                known = latest.get(entry.uid)
                if known is None or entry.completed >= known.completed:
                    latest[entry.uid] = entry
            message = journal.refused_message()
            if message and warnings is not None:
                warnings.append(message)
    yield from latest.values()


def verify_root(root: Path, *, quick: bool = False,
                on_series: Callable[[str], None] | None = None) -> VerifyResult:
    """Check every complete series of every journal under ``root/.nbia``."""
    result = VerifyResult(root=root)
    for entry in complete_entries(root, result.warnings):
        result.series += 1
        if on_series:
            on_series(entry.uid)
        if is_file_uid(entry.uid):  # a file item: its one file, Collection/Patient/name
            _check_file(root, entry, result, quick=quick)
            continue
        folder = root / entry.relpath
        if not folder.is_dir() or folder.is_symlink():
            result.problems.append(f"missing series {entry.uid}: {entry.relpath}")
            continue
        expected = {f.name: f for f in entry.files}
        present = {e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False)}
        for name, record in expected.items():
            result.files += 1
            file = folder / name
            if name not in present:
                result.problems.append(f"missing file {entry.relpath}/{name}")
            elif file.stat().st_size != record.size:
                result.problems.append(f"altered file (size) {entry.relpath}/{name}")
            elif name.lower().endswith(".dcm") and (not quick or not record.md5) \
                    and not _starts_like_dicom(file):
                result.problems.append(f"not a DICOM file {entry.relpath}/{name}")
            elif not record.md5:
                result.unhashed += 1
            elif not quick and _md5(file) != record.md5:
                result.problems.append(f"altered file (MD5) {entry.relpath}/{name}")
        for name in sorted(present - set(expected)):
            result.problems.append(f"unexpected file {entry.relpath}/{name}")
    return result


def _check_file(root: Path, entry: JournalEntry, result: VerifyResult, *,
                quick: bool) -> None:
    """A file item (issue 24): its file is there, a regular file (never read through a
    link: the journal refused a row whose leaf is one), with the size and MD5 its row
    recorded when it was published."""
    result.files += 1
    path = root / entry.relpath
    record = entry.files[0] if entry.files else None
    try:
        st = path.lstat()
    except OSError:
        result.problems.append(f"missing file {entry.relpath}")
        return
    if not stat.S_ISREG(st.st_mode):
        result.problems.append(f"not a regular file {entry.relpath}")
    elif record is None or st.st_size != record.size:
        result.problems.append(f"altered file (size) {entry.relpath}")
    elif not record.md5:
        result.unhashed += 1
    elif not quick and _md5_nofollow(path) != record.md5:
        result.problems.append(f"altered file (MD5) {entry.relpath}")


def _md5_nofollow(path: Path) -> str:
    """:func:`_md5` of a file opened without following a link ("" when it cannot be:
    a link swapped in since it was looked at reads as altered, never as its target)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        return hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False)
                                   ).hexdigest()
