"""A manifest's files beside its series: one source for a mixed run.

A DRS or PathDB sheet names files (:class:`~nbia_retriever.models.FileItem`), and a mixed
sheet names series too. The engine runs one source; :class:`WithFiles` is that source
for such a run: the manifest's file keys go to the files source
(:class:`~nbia_retriever.files.source.FileSource`: Gen3 DRS, PathDB URLs), every other
key to the run's own source (NBIA, IDC or ``auto``), built only when the run has series
at all, so a DRS-only sheet never contacts an NBIA server nor loads IDC's index.

The engine asks :meth:`verdict` with only the error in hand; a failure from a file
stream is marked on the way out of :meth:`open` (``exc.nbia_source = "files"``), so the
files source judges its own failures (a refused Gen3 key stops the run; a 404 from a
storage host is that file's failure) and the series source its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import NbiaError
from ..models import FileItem, SeriesInfo, SeriesState
from ..retry import Verdict
from . import checks
from .licenses import DATA_POLICY_NAME, DATA_POLICY_URL
from .source import ByteStream, MetadataBatch, Source, StreamOpener, takes_files

if TYPE_CHECKING:
    from ..manifest import Manifest
    from ..session import Session
    from .options import DownloadOptions

__all__ = ["DATA_POLICY_NAME", "DATA_POLICY_URL", "FILES_MARK", "WithFiles", "files_source"]

T = TypeVar("T")

#: The attribute set on an exception raised by a file's stream.
FILES_MARK = "nbia_source"



class WithFiles:
    """Files to ``files``, series to the source ``series()`` builds (on first use)."""

    def __init__(self, files: Source, items: Mapping[str, FileItem],
                 series: Callable[[], Source] | None, *, has_series: bool) -> None:
        self.files = files
        self.items = items
        self.keys = frozenset(items)
        #: Keys of controlled-access rows (DRS): their infos carry the data use policy.
        self.controlled = frozenset(k for k, i in items.items() if i.kind == "drs")
        self._make_series = series
        self._series: Source | None = None
        self._has_series = has_series and series is not None
        self._lock = threading.Lock()
        self._bound: tuple[Any, ...] | None = None
        self.name = files.name

    # -- the series source, lazily ---------------------------------------------------------
    @property
    def series(self) -> Source | None:
        with self._lock:
            if self._series is None and self._has_series and self._make_series is not None:
                self._series = self._make_series()
                self.name = f"{self.files.name} and {self._series.name}"
                bind = getattr(self._series, "bind_run", None)
                if bind is not None and self._bound is not None:
                    bind(*self._bound)
            return self._series

    @property
    def client(self) -> Any:
        """The NBIA client, once the series source has one (the engine's reports)."""
        return getattr(self._series, "client", None)

    @property
    def notes(self) -> list[str]:
        """Lines the run shows once, from either source: taken from them (the engine
        pops what it shows; reading twice must not show a line twice)."""
        found: list[str] = []
        for source in (self.files, self._series):
            pending = getattr(source, "notes", None)
            if pending:
                found += pending
                del pending[:]
        return found

    def bind_run(self, *bound: Any, files: Path | None = None) -> None:
        """The run's spool folders: ``files`` (``.nbia/files/``) to the files source;
        the pieces folder and budget to both (a huge series of the sheet's series)."""
        with self._lock:
            self._bound = bound
            series = self._series
        bind = getattr(self.files, "bind_run", None)
        if bind is not None:
            bind(*bound, **({"files": files} if files is not None and takes_files(bind)
                            else {}))
        bind = getattr(series, "bind_run", None)
        if bind is not None:
            bind(*bound)

    def _of(self, uid: str) -> Source:
        if uid in self.keys:
            return self.files
        series = self.series
        if series is None:  # (cannot happen: every key of a files-only run is a file's)
            return self.files
        return series

    # -- Source ----------------------------------------------------------------------------
    def check(self) -> None:
        self.files.check()
        if self._has_series and self.series is not None:
            self.series.check()

    def prepare(self) -> None:
        self.files.prepare()
        if self._has_series and self.series is not None:
            self.series.prepare()

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        mine = [u for u in uids if u in self.keys]
        rest = [u for u in uids if u not in self.keys]
        if mine:
            for batch in self.files.metadata_batches(mine):
                for uid in [u for u in batch.infos if u in self.controlled]:
                    info = batch.infos[uid]
                    if not info.license_name and not info.license_url:
                        batch.infos[uid] = info.replace(license_name=DATA_POLICY_NAME,
                                                        license_url=DATA_POLICY_URL)
                yield batch
        if rest:
            series = self.series
            if series is None:
                yield MetadataBatch(rest)
                return
            yield from series.metadata_batches(rest)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return self._of(uid).unavailable(uid)

    def open(self, info: SeriesInfo) -> AbstractContextManager[ByteStream]:
        uid = info.series_uid
        if uid in self.keys:
            return self._marked(self.files.open(info))
        return self._of(uid).open(info)

    @contextmanager
    def _marked(self, opened: AbstractContextManager[ByteStream]) -> Iterator[ByteStream]:
        try:
            with opened as stream:
                yield stream
        except NbiaError as exc:
            setattr(exc, FILES_MARK, "files")
            raise

    def remote(self, info: SeriesInfo, run: Callable[[StreamOpener], T | None]) -> T | None:
        """Series may go to worker processes as their source allows; files never (they
        are fetched into the spool in this process, byte-resumable)."""
        if info.series_uid in self.keys:
            return None
        remote = getattr(self._of(info.series_uid), "remote", None)
        return remote(info, run) if remote is not None else None

    def where(self, uid: str) -> str:
        if uid in self.keys:
            where = getattr(self.files, "where", None)
            if where is not None:
                return str(where(uid))
            item = self.items.get(uid)
            if item is None:
                return "files"
            # ``list``'s From column and the journal's source: the service and its host.
            return f"{'gen3' if item.kind == 'drs' else 'url'} {item.host}"
        where = getattr(self._of(uid), "where", None)
        return str(where(uid)) if where is not None else "nbia"

    def check_series(self, uid: str, info: SeriesInfo, entries: Sequence[checks.StagedEntry],
                     md5_list: Mapping[str, str] | None, *, md5_required: bool) -> None:
        check = getattr(self._of(uid), "check_series", checks.check_series)
        check(uid, info, entries, md5_list, md5_required=md5_required)

    def verdict(self, error: NbiaError) -> Verdict:
        if getattr(error, FILES_MARK, None) == "files" or self._series is None:
            return self.files.verdict(error)
        return self._series.verdict(error)

    def close(self) -> None:
        self.files.close()
        if self._series is not None:
            self._series.close()


def files_source(manifest: Manifest, session: Session, options: DownloadOptions) -> Source:
    """The source of a run whose manifest names files: :class:`WithFiles` over the files
    source and ``options.source`` (for the sheet's series, if any)."""
    from ..files.gen3 import find_credentials  # the Gen3 client only for such a run
    from ..files.source import FileSource
    from ..session import host_policy

    creds = find_credentials(Path(options.auth) if options.auth else None, os.environ)
    policy = host_policy(chosen=options.gen3_endpoint, trusted_hosts=options.trusted_hosts,
                         confirm=session.confirm)
    files = FileSource(manifest.files, creds=creds, endpoint=options.gen3_endpoint,
                       policy=policy, timeout=options.timeout, verify=options.verify_tls,
                       md5=options.md5)
    return WithFiles(files, manifest.file_by_key(), lambda: session.source(options),
                     has_series=bool(manifest.series_uids))
