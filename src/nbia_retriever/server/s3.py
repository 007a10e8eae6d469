"""The reference server's S3 mode: the archive as IDC's public buckets, with S3's faults.

IDC serves TCIA's public series from anonymous S3 buckets (reference section 10 A). The
clients under test list ``GET /BUCKET?list-type=2&prefix=<crdc_series_uuid>/`` and fetch
``GET /BUCKET/<crdc_series_uuid>/<crdc_instance_uuid>.dcm``; this module answers exactly
that, path-style and anonymously, for the :class:`~.idcdata.IdcView` of an archive: the
same bytes the NBIA endpoints zip, so a test can compare the two sources byte for byte.

What is served (the wire shapes are S3's, checked against moto and boto3 in the tests):

* ``GET /BUCKET?list-type=2&prefix=P[&continuation-token=T][&start-after=K]
  [&max-keys=N][&delimiter=D][&encoding-type=url]``: ListBucketResult (Contents with
  Key, LastModified, ETag, Size, StorageClass; CommonPrefixes; KeyCount, IsTruncated,
  NextContinuationToken), 1,000 keys a page by default and at most. Without
  ``list-type=2``, ListObjects v1 (Marker, NextMarker).
* ``GET``/``HEAD /BUCKET/KEY``: the object, ``Range: bytes=a-b | a- | -n`` -> 206 with
  Content-Range, an unsatisfiable range -> 416 InvalidRange; ETag ``"<md5>"``.
* Errors as S3 words them, in S3's XML (NoSuchBucket, NoSuchKey, InvalidArgument,
  InvalidRange, SlowDown, AccessDenied for anything that writes); HEAD gets the status
  without a body, as from S3.

Objects are streamed from the archive's files (a bounded piece at a time: memory is flat
in object size), never read whole.

Faults (:class:`S3Faults`; ``--s3-faults`` on ``nbia-retriever serve``). A *target* is a
SeriesInstanceUID, a crdc_series_uuid or a whole object key; for object faults a series
means its first object in key order. ``:N`` after a target limits the fault to the first
N times it applies (then the object behaves), without it the fault is permanent:

===============  ==========================================================================
``corrupt=T``    GET sends the object with one byte flipped (second half, fixed by the
                 seed); sizes and ETag unchanged, so only an MD5 check catches it
``missing=T``    listed, but GET and HEAD answer 404 NoSuchKey
``reset=T``      GET sends half the requested bytes, then a TCP RST (SO_LINGER 0)
``truncate=T``   the series' listing leaves out its last key, IsTruncated false (a series
                 target; counted per listing, decided at the first page)
``multipart=T``  the ETag (listing, GET, HEAD) is multipart-shaped: the MD5 of the two
                 halves' MD5s plus ``-2``, as S3 gives a two-part upload
``slowdown=N``   the first N requests (any) get 503 SlowDown; ``slowdown=N:S`` adds
                 ``Retry-After: S``
``latency=S``    every answer waits S seconds first (``50ms`` or ``0.05``)
``rate=R``       each response is paced to R bytes/s (``10MB``, ``80mbit``...; HTTP/1.1
                 sends one response at a time on a connection, so this is a
                 per-connection cap)
``seed=N``       which byte ``corrupt`` flips
===============  ==========================================================================

Items are comma-separated and may repeat (``corrupt=A,corrupt=B:1``). The benchmark's
"50 ms per request and 10 MB/s per connection" is ``latency=50ms,rate=10MB``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import hashlib
import itertools
import json
import math
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from aiohttp import web

from ..errors import FaultSpecError
from .app import RequestRecord
from .appthread import AppThread, ServedApp
from .faults import parse_rate, seeded_rng
from .idcdata import IDC_BUCKETS, IdcObject, IdcView, release_date
from .index import ArchiveIndex
from .requestlog import RequestLog, RequestState, answered, bytes_sent, request_state, state_key
from .sendfile import PIECE as _PIECE
from .sendfile import send_range
from .synth import ArchiveSummary

__all__ = ["DEFAULT_MAX_KEYS", "S3Faults", "S3Server", "S3Service"]

DEFAULT_MAX_KEYS = 1000
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
_LOG_LIMIT = 200_000
_OBJECT_FAULTS = ("corrupt", "missing", "reset")
_SERIES_FAULTS = ("truncate",)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- faults --------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Faults:
    """What the S3 mode breaks (see the module docstring). Target -> how many times
    (``None``: every time). The default breaks nothing."""

    corrupt: Mapping[str, int | None] = field(default_factory=dict)
    missing: Mapping[str, int | None] = field(default_factory=dict)
    reset: Mapping[str, int | None] = field(default_factory=dict)
    truncate: Mapping[str, int | None] = field(default_factory=dict)
    multipart: frozenset[str] = frozenset()
    slowdown: int = 0
    retry_after: float | None = None
    latency: float = 0.0
    rate: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for kind in (*_OBJECT_FAULTS, *_SERIES_FAULTS):
            value = getattr(self, kind)
            if isinstance(value, str) or not isinstance(value, Mapping):
                value = dict.fromkeys([value] if isinstance(value, str) else value)
            for target, times in value.items():
                if times is not None and (isinstance(times, bool) or not isinstance(times, int)
                                          or times < 1):
                    raise FaultSpecError(f"{kind}={target}:{times}: the count must be a "
                                         "whole number of at least 1")
            object.__setattr__(self, kind, dict(value))
        multipart = self.multipart
        object.__setattr__(self, "multipart", frozenset(
            [multipart] if isinstance(multipart, str) else multipart))
        if self.slowdown < 0:
            raise FaultSpecError("slowdown must not be negative")
        for name in ("latency", "retry_after"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise FaultSpecError(f"{name}={value!r} must be a non-negative number")
        if self.rate is not None and not (self.rate > 0):
            raise FaultSpecError(f"rate={self.rate!r} must be positive")

    @property
    def active(self) -> bool:
        return bool(self.corrupt or self.missing or self.reset or self.truncate
                    or self.multipart or self.slowdown or self.latency or self.rate)

    def describe(self) -> str:
        """One line for the CLI banner."""
        parts = [f"{kind}={len(getattr(self, kind))} target(s)"
                 for kind in (*_OBJECT_FAULTS, *_SERIES_FAULTS, "multipart")
                 if getattr(self, kind)]
        if self.slowdown:
            parts.append(f"slowdown={self.slowdown}"
                         + (f" (Retry-After {self.retry_after:g})"
                            if self.retry_after is not None else ""))
        if self.latency:
            parts.append(f"latency={self.latency * 1000:g}ms")
        if self.rate:
            parts.append(f"rate={self.rate:.0f}B/s")
        return ", ".join(parts) if parts else "none"

    @classmethod
    def parse(cls, spec: str | None) -> S3Faults:
        """The ``--s3-faults`` syntax of the module docstring."""
        text = (spec or "").strip()
        if text.lower() in ("", "none", "off", "no"):
            return cls()
        values: dict[str, Any] = {kind: {} for kind in (*_OBJECT_FAULTS, *_SERIES_FAULTS)}
        multipart: set[str] = set()
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not eq or not value:
                raise FaultSpecError(f"--s3-faults: {item!r} is not key=value")
            if key in values:
                target, _, times = value.partition(":")
                values[key][target.strip()] = (
                    _whole(times, f"--s3-faults {item!r}") if times.strip() else None)
            elif key == "multipart":
                multipart.add(value)
            elif key == "slowdown":
                count, _, after = value.partition(":")
                values["slowdown"] = _whole(count, f"--s3-faults {item!r}", minimum=0)
                if after.strip():
                    values["retry_after"] = _seconds(after, f"--s3-faults {item!r}")
            elif key == "latency":
                values["latency"] = _seconds(value, f"--s3-faults {item!r}")
            elif key in ("rate", "bandwidth"):
                values["rate"] = parse_rate(value)
            elif key == "seed":
                values["seed"] = _whole(value, f"--s3-faults {item!r}", minimum=0)
            else:
                known = [*_OBJECT_FAULTS, *_SERIES_FAULTS, "multipart", "slowdown", "latency",
                         "rate", "seed"]
                raise FaultSpecError(f"--s3-faults: unknown key {key!r}; known: "
                                     f"{', '.join(known)}")
        return cls(multipart=frozenset(multipart), **values)


def _whole(text: str, where: str, *, minimum: int = 1) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise FaultSpecError(f"{where}: {text.strip()!r} is not a whole number") from None
    if value < minimum:
        raise FaultSpecError(f"{where}: must be at least {minimum}")
    return value


def _seconds(text: str, where: str) -> float:
    raw = text.strip().lower()
    scale = 1.0
    if raw.endswith("ms"):
        raw, scale = raw[:-2], 0.001
    elif raw.endswith("s"):
        raw = raw[:-1]
    try:
        value = float(raw) * scale
    except ValueError:
        raise FaultSpecError(f"{where}: {text.strip()!r} is not a duration like 50ms or 0.05"
                             ) from None
    if not (math.isfinite(value) and value >= 0):
        raise FaultSpecError(f"{where}: must be a non-negative duration")
    return value


class _FaultState:
    """A plan resolved against the view (targets -> keys), with its counters."""

    def __init__(self, plan: S3Faults, view: IdcView) -> None:
        self.plan = plan
        self.lock = threading.Lock()
        self.objects: dict[str, dict[str, int | None]] = {}
        for kind in _OBJECT_FAULTS:
            self.objects[kind] = {}
            for target, times in getattr(plan, kind).items():
                for key in _resolve(view, target, kind, whole_series=False):
                    self.objects[kind][key] = times
        self.truncate: dict[str, int | None] = {}
        for target, times in plan.truncate.items():
            for key in _resolve(view, target, "truncate", whole_series=False, series=True):
                self.truncate[key] = times
        self.multipart = {key for target in plan.multipart
                          for key in _resolve(view, target, "multipart", whole_series=True)}
        self.used: dict[tuple[str, str], int] = {}
        self.requests = 0

    def take(self, kind: str, key: str) -> bool:
        """Whether ``kind`` applies to ``key`` now (counting the use)."""
        table = self.truncate if kind == "truncate" else self.objects[kind]
        if key not in table:
            return False
        times = table[key]
        with self.lock:
            used = self.used.get((kind, key), 0)
            if times is not None and used >= times:
                return False
            self.used[(kind, key)] = used + 1
            return True

    def slowdown(self) -> bool:
        with self.lock:
            self.requests += 1
            return self.requests <= self.plan.slowdown


def _resolve(view: IdcView, target: str, kind: str, *, whole_series: bool,
             series: bool = False) -> list[str]:
    """A target's keys: an object key itself; a series (SeriesInstanceUID or uuid) gives
    its first key, every key (``whole_series``) or, with ``series``, its last key (the
    one a truncated listing drops). Unknown targets are errors, never no-ops."""
    target = target.strip()
    version = view.by_uuid.get(target) or view.current.get(target)
    if version is None:
        owner = next((v for v in view.versions for o in v.objects if o.key == target), None)
        if owner is None:
            raise FaultSpecError(f"{kind}={target}: not a series (SeriesInstanceUID or "
                                 "crdc_series_uuid) or object key of the archive's IDC view")
        if series:
            return [owner.objects[-1].key]
        return [target]
    keys = [o.key for o in version.objects]
    if not keys:
        return []
    if series:
        return [keys[-1]]
    return keys if whole_series else keys[:1]


# -- the service ---------------------------------------------------------------------
@dataclass
class _State(RequestState):
    """What an S3 handler learns about a request that the log should keep."""


_STATE_KEY: Any = state_key("s3_state", _State)


def _state(request: web.Request) -> _State:
    return request_state(request, _STATE_KEY, _State)


class S3Service(RequestLog):
    """State and handlers of one S3 endpoint over an :class:`IdcView`."""

    def __init__(self, view: IdcView, faults: S3Faults | None = None) -> None:
        self.view = view
        self.buckets: dict[str, list[str]] = {name: [] for name in IDC_BUCKETS}
        self.objects: dict[tuple[str, str], IdcObject] = {}
        for obj in view.objects:  # already in (bucket, key) order
            self.buckets.setdefault(obj.bucket, []).append(obj.key)
            self.objects[(obj.bucket, obj.key)] = obj
        self.last_modified = release_date(view.version)
        self._last_modified_http = format_datetime(self.last_modified, usegmt=True)
        self._last_modified_xml = self.last_modified.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self._faults = _FaultState(faults or S3Faults(), view)
        self._multipart_etags: dict[str, str] = {}
        self._log_lock = threading.Lock()
        self._log: deque[RequestRecord] = deque(maxlen=_LOG_LIMIT)

    # -- knobs ------------------------------------------------------------------------
    @property
    def faults(self) -> S3Faults:
        return self._faults.plan

    def set_faults(self, plan: S3Faults | None) -> None:
        """Swap the plan; its counters start afresh. Raises FaultSpecError for a
        target that is not in the view."""
        self._faults = _FaultState(plan or S3Faults(), self.view)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_route("*", "/", self._root)
        app.router.add_route("*", "/{bucket}", self._bucket)
        app.router.add_route("*", "/{bucket}/", self._bucket)
        app.router.add_route("*", "/{bucket}/{key:.+}", self._object)
        return app

    # -- plumbing ---------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        state = _state(request)
        state.started = time.time()
        state.t0 = time.perf_counter()
        faults = self._faults

        async def answer() -> web.StreamResponse:
            if faults.plan.latency:
                await asyncio.sleep(faults.plan.latency)
            if faults.plan.slowdown and faults.slowdown():
                state.fault = "slowdown"
                headers = {}
                if faults.plan.retry_after is not None:
                    headers["Retry-After"] = f"{faults.plan.retry_after:g}"
                return _error(request, 503, "SlowDown", "Please reduce your request rate.",
                              headers=headers)
            return await handler(request)

        return await answered(request, answer, self._log_request)

    def _log_request(self, request: web.Request, status: int,
                     response: web.StreamResponse | None = None) -> None:
        state = _state(request)
        if state.logged:
            return
        state.logged = True
        record = RequestRecord(
            method=request.method, path=request.path, query=dict(request.query),
            status=status, bytes_sent=bytes_sent(state, response),
            series_uid=state.series_uid, fault=state.fault, started=state.started,
            duration=time.perf_counter() - state.t0)
        with self._log_lock:
            self._log.append(record)

    def etag(self, obj: IdcObject) -> str:
        """The object's ETag as served: ``"<md5>"``, or multipart-shaped under the
        ``multipart`` fault."""
        if obj.key not in self._faults.multipart:
            return obj.etag
        cached = self._multipart_etags.get(obj.key)
        if cached is None:
            half = (obj.size + 1) // 2
            parts = hashlib.md5(usedforsecurity=False)
            with obj.path.open("rb") as handle:
                for length in (half, obj.size - half):
                    part = hashlib.md5(usedforsecurity=False)
                    remaining = length
                    while remaining and (block := handle.read(min(_PIECE, remaining))):
                        part.update(block)
                        remaining -= len(block)
                    parts.update(part.digest())
            cached = f'"{parts.hexdigest()}-2"'
            self._multipart_etags[obj.key] = cached
        return cached

    # -- handlers ---------------------------------------------------------------------
    async def _root(self, request: web.Request) -> web.StreamResponse:
        # ListBuckets needs credentials on AWS; anonymous callers are refused there too.
        return _error(request, 403, "AccessDenied", "Access Denied")

    async def _bucket(self, request: web.Request) -> web.StreamResponse:
        bucket = request.match_info["bucket"]
        if request.method not in ("GET", "HEAD"):
            return _error(request, 403, "AccessDenied", "Access Denied")
        keys = self.buckets.get(bucket)
        if keys is None:
            return _error(request, 404, "NoSuchBucket", "The specified bucket does not exist",
                          BucketName=bucket)
        if request.method == "HEAD":
            return web.Response(status=200, headers=_amz_headers())
        return self._list(request, bucket, keys)

    def _list(self, request: web.Request, bucket: str, keys: list[str]) -> web.Response:
        q = request.query
        v2 = q.get("list-type") == "2"
        prefix = q.get("prefix", "")
        delimiter = q.get("delimiter", "")
        url_encoded = q.get("encoding-type", "").lower() == "url"
        try:
            max_keys = int(q.get("max-keys", str(DEFAULT_MAX_KEYS)))
            if max_keys < 0:
                raise ValueError
        except ValueError:
            return _error(request, 400, "InvalidArgument",
                          "Provided max-keys not an integer or within integer range",
                          ArgumentName="max-keys", ArgumentValue=q.get("max-keys", ""))
        max_keys = min(max_keys, DEFAULT_MAX_KEYS)
        token = q.get("continuation-token") if v2 else None
        hidden: set[str]
        if token is not None:
            try:
                after, hidden = _read_token(token)
            except ValueError:
                return _error(request, 400, "InvalidArgument",
                              "The continuation token provided is incorrect",
                              ArgumentName="continuation-token", ArgumentValue=token)
        else:
            after = q.get("start-after", "") if v2 else q.get("marker", "")
            hidden = {key for key in self._faults.truncate
                      if key.startswith(prefix) and self._faults.take("truncate", key)}
        if hidden:
            _state(request).fault = "truncate"
        position = bisect.bisect_right(keys, after) if after else 0
        position = max(position, bisect.bisect_left(keys, prefix))
        contents: list[IdcObject] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        while position < len(keys):
            key = keys[position]
            if not key.startswith(prefix):
                break
            if key in hidden:
                position += 1
                continue
            common = None
            if delimiter:
                cut = key.find(delimiter, len(prefix))
                if cut >= 0:
                    common = key[: cut + len(delimiter)]
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            if common is not None:
                prefixes.append(common)
                last = common
                # skip every key under this common prefix
                position = bisect.bisect_left(keys, common + "\U0010ffff", position)
            else:
                contents.append(self.objects[(bucket, key)])
                last = key
                position += 1
        series = {o.series_uid for o in contents}
        if len(series) == 1:
            _state(request).series_uid = series.pop()
        enc = (lambda s: quote(s, safe="/")) if url_encoded else (lambda s: s)
        modified = self._last_modified_xml
        parts = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_NS}">',
                 _el("Name", bucket), _el("Prefix", enc(prefix))]
        if v2:
            parts.append(_el("KeyCount", str(len(contents) + len(prefixes))))
            if token is not None:
                parts.append(_el("ContinuationToken", token))
            if truncated:
                parts.append(_el("NextContinuationToken", _make_token(last, hidden)))
            if "start-after" in q:
                parts.append(_el("StartAfter", enc(q["start-after"])))
        else:
            parts.append(_el("Marker", enc(q.get("marker", ""))))
            if truncated and delimiter:
                parts.append(_el("NextMarker", enc(last)))
        parts.append(_el("MaxKeys", str(max_keys)))
        if delimiter:
            parts.append(_el("Delimiter", enc(delimiter)))
        if url_encoded:
            parts.append(_el("EncodingType", "url"))
        parts.append(_el("IsTruncated", "true" if truncated else "false"))
        for obj in contents:
            parts.append(
                "<Contents>" + _el("Key", enc(obj.key)) + _el("LastModified", modified)
                + _el("ETag", self.etag(obj)) + _el("Size", str(obj.size))
                + _el("StorageClass", "STANDARD") + "</Contents>")
        for common in prefixes:
            parts.append("<CommonPrefixes>" + _el("Prefix", enc(common)) + "</CommonPrefixes>")
        parts.append("</ListBucketResult>")
        return web.Response(body="".join(parts).encode("utf-8"), content_type="application/xml",
                            headers=_amz_headers())

    async def _object(self, request: web.Request) -> web.StreamResponse:
        bucket = request.match_info["bucket"]
        key = request.match_info["key"]
        if request.method not in ("GET", "HEAD"):
            return _error(request, 403, "AccessDenied", "Access Denied")
        if bucket not in self.buckets:
            return _error(request, 404, "NoSuchBucket", "The specified bucket does not exist",
                          BucketName=bucket)
        obj = self.objects.get((bucket, key))
        state = _state(request)
        if obj is not None:
            state.series_uid = obj.series_uid
        faults = self._faults
        if obj is not None and faults.take("missing", key):
            state.fault = "missing"
            obj = None
        if obj is None:
            return _error(request, 404, "NoSuchKey", "The specified key does not exist.",
                          Key=key)
        size = obj.size
        start, end = 0, size - 1
        partial = False
        header = request.headers.get("Range")
        if header is not None:
            parsed = _parse_range(header, size)
            if parsed == "unsatisfiable":
                return _error(request, 416, "InvalidRange",
                              "The requested range is not satisfiable",
                              headers={"Content-Range": f"bytes */{size}"},
                              RangeRequested=header, ActualObjectSize=str(size))
            if isinstance(parsed, tuple):
                start, end = parsed
                partial = True
        length = end - start + 1 if size else 0
        headers = _amz_headers()
        headers.update({
            "ETag": self.etag(obj),
            "Last-Modified": self._last_modified_http,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/dicom",
        })
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        response = web.StreamResponse(status=206 if partial else 200, headers=headers)
        response.content_length = length
        if request.method == "HEAD":
            state.bytes_sent = 0
            self._log_request(request, response.status)  # before the client has it all
            await response.prepare(request)
            await response.write_eof()
            return response
        flip: int | None = None
        if size and key in faults.objects["corrupt"]:
            corrupt_at = seeded_rng(faults.plan.seed, key, "corrupt").randrange(size // 2, size)
            if start <= corrupt_at <= end and faults.take("corrupt", key):
                flip = corrupt_at
                state.fault = "corrupt"
        cut: int | None = None
        if length and faults.take("reset", key):
            cut = start + max(1, length // 2) if length > 1 else start
            state.fault = "reset"
        await response.prepare(request)
        state.bytes_sent = 0
        await send_range(request, response, obj.path, start, end + 1, state=state,
                         log=lambda: self._log_request(request, response.status),
                         flip=flip, cut=cut, rate=faults.plan.rate)
        return response


_QUOTES = {'"': "&quot;"}


def _el(name: str, text: str) -> str:
    return f"<{name}>{escape(text, _QUOTES)}</{name}>"


_REQUEST_IDS = itertools.count(int.from_bytes(secrets.token_bytes(4), "big") << 32)


def _amz_headers() -> dict[str, str]:
    """S3's identifying headers (the request id unique per answer, as S3's is)."""
    return {"x-amz-request-id": f"{next(_REQUEST_IDS):016X}", "Server": "AmazonS3"}


def _error(request: web.Request, status: int, code: str, message: str, *,
           headers: Mapping[str, str] | None = None, **details: str) -> web.Response:
    """S3's error document; a HEAD gets the status and headers only, as from S3."""
    all_headers = _amz_headers()
    all_headers.update(headers or {})
    if request.method == "HEAD":
        return web.Response(status=status, headers=all_headers)
    request_id = all_headers["x-amz-request-id"]
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error>' + _el("Code", code)
            + _el("Message", message) + "".join(_el(k, v) for k, v in details.items())
            + _el("RequestId", request_id) + _el("HostId", "nbia-retriever-reference")
            + "</Error>")
    return web.Response(status=status, body=body.encode("utf-8"),
                        content_type="application/xml", headers=all_headers)


_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(header: str, size: int) -> tuple[int, int] | str | None:
    """``(start, end)`` inclusive, ``"unsatisfiable"``, or None (ignored: a malformed or
    multi-range header gets the whole object, as from S3)."""
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return "unsatisfiable"
    return start, min(end, size - 1)


def _make_token(last: str, hidden: Iterable[str]) -> str:
    """Opaque to clients; carries where the next page starts and which keys a
    truncated listing decided to hide at its first page."""
    data = json.dumps({"a": last, "h": sorted(hidden)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(data.encode("utf-8")).decode("ascii")


def _read_token(token: str) -> tuple[str, set[str]]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        after, hidden = data["a"], data["h"]
    except (binascii.Error, UnicodeError, ValueError, KeyError, TypeError):
        raise ValueError(token) from None
    if not isinstance(after, str) or not isinstance(hidden, list) \
            or not all(isinstance(k, str) for k in hidden):
        raise ValueError(token)
    return after, set(hidden)


# -- running -------------------------------------------------------------------------
class S3Server(ServedApp):
    """An anonymous, path-style S3 endpoint over an archive's IDC view, on
    ``host:port`` (0: a free port). Use as a context manager, or start()/stop()::

        with S3Server(archive, prior=[uid]) as s3:
            httpx.get(f"{s3.url}/idc-open-data?list-type=2&prefix={uuid}/")
            s3.view.write_index(folder)   # the parquet files that describe it

    ``source`` is an :class:`IdcView` or anything :meth:`IdcView.build` takes (the
    keyword options go to it).
    """

    def __init__(
        self,
        source: IdcView | ArchiveIndex | ArchiveSummary | str | Path,
        *,
        faults: S3Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        **view_options: Any,
    ) -> None:
        self.view = IdcView.build(source, **view_options)
        self.service = S3Service(self.view, faults)
        self.host = host
        self._requested_port = port
        self._serving: AppThread | None = None

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"S3Server({self.view!r}, {where})"

    @property
    def url(self) -> str:
        """The endpoint URL (``--idc-endpoint``, s5cmd's ``--endpoint-url``)."""
        if self._serving is None:
            raise RuntimeError("the S3 server is not running; call start() or use `with`")
        return self._serving.url

    def object_url(self, obj: IdcObject) -> str:
        return f"{self.url}/{obj.bucket}/{obj.key}"

    def set_faults(self, plan: S3Faults | str | None) -> None:
        """Replace the fault plan (a spec string works too); counters start afresh."""
        self.service.set_faults(S3Faults.parse(plan) if isinstance(plan, str) else plan)

    @property
    def faults(self) -> S3Faults:
        return self.service.faults

    @property
    def requests(self) -> list[RequestRecord]:
        return self.service.requests

    def clear_requests(self) -> None:
        self.service.clear_requests()

    _thread_name = "nbia-s3-server"

    def _make_app(self) -> web.Application:
        return self.service.app()

