"""The NBIA endpoints on aiohttp.web: wire shapes of reference sections 2 and 3.

aiohttp rather than a WSGI framework because faults need the raw transport: a real TCP
reset (SO_LINGER 0, then close), a stall in the middle of a chunked body, a bandwidth cap.
Everything here runs on one event loop; the index is read-only after startup and the
mutable bits (tokens, fault counters, request log) have their own locks because tests
touch them from other threads.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from .auth import ServerClock, TokenStore, visible_to
from .config import ServerConfig
from .faults import HTTP_KINDS, Fault, FaultInjector, FaultPlan, seeded_rng
from .index import ArchiveIndex, ImageRecord, SeriesRecord
from .zipwriter import CHUNK, ZipEntry, deflated_entry, stream_zip, zip_size

VERSIONS = ("v1", "v2", "v4")
API_PREFIX = "/nbia-api/services"
TOKEN_PATH = "/nbia-api/oauth/token"
DOWNLOAD_PATH = "/nbia-download/servlet/DownloadServlet"
MANIFEST_PATH = "/manifest.tcia"
ZIP_TYPE = "application/x-zip-compressed"
_SECRET_WORDS = ("password", "token", "secret", "authorization")
_LOG_LIMIT = 200_000

#: v1/v2 getSeriesMetaData field order (reference s2), then fields the reference's "..."
#: covers that clients use for the folder layout.
V1_FIELDS = (
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
    "Modality", "SOP Class UID", "Number of Images", "File Size", "Series Number",
    "License Name", "License URL", "Annotation Size", "Date Released", "Study ID",
    "Body Part Examined",
)
V4_FIELDS = (
    "Series Instance UID", "Collection", "Patient ID", "Study Instance UID", "Study Date",
    "Study Description", "Study ID", "Series Description", "Series Number", "Modality",
    "Manufacturer", "Body Part Examined", "SOP Class UID", "Image Count", "File Size",
    "License Name", "License URI", "Collection URI", "Third Party Analysis", "Date Released",
    "Annotation Size",
)
SERIES_KEYS = (
    "SeriesInstanceUID", "StudyInstanceUID", "Modality", "ProtocolName", "SeriesDate",
    "SeriesDescription", "BodyPartExamined", "SeriesNumber", "Collection", "PatientID",
    "Manufacturer", "ManufacturerModelName", "ImageCount", "LicenseName", "LicenseURI",
    "CollectionURI", "FileSize", "DateReleased", "StudyDesc", "StudyDate",
    "ThirdPartyAnalysis",
)
PATIENT_KEYS = ("PatientId", "PatientName", "PatientSex", "Collection")
STUDY_KEYS = (
    "StudyInstanceUID", "StudyDate", "StudyDescription", "StudyID", "PatientAge", "PatientID",
    "PatientName", "PatientSex", "Collection", "SeriesCount",
)


@dataclass(frozen=True)
class RequestRecord:
    """One answered request. Never holds the Authorization header, passwords or tokens."""

    method: str
    path: str
    query: Mapping[str, str]
    status: int
    bytes_sent: int
    series_uid: str | None = None
    fault: str | None = None
    user: str | None = None
    started: float = 0.0  # server clock (wall time plus any advance_clock offset)
    duration: float = 0.0


@dataclass(frozen=True)
class _Endpoint:
    handler: str
    methods: frozenset[str]
    versions: frozenset[str]
    params: frozenset[str] = field(default_factory=frozenset)
    image: bool = False


def _ep(handler: str, methods: str, versions: str, params: str, *, image: bool = False
        ) -> _Endpoint:
    return _Endpoint(handler, frozenset(methods.split()), frozenset(versions.split()),
                     frozenset(params.split()), image)


ENDPOINTS: dict[str, _Endpoint] = {
    "getCollectionValues": _ep("_collections", "GET", "v1 v2 v4", "format"),
    "getPatient": _ep("_patients", "GET", "v1 v2 v4", "Collection format"),
    "getPatientStudy": _ep(
        "_studies", "GET", "v1 v2 v4", "Collection PatientID StudyInstanceUID format"
    ),
    "getSeries": _ep(
        "_series_query", "GET", "v1 v2 v4",
        "Collection PatientID StudyInstanceUID Modality BodyPartExamined Manufacturer "
        "ManufacturerModelName SeriesInstanceUID format",
    ),
    "getSeriesMetaData": _ep("_series_metadata", "GET", "v1 v2", "SeriesInstanceUID format"),
    "getSeriesMetadata": _ep("_series_metadata_batch", "POST", "v4", "list"),
    "getImage": _ep(
        "_get_image", "GET", "v1 v2 v4", "SeriesInstanceUID NewFileNames IncludeMD5", image=True
    ),
    "getImageWithMD5Hash": _ep(
        "_get_image_md5", "GET", "v1 v2", "SeriesInstanceUID NewFileNames", image=True
    ),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _RequestState:
    """What a handler learns about a request that the log should keep."""

    series_uid: str | None = None
    fault: str | None = None
    user: str | None = None
    bytes_sent: int | None = None
    client_gone: bool = False
    logged: bool = False
    started: float = 0.0
    t0: float = 0.0


_STATE_KEY: Any
try:
    from aiohttp.web import RequestKey

    _STATE_KEY = RequestKey("nbia_state", _RequestState)
except ImportError:  # aiohttp < 3.12: plain string keys
    _STATE_KEY = "nbia_state"


def _state(request: web.Request) -> _RequestState:
    state = request.get(_STATE_KEY)
    if state is None:
        state = _RequestState()
        request[_STATE_KEY] = state
    return state  # type: ignore[no-any-return]


class NbiaService:
    """State and handlers of one reference server (one archive, one config)."""

    def __init__(
        self,
        index: ArchiveIndex,
        config: ServerConfig,
        *,
        faults: FaultPlan | None = None,
        seed: int = 0,
        clock: ServerClock | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.seed = seed
        self.clock = clock or ServerClock()
        self.tokens = TokenStore(config, self.clock)
        self.injector = FaultInjector(faults)
        self._log_lock = threading.Lock()
        self._log: collections.deque[RequestRecord] = collections.deque(maxlen=_LOG_LIMIT)
        self.base_url = ""  # set by the runner once the port is known (manifest URLs)

    # -- public knobs -----------------------------------------------------------------
    def set_faults(self, plan: FaultPlan | None) -> None:
        """Swap the plan and restart its counters (attempt numbers begin at 1 again)."""
        self.injector = FaultInjector(plan)

    @property
    def requests(self) -> list[RequestRecord]:
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=16 * 1024**2)
        app.router.add_route("*", API_PREFIX + "/{version}/{endpoint}", self._dispatch)
        app.router.add_route("POST", TOKEN_PATH, self._token)
        app.router.add_route("*", DOWNLOAD_PATH, self._download_servlet)
        app.router.add_get(MANIFEST_PATH, self._manifest, allow_head=False)
        app.router.add_get("/", self._home, allow_head=False)
        return app

    # -- plumbing ---------------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        state = _state(request)
        state.started = self.clock.now()
        state.t0 = time.perf_counter()
        status = 500
        response: web.StreamResponse | None = None
        try:
            latency = self.injector.plan.latency
            if latency and request.path.startswith("/nbia-api/"):
                await asyncio.sleep(latency)
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self._log_request(request, status, response)

    def _log_request(self, request: web.Request, status: int,
                     response: web.StreamResponse | None = None) -> None:
        """Append the request's record, once. Streams call this before their last byte
        (or the reset) so a client that saw the end can rely on finding the record."""
        state = _state(request)
        if state.logged:
            return
        state.logged = True
        sent = state.bytes_sent
        if sent is None:
            body = getattr(response, "body", None)
            sent = len(body) if isinstance(body, bytes | bytearray) else 0
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=_scrub(request.query),
            status=status,
            bytes_sent=int(sent),
            series_uid=state.series_uid,
            fault=state.fault,
            user=state.user,
            started=state.started,
            duration=time.perf_counter() - state.t0,
        )
        with self._log_lock:
            self._log.append(record)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        name = request.match_info["endpoint"]
        endpoint = ENDPOINTS.get(name)
        if version not in VERSIONS or endpoint is None or version not in endpoint.versions:
            return _text(404, f"Not Found: {request.path}")
        user: str | None = None
        if version == "v2":
            user, denied = self._authenticate(request)
            if denied is not None:
                return denied
            _state(request).user = user
        if request.method not in endpoint.methods:
            return web.Response(status=405, text="Method Not Allowed",
                                headers={"Allow": ", ".join(sorted(endpoint.methods))})
        query = {key: request.query.getone(key) for key in request.query}
        if version == "v4":
            unknown = sorted(set(query) - endpoint.params)
            if unknown:
                return _text(400, f"Unrecognized query parameter(s): {', '.join(unknown)}")
        if not endpoint.image:
            key = request.path + "?" + "&".join(f"{k}={v}" for k, v in sorted(query.items()))
            fault = self.injector.metadata_fault(key)
            if fault is not None:
                _state(request).fault = fault.kind
                return self._http_fault(fault)
        method = getattr(self, endpoint.handler)
        return await method(request, version, user, query)

    def _authenticate(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, _oauth_error(
                401, "unauthorized", "Full authentication is required to access this resource"
            )
        user, why = self.tokens.user_for(token.strip())
        if user is None:
            text = "Access token expired" if why == "expired" else "Invalid access token"
            return None, _oauth_error(401, "invalid_token", text)
        return user, None

    def _visible(self, series: SeriesRecord, version: str, user: str | None) -> bool:
        return visible_to(self.config, user if version == "v2" else None, series.collection)

    def _lookup(self, uid: str, version: str, user: str | None) -> SeriesRecord | None:
        series = self.index.series.get(uid)
        if series is None or not self._visible(series, version, user):
            return None
        return series

    def _all_visible(self, version: str, user: str | None) -> Iterator[SeriesRecord]:
        for series in self.index.series.values():
            if self._visible(series, version, user):
                yield series

    def _http_fault(self, fault: Fault) -> web.Response:
        plan = self.injector.plan
        if fault.kind == "http429":
            seconds = plan.retry_after if fault.param is None else fault.param
            return web.Response(status=429, text="Too Many Requests",
                                headers={"Retry-After": _seconds(seconds)})
        status = 500 if fault.kind == "http500" else 503
        reason = "Internal Server Error" if status == 500 else "Service Unavailable"
        headers = {} if fault.param is None else {"Retry-After": _seconds(fault.param)}
        page = (f"<!doctype html><html lang=\"en\"><head><title>HTTP Status {status} - "
                f"{reason}</title></head><body><h1>HTTP Status {status} - {reason}</h1>"
                "<hr class=\"line\" /><h3>Apache Tomcat</h3></body></html>")
        return web.Response(status=status, text=page, content_type="text/html",
                            headers=headers)

    # -- auth and small pages ---------------------------------------------------------
    async def _token(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        client = str(form.get("client_id", "NBIA") or "NBIA")
        if client != "NBIA":
            return _oauth_error(401, "invalid_client", "Bad client credentials")
        grant = str(form.get("grant_type", ""))
        if grant == "password":
            username = str(form.get("username", ""))
            password = str(form.get("password", ""))
            if not self.tokens.check_password(username, password):
                return _oauth_error(400, "invalid_grant", "Bad credentials")
            _state(request).user = username
            answer = self.tokens.issue(username)
        elif grant == "refresh_token":
            refreshed = self.tokens.refresh(str(form.get("refresh_token", "")))
            if refreshed is None:
                return _oauth_error(400, "invalid_grant", "Invalid refresh token")
            answer = refreshed
        else:
            return _oauth_error(400, "unsupported_grant_type",
                                f"Unsupported grant type: {grant[:40]}")
        return web.Response(text=json.dumps(answer), content_type="application/json",
                            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def _download_servlet(self, request: web.Request) -> web.StreamResponse:
        return _text(200, "NBIA DownloadServlet. The REST API lives under "
                          f"{API_PREFIX}/v1, /v2 and /v4.")

    async def _home(self, request: web.Request) -> web.StreamResponse:
        return _text(200, f"nbia-retriever reference server: {len(self.index.series)} series "
                          f"in {len(self.index.collections)} collections.\nAPI: {API_PREFIX}\n"
                          f"Manifest of every public series: {MANIFEST_PATH}\n")

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        wanted = request.query.get("Collection")
        uids = [s.series_uid for s in self._all_visible("v1", None)
                if wanted is None or s.collection.lower() == wanted.lower()]
        base = self.base_url or f"{request.scheme}://{request.host}"
        return _text(200, format_manifest(base + DOWNLOAD_PATH, sorted(uids)))

    # -- query endpoints --------------------------------------------------------------
    async def _collections(self, request: web.Request, version: str, user: str | None,
                           query: dict[str, str]) -> web.StreamResponse:
        names = sorted({s.collection for s in self._all_visible(version, user)},
                       key=str.lower)
        return _rows([{"Collection": n} for n in names], ("Collection",), query)

    async def _patients(self, request: web.Request, version: str, user: str | None,
                        query: dict[str, str]) -> web.StreamResponse:
        found: dict[tuple[str, str], dict[str, object]] = {}
        for s in self._filtered(version, user, query):
            found.setdefault((s.collection, s.patient_id), {
                "PatientId": s.patient_id, "PatientName": s.patient_name,
                "PatientSex": s.patient_sex, "Collection": s.collection,
            })
        return _rows([found[k] for k in sorted(found)], PATIENT_KEYS, query)

    async def _studies(self, request: web.Request, version: str, user: str | None,
                       query: dict[str, str]) -> web.StreamResponse:
        found: dict[str, dict[str, object]] = {}
        for s in self._filtered(version, user, query):
            row = found.setdefault(s.study_uid, {
                "StudyInstanceUID": s.study_uid, "StudyDate": _iso_date(s.study_date),
                "StudyDescription": s.study_description, "StudyID": s.study_id,
                "PatientAge": s.patient_age, "PatientID": s.patient_id,
                "PatientName": s.patient_name, "PatientSex": s.patient_sex,
                "Collection": s.collection, "SeriesCount": 0,
            })
            row["SeriesCount"] = int(row["SeriesCount"]) + 1  # type: ignore[call-overload]
        rows = sorted(found.values(), key=lambda r: (str(r["Collection"]), str(r["PatientID"]),
                                                     str(r["StudyInstanceUID"])))
        return _rows(rows, STUDY_KEYS, query)

    async def _series_query(self, request: web.Request, version: str, user: str | None,
                            query: dict[str, str]) -> web.StreamResponse:
        rows = [self._series_row(s) for s in self._filtered(version, user, query)]
        rows.sort(key=lambda r: (str(r["Collection"]), str(r["PatientID"]),
                                 str(r["StudyInstanceUID"]), str(r["SeriesInstanceUID"])))
        return _rows(rows, SERIES_KEYS, query)

    def _filtered(self, version: str, user: str | None, query: Mapping[str, str]
                  ) -> Iterator[SeriesRecord]:
        """Series matching the query filters; like MySQL, comparisons ignore case."""
        checks = {
            "Collection": lambda s: s.collection, "PatientID": lambda s: s.patient_id,
            "StudyInstanceUID": lambda s: s.study_uid, "Modality": lambda s: s.modality,
            "BodyPartExamined": lambda s: s.body_part, "Manufacturer": lambda s: s.manufacturer,
            "ManufacturerModelName": lambda s: s.manufacturer_model,
            "SeriesInstanceUID": lambda s: s.series_uid,
        }
        wanted = {k: v.lower() for k, v in query.items() if k in checks and v != ""}
        for series in self._all_visible(version, user):
            if all(checks[k](series).lower() == v for k, v in wanted.items()):
                yield series

    def _series_row(self, s: SeriesRecord) -> dict[str, object]:
        cfg = self.config.collection(s.collection)
        return {
            "SeriesInstanceUID": s.series_uid, "StudyInstanceUID": s.study_uid,
            "Modality": s.modality, "ProtocolName": s.protocol_name,
            "SeriesDate": _iso_date(s.series_date), "SeriesDescription": s.series_description,
            "BodyPartExamined": s.body_part, "SeriesNumber": _number(s.series_number),
            "Collection": s.collection, "PatientID": s.patient_id,
            "Manufacturer": s.manufacturer, "ManufacturerModelName": s.manufacturer_model,
            "ImageCount": s.image_count, "LicenseName": cfg.license_name,
            "LicenseURI": cfg.license_url, "CollectionURI": cfg.description_uri,
            "FileSize": s.file_size, "DateReleased": cfg.date_released,
            "StudyDesc": s.study_description, "StudyDate": _iso_date(s.study_date),
            "ThirdPartyAnalysis": "YES" if cfg.third_party else "NO",
        }

    # -- series metadata --------------------------------------------------------------
    def v1_record(self, s: SeriesRecord) -> dict[str, str]:
        """One series as v1/v2 getSeriesMetaData: every value a string."""
        cfg = self.config.collection(s.collection)
        return {
            "Series UID": s.series_uid, "Collection": s.collection,
            "3rd Party Analysis": "YES" if cfg.third_party else "NO",
            "Data Description URI": cfg.description_uri, "Subject ID": s.patient_id,
            "Study UID": s.study_uid, "Study Description": s.study_description,
            "Study Date": _us_date(s.study_date), "Series Description": s.series_description,
            "Manufacturer": s.manufacturer, "Modality": s.modality,
            "SOP Class UID": s.sop_class_uid, "Number of Images": str(s.image_count),
            "File Size": str(s.file_size), "Series Number": _java_float(s.series_number),
            "License Name": cfg.license_name, "License URL": cfg.license_url,
            "Annotation Size": "0", "Date Released": cfg.date_released,
            "Study ID": s.study_id, "Body Part Examined": s.body_part,
        }

    def v4_record(self, s: SeriesRecord) -> dict[str, str]:
        """One series as a v4 getSeriesMetadata CSV row."""
        cfg = self.config.collection(s.collection)
        return {
            "Series Instance UID": s.series_uid, "Collection": s.collection,
            "Patient ID": s.patient_id, "Study Instance UID": s.study_uid,
            "Study Date": _iso_date(s.study_date), "Study Description": s.study_description,
            "Study ID": s.study_id, "Series Description": s.series_description,
            "Series Number": s.series_number, "Modality": s.modality,
            "Manufacturer": s.manufacturer, "Body Part Examined": s.body_part,
            "SOP Class UID": s.sop_class_uid, "Image Count": str(s.image_count),
            "File Size": str(s.file_size), "License Name": cfg.license_name,
            "License URI": cfg.license_url, "Collection URI": cfg.description_uri,
            "Third Party Analysis": "YES" if cfg.third_party else "NO",
            "Date Released": cfg.date_released, "Annotation Size": "0",
        }

    async def _series_metadata(self, request: web.Request, version: str, user: str | None,
                               query: dict[str, str]) -> web.StreamResponse:
        uid = query.get("SeriesInstanceUID", "").strip()
        if not uid:
            return _text(400, "Missing required parameter: SeriesInstanceUID")
        _state(request).series_uid = uid
        series = self._lookup(uid, version, user)
        if series is None:
            return web.Response(status=204)
        record = self.v1_record(series)
        if query.get("format", "").lower() == "csv":
            return _csv_response(V1_FIELDS, [record], quote_all=True)
        return web.Response(text=_json([record]), content_type="application/json")

    async def _series_metadata_batch(self, request: web.Request, version: str,
                                     user: str | None, query: dict[str, str]
                                     ) -> web.StreamResponse:
        form = await request.post()
        unknown = sorted(set(form) - {"list"})
        if unknown:
            return _text(400, f"Unrecognized form parameter(s): {', '.join(unknown)}")
        text = str(form.get("list", query.get("list", "")))
        seen: dict[str, None] = {}
        for part in text.replace("\n", ",").split(","):
            if part.strip():
                seen.setdefault(part.strip(), None)
        rows = [self.v4_record(s) for uid in seen
                if (s := self._lookup(uid, version, user)) is not None]
        return _csv_response(V4_FIELDS, rows, quote_all=False)

    # -- images -----------------------------------------------------------------------
    async def _get_image(self, request: web.Request, version: str, user: str | None,
                         query: dict[str, str]) -> web.StreamResponse:
        md5 = version == "v4" and _yes(query.get("IncludeMD5"))
        return await self._image(request, version, user, query, md5=md5)

    async def _get_image_md5(self, request: web.Request, version: str, user: str | None,
                             query: dict[str, str]) -> web.StreamResponse:
        return await self._image(request, version, user, query, md5=True)

    async def _image(self, request: web.Request, version: str, user: str | None,
                     query: dict[str, str], *, md5: bool) -> web.StreamResponse:
        uid = query.get("SeriesInstanceUID", "").strip()
        if not uid:
            return _text(400, "Missing required parameter: SeriesInstanceUID")
        _state(request).series_uid = uid
        series = self._lookup(uid, version, user)
        if series is None:
            return _text(400, f"The series {uid[:128]} is not in public domain.")
        injector = self.injector
        fault, attempt = injector.image_fault(uid)
        _state(request).fault = fault.kind if fault else None
        if fault is not None and fault.kind in HTTP_KINDS:
            return self._http_fault(fault)
        rng = injector.rng(uid, attempt, "params")
        entries = self.zip_entries(series, md5=md5, new_names=_yes(query.get("NewFileNames")),
                                   fault=fault, rng=rng)
        offset: int | None = None
        if fault is not None and fault.kind in ("reset", "stall"):
            total = zip_size(entries)
            if fault.kind == "reset" and fault.param is not None:
                offset = int(fault.param)
            else:
                offset = rng.randrange(1, max(2, total))
            offset = max(1, min(offset, total - 1))
        response = web.StreamResponse(status=200, headers={
            "Content-Type": ZIP_TYPE,
            "Content-Disposition": f'attachment; filename="{_safe_name(uid)}.zip"',
        })
        response.enable_chunked_encoding()
        await response.prepare(request)
        stall = 0.0
        if fault is not None and fault.kind == "stall":
            stall = injector.plan.stall_seconds if fault.param is None else fault.param
        _state(request).bytes_sent = 0
        with contextlib.closing(stream_zip(entries)) as chunks:  # closes the open blob
            await self._pump(request, response, chunks, fault, offset, stall,
                             injector.plan.bandwidth)
        return response

    def image_order(self, series: SeriesRecord) -> list[ImageRecord]:
        """The "database order": arbitrary, but fixed by the server seed and the series."""
        images = list(series.images)
        seeded_rng(self.seed, series.series_uid, "order").shuffle(images)
        return images

    def zip_entries(self, series: SeriesRecord, *, md5: bool, new_names: bool = False,
                    fault: Fault | None = None, rng: Any = None) -> list[ZipEntry]:
        """LICENSE, the images, and md5hashes.csv last, with stream faults applied."""
        order = self.image_order(series)
        names = _new_file_names(order) if new_names else [
            f"{i:08d}.dcm" for i in range(1, len(order) + 1)
        ]
        cfg = self.config.collection(series.collection)
        images = [
            ZipEntry(name, image.crc32, image.compressed_size, image.size,
                     blob=self.index.blob_path(image))
            for name, image in zip(names, order, strict=True)
        ]
        if fault is not None and fault.kind == "short" and images:
            keep = int(fault.param) if fault.param is not None else rng.randrange(len(images))
            images = images[: max(0, min(keep, len(images) - 1))]
        if fault is not None and fault.kind == "corrupt" and images:
            which = int(fault.param) - 1 if fault.param else rng.randrange(len(images))
            which = max(0, min(which, len(images) - 1))
            images[which] = self._corrupted(images[which], order[which], rng)
        entries = [deflated_entry("LICENSE", cfg.license_entry(series.collection)), *images]
        if md5:
            rows = [f"{name},{image.md5}" for name, image in zip(names, order, strict=True)]
            seeded_rng(self.seed, series.series_uid, "md5").shuffle(rows)
            text = "Filename,MD5Hash\n" + "".join(row + "\n" for row in rows)
            entries.append(deflated_entry("md5hashes.csv", text.encode("ascii")))
        return entries

    def _corrupted(self, entry: ZipEntry, image: ImageRecord, rng: Any) -> ZipEntry:
        """The image with one byte flipped in its second half (pixel data, most likely),
        recompressed so the CRC matches: corruption at rest, caught only by the MD5."""
        data = bytearray(self.index.image_path(image).read_bytes())
        if not data:
            return entry
        position = rng.randrange(len(data) // 2, len(data))
        data[position] ^= 0xFF
        return deflated_entry(entry.name, bytes(data))

    async def _pump(self, request: web.Request, response: web.StreamResponse,
                    chunks: Iterator[bytes], fault: Fault | None, offset: int | None,
                    stall: float, bandwidth: float | None) -> None:
        loop = asyncio.get_running_loop()
        piece = CHUNK if bandwidth is None else max(1024, min(CHUNK, int(bandwidth / 20)))
        start = loop.time()
        sent = 0
        state = _state(request)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view.nbytes:
                    size = min(view.nbytes, piece)
                    if offset is not None:
                        size = min(size, offset - sent)
                    await response.write(view[:size])
                    view = view[size:]
                    sent += size
                    state.bytes_sent = sent
                    if offset is not None and sent >= offset:
                        offset = None
                        if fault is not None and fault.kind == "reset":
                            self._log_request(request, response.status)
                            await _reset(request)
                            return
                        await _stall(request, stall)
                    if bandwidth is not None:
                        delay = start + sent / bandwidth - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
            self._log_request(request, response.status)
            await response.write_eof()
        except ConnectionError:
            state.client_gone = True


async def _reset(request: web.Request) -> None:
    """A real TCP RST after the bytes written so far have left: SO_LINGER 0, then close."""
    transport = request.transport
    if transport is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while (transport.get_write_buffer_size() and not transport.is_closing()
           and loop.time() < deadline):
        await asyncio.sleep(0.005)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _stall(request: web.Request, seconds: float) -> None:
    """Send nothing for ``seconds``; give up early once the client has hung up."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while (remaining := end - loop.time()) > 0:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(min(0.05, remaining))


def _new_file_names(order: Sequence[ImageRecord]) -> list[str]:
    """``NewFileNames=Yes`` as the real server does it: by InstanceNumber only, padded
    across the whole series (reference s5 says clients must not rely on this)."""
    acquisitions = sorted({i.acquisition_number for i in order}, key=_sort_key)
    acq_rank = {a: n for n, a in enumerate(acquisitions, start=1)}
    ranked = sorted(range(len(order)), key=lambda k: _sort_key(order[k].instance_number))
    width = len(str(len(order)))
    names = [""] * len(order)
    for rank, k in enumerate(ranked, start=1):
        names[k] = f"{acq_rank[order[k].acquisition_number]}-{rank:0{width}d}.dcm"
    return names


def _sort_key(text: str) -> tuple[int, float, str]:
    try:
        return (1, float(text), text)
    except ValueError:
        return (0, 0.0, text)


def format_manifest(download_url: str, uids: Sequence[str]) -> str:
    """A version-3.0 ``.tcia`` manifest (reference s1) for the given series."""
    lines = [
        f"downloadServerUrl={download_url}",
        "includeAnnotation=true",
        "noOfrRetry=4",
        "databasketId=manifest-reference-server.tcia",
        "manifestVersion=3.0",
        "ListOfSeriesToDownload=",
        *uids,
    ]
    return "\n".join(lines) + "\n"


def _rows(rows: list[dict[str, object]], keys: Sequence[str], query: Mapping[str, str]
          ) -> web.Response:
    """JSON (null-ish fields omitted, like Jackson's NON_NULL) or CSV; no rows -> 200 empty."""
    if not rows:
        return web.Response(status=200, body=b"", content_type="application/json")
    if query.get("format", "").lower() == "csv":
        return _csv_response(keys, [{k: str(r.get(k, "")) for k in keys} for r in rows],
                             quote_all=True)
    cleaned = [{k: r[k] for k in keys if k in r and r[k] not in ("", None)} for r in rows]
    return web.Response(text=_json(cleaned), content_type="application/json")


def _csv_response(header: Sequence[str], rows: Iterable[Mapping[str, str]], *, quote_all: bool
                  ) -> web.Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
                        lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(k, "") for k in header])
    return web.Response(text=buffer.getvalue(), content_type="text/csv")


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/plain")


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = (
            f'Bearer realm="oauth2-resource", error="{error}", '
            f'error_description="{description}"'
        )
    return web.Response(status=status, content_type="application/json", headers=headers,
                        text=json.dumps({"error": error, "error_description": description}))


def _scrub(query: Mapping[str, str]) -> dict[str, str]:
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v)
            for k, v in query.items()}


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() in ("yes", "true", "y", "1")


def _safe_name(uid: str) -> str:
    return "".join(c for c in uid[:128] if c.isalnum() or c in ".-_") or "series"


def _us_date(raw: str) -> str:
    """DICOM ``YYYYMMDD`` -> ``MM-DD-YYYY`` (v1/v2); anything else passes through."""
    if len(raw) == 8 and raw.isdigit():
        return f"{raw[4:6]}-{raw[6:8]}-{raw[:4]}"
    return raw


def _iso_date(raw: str) -> str:
    if len(raw) == 8 and raw.isdigit():
        return f"{raw[:4]}-{raw[4:6]}-{raw[6:8]}"
    return raw


def _java_float(raw: str) -> str:
    """Series Number as the real server prints it: ``1`` -> ``1.000000``."""
    try:
        return f"{float(raw):.6f}"
    except ValueError:
        return raw


def _number(raw: str) -> object:
    try:
        value = float(raw)
    except ValueError:
        return raw
    return int(value) if value.is_integer() else value


def _json(value: object) -> str:
    """Compact, like the Jackson output of the real server."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
