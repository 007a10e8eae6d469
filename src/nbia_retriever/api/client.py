"""The NBIA REST client: metadata, queries, series streams, MD5 checks, across builds.

One :class:`NbiaClient` talks to one server and is shared by every thread. It knows the
server builds in the field (reference section 8) and takes the way each one allows:

* **API version**: ``auto`` probes v4 once and falls back to v1 on a server without it;
  a login selects v2 (the authenticated API).
* **Metadata**: v4 batch POSTs of up to 10,000 series (CSV whose column names changed
  three times in 2025: every name goes through one alias table), or concurrent v1/v2
  per-series calls. :meth:`metadata_batches` yields them in manifest order, as they
  arrive, so a download can start before the last batch is in.
* **Images with MD5s**: v4 ``getImage?IncludeMD5=yes``; builds of mid-2025 reject that
  parameter with 400 "Invalid query parameter", which is an API mismatch (never "not
  authorised"): the client moves on to v4 ``getImageWithMD5Hash``, then v2/v1, once for
  the whole run.
* **Statuses**: 400 "not in public domain", 460 "login needed" and 462 "insufficient
  privilege" are final (:class:`NotPublicError`); 429/5xx carry ``retry_after``.

Secrets policy: the password and tokens live only in memory, are sent in request bodies
and the ``Authorization`` header (never in URLs), only to hosts the
:class:`~nbia_retriever.api.auth.HostPolicy` allows, and no error message quotes them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    ApiError,
    AuthError,
    NbiaError,
    NetworkError,
    NotPublicError,
    TlsError,
    UsageError,
)
from ..errors import ApiMismatch as ApiMismatch  # re-export
from ..errors import StaleToken as StaleToken  # re-export
from ..manifest import is_valid_uid
from ..models import SeriesInfo, normalise_records
from ..retry import RetryPolicy, classify
from ..untrusted import quote
from .auth import Credentials, HostPolicy, TokenManager, token_url_for
from .http import Answer, SeriesStream, Transport
from .records import first_of, infos_by_uid, records, series_infos

#: The public TCIA API (no version suffix).
DEFAULT_API_URL = "https://services.cancerimagingarchive.net/nbia-api/services"
API_VERSIONS = ("auto", "v1", "v2", "v4")
#: Series per v4 batch metadata POST (what the Java retriever and tcia_utils send at most).
V4_BATCH = 10_000
#: v1/v2 series whose metadata is requested before a batch is handed out.
V1_BATCH = 64


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        from email.utils import parsedate_to_datetime  # 6 ms: only for a Retry-After that is a date

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def error_excerpt(text: str, limit: int = 200) -> str:
    """A short, single-line, secret-free excerpt of an error body (HTML -> a hint)."""
    head = text[:500].lower()
    if "<html" in head or "<!doctype html" in head:
        return "(an HTML page)"
    return quote(text, limit)


_MISMATCH = ("invalid query parameter", "unrecognized query parameter",
             "unknown query parameter")


def check_status(status: int, text: str, headers: Mapping[str, str] | Callable[[str], Any],
                 what: str, *, endpoint_missing_is_mismatch: bool = False) -> None:
    """Turn a non-2xx answer into the right :class:`ApiError` subclass (see module doc)."""
    if status < 400:
        return
    detail = error_excerpt(text)
    message = f"{what}: HTTP {status}" + (f" {detail}" if detail else "")
    lowered = text.lower()
    get = headers if callable(headers) else headers.get
    if status == 400 and any(m in lowered for m in _MISMATCH):
        raise ApiMismatch(message, status=status)
    if status == 400:
        raise NotPublicError(message, status=status)
    if status in (404, 405, 501) and endpoint_missing_is_mismatch:
        raise ApiMismatch(message, status=status)
    if status in (401, 403):
        raise AuthError(f"{what}: HTTP {status} (not authorised; check the login)")
    if status == 460:
        raise NotPublicError(f"{what}: login needed (HTTP 460): the series belongs to a "
                             "limited-access collection; log in", status=status)
    if status == 462:
        raise NotPublicError(f"{what}: insufficient privilege (HTTP 462): this login has no "
                             "access to the series", status=status)
    raise ApiError(message, status=status, retry_after=parse_retry_after(get("retry-after")))


@dataclass
class MetadataBatch:
    """The answer for one batch of series, in manifest order.

    ``infos``: series the server described; ``errors``: series whose metadata request
    kept failing (uid -> message); every other UID of ``uids`` is unknown or not
    accessible to this login.
    """

    uids: list[str]
    infos: dict[str, SeriesInfo] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _ImageWay:
    version: str
    endpoint: str
    params: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        extra = "".join(f"&{k}={v}" for k, v in self.params)
        return f"{self.version}/{self.endpoint}{'?' + extra[1:] if extra else ''}"


@dataclass(frozen=True)
class SeriesRequest:
    """One series' image request, complete and picklable: what a worker process needs
    to open the stream on its own connection (see :func:`open_series_request`)."""

    uid: str
    url: str
    params: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    what: str
    way: _ImageWay
    timeout: float
    connect_timeout: float
    verify: bool
    #: a 401 means "refresh the token and retry" rather than "not authorised"
    stale_401: bool = False

    def __repr__(self) -> str:  # the Authorization header never reaches a log
        return f"SeriesRequest({self.what}, {self.way})"


def check_series_answer(stream: SeriesStream, what: str, *, stale_401: bool = False) -> None:
    """Raise what a series answer that is not a zip means (status, then content type)."""
    if stream.status == 401 and stale_401:
        stream.read_text()
        raise StaleToken(f"{what}: HTTP 401 (the token went stale)")
    if stream.status >= 400:
        text = stream.read_text()
        check_status(stream.status, text, stream.header, what,
                     endpoint_missing_is_mismatch=True)
    ctype = stream.content_type
    if ctype.startswith(("text/html", "application/json")):
        raise ApiError(f"{what}: the server sent {ctype.split(';')[0]} instead of "
                       "a zip", status=stream.status)


@contextlib.contextmanager
def open_series_request(transport: Transport, request: SeriesRequest) -> Iterator[SeriesStream]:
    """Open the stream ``request`` describes on ``transport`` (a worker process's)."""
    with transport.open("GET", request.url, params=dict(request.params),
                        headers=dict(request.headers), what=request.what) as stream:
        check_series_answer(stream, request.what, stale_401=request.stale_401)
        yield stream


class NbiaClient:
    """Talks to one NBIA server. Thread-safe; share one instance between workers.

    ``api_url`` is the services root without a version, e.g.
    ``https://services.cancerimagingarchive.net/nbia-api/services``. ``version`` is
    ``auto`` (v2 when logged in, else v4 falling back to v1 when the server has no v4),
    or one of ``v1``, ``v2``, ``v4``. ``policy`` decides where credentials may go;
    without one only TCIA hosts and loopback are trusted.
    """

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        *,
        version: str = "auto",
        credentials: Credentials | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 30.0,
        verify: bool = True,
        metadata_retries: int = 4,
        backoff_base: float = 1.0,
        policy: HostPolicy | None = None,
    ) -> None:
        if version not in API_VERSIONS:
            raise UsageError(f"unknown API version {version!r}; use one of {API_VERSIONS}")
        if version == "v2" and credentials is None:
            credentials = Credentials("nbia_guest", "")
        self.api_url = api_url.rstrip("/")
        self._version: str | None = None if version == "auto" else version
        if version == "auto" and credentials is not None:
            self._version = "v2"
        self._version_lock = threading.Lock()
        self.transport = Transport(timeout=timeout, connect_timeout=connect_timeout,
                                   verify=verify)
        # Whoever builds a client with a URL chose that server; the engine passes a policy
        # of its own, where a URL that only a manifest names is not a choice.
        self.policy = policy if policy is not None else HostPolicy(chosen=[self.api_url])
        self.tokens = (
            TokenManager(self.transport, token_url_for(self.api_url), credentials,
                         policy=self.policy)
            if credentials is not None else None
        )
        self.retry = RetryPolicy(total=metadata_retries, backoff_base=backoff_base)
        self._ways: list[_ImageWay] | None = None
        self._ways_md5: bool | None = None
        #: getDCMImage's ways (series with annotation files), by ``md5``.
        self._dcm_ways: dict[bool, list[_ImageWay]] = {}
        self._way_lock = threading.Lock()
        self._ways_ok: set[_ImageWay] = set()
        self._probe_lock = threading.Lock()

    def __enter__(self) -> NbiaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    # -- plumbing ---------------------------------------------------------------------
    @property
    def logged_in(self) -> bool:
        return self.tokens is not None

    def login(self) -> None:
        """Fetch the token now, so a bad password (or an untrusted host) fails before
        any download starts."""
        if self.tokens is not None:
            self.tokens.authorization()

    def version(self) -> str:
        """The API version in use, probing the server once in ``auto`` mode."""
        with self._version_lock:
            if self._version is None:
                self._version = self._probe_version()
            return self._version

    def _probe_version(self) -> str:
        """v4 if the server has it; v1 on a definite "no such endpoint". A busy or
        unreachable server is retried like any call, never mistaken for an answer."""
        policy = self.retry
        while True:
            try:
                answer = self.transport.call("POST", f"{self.api_url}/v4/getSeriesMetadata",
                                           data={"list": ""}, what="API version probe",
                                           limit=1 << 20)
                status = answer.status
                if status in (404, 405, 501):
                    return "v1"
                if status < 500 and status != 429:
                    return "v4"
                error = ApiError(f"HTTP {status}", status=status,
                                 retry_after=parse_retry_after(answer.header("retry-after")))
            except ApiError as exc:
                error = exc
            verdict = classify(error)
            if verdict.fatal:  # a certificate that cannot be verified
                raise error
            policy = policy.increment(str(error))
            if not verdict.retry or policy.exhausted:
                raise NetworkError(f"cannot reach {self.api_url}: {error}")
            time.sleep(policy.backoff(error.retry_after))

    def _url(self, endpoint: str, version: str | None = None) -> str:
        return f"{self.api_url}/{version or self.version()}/{endpoint}"

    def _headers(self) -> dict[str, str]:
        if self.tokens is None:
            return {}
        return {"Authorization": self.tokens.authorization()}

    def call(self, method: str, endpoint: str, *, what: str,
             params: Mapping[str, str] | None = None, data: Mapping[str, str] | None = None,
             version: str | None = None, mismatch: bool = False) -> Answer:
        """One API call with retries on network errors, 429 and 5xx, and a 401 refresh."""
        url = self._url(endpoint, version)
        policy = self.retry
        refreshed = 0
        while True:
            headers = self._headers() if (version or self.version()) != "v4" else {}
            try:
                answer = self.transport.call(method, url, params=params, data=data,
                                           headers=headers, what=what)
                if answer.status == 401 and self.tokens is not None and refreshed < 2:
                    refreshed += 1
                    self.tokens.invalidate(headers.get("Authorization"))
                    continue
                check_status(answer.status, answer.text, answer.headers, what,
                             endpoint_missing_is_mismatch=mismatch)
                return answer
            except ApiError as exc:
                # logged_in=False: a 401 was refreshed above; an AuthError here is final.
                if not classify(exc).retry:
                    raise
                policy = policy.increment(str(exc))
                if policy.exhausted:
                    raise
                delay = policy.backoff(exc.retry_after)
            time.sleep(delay)

    # -- metadata ---------------------------------------------------------------------
    def metadata_batches(self, uids: Sequence[str], *, workers: int = 8,
                         batch: int | None = None) -> Iterator[MetadataBatch]:
        """Metadata of ``uids`` in batches, in order, each as soon as it is complete.

        v4: one POST per :data:`V4_BATCH` series. v1/v2: per-series calls run
        concurrently on the shared pool; a series whose call keeps failing (after
        retries) is recorded in the batch's ``errors``: one broken series must not stop
        a 19,000-series download. Login and TLS failures stop the iteration.
        """
        if not uids:
            return
        if self.version() == "v4":
            size = batch or V4_BATCH
            for start in range(0, len(uids), size):
                part = list(uids[start:start + size])
                yield MetadataBatch(part, self._v4_metadata(part))
            return
        size = batch or V1_BATCH
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uids))),
                                thread_name_prefix="nbia-metadata") as pool:
            for start in range(0, len(uids), size):
                part = list(uids[start:start + size])
                result = MetadataBatch(part)
                for uid, info, error in pool.map(self._v1_one, part):
                    if info is not None:
                        result.infos[uid] = info
                    elif error:
                        result.errors[uid] = error
                yield result

    def series_metadata(self, uids: Sequence[str], *, workers: int = 8,
                        on_progress: Callable[[int], None] | None = None,
                        errors: dict[str, str] | None = None) -> dict[str, SeriesInfo]:
        """Metadata of every series the server will describe; absent UIDs are left out."""
        found: dict[str, SeriesInfo] = {}
        for result in self.metadata_batches(uids, workers=workers):
            found.update(result.infos)
            if result.errors:
                if errors is None:
                    raise ApiError(next(iter(result.errors.values())))
                errors.update(result.errors)
            if on_progress:
                on_progress(len(result.uids))
        return found

    def _v4_metadata(self, uids: Sequence[str]) -> dict[str, SeriesInfo]:
        # format=CSV: builds of 2025-10-05 to 2025-10-22 fail without it; older ones
        # ignore it.
        answer = self.call("POST", "getSeriesMetadata", what="series metadata (v4)",
                           data={"list": ",".join(uids), "format": "CSV"}, version="v4")
        wanted = dict(zip(uids, uids, strict=True))
        return infos_by_uid(series_infos(answer, "series metadata (v4)", known=wanted), wanted)

    def _v1_one(self, uid: str) -> tuple[str, SeriesInfo | None, str]:
        try:
            return uid, self._v1_metadata(uid), ""
        except (AuthError, TlsError):
            raise
        except ApiError as exc:
            return uid, None, str(exc)

    def _v1_metadata(self, uid: str) -> SeriesInfo | None:
        what = f"metadata of series {uid}"
        try:
            answer = self.call("GET", "getSeriesMetaData", what=what,
                               params={"SeriesInstanceUID": uid})
        except NotPublicError:
            return None
        records_ = [dict(r) for r in records(answer, what)]
        for record in records_:
            # v1/v2 send the StudyID under the key "File Location" (the server's naming).
            location = record.pop("File Location", None)
            if location and not any(k in record for k in ("Study ID", "StudyID")):
                record["Study ID"] = location
        infos = normalise_records(records_)
        found = first_of(infos, uid)
        if found is None and len(infos) == 1 and not infos[0].series_uid:
            found = infos[0].replace(series_uid=uid)
        return found

    # -- queries ----------------------------------------------------------------------
    def query(self, endpoint: str, **params: str) -> list[dict[str, Any]]:
        """A query endpoint (getCollectionValues, getSeries...) as a list of records.

        NBIA answers "no results" with 200 and an empty body, not ``[]``.
        """
        clean = {k: v for k, v in params.items() if v}
        answer = self.call("GET", endpoint, what=endpoint, params=clean)
        return records(answer, endpoint)

    def collections(self) -> list[str]:
        return [quote(str(r.get("Collection", "")), 500) for r in
                self.query("getCollectionValues") if r.get("Collection")]

    def series(self, **filters: str) -> list[dict[str, Any]]:
        return self.query("getSeries", **filters)

    def md5_hierarchy(self, uid: str) -> str | None:
        """The server's MD5 of a series' sorted image MD5s (v4 ``getMD5Hierarchy``);
        None when the server knows no such series (it answers an empty body).

        Raises :class:`ApiMismatch` when this server has no such endpoint.
        """
        answer = self.call("POST", "getMD5Hierarchy", what=f"MD5 of series {uid}",
                           data={"SeriesInstanceUID": uid}, version="v4", mismatch=True)
        text = answer.text.strip().strip('"').lower()
        if not text:
            return None
        if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
            raise ApiError(f"MD5 of series {uid}: the server sent {error_excerpt(text, 60)!r}, "
                           "not an MD5")
        return text

    # -- one image at a time (v4; docs/NBIA-SOURCE-FACTS.md section 8) -----------------
    def sop_instance_uids(self, uid: str) -> list[str]:
        """The SOPInstanceUIDs of a series, in the server's order (v4
        ``getSOPInstanceUIDs``, JSON ``[{"SOPInstanceUID": ...}]``); empty when the
        server lists none (it answers an unknown series with an empty body).

        Raises :class:`ApiMismatch` when this build has no such endpoint (before
        2025-07-08); each listed UID must be a UID
        (:func:`~nbia_retriever.manifest.is_valid_uid`)."""
        what = f"images of series {uid}"
        answer = self.call("GET", "getSOPInstanceUIDs", what=what,
                           params={"SeriesInstanceUID": uid}, version="v4", mismatch=True)
        found: list[str] = []
        for record in records(answer, what):
            value = str(record.get("SOPInstanceUID", "")).strip()
            if not is_valid_uid(value):
                raise ApiError(f"{what}: the server listed {quote(value, 80)!r}, not a UID")
            found.append(value)
        return found

    def image_md5(self, sop_uid: str) -> str | None:
        """The MD5 (lowercase hex) the server recorded for one image at ingest (v4
        ``getMD5HashForImage``, text/plain); None when it gives none (an image it does
        not show answers no entity, a NULL md5 likewise)."""
        what = f"MD5 of image {sop_uid}"
        answer = self.call("GET", "getMD5HashForImage", what=what,
                           params={"SOPInstanceUID": sop_uid}, version="v4", mismatch=True)
        text = answer.text.strip().strip('"').lower()
        if not text or text == "null":
            return None
        if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
            raise ApiError(f"{what}: the server sent {error_excerpt(text, 60)!r}, not an MD5")
        return text

    @contextlib.contextmanager
    def open_image(self, uid: str, sop_uid: str) -> Iterator[SeriesStream]:
        """One image's bytes (v4 ``getSingleImage``: ``application/dicom``, the whole
        file, a Content-Length); iterate ``stream.chunks()``. Statuses raise as for a
        series (:func:`check_status`): the real server answers 500 for an image it
        does not show, which is retried like any 500."""
        what = f"image {sop_uid} of series {uid}"
        with self.transport.open("GET", self._url("getSingleImage", "v4"),
                                 params={"SeriesInstanceUID": uid, "SOPInstanceUID": sop_uid},
                                 what=what) as stream:
            if stream.status >= 400:
                check_status(stream.status, stream.read_text(), stream.header, what,
                             endpoint_missing_is_mismatch=True)
            if stream.content_type.startswith(("text/html", "application/json")):
                raise ApiError(f"{what}: the server sent {stream.content_type.split(';')[0]} "
                               "instead of an image", status=stream.status)
            yield stream

    # -- images -----------------------------------------------------------------------
    def _image_ways(self, md5: bool, annotations: bool = False) -> list[_ImageWay]:
        if annotations:
            return self._annotation_ways(md5)
        with self._way_lock:
            if self._ways is None or self._ways_md5 != md5:
                version = self.version()
                older = "v2" if self.tokens is not None else "v1"
                if not md5:
                    self._ways = [_ImageWay(version, "getImage")]
                elif version == "v4":
                    self._ways = [_ImageWay("v4", "getImage", (("IncludeMD5", "yes"),)),
                                  _ImageWay("v4", "getImageWithMD5Hash"),
                                  _ImageWay(older, "getImageWithMD5Hash")]
                else:
                    self._ways = [_ImageWay(version, "getImageWithMD5Hash")]
                self._ways_md5 = md5
            return list(self._ways)

    def _annotation_ways(self, md5: bool) -> list[_ImageWay]:
        """Only getDCMImage sends a series' annotation files (after md5hashes.csv): the
        Java CLI's endpoint, v1 public and v2 with a token; v4 has it too. A build that
        refuses one moves the run to the next, as for images."""
        with self._way_lock:
            ways = self._dcm_ways.get(md5)
            if ways is None:
                version = self.version()
                older = "v2" if self.tokens is not None else "v1"
                params = (("IncludeAnnotation", "true"),
                          ("MD5Verification", "true" if md5 else "false"))
                ways = self._dcm_ways[md5] = [_ImageWay(v, "getDCMImage", params)
                                              for v in dict.fromkeys((version, older))]
            return list(ways)

    def _drop_way(self, way: _ImageWay) -> bool:
        """Forget a way this server refused; True if another one is left."""
        with self._way_lock:
            ways = self._ways or []
            if way.endpoint == "getDCMImage":
                ways = next((w for w in self._dcm_ways.values() if w and w[0] == way), [])
            if ways and ways[0] == way and len(ways) > 1:
                ways.pop(0)
            return bool(ways) and ways[0] != way

    @contextlib.contextmanager
    def open_series(self, uid: str, *, md5: bool = True,
                    annotations: bool = False) -> Iterator[SeriesStream]:
        """Open the zip stream of one series; iterate ``stream.chunks()``.

        Raises :class:`NotPublicError` (final), :class:`ApiError` with ``status`` and
        ``retry_after`` (retryable for 429/5xx), :class:`NetworkError` or
        :class:`TlsError`. A 401 (token expired or revoked: not the series' fault, so it
        must not cost one of the series' retries) invalidates the shared token and is
        retried at once with a fresh one; a second 401 raises :class:`AuthError`. A
        build that refuses the endpoint or parameter moves the whole run to the next
        way, at once.
        """
        what = f"series {uid}"
        tried_401 = False
        while True:
            way = self._image_ways(md5, annotations)[0]
            # Until this way has worked once, one request at a time tries it: a build
            # that refuses it answers one 400, not one per worker.
            probing = way not in self._ways_ok
            if probing:
                self._probe_lock.acquire()
                if way in self._ways_ok or self._image_ways(md5, annotations)[0] != way:
                    self._probe_lock.release()
                    continue
            try:
                opened = self.transport.open("GET", self._url(way.endpoint, way.version),
                                           params={"SeriesInstanceUID": uid,
                                                   **dict(way.params)},
                                           headers=(headers := self._headers()
                                                    if way.version != "v4" else {}),
                                           what=what)
                stream = opened.__enter__()
            except BaseException:
                if probing:
                    self._probe_lock.release()
                raise
            with contextlib.ExitStack() as stack:
                stack.push(opened)
                if probing:
                    if stream.status < 400:
                        self._ways_ok.add(way)
                    self._probe_lock.release()
                if stream.status == 401 and self.tokens is not None and not tried_401:
                    tried_401 = True
                    self.tokens.invalidate(headers.get("Authorization"))
                    continue
                try:
                    check_series_answer(stream, what)
                except ApiMismatch:
                    if self._drop_way(way):
                        continue
                    raise
                yield stream
                return

    def series_request(self, uid: str, *, md5: bool = True, retry_401: bool = True,
                       annotations: bool = False) -> SeriesRequest | None:
        """What another process needs to open ``uid``'s stream itself, as
        :meth:`open_series` would; None while the way is unproven (the first request
        of a way is made here, one at a time, so a build that refuses it answers once).

        The request carries the current ``Authorization`` header (for the process that
        sends it, over a private socket: never argv, environment or a file).
        :meth:`series_answer_failed` says what its failure means.
        """
        way = self._image_ways(md5, annotations)[0]
        if way not in self._ways_ok:
            return None
        headers = self._headers() if way.version != "v4" else {}
        return SeriesRequest(
            uid=uid, url=self._url(way.endpoint, way.version),
            params=(("SeriesInstanceUID", uid), *way.params),
            headers=tuple(headers.items()), what=f"series {uid}", way=way,
            timeout=self.transport.timeout, connect_timeout=self.transport.connect_timeout,
            verify=self.transport.verify,
            stale_401=retry_401 and bool(headers) and self.tokens is not None)

    def series_answer_failed(self, request: SeriesRequest, error: NbiaError) -> bool:
        """After ``request`` failed with ``error`` elsewhere: True if a fresh request is
        worth making at once (the token was stale; the build refused this way and
        another is left), as :meth:`open_series` does in its own loop."""
        if isinstance(error, StaleToken):
            if self.tokens is not None:
                self.tokens.invalidate(dict(request.headers).get("Authorization"))
            return True
        if isinstance(error, ApiMismatch):
            return self._drop_way(request.way)
        return False
