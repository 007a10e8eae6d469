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
import datetime
import functools
import hashlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..naming import ANNOTATION_SUFFIXES
from .auth import ServerClock, TokenStore, visible_to
from .builds import Build, get_build
from .config import ServerConfig
from .faults import STATUS_KINDS, Fault, FaultInjector, FaultPlan, seeded_rng
from .index import ArchiveIndex, ImageRecord, SeriesRecord
from .requestlog import RequestLog, RequestState, answered, bytes_sent, request_state, state_key
from .sendfile import reset
from .zipwriter import CHUNK, ZipEntry, deflated_entry, stored_entry, stream_zip, zip_size

VERSIONS = ("v1", "v2", "v4")
API_PREFIX = "/nbia-api/services"
TOKEN_PATH = "/nbia-api/oauth/token"
DOWNLOAD_PATH = "/nbia-download/servlet/DownloadServlet"
MANIFEST_PATH = "/manifest.tcia"
ZIP_TYPE = "application/x-zip-compressed"
_SECRET_WORDS = ("password", "token", "secret", "authorization")
_LOG_LIMIT = 200_000
#: The longest ``hold_metadata`` keeps an answer back.
_HOLD_LIMIT = 60.0

#: v1/v2 getSeriesMetaData keys, in the real server's order (27 since 2024-06). "File
#: Location" holds the StudyID there (the key's name is the server's); a NULL value means
#: the key is left out.
V1_FIELDS = (
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
    "Modality", "SOP Class UID", "Number of Images", "File Size", "File Location",
    "Series Number", "License Name", "License URL", "Annotation Size", "Date Released",
    "Series Date", "Protocol Name", "Body Part Examined", "Annotations Flag",
    "Manufacturer Model Name", "Software Versions", "TimeStamp",
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
        "_get_image_md5", "GET", "v1 v2 v4", "SeriesInstanceUID", image=True
    ),
    # The Java CLI's endpoint: images under the server's names, md5hashes.csv when
    # MD5Verification=true, then with IncludeAnnotation=true the annotation files.
    "getDCMImage": _ep(
        "_get_dcm_image", "GET", "v1 v2 v4", "SeriesInstanceUID IncludeAnnotation MD5Verification",
        image=True
    ),
    "getMD5Hierarchy": _ep("_md5_hierarchy", "POST", "v4", ""),
    # One image at a time (docs/NBIA-SOURCE-FACTS.md section 8; V4_getSOPInstanceUIDs,
    # V4_getSingleImage, V4_getMD5HashForImage): what a client fetches a huge series by.
    "getSOPInstanceUIDs": _ep("_sop_uids", "GET", "v1 v2 v4", "SeriesInstanceUID format"),
    "getSingleImage": _ep(
        "_single_image", "GET", "v1 v2 v4", "SeriesInstanceUID SOPInstanceUID", image=True
    ),
    "getMD5HashForImage": _ep("_image_md5", "GET", "v4", "SOPInstanceUID"),
}
#: Endpoints that send image bytes: their requests at once are counted (peak_downloads).
_DOWNLOADS = frozenset(name for name, ep in ENDPOINTS.items() if ep.image)
_HIERARCHY_PARAMS = ("SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Collection")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class _RequestState(RequestState):
    """What a handler learns about a request that the log should keep."""

    user: str | None = None
    client_gone: bool = False
    #: counted in ``downloads`` until its last byte is handed over
    download: bool = False


_STATE_KEY: Any = state_key("nbia_state", _RequestState)


def _state(request: web.Request) -> _RequestState:
    return request_state(request, _STATE_KEY, _RequestState)


class NbiaService(RequestLog):
    """State and handlers of one reference server (one archive, one config)."""

    def __init__(
        self,
        index: ArchiveIndex,
        config: ServerConfig,
        *,
        faults: FaultPlan | None = None,
        seed: int = 0,
        clock: ServerClock | None = None,
        build: Build | str = "current",
        stored: bool = False,
    ) -> None:
        self.index = index
        self.config = config
        self.build = get_build(build)
        self.stored = stored  # images as STORED entries (sizes in the header)
        self.seed = seed
        self.clock = clock or ServerClock()
        self.tokens = TokenStore(config, self.clock)
        self.injector = FaultInjector(faults)
        self._annotations: dict[str, tuple[tuple[str, str, int], ...]] = {}
        self._log_lock = threading.Lock()
        self._log: collections.deque[RequestRecord] = collections.deque(maxlen=_LOG_LIMIT)
        self.base_url = ""  # set by the runner once the port is known (manifest URLs)
        self._metadata_answers = 0
        self._zip_sent: asyncio.Event | None = None  # made in the server's loop
        self._in_flight: dict[int, str] = {}
        #: Image requests (zips and single images) being answered now, and the most at
        #: once since the start or :meth:`clear_requests`: a client's connection budget.
        self.downloads = 0
        self.peak_downloads = 0
        self._sops: dict[str, tuple[SeriesRecord, ImageRecord]] | None = None

    # -- public knobs -----------------------------------------------------------------
    def set_faults(self, plan: FaultPlan | None) -> None:
        """Swap the plan and restart its counters (attempt numbers begin at 1 again)."""
        self.injector = FaultInjector(plan)
        self._metadata_answers = 0

    def _zip_event(self) -> asyncio.Event:
        if self._zip_sent is None:
            self._zip_sent = asyncio.Event()
        return self._zip_sent

    async def _hold_metadata(self) -> None:
        """``hold_metadata=N``: answers after the first N wait for a zip sent whole."""
        hold = self.injector.plan.hold_metadata
        self._metadata_answers += 1
        if hold is not None and self._metadata_answers > hold:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._zip_event().wait(), _HOLD_LIMIT)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()
            self.peak_downloads = self.downloads

    @property
    def in_flight(self) -> list[str]:
        with self._log_lock:
            return list(self._in_flight.values())

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
        state.download = request.path.rpartition("/")[2] in _DOWNLOADS
        with self._log_lock:
            self._in_flight[id(request)] = request.path
            if state.download:
                self.downloads += 1
                self.peak_downloads = max(self.peak_downloads, self.downloads)

        async def answer() -> web.StreamResponse:
            latency = self.injector.plan.latency
            if latency and request.path.startswith("/nbia-api/"):
                await asyncio.sleep(latency)
            if state.download and self.injector.plan.first_byte:
                # A server building the zip before its first byte (``first_byte``).
                await asyncio.sleep(self.injector.plan.first_byte)
            return await handler(request)

        def log(request: web.Request, status: int, response: web.StreamResponse | None) -> None:
            with self._log_lock:
                self._in_flight.pop(id(request), None)
            self._log_request(request, status, response)

        return await answered(request, answer, log)

    def _log_request(self, request: web.Request, status: int,
                     response: web.StreamResponse | None = None) -> None:
        """Append the request's record, once. Streams call this before their last byte
        (or the reset) so a client that saw the end can rely on finding the record."""
        state = _state(request)
        self._downloaded(state)
        if state.logged:
            return
        state.logged = True
        record = RequestRecord(
            method=request.method,
            path=request.path,
            query=_scrub(request.query),
            status=status,
            bytes_sent=bytes_sent(state, response),
            series_uid=state.series_uid,
            fault=state.fault,
            user=state.user,
            started=state.started,
            duration=time.perf_counter() - state.t0,
        )
        with self._log_lock:
            self._log.append(record)

    def _downloaded(self, state: _RequestState) -> None:
        """The request no longer counts in ``downloads``: called before its last byte
        (or its end) is handed over, so a client that saw the end and asks again is
        never counted twice (a client's budget of connections is checked this way)."""
        if state.download:
            state.download = False
            with self._log_lock:
                self.downloads -= 1

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        version = request.match_info["version"]
        name = request.match_info["endpoint"]
        endpoint = ENDPOINTS.get(name)
        if version not in VERSIONS or endpoint is None or version not in endpoint.versions \
                or (version == "v4" and not self.build.has_v4) \
                or (name == "getMD5Hierarchy" and not self.build.md5_hierarchy) \
                or (name == "getSOPInstanceUIDs" and version == "v4"
                    and not self.build.v4_sop_list):
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
            allowed = self.build.v4_image_params if name == "getImage" else endpoint.params
            unknown = [k for k in query if k not in allowed]
            if unknown and name != "getMD5Hierarchy":
                # The real message; the order of the list is the JVM's (unspecified).
                return _text(400, f"Invalid query parameter: '{unknown[0][:64]}'. Allowed "
                                  f"parameters are: [{', '.join(sorted(allowed))}]")
        if not endpoint.image:
            key = request.path + "?" + "&".join(f"{k}={v}" for k, v in sorted(query.items()))
            fault = self.injector.metadata_fault(key)
            if fault is not None:
                _state(request).fault = fault.kind
                return self._http_fault(fault)
        method = getattr(self, endpoint.handler)
        response: web.StreamResponse = await method(request, version, user, query)
        return response

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
        if fault.kind in ("http460", "http462"):
            status = 460 if fault.kind == "http460" else 462
            reason = "Login needed." if status == 460 else "Insufficient privilege."
            return web.Response(status=status, content_type="text/html",
                                text=f"<html><body><h1>HTTP Status {status} - {reason}</h1>"
                                     "</body></html>")
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
        """One series as v1/v2 getSeriesMetaData: the real keys in order, every value a
        string, NULL (here: empty) values left out. Descriptions are stripped to
        ``[a-zA-Z0-9 .-]`` (no "NA"), Manufacturer has commas made spaces, the rest is
        raw; "File Location" is the StudyID, as the real server sends it."""
        cfg = self.config.collection(s.collection)
        values = {
            "Series UID": s.series_uid, "Collection": s.collection,
            "3rd Party Analysis": "YES" if cfg.third_party else "NO",
            "Data Description URI": cfg.description_uri, "Subject ID": s.patient_id,
            "Study UID": s.study_uid, "Study Description": _strip(s.study_description),
            "Study Date": _us_date(s.study_date),
            "Series Description": _strip(s.series_description),
            "Manufacturer": s.manufacturer.replace(",", " "), "Modality": s.modality,
            "SOP Class UID": s.sop_class_uid, "Number of Images": str(s.image_count),
            "File Size": str(s.file_size), "File Location": s.study_id,
            "Series Number": _java_float(s.series_number), "License Name": cfg.license_name,
            "License URL": cfg.license_url,
            "Annotation Size": str(sum(size for _, _, size in self.annotations(s))),
            "Date Released": _java_date(cfg.date_released),
            "Series Date": _java_date(s.series_date), "Protocol Name": s.protocol_name,
            "Body Part Examined": s.body_part,
            "Annotations Flag": "true" if self.annotations(s) else "false",
            "Manufacturer Model Name": s.manufacturer_model, "Software Versions": "",
            "TimeStamp": "",
        }
        present = {k for k, v in values.items() if v != ""}
        # A description the database holds stays, even when stripped to nothing.
        present.update(k for k, attr in _DESC_ATTR.items() if getattr(s, attr))
        return {k: values[k] for k in V1_FIELDS if k in present}

    def v4_record(self, s: SeriesRecord, *, authorized: bool = True) -> dict[str, str]:
        """One series as a v4 getSeriesMetadata CSV row, in this build's column names:
        raw values, dates MM-DD-YYYY, the series number as decimal(22,6) text."""
        cfg = self.config.collection(s.collection)
        by_camel = {
            "PatientID": s.patient_id, "PatientName": s.patient_name,
            "PatientBirthDate": "", "PatientSex": s.patient_sex, "EthnicGroup": "",
            "Phantom": "NO", "SpeciesCode": "337915000", "SpeciesDescription": "Homo sapiens",
            "StudyInstanceUID": s.study_uid, "StudyDate": _us_date(s.study_date),
            "StudyDesc": s.study_description, "AdmittingDiagnosisDescription": "",
            "StudyID": s.study_id, "PatientAge": s.patient_age,
            "LongitudinalTemporalEventType": "", "LongitudinalTemporalOffsetFromEvent": "",
            "SeriesInstanceUID": s.series_uid, "Collection": s.collection, "Site": s.collection,
            "Modality": s.modality, "ProtocolName": s.protocol_name,
            "SeriesDate": _us_date(s.series_date), "SeriesDescription": s.series_description,
            "BodyPartExamined": s.body_part, "SeriesNumber": _java_float(s.series_number),
            "AnnotationsFlag": "1" if self.annotations(s) else "0",
            "Manufacturer": s.manufacturer,
            "ManufacturerModelName": s.manufacturer_model, "PixelSpacing(mm)-Row": "0.5",
            "SliceThickness(mm)": "1.0", "SoftwareVersions": "",
            "ImageCount": str(s.image_count), "MaxSubmissionTimestamp": "",
            "LicenseName": cfg.license_name, "LicenseURI": cfg.license_url,
            "DataDescriptionURI": cfg.description_uri, "FileSize": str(s.file_size),
            "ReleasedStatus": "released", "DateReleased": _us_date(cfg.date_released),
            "ThirdPartyAnalysis": "YES" if cfg.third_party else "NO",
            "Authorized": "1" if authorized else "0",
        }
        return {column: by_camel[_CAMEL.get(column, column)] for column in self.build.columns}

    async def _series_metadata(self, request: web.Request, version: str, user: str | None,
                               query: dict[str, str]) -> web.StreamResponse:
        uid = query.get("SeriesInstanceUID", "").strip()
        if not uid:
            return _text(400, "Missing required parameter: SeriesInstanceUID")
        _state(request).series_uid = uid
        await self._hold_metadata()
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
        # The real endpoint reads "list" (repeatable, each comma-joined) and "format", and
        # checks nothing else.
        text = ",".join(str(v) for v in form.getall("list", [])) or query.get("list", "")
        if not text.strip():
            return _text(400, "A form parameter, list, containing at least one "
                              "SeriesInstanceUID is required.")
        await self._hold_metadata()
        seen: dict[str, None] = {}
        for part in text.replace("\n", ",").split(","):
            if part.strip():
                seen.setdefault(part.strip(), None)
        build = self.build
        rows: list[dict[str, str]] = []
        for uid in seen:
            series = self.index.series.get(uid)
            if series is None:
                continue
            visible = self._visible(series, version, user)
            if not visible and not build.unauthorised_rows:
                continue
            row = self.v4_record(series, authorized=visible)
            rows.append(row)
            if build.repeated_rows:  # 9.5: one row per distinct pixel spacing
                spacing = next(c for c in build.columns if c.startswith("Pixel Spacing"))
                rows.append({**row, spacing: "0.7"})
        if not rows:
            return web.Response(status=200, body=b"", content_type="text/csv")
        return _csv_response(build.columns, rows, quote_all=True)

    # -- images -----------------------------------------------------------------------
    async def _get_image(self, request: web.Request, version: str, user: str | None,
                         query: dict[str, str]) -> web.StreamResponse:
        md5 = version == "v4" and _yes(query.get("IncludeMD5"))
        return await self._image(request, version, user, query, md5=md5, license_entry=True)

    async def _get_image_md5(self, request: web.Request, version: str, user: str | None,
                             query: dict[str, str]) -> web.StreamResponse:
        # getImageWithMD5Hash sends no LICENSE entry, on every version.
        return await self._image(request, version, user, query, md5=True, license_entry=False)

    async def _get_dcm_image(self, request: web.Request, version: str, user: str | None,
                             query: dict[str, str]) -> web.StreamResponse:
        # Only "true" (any case) counts, as in V1_getDCMImage; no LICENSE entry.
        md5 = query.get("MD5Verification", "").lower() == "true"
        notes = query.get("IncludeAnnotation", "").lower() == "true"
        return await self._image(request, version, user, query, md5=md5, license_entry=False,
                                 new_names=True, annotations=notes)

    def annotations(self, series: SeriesRecord) -> tuple[tuple[str, str, int], ...]:
        """The series' annotation files: (name, path, size) of every non-DICOM file with an
        annotation suffix in the folders holding its images, by name. The archive index
        reads only DICOM, so they are found here (once per series: cached)."""
        cached = self._annotations.get(series.series_uid)
        if cached is not None:
            return cached
        found: dict[str, tuple[str, str, int]] = {}
        folders = {self.index.image_path(image).parent for image in series.images}
        for folder in sorted(folders):
            try:
                listing = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for item in listing:
                if (item.name.lower().endswith(ANNOTATION_SUFFIXES)
                        and not item.name.startswith(".") and item.is_file()):
                    found.setdefault(item.name, (item.name, item.path, item.stat().st_size))
        result = tuple(found.values())
        self._annotations[series.series_uid] = result
        return result

    def _sop_index(self) -> dict[str, tuple[SeriesRecord, ImageRecord]]:
        if self._sops is None:  # once, at the first per-image request
            self._sops = {image.sop_instance_uid: (series, image)
                          for series in self.index.series.values() for image in series.images}
        return self._sops

    async def _sop_uids(self, request: web.Request, version: str, user: str | None,
                        query: dict[str, str]) -> web.StreamResponse:
        """getSOPInstanceUIDs: JSON ``[{"SOPInstanceUID": ...}]`` (``format=csv``: a
        ``SOPInstanceUID`` header line, then one unquoted UID a line), in database order;
        no images (unknown series) gives 200 and an empty body. v4 has no visibility
        filter (``InstanceDAOImpl.getImages_v4``), v1/v2 do."""
        uid = query.get("SeriesInstanceUID", "").strip()
        if not uid:
            return web.Response(status=400, content_type="application/json",
                                text="A parameter, SeriesInstanceUID is required for this "
                                     "API call.")
        _state(request).series_uid = uid
        series = self.index.series.get(uid) if version == "v4" else \
            self._lookup(uid, version, user)
        if series is None:
            return web.Response(status=200, body=b"")
        sops = [image.sop_instance_uid for image in self.image_order(series)]
        if query.get("format", "").lower() == "csv":
            return web.Response(status=200, content_type="text/csv",
                                text="SOPInstanceUID\n" + "".join(f"{s}\n" for s in sops))
        return web.Response(status=200, content_type="application/json",
                            text=json.dumps([{"SOPInstanceUID": s} for s in sops]))

    async def _image_md5(self, request: web.Request, version: str, user: str | None,
                         query: dict[str, str]) -> web.StreamResponse:
        """v4 getMD5HashForImage: the image's MD5 as text/plain; an image the guest may
        not see or that does not exist: no entity, which Jersey answers 204."""
        found = self._sop_index().get(query.get("SOPInstanceUID", "").strip())
        if found is None or not self._visible(found[0], version, user):
            return web.Response(status=204)
        _state(request).series_uid = found[0].series_uid
        return web.Response(status=200, text=found[1].md5, content_type="text/plain")

    async def _single_image(self, request: web.Request, version: str, user: str | None,
                            query: dict[str, str]) -> web.StreamResponse:
        """getSingleImage: the image's bytes, ``application/dicom`` with a Content-Length
        (the real one answers a byte array) and ``Content-Disposition: attachment;
        filename=<SOP>.dcm`` (unquoted); an unknown or hidden image gives 500 (the real
        DAO returns null and the handler's NPE becomes "Server was not able to process
        your request"). Faults are drawn per SOPInstanceUID (a script keyed by one
        corrupts or resets that image): ``corrupt`` flips a byte at rest, so only the
        image's MD5 shows it; ``short`` ends the body early (a reset)."""
        uid = query.get("SeriesInstanceUID", "").strip()
        sop = query.get("SOPInstanceUID", "").strip()
        if not uid or not sop:
            return web.Response(status=400, content_type="application/json",
                                text="A parameter, SeriesInstanceUID and SOPInstanceUID, are "
                                     "required for this API call.")
        _state(request).series_uid = uid
        found = self._sop_index().get(sop)
        if found is None or found[0].series_uid != uid \
                or self._lookup(uid, version, user) is None:
            return _text(500, "Server was not able to process your request\nnull")
        image = found[1]
        injector = self.injector
        fault, attempt = injector.image_fault(sop)
        _state(request).fault = fault.kind if fault else None
        if fault is not None and fault.kind in STATUS_KINDS:
            return self._http_fault(fault)
        data = bytearray(self.index.image_path(image).read_bytes())
        rng = injector.rng(sop, attempt, "params")
        if fault is not None and fault.kind == "corrupt" and data:
            data[rng.randrange(len(data) // 2, len(data))] ^= 0xFF
        offset: int | None = None
        if fault is not None and fault.kind in ("reset", "stall", "short") and len(data) > 1:
            offset = int(fault.param) if fault.kind == "reset" and fault.param is not None \
                else rng.randrange(1, len(data))
            offset = max(1, min(offset, len(data) - 1))
            if fault.kind == "short":
                fault = Fault("reset")
        response = web.StreamResponse(status=200, headers={
            "Content-Type": "application/dicom",
            "Content-Disposition": f"attachment; filename={_safe_name(sop)}.dcm",
        })
        response.content_length = len(data)
        await response.prepare(request)
        stall = 0.0
        if fault is not None and fault.kind == "stall":
            stall = injector.plan.stall_seconds if fault.param is None else fault.param
        _state(request).bytes_sent = 0
        await self._pump(request, response, iter([bytes(data)]), fault, offset, stall,
                         injector.plan.bandwidth, len(data))
        return response

    async def _md5_hierarchy(self, request: web.Request, version: str, user: str | None,
                             query: dict[str, str]) -> web.StreamResponse:
        """POST v4/getMD5Hierarchy: the MD5 (lowercase hex) of the series' image MD5s,
        sorted and concatenated; an unknown series gives 200 and an empty body. Like the
        real one, no visibility check at series level."""
        form = await request.post()
        names = [*form.keys(), *query.keys()]
        unknown = [n for n in names if n not in _HIERARCHY_PARAMS]
        if unknown:
            return _text(400, f"Invalid form parameter: '{unknown[0][:64]}'. Allowed "
                              f"parameters are: [{', '.join(_HIERARCHY_PARAMS)}]")
        uid = str(form.get("SeriesInstanceUID", "")).strip()
        _state(request).series_uid = uid or None
        series = self.index.series.get(uid)
        if series is None:
            return web.Response(status=200, body=b"", content_type="text/plain")
        digest = hashlib.md5("".join(sorted(i.md5 for i in series.images)).encode(),
                             usedforsecurity=False).hexdigest()
        return web.Response(status=200, text=digest, content_type="text/plain")

    async def _image(self, request: web.Request, version: str, user: str | None,
                     query: dict[str, str], *, md5: bool, license_entry: bool,
                     new_names: bool | None = None,
                     annotations: bool = False) -> web.StreamResponse:
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
        if fault is not None and fault.kind in STATUS_KINDS:
            return self._http_fault(fault)
        rng = injector.rng(uid, attempt, "params")
        if new_names is None:
            new_names = _yes(query.get("NewFileNames"))
        entries = self.zip_entries(series, md5=md5, new_names=new_names, fault=fault, rng=rng,
                                   license_entry=license_entry)
        if annotations:  # after md5hashes.csv and never listed in it, as V1_getDCMImage
            for name, path, _ in self.annotations(series):
                with open(path, "rb") as handle:  # a few KB each: read whole
                    entries.append(deflated_entry(name, handle.read()))
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
        with contextlib.closing(stream_zip(entries)) as chunks:  # type: ignore[type-var]
            await self._pump(request, response, chunks, fault, offset, stall,
                             injector.plan.bandwidth)
        return response

    def image_order(self, series: SeriesRecord) -> list[ImageRecord]:
        """The "database order": arbitrary, but fixed by the server seed and the series."""
        images = list(series.images)
        seeded_rng(self.seed, series.series_uid, "order").shuffle(images)
        return images

    def zip_entries(self, series: SeriesRecord, *, md5: bool, new_names: bool = False,
                    fault: Fault | None = None, rng: Any = None,
                    license_entry: bool = True) -> list[ZipEntry]:
        """LICENSE (getImage only), the images named ``%08d`` plus the stored file's own
        extension, and md5hashes.csv last, with stream faults applied."""
        order = self.image_order(series)
        names = _new_file_names(order) if new_names else [
            f"{i:08d}{_extension(image.relpath)}" for i, image in enumerate(order, start=1)
        ]
        cfg = self.config.collection(series.collection)
        if self.stored:
            images = [stored_entry(name, self.index.image_path(image), image.size, image.crc32)
                      for name, image in zip(names, order, strict=True)]
        else:
            images = [
                ZipEntry(name, image.crc32, image.compressed_size, image.size,
                         blob=self.index.blob_path(image),
                         opener=functools.partial(self.index.open_blob, image))
                for name, image in zip(names, order, strict=True)
            ]
        if fault is not None and fault.kind == "short" and images:
            keep = int(fault.param) if fault.param is not None else rng.randrange(len(images))
            images = images[: max(0, min(keep, len(images) - 1))]
        if fault is not None and fault.kind == "corrupt" and images:
            which = int(fault.param) - 1 if fault.param else rng.randrange(len(images))
            which = max(0, min(which, len(images) - 1))
            images[which] = self._corrupted(images[which], order[which], rng)
        entries = [deflated_entry("LICENSE", cfg.license_entry(series.collection))] \
            if license_entry else []
        entries += images
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
                    stall: float, bandwidth: float | None, length: int | None = None) -> None:
        """``length``: the body's Content-Length, whose last write ends the answer."""
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
                    if length is not None and sent + size >= length:
                        self._downloaded(state)
                    await response.write(view[:size])
                    view = view[size:]
                    sent += size
                    state.bytes_sent = sent
                    if offset is not None and sent >= offset:
                        offset = None
                        if fault is not None and fault.kind == "reset":
                            self._log_request(request, response.status)
                            await reset(request)
                            return
                        await _stall(request, stall)
                    if bandwidth is not None:
                        delay = start + sent / bandwidth - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
            self._log_request(request, response.status)
            await response.write_eof()
            if fault is None:
                self._zip_event().set()
        except ConnectionError:
            state.client_gone = True


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


_CAMEL = {
    "Patient ID": "PatientID", "Patient Name": "PatientName",
    "Patient Birth Date": "PatientBirthDate", "Patient Sex": "PatientSex",
    "Ethnic Group": "EthnicGroup", "Species Code": "SpeciesCode",
    "Species Description": "SpeciesDescription", "Study Instance UID": "StudyInstanceUID",
    "Study Date": "StudyDate", "Study Description": "StudyDesc",
    "Admitting Diagnosis Description": "AdmittingDiagnosisDescription", "Study ID": "StudyID",
    "Patient Age": "PatientAge",
    "Longitudinal Temporal Event Type": "LongitudinalTemporalEventType",
    "Longitudinal Temporal Offset From Event": "LongitudinalTemporalOffsetFromEvent",
    "Series Instance UID": "SeriesInstanceUID", "Project": "Collection",
    "Protocol Name": "ProtocolName", "Series Date": "SeriesDate",
    "Series Description": "SeriesDescription", "Body Part Examined": "BodyPartExamined",
    "Series Number": "SeriesNumber", "Annotations Flag": "AnnotationsFlag",
    "Manufacturer Model Name": "ManufacturerModelName",
    "Pixel Spacing(mm)- Row": "PixelSpacing(mm)-Row",
    "Slice Thickness(mm)": "SliceThickness(mm)", "Software Versions": "SoftwareVersions",
    "Image Count": "ImageCount", "Max Submission Timestamp": "MaxSubmissionTimestamp",
    "License Name": "LicenseName", "License URI": "LicenseURI",
    "Collection URI": "DataDescriptionURI", "Data Description URI": "DataDescriptionURI",
    "File Size": "FileSize", "Released Status": "ReleasedStatus",
    "Date Released": "DateReleased", "Third Party Analysis": "ThirdPartyAnalysis",
}
_DESC_ATTR = {"Study Description": "study_description",
              "Series Description": "series_description"}
_NOT_CLEAN = re.compile(r"[^a-zA-Z0-9 .-]")


def _strip(text: str) -> str:
    """v1/v2's cleaning of descriptions: keep ``[a-zA-Z0-9 .-]``, nothing replaced."""
    return _NOT_CLEAN.sub("", text)


def _extension(relpath: str) -> str:
    """What the real server appends to ``%08d``: the stored name from its last dot."""
    name = relpath.rsplit("/", 1)[-1]
    return name[name.rfind("."):] if "." in name else ""


def _java_date(raw: str) -> str:
    """``java.util.Date.toString()`` of a date: ``Thu Sep 01 00:00:00 CDT 2011``."""

    digits = raw.replace("-", "")
    if len(digits) != 8 or not digits.isdigit():
        return ""
    try:
        day = datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return ""
    return day.strftime("%a %b %d 00:00:00 CDT %Y")


def _us_date(raw: str) -> str:
    """DICOM ``YYYYMMDD`` (or ISO) -> ``MM-DD-YYYY``; anything else passes through."""
    digits = raw.replace("-", "") if len(raw) == 10 and raw[4:5] == "-" else raw
    if len(digits) == 8 and digits.isdigit():
        return f"{digits[4:6]}-{digits[6:8]}-{digits[:4]}"
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
