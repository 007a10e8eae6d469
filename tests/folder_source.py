"""A source that lives in the test suite: series are folders of DICOM files on disk
(``<root>/<collection>/.../<SeriesInstanceUID>/*.dcm``), zipped on the fly.

It shows what adding a source takes: this one module, and one registration
(``register_source("folder", factory(root))``, from the test that uses it). Nothing
in the engine, the CLI or the view knows it. Worker processes open its streams through
:class:`FolderOpener`, picklable, found by module name in the worker (whose path is the
parent's).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import zipfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pydicom

from nbia_retriever.engine import checks
from nbia_retriever.engine.source import MetadataBatch, Verdict
from nbia_retriever.errors import IntegrityError, NbiaError, NetworkError
from nbia_retriever.models import SeriesInfo, SeriesState

T = TypeVar("T")
CHUNK = 64 << 10


class FolderStream:
    """A series folder as a zip (``md5hashes.csv`` included, as NBIA sends it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.bytes_received = 0
        self._aborted = threading.Event()

    def chunks(self) -> Iterator[bytes]:
        buffer = io.BytesIO()
        digests = ["Filename,MD5Hash"]
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(self.folder.glob("*.dcm")):
                data = path.read_bytes()
                archive.writestr(path.name, data)
                digests.append(f"{path.name},{hashlib.md5(data).hexdigest()}")
            archive.writestr("md5hashes.csv", "\n".join(digests) + "\n")
        data = buffer.getvalue()
        for start in range(0, len(data), CHUNK):
            if self._aborted.is_set():
                raise NetworkError(f"{self.folder.name}: aborted")
            chunk = data[start:start + CHUNK]
            self.bytes_received += len(chunk)
            yield chunk

    def abort(self) -> None:
        self._aborted.set()


@dataclass(frozen=True, slots=True)
class FolderOpener:
    """What a worker process needs to open one series: its folder (no secret)."""

    folder: str
    what: str

    def secrets(self) -> tuple[str, ...]:
        return ()

    def open_stream(self, cache: dict[Hashable, Any]) -> contextlib.nullcontext[FolderStream]:
        return contextlib.nullcontext(FolderStream(Path(self.folder)))


class FolderSource:
    """Series from a folder tree: metadata from the first image's header."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.name = str(self.root)
        self._folders = {d.name: d for d in self.root.rglob("*")
                         if d.is_dir() and any(d.glob("*.dcm"))}
        #: Series this source's rules checked (the engine asks the source).
        self.checked: list[str] = []

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def _info(self, uid: str) -> SeriesInfo | None:
        folder = self._folders.get(uid)
        if folder is None:
            return None
        files = sorted(folder.glob("*.dcm"))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        return SeriesInfo(
            series_uid=uid, collection=folder.relative_to(self.root).parts[0],
            patient_id=str(ds.get("PatientID", "")), study_uid=str(ds.StudyInstanceUID),
            study_date=str(ds.get("StudyDate", "")),
            study_description=str(ds.get("StudyDescription", "")),
            series_description=str(ds.get("SeriesDescription", "")),
            series_number=str(ds.get("SeriesNumber", "")), modality=str(ds.get("Modality", "")),
            image_count=len(files), file_size=sum(f.stat().st_size for f in files))

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        for start in range(0, len(uids), 50):
            part = list(uids[start:start + 50])
            infos = {u: info for u in part if (info := self._info(u)) is not None}
            yield MetadataBatch(part, infos)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return SeriesState.NO_DATA, "no folder holds this series"

    def open(self, info: SeriesInfo) -> contextlib.nullcontext[FolderStream]:
        return contextlib.nullcontext(FolderStream(self._folders[info.series_uid]))

    def remote(self, info: SeriesInfo, run: Callable[[FolderOpener], T | None]) -> T | None:
        return run(FolderOpener(str(self._folders[info.series_uid]),
                                f"series {info.series_uid}"))

    def check_series(self, uid: str, info: SeriesInfo, entries: Sequence[checks.StagedEntry],
                     md5_list: Mapping[str, str] | None, *, md5_required: bool) -> None:
        """Its own rules: NBIA's (its zips carry an MD5 list too), and the file count of
        the folder exactly."""
        checks.check_series(uid, info, entries, md5_list, md5_required=md5_required)
        images = [e for e in entries if e.is_image]
        if len(images) != info.image_count:
            raise IntegrityError(f"series {uid}: {len(images)} images, the folder has "
                                 f"{info.image_count}")
        self.checked.append(uid)

    def verdict(self, error: NbiaError) -> Verdict:
        return Verdict(retry=isinstance(error, NetworkError))

    def close(self) -> None:
        pass


def factory(root: Path) -> Callable[..., FolderSource]:
    """The registry entry: builds the source for a run (it needs no session: no server,
    no login)."""
    return lambda session, options: FolderSource(root)
