"""What a run leaves behind for people: metadata.csv, the error report, the summary.

``metadata.csv`` uses the Java retriever's header (reference section 4) so existing
scripts that read it keep working. Rows are appended as series complete (a crash loses
nothing already reported) and never duplicated across runs: the writer loads the Series
UIDs already present once, then appends only new ones, under a lock shared by workers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .models import SeriesInfo, SeriesState

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


def _num(value: int | None) -> str:
    return "" if value is None else str(value)


def metadata_row(info: SeriesInfo, location: str, timestamp: float, *, images: int,
                 size: int) -> list[str]:
    """One metadata.csv row; counts are what we actually wrote, not what was promised."""
    from .layout import normalise_date

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(timestamp))
    return [_cell(value) for value in (
        info.series_uid, info.collection, info.third_party, info.data_description_uri,
        info.patient_id, info.study_uid, info.study_description,
        normalise_date(info.study_date), info.series_description, info.manufacturer,
        info.modality, info.sop_class_name, info.sop_class_uid, str(images), str(size),
        location, stamp,
    )]


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def _cell(text: str) -> str:
    """Control characters (newlines included) from server metadata become one space: one
    row stays one line for line-based tools, a torn row can be told by its missing newline,
    and no escape sequence reaches a terminal that ``cat``s the file."""
    return _CONTROL.sub(" ", text)


class MetadataCsv:
    """Appends one row per completed series to ``<root>/metadata.csv``, at most once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        if self.path.exists():
            self._drop_torn_row()
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                self._seen = {row[0] for row in reader if row}

    def __contains__(self, uid: str) -> bool:
        return uid in self._seen

    def _drop_torn_row(self) -> None:
        """Cut a last row without its newline (power lost mid-append): the engine re-adds
        the series' row from the journal, and the next append must not glue onto it."""
        with self.path.open("r+b") as handle:
            _lock_file(handle)
            try:
                size = handle.seek(0, os.SEEK_END)
                if size == 0:
                    return
                handle.seek(size - 1)
                if handle.read(1) == b"\n":
                    return
                keep, block = size, 1 << 16
                while keep > 0:
                    start = max(0, keep - block)
                    handle.seek(start)
                    found = handle.read(keep - start).rfind(b"\n")
                    if found >= 0:
                        keep = start + found + 1
                        break
                    keep = start
                handle.truncate(keep)
            finally:
                _unlock_file(handle)

    def append(self, row: Sequence[str]) -> bool:
        """Append ``row`` unless its Series UID is already present; fsync'd line by line.

        Several processes may append to one file (cluster shards sharing a destination):
        an advisory ``flock`` makes "write the header if the file is empty" and the row
        write one step, so two shards never both write the header or interleave lines.
        """
        with self._lock:
            if row[0] in self._seen:
                return False
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerow(row)
            # Unbuffered, so a failed write leaves nothing queued to be flushed later.
            with self.path.open("ab", buffering=0) as handle:
                _lock_file(handle)
                try:
                    size = os.fstat(handle.fileno()).st_size
                    data = buf.getvalue().encode("utf-8")
                    if size == 0:
                        header = io.StringIO()
                        csv.writer(header, lineterminator="\n").writerow(METADATA_HEADER)
                        data = header.getvalue().encode("utf-8") + data
                    try:
                        view = memoryview(data)
                        while view:
                            view = view[handle.write(view):]
                        os.fsync(handle.fileno())
                    except OSError:
                        # Disk full mid-row: take the torn row back out, keep the file valid.
                        with contextlib.suppress(OSError):
                            os.ftruncate(handle.fileno(), size)
                        raise
                finally:
                    _unlock_file(handle)
            self._seen.add(row[0])
            return True


def _lock_file(handle: object) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: one process per destination is the rule there
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)  # type: ignore[attr-defined]


def _unlock_file(handle: object) -> None:
    try:
        import fcntl
    except ImportError:
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)  # type: ignore[attr-defined]


@dataclass
class SeriesResult:
    """The outcome for one series of a run (also the row model of the downloads table)."""

    uid: str
    info: SeriesInfo | None = None
    state: str = SeriesState.NOT_STARTED
    error: str = ""
    attempts: int = 0
    bytes_done: int = 0
    files: int = 0
    relpath: str = ""

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
    cancelled: bool = False
    fatal: str = ""
    auth_failed: bool = False

    def count(self, state: str) -> int:
        return sum(1 for r in self.results.values() if r.state == state)

    @property
    def completed(self) -> list[SeriesResult]:
        return [r for r in self.results.values() if r.state == SeriesState.COMPLETE]

    @property
    def failed(self) -> list[SeriesResult]:
        return [r for r in self.results.values() if r.state in SeriesState.FAILED]

    @property
    def ok(self) -> bool:
        return not self.fatal and not self.cancelled and all(
            r.state == SeriesState.COMPLETE for r in self.results.values()
        )

    def summary(self) -> str:
        """A few lines for humans at the end of a run."""
        total = len(self.results)
        done = self.count(SeriesState.COMPLETE)
        mb = self.bytes_downloaded / 1e6
        rate = mb / self.elapsed if self.elapsed > 0 else 0.0
        lines = [
            f"{done} of {total} series complete"
            + (f" ({self.skipped} already done)" if self.skipped else "")
            + f"; {mb:,.1f} MB downloaded in {self.elapsed:,.1f} s ({rate:,.1f} MB/s)",
        ]
        for state in (SeriesState.ERROR, SeriesState.NOT_AUTHORIZED, SeriesState.NO_DATA,
                      SeriesState.CANCELLED, SeriesState.NOT_STARTED):
            n = self.count(state)
            if n:
                lines.append(f"{n} series {state}")
        if self.fatal:
            lines.append(f"stopped: {self.fatal}")
        lines.append(f"files in {self.root}")
        return "\n".join(lines)


def write_error_report(path: Path, results: Iterable[SeriesResult]) -> int:
    """The GUI's "Save error report": the failed rows with the table's columns + error."""
    rows = [r for r in results if r.state in SeriesState.FAILED | {SeriesState.CANCELLED}]
    tmp = Path(str(path) + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(ERROR_REPORT_HEADER)
        for r in rows:
            info = r.info or SeriesInfo(series_uid=r.uid)
            writer.writerow([
                info.collection, info.patient_id, info.study_uid, r.uid, _num(info.file_size),
                _num(info.image_count), r.state, r.attempts, r.error,
            ])
    os.replace(tmp, path)
    return len(rows)
