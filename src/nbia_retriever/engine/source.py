"""Where series come from: the :class:`Source` protocol and the NBIA server behind it.

The engine asks a source three things: metadata for a list of series (in batches, in
order), a byte stream of one series' zip, and, when an attempt failed, a
:class:`Verdict`: retry or not, in which final state, whether the server asked to slow
down, whether the whole run must stop. Everything HTTP stays behind this seam; the
engine imports no HTTP library and knows no status code. A source that reads zips from
a folder, or from a mirror, fits without touching the rest (the tests have one).

:class:`NbiaSource` is the NBIA server, through :class:`~nbia_retriever.api.NbiaClient`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from ..api import ApiMismatch, MetadataBatch, NbiaClient, SeriesRequest, StaleToken
from ..errors import (
    ApiError,
    AuthError,
    NbiaError,
    NetworkError,
    NotPublicError,
    TlsError,
    UntrustedHostError,
)
from ..models import SeriesInfo, SeriesState

__all__ = ["ByteStream", "MetadataBatch", "NbiaSource", "RemoteSource", "Source", "Verdict"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a failed attempt.

    ``retry``: try again (after a backoff of at least ``retry_after``); otherwise the
    series ends in ``state``. ``throttle``: the server asked clients to slow down.
    ``timeout``: the attempt timed out or stalled. ``fatal``: stop the whole run
    (a certificate that cannot be verified, a login that cannot work).
    """

    retry: bool
    state: SeriesState = SeriesState.ERROR
    retry_after: float | None = None
    throttle: bool = False
    timeout: bool = False
    fatal: bool = False


@runtime_checkable
class ByteStream(Protocol):
    """An open series zip."""

    @property
    def bytes_received(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...

    def abort(self) -> None:
        """Called from another thread on cancel: make a blocked :meth:`chunks` end."""


class Source(Protocol):
    """Everything the engine needs from where series come from."""

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
class RemoteSource(Protocol):
    """A source whose streams a worker process can open itself (see
    :mod:`~nbia_retriever.engine.procs`): it hands out a picklable request."""

    def remote(self, info: SeriesInfo, run: Callable[[SeriesRequest], T | None]) -> T | None:
        """``run(request)`` for ``info``'s stream, again at once when the failure says a
        fresh request works (a stale token); None when this series must be streamed
        in-process (``run`` returned None, or no request can be handed out yet)."""


class NbiaSource:
    """Series from an NBIA server (any build: see :mod:`nbia_retriever.api.client`)."""

    def __init__(self, client: NbiaClient, *, md5: bool = True, metadata_workers: int = 8,
                 own_client: bool = True) -> None:
        self.client = client
        self.md5 = md5
        self.metadata_workers = metadata_workers
        self._own = own_client
        self.name = client.api_url

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
        with self.client.open_series(info.series_uid, md5=self.md5) as stream:
            yield stream

    def remote(self, info: SeriesInfo, run: Callable[[SeriesRequest], T | None]) -> T | None:
        retry_401 = True
        while True:
            request = self.client.series_request(info.series_uid, md5=self.md5,
                                                 retry_401=retry_401)
            if request is None:
                return None
            try:
                return run(request)
            except (StaleToken, ApiMismatch) as exc:
                if isinstance(exc, StaleToken):
                    retry_401 = False  # a second 401 is "not authorised", as in open()
                if not self.client.series_answer_failed(request, exc):
                    raise

    def verdict(self, error: NbiaError) -> Verdict:
        if isinstance(error, TlsError | UntrustedHostError):
            return Verdict(retry=False, fatal=True)
        if isinstance(error, NotPublicError):
            return Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)
        if isinstance(error, AuthError):
            # Logged in: the token went stale under us, worth another attempt. Not
            # logged in: the series needs a login.
            if self.client.logged_in:
                return Verdict(retry=True)
            return Verdict(retry=False, state=SeriesState.NOT_AUTHORIZED)
        if isinstance(error, NetworkError):
            return Verdict(retry=True, timeout=error.timeout)
        if isinstance(error, ApiError):
            status = error.status
            if status in (429, 503):
                return Verdict(retry=True, retry_after=error.retry_after, throttle=True)
            if status is not None and 400 <= status < 500:
                return Verdict(retry=False)
            return Verdict(retry=True, retry_after=error.retry_after)
        return Verdict(retry=True)

    def close(self) -> None:
        if self._own:
            self.client.close()
