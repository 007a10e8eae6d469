"""The reference server's S3 mode and the archive's IDC view, over real HTTP.

Both our S3 mode and moto's real S3 server answer the same requests for the same objects
(``s3_fixtures``): listings page and continue alike, objects are the NBIA server's image
bytes, Range works; our faults do what ``server/s3.py`` says; the parquet files carry
idc-index-data's columns and types and agree with the NBIA server's metadata.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
import uuid
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from click.testing import CliRunner

from nbia_retriever.errors import ArchiveError, FaultSpecError
from nbia_retriever.server import ReferenceServer, serve_command
from nbia_retriever.server.idcdata import (
    IdcView,
    collection_id,
    crdc_instance_uuid,
    crdc_series_uuid,
    license_short_name,
    list_objects,
)
from nbia_retriever.server.s3 import S3Faults, S3Server
from reliability_helpers import banner_url, serving

if TYPE_CHECKING:  # imported by pytest as a plugin (below), its asserts rewritten
    from s3_fixtures import S3Archive

# s3_archive, s3_server, s3_serve, moto_s3; shared with other modules, moto started once
pytest_plugins = ["s3_fixtures"]

duckdb = pytest.importorskip("duckdb")
idc_index_data = pytest.importorskip("idc_index_data")

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
BUCKET = "idc-open-data"
INDEX_FILES = ("idc_index", "collections_index", "prior_versions_index")


# -- helpers -------------------------------------------------------------------------
def _tag(el: ET.Element, name: str) -> str:
    found = el.find(NS + name)
    if found is None:
        found = el.find(name)  # an error document has no namespace
    return "" if found is None or found.text is None else found.text


def list_page(http: httpx.Client, endpoint: str, bucket: str = BUCKET,
              **params: str) -> ET.Element:
    response = http.get(f"{endpoint}/{bucket}", params={"list-type": "2", **params})
    assert response.status_code == 200, response.text
    return ET.fromstring(response.content)


def contents(page: ET.Element) -> list[tuple[str, int, str]]:
    return [(_tag(c, "Key"), int(_tag(c, "Size")), _tag(c, "ETag"))
            for c in page.findall(NS + "Contents")]


def list_all(http: httpx.Client, endpoint: str, prefix: str, max_keys: int = 1000
             ) -> tuple[list[tuple[str, int, str]], int]:
    """Every entry under ``prefix`` following continuation tokens; (entries, pages)."""
    params = {"prefix": prefix, "max-keys": str(max_keys)}
    found: list[tuple[str, int, str]] = []
    pages = 0
    while True:
        page = list_page(http, endpoint, **params)
        pages += 1
        found += contents(page)
        assert int(_tag(page, "KeyCount")) == len(contents(page))
        if _tag(page, "IsTruncated") != "true":
            return found, pages
        params["continuation-token"] = _tag(page, "NextContinuationToken")


def error_code(response: httpx.Response) -> str:
    return _tag(ET.fromstring(response.content), "Code")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(params=["ours", "moto"])
def endpoint(request: pytest.FixtureRequest) -> str:
    """The same tests against our S3 mode and against moto's."""
    if request.param == "ours":
        server: S3Server = request.getfixturevalue("s3_server")
        return server.url
    return str(request.getfixturevalue("moto_s3"))


def first_series(s3_archive: S3Archive):
    """A current series that is not the revised one (a plain case)."""
    return next(v for uid, v in sorted(s3_archive.view.current.items())
                if uid != s3_archive.revised)


# -- the parquet files ---------------------------------------------------------------
_DUCK = {"STRING": "VARCHAR", "INTEGER": "BIGINT", "FLOAT": "DOUBLE"}


@pytest.mark.parametrize("name", INDEX_FILES)
def test_index_files_have_idc_index_data_columns_and_types(s3_archive: S3Archive, name: str):
    package = Path(idc_index_data.__file__).parent
    schema = json.loads((package / f"{name}_schema.json").read_text())["columns"]
    ours = duckdb.sql(f"DESCRIBE SELECT * FROM '{s3_archive.index_dir / name}.parquet'"
                      ).fetchall()
    assert [row[0] for row in ours] == [c["name"] for c in schema]
    for (column, kind, *_), spec in zip(ours, schema, strict=True):
        if spec["type"] == "RECORD":
            assert spec["mode"] == "REPEATED"
            assert kind.startswith("STRUCT(") and kind.endswith(")[]"), column
        else:
            assert kind == _DUCK[spec["type"]], column
    # ...and exactly the types of the package's own file (nested structs included)
    real = duckdb.sql(f"DESCRIBE SELECT * FROM '{package / name}.parquet'").fetchall()
    assert [(r[0], r[1]) for r in ours] == [(r[0], r[1]) for r in real]


def _rows(path: Path) -> list[dict[str, object]]:
    rel = duckdb.sql(f"SELECT * FROM '{path}'")
    return [dict(zip(rel.columns, row, strict=True)) for row in rel.fetchall()]


def _nbia_metadata(server: ReferenceServer, uids: list[str]) -> dict[str, dict[str, str]]:
    response = httpx.post(server.api_url + "/v4/getSeriesMetadata",
                          data={"list": ",".join(uids)}, timeout=30)
    assert response.status_code == 200
    return {row["SeriesInstanceUID"]: row for row in csv.DictReader(io.StringIO(response.text))}


def test_index_values_agree_with_the_nbia_servers_metadata(
        s3_archive: S3Archive, serve: Callable[..., ReferenceServer]):
    rows = _rows(s3_archive.index_dir / "idc_index.parquet")
    collections = {r["collection_id"]: r for r in
                   _rows(s3_archive.index_dir / "collections_index.parquet")}
    nbia = _nbia_metadata(serve(s3_archive.root), [str(r["SeriesInstanceUID"]) for r in rows])
    assert sorted(nbia) == sorted(r["SeriesInstanceUID"] for r in rows) == s3_archive.idc_uids
    for row in rows:
        meta = nbia[str(row["SeriesInstanceUID"])]
        uid = meta["SeriesInstanceUID"]
        assert collections[row["collection_id"]]["collection_name"] == meta["Collection"]
        assert row["collection_id"] == meta["Collection"].lower().replace("-", "_")
        assert row["PatientID"] == meta["PatientID"]
        assert row["StudyInstanceUID"] == meta["StudyInstanceUID"]
        month, day, year = meta["StudyDate"].split("-")  # NBIA: MM-DD-YYYY
        assert row["StudyDate"] == f"{year}-{month}-{day}"  # IDC: YYYY-MM-DD
        assert (row["StudyDescription"] or "") == meta["StudyDesc"]
        assert (row["SeriesDescription"] or "") == meta["SeriesDescription"]
        if row["SeriesNumber"] is None:
            assert meta["SeriesNumber"] == ""
        else:
            assert float(str(row["SeriesNumber"])) == float(meta["SeriesNumber"])
        assert row["Modality"] == meta["Modality"]
        assert row["instanceCount"] == int(meta["ImageCount"])
        assert round(float(str(row["series_size_MB"])) * 1e6) == int(meta["FileSize"])
        assert meta["LicenseName"] == "Creative Commons Attribution 4.0 International License"
        assert row["license_short_name"] == "CC BY 4.0"
        assert row["aws_bucket"] == BUCKET
        assert row["crdc_series_uuid"] == str(uuid.uuid5(uuid.NAMESPACE_OID, "series:" + uid))
        assert row["series_aws_url"] == f"s3://{BUCKET}/{row['crdc_series_uuid']}/*"
    source = collections["synth_ct_a"]["sources"][0]
    assert source["license"]["license_short_name"] == "CC BY 4.0"


def test_index_leaves_out_restricted_and_excluded_series_and_lists_the_prior_version(
        s3_archive: S3Archive):
    current = {r["SeriesInstanceUID"]: r for r in
               _rows(s3_archive.index_dir / "idc_index.parquet")}
    prior = _rows(s3_archive.index_dir / "prior_versions_index.parquet")
    restricted = [s.series_uid for s in s3_archive.summary.series if s.restricted]
    assert restricted and not set(restricted) & set(current)
    assert s3_archive.nbia_only not in current
    assert len(prior) == 1
    old = prior[0]
    assert old["SeriesInstanceUID"] == s3_archive.revised
    assert old["crdc_series_uuid"] != current[s3_archive.revised]["crdc_series_uuid"]
    assert old["max_idc_version"] < current[s3_archive.revised]["series_revised_idc_version"]
    assert current[s3_archive.revised]["series_revised_idc_version"] == 22
    assert old["series_aws_url"] == f"s3://{BUCKET}/{old['crdc_series_uuid']}/*"
    assert old["gcs_bucket"] == "public-datasets-idc"


def test_view_helpers():
    assert collection_id("4D-Lung") == "4d_lung"
    assert collection_id("SYNTH-CT-A") == "synth_ct_a"
    assert license_short_name("x", "https://creativecommons.org/licenses/by-nc/3.0/") == \
        "CC BY-NC 3.0"
    assert license_short_name("NLM Terms", "https://example.org/terms") == "NLM Terms"
    assert crdc_series_uuid("1.2.3") == str(uuid.uuid5(uuid.NAMESPACE_OID, "series:1.2.3"))
    assert crdc_instance_uuid("1.2.3.4") == str(
        uuid.uuid5(uuid.NAMESPACE_OID, "instance:1.2.3.4"))


def test_view_rejects_unknown_series_and_buckets(s3_archive: S3Archive):
    with pytest.raises(ArchiveError, match=r"no series 9\.9\.9"):
        IdcView.build(s3_archive.view.index, prior=["9.9.9"])
    uid = s3_archive.idc_uids[0]
    with pytest.raises(ArchiveError, match="not one of IDC's"):
        IdcView.build(s3_archive.view.index, buckets={uid: "my-bucket"})


def test_every_object_is_an_nbia_image_byte_for_byte(
        s3_archive: S3Archive, s3_server: S3Server, http: httpx.Client,
        serve: Callable[..., ReferenceServer]):
    nbia = serve(s3_archive.root)
    for uid, version in s3_archive.view.current.items():
        zipped = http.get(nbia.api_url + "/v1/getImage", params={"SeriesInstanceUID": uid})
        assert zipped.status_code == 200
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            images = sorted(hashlib.md5(archive.read(n)).hexdigest()
                            for n in archive.namelist() if n.endswith(".dcm"))
        served = []
        for obj in version.objects:
            body = http.get(s3_server.object_url(obj)).content
            assert hashlib.md5(body).hexdigest() == obj.md5
            served.append(obj.md5)
        assert sorted(served) == images
    assert len(list_objects(s3_archive.view)) == len(s3_archive.view.objects)


# -- both servers alike --------------------------------------------------------------
def test_listing_pages_and_continues(s3_archive: S3Archive, endpoint: str,
                                     http: httpx.Client):
    version = first_series(s3_archive)
    prefix = version.crdc_series_uuid + "/"
    page = list_page(http, endpoint, prefix=prefix, **{"max-keys": "4"})
    assert _tag(page, "IsTruncated") == "true"
    assert _tag(page, "KeyCount") == "4"
    assert _tag(page, "NextContinuationToken")
    entries, pages = list_all(http, endpoint, prefix, max_keys=4)
    assert pages == 2
    assert entries == [(o.key, o.size, f'"{o.md5}"') for o in version.objects]
    whole, pages = list_all(http, endpoint, prefix)
    assert pages == 1 and whole == entries
    # the bare uuid (no slash) as the prefix, as TCIA's Go retriever lists
    bare, _ = list_all(http, endpoint, version.crdc_series_uuid)
    assert bare == entries


def test_moto_etags_are_plain_md5(s3_archive: S3Archive, moto_s3: str,
                                  http: httpx.Client):
    entries, _ = list_all(http, moto_s3, "")
    assert len(entries) == len(s3_archive.view.objects)
    md5 = {o.key: o.md5 for o in s3_archive.view.objects}
    for key, _size, etag in entries:
        assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
        assert etag == f'"{md5[key]}"'


def test_delimiter_and_v1_listing(s3_archive: S3Archive, endpoint: str,
                                  http: httpx.Client):
    page = list_page(http, endpoint, delimiter="/")
    prefixes = [_tag(p, "Prefix") for p in page.findall(NS + "CommonPrefixes")]
    assert prefixes == sorted({o.key.split("/")[0] + "/" for o in s3_archive.view.objects})
    assert not page.findall(NS + "Contents")
    v1 = http.get(f"{endpoint}/{BUCKET}", params={"prefix": first_series(
        s3_archive).crdc_series_uuid + "/"})
    assert v1.status_code == 200
    assert len(contents(ET.fromstring(v1.content))) == len(first_series(s3_archive).objects)


def test_the_prior_versions_objects_are_served(s3_archive: S3Archive, endpoint: str,
                                               http: httpx.Client):
    old = s3_archive.view.prior[0]
    entries, _ = list_all(http, endpoint, old.crdc_series_uuid + "/")
    assert [e[0] for e in entries] == [o.key for o in old.objects]
    current = s3_archive.view.current[s3_archive.revised]
    assert sorted(e[2] for e in entries) == sorted(f'"{o.md5}"' for o in current.objects)
    body = http.get(f"{endpoint}/{BUCKET}/{old.objects[0].key}").content
    assert hashlib.md5(body).hexdigest() == old.objects[0].md5


def test_range_and_head_match_moto(s3_archive: S3Archive, s3_server: S3Server,
                                   moto_s3: str, http: httpx.Client):
    obj = first_series(s3_archive).objects[0]
    data = obj.path.read_bytes()
    size = len(data)
    cases = {"bytes=10-19": data[10:20], "bytes=-5": data[-5:], f"bytes={size - 3}-": data[-3:],
             "bytes=0-": data, f"bytes=100-{size + 1000}": data[100:]}
    for header, expected in cases.items():
        answers = []
        for url in (s3_server.url, moto_s3):
            response = http.get(f"{url}/{BUCKET}/{obj.key}", headers={"Range": header})
            assert response.status_code == 206, (url, header)
            assert response.content == expected, (url, header)
            answers.append(response.headers["Content-Range"])
        assert answers[0] == answers[1], header
    for url in (s3_server.url, moto_s3):
        response = http.get(f"{url}/{BUCKET}/{obj.key}", headers={"Range": f"bytes={size}-"})
        assert response.status_code == 416
        assert error_code(response) == "InvalidRange"
        head = http.head(f"{url}/{BUCKET}/{obj.key}")
        assert head.status_code == 200
        assert int(head.headers["Content-Length"]) == size
        assert head.headers["ETag"] == f'"{obj.md5}"'
        assert head.content == b""


def test_errors_are_s3_documents(endpoint: str, http: httpx.Client):
    missing = http.get(f"{endpoint}/{BUCKET}/no-such/key.dcm")
    assert missing.status_code == 404 and error_code(missing) == "NoSuchKey"
    assert http.head(f"{endpoint}/{BUCKET}/no-such/key.dcm").status_code == 404
    bucket = http.get(f"{endpoint}/no-such-bucket-here", params={"list-type": "2"})
    assert bucket.status_code == 404 and error_code(bucket) == "NoSuchBucket"


def test_a_bad_continuation_token_is_invalid_argument(s3_server: S3Server,
                                                      http: httpx.Client):
    # (AWS says 400 InvalidArgument; moto 5.2 answers 500, so only ours is checked)
    token = http.get(f"{s3_server.url}/{BUCKET}",
                     params={"list-type": "2", "continuation-token": "not-a-token"})
    assert token.status_code == 400 and error_code(token) == "InvalidArgument"
    keys = http.get(f"{s3_server.url}/{BUCKET}", params={"list-type": "2", "max-keys": "-1"})
    assert keys.status_code == 400 and error_code(keys) == "InvalidArgument"


def test_our_default_page_is_a_thousand_keys(s3_serve: Callable[..., S3Server],
                                             archive_factory: Callable[..., object],
                                             http: httpx.Client):
    summary = archive_factory(seed=5, collections=1, patients=1, series=1, images=1001,
                              rows=4, columns=4, awkward=False, restricted=False)
    server = s3_serve(summary)
    version = next(iter(server.view.current.values()))
    page = list_page(http, server.url, prefix=version.crdc_series_uuid + "/")
    assert len(contents(page)) == 1000 and _tag(page, "IsTruncated") == "true"
    capped = list_page(http, server.url, prefix=version.crdc_series_uuid + "/",
                       **{"max-keys": "5000"})
    assert len(contents(capped)) == 1000
    entries, pages = list_all(http, server.url, version.crdc_series_uuid + "/")
    assert pages == 2 and [e[0] for e in entries] == [o.key for o in version.objects]


def test_a_series_in_another_bucket(s3_archive: S3Archive,
                                    s3_serve: Callable[..., S3Server], http: httpx.Client):
    uid = s3_archive.idc_uids[0]
    server = s3_serve(s3_archive.summary, buckets={uid: "idc-open-data-two"})
    version = server.view.current[uid]
    assert version.aws_url.startswith("s3://idc-open-data-two/")
    entries, _ = list_all(http, server.url, version.crdc_series_uuid + "/")
    assert entries == []  # not in idc-open-data
    page = list_page(http, server.url, bucket="idc-open-data-two",
                     prefix=version.crdc_series_uuid + "/")
    assert len(contents(page)) == len(version.objects)


# -- faults --------------------------------------------------------------------------
def test_corrupt_flips_one_byte_and_then_heals(s3_archive: S3Archive, s3_server: S3Server,
                                               http: httpx.Client):
    version = first_series(s3_archive)
    obj = version.objects[0]
    s3_server.set_faults(S3Faults(corrupt={version.series_uid: 1}))
    bad = http.get(s3_server.object_url(obj))
    assert bad.status_code == 200
    assert bad.headers["ETag"] == f'"{obj.md5}"'
    good = obj.path.read_bytes()
    assert len(bad.content) == len(good)
    assert sum(a != b for a, b in zip(bad.content, good, strict=True)) == 1
    assert http.get(s3_server.object_url(obj)).content == good  # :1 -> once
    assert s3_server.requests[-2].fault == "corrupt"
    # permanent, and only that object
    s3_server.set_faults(S3Faults.parse(f"corrupt={obj.key}"))
    for _ in range(2):
        assert hashlib.md5(http.get(s3_server.object_url(obj)).content).hexdigest() != obj.md5
    other = version.objects[1]
    assert hashlib.md5(http.get(s3_server.object_url(other)).content).hexdigest() == other.md5


def test_missing_object_is_listed_but_not_served(s3_archive: S3Archive,
                                                 s3_server: S3Server, http: httpx.Client):
    version = first_series(s3_archive)
    obj = version.objects[0]
    s3_server.set_faults(S3Faults.parse(f"missing={version.crdc_series_uuid}"))
    entries, _ = list_all(http, s3_server.url, version.crdc_series_uuid + "/")
    assert obj.key in [e[0] for e in entries]
    response = http.get(s3_server.object_url(obj))
    assert response.status_code == 404 and error_code(response) == "NoSuchKey"
    assert http.head(s3_server.object_url(obj)).status_code == 404


def test_slowdown_for_the_first_requests(s3_archive: S3Archive, s3_server: S3Server,
                                         http: httpx.Client):
    obj = first_series(s3_archive).objects[0]
    s3_server.set_faults(S3Faults.parse("slowdown=2:3"))
    for _ in range(2):
        response = http.get(s3_server.object_url(obj))
        assert response.status_code == 503
        assert error_code(response) == "SlowDown"
        assert response.headers["Retry-After"] == "3"
    assert http.get(s3_server.object_url(obj)).status_code == 200
    assert [r.fault for r in s3_server.requests] == ["slowdown", "slowdown", None]


def test_reset_cuts_the_object_midway(s3_archive: S3Archive, s3_server: S3Server,
                                      http: httpx.Client):
    obj = first_series(s3_archive).objects[0]
    s3_server.set_faults(S3Faults(reset={obj.key: 1}))
    received = bytearray()
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)), \
            http.stream("GET", s3_server.object_url(obj)) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            received += chunk
    assert 0 < len(received) < obj.size
    assert bytes(received) == obj.path.read_bytes()[: len(received)]
    record = s3_server.requests[-1]
    assert record.fault == "reset" and record.bytes_sent == obj.size // 2
    assert http.get(s3_server.object_url(obj)).content == obj.path.read_bytes()


def test_truncated_listing_drops_the_last_key_without_saying_so(
        s3_archive: S3Archive, s3_server: S3Server, http: httpx.Client):
    version = first_series(s3_archive)
    prefix = version.crdc_series_uuid + "/"
    keys = [o.key for o in version.objects]
    s3_server.set_faults(S3Faults(truncate={version.series_uid: 2}))
    page = list_page(http, s3_server.url, prefix=prefix)
    assert _tag(page, "IsTruncated") == "false"
    assert [e[0] for e in contents(page)] == keys[:-1]
    paged, pages = list_all(http, s3_server.url, prefix, max_keys=2)  # the 2nd use
    assert pages == 3 and [e[0] for e in paged] == keys[:-1]
    whole, _ = list_all(http, s3_server.url, prefix)  # the count is spent
    assert [e[0] for e in whole] == keys
    # other series are untouched
    other = next(v for v in s3_archive.view.current.values() if v is not version)
    s3_server.set_faults(S3Faults(truncate={version.crdc_series_uuid: None}))
    entries, _ = list_all(http, s3_server.url, other.crdc_series_uuid + "/")
    assert len(entries) == len(other.objects)


def test_multipart_etag(s3_archive: S3Archive, s3_server: S3Server,
                        http: httpx.Client):
    version = first_series(s3_archive)
    s3_server.set_faults(S3Faults(multipart=frozenset({version.series_uid})))
    entries, _ = list_all(http, s3_server.url, version.crdc_series_uuid + "/")
    for (key, _size, etag), obj in zip(entries, version.objects, strict=True):
        assert re.fullmatch(r'"[0-9a-f]{32}-2"', etag), key
        data = obj.path.read_bytes()
        half = (len(data) + 1) // 2
        parts = hashlib.md5(data[:half]).digest() + hashlib.md5(data[half:]).digest()
        assert etag == f'"{hashlib.md5(parts).hexdigest()}-2"'
        got = http.get(s3_server.object_url(obj))
        assert got.headers["ETag"] == etag
        assert hashlib.md5(got.content).hexdigest() == obj.md5


def test_latency_and_rate_slow_each_answer_down(s3_archive: S3Archive,
                                                s3_server: S3Server, http: httpx.Client):
    obj = first_series(s3_archive).objects[0]
    # lower bounds only: an answer cannot come before the server's waits
    s3_server.set_faults(S3Faults.parse("latency=150ms"))
    started = time.perf_counter()
    assert http.get(s3_server.object_url(obj)).status_code == 200
    assert time.perf_counter() - started >= 0.15
    s3_server.set_faults(S3Faults.parse(f"rate={obj.size * 4}"))  # a quarter second
    started = time.perf_counter()
    assert http.get(s3_server.object_url(obj)).content == obj.path.read_bytes()
    assert time.perf_counter() - started >= 0.2


def test_fault_specs():
    plan = S3Faults.parse("latency=50ms,rate=10MB,slowdown=3:2,corrupt=A:1,corrupt=B,"
                          "missing=C,reset=D:2,truncate=E,multipart=F,seed=4")
    assert plan.latency == pytest.approx(0.05)
    assert plan.rate == 10e6
    assert (plan.slowdown, plan.retry_after) == (3, 2.0)
    assert plan.corrupt == {"A": 1, "B": None}
    assert plan.reset == {"D": 2} and plan.missing == {"C": None}
    assert plan.truncate == {"E": None} and plan.multipart == frozenset({"F"})
    assert S3Faults.parse("none") == S3Faults() and not S3Faults().active
    for bad, message in (("corrupt", "key=value"), ("frobnicate=1", "unknown key"),
                         ("corrupt=A:0", "at least 1"), ("latency=soon", "duration"),
                         ("rate=fast", "bandwidth")):
        with pytest.raises(FaultSpecError, match=message):
            S3Faults.parse(bad)


def test_unknown_fault_target_is_an_error(s3_server: S3Server):
    with pytest.raises(FaultSpecError, match="not a series"):
        s3_server.set_faults("corrupt=1.2.3.4")


# -- nbia-retriever serve --s3-port --------------------------------------------------
def test_serve_runs_the_s3_mode_and_writes_the_index(s3_archive: S3Archive,
                                                     tmp_path: Path):
    out = tmp_path / "index"
    version = first_series(s3_archive)
    with serving([str(s3_archive.root), "--port", "0", "--s3-port", "0",
                  "--idc-index-out", str(out), "--idc-revised", s3_archive.revised,
                  "--idc-exclude", s3_archive.nbia_only, "--s3-faults",
                  f"missing={version.series_uid}"]) as lines:
        s3_url = banner_url(lines, "S3:")
        assert any("missing=1 target(s)" in line for line in lines)
        with httpx.Client(timeout=10) as http:
            entries, _ = list_all(http, s3_url, version.crdc_series_uuid + "/")
            assert [e[0] for e in entries] == [o.key for o in version.objects]
            assert http.get(f"{s3_url}/{BUCKET}/{version.objects[0].key}").status_code == 404
            assert http.get(f"{s3_url}/{BUCKET}/{version.objects[1].key}").status_code == 200
        for name in INDEX_FILES:
            assert (out / f"{name}.parquet").read_bytes() == \
                (s3_archive.index_dir / f"{name}.parquet").read_bytes() or \
                _rows(out / f"{name}.parquet") == _rows(s3_archive.index_dir / f"{name}.parquet")


def test_serve_rejects_bad_s3_faults(s3_archive: S3Archive):
    result = CliRunner().invoke(serve_command, [str(s3_archive.root), "--s3-port", "0",
                                                "--s3-faults", "corrupt"])
    assert result.exit_code == 2
    assert "key=value" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(serve_command, [str(s3_archive.root), "--port", "0",
                                                "--s3-port", "0", "--s3-faults",
                                                "corrupt=9.9.9"])
    assert result.exit_code == 1
    assert "not a series" in result.output and "Traceback" not in result.output


def test_objects_stream_from_disk_with_flat_memory(
        s3_serve: Callable[..., S3Server],
        archive_factory: Callable[..., object], http: httpx.Client):
    import tracemalloc

    summary = archive_factory(seed=6, collections=1, patients=1, series=1, images=1,
                              image_bytes=24 * 1024 * 1024, awkward=False, restricted=False)
    server = s3_serve(summary, faults=S3Faults(rate=1e12))  # the paced path too
    obj = server.view.objects[0]
    assert obj.size > 20 * 1024 * 1024
    for faults in (None, S3Faults(rate=1e12)):
        server.set_faults(faults)
        digest = hashlib.md5()
        tracemalloc.start()
        try:
            with http.stream("GET", server.object_url(obj)) as response:
                for chunk in response.iter_raw(64 * 1024):
                    digest.update(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert digest.hexdigest() == obj.md5
        # the server and this client share the process: both hold pieces, never the object
        assert peak < 8 * 1024 * 1024, peak


def test_the_request_log_holds_an_answer_before_its_client_has_it(
        s3_archive: S3Archive, s3_server: S3Server, http: httpx.Client):
    """A test that reads ``requests`` right after a response must find it there."""
    version = first_series(s3_archive)
    for obj in version.objects:
        for method, headers, size in (("GET", {}, obj.size), ("HEAD", {}, 0),
                                      ("GET", {"Range": "bytes=0-9"}, 10)):
            assert http.request(method, s3_server.object_url(obj),
                                headers=headers).status_code in (200, 206)
            record = s3_server.requests[-1]
            assert (record.method, record.path, record.bytes_sent) == (
                method, f"/{BUCKET}/{obj.key}", size)
            assert record.series_uid == version.series_uid
