"""Publishing a checked series: names, its folder, the one rename, LICENSE, records.

Order matters, because a crash can come between any two steps:

1. images are renamed inside the staging folder by the naming rule (their headers);
2. the collection's ``LICENSE`` is written if missing (before the series: once the
   series is journaled a re-run skips it, so a crash right after must not lose it);
3. the staging folder becomes the series folder with a single ``rename``: a crash leaves
   either no folder or a complete one, never half a series;
4. the journal records the series as complete, then ``metadata.csv`` gets its row (a
   row lost to a crash here is re-added by the next run, from the journal).

Nothing is written through a link someone planted below the root: every folder on the
way is opened with ``O_NOFOLLOW`` (``ondisk.open_dir``), and a series folder that
exists already is replaced only if it is this series' own (left by an interrupted run),
never if it holds another series: that series' folder is then the next variant of the
name (its whole UID).

A file item (a DRS object or PathDB slide that is not a series: issue 24) is published
by :meth:`Publisher.publish_file`: one verified file from the run's spool, hard-linked
(never copied) into ``<Collection>/<Patient>/<name>`` and unlinked from the spool, so
the name appears whole or not at all and an existing entry is never replaced by
accident (``link`` fails on an existing name where ``rename`` would overwrite it). A
name that is taken gets the next variant (``name_2.ext``); a symbolic link or folder
in the way is never written through; an existing file is replaced only when it is
this item's own earlier copy (its journal row names it), or kept when it holds exactly
the fetched bytes (a crash between the link and the journal). Then the journal row, then
a row in ``files.csv`` beside ``metadata.csv`` (:class:`~nbia_retriever.report.FilesCsv`).

``LICENSE`` is the Java tool's text, built from the licence name and URL in the
metadata, whichever endpoint the images came from (``getImageWithMD5Hash`` sends no
``LICENSE`` entry): trees made from any server build are byte-identical. Only when the
metadata names no licence is the zip's own entry kept.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from .._dicomtags import series_uid_of, sop_class_name
from ..errors import DestinationError
from ..layout import Layout, fit_component, sanitize_component, series_relpath_variant
from ..models import SeriesInfo, is_file_uid
from ..naming import ImageKey, assign_names, safe_entry_name
from ..ondisk import (
    LICENSE_FILE,
    DownloadRoot,
    RunStaging,
    entry_kind,
    open_dir,
    open_nofollow,
)
from ..report import FILES_CSV, FilesCsv, MetadataCsv, files_row, metadata_row
from .checks import StagedEntry
from .journal import FileRecord, Journal
from .licenses import DATA_POLICY_NAME
from .rows import folder_stamp
from .staging import StagedSeries

#: The Java Data Retriever's LICENSE text (``license_text`` in its config.properties).
JAVA_LICENSE = ("License\n\nThe {0} collection is distributed under the {1} ({2}). \n"
                "By downloading the data, you agree to abide by terms of this license.\n")
MAX_VARIANT = 2


def license_text(info: SeriesInfo, from_zip: bytes | None) -> bytes | None:
    """What the collection's LICENSE says (see the module docstring)."""
    name = info.license_name.strip()
    if name == DATA_POLICY_NAME:
        # Not the collection's licence (no archive told us that): the gate the rows of a
        # controlled DRS sheet pass (engine.route); no LICENSE is made up from it.
        return from_zip or None
    if name and name != "null":
        return JAVA_LICENSE.format(info.collection, name, info.license_url.strip()).encode()
    return from_zip or None


def complete_info(info: SeriesInfo, staged: StagedSeries) -> SeriesInfo:
    """Fill from the images' own headers what the metadata lacks: StudyID (the folder
    name needs it; v4 builds before October 2025 do not send it) and the SOP class.

    A series no archive described (no Study UID: a DRS sheet's ``<UID>.zip`` row, whose
    sheet gives collection, patient and a file name) takes its study and series from its
    first image's header (:func:`header_info`), so that it lands in the folder an NBIA
    download of it gets."""
    first_entry = next((e for e in staged.entries if e.tags is not None), None)
    if first_entry is None:
        return info
    first = first_entry.tags
    assert first is not None
    if not info.study_uid:
        info = header_info(info, staged.folder / first_entry.part)
    changes: dict[str, str] = {}
    if not info.study_id and first.study_id:
        changes["study_id"] = first.study_id
    if not info.sop_class_uid and first.sop_class_uid:
        changes["sop_class_uid"] = first.sop_class_uid
    sop = changes.get("sop_class_uid", info.sop_class_uid)
    if not info.sop_class_name and sop:
        changes["sop_class_name"] = sop_class_name(sop)
    return info.replace(**changes) if changes else info


#: Header keywords -> SeriesInfo fields, for :func:`header_info`.
_HEADER_FIELDS = (("StudyInstanceUID", "study_uid"), ("StudyDate", "study_date"),
                  ("StudyDescription", "study_description"), ("StudyID", "study_id"),
                  ("SeriesNumber", "series_number"),
                  ("SeriesDescription", "series_description"), ("Modality", "modality"),
                  ("Manufacturer", "manufacturer"), ("BodyPartExamined", "body_part"),
                  ("PatientID", "patient_id"))


def header_info(info: SeriesInfo, path: Path) -> SeriesInfo:
    """``info`` with its study and series fields taken from the DICOM header at ``path``
    (one image, read up to its pixels): what NBIA's metadata says of a series comes from
    those very tags. Collection and patient stay the sheet's when it gives them; an
    unreadable header changes nothing (the checks already passed on its UIDs)."""
    import pydicom  # only for a series that no archive described
    from pydicom.errors import InvalidDicomError

    from ..layout import normalise_date  # (as pydicom: only for such a series)

    try:
        with open(path, "rb") as handle:
            ds = pydicom.dcmread(handle, stop_before_pixels=True,
                                 specific_tags=[k for k, _ in _HEADER_FIELDS])
    except (OSError, InvalidDicomError, ValueError, TypeError, AttributeError):
        return info
    changes: dict[str, str] = {}
    for keyword, name in _HEADER_FIELDS:
        if name == "patient_id" and info.patient_id:
            continue
        value = ds.get(keyword)
        text = "" if value is None else str(value).strip()
        if name == "study_date":
            text = normalise_date(text)
        if text or name in ("series_description", "study_description"):
            # (the sheet's "description" of a zip is its file name: never a folder's)
            changes[name] = text
    return info.replace(**changes) if changes else info


def file_folder(info: SeriesInfo, layout: Layout) -> tuple[str, str]:
    """``(Collection, Patient)`` folder names of a file item: the first two components
    the series layout makes for that collection and patient (same sanitiser, same
    fallback for empty values), so slides sit beside the patient's series."""
    bare = info.replace(study_description="", series_description="", series_number="")
    parts = series_relpath_variant(bare, layout, 0).parts
    return parts[0], parts[1]


def file_relpath(info: SeriesInfo, layout: Layout) -> str:
    """Where a file item is meant to go, ``Collection/Patient/<safe name>`` (its file
    name is its ``series_description``); the name actually used may be a variant
    (``name_2.ext``) when that one is taken on disk."""
    return "/".join((*file_folder(info, layout), safe_entry_name(info.series_description)))


class Fetched(Protocol):
    """A file a source fetched for a file item (``files.transfer.FetchedFile``): complete
    and verified, in the run's spool (on the root's file system: published by a link)."""

    @property
    def path(self) -> Path: ...

    @property
    def name(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def md5(self) -> str: ...


_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted in the spool must not block
#: Names tried for one file item (``name``, ``name_2.ext``, ...) before giving up.
MAX_FILE_NAMES = 1000
#: ``link`` errors of a file system without hard links (some FUSE and SMB mounts): the
#: file is then published by an exclusive create and a rename over it.
_NO_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                       errno.ENOSYS})


@dataclass(frozen=True)
class Published:
    relpath: PurePosixPath
    files: tuple[FileRecord, ...]
    nbytes: int
    info: SeriesInfo


def folder_owner(parent_fd: int, leaf: str) -> str | None:
    """The series a folder holds (from one image header), read without following links;
    None for an empty folder or one without readable DICOM (e.g. left by a crash)."""
    try:
        fd = os.open(leaf, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(
            os, "O_NOFOLLOW", 0), dir_fd=parent_fd)
    except OSError:
        return None
    try:
        names = sorted(n for n in os.listdir(fd) if n.lower().endswith(".dcm"))
        for name in names[:8]:
            try:
                file_fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0),
                                  dir_fd=fd)
            except OSError:
                continue
            with os.fdopen(file_fd, "rb") as handle:
                head = handle.read(1 << 20)
            uid = series_uid_of(head)
            if uid:
                return uid
        return None
    finally:
        os.close(fd)


class Publisher:
    """Publishes checked series of one run into its root (thread-safe)."""

    def __init__(self, root: DownloadRoot, staging: RunStaging, layout: Layout,
                 journal: Journal, csv: MetadataCsv,
                 note: Callable[[str, str], None] | None = None) -> None:
        self.root = root
        self.staging = staging
        self.layout = layout
        self.journal = journal
        self.csv = csv
        self._note = note or (lambda uid, text: None)
        self._license_lock = threading.Lock()
        #: metadata.csv rows waiting for a writer (see add_csv_row).
        self._rows: list[tuple[str, list[str]]] = []
        self._rows_lock = threading.Lock()
        self._csv_writer = threading.Lock()
        #: files.csv, opened when a file item is first published or its row is owed.
        self._files_csv: FilesCsv | None = None
        self._files_rows: list[tuple[str, list[str]]] = []
        self._files_writer = threading.Lock()
        self._place_lock = threading.Lock()

    # -- names ----------------------------------------------------------------------------
    def _name_files(self, staged: StagedSeries) -> tuple[FileRecord, ...]:
        folder = staged.folder
        images = [e for e in staged.entries if e.is_image]
        keys = [ImageKey(entry=e.part, acquisition=e.tags.acquisition,  # type: ignore[union-attr]
                         instance=e.tags.instance,  # type: ignore[union-attr]
                         sop_instance_uid=e.tags.sop_instance_uid)  # type: ignore[union-attr]
                for e in images]
        names = assign_names(keys)
        records: list[FileRecord] = []
        used: set[str] = set()
        for entry in images:
            name = names[entry.part]
            os.rename(folder / entry.part, folder / name)
            used.add(name.lower())
            records.append(FileRecord(name, entry.size, entry.md5))
        for entry in staged.entries:
            if entry.is_image:
                continue
            name = _unique(safe_entry_name(entry.name), used)
            os.rename(folder / entry.part, folder / name)
            records.append(FileRecord(name, entry.size, entry.md5))
        return tuple(records)

    # -- LICENSE ----------------------------------------------------------------------------
    def write_license(self, collection_dir: str, text: bytes) -> None:
        """``<Collection>/LICENSE`` unless it exists (a planted link is refused)."""
        with self._license_lock:
            fd = open_dir(self.root.path, [collection_dir])
            try:
                kind = entry_kind(fd, LICENSE_FILE)
                if kind == "link" or kind == "dir":
                    raise DestinationError(
                        f"{self.root.path / collection_dir / 'LICENSE'} is a "
                        f"{'symbolic link' if kind == 'link' else 'folder'}: refusing to "
                        "write through it; remove it and re-run")
                if kind == "file":
                    return
                # The temporary file lives in staging: a crash must not leave it beside
                # the LICENSE, where no re-run would ever clean it up.
                tmp = self.staging.path / f".LICENSE.{threading.get_ident()}.tmp"
                tmp_fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                with os.fdopen(tmp_fd, "wb") as handle:
                    handle.write(text)
                os.rename(tmp, LICENSE_FILE, dst_dir_fd=fd)
            finally:
                os.close(fd)

    # -- the series -------------------------------------------------------------------------
    def publish(self, uid: str, info: SeriesInfo, staged: StagedSeries, *, variant: int,
                attempts: int) -> Published:
        info = complete_info(info, staged)
        files = self._name_files(staged)
        text = license_text(info, staged.license)
        relpath = self._place(uid, info, staged, variant, text)
        nbytes = sum(f.size for f in files)
        mtime = _mtime(self.root.path / relpath)
        self.journal.mark_complete(uid, relpath=str(relpath), files=files, nbytes=nbytes,
                                   attempts=attempts, info=info, folder_mtime=mtime)
        # The series is published and journaled: from here on nothing may turn it back
        # into a failure. A lost metadata.csv row is re-added by the next run.
        images = sum(1 for e in staged.entries if e.is_image)
        notes = sum(e.size for e in staged.entries if e.annotation)
        self.add_csv_row(uid, info, relpath, time.time(), images, nbytes, annotations=notes)
        return Published(relpath, files, nbytes, info)

    def add_csv_row(self, uid: str, info: SeriesInfo, relpath: PurePosixPath | str,
                    when: float, images: int, nbytes: int, *, annotations: int = 0) -> None:
        """Append the series' metadata.csv row, written and fsync'd before this returns.
        Group commit: the rows of series published while another thread writes wait,
        and the next writer writes them all with one fsync (one fsync per one-image
        series made 2,000 such series queue ~2 ms each behind the file's lock)."""
        row = metadata_row(info, f"./{relpath}", when, images=images, size=nbytes,
                           annotations=annotations)
        with self._rows_lock:
            self._rows.append((uid, row))
        with self._csv_writer:
            with self._rows_lock:
                batch, self._rows = self._rows, []
            if not batch:
                return  # another thread wrote this row with its own
            try:
                self.csv.append_many([r for _, r in batch])
            except (OSError, DestinationError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                for who, _ in batch:
                    self._note(who, f"could not update metadata.csv: {reason}")

    # -- a file item ------------------------------------------------------------------------
    @property
    def files_csv(self) -> FilesCsv:
        """``<root>/files.csv`` (read when first asked for: a series-only run never is)."""
        with self._rows_lock:
            if self._files_csv is None:
                self._files_csv = FilesCsv(self.root.path / FILES_CSV, lazy=True)
            return self._files_csv

    def has_row(self, uid: str) -> bool:
        """Its report row is written: metadata.csv's for a series, files.csv's for a file
        item (a files.csv that cannot be read, a link someone planted: "yes", nothing is
        to be written there; each publish says so)."""
        if not is_file_uid(uid):
            return uid in self.csv
        try:
            return uid in self.files_csv
        except (OSError, DestinationError):
            return True

    def file_folder(self, info: SeriesInfo) -> tuple[str, str]:
        """``(Collection, Patient)`` folder names of a file item (:func:`file_folder`)."""
        return file_folder(info, self.layout)

    def publish_file(self, uid: str, info: SeriesInfo, fetched: Fetched, *,
                     attempts: int) -> Published:
        """Publish one fetched file as ``<Collection>/<Patient>/<name>`` (module
        docstring), then its journal row (the file's stamp: its ctime) and files.csv row.
        ``uid`` is the item's key, its URI."""
        collection, patient = self.file_folder(info)
        name = safe_entry_name(fetched.name or info.series_description)
        if info.license_name.strip() and info.license_name.strip() != "null":
            text = license_text(info, None)
            if text:
                self.write_license(collection, text)
        leaf, stamp = self._place_file(uid, [collection, patient], name, fetched)
        relpath = PurePosixPath(collection, patient, leaf)
        files = (FileRecord(leaf, fetched.size, fetched.md5),)
        self.journal.mark_complete(uid, relpath=str(relpath), files=files,
                                   nbytes=fetched.size, attempts=attempts, info=info,
                                   folder_mtime=stamp)
        # Published and journaled: a lost files.csv row is re-added by the next run.
        self.add_file_row(uid, info, relpath, time.time(), files[0])
        return Published(relpath, files, fetched.size, info)

    def add_file_row(self, uid: str, info: SeriesInfo, relpath: PurePosixPath | str,
                     when: float, record: FileRecord) -> None:
        """Append the file item's files.csv row (group commit, as :meth:`add_csv_row`)."""
        row = files_row(info, uid, f"./{relpath}", record.name, record.size, record.md5,
                        when)
        files_csv = self.files_csv
        with self._rows_lock:
            self._files_rows.append((uid, row))
        with self._files_writer:
            with self._rows_lock:
                batch, self._files_rows = self._files_rows, []
            if not batch:
                return
            try:
                files_csv.append_many([r for _, r in batch])
            except (OSError, DestinationError) as exc:
                reason = getattr(exc, "strerror", None) or str(exc)
                for who, _ in batch:
                    self._note(who, f"could not update {FILES_CSV}: {reason}")

    def _own_relpath(self, uid: str) -> str:
        """Where this run's journal says the item's earlier copy is ("" if nowhere)."""
        with contextlib.suppress(DestinationError):
            entry = self.journal.get(uid)
            if entry is not None:
                return entry.relpath
        return ""

    def _place_file(self, uid: str, parents: list[str], name: str,
                    fetched: Fetched) -> tuple[str, int]:
        """Link the spool file in as ``name`` or its first free variant; returns the name
        used and the file's stamp (after the spool's name is gone: unlinking changes
        the ctime too)."""
        parent_fd = open_dir(self.root.path, parents)
        try:
            own = self._own_relpath(uid)
            used: set[str] = set()
            candidate = name
            for _ in range(MAX_FILE_NAMES):
                relpath = "/".join((*parents, candidate))
                with self._place_lock:  # two items of one patient with one name
                    kind = _leaf_kind(parent_fd, candidate)
                    if kind == "file" and _same_file(parent_fd, candidate, fetched):
                        os.unlink(fetched.path)  # already there, whole: a crash after the link
                        return candidate, _file_stamp(parent_fd, candidate)
                    if kind == "file" and relpath == own:
                        self._move_aside(parent_fd, candidate, uid)
                        kind = None
                    if kind is None:
                        try:
                            _link(fetched.path, candidate, parent_fd)
                        except FileExistsError:
                            pass  # taken this very moment (another run): the next name
                        else:
                            with contextlib.suppress(FileNotFoundError):
                                os.unlink(fetched.path)
                            return candidate, _file_stamp(parent_fd, candidate)
                # A foreign file, a link, a folder, a FIFO...: never written through (nor
                # opened), the next name.
                used.add(candidate.lower())
                candidate = _unique(name, used)
            raise DestinationError(f"{self.root.path.joinpath(*parents) / name}: every "
                                   f"name for {uid} is taken on disk")
        finally:
            os.close(parent_fd)

    def _place(self, uid: str, info: SeriesInfo, staged: StagedSeries, planned: int,
               license_bytes: bytes | None) -> PurePosixPath:
        """Move the staging folder to the first variant of its name that is free or its
        own; returns the relpath used."""
        last_error: OSError | None = None
        for variant in range(planned, MAX_VARIANT + 1):
            relpath = series_relpath_variant(info, self.layout, variant)
            parts = relpath.parts
            if license_bytes and variant == planned:
                self.write_license(parts[0], license_bytes)
            parent_fd = open_dir(self.root.path, list(parts[:-1]))
            try:
                leaf = parts[-1]
                kind = entry_kind(parent_fd, leaf)
                if kind in ("link", "file"):
                    raise DestinationError(
                        f"{self.root.path / relpath} is a "
                        f"{'symbolic link' if kind == 'link' else 'file'}, not a series "
                        "folder: refusing to publish through it; remove it and re-run")
                if kind == "dir":
                    owner = folder_owner(parent_fd, leaf)
                    if owner not in (uid, None):
                        continue  # another series' folder: the next variant
                    self._move_aside(parent_fd, leaf, uid)
                try:
                    os.rename(staged.folder, leaf, dst_dir_fd=parent_fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        last_error = exc  # taken this very moment by another run
                        continue
                    raise
                return relpath
            finally:
                os.close(parent_fd)
        raise DestinationError(f"series {uid}: every folder name for it is taken on disk"
                               + (f" ({last_error.strerror})" if last_error else ""))

    def _move_aside(self, parent_fd: int, leaf: str, uid: str) -> None:
        """Ours, from an interrupted run (published, not yet journaled) or damaged:
        replace it via this run's staging, never by deleting in place."""
        trash = self.staging.path / f"{_safe(uid)}.old"
        _remove(trash)
        os.rename(leaf, trash, src_dir_fd=parent_fd)
        _remove(trash)

    def adopt_row(self, uid: str, info: SeriesInfo, relpath: str, when: float,
                  files: tuple[FileRecord, ...]) -> None:
        """metadata.csv row of a series adopted from an existing tree, if it has none
        (a file item's: its files.csv row)."""
        if is_file_uid(uid):
            if files and not self.has_row(uid):
                self.add_file_row(uid, info, relpath, when, files[0])
            return
        if uid in self.csv:
            return
        images = sum(1 for f in files if f.name.lower().endswith(".dcm"))
        self.add_csv_row(uid, info, relpath, when, images, sum(f.size for f in files))


def _safe(uid: str) -> str:

    return sanitize_component(uid, fallback="series")


def _remove(path: Path) -> None:
    """A folder (a series' old copy) or a file (a file item's), whichever it is."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _link(src: Path, leaf: str, parent_fd: int) -> None:
    """``src`` as ``leaf`` in the folder ``parent_fd``, never replacing an entry there
    (FileExistsError); on a file system without hard links, by an exclusive create of
    the name and a rename over that placeholder."""
    _tree_mode(src)
    try:
        # follow_symlinks=False: a link planted in the spool is never followed into
        # the tree (it would be published as a link, which no row ever believes).
        os.link(src, leaf, dst_dir_fd=parent_fd, follow_symlinks=False)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o644, dir_fd=parent_fd)
    os.close(fd)
    os.rename(src, leaf, dst_dir_fd=parent_fd)


@functools.cache
def _umask() -> int:
    """This process's umask, read without changing it (``os.umask`` sets it for every
    thread at once): Linux says it in ``/proc/self/status``; elsewhere 022."""
    with contextlib.suppress(OSError, ValueError), \
            open("/proc/self/status", encoding="ascii", errors="replace") as handle:
        for line in handle:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def _tree_mode(path: Path) -> None:
    """Check that the spool file is a regular file (never a link someone put in its
    place: DestinationError) and give it (private while it grows: 0600) the mode a file
    written into the tree gets, 0666 minus the umask as the series' images, through a
    descriptor opened without following a link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _NONBLOCK)
    except OSError as exc:
        raise DestinationError(f"{path}: cannot publish it ({exc.strerror or exc}): not "
                               "the regular file the transfer wrote") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DestinationError(f"{path}: not the regular file the transfer wrote")
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)


def _leaf_kind(parent_fd: int, leaf: str) -> str | None:
    """``"file"`` (a regular file), ``"other"`` (a folder, link, FIFO, socket or device:
    never opened, never written through) or None (free), looked at without following
    a link."""
    try:
        mode = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None
    return "file" if stat.S_ISREG(mode) else "other"


def _file_stamp(parent_fd: int, leaf: str) -> int:
    """The published file's stamp for the journal (:func:`~.rows.folder_stamp`)."""
    with contextlib.suppress(OSError):
        return folder_stamp(os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False))
    return 0


def _same_file(parent_fd: int, leaf: str, fetched: Fetched) -> bool:
    """``leaf`` is a regular file holding exactly the fetched bytes (size, then MD5;
    read without following a link)."""
    if not fetched.md5:
        return False
    try:
        fd = os.open(leaf, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | _NONBLOCK,
                     dir_fd=parent_fd)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != fetched.size:
            return False
        digest = hashlib.file_digest(handle, lambda: hashlib.md5(usedforsecurity=False))
    return digest.hexdigest() == fetched.md5.lower()


def _mtime(path: Path) -> int:
    """The folder's stamp for the journal (:func:`~.rows.folder_stamp`); 0: unknown."""
    with contextlib.suppress(OSError):
        return folder_stamp(os.stat(path, follow_symlinks=False))
    return 0


#: Longest extension kept whole when a name is made unique (``x_2.xml``); a longer
#: "extension" is part of the name (``x.<300 bytes>_2``).
_MAX_EXT = 16


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``stem_N.ext`` for the first N free, within 255 bytes (the stem is
    cut to make room for the suffix)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXT:
        stem, dot, ext = name, "", ""
    candidate, n = name, 1
    while candidate.lower() in used:
        n += 1
        candidate = fit_component(stem, f"_{n}{dot}{ext}")
    used.add(candidate.lower())
    return candidate


__all__ = ["JAVA_LICENSE", "Fetched", "Published", "Publisher", "StagedEntry", "complete_info",
           "file_folder", "file_relpath", "folder_owner", "license_text", "sop_class_name"]
