"""Where series come from: the :class:`Source` protocol and the NBIA server behind it.

The engine asks a source three things: metadata for a list of series (in batches, in
order), a byte stream of one series' zip, and, when an attempt failed, a
:class:`Verdict`: retry or not, in which final state, whether the server asked to slow
down, whether the whole run must stop. Everything HTTP stays behind this seam; the
engine imports no HTTP library and knows no status code. A source that reads zips from
a folder, or from a mirror, fits without touching the rest (the tests have one).

:class:`NbiaSource` is the NBIA server, through :class:`~nbia_retriever.api.NbiaClient`.
A series above :data:`~.pieces.PIECES_ABOVE` on a server with v4's per-image endpoints
is fetched as images, several at once (:mod:`.pieces`), once the engine has bound the
source to the run (:meth:`NbiaSource.bind_run`: where to keep the images, the run's
connection budget); without them, or on any other server, one zip stream as always.

The registry (:data:`SOURCES`, :func:`register_source`) maps a source's name
(``DownloadOptions.source``) to the function that builds it from the run's
:class:`~nbia_retriever.session.Session` and options. Adding a source is one module (a
class with the :class:`Source` methods, and, to run in worker processes, a
:meth:`RemoteSource.remote` handing out a picklable :class:`StreamOpener`) plus one line
here, or one :func:`register_source` call from the code that ships it.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from ..api import (
    ApiMismatch,
    MetadataBatch,
    NbiaClient,
    SeriesRequest,
    StaleToken,
    Transport,
    open_series_request,
)
from ..errors import NbiaError, UsageError
from ..models import SeriesInfo, SeriesState
from ..retry import Verdict, classify
from .pieces import MOST_PIECES, PIECES_ABOVE, PIECES_FAST, ConnectionBudget, PiecesStream
from .staging import series_folder_name

if TYPE_CHECKING:
    from ..idc.stream import Fetchers
    from ..session import Session
    from .options import DownloadOptions

__all__ = ["SOURCES", "ByteStream", "MetadataBatch", "NbiaOpener", "NbiaSource",
           "RemoteSource", "Source", "SourceFactory", "StreamOpener", "Verdict", "make_source",
           "register_source", "source_factory", "takes_files"]

T = TypeVar("T")


@runtime_checkable
class ByteStream(Protocol):
    """An open series zip."""

    @property
    def bytes_received(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...

    def abort(self) -> None:
        """Called from another thread on cancel: make a blocked :meth:`chunks` end."""


class Source(Protocol):
    """Everything the engine needs from where series come from.

    Optional: ``check_series(uid, info, entries, md5_list, *, md5_required)``, what a
    staged series must satisfy to be published, when the source's rules differ from
    :func:`~.checks.check_series` (NBIA's, used otherwise); and :meth:`RemoteSource.remote`,
    to stream in worker processes.
    """

    #: For messages ("nbia.example.org").
    name: str

    def check(self) -> None:
        """Refuse at once (no I/O) what cannot work: credentials for an untrusted host."""

    def prepare(self) -> None:
        """Log in, or anything else that must fail before the first download."""

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        """Metadata of ``uids`` in batches, in order, each as soon as it is in."""

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        """State and reason for a series the source has no metadata for."""

    def open(self, info: SeriesInfo) -> AbstractContextManager[ByteStream]:
        """The zip stream of one series."""

    def verdict(self, error: NbiaError) -> Verdict:
        """What a failure of :meth:`open` or of the stream means."""

    def close(self) -> None:
        """Release connections."""


@runtime_checkable
class StreamOpener(Protocol):
    """One series' stream as a worker process opens it: picklable (it crosses a socket
    to the worker), so its class must live in an importable module, and it holds no
    more secrets than the one stream needs."""

    @property
    def what(self) -> str:
        """For messages ("series 1.2.3")."""

    def secrets(self) -> tuple[str, ...]:
        """Credentials it carries: the worker's redaction learns them (an error page
        that echoes one is cut there, before it crosses back)."""

    def open_stream(self, cache: dict[Hashable, Any]) -> AbstractContextManager[ByteStream]:
        """Open the stream in the worker. ``cache`` lives as long as the worker (its
        keep-alive connections, keyed as the source likes)."""


@runtime_checkable
class RemoteSource(Protocol):
    """A source whose streams a worker process can open itself (see
    :mod:`~nbia_retriever.engine.procs`): it hands out a :class:`StreamOpener`."""

    def remote(self, info: SeriesInfo, run: Callable[[StreamOpener], T | None]) -> T | None:
        """``run(opener)`` for ``info``'s stream, again at once when the failure says a
        fresh opener works (a stale token); None when this series must be streamed
        in-process (``run`` returned None, or no opener can be handed out yet)."""


@dataclass(frozen=True, slots=True)
class NbiaOpener:
    """An NBIA series request, opened in a worker on that worker's keep-alive
    connections (one :class:`~nbia_retriever.api.Transport` per timeout/TLS setting)."""

    request: SeriesRequest

    @property
    def what(self) -> str:
        return self.request.what

    def secrets(self) -> tuple[str, ...]:
        found: list[str] = []
        for name, value in self.request.headers:
            if name.lower() == "authorization":
                found += [value, value.partition(" ")[2]]
        return tuple(found)

    def open_stream(self, cache: dict[Hashable, Any]) -> AbstractContextManager[ByteStream]:
        request = self.request
        key = ("nbia", request.timeout, request.connect_timeout, request.verify)
        transport = cache.get(key)
        if transport is None:
            transport = cache.setdefault(key, Transport(
                timeout=request.timeout, connect_timeout=request.connect_timeout,
                verify=request.verify))
        return open_series_request(transport, request)


class NbiaSource:
    """Series from an NBIA server (any build: see :mod:`nbia_retriever.api.client`)."""

    def __init__(self, client: NbiaClient, *, md5: bool = True, metadata_workers: int = 8,
                 own_client: bool = True, pieces_above: int | None = PIECES_ABOVE,
                 most_pieces: int = MOST_PIECES, annotations: bool = False,
                 pieces_fast: float | None = PIECES_FAST) -> None:
        self.client = client
        self.md5 = md5
        #: Ask for annotation files (getDCMImage, one zip) for series whose metadata says
        #: they have some (an Annotation Size above 0, or v4's flag); the rest as before.
        self.annotations = annotations
        self.metadata_workers = metadata_workers
        self._own = own_client
        self.name = client.api_url
        #: Series above this many bytes go in pieces (None: never); see :mod:`.pieces`.
        self.pieces_above = pieces_above
        self.most_pieces = most_pieces
        #: The first series for pieces probes the link with one image (see
        #: :data:`~.pieces.PIECES_FAST`); None: no probe, every such series in pieces.
        self.pieces_fast = pieces_fast
        #: What the probe measured (bytes per second), once it ran.
        self.probed_rate: float | None = None
        self._spool: Path | None = None
        self._budget: ConnectionBudget | None = None
        self._pieces_ok = True  # False once the server showed it has no per-image API
        self._pieces_proven = False  # True once it listed a series' images
        self._fetchers: Fetchers | None = None
        self._fetchers_lock = threading.Lock()
        #: Series streamed in pieces, and the images reused from an earlier attempt.
        self.pieces_series = 0
        self.pieces_reused = 0

    def bind_run(self, spool: Path, budget: ConnectionBudget | None) -> None:
        """Where a series' images are kept while it is in pieces (the root's
        ``.nbia/pieces/``, see :mod:`.pieces`) and the run's connection budget. Unbound,
        no series goes in pieces."""
        self._spool = spool
        self._budget = budget

    def _in_pieces(self, info: SeriesInfo) -> bool:
        """Worth fetching in pieces, here: big enough, MD5s wanted (each image is checked
        against its own), and the anonymous v4 API (the per-image MD5 is v4 only)."""
        return (self._spool is not None and self._pieces_ok and self.md5
                and self.pieces_above is not None and info.file_size is not None
                and info.file_size > self.pieces_above and not self.client.logged_in
                and self.client.version() == "v4")

    def _open_pieces(self, info: SeriesInfo) -> PiecesStream | None:
        """The series as a :class:`PiecesStream`, or None: one zip stream instead (the
        server lists no images, or has no such endpoint: then never again this run)."""
        if self._pieces_proven:
            sops = self.client.sop_instance_uids(info.series_uid)
        else:  # one series asks first: a build without the endpoint answers one 404
            with self._fetchers_lock:
                if not self._pieces_ok:
                    return None
                try:
                    sops = self.client.sop_instance_uids(info.series_uid)
                except ApiMismatch:
                    self._pieces_ok = False
                    return None
                if sops and self.pieces_fast is not None:
                    self.probed_rate = self._probe(info.series_uid, sops[0])
                    if self.probed_rate >= self.pieces_fast:
                        self._pieces_ok = False  # one stream keeps up: this whole run
                        return None
                self._pieces_proven = True
        if not sops:
            return None
        from ..idc.stream import Fetchers  # the fetcher threads IDC uses, first use only

        with self._fetchers_lock:
            if self._fetchers is None:
                self._fetchers = Fetchers(self.client.transport)
            fetchers = self._fetchers
        assert self._spool is not None
        self.pieces_series += 1
        return PiecesStream(self.client, fetchers, info.series_uid, sops,
                            self._spool / (series_folder_name(info.series_uid) + ".pieces"),
                            budget=self._budget, most=self.most_pieces)

    def _probe(self, uid: str, sop: str) -> float:
        """One image fetched alone, in bytes per second (its request's round trip
        included: what a piece costs). A failure is "slow" (pieces then retry it)."""
        start = time.monotonic()
        size = 0
        try:
            with self.client.open_image(uid, sop) as response:
                for chunk in response.chunks():
                    size += len(chunk)
        except NbiaError:
            return 0.0
        return size / max(time.monotonic() - start, 1e-6)

    def check(self) -> None:
        if self.client.tokens is not None:
            self.client.tokens.check_host()

    def prepare(self) -> None:
        self.check()
        self.client.login()

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        return self.client.metadata_batches(uids, workers=self.metadata_workers)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        if self.client.logged_in:
            return SeriesState.NO_DATA, "the server returned no metadata for this series"
        return (SeriesState.NOT_AUTHORIZED,
                "not public or unknown (it may belong to a limited-access collection: log in)")

    @contextlib.contextmanager
    def open(self, info: SeriesInfo) -> Iterator[ByteStream]:
        notes = self._notes(info)
        pieces = self._open_pieces(info) if self._in_pieces(info) and not notes else None
        if pieces is not None:
            try:
                yield pieces
            finally:
                pieces.close()
                self.pieces_reused += pieces.reused
            return
        with self.client.open_series(info.series_uid, md5=self.md5,
                                     annotations=notes) as stream:
            yield stream

    def _notes(self, info: SeriesInfo) -> bool:
        """This series' zip is to carry its annotation files."""
        return self.annotations and (info.annotation_size or 0) > 0

    def remote(self, info: SeriesInfo, run: Callable[[StreamOpener], T | None]) -> T | None:
        if self._in_pieces(info) and not self._notes(info):
            return None  # its images are fetched by threads of this process
        retry_401 = True
        while True:
            request = self.client.series_request(info.series_uid, md5=self.md5,
                                                 retry_401=retry_401,
                                                 annotations=self._notes(info))
            if request is None:
                return None
            try:
                return run(NbiaOpener(request))
            except (StaleToken, ApiMismatch) as exc:
                if isinstance(exc, StaleToken):
                    retry_401 = False  # a second 401 is "not authorised", as in open()
                if not self.client.series_answer_failed(request, exc):
                    raise

    def verdict(self, error: NbiaError) -> Verdict:
        """The one retry table (:func:`~nbia_retriever.retry.classify`); logged in, a
        401 is a token gone stale under us, worth another attempt."""
        return classify(error, logged_in=self.client.logged_in)

    def close(self) -> None:
        if self._fetchers is not None and self._own:
            self._fetchers.close()  # its threads, then the client's connections
        if self._own:
            self.client.close()


#: Builds a source from the run's session and options.
SourceFactory = Callable[["Session", "DownloadOptions"], Source]


#: Overrides :data:`~.pieces.PIECES_ABOVE` for a run: a size in bytes, or ``off`` (every
#: series one zip stream, as before; the benchmarks compare the two this way).
PIECES_ENV = "NBIA_PIECES_ABOVE"


def pieces_above_from_env(default: int | None = PIECES_ABOVE) -> int | None:
    """:data:`PIECES_ENV`'s value; unset or not a size: ``default``."""
    text = os.environ.get(PIECES_ENV, "").strip().lower()
    if text in ("off", "no", "never"):
        return None
    return int(text) if text.isdigit() else default


def takes_files(bind: Callable[..., object]) -> bool:
    """``bind_run`` accepts the ``files=`` spool (a ``files`` parameter, or ``**kw``):
    the engine, and :class:`~.route.WithFiles` for the source it wraps, pass it only
    then, so a source that predates file items keeps its two-argument ``bind_run``."""
    try:
        parameters = inspect.signature(bind).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "files" or p.kind is p.VAR_KEYWORD for p in parameters)


def _nbia(session: Session, options: DownloadOptions) -> Source:
    # A threshold the user set (NBIA_PIECES_ABOVE=N) is obeyed as set: no probe.
    explicit = os.environ.get(PIECES_ENV, "").strip().isdigit()
    return NbiaSource(session.open_client(), md5=options.md5,
                      metadata_workers=max(4, min(16, options.streams_cap)),
                      pieces_above=pieces_above_from_env(),
                      pieces_fast=None if explicit else PIECES_FAST,
                      most_pieces=max(MOST_PIECES, options.streams_cap),
                      annotations=options.annotations == "yes")  # the engine resolved it


#: Every source by name (``DownloadOptions.source``). One line per source: a factory, or
#: ``"module:function"`` naming one, imported when a run uses it (IDC's duckdb and S3
#: client only for IDC runs; and the source's module may import this one).
SOURCES: dict[str, SourceFactory | str] = {
    "nbia": _nbia,
    "idc": "nbia_retriever.idc.source:idc_factory",
    "auto": "nbia_retriever.idc.source:auto_factory",
}


def register_source(name: str, factory: SourceFactory | str) -> None:
    """Add (or replace) the source called ``name``: how a package that ships a source
    makes it known without editing this file."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a source needs a name, not {name!r}")
    SOURCES[name] = factory


def source_factory(name: str) -> SourceFactory:
    """The registry entry of ``name``; an unknown name is a :class:`UsageError`."""
    factory = SOURCES.get(name)
    if factory is None:
        raise UsageError(f"unknown source {name!r}; known: {', '.join(sorted(SOURCES))}")
    if isinstance(factory, str):
        import importlib  # a lazy entry (see SOURCES): its module on first use

        module, _, function = factory.partition(":")
        loaded: SourceFactory = getattr(importlib.import_module(module), function)
        SOURCES[name] = factory = loaded
    return factory


def make_source(name: str, session: Session, options: DownloadOptions) -> Source:
    """The source ``name`` for one run; an unknown name is a :class:`UsageError`."""
    return source_factory(name)(session, options)
