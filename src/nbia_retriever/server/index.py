"""The archive index: one scan of the DICOM headers, cached, plus pre-compressed images.

The server answers metadata from memory and streams zips as pure file I/O, so the
benchmarks (client and server on the same two cores) measure the client, not the
server. To get there each image is read once, ever: its headers give the series facts,
its bytes give the MD5 (what ``md5hashes.csv`` lists, like the hashes the real archive
recorded at ingest), the CRC-32 and a raw-DEFLATE blob at zlib level 6 (what the real
server's ``ZipOutputStream`` produces). All of it lives in ``ROOT/.nbia-server-cache/``:
``index.sqlite`` and ``blobs/<md5>.z`` (content-addressed, so identical images share one).

A file is re-read only when its size or mtime changed; vanished files drop out. The
cache is rebuilt from scratch when the schema or compression level changes.

An archive may come from someone else, cache included, so nothing in the cache is
trusted (:func:`_prepare_cache`): a link or special file where the cache keeps a file or
folder is removed (a link, never its target) and the cache rebuilt around it; an index row
whose blob is not ``blobs/<md5[:2]>/<md5>.z``, not a regular file of the recorded size,
is indexed again from the archive's image, never served. A link planted as the cache
folder itself is refused: it is not ours to remove.

Every row carries a MAC over all its columns under this user's key (the journal's row
key, :func:`~nbia_retriever.engine.rows.row_key`): a row someone edited (its CRC, its
series, the blob it names) fails it and is indexed again, never served.
:class:`BlobStore` does every file operation below ``blobs/`` relative to folder
descriptors opened without following a link, so a folder swapped for a link while the
cache is written or cleaned is never written through or emptied.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pydicom
from pydicom.errors import InvalidDicomError

from ..engine.rows import row_key
from ..errors import ArchiveError
from ..ondisk import file_kind, open_regular

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".nbia-server-cache"
SCHEMA_VERSION = 3  # 3: every row carries its MAC
COMPRESSION_LEVEL = 6
_READ_BLOCK = 1 << 20
_MD5 = re.compile(r"[0-9a-f]{32}")
#: The files the cache keeps at its top (SQLite's companions included).
_CACHE_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm",
                "index.sqlite-journal", "lock")

#: DICOM keyword -> column. Read with ``specific_tags``: headers only, never pixels.
HEADER_TAGS: dict[str, str] = {
    "SeriesInstanceUID": "series_uid",
    "StudyInstanceUID": "study_uid",
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientSex": "patient_sex",
    "PatientAge": "patient_age",
    "StudyDate": "study_date",
    "StudyDescription": "study_description",
    "StudyID": "study_id",
    "SeriesDescription": "series_description",
    "SeriesNumber": "series_number",
    "SeriesDate": "series_date",
    "Modality": "modality",
    "Manufacturer": "manufacturer",
    "ManufacturerModelName": "manufacturer_model",
    "ProtocolName": "protocol_name",
    "BodyPartExamined": "body_part",
    "SOPClassUID": "sop_class_uid",
    "SOPInstanceUID": "sop_instance_uid",
    "InstanceNumber": "instance_number",
    "AcquisitionNumber": "acquisition_number",
}
_SERIES_COLUMNS = [c for c in HEADER_TAGS.values()
                   if c not in ("series_uid", "sop_instance_uid", "instance_number",
                                "acquisition_number")]
_FILE_COLUMNS = ["relpath", "size", "mtime_ns", "md5", "crc32", "compressed_size", "blob",
                 "collection", *HEADER_TAGS.values()]


@dataclass(frozen=True)
class ImageRecord:
    """One image file as the zip stream needs it."""

    relpath: str  # POSIX path relative to the archive root
    size: int
    md5: str
    crc32: int
    compressed_size: int
    blob: str  # POSIX path relative to the cache directory
    sop_instance_uid: str
    instance_number: str
    acquisition_number: str


@dataclass(frozen=True)
class SeriesRecord:
    """Series-level facts, from the series' first file (in path order), and its images."""

    series_uid: str
    collection: str
    patient_id: str
    patient_name: str
    patient_sex: str
    patient_age: str
    study_uid: str
    study_date: str  # raw DICOM YYYYMMDD
    study_description: str
    study_id: str
    series_description: str
    series_number: str
    series_date: str
    modality: str
    manufacturer: str
    manufacturer_model: str
    protocol_name: str
    body_part: str
    sop_class_uid: str
    images: tuple[ImageRecord, ...]

    @property
    def image_count(self) -> int:
        return len(self.images)

    @property
    def file_size(self) -> int:
        return sum(image.size for image in self.images)


class ArchiveIndex:
    """All series of an archive, in memory; built or refreshed by :meth:`load`."""

    def __init__(self, root: Path, cache_dir: Path, series: dict[str, SeriesRecord],
                 skipped: list[str]) -> None:
        self.root = root
        self.cache_dir = cache_dir
        self.series = series
        self.skipped = skipped  # .dcm files that were not readable DICOM (relpaths)
        self.collections: list[str] = sorted({s.collection for s in series.values()})

    def __repr__(self) -> str:
        return f"ArchiveIndex({str(self.root)!r}, {len(self.series)} series)"

    def blob_path(self, image: ImageRecord) -> Path:
        return self.cache_dir / image.blob

    def open_blob(self, image: ImageRecord) -> int:
        """A read descriptor of ``image``'s blob, opened one folder at a time without
        following a link (``blobs``, ``blobs/<xx>``, the blob; the cache folder too when
        it is the archive's): a folder swapped for a link since :meth:`load` is an
        OSError, never a file from elsewhere sent. Only a regular file is opened."""
        parts = image.blob.split("/")
        if not _FD_OK:
            return open_regular(self.blob_path(image), os.O_RDONLY | getattr(os, "O_BINARY", 0))
        inside = self.cache_dir == self.root / CACHE_DIRNAME
        fd = os.open(self.cache_dir, _DIR_FLAGS if inside else
                     os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            for name in parts[:-1]:
                below = _open_dir(name, fd)
                os.close(fd)
                fd = below
            blob = os.open(parts[-1], os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                           | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0),
                           dir_fd=fd)
        finally:
            os.close(fd)
        try:
            mode = os.fstat(blob).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(f"{self.blob_path(image)}: {file_kind(mode)}, not a cache blob")
            os.set_blocking(blob, True)
        except BaseException:
            os.close(blob)
            raise
        return blob

    def image_path(self, image: ImageRecord) -> Path:
        return self.root / image.relpath

    @classmethod
    def load(
        cls,
        root: str | Path,
        *,
        cache_dir: str | Path | None = None,
        workers: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> ArchiveIndex:
        """Scan ``root``, reusing the cache for unchanged files; ``progress(done, todo)``."""
        root = Path(root).resolve()
        if not root.is_dir():
            raise ArchiveError(f"{root}: not a folder (the archive must be a folder of DICOM "
                               "files, one sub-folder per collection)")
        cache = Path(cache_dir) if cache_dir is not None else root / CACHE_DIRNAME
        try:
            _prepare_cache(cache, inside_archive=cache_dir is None)
        except OSError as exc:
            raise ArchiveError(f"{cache}: cannot create the index cache: {exc}") from None
        with _locked(cache / "lock"):
            try:
                store = BlobStore(cache / "blobs")
            except OSError as exc:  # swapped for a link since _prepare_cache
                raise ArchiveError(f"{cache / 'blobs'}: cannot open the index cache's "
                                   f"blob folder: {exc}") from None
            with store:
                store.own_folders()
                rows, skipped = _refresh(root, cache, store, workers, progress)
        return cls(root, cache, _group(rows), skipped)


#: File names served as images (any case): the server names entries after their own
#: extension, so an archive of ``.dicom`` files yields ``00000001.dicom`` entries.
IMAGE_SUFFIXES = (".dcm", ".dicom", ".ima")


def _discard(path: Path, what: str) -> None:
    """Remove what someone else left in the cache (a link itself, never its target)."""
    log.warning("%s: %s in the index cache, removed (rebuilt)", path, what)
    if what == "a folder":
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _own_dir(path: Path) -> None:
    """``path`` is a real folder of the cache: anything else there is removed first."""
    with contextlib.suppress(FileNotFoundError):
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            return
        _discard(path, file_kind(mode))
    with contextlib.suppress(FileExistsError):  # another thread or server made it
        os.mkdir(path)


def _prepare_cache(cache: Path, *, inside_archive: bool) -> None:
    """The cache folder and ``blobs/``, with no link or special file where the cache
    keeps its own files. Raises :class:`ArchiveError` for a link (or a file) planted as
    the archive's cache folder itself."""
    if inside_archive:
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(cache).st_mode
            if not stat.S_ISDIR(mode):
                raise ArchiveError(
                    f"{cache} is {file_kind(mode)}, not the server's cache folder: "
                    "refusing to use it (planted in the archive?); remove it and re-run")
        with contextlib.suppress(FileExistsError):
            os.mkdir(cache)
    else:  # the caller's own choice of folder, created as asked
        cache.mkdir(parents=True, exist_ok=True)
    _own_dir(cache / "blobs")
    for name in _CACHE_FILES:
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(cache / name).st_mode
            if not stat.S_ISREG(mode):
                _discard(cache / name, file_kind(mode))


_DIR_FLAGS = (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
              | getattr(os, "O_CLOEXEC", 0))
#: Descriptor-relative file operations (POSIX); elsewhere (Windows) by path.
_FD_OK = (os.open in os.supports_dir_fd and os.unlink in os.supports_dir_fd
          and os.rename in os.supports_dir_fd and os.mkdir in os.supports_dir_fd
          and os.scandir in os.supports_fd)
#: What opening a link or a file with :data:`_DIR_FLAGS` raises.
_NOT_A_FOLDER = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)


def _open_dir(name: str | Path, dir_fd: int | None = None) -> int:
    """A folder's descriptor, never through a link at its name (ELOOP/ENOTDIR then)."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


class _HeldFolder:
    """A folder held by a descriptor (``None`` where ``dir_fd=`` is not supported): a
    name below it is reached through the descriptor, or through the folder's path."""

    _fd: int | None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _folder(self) -> str:
        raise NotImplementedError

    def _at(self, name: str) -> tuple[str, int | None]:
        if self._fd is None:
            return os.path.join(self._folder(), name), None
        return name, self._fd


class BlobFolder(_HeldFolder):
    """One ``blobs/<xx>`` folder, held by a descriptor opened without following a link.

    Listing, removing and renaming here act on this very folder, whatever its name is
    swapped for after it was opened (a link to ``/home/you`` planted mid-clean-up is
    never entered: the clean-up deletes by name only inside the folder it opened)."""

    def __init__(self, store: BlobStore, name: str, fd: int | None) -> None:
        self.store = store
        self.name = name
        self._fd = fd

    def _folder(self) -> str:
        return os.path.join(self.store.path, self.name)

    def adopt(self, blob: Compressed) -> str:
        """Move a freshly written blob (:meth:`BlobStore.compress`) to its name here;
        a link planted as that name is replaced, never followed. Returns its cache name."""
        target, dst_fd = self._at(f"{blob.md5}.z")
        source, src_fd = self.store._at(blob.tmp)
        os.replace(source, target, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        return blob_name(blob.md5)

    def sweep(self, referenced: set[str]) -> None:
        """Remove every entry no index row uses (links themselves, never their targets)."""
        listing = os.scandir(self._fd if self._fd is not None else self._folder())
        with listing:
            names = [e.name for e in listing if not e.is_dir(follow_symlinks=False)]
        for name in names:
            if f"blobs/{self.name}/{name}" not in referenced:
                path, fd = self._at(name)
                with contextlib.suppress(OSError):
                    os.unlink(path, dir_fd=fd)


@dataclass(frozen=True)
class Compressed:
    """An image's MD5, CRC-32 and DEFLATE blob, written to ``blobs/<tmp>`` so far."""

    tmp: str
    md5: str
    crc32: int
    compressed_size: int


class BlobStore(_HeldFolder):
    """The cache's ``blobs/`` folder, opened once without following a link.

    Everything below it goes through descriptors (``dir_fd=``): a name swapped for a
    link between two steps here is never followed, because no step resolves a path
    through a folder's name after opening it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = _open_dir(path) if _FD_OK else None

    def _folder(self) -> str:
        return str(self.path)

    def _discard(self, name: str, what: str) -> None:
        log.warning("%s: %s in the index cache, removed (rebuilt)", self.path / name, what)
        path, fd = self._at(name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path, dir_fd=fd)

    def own_folders(self) -> None:
        """Only real folders below ``blobs/``: a link there (``blobs/ab -> /home/you``)
        is removed (the link, not its target), and so is any other file but our own
        temporary ones."""
        with os.scandir(self._fd if self._fd is not None else self.path) as listing:
            strays = [(e.name, file_kind(e.stat(follow_symlinks=False).st_mode))
                      for e in listing
                      if not e.is_dir(follow_symlinks=False)
                      and not (e.name.startswith(".tmp-") and e.is_file(follow_symlinks=False))]
        for name, what in strays:
            self._discard(name, what)

    def folder_names(self) -> list[str]:
        """The sub-folders, as listed now (each opened later by :meth:`folder`)."""
        with os.scandir(self._fd if self._fd is not None else self.path) as listing:
            return sorted(e.name for e in listing if e.is_dir(follow_symlinks=False))

    def folder(self, name: str, *, create: bool = False) -> BlobFolder | None:
        """``blobs/<name>``, opened without following a link; None if it is absent (or
        not a folder) and not ``create``. With ``create`` a link or file there is removed
        and a real folder made."""
        if self._fd is None:
            folder = self.path / name
            if create:
                _own_dir(folder)
            real = folder.is_dir() and not folder.is_symlink()
            return BlobFolder(self, name, None) if real else None
        for _ in range(3):  # each round removes what someone planted since the last
            try:
                return BlobFolder(self, name, _open_dir(name, self._fd))
            except FileNotFoundError:
                if not create:
                    return None
            except OSError as exc:
                if exc.errno not in _NOT_A_FOLDER:
                    raise
                if not create:  # a link or a file: nothing of ours to open
                    return None
                with contextlib.suppress(FileNotFoundError):
                    self._discard(name, file_kind(
                        os.stat(name, dir_fd=self._fd, follow_symlinks=False).st_mode))
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=self._fd)
        raise OSError(errno.ELOOP, f"{self.path / name}: keeps being replaced by a link")

    def compress(self, source: Path) -> Compressed:
        """MD5, CRC-32 and a raw DEFLATE blob of ``source``, in one streaming pass (flat
        memory), to a new temporary file here (created, never opened through a link)."""
        digest = hashlib.md5(usedforsecurity=False)
        crc = 0
        csize = 0
        deflate = zlib.compressobj(COMPRESSION_LEVEL, zlib.DEFLATED, -15)
        tmp = f".tmp-{secrets.token_hex(8)}"
        path, dir_fd = self._at(tmp)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0), 0o600,
                     dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as out, open(source, "rb") as src:
                while block := src.read(_READ_BLOCK):
                    digest.update(block)
                    crc = zlib.crc32(block, crc)
                    data = deflate.compress(block)
                    csize += len(data)
                    out.write(data)
                data = deflate.flush()
                csize += len(data)
                out.write(data)
        except BaseException:
            self.remove_tmp(tmp)
            raise
        return Compressed(tmp, digest.hexdigest(), crc, csize)

    def remove_tmp(self, tmp: str) -> None:
        path, fd = self._at(tmp)
        with contextlib.suppress(OSError):
            os.unlink(path, dir_fd=fd)

    def put(self, source: Path) -> tuple[str, int, int, str]:
        """(md5, crc32, compressed size, cache name) of ``source``, its blob in place."""
        blob = self.compress(source)
        try:
            folder = self.folder(blob.md5[:2], create=True)
            assert folder is not None  # created
            with folder:
                name = folder.adopt(blob)
        except BaseException:
            self.remove_tmp(blob.tmp)
            raise
        return blob.md5, blob.crc32, blob.compressed_size, name

    def collect_garbage(self, referenced: set[str]) -> None:
        """Drop blobs no indexed file uses any more (edited or deleted images)."""
        for name in self.folder_names():
            folder = self.folder(name)  # None: swapped for a link since the listing
            if folder is not None:
                with folder:
                    folder.sweep(referenced)


def blob_name(md5: str) -> str:
    """Where the cache keeps an image's blob, relative to the cache folder."""
    return f"blobs/{md5[:2]}/{md5}.z"


def _blob_ok(cache: Path, row: dict[str, object]) -> bool:
    """A cached row's blob is its own, in the cache, complete: anything else (a row
    naming ``../../etc/passwd``, another file, a link) is indexed again."""
    md5, blob = row["md5"], row["blob"]
    if not (isinstance(md5, str) and _MD5.fullmatch(md5) and blob == blob_name(md5)):
        return False
    try:
        st = os.lstat(cache / blob)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == row["compressed_size"]


#: Sets the index's MACs apart from the journal's, which use the same key.
_MAC_PERSON = b"nbia-srv-index"


def _row_mac(key: bytes, row: dict[str, object]) -> str:
    """The MAC of all a row says (hex, 128 bits). Columns are joined by NUL, which no
    value holds (:func:`_text` drops it), so no two rows share a message."""
    message = "\0".join([str(row[c]) for c in _FILE_COLUMNS])
    return hashlib.blake2b(message.encode("utf-8", "surrogatepass"), key=key,
                           digest_size=16, person=_MAC_PERSON).hexdigest()


def _row_signed(key: bytes | None, row: dict[str, object]) -> bool:
    """The row is as this user's server wrote it (no key: nothing is believed)."""
    mac = row.get("mac")
    return key is not None and isinstance(mac, str) and hmac.compare_digest(
        mac, _row_mac(key, row))


def _scan(root: Path) -> Iterator[tuple[str, str, int, int]]:
    """(collection, relpath, size, mtime_ns) of every image (:data:`IMAGE_SUFFIXES`)
    under a collection folder."""
    for top in sorted(os.scandir(root), key=lambda e: e.name):
        if top.name.startswith(".") or not top.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(top.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.lower().endswith(IMAGE_SUFFIXES) or name.startswith("."):
                    continue
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode):  # a FIFO would block the header read
                    log.warning("%s: skipped, %s", name, file_kind(st.st_mode))
                    continue
                rel = Path(os.path.relpath(full, root)).as_posix()
                yield top.name, rel, st.st_size, st.st_mtime_ns


def _read_index(cache: Path) -> tuple[sqlite3.Connection, dict[str, dict[str, object]]]:
    """The index database and its rows by relpath. One that is no SQLite database, or
    whose tables are not the ones this version writes, is started afresh (every image
    indexed again), never a traceback."""
    for attempt in (1, 2):
        db = None
        try:
            db = _connect(cache)
            db.row_factory = sqlite3.Row
            return db, {row["relpath"]: dict(row) for row in db.execute("SELECT * FROM files")}
        except sqlite3.DatabaseError as exc:
            if db is not None:
                db.close()
            if attempt == 2:
                raise ArchiveError(f"{cache / 'index.sqlite'}: cannot rebuild the index "
                                   f"cache: {exc}") from None
            log.warning("%s: %s; the index is rebuilt", cache / "index.sqlite", exc)
            for name in _CACHE_FILES:
                if name.startswith("index.sqlite"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(cache / name)
    raise AssertionError("unreachable")


def _connect(cache: Path) -> sqlite3.Connection:
    db = sqlite3.connect(cache / "index.sqlite", timeout=60)
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
    found = dict(db.execute("SELECT key, value FROM meta").fetchall())
    wanted = {"schema": str(SCHEMA_VERSION), "level": str(COMPRESSION_LEVEL)}
    have = [row[1] for row in db.execute("PRAGMA table_info(files)")]
    if found != wanted or have not in ([], [*_FILE_COLUMNS, "mac"]):
        db.execute("DROP TABLE IF EXISTS files")
        db.execute("DELETE FROM meta")
        db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
    columns = ", ".join(
        f"{c} {'INTEGER' if c in ('size', 'mtime_ns', 'crc32', 'compressed_size') else 'TEXT'}"
        for c in _FILE_COLUMNS
    )
    db.execute(f"CREATE TABLE IF NOT EXISTS files ({columns}, mac TEXT, "
               "PRIMARY KEY (relpath))")
    db.commit()
    return db


def _refresh(
    root: Path, cache: Path, store: BlobStore, workers: int | None,
    progress: Callable[[int, int], None] | None
) -> tuple[list[dict[str, object]], list[str]]:
    key = row_key(create=True)
    if key is None:
        log.warning("no private key for the index cache's rows (%s): every image is "
                    "indexed again", "see NBIA_RETRIEVER_DATA")
    db, cached = _read_index(cache)
    try:
        present: dict[str, tuple[str, int, int]] = {}
        todo: list[tuple[str, str, int, int]] = []
        for collection, rel, size, mtime in _scan(root):
            present[rel] = (collection, size, mtime)
            row = cached.get(rel)
            if (
                row is None
                or row["size"] != size
                or row["mtime_ns"] != mtime
                or row["collection"] != collection
                or not _row_signed(key, row)  # edited: its CRC, series, blob ...
                or not _blob_ok(cache, row)
            ):
                todo.append((collection, rel, size, mtime))
        gone = [rel for rel in cached if rel not in present]
        skipped: list[str] = []
        if todo:
            fresh = _process(root, store, todo, workers, progress)
            for (_, rel, _, _), row in zip(todo, fresh, strict=True):
                if row is None:
                    skipped.append(rel)
                    cached.pop(rel, None)
                    gone.append(rel)
                else:
                    cached[rel] = row
            placeholders = ", ".join("?" for _ in range(len(_FILE_COLUMNS) + 1))
            db.executemany(
                f"INSERT OR REPLACE INTO files VALUES ({placeholders})",
                [[*(row[c] for c in _FILE_COLUMNS),
                  _row_mac(key, row) if key is not None else None]
                 for row in fresh if row is not None],
            )
        if gone:
            db.executemany("DELETE FROM files WHERE relpath = ?", [(rel,) for rel in gone])
            for rel in gone:
                cached.pop(rel, None)
        db.commit()
        if todo or gone:
            store.collect_garbage({str(row["blob"]) for row in cached.values()})
        return [cached[rel] for rel in sorted(cached)], skipped
    finally:
        db.close()


def _process(
    root: Path,
    store: BlobStore,
    todo: list[tuple[str, str, int, int]],
    workers: int | None,
    progress: Callable[[int, int], None] | None,
) -> list[dict[str, object] | None]:
    """Read headers, hash and compress; threads suffice (zlib and hashlib drop the GIL)."""

    def one(item: tuple[str, str, int, int]) -> dict[str, object] | None:
        collection, rel, size, mtime = item
        return _index_file(root, store, collection, rel, size, mtime)

    results: list[dict[str, object] | None] = []
    count = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=count) as pool:
        for done, row in enumerate(pool.map(one, todo), start=1):
            results.append(row)
            if progress is not None:
                progress(done, len(todo))
    return results


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value).replace("\0", "")  # type: ignore[attr-defined]
    return str(value).replace("\0", "").strip()  # no NUL: it separates a MAC's columns


def _index_file(
    root: Path, store: BlobStore, collection: str, rel: str, size: int, mtime: int
) -> dict[str, object] | None:
    path = root / rel
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        log.warning("%s: skipped, not a readable DICOM file: %s", rel, exc)
        return None
    row: dict[str, object] = {
        column: _text(ds.get(keyword)) for keyword, column in HEADER_TAGS.items()
    }
    if not row["series_uid"]:
        log.warning("%s: skipped, no SeriesInstanceUID", rel)
        return None
    try:
        md5, crc, csize, blob = store.put(path)
    except OSError as exc:
        log.warning("%s: skipped, cannot read: %s", rel, exc)
        return None
    row.update(relpath=rel, size=size, mtime_ns=mtime, md5=md5, crc32=crc,
               compressed_size=csize, blob=blob, collection=collection)
    return row


def _group(rows: list[dict[str, object]]) -> dict[str, SeriesRecord]:
    first: dict[str, dict[str, object]] = {}
    images: dict[str, list[ImageRecord]] = {}
    for row in rows:
        uid = str(row["series_uid"])
        first.setdefault(uid, row)
        images.setdefault(uid, []).append(
            ImageRecord(
                relpath=str(row["relpath"]),
                size=int(row["size"]),  # type: ignore[call-overload]
                md5=str(row["md5"]),
                crc32=int(row["crc32"]),  # type: ignore[call-overload]
                compressed_size=int(row["compressed_size"]),  # type: ignore[call-overload]
                blob=str(row["blob"]),
                sop_instance_uid=str(row["sop_instance_uid"] or ""),
                instance_number=str(row["instance_number"] or ""),
                acquisition_number=str(row["acquisition_number"] or ""),
            )
        )
    series: dict[str, SeriesRecord] = {}
    for uid, row in first.items():
        fields = {c: str(row[c] or "") for c in _SERIES_COLUMNS}
        series[uid] = SeriesRecord(
            series_uid=uid,
            collection=str(row["collection"]),
            images=tuple(images[uid]),
            **fields,
        )
    return series


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise index updates between servers sharing one archive (POSIX only)."""
    try:
        import fcntl  # POSIX only: a Windows server runs without the lock
    except ImportError:  # pragma: no cover - Windows: no lock, last writer wins
        yield
        return
    # Not followed if a link (or a FIFO) was planted since _prepare_cache removed one.
    with os.fdopen(open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
