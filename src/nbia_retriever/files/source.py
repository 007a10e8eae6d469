""":class:`FileSource`: the engine's source for the DRS and PathDB rows of a manifest.

Each row is a :class:`~nbia_retriever.models.FileItem`, one file behind one URL. The
engine asks of it what it asks of an NBIA series (metadata, a stream, a verdict), so
pause, cancel, retries, shards and the journal work the same. Two kinds of stream:

* a DICOM series zip (General Commons names TCIA's series ``<SeriesInstanceUID>.zip``;
  the item's key is then that UID): a :class:`ByteStream` like NBIA's, whose
  :meth:`~SpooledZip.chunks` first runs the resumable transfer into the spool, then
  reads the verified zip back in 1 MiB pieces for the engine's zip staging (and deletes
  it when closed). The zip goes through the same streaming, verifying path as an NBIA
  series, into the same tree;
* any other file: a :class:`FileStream` whose :meth:`~FileStream.fetch` runs the
  transfer and hands the engine a verified :class:`~.transfer.FetchedFile` in the spool,
  which it publishes by one rename into ``Collection/Patient/<name>``.

Planning costs no request: metadata comes from the rows. A DRS object's signed URL, and
its GA4GH size and MD5 when the manifest lacks them, are asked for when it is opened.
The Gen3 token is fetched once per host in :meth:`FileSource.prepare`, so a dead key
stops the run (exit 3) before the first download; PathDB URLs carry no secret at all.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..api.auth import HostPolicy
from ..api.client import MetadataBatch
from ..api.http import Origin, Transport
from ..engine import checks
from ..errors import ApiError, AuthError, NbiaError, NetworkError, NotPublicError, UsageError
from ..models import FileItem, SeriesInfo, SeriesState
from ..retry import Verdict, classify
from ..untrusted import quote
from .drs import drs_object, gen3_origin, signed_url
from .gen3 import AUTH_ENV, Gen3Auth, Gen3Credentials, check_origin
from .transfer import READ_BYTES, FetchedFile, Transfer, fetch_to_spool

__all__ = ["FileSource", "FileStream", "SpooledZip"]

#: Items a metadata batch holds (no request behind it: the rows are the metadata).
BATCH = 1000
#: Threads asking for DRS records beside the streams' signed-URL requests (one per
#: stream the engine may run: ``--max-connections``' default).
RECORD_THREADS = 16
#: The spool's folder below ``.nbia/`` (beside the pieces of huge series).
FILES_DIR = "files"


class FileStream:
    """One file item, opened: :meth:`fetch` downloads it (see the module docstring)."""

    def __init__(self, source: FileSource, item: FileItem) -> None:
        self._source = source
        self.item = item
        self._transfer = Transfer()

    @property
    def bytes_received(self) -> int:
        return self._transfer.bytes_received

    @property
    def resumed_from(self) -> int:
        """Bytes an earlier attempt or run left that this one kept."""
        return self._transfer.resumed_from

    def abort(self) -> None:
        """From another thread (cancel during a stall): the blocked read ends; the part
        stays for the next attempt."""
        self._transfer.abort()

    def fetch(self, *, checkpoint: Callable[[], None],
              on_progress: Callable[[int], None]) -> FetchedFile:
        def check() -> None:
            if self._transfer.aborted:
                raise NetworkError(f"{self._source.label(self.item)}: stopped")
            checkpoint()

        return self._source.fetch(self.item, self._transfer, check, on_progress)


class SpooledZip:
    """A series zip from a DRS object, as the engine's
    :class:`~nbia_retriever.engine.source.ByteStream`: the transfer first (resumable,
    verified), then the zip's bytes from the spool."""

    def __init__(self, source: FileSource, item: FileItem) -> None:
        self._file = FileStream(source, item)
        self._path: Path | None = None
        self._checkpoint: Callable[[], None] = lambda: None
        self._on_progress: Callable[[int], None] = lambda _: None

    def watch(self, checkpoint: Callable[[], None], on_progress: Callable[[int], None]) -> None:
        """The engine's pause/cancel point and progress, for the transfer that runs
        before the first chunk (without them a paused run kept fetching the zip, and
        its bar sat at 0 until the whole zip was in)."""
        self._checkpoint = checkpoint
        self._on_progress = on_progress

    @property
    def bytes_received(self) -> int:
        return self._file.bytes_received

    def abort(self) -> None:
        self._file.abort()

    def chunks(self) -> Iterator[bytes]:
        fetched = self._file.fetch(checkpoint=self._checkpoint, on_progress=self._on_progress)
        self._path = fetched.path
        with open(fetched.path, "rb") as handle:
            while chunk := handle.read(READ_BYTES):
                yield chunk

    def close(self) -> None:
        """The verified zip is the engine's staged series now, or to be fetched again:
        either way its spool copy goes."""
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()


class FileSource:
    """The files of a manifest (see the module docstring). ``endpoint`` is
    ``--gen3-endpoint`` (replaces ``https://HOST`` of every DRS item); ``policy`` who
    else may get the API key (``trusted_hosts``); ``md5``: check the MD5 the manifest
    or DRS gives (off: sizes only, as ``--no-md5`` does for series)."""

    def __init__(self, items: Sequence[FileItem], *, creds: Gen3Credentials | None,
                 endpoint: str | None, policy: HostPolicy | None, timeout: float,
                 verify: bool = True, md5: bool = True,
                 transport: Transport | None = None) -> None:
        self.items: dict[str, FileItem] = {}
        for item in items:
            self.items.setdefault(item.key, item)
        self.creds = creds
        self.endpoint = endpoint.strip() if endpoint else None
        self.policy = policy
        self.md5 = md5
        self._own = transport is None
        self.transport = transport or Transport(timeout=timeout,
                                                connect_timeout=min(timeout, 30.0),
                                                verify=verify)
        self._auths: dict[str, Gen3Auth] = {}
        self._lock = threading.Lock()
        self._spool: Path | None = None
        self._records: ThreadPoolExecutor | None = None
        #: Lines the run shows once (a credentials file others can read).
        self.notes: list[str] = [creds.warning] if creds is not None and creds.warning else []
        hosts = sorted({i.host for i in self.items.values() if i.host})
        self.name = ", ".join(hosts[:3]) + (f" and {len(hosts) - 3} more" if len(hosts) > 3
                                            else "") or "files"

    # -- helpers ---------------------------------------------------------------------------
    def label(self, item: FileItem) -> str:
        """How messages name an item: its file name and manifest line."""
        line = f" (line {item.line})" if item.line else ""
        return f"file {quote(item.name or item.uri, 120)}{line}"

    def auth_for(self, item: FileItem) -> Gen3Auth:
        """The token keeper of the item's Gen3 API origin (one per origin)."""
        if self.creds is None:
            raise self._no_key(item)
        origin = gen3_origin(item, self.endpoint)
        with self._lock:
            auth = self._auths.get(origin)
            if auth is None:
                host = item.host if not self.endpoint else Origin.of(origin).label
                auth = self._auths[origin] = Gen3Auth(origin, self.creds, self.transport,
                                                      self.policy, host=host,
                                                      chosen=self.endpoint)
            return auth

    def _no_key(self, item: FileItem) -> AuthError:
        count = sum(1 for i in self.items.values() if i.kind == "drs")
        rows = "1 DRS row needs" if count == 1 else f"{count:,} DRS rows need"
        return AuthError(f"{rows} a Gen3 API key ({item.host}, first: {self.label(item)}): "
                         f"pass --auth FILE or set {AUTH_ENV} to the credentials file you "
                         f"downloaded from https://{item.host}/ (Profile > Create API key)")

    # -- Source ----------------------------------------------------------------------------
    def check(self) -> None:
        origins: dict[str, FileItem] = {}
        for item in self.items.values():
            if item.kind == "drs":
                if self.creds is None:
                    raise self._no_key(item)
                origins.setdefault(gen3_origin(item, self.endpoint), item)
            elif item.kind == "url":
                scheme = item.uri.partition("://")[0].lower()
                if scheme not in ("http", "https") or not item.host:
                    raise UsageError(f"{self.label(item)}: not an http(s) URL")
            else:
                raise UsageError(f"{self.label(item)}: unknown kind of file row {item.kind!r}")
        for origin in origins:
            check_origin(origin, self.policy, chosen=self.endpoint)

    def prepare(self) -> None:
        """One token per Gen3 host now: a rejected key stops the run before any file."""
        self.check()
        done: set[str] = set()
        for item in self.items.values():
            if item.kind == "drs":
                auth = self.auth_for(item)
                if auth.origin not in done:
                    done.add(auth.origin)
                    auth.authorization()

    def bind_run(self, spool: Path, budget: Any = None, *, files: Path | None = None) -> None:
        """Where files grow (``<root>/.nbia/files/``): ``files`` when the engine names it,
        else beside the pieces folder it binds for huge series, else ``spool`` itself."""
        if files is not None:
            self._spool = files
        elif spool.name == "pieces":
            self._spool = spool.parent / FILES_DIR
        else:
            self._spool = spool

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        for start in range(0, len(uids), BATCH):
            part = list(uids[start:start + BATCH])
            yield MetadataBatch(part, {u: self.info(self.items[u]) for u in part
                                       if u in self.items})

    @staticmethod
    def info(item: FileItem) -> SeriesInfo:
        """The item as the engine's series metadata (from its row: no request). A
        series zip gets no Study UID even when the sheet gives one: that is how
        publishing knows to take its study and series from the headers
        (``engine.publish.header_info``), as NBIA's metadata does."""
        return SeriesInfo(item.key, collection=item.collection, patient_id=item.patient_id,
                          study_uid="" if item.is_series else item.study_uid,
                          study_date=item.study_date,
                          study_description=item.study_description,
                          series_description=item.name, modality=item.modality,
                          image_count=None if item.is_series else 1, file_size=item.size)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return SeriesState.NO_DATA, "not a file row of this manifest"

    @contextlib.contextmanager
    def open(self, info: SeriesInfo) -> Iterator[Any]:
        item = self.items.get(info.series_uid)
        if item is None:
            raise NbiaError(f"{quote(info.series_uid, 120)}: not a file row of this manifest")
        if item.is_series:
            stream = SpooledZip(self, item)
            try:
                yield stream
            finally:
                stream.close()
        else:
            yield FileStream(self, item)

    def fetch(self, item: FileItem, transfer: Transfer, checkpoint: Callable[[], None],
              on_progress: Callable[[int], None]) -> FetchedFile:
        """One attempt at the item's file: its URL (DRS: signed, with the DRS record's
        size and MD5 when the row lacks them), then the resumable transfer."""
        size, md5, name = item.size, item.md5, item.name
        url_for: Callable[[], str]
        if item.kind == "drs":
            auth = self.auth_for(item)
            object_id = item.object_id
            first: list[str] = []
            if size is None or (md5 is None and self.md5):
                # The DRS record and the signed URL are asked for at once: a commons
                # 100 ms away costs one round trip before the first byte, not two.
                record = self._pool().submit(drs_object, auth, object_id)
                try:
                    first.append(signed_url(auth, object_id))
                finally:
                    found = record.result()  # its error first, as when asked in turn
                if found is not None:
                    size = size if size is not None else found.size
                    md5 = md5 or found.md5
                    name = name or found.name
            checkpoint()

            def url_for() -> str:
                return first.pop() if first else signed_url(auth, object_id)
        else:
            uri = item.uri

            def url_for() -> str:
                return uri
        spool = self._spool
        if spool is None:  # not bound (a caller outside the engine): a private folder
            spool = self._spool = Path(tempfile.mkdtemp(prefix="nbia-files-"))
        return fetch_to_spool(url_for, spool, item.key, expected_size=size,
                              expected_md5=md5 if self.md5 else None,
                              transport=self.transport, checkpoint=checkpoint,
                              on_progress=on_progress, etag_check=self.md5,
                              name=name or os.path.basename(item.uri.partition("?")[0]),
                              what=self.label(item), state=transfer)

    def check_series(self, uid: str, info: SeriesInfo, entries: Sequence[checks.StagedEntry],
                     md5_list: Mapping[str, str] | None, *, md5_required: bool) -> None:
        """A DRS series zip has no md5hashes.csv (the zip's own MD5 was checked as it
        arrived); everything else as for NBIA: DICOM images of this series, each once."""
        checks.check_series(uid, info, entries, None, md5_required=False)

    def verdict(self, error: NbiaError) -> Verdict:
        """A dead key stops the run; a missing object fails at once; a refused one is
        Not Authorized; the rest is the one retry table."""
        if isinstance(error, AuthError):
            return Verdict(retry=False, fatal=True)
        if isinstance(error, NotPublicError) or (isinstance(error, ApiError)
                                                 and error.status == 403):
            return Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)
        if isinstance(error, ApiError) and error.status == 404:
            return Verdict(retry=False, state=SeriesState.ERROR)
        return classify(error, logged_in=False)

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for the DRS records asked for beside the signed URLs (made on first
        use: a sheet with size and MD5 never needs them)."""
        with self._lock:
            if self._records is None:
                self._records = ThreadPoolExecutor(RECORD_THREADS,
                                                   thread_name_prefix="nbia-drs-record")
            return self._records

    def close(self) -> None:
        with self._lock:
            records, self._records = self._records, None
        if records is not None:
            records.shutdown(wait=True, cancel_futures=True)  # queued: dropped
        if self._own:
            self.transport.close()
