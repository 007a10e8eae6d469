"""What a run leaves behind for people: metadata.csv, the error report, the summary.

``metadata.csv`` is the Java retriever's, column for column and value form for value
form (CRLF lines; cleaned descriptions; ``File Size`` as ``12.34 MB``; ``File Location``
``./Collection/...``; the timestamp as ISO local date-time), so scripts written for Java
trees read ours. Rows are appended as series complete (a crash loses nothing already
reported) and never duplicated, even by several processes sharing one root: each append
takes an advisory lock and first reads what other processes appended since.

Every cell written to a CSV here goes through
:func:`~nbia_retriever.untrusted.csv_cell`: server text can hold neither a line break
nor a formula a spreadsheet would run.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError
from .errors import SeriesFailedError as SeriesFailedError  # re-export
from .models import FAILED_STATES, SeriesInfo, SeriesState, is_file_uid
from .ondisk import atomic_write_text, lock_file, open_regular, unlock_file
from .untrusted import csv_cell, plain, redact

METADATA_HEADER = (
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
    "Modality", "SOP Class Name", "SOP Class UID", "Number of Images", "File Size",
    "File Location", "Download Timestamp",
)
ERROR_REPORT_HEADER = (
    "Collection", "Patient ID", "Study Instance UID", "Series Instance UID", "Size",
    "Number Of Images", "Status", "Attempts", "Error",
)
#: ``files.csv`` (beside metadata.csv): one row per file item, a DRS object or PathDB
#: slide that is not a series (issue 24). Keyed by ``Source``, the drs:// URI or URL.
FILES_HEADER = (
    "Collection", "Subject ID", "File Name", "File Location", "Size", "MD5", "Source",
    "Downloaded At",
)
FILES_CSV = "files.csv"
#: metadata.csv lines end like the Java tool's.
CSV_NEWLINE = "\r\n"


def human_size(size: float | None) -> str:
    """Decimal units (MB = 10^6 bytes), as the archive's own figures are quoted."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1000
    return f"{size}"  # pragma: no cover - the loop always returns


#: Characters of a UID kept in narrow tables ("…" + the last ones).
UID_TAIL = 12


def short_uid(uid: str, tail: int = UID_TAIL) -> str:
    """``"…"`` + the last ``tail`` characters: the end of a UID is what tells series apart."""
    return uid if len(uid) <= tail + 1 else "…" + uid[-tail:]


def java_size(size: int) -> str:
    """Java's ``bytesIntoHumanReadable``: ``999 B``, ``12.34 MB`` (1 KB = 1000 B)."""
    if size < 1000:
        return f"{size} B"
    value = float(size)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.2f} {unit}"
    return f"{size} B"  # pragma: no cover


def java_timestamp(when: float) -> str:
    """``LocalDateTime.now().format(ISO_LOCAL_DATE_TIME)``: fraction without trailing
    zeros (groups of three digits, as Java prints nanoseconds)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when))
    micros = round((when % 1) * 1_000_000) % 1_000_000
    if not micros:
        return stamp
    fraction = f"{micros:06d}"
    return f"{stamp}.{fraction[:3] if fraction.endswith('000') else fraction}"


#: How a series left out for its licence says so (``engine.licenses``): the next step
#: for those is the agreement, not a login.
LICENCE_REFUSED = "licence not accepted: "


def metadata_row(info: SeriesInfo, location: str, timestamp: float, *, images: int,
                 size: int, annotations: int = 0) -> list[str]:
    """One metadata.csv row in the Java tool's value forms.

    ``images`` and ``size`` are what was written; ``File Size`` prefers the archive's
    own figure (what Java prints), which equals it for a complete series, plus the
    ``annotations`` bytes written (Java adds the Annotation Size when it asked for
    them); "Number of Images" counts images only, as Java's does.
    """
    # layout (8 ms with datetime and decimal) not at ``import nbia_retriever``: a worker
    # process imports the package long before it writes a row, if it ever does.
    from .layout import java_clean, java_clean_uri, normalise_date

    return [csv_cell(value) for value in (
        info.series_uid, info.collection, info.third_party,
        java_clean_uri(info.data_description_uri), info.patient_id, info.study_uid,
        java_clean(info.study_description), normalise_date(info.study_date),
        java_clean(info.series_description), java_clean(info.manufacturer), info.modality,
        info.sop_class_name, info.sop_class_uid, str(images),
        java_size(info.file_size + annotations if info.file_size else size), location,
        java_timestamp(timestamp),
    )]


def files_row(info: SeriesInfo, uri: str, location: str, name: str, size: int, md5: str,
              timestamp: float) -> list[str]:
    """One files.csv row (:data:`FILES_HEADER`): every cell through ``csv_cell``, as in
    metadata.csv (a URL or a file name can start with ``=`` too); the size in bytes, not
    Java's rounded form: the file is one object, its exact size is what people check."""
    return [csv_cell(value) for value in (
        info.collection, info.patient_id, name, location, str(size), md5, uri,
        java_timestamp(timestamp),
    )]


def item_label(uid: str, info: SeriesInfo | None) -> str:
    """How people know a file item (issue 24): ``collection · patient · file name``
    (the file name is its ``series_description``); a series, or an item without
    metadata, by its key. Printable (:func:`~nbia_retriever.untrusted.plain`)."""
    if info is None or not is_file_uid(uid):
        return plain(uid)
    parts = [p for p in (info.collection, info.patient_id, info.series_description) if p]
    return plain(" \u00b7 ".join(parts)) if parts else plain(uid)


def _row_bytes(row: Sequence[str]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator=CSV_NEWLINE).writerow(row)
    return buf.getvalue().encode("utf-8")


#: Bytes of metadata.csv read at once when catching up with other processes' rows.
_READ_BLOCK = 4 << 20


class MetadataCsv:
    """Appends one row per completed series to ``<root>/metadata.csv``, at most once.

    :class:`FilesCsv` is the same file discipline for ``files.csv``: only its header and
    the column that names a row (:attr:`KEY`) differ.

    Several processes may append to one file (cluster shards, a TUI beside a CLI): each
    append locks the file (``flock``), reads the rows others appended since this object
    last looked (never the whole file twice), and writes the header, if the file is
    empty, and the row in one step. A last row without its line end (power lost
    mid-append) is cut first: the engine re-adds that series' row from its journal.
    The file is opened without following a symbolic link, and only if it is a regular
    file (a FIFO planted there would block the reader forever).
    """

    #: The header written to an empty file, and the column that names a row.
    HEADER: tuple[str, ...] = METADATA_HEADER
    KEY = 0

    def __init__(self, path: Path, *, lazy: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._offset = 0
        self._tail = b""
        #: Whether the file was read (``lazy``: at the first question or append; a
        #: no-op re-run of 50,000 series need not read 50,000 rows).
        self.loaded = False
        if not lazy:
            self.refresh()

    def __contains__(self, uid: str) -> bool:
        if not self.loaded:
            self.refresh()
        return uid in self._seen

    def refresh(self) -> None:
        """Catch up with rows other processes appended."""
        with self._lock:
            self.loaded = True
            try:
                fd = open_regular(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                self._catch_up(fd)
            finally:
                os.close(fd)

    def _catch_up(self, fd: int) -> None:
        self.loaded = True
        size = os.fstat(fd).st_size
        if size < self._offset:  # rewritten meanwhile (merge-reports): read it afresh
            self._seen.clear()
            self._offset, self._tail = 0, b""
        if size == self._offset:
            return
        start = self._offset

        def lines() -> Iterator[str]:
            # Block by block: a 200,000-row file is 100 MB, and must not become one
            # string (nor a StringIO, four bytes a character) to be read.
            pos, first = start, start == 0
            while pos < size:
                block = os.pread(fd, min(_READ_BLOCK, size - pos), pos)
                if not block:
                    break
                pos += len(block)
                data = self._tail + block
                cut = data.rfind(b"\n") + 1
                self._tail = data[cut:]
                if cut:
                    text = data[:cut].decode("utf-8", "replace")
                    if first:
                        text, first = text.lstrip("\ufeff"), False
                    yield from io.StringIO(text, newline="")  # lines as csv reads a file

        key = self.KEY
        for row in csv.reader(lines()):
            if len(row) > key:
                self._seen.add(row[key])
        self._offset = size

    def append(self, row: Sequence[str]) -> bool:
        """Append ``row`` unless its Series UID is present; fsync'd. False if present."""
        return self.append_many([row])[0]

    def append_many(self, rows: Sequence[Sequence[str]]) -> list[bool]:
        """Append the ``rows`` whose Series UID is not present yet, in one write and one
        fsync (a series' row costs an fsync, ~2 ms on a plain disk: 2,000 one-image
        series publishing at once would queue behind each other's); per row, whether
        it was appended."""
        with self._lock:
            added = [False] * len(rows)
            key = self.KEY
            if all(row[key] in self._seen for row in rows):
                return added
            fd = open_regular(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                lock_file(fd)
                try:
                    self._drop_torn_row(fd)
                    self._catch_up(fd)
                    new: set[str] = set()
                    parts: list[bytes] = []
                    for i, row in enumerate(rows):
                        if row[key] not in self._seen and row[key] not in new:
                            new.add(row[key])
                            parts.append(_row_bytes(row))
                            added[i] = True
                    if not parts:
                        return added
                    size = os.fstat(fd).st_size
                    if size == 0:
                        parts.insert(0, _row_bytes(self.HEADER))
                    data = b"".join(parts)
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view):]
                        os.fsync(fd)
                    except OSError:
                        # Disk full mid-row: take the torn row back out, keep the file valid.
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)
                        raise
                    self._offset = size + len(data)
                    self._tail = b""
                    self._seen |= new
                    return added
                finally:
                    unlock_file(fd)
            finally:
                os.close(fd)

    def _drop_torn_row(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        keep, block = size, 1 << 16
        while keep > 0:
            start = max(0, keep - block)
            found = os.pread(fd, keep - start, start).rfind(b"\n")
            if found >= 0:
                keep = start + found + 1
                break
            keep = start
        os.ftruncate(fd, keep)
        if self._offset > keep:
            self._offset, self._tail = keep, b""


class FilesCsv(MetadataCsv):
    """``<root>/files.csv``: a row per file item, named by its ``Source`` (the drs://
    URI or URL: ``uri in files_csv`` asks with ``csv_cell(uri)``, as the row holds it)."""

    HEADER = FILES_HEADER
    KEY = FILES_HEADER.index("Source")

    def __contains__(self, uid: str) -> bool:
        return super().__contains__(csv_cell(uid))


@dataclass(slots=True)
class SeriesResult:
    """The outcome for one series of a run (also the row model of the downloads table)."""

    uid: str
    info: SeriesInfo | None = None
    state: SeriesState = SeriesState.NOT_STARTED
    error: str = ""
    attempts: int = 0
    bytes_done: int = 0
    files: int = 0
    relpath: str = ""
    #: The variant of its folder name the plan chose for downloading it (0: the Java
    #: name; see ``layout.series_relpath_variant``); None while it is not planned for
    #: download (the engine keeps this here, not in a dict: 40 MB for 1,000,000 series).
    variant: int | None = None
    #: Where it comes from (``DownloadOptions.source``; the journal keeps it per row).
    source: str = "nbia"

    @property
    def expected_bytes(self) -> int | None:
        return self.info.file_size if self.info else None


@dataclass
class Report:
    """The summary of a run, returned by :func:`nbia_retriever.download`."""

    root: Path
    results: dict[str, SeriesResult] = field(default_factory=dict)
    elapsed: float = 0.0
    bytes_downloaded: int = 0
    skipped: int = 0
    adopted: int = 0
    cancelled: bool = False
    fatal: str = ""
    auth_failed: bool = False
    usage_error: bool = False
    #: The server did not answer the first calls: nothing was done (exit code 4).
    unreachable: bool = False
    #: Bytes received for series stopped mid-stream (a Ctrl-C): discarded with their
    #: staging folders, fetched again by the next run.
    interrupted_bytes: int = 0
    #: The run retried only the failed series of an earlier one (``--only-failed``).
    only_failed: bool = False
    #: One line each for what the user should know but did not stop the run (journal
    #: rows in the root that named folders outside it).
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        done = self.count(SeriesState.COMPLETE)
        failed = len(self.failed)
        tail = f", stopped: {self.fatal[:60]}" if self.fatal else ""
        return (f"<Report {done}/{len(self.results)} complete, {failed} failed, "
                f"{self.bytes_downloaded / 1e6:,.1f} MB in {self.elapsed:,.1f} s{tail}>")

    def count(self, state: str) -> int:
        return sum(1 for r in self.results.values() if r.state == state)

    @property
    def completed(self) -> list[SeriesResult]:
        return [r for r in self.results.values() if r.state == SeriesState.COMPLETE]

    @property
    def failed(self) -> list[SeriesResult]:
        return [r for r in self.results.values() if r.state in FAILED_STATES]

    @property
    def ok(self) -> bool:
        return not self.fatal and not self.cancelled and all(
            r.state == SeriesState.COMPLETE for r in self.results.values()
        )

    def raise_for_failures(self) -> None:
        """Raise :class:`SeriesFailedError` unless every series is complete."""
        if self.ok:
            return
        failed = self.failed
        if self.fatal:
            raise SeriesFailedError(f"the run stopped: {self.fatal}", failed)
        first = failed[0] if failed else None
        what = f"; first: {first.uid}: {first.error}" if first else ""
        raise SeriesFailedError(f"{len(self.results) - len(self.completed)} of "
                                f"{len(self.results)} series not downloaded{what}", failed)

    def summary(self, command: str | None = None) -> str:
        """A few lines for humans at the end of a run; ``command`` is the command line
        that resumes it (the front end knows it), shown when something is left to do."""
        total = len(self.results)
        done = self.count(SeriesState.COMPLETE)
        if not total and self.only_failed and not self.fatal:
            return ("nothing to retry: no series of this manifest failed in an earlier "
                    f"run into {self.root}")
        mb = self.bytes_downloaded / 1e6
        rate = mb / self.elapsed if self.elapsed > 0 else 0.0
        already = []
        if self.skipped:
            already.append(f"{self.skipped} already done")
        if self.adopted:
            already.append(f"{self.adopted} found on disk")
        # A DRS/PathDB sheet's files are not series: say what the run held.
        files = sum(1 for uid in self.results if is_file_uid(uid))
        noun = "series" if not files else "files" if files == total else "items"
        lines = [
            f"{done} of {total} {noun} complete"
            + (f" ({', '.join(already)})" if already else "")
            + f"; {mb:,.1f} MB downloaded in {self.elapsed:,.1f} s ({rate:,.1f} MB/s)",
        ]
        interrupted = self.count(SeriesState.INTERRUPTED)
        counts = [f"{n} {noun} {state}" for state in (
            SeriesState.ERROR, SeriesState.NOT_AUTHORIZED, SeriesState.NO_DATA,
            SeriesState.NOT_STARTED) if (n := self.count(state))]
        if counts:  # one line: the next step below stays close to the first line
            lines.append(", ".join(counts))
        if interrupted:
            partial = self.interrupted_bytes
            lines.append(f"{interrupted} {noun} interrupted"
                         + (f"; {human_size(partial)} of partial {noun} will be fetched again"
                            if partial else "; no partial data to fetch again"))
        if self.fatal:
            lines.append(f"stopped: {self.fatal}")
        if self.root.is_dir():
            lines.append(f"files in {self.root}")
        lines.extend(self.next_steps(command))
        return "\n".join(lines)

    def next_steps(self, command: str | None = None) -> list[str]:
        """What to do next, as one line (none when everything is complete or nothing
        can be done from here): the command that resumes an interrupted run; for failed
        series, ``--only-failed`` and ``--error-report``; for series the server refused,
        a login."""
        if self.ok or self.auth_failed or self.usage_error or self.unreachable:
            return []
        again = command or "the same command"
        failed = self.failed
        if self.cancelled or not failed:
            left = len(self.results) - self.count(SeriesState.COMPLETE)
            return [f"resume: {again}"] if left else []
        refused = sum(1 for r in failed if r.state == SeriesState.NOT_AUTHORIZED)
        licence = sum(1 for r in failed if r.state == SeriesState.NOT_AUTHORIZED
                      and r.error.startswith(LICENCE_REFUSED))
        retry = (f"{command} --only-failed" if command and "--only-failed" not in command
                 else again if command else "the same command with --only-failed")
        step = (f"next: retry the {len(failed)} failed series with: {retry} "
                "(--error-report FILE lists them as CSV)")
        if licence:
            policy = any(r.error.startswith(LICENCE_REFUSED) and "data use policy" in r.error
                         for r in failed)
            step += (f"; {licence} need their licence accepted (--agree-to-license"
                     + (", or --accept-data-policy" if policy else "") + ")")
        if refused - licence:
            step += (f"; {refused - licence} need a login (--user NAME) or are not on this "
                     "server")
        return [step]

    def to_dataframe(self) -> Any:
        """One flat row per series (pandas, optional): the columns of :data:`FRAME_COLUMNS`."""
        try:
            import pandas  # optional, and slow to import: only when a frame is asked for
        except ImportError:
            raise MissingDependencyError(
                "Report.to_dataframe() needs pandas: pip install pandas") from None
        return pandas.DataFrame([frame_row(r, self.root) for r in self.results.values()],
                                columns=list(FRAME_COLUMNS))


#: Columns of :meth:`Report.to_dataframe`: scalars only, no dicts or lists.
FRAME_COLUMNS = (
    "SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID", "Modality",
    "SeriesDescription", "SeriesNumber", "images", "bytes", "state", "attempts", "error",
    "folder", "source",
)


def frame_row(r: SeriesResult, root: Path) -> dict[str, object]:
    from .layout import format_series_number  # see metadata_row: not at import time

    info = r.info or SeriesInfo(series_uid=r.uid)
    return {
        "SeriesInstanceUID": r.uid, "Collection": info.collection,
        "PatientID": info.patient_id, "StudyInstanceUID": info.study_uid,
        "Modality": info.modality, "SeriesDescription": info.series_description,
        "SeriesNumber": format_series_number(info.series_number),
        "images": info.image_count, "bytes": r.bytes_done or info.file_size,
        "state": str(r.state), "attempts": r.attempts, "error": r.error,
        "folder": str(root / r.relpath) if r.relpath else "",
        "source": r.source,
    }


def failure_reason(uid: str, error: str) -> str:
    """A failed series' error without its UID (the line names it once) and without the
    engine's "(after N attempts)" (:func:`failure_line` says how many)."""
    text = error.strip()
    for prefix in (f"series {uid}: ", f"{uid}: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = re.sub(r" \(after \d+ attempts?\)$", "", text)
    return text or "no reason given"


def failure_line(uid: str, error: str, attempts: int, info: SeriesInfo | None = None) -> str:
    """One failed series, one line: ``UID: reason (N attempts)``; a file item, given its
    ``info``, as ``collection · patient · file name (URI): reason``."""
    tail = f" ({attempts} attempt{'s' if attempts != 1 else ''})" if attempts else ""
    who = uid
    if info is not None and is_file_uid(uid):
        who = f"{item_label(uid, info)} ({uid})"
    return f"{who}: {failure_reason(uid, error)}{tail}"


def _num(value: int | None) -> str:
    return "" if value is None else str(value)


def write_error_report(path: Path, results: Iterable[SeriesResult]) -> int:
    """The GUI's "Save error report": the failed rows with the table's columns + error.

    Cleaned like metadata.csv: no control characters, no formulas, no secrets.
    """
    rows = [r for r in results if r.state in FAILED_STATES | {SeriesState.CANCELLED}]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=CSV_NEWLINE)
    writer.writerow(ERROR_REPORT_HEADER)
    for r in rows:
        info = r.info or SeriesInfo(series_uid=r.uid)
        writer.writerow([csv_cell(redact(plain(str(v)))) for v in (
            info.collection, info.patient_id, info.study_uid, r.uid,
            _num(info.file_size), _num(info.image_count), r.state, r.attempts, r.error,
        )])
    atomic_write_text(Path(path), out.getvalue(), newline="")
    return len(rows)
