"""One attempt at one series: the zip stream, inflated into this run's staging folder.

Each entry is inflated, CRC-checked, MD5-hashed and written to
``<root>/.nbia/staging/<run>/<series>/`` as it arrives; memory stays flat in series size
(only the MD5 list and the licence are kept in memory, capped). As each image ends, the
few header tags the engine needs are read from the first bytes kept for it (the fast
scanner; pydicom reads the file when the scanner declines). Whether the entry starts
like DICOM at all is decided here, by content, whatever its name says: the server names
entries ``%08d`` plus the stored file's own extension, not always ``.dcm``.

Other programs share the disk, and a server may lie about sizes (a bomb, a lying or
missing ``File Size``), so every byte a series writes leaves a reserve free
(:class:`SpaceGuard`). With ``free`` measured when the series starts, the reserve ``R``
is the larger of :data:`RESERVE_MIN` and :data:`RESERVE_SHARE` of ``free``, and a
small disk keeps at least half of what it had: ``min(R, free / 2)``. A series whose
announced size does not fit beside that is refused before its first byte
(:class:`NoRoomError`: it fails alone, the run goes on). While it inflates, free space
is checked every :data:`SPACE_CHECK_BYTES`: the bytes its metadata announced (with
slack; without a ``File Size``, a guess from its image count) keep ``min(R, free / 2)``
free, any byte beyond keeps ``R`` (the two differ only with less than ``2 R`` free).
Crossing the line inside the announced size means the disk filled under us: the run
stops (:class:`DiskFullError`, "free some space and re-run"); beyond it, the series
overstepped what it announced and fails alone.

The server decides how many entries a zip holds too: more than
:func:`entry_cap` (a small multiple of the images the metadata promises) ends the
attempt before they become files. An entry whose name ends in ``/`` or ``\\`` (or
whose last part is ``.`` or ``..``) names a folder, not a file: whatever it holds is
never an image (a non-image the checks accept only if ``md5hashes.csv`` vouches for it,
and then under a harmless name), so an empty name in that list cannot vouch for one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .._dicomtags import TAGS, fast_tags
from .._zipstream import EntryData, EntryEnd, EntryStart, ZipEvent, ZipStreamReader
from ..errors import DiskFullError, IntegrityError, UnsafeArchiveError
from ..errors import NoRoomError as NoRoomError  # re-export
from ..layout import sanitize_component
from ..models import SeriesInfo
from ..naming import LICENSE_ENTRY, MD5_ENTRY
from ..ondisk import free_bytes
from ..untrusted import quote
from .checks import ImageTags, StagedEntry, basename, parse_md5_list

#: Bytes of each entry kept in memory to parse its header without reopening the file.
HEADER_BYTES = 64 * 1024
#: Non-image entries kept in memory (md5 list, licence) are capped: a hostile server
#: must not be able to exhaust memory with a huge "LICENSE".
SMALL_ENTRY_CAP = 16 * 1024 * 1024
#: How often (bytes written) free space is checked while a series inflates: a look
#: (statvfs) costs about 2 µs, a thousandth of inflating, hashing and writing a MiB.
SPACE_CHECK_BYTES = 1024 * 1024
#: Below this much free space the disk itself is full: the run stops.
SPACE_MARGIN = 4 * 1024 * 1024
#: The reserve: the larger of 1 GiB and 5% of the space free when a series starts (other
#: programs' share of the disk, not ours to take); at most half of it on a small disk.
RESERVE_MIN = 1024**3
RESERVE_SHARE = 0.05
#: Kept on top of the reserve: up to 64 streams (``-w 64``) may each write one check
#: interval between two looks, so the reserve itself is never touched (an eighth of the
#: reserve when that is less, on a small disk).
RESERVE_GUARD = 64 * SPACE_CHECK_BYTES
#: Zip entries allowed per image the metadata promises (an annotation beside each)...
ENTRIES_PER_IMAGE = 2
#: ... plus these (LICENSE, md5hashes.csv, annotations of the whole series).
EXTRA_ENTRIES = 64
#: Images assumed when the metadata gives no count: real series stop at a few thousand
#: (and NBIA's metadata nearly always gives the count)...
UNCOUNTED_IMAGES = 4096
#: ... or fewer when it gives a ``File Size``: no DICOM image is smaller than this.
MIN_IMAGE_BYTES = 1024
#: What one image of a series without ``File Size`` is expected to take at most, for
#: the lighter (small-disk) reserve; past that guess its bytes keep the full reserve.
UNSIZED_IMAGE_BYTES = 32 * 1024 * 1024
#: Bytes past the announced ``File Size`` still treated as announced: sizes in the
#: metadata can be a little stale; this keeps an honest series on the fast checks.
ANNOUNCED_SLACK = 16 * 1024 * 1024
#: Progress events for a series come at most once per this many bytes.
PROGRESS_STEP = 1024 * 1024


@dataclass(slots=True)
class Progress:
    """Live counters of one attempt, written by its worker, read by the monitor."""

    received: int = 0  # bytes off the wire
    written: int = 0  # bytes inflated into staging


@dataclass
class StagedSeries:
    """What one attempt left in staging, ready to be checked and published."""

    uid: str
    folder: Path
    entries: list[StagedEntry] = field(default_factory=list)
    md5_list: dict[str, str] | None = None
    license: bytes | None = None
    written: int = 0

    @property
    def images(self) -> list[StagedEntry]:
        return [e for e in self.entries if e.is_image]


def looks_like_dicom(prefix: bytes | bytearray) -> bool:
    """A DICOM Part 10 file (``DICM`` after the preamble), or a bare dataset that starts
    with a group 0008 element, as some archives store them."""
    if len(prefix) >= 132 and prefix[128:132] == b"DICM":
        return True
    return len(prefix) >= 8 and prefix[0:2] == b"\x08\x00" and prefix[3:4] == b"\x00"


def read_tags(name: str, prefix: bytes, path: Path, size: int) -> ImageTags | None:
    """The tags of one staged entry, or None when it is not DICOM."""
    if not looks_like_dicom(prefix):
        return None
    values = fast_tags(prefix)
    if values is None:
        values = _pydicom_tags(prefix, path, size)
    return ImageTags(
        sop_instance_uid=values.get("SOPInstanceUID") or "",
        acquisition=values.get("AcquisitionNumber"),
        instance=values.get("InstanceNumber"),
        series_uid=values.get("SeriesInstanceUID"),
        study_uid=values.get("StudyInstanceUID"),
        study_id=values.get("StudyID"),
        sop_class_uid=values.get("SOPClassUID"),
    )


def _pydicom_tags(prefix: bytes, path: Path, size: int) -> dict[str, str | None]:

    # 150 ms off every worker's start-up: only for headers the fast parser is unsure of
    import pydicom

    values: dict[str, str | None] = dict.fromkeys(TAGS)
    sources: list[io.BytesIO | Path] = [io.BytesIO(prefix)]
    if size > len(prefix):
        sources.append(path)
    for source in sources:
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True, force=True,
                                 specific_tags=list(TAGS))
            for tag in TAGS:
                value = ds.get(tag)
                values[tag] = None if value is None or value == "" else str(value)
            # A header longer than the bytes kept in memory reads as "tags absent"
            # without any error: only trust a partial read that found every tag.
            if source is sources[-1] or all(values[t] is not None for t in
                                            ("SOPInstanceUID", "SeriesInstanceUID",
                                             "InstanceNumber")):
                break
        except Exception:
            continue
    return values


#: Bytes one image may inflate to when the metadata gives no ``File Size`` (the largest
#: multi-frame objects are a few hundred MB), and the whole cap when it gives no count.
UNSIZED_IMAGE_CAP = 2 * 1024**3


def inflation_cap(info: SeriesInfo) -> int:
    """Zip-bomb cap from the metadata: far above any honest series, far below "fill the
    disk" (free space is checked on its own while inflating). Annotations count when the
    metadata gives their size."""
    expected = needed_bytes(info)
    if expected:
        return max(expected * 4, expected + 256 * 1024 * 1024)
    return (info.image_count or 1) * UNSIZED_IMAGE_CAP


def needed_bytes(info: SeriesInfo) -> int:
    """What the metadata says the series inflates to (its images, and its annotations
    when it names their size); 0 when it gives no ``File Size``."""
    if not info.file_size:
        return 0
    return info.file_size + (info.annotation_size or 0)


def planned_bytes(info: SeriesInfo) -> int:
    """Bytes held to the lighter reserve: the announced size with slack (sizes in the
    metadata can be a little stale), or without ``File Size`` a guess from the image
    count (one image's worth when it gives none)."""
    expected = needed_bytes(info) or max(1, info.image_count or 0) * UNSIZED_IMAGE_BYTES
    return expected + expected // 8 + ANNOUNCED_SLACK


def expected_images(info: SeriesInfo) -> int:
    """The images the metadata promises; without a count, what its ``File Size`` can
    hold, at most :data:`UNCOUNTED_IMAGES`."""
    if info.image_count is not None:
        return info.image_count
    if info.file_size:
        return max(1, min(UNCOUNTED_IMAGES, info.file_size // MIN_IMAGE_BYTES))
    return UNCOUNTED_IMAGES


def entry_cap(info: SeriesInfo) -> int:
    """Most zip entries the series may hold: a 2-image series never makes 10,000 files,
    a series of 0 images only its few non-image entries."""
    return expected_images(info) * ENTRIES_PER_IMAGE + EXTRA_ENTRIES


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


@dataclass(frozen=True, slots=True)
class SpaceGuard:
    """The free space one series must leave (module docstring), fixed when it starts."""

    root: Path
    uid: str
    need: int  # bytes its metadata announces (0: no File Size)
    planned: int  # bytes held to ``keep`` (announced with slack, or guessed)
    keep: int  # free space those leave: min(R, free / 2), plus a guard
    keep_beyond: int  # free space any further byte leaves: R, plus a guard

    @classmethod
    def start(cls, root: Path, uid: str, info: SeriesInfo) -> SpaceGuard | None:
        """The series' rule, or :class:`NoRoomError` when its announced size does not fit
        beside the reserve (:class:`DiskFullError` when the disk is full already).
        None when free space cannot be known."""
        free = free_bytes(root)
        if free is None:
            return None
        need = needed_bytes(info)
        if free < SPACE_MARGIN:
            raise DiskFullError(
                f"disk space: {_mb(free)} free in {root}"
                + (f", series {uid} needs {_mb(need)}" if need else "")
                + "; free some space and re-run the same command to resume")
        reserve = max(RESERVE_MIN, int(free * RESERVE_SHARE))
        share = min(reserve, free // 2)
        keep = share + min(RESERVE_GUARD, share // 8)
        if need and free < need + keep:
            raise NoRoomError(
                f"series {uid}: disk space: it needs {_mb(need)} and {root} has "
                f"{_mb(free)} free, with {_mb(keep)} kept free for other programs; "
                "free some space and re-run the same command")
        return cls(root, uid, need, planned_bytes(info), keep, reserve + RESERVE_GUARD)

    def look(self, written: int) -> None:
        """After ``written`` bytes: :class:`DiskFullError` when free space fell under
        the line within the announced size (the disk filled under us: the run stops),
        :class:`NoRoomError` when beyond it (the series fails alone)."""
        free = free_bytes(self.root)
        keep = self.keep if written <= self.planned else self.keep_beyond
        if free is None or free >= keep:
            return
        if written <= self.need or free < SPACE_MARGIN:
            raise DiskFullError(
                f"disk space: {self.root} is down to {_mb(free)} free, under the "
                f"{_mb(keep)} kept free for other programs, and series {self.uid} needs "
                f"{_mb(max(0, self.need - written))} more; free some space and re-run the "
                "same command to resume")
        said = f"its metadata announces {_mb(self.need)}" if self.need else \
            "its metadata gives no size"
        raise NoRoomError(
            f"series {self.uid}: disk space: the zip inflated to {_mb(written)} ({said}) "
            f"and {self.root} is down to {_mb(free)} free, under the {_mb(keep)} kept free "
            "for other programs; stopped there")


def disk_full(root: Path, exc: OSError) -> DiskFullError | None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return DiskFullError(f"disk full writing to {root} ({exc.strerror}): free some space "
                             "and re-run the same command to resume")
    return None


class _Entry:
    """The entry being written: its file, MD5 and first bytes."""

    __slots__ = ("file", "folder", "header", "md5", "name", "part", "path", "small")

    def __init__(self, name: str) -> None:
        self.name = name
        self.folder = False
        self.part = ""
        self.path: Path | None = None
        self.file: object = None
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.header = bytearray()
        self.small: bytearray | None = None


@dataclass(frozen=True, slots=True)
class EntryFile:
    """An entry its source already wrote whole into the series' folder, as
    :func:`part_name` names it, hashed while written: the event a reader with a
    ``stage_into`` method emits (:class:`EntryReader`) instead of ``EntryStart``,
    ``EntryData``, ``EntryEnd``. ``header``: its first bytes (at most
    :data:`HEADER_BYTES`), for the tags."""

    name: str
    part: str
    size: int
    md5: str
    header: bytes


def part_name(number: int) -> str:
    """The staged file of the ``number``-th (from 1) file entry of a series: the zip
    path's and a source's own writers' (:class:`EntryFile`) are one sequence."""
    return f"{number:08d}.part"


class EntryReader(Protocol):
    """What cuts a series' byte stream into entries:
    :class:`~nbia_retriever._zipstream.ZipStreamReader` for an NBIA zip, or a source's
    own (IDC's objects, :meth:`nbia_retriever.idc.stream.IdcStream.reader`).

    Optional: ``stage_into(folder, look)``, called once before the first chunk. A reader
    that has it writes the entries into ``folder`` from its source's own threads (each
    hashing what it writes: IDC's fetchers, one per object, so no byte crosses threads
    and the hashing and writing run beside each other), and emits :class:`EntryFile`
    events in entry order for the chunks its stream yields (then mere ticks, empty, one
    per step: :func:`stage_series` checks cancel and pause between them). ``look(n)``,
    thread-safe, is the free-space check, to call after every
    :data:`SPACE_CHECK_BYTES` those threads write (``n``: their total so far); it raises
    :class:`DiskFullError` or :class:`NoRoomError`, which the reader's stream then
    raises to :func:`stage_series`.
"""

    @property
    def finished(self) -> bool: ...

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[ZipEvent]: ...

    def close(self) -> Iterator[ZipEvent]: ...


#: Makes a series' reader from the caps stage_series sets (``max_total_size``,
#: ``max_entries``, as keywords).
ReaderFactory = Callable[..., EntryReader]


def series_folder_name(uid: str) -> str:
    return sanitize_component(uid, fallback="series")


def stage_series(uid: str, info: SeriesInfo, chunks: Iterable[bytes], folder: Path, *,
                 root: Path, checkpoint: Callable[[], None], progress: Progress,
                 on_progress: Callable[[int], None],
                 cpu: AbstractContextManager[object] | None = None,
                 reader: ReaderFactory | None = None) -> StagedSeries:
    """Stream one series zip into ``folder`` (created empty) and describe what arrived.

    Raises :class:`IntegrityError` (a broken or hostile zip), :class:`DiskFullError`, and
    whatever ``chunks`` or ``checkpoint`` raise (network errors, cancellation).

    ``cpu``: held while a chunk is inflated, hashed and written (not while the next one
    is read from the socket), so that 16 streams on 2 cores do not all fight for the GIL
    at once: a few threads work, the others wait in the kernel or on the semaphore.

    ``reader``: what cuts ``chunks`` into entries when they are not a zip (a stream's
    own ``reader``, given the same caps); None, a :class:`ZipStreamReader`.
    """
    work = cpu if cpu is not None else contextlib.nullcontext()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    space = SpaceGuard.start(root, uid, info)
    max_entries = entry_cap(info)
    make: ReaderFactory = reader if reader is not None else ZipStreamReader
    entry_reader = make(max_total_size=inflation_cap(info), max_entries=max_entries + 1)
    stage_into: Callable[[Path, Callable[[int], None]], None] | None = getattr(
        entry_reader, "stage_into", None)
    if stage_into is not None:
        stage_into(folder, space.look if space is not None else _no_look)
    staged = StagedSeries(uid, folder)
    small: dict[str, bytearray] = {}
    names: set[str] = set()
    current: _Entry | None = None
    written = 0
    next_report = PROGRESS_STEP
    next_space = SPACE_CHECK_BYTES if space is not None else 1 << 62
    count = 0
    seen = 0
    after_list = False  # md5hashes.csv has started: what follows may be annotations

    def look() -> None:
        """Free space, at most one inflate piece (256 KiB) after each check interval:
        one network chunk of a bomb inflates to hundreds of MB."""
        nonlocal next_space
        next_space = written + SPACE_CHECK_BYTES
        assert space is not None
        space.look(written)

    def handle(events: Iterable[object]) -> None:
        nonlocal current, written, count, seen, after_list
        for ev in events:
            if type(ev) is EntryData:
                data = ev.data
                entry = current
                assert entry is not None
                if entry.small is not None:
                    entry.small += data
                    if len(entry.small) > SMALL_ENTRY_CAP:
                        raise UnsafeArchiveError(
                            f"series {uid}: entry {quote(entry.name, 80)!r} is implausibly "
                            "large")
                else:
                    entry.file.write(data)  # type: ignore[attr-defined]
                    entry.md5.update(data)
                    if len(entry.header) < HEADER_BYTES:
                        entry.header += data[: HEADER_BYTES - len(entry.header)]
                written += len(data)
                if written >= next_space:
                    look()
            elif type(ev) is EntryStart:
                name = ev.name
                if name in names:
                    raise UnsafeArchiveError(
                        f"series {uid}: duplicate zip entry {quote(name, 80)!r}")
                names.add(name)
                seen += 1
                if seen > max_entries:
                    promised = (f"for the {info.image_count} images its metadata "
                                "promises" if info.image_count is not None else
                                "(its metadata gives no image count)")
                    raise UnsafeArchiveError(
                        f"series {uid}: the zip holds more than {max_entries} entries "
                        f"{promised}")
                entry = current = _Entry(name)
                base = basename(name)
                if base in (MD5_ENTRY, LICENSE_ENTRY):
                    entry.small = small.setdefault(base, bytearray())
                    after_list = after_list or base == MD5_ENTRY
                else:
                    # A folder's name (or none): whatever it holds is never an image.
                    entry.folder = base.strip() in ("", ".", "..")
                    count += 1
                    entry.part = part_name(count)
                    entry.path = folder / entry.part
                    entry.file = open(entry.path, "xb")  # noqa: SIM115 - closed at EntryEnd
            elif type(ev) is EntryFile:
                # written whole by the source's own threads (EntryReader.stage_into)
                if current is not None or ev.name in names:
                    raise UnsafeArchiveError(
                        f"series {uid}: duplicate entry {quote(ev.name, 80)!r}")
                names.add(ev.name)
                seen += 1
                count += 1
                if seen > max_entries or ev.part != part_name(count):
                    raise UnsafeArchiveError(
                        f"series {uid}: more than {max_entries} entries, or one out of "
                        "order")
                written += ev.size
                progress.received += ev.size
                tags = read_tags(ev.name, ev.header, folder / ev.part, ev.size)
                staged.entries.append(StagedEntry(
                    name=ev.name, part=ev.part, size=ev.size, md5=ev.md5, tags=tags,
                    annotation=after_list and tags is None))
            elif type(ev) is EntryEnd:
                entry = current
                current = None
                if entry is None or entry.small is not None:
                    continue
                entry.file.close()  # type: ignore[attr-defined]
                assert entry.path is not None
                header = bytes(entry.header)
                tags = None if entry.folder else read_tags(entry.name, header, entry.path,
                                                           ev.size)
                staged.entries.append(StagedEntry(
                    name=entry.name, part=entry.part, size=ev.size,
                    md5=entry.md5.hexdigest(), tags=tags,
                    annotation=after_list and tags is None and not entry.folder))

    try:
        for chunk in chunks:
            checkpoint()
            progress.received += len(chunk)
            with work:
                handle(entry_reader.feed(chunk))
            progress.written = written
            if written >= next_report:
                next_report = written + PROGRESS_STEP
                on_progress(written)
        handle(entry_reader.close())
    except IntegrityError as exc:
        if str(exc).startswith("series "):
            raise
        # The reader names the entry; say which series too.
        raise type(exc)(f"series {uid}: {quote(str(exc), 300)}") from None
    except OSError as exc:
        full = disk_full(root, exc)
        if full is not None:
            raise full from None
        raise
    finally:
        if current is not None and current.file is not None:
            current.file.close()  # type: ignore[attr-defined]
    if not entry_reader.finished:
        raise IntegrityError(f"series {uid}: the zip stream ended without its directory")
    progress.written = written
    staged.written = written
    on_progress(written)
    if MD5_ENTRY in small:
        staged.md5_list = parse_md5_list(bytes(small[MD5_ENTRY]), uid)
    if small.get(LICENSE_ENTRY):
        staged.license = bytes(small[LICENSE_ENTRY])
    return staged


def _no_look(written: int) -> None:
    """Free space cannot be known here (no statvfs): nothing to check."""


def discard(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
