"""IDC as a source of the engine, and ``auto``: each series from IDC when IDC has it.

:class:`IdcSource` answers the engine's :class:`~nbia_retriever.engine.source.Source`
questions from IDC's own index (:mod:`.index`: no request at all for metadata) and its
buckets (:mod:`.stream`: one listing and one GET per instance, several in flight). A
staged IDC series is held to NBIA's rules (:func:`~nbia_retriever.engine.checks.check_series`:
the instance count, every header's SeriesInstanceUID, each object's MD5 against its ETag
where the ETag is a plain MD5) and published by the same atomic rename, into the same
Java tree: the index gives NBIA's collection name, the headers give the Study ID.

:class:`RoutedSource` is ``--source auto`` (the default): one lookup of every series in
the index, then the series IDC holds come from IDC and only the rest from the manifest's
NBIA server, which is never contacted (not even to log in, unless a password was given)
when IDC holds them all. A series IDC fails to deliver intact :data:`IDC_ATTEMPTS` times
is fetched from NBIA instead. Unlike TCIA's Go retriever, a bare SeriesInstanceUID is
always IDC's *current* version (its lookup reads ``prior_versions_index`` second and so
fetches an old version of every revised series); an old version is fetched only when a
``.s5cmd`` manifest names its ``crdc_series_uuid`` (:attr:`IdcSource.pinned`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from ..engine import checks
from ..engine.source import ByteStream, MetadataBatch, Source, StreamOpener, Verdict
from ..errors import IntegrityError, NbiaError, UsageError
from ..models import SeriesInfo, SeriesState
from ..retry import classify
from . import check_endpoint

if TYPE_CHECKING:
    from ..engine.options import DownloadOptions
    from ..manifest import Manifest
    from ..session import Session
    from .index import IdcIndex, IdcSeries

__all__ = ["DEFAULT_ENDPOINT", "IDC_ATTEMPTS", "IdcSource", "RoutedSource", "auto_factory",
           "idc_factory", "open_index", "resolve_for_run", "where_text"]

T = TypeVar("T")

#: IDC's buckets on AWS, anonymous and path-style (``--idc-endpoint`` replaces it).
DEFAULT_ENDPOINT = "https://s3.amazonaws.com"
#: Attempts of a series from IDC before ``auto`` asks the NBIA server for it instead.
IDC_ATTEMPTS = 3
#: Objects of one series fetched at once (S3 is not a 16-connection server).
INFLIGHT = 8
#: Series a metadata batch holds (the index answers all of them at once anyway).
BATCH = 1000


def where_text(series: IdcSeries) -> str:
    """What the journal's ``source`` column and ``list`` say for an IDC series: the
    bucket, the version's folder and the IDC version (``verify --server`` reads it back)."""
    old = "" if series.current else " prior"
    return f"idc s3://{series.bucket}/{series.crdc_series_uuid}/ v{series.version}{old}"


class IdcSource:
    """Series from IDC's buckets (see the module docstring)."""

    def __init__(self, index: IdcIndex, *, endpoint: str = DEFAULT_ENDPOINT,
                 timeout: float = 60.0, verify: bool = True, md5: bool = True,
                 pinned: Mapping[str, IdcSeries] | None = None,
                 inflight: int = INFLIGHT) -> None:
        self.index = index
        self.endpoint = check_endpoint(endpoint)
        self.timeout = timeout
        self.verify = verify
        self.md5 = md5
        self.inflight = inflight
        #: Series a ``.s5cmd`` manifest named by version: fetched as that version.
        self.pinned: dict[str, IdcSeries] = dict(pinned or {})
        self.name = f"IDC ({urlsplit(self.endpoint).hostname})"
        self._found: dict[str, IdcSeries] = {}
        self._lock = threading.Lock()
        self._cache: dict[Hashable, Any] = {}

    # -- what the engine asks ---------------------------------------------------------------
    def check(self) -> None:
        pass  # anonymous: no credential goes anywhere

    def prepare(self) -> None:
        pass

    def lookup(self, uids: Sequence[str]) -> dict[str, IdcSeries]:
        """The index's answer for ``uids`` (pinned versions first), remembered."""
        found = {u: self.pinned[u] for u in uids if u in self.pinned}
        rest = [u for u in uids if u not in found]
        if rest:
            found.update(self.index.by_series_uid(rest))
        # The planner asks once for all: the reader child's memory goes now (a series
        # planned from another journal later starts another).
        self.index.release()
        with self._lock:
            self._found.update(found)
        return found

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        found = self.lookup(uids)
        for start in range(0, len(uids), BATCH):
            part = list(uids[start:start + BATCH])
            yield MetadataBatch(part, {u: found[u].info() for u in part if u in found})

    def series(self, uid: str) -> IdcSeries | None:
        with self._lock:
            return self._found.get(uid)

    def where(self, uid: str) -> str:
        found = self.series(uid)
        return where_text(found) if found is not None else "idc"

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        release = f" (IDC release {self.index.version})" if self.index.version else ""
        return (SeriesState.NO_DATA, f"not in IDC's index{release}; --source nbia or auto "
                "fetches it from the NBIA server")

    def opener(self, info: SeriesInfo) -> StreamOpener:
        from .stream import IdcOpener  # the S3 client only when a series is fetched

        found = self.series(info.series_uid)
        if found is None:  # planned from another journal's metadata: look it up now
            found = self.lookup([info.series_uid]).get(info.series_uid)
            if found is None:
                raise NbiaError(f"series {info.series_uid}: not in IDC's index")
        return IdcOpener(endpoint=self.endpoint, bucket=found.bucket,
                         crdc_series_uuid=found.crdc_series_uuid,
                         series_uid=info.series_uid, instance_count=found.instance_count,
                         timeout=self.timeout, connect_timeout=min(self.timeout, 30.0),
                         verify=self.verify, inflight=self.inflight)

    def open(self, info: SeriesInfo) -> AbstractContextManager[ByteStream]:
        return self.opener(info).open_stream(self._cache)

    def remote(self, info: SeriesInfo, run: Callable[[StreamOpener], T | None]) -> T | None:
        return run(self.opener(info))

    def check_series(self, uid: str, info: SeriesInfo, entries: Sequence[checks.StagedEntry],
                     md5_list: Mapping[str, str] | None, *, md5_required: bool) -> None:
        """NBIA's rules (count, header UIDs, MD5s); an object whose ETag is not a plain
        MD5 (a multipart upload's) is not in the list, and is checked by everything else."""
        if md5_list is not None and len(md5_list) < sum(1 for e in entries if e.is_image):
            checks.check_series(uid, info, entries, None, md5_required=False)
            for entry in entries:
                digest = md5_list.get(os.path.basename(entry.name))
                if digest is not None and digest != entry.md5:
                    raise IntegrityError(
                        f"series {uid}: MD5 mismatch for {os.path.basename(entry.name)} "
                        "(its ETag)")
            return
        checks.check_series(uid, info, entries, md5_list, md5_required=md5_required)

    def verdict(self, error: NbiaError) -> Verdict:
        return classify(error, logged_in=False)

    def close(self) -> None:
        for value in list(self._cache.values()):
            close = getattr(value, "close", None)
            if callable(close):
                close()
        self._cache.clear()


class RoutedSource:
    """``--source auto``: IDC for the series its index holds, NBIA for the rest."""

    def __init__(self, idc: IdcSource, nbia: Callable[[], Source] | None, *,
                 login: bool = False) -> None:
        self.idc = idc
        self._make_nbia = nbia
        self._nbia: Source | None = None
        self._login = login
        self.name = idc.name
        #: uid -> attempts made from IDC (after IDC_ATTEMPTS, NBIA when there is one).
        self._tries: dict[str, int] = {}
        self._route: dict[str, str] = {}
        self._lock = threading.Lock()
        #: Lines the run shows once (a fallback to NBIA).
        self.notes: list[str] = []
        self._bound: tuple[Any, ...] | None = None

    def bind_run(self, *bound: Any) -> None:
        """Handed on to the NBIA source (``NbiaSource.bind_run``: a huge series in
        pieces, engine.pieces), now or when it is built."""
        with self._lock:
            self._bound = bound
            nbia = self._nbia
        if nbia is not None and (bind := getattr(nbia, "bind_run", None)) is not None:
            bind(*bound)

    @property
    def nbia(self) -> Source | None:
        """The NBIA source, built on first use: a run whose series IDC holds all never
        opens a client."""
        with self._lock:
            if self._nbia is None and self._make_nbia is not None:
                self._nbia = self._make_nbia()
                self.name = f"{self.idc.name} and {self._nbia.name}"
                bind = getattr(self._nbia, "bind_run", None)
                if bind is not None and self._bound is not None:
                    bind(*self._bound)
            return self._nbia

    @property
    def client(self) -> Any:
        """The NBIA client, once there is one (the engine's reports read it)."""
        return getattr(self._nbia, "client", None)

    def check(self) -> None:
        if self._login and self.nbia is not None:
            self.nbia.check()

    def prepare(self) -> None:
        # A password was given: log in now, so a refused login stops the run before the
        # first download, as without IDC. Anonymous NBIA needs nothing until used.
        if self._login and self.nbia is not None:
            self.nbia.prepare()

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        found = self.idc.lookup(uids)
        mine = [u for u in uids if u in found]
        rest = [u for u in uids if u not in found]
        for start in range(0, len(mine), BATCH):
            part = mine[start:start + BATCH]
            yield MetadataBatch(part, {u: found[u].info() for u in part})
        if rest:
            nbia = self.nbia
            if nbia is None:
                for start in range(0, len(rest), BATCH):
                    yield MetadataBatch(rest[start:start + BATCH])
                return
            if not self._login:
                nbia.prepare()  # only now: a run IDC serves whole never contacts NBIA
            yield from nbia.metadata_batches(rest)

    def _pick(self, uid: str) -> Source:
        """IDC for a series it holds, until it failed :data:`IDC_ATTEMPTS` times."""
        with self._lock:
            tries = self._tries.get(uid, 0)
            self._tries[uid] = tries + 1
        if self.idc.series(uid) is not None:
            if tries < IDC_ATTEMPTS or self._make_nbia is None:
                self._route[uid] = "idc"
                return self.idc
            if self._route.get(uid) == "idc":
                self.notes.append(f"series {uid}: IDC's copy failed {IDC_ATTEMPTS} times; "
                                  "fetching it from the NBIA server")
        nbia = self.nbia
        if nbia is None:
            self._route[uid] = "idc"
            return self.idc
        self._route[uid] = "nbia"
        return nbia

    def where(self, uid: str) -> str:
        route = self._route.get(uid)
        if route == "nbia" or (route is None and self.idc.series(uid) is None):
            return "nbia"
        return self.idc.where(uid)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        nbia = self.nbia
        if nbia is None:
            return self.idc.unavailable(uid)
        return nbia.unavailable(uid)

    def open(self, info: SeriesInfo) -> AbstractContextManager[ByteStream]:
        return self._pick(info.series_uid).open(info)

    def remote(self, info: SeriesInfo, run: Callable[[StreamOpener], T | None]) -> T | None:
        uid = info.series_uid
        source = self._pick(uid)
        remote = getattr(source, "remote", None)
        result: T | None = remote(info, run) if remote is not None else None
        if result is None:
            # No worker took it: the engine opens it here next (open()), the same
            # attempt, which must not count twice towards IDC_ATTEMPTS.
            with self._lock:
                self._tries[uid] -= 1
        return result

    def check_series(self, uid: str, info: SeriesInfo, entries: Sequence[checks.StagedEntry],
                     md5_list: Mapping[str, str] | None, *, md5_required: bool) -> None:
        if self._route.get(uid) == "idc":
            self.idc.check_series(uid, info, entries, md5_list, md5_required=md5_required)
        else:
            check = getattr(self._nbia, "check_series", checks.check_series)
            check(uid, info, entries, md5_list, md5_required=md5_required)

    def verdict(self, error: NbiaError) -> Verdict:
        nbia = self._nbia
        if nbia is not None:
            return nbia.verdict(error)
        return self.idc.verdict(error)

    def close(self) -> None:
        self.idc.close()
        if self._nbia is not None:
            self._nbia.close()


_SAID: set[str] = set()
#: Indexes opened by this process, by folder and its files' sizes and times: opening one
#: checks its columns in a child process (0.1 to 0.2 s), and a run opens it twice (the
#: ``.s5cmd`` resolution, then the source).
_OPENED: dict[tuple[str, tuple[tuple[str, int, int], ...]], IdcIndex] = {}


def _index_key(folder: Path | None) -> tuple[str, tuple[tuple[str, int, int], ...]] | None:
    if folder is None:
        return ("<installed>", ())
    try:
        stamps = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                              for e in os.scandir(folder) if e.name.endswith(".parquet")))
    except OSError:
        return None
    return (str(folder.resolve()), stamps)


def open_index(options: DownloadOptions, *, required: bool) -> IdcIndex | None:
    """The IDC index the options name (``--idc-index``, then ``NBIA_IDC_INDEX``, then the
    installed idc-index-data); None, said once per process, when ``auto`` has none."""
    from .index import IdcIndex, IndexUnavailable  # duckdb's reader only when opened

    folder = options.idc_index or os.environ.get("NBIA_IDC_INDEX") or None
    try:
        key = _index_key(Path(folder) if folder else None)
        index = _OPENED.get(key) if key is not None else None
        if index is None:
            index = IdcIndex.open(Path(folder) if folder else None)
            if key is not None:
                _OPENED[key] = index
        return index
    except (IndexUnavailable, ImportError) as exc:
        if required:
            raise UsageError(f"--source idc needs IDC's index: {exc}") from None
        text = str(exc)
        if text not in _SAID:
            _SAID.add(text)
            import sys  # (a rare path)

            print(f"note: no IDC index ({text}): every series comes from the NBIA server "
                  "(pip install 'nbia-retriever[idc]' or --idc-index DIR)", file=sys.stderr)
        return None


def _endpoint(options: DownloadOptions) -> str:
    return options.idc_endpoint or os.environ.get("NBIA_IDC_ENDPOINT") or DEFAULT_ENDPOINT


def idc_factory(session: Session, options: DownloadOptions) -> Source:
    """``--source idc``: every series from IDC; one IDC lacks fails and says so."""
    index = open_index(options, required=True)
    assert index is not None
    return IdcSource(index, endpoint=_endpoint(options), timeout=options.timeout,
                     verify=options.verify_tls, md5=options.md5,
                     pinned=options.idc_pinned)


def auto_factory(session: Session, options: DownloadOptions) -> Source:
    """``--source auto``: IDC where its index has the series, else NBIA."""
    from ..engine.source import source_factory  # (engine.source names this module lazily)

    nbia_factory = source_factory("nbia")
    index = open_index(options, required=False)
    if index is None:
        return nbia_factory(session, options)
    idc = IdcSource(index, endpoint=_endpoint(options), timeout=options.timeout,
                    verify=options.verify_tls, md5=options.md5, pinned=options.idc_pinned)
    return RoutedSource(idc, lambda: nbia_factory(session, options),
                        login=options.credentials is not None)


def resolve_for_run(manifest: Manifest, options: DownloadOptions,
                    ) -> tuple[Manifest, DownloadOptions, list[str]]:
    """An ``.s5cmd`` manifest names IDC objects by ``crdc_series_uuid``: find each
    version in the index, so the run downloads SeriesInstanceUIDs like any other (the
    journal, the tree and ``verify`` know no other key) and fetches exactly the versions
    named. Such a manifest names no NBIA server: ``auto`` becomes ``idc``. Returns the
    manifest with its UIDs, the options, and one line per manifest line left out."""
    # only for an .s5cmd manifest
    import dataclasses

    from ..errors import ManifestError  # (as above)
    from .index import resolve_manifest

    index = open_index(options, required=True)
    assert index is not None
    resolved = resolve_manifest(manifest, index)
    index.release()  # every series is pinned: the run asks the index nothing more
    where = manifest.source or "the manifest"
    notes = [f"{where}: {line}" for line in getattr(manifest, "skipped", ())]
    notes += [f"{where}: s3://.../{uuid}/ is not in IDC's index; left out"
              for uuid in resolved.unknown]
    if not resolved.uids:
        raise ManifestError(f"none of its {len(manifest.crdc_uuids)} IDC series is in IDC's "
                            "index (a newer idc-index-data, or --idc-index DIR?)",
                            source=manifest.source)
    source = "idc" if options.source == "auto" else options.source
    return (dataclasses.replace(manifest, series_uids=tuple(resolved.uids)),
            dataclasses.replace(options, source=source, idc_pinned=resolved.pinned), notes)


def idc_series_for(uids: Sequence[str], options: DownloadOptions) -> dict[str, IdcSeries]:
    """The series of ``uids`` a run with ``options`` would fetch from IDC (``list``
    shows them as such, with the index's metadata, and asks NBIA about the rest only):
    all that the index holds under ``auto`` and ``idc``, none under ``nbia`` (or
    without an index under ``auto``). Pinned versions (``.s5cmd``) come first."""
    if options.source not in ("auto", "idc"):
        return {}
    index = open_index(options, required=options.source == "idc")
    if index is None:
        return {}
    pinned = dict(options.idc_pinned or {})
    found = {u: pinned[u] for u in uids if u in pinned}
    rest = [u for u in uids if u not in found]
    if rest:
        found.update(index.by_series_uid(rest))
        index.release()
    return found
