"""Fault injection of the reference server: every kind, over real HTTP, deterministic."""

from __future__ import annotations

import hashlib
import io
import socket
import time
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from nbia_retriever.server import Fault, FaultPlan, FaultSpecError, ReferenceServer, parse_rate
from nbia_retriever.server.faults import FaultInjector
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


@pytest.fixture
def series(synthetic_archive: ArchiveSummary) -> SynthSeries:
    return next(s for s in synthetic_archive.series if not s.restricted)


def image_url(server: ReferenceServer, endpoint: str = "v1/getImageWithMD5Hash") -> str:
    return f"{server.api_url}/{endpoint}"


def get_zip(http: httpx.Client, server: ReferenceServer, uid: str) -> httpx.Response:
    return http.get(image_url(server), params={"SeriesInstanceUID": uid})


# -- the spec and the draw --------------------------------------------------------------
def test_spec_parser_reads_the_documented_example():
    plan = FaultPlan.parse(
        "reset=0.2,short=0.1,corrupt=0.1,http500=0.1,http429=0.1:2,stall=0.05:3,"
        "latency=0.1,bandwidth=10mbit,max_per_series=2,metadata=yes", seed=7)
    assert (plan.reset, plan.short, plan.corrupt, plan.http500, plan.http429) == (
        0.2, 0.1, 0.1, 0.1, 0.1)
    assert (plan.stall, plan.stall_seconds, plan.retry_after) == (0.05, 3.0, 2.0)
    assert plan.latency == 0.1 and plan.bandwidth == 1_250_000
    assert plan.max_faults_per_series == 2 and plan.metadata and plan.seed == 7
    assert FaultPlan.parse("none") == FaultPlan()
    assert FaultPlan.parse("500=0.5,seed=3") == FaultPlan(http500=0.5, seed=3)


@pytest.mark.parametrize(("text", "rate"), [
    ("10mbit", 1_250_000), ("500kbit", 62_500), ("2mb", 2_000_000), ("512kib", 524_288),
    ("100000", 100_000), ("1MiB/s", 1_048_576)])
def test_rates(text, rate):
    assert parse_rate(text) == rate


@pytest.mark.parametrize(("spec", "message"), [
    ("reset=0.7,short=0.5", "add up to"), ("explode=0.1", "unknown key"),
    ("reset=lots", "not a number"), ("bandwidth=fast", "bandwidth"),
    ("reset=1.5", "between 0 and 1"), ("short=0.1:4", "takes no parameter"),
    ("reset", "key=value")])
def test_spec_errors_are_clear(spec, message):
    with pytest.raises(FaultSpecError, match=message):
        FaultPlan.parse(spec)


def test_bad_script_entries_are_rejected():
    with pytest.raises(FaultSpecError, match="unknown fault"):
        FaultPlan(script={"1.2": ["explode"]})
    with pytest.raises(FaultSpecError, match="zips only"):
        FaultPlan(metadata_script=["reset"])
    assert FaultPlan(script={"1.2": ["429:0", None]}).script["1.2"] == (
        Fault("http429", 0.0), None)


def test_draws_depend_on_seed_series_and_attempt_only():
    plan = FaultPlan(reset=0.3, short=0.3, http500=0.2, seed=5)
    uids = [f"1.2.{n}" for n in range(40)]

    def run(order: list[str]) -> dict[tuple[str, int], str | None]:
        injector = FaultInjector(plan)
        out = {}
        for uid in order:
            for _ in range(3):
                fault, attempt = injector.image_fault(uid)
                out[uid, attempt] = fault.kind if fault else None
        return out

    forward = run(uids)
    assert forward == run(list(reversed(uids)))  # arrival order does not matter
    kinds = set(forward.values())
    assert {"reset", "short", "http500", None} <= kinds
    other = FaultInjector(FaultPlan(reset=0.3, short=0.3, http500=0.2, seed=6))
    assert any(
        (other.image_fault(uid)[0] or Fault("none")).kind != (forward[uid, 1] or "none")
        for uid in uids
    )


# -- each kind over HTTP ----------------------------------------------------------------
def test_http_status_faults(server, http, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["http500", "503", "http429:3",
                                                            None]}, retry_after=9))
    first = get_zip(http, server, series.series_uid)
    assert first.status_code == 500 and "<html" in first.text.lower()
    assert get_zip(http, server, series.series_uid).status_code == 503
    limited = get_zip(http, server, series.series_uid)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    assert get_zip(http, server, series.series_uid).status_code == 200
    assert [r.fault for r in server.requests] == ["http500", "http503", "http429", None]


def test_probabilistic_429_carries_the_plan_retry_after(server, http, series):
    server.set_faults(FaultPlan(http429=1.0, retry_after=4))
    response = get_zip(http, server, series.series_uid)
    assert response.status_code == 429 and response.headers["Retry-After"] == "4"


def test_reset_is_a_client_read_error_after_partial_body(server, http, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["reset:5000", None]}))
    received = bytearray()
    with pytest.raises(httpx.TransportError), http.stream("GET", image_url(server),
                     params={"SeriesInstanceUID": series.series_uid}) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert 0 < len(received) <= 5000
    clean = get_zip(http, server, series.series_uid)
    assert zipfile.ZipFile(io.BytesIO(clean.content)).testzip() is None
    assert len(received) < len(clean.content)


def test_reset_is_a_real_tcp_rst(server, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["reset:3000"]}))
    request = (f"GET /nbia-api/services/v1/getImage?SeriesInstanceUID={series.series_uid} "
               f"HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        got = b""
        with pytest.raises(ConnectionResetError):  # a FIN would give b"" instead
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                got += data
    assert got.startswith(b"HTTP/1.1 200")


def test_short_zip_is_valid_but_misses_images(server, http, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["short:2"]}))
    response = get_zip(http, server, series.series_uid)
    assert response.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    images = [n for n in archive.namelist() if n.endswith(".dcm")]
    assert len(images) == 2 < series.images
    rows = archive.read("md5hashes.csv").decode().splitlines()[1:]
    assert len(rows) == series.images  # the md5 list reveals the loss
    assert archive.namelist()[-1] == "md5hashes.csv"


def test_probabilistic_short_always_drops_something(server, http, series):
    server.set_faults(FaultPlan(short=1.0, seed=3))
    for _ in range(3):
        archive = zipfile.ZipFile(io.BytesIO(get_zip(http, server, series.series_uid).content))
        assert len([n for n in archive.namelist() if n.endswith(".dcm")]) < series.images


def test_corrupt_image_passes_crc_fails_md5(server, http, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["corrupt"]}))
    archive = zipfile.ZipFile(io.BytesIO(get_zip(http, server, series.series_uid).content))
    assert archive.testzip() is None  # CRC and sizes match the (corrupted) data
    listed = dict(line.split(",") for line in
                  archive.read("md5hashes.csv").decode().splitlines()[1:])
    bad = [name for name, digest in listed.items()
           if hashlib.md5(archive.read(name)).hexdigest() != digest]
    assert len(bad) == 1
    original = {hashlib.md5(p.read_bytes()).hexdigest(): p.stat().st_size for p in series.files}
    assert len(archive.read(bad[0])) == original[listed[bad[0]]]


def test_stall_makes_a_client_read_time_out(server, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["stall:5", None]}))
    with httpx.Client(timeout=httpx.Timeout(10, read=0.3)) as client:
        with pytest.raises(httpx.ReadTimeout), client.stream("GET", image_url(server),
                           params={"SeriesInstanceUID": series.series_uid}) as response:
            for _ in response.iter_raw():
                pass
        again = client.get(image_url(server), params={"SeriesInstanceUID": series.series_uid})
        assert again.status_code == 200


def test_max_faults_per_series(server, http, series):
    server.set_faults(FaultPlan(http500=1.0, max_faults_per_series=2))
    statuses = [get_zip(http, server, series.series_uid).status_code for _ in range(4)]
    assert statuses == [500, 500, 200, 200]


def test_script_runs_out_into_clean_answers_and_set_faults_resets(server, http, series):
    server.set_faults(FaultPlan(script={series.series_uid: ["http500"]}))
    assert get_zip(http, server, series.series_uid).status_code == 500
    assert get_zip(http, server, series.series_uid).status_code == 200
    server.set_faults(FaultPlan(script={series.series_uid: ["http500"]}))
    assert get_zip(http, server, series.series_uid).status_code == 500
    server.set_faults(None)
    assert get_zip(http, server, series.series_uid).status_code == 200


def test_metadata_faults(server, http, series):
    url = server.api_url + "/v1/getCollectionValues"
    server.set_faults(FaultPlan(metadata_script=["http503", "http429:0", None]))
    assert [http.get(url).status_code for _ in range(4)] == [503, 429, 200, 200]
    server.set_faults(FaultPlan(http429=1.0))  # metadata off: only zips suffer
    assert http.get(url).status_code == 200
    server.set_faults(FaultPlan(http429=1.0, metadata=True))
    assert http.get(url).status_code == 429


def test_latency_delays_every_answer(server, http):
    server.set_faults(FaultPlan(latency=0.25))
    started = time.perf_counter()
    assert http.get(server.api_url + "/v1/getCollectionValues").status_code == 200
    assert time.perf_counter() - started >= 0.25


def test_bandwidth_cap(server, http, series):
    rate = 100_000  # bytes/s; the series zip is ~57 kB, so at least ~0.5 s
    server.set_faults(FaultPlan(bandwidth=rate))
    started = time.perf_counter()
    body = get_zip(http, server, series.series_uid).content
    elapsed = time.perf_counter() - started
    assert elapsed >= 0.9 * len(body) / rate
