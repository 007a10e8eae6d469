"""``verify --server``: check series folders against the server, without downloading.

Works on any tree: one made by this tool, one adopted from the Java retriever, one the
Java retriever made alone. Each series folder (found through the journals, then by
walking the tree and reading one image header per folder) is compared with what the
server says about its series:

* the image count from the metadata (fewer files: incomplete; more: mismatch);
* ``POST v4/getMD5Hierarchy``: the MD5 of the series' image MD5s, sorted and
  concatenated, which the client computes from the files on disk.

A server without that endpoint gets "not supported by this server" per series (the
counts are still checked). :func:`set_aside` moves the bad folders aside (``verify
--repair``), and a download of just those series fetches them again, with the root's own
layout.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from ._dicomtags import series_uid_of
from .api import ApiMismatch, NbiaClient
from .engine.journal import Journal
from .engine.rows import SERIES_DEPTH, safe_relpath
from .errors import ApiError, DestinationError
from .models import SeriesInfo, SeriesState, is_file_uid
from .ondisk import STATE_DIR, DownloadRoot, ensure_dir, journal_paths, open_dir


class Verdict(StrEnum):
    MATCH = "match"
    MISMATCH = "mismatch"
    INCOMPLETE = "incomplete"
    UNKNOWN = "unknown"
    UNSUPPORTED = "not supported by this server"
    ERROR = "error"


@dataclass
class SeriesCheck:
    uid: str
    relpath: str
    verdict: Verdict
    detail: str = ""

    @property
    def bad(self) -> bool:
        return self.verdict in (Verdict.MISMATCH, Verdict.INCOMPLETE, Verdict.UNKNOWN,
                                Verdict.ERROR)

    def line(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.verdict} {self.uid} ({self.relpath}){detail}"


@dataclass
class ServerVerifyResult:
    root: Path
    checks: list[SeriesCheck] = field(default_factory=list)
    #: One line per journal whose rows named folders outside the root (not checked).
    warnings: list[str] = field(default_factory=list)

    @property
    def bad(self) -> list[SeriesCheck]:
        return [c for c in self.checks if c.bad]

    @property
    def ok(self) -> bool:
        return not self.bad

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for check in self.checks:
            counts[check.verdict] = counts.get(check.verdict, 0) + 1
        parts = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        head = f"checked {len(self.checks)} series against the server"
        if self.ok:
            unsupported = counts.get(Verdict.UNSUPPORTED, 0)
            tail = "all match" if not unsupported else (
                f"image counts match; MD5 check {Verdict.UNSUPPORTED} for {unsupported}")
            return f"{head}: {tail}"
        return f"{head}: {parts}"


def image_files(folder: Path) -> list[Path]:
    """The DICOM files of a series folder (never through a link)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return sorted(Path(e.path) for e in entries
                  if e.is_file(follow_symlinks=False) and e.name.lower().endswith(".dcm"))


def _series_uid_of(path: Path) -> str | None:
    try:
        with open(path, "rb") as handle:
            return series_uid_of(handle.read(1 << 20))
    except OSError:
        return None


def find_series_folders(root: Path, warnings: list[str] | None = None) -> dict[str, str]:
    """uid -> relpath of every series folder below ``root``: from the journals, then from
    the tree itself (Java-made folders have no journal). Journal rows naming a folder
    outside the root are left out: one line per journal that had some to ``warnings``."""
    found: dict[str, str] = {}
    files: set[str] = set()
    for path in journal_paths(root):
        with Journal(path, readonly=True) as journal:
            for uid, relpath in journal.completed().items():
                if relpath and is_file_uid(uid):
                    files.add(uid)  # a DRS object or PathDB slide: no series to ask about
                elif relpath and (root / relpath).is_dir():
                    found.setdefault(uid, relpath)
            message = journal.refused_message()
            if message and warnings is not None:
                warnings.append(message)
    if files and warnings is not None:
        warnings.append(f"{len(files)} file item(s) not checked against the server (a file "
                        "item: its size and MD5 were checked when it was fetched, and "
                        "`verify` checks them again)")
    known = set(found.values())
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        depth = len(rel.parts)
        if depth == 1 and rel.parts[0] == STATE_DIR:
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not os.path.islink(os.path.join(dirpath,
                                                                                    d)))
        if depth < SERIES_DEPTH:
            continue
        dirnames[:] = []
        relpath = rel.as_posix()
        if relpath in known:
            continue
        dicom = sorted(f for f in filenames if f.lower().endswith(".dcm"))
        if not dicom:
            continue
        series_uid = _series_uid_of(Path(dirpath) / dicom[0])
        if series_uid:
            found.setdefault(series_uid, relpath)
    return found


def hierarchy_md5(files: Iterable[Path]) -> str:
    """The server's series digest, from the files: MD5 of the sorted image MD5s."""
    digests = []
    for path in files:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digests.append(digest.hexdigest())
    return hashlib.md5("".join(sorted(digests)).encode(), usedforsecurity=False).hexdigest()


def verify_against_server(root: Path, client: NbiaClient, *, workers: int = 4,
                          on_series: Callable[[SeriesCheck], None] | None = None,
                          idc_endpoint: str | None = None, timeout: float = 60.0,
                          verify: bool = True) -> ServerVerifyResult:
    """Check every series folder of ``root`` (see the module docstring). Series the
    journal says came from IDC are checked against their bucket's listing instead
    (:mod:`nbia_retriever.idc.verify`; ``idc_endpoint``: ``--idc-endpoint``)."""
    result = ServerVerifyResult(root)
    folders = find_series_folders(root, result.warnings)
    if not folders:
        return result
    from .idc.verify import idc_rows  # a journal's source column, read only here

    from_idc = {uid: where for uid, where in idc_rows(root).items() if uid in folders}
    errors: dict[str, str] = {}
    nbia = [uid for uid in folders if uid not in from_idc]
    infos = client.series_metadata(nbia, errors=errors) if nbia else {}
    supported = [True]

    def check_idc(uid: str) -> SeriesCheck:
        # IDC's client only when the root holds IDC series
        import os

        from .idc import check_endpoint  # (as above)
        from .idc.source import DEFAULT_ENDPOINT
        from .idc.verify import check_idc_series

        relpath = folders[uid]
        bucket, uuid = from_idc[uid]
        endpoint = check_endpoint(idc_endpoint or os.environ.get("NBIA_IDC_ENDPOINT")
                                   or DEFAULT_ENDPOINT)
        verdict, detail = check_idc_series(image_files(root / relpath), bucket, uuid,
                                           endpoint=endpoint, timeout=timeout, verify=verify)
        return SeriesCheck(uid, relpath, Verdict(verdict), detail)

    def check(uid: str) -> SeriesCheck:
        if uid in from_idc:
            return check_idc(uid)
        relpath = folders[uid]
        info: SeriesInfo | None = infos.get(uid)
        if info is None:
            why = errors.get(uid, "the server does not describe this series (unknown, or "
                                  "not accessible to this login)")
            return SeriesCheck(uid, relpath, Verdict.UNKNOWN, why)
        files = image_files(root / relpath)
        expected = info.image_count
        if expected is not None and len(files) < expected:
            return SeriesCheck(uid, relpath, Verdict.INCOMPLETE,
                               f"{len(files)} of {expected} images")
        if expected is not None and len(files) > expected:
            return SeriesCheck(uid, relpath, Verdict.MISMATCH,
                               f"{len(files)} images, the server has {expected}")
        if not supported[0]:
            return SeriesCheck(uid, relpath, Verdict.UNSUPPORTED, "image count matches")
        try:
            remote = client.md5_hierarchy(uid)
        except ApiMismatch:
            supported[0] = False
            return SeriesCheck(uid, relpath, Verdict.UNSUPPORTED, "image count matches")
        except ApiError as exc:
            return SeriesCheck(uid, relpath, Verdict.ERROR, str(exc))
        if remote is None:
            return SeriesCheck(uid, relpath, Verdict.UNKNOWN,
                               "the server has no MD5s for this series")
        local = hierarchy_md5(files)
        if local != remote:
            return SeriesCheck(uid, relpath, Verdict.MISMATCH,
                               "the files' MD5s differ from the server's")
        return SeriesCheck(uid, relpath, Verdict.MATCH)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for outcome in pool.map(check, sorted(folders, key=lambda u: folders[u])):
            result.checks.append(outcome)
            if on_series:
                on_series(outcome)
    return result


def detect_layout(root: Path, result: ServerVerifyResult) -> str:
    """The layout a root was made with: its record, else what its folders look like."""
    made = DownloadRoot(root).read_info().get("layout")
    if isinstance(made, str):
        return made
    for check in result.checks:
        if Path(check.relpath).name == check.uid:
            return "classic"
    return "descriptive"


def set_aside(root: Path, checks: Iterable[SeriesCheck]) -> Path:
    """Move the folders of ``checks`` to ``.nbia/repair-<time>/`` and forget them in the
    journals, so a download fetches them again. Returns where they went.

    Each folder is moved by one ``rename`` relative to its parent, opened component by
    component without following a link (:func:`~.ondisk.open_dir`): a folder swapped
    for a link since it was checked is never followed out of the root. One that cannot
    be moved so is left where it is (and its series is not forgotten)."""
    aside = ensure_dir(root, [STATE_DIR, f"repair-{time.strftime('%Y%m%d-%H%M%S')}"])
    uids = []
    for n, check in enumerate(checks):
        relpath = safe_relpath(check.relpath)
        if relpath is None:
            continue
        try:
            parent = open_dir(root, relpath.parts[:-1], create=False)
        except (OSError, DestinationError):
            continue
        try:
            os.rename(relpath.name, aside / f"{n:04d}", src_dir_fd=parent)
        except OSError:
            continue
        finally:
            os.close(parent)
        uids.append(check.uid)
    for path in journal_paths(root):
        with Journal(path) as journal:
            journal.set_states((uid, SeriesState.NOT_STARTED, "set aside by verify --repair",
                                None, None) for uid in uids if journal.get(uid) is not None)
    return aside

