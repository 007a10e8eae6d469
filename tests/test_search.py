"""Search, carts and manifest tools against the reference server over 127.0.0.1.

The expected answers come from the synthetic archive's own description and DICOM
headers, not from the server, so a server and a client that agree on a wrong answer
still fail.
"""

from __future__ import annotations

import csv
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from click.testing import CliRunner

from enginehelpers import write_manifest
from nbia_retriever import download
from nbia_retriever.api import Credentials, NbiaClient
from nbia_retriever.cli import main
from nbia_retriever.errors import ManifestError, NbiaError, NotPublicError
from nbia_retriever.manifest import api_base_from_download_url, read_manifest
from nbia_retriever.models import SeriesInfo
from nbia_retriever.search import (
    MissingDependencyError,
    collections,
    download_url_for,
    manifest_summary,
    merge_manifests,
    search_series,
    to_dataframe,
    write_cart,
)
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries


@pytest.fixture(scope="module")
def srv(synthetic_archive: ArchiveSummary,
        module_serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    """One server for the module: these tests only read."""
    return module_serve(synthetic_archive.root)


@pytest.fixture(scope="module")
def public(synthetic_archive: ArchiveSummary) -> list[SynthSeries]:
    return [s for s in synthetic_archive.series if not s.restricted]


@pytest.fixture(scope="module")
def manufacturers(synthetic_archive: ArchiveSummary) -> dict[str, str]:
    """series uid -> Manufacturer, read from the archive's files."""
    return {s.series_uid: str(pydicom.dcmread(s.files[0], stop_before_pixels=True,
                                              specific_tags=["Manufacturer"]).Manufacturer)
            for s in synthetic_archive.series}


def run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ------------------------------------------------------------------------- collections


def test_collections_with_counts_match_the_archive(srv, public, synthetic_archive):
    items = collections(srv.api_url, counts=True)
    expected: dict[str, dict[str, Any]] = {}
    for s in public:
        row = expected.setdefault(s.collection, {"collection": s.collection, "patients": set(),
                                                 "series": 0, "images": 0, "size": 0})
        row["patients"].add(s.patient_id)
        row["series"] += 1
        row["images"] += s.images
        row["size"] += s.nbytes
    for row in expected.values():
        row["patients"] = len(row["patients"])
    assert items == sorted(expected.values(), key=lambda r: r["collection"].casefold())
    # Without counts: names only, no extra requests per collection.
    srv.clear_requests()
    assert collections(srv.api_url) == [{"collection": r["collection"]} for r in items]
    assert not [r for r in srv.requests if r.path.endswith(("/getSeries", "/getPatient"))]


def test_login_shows_the_restricted_collection(srv, synthetic_archive):
    restricted = {s.collection for s in synthetic_archive.series if s.restricted}
    assert restricted, "the session archive should have a restricted collection"
    anonymous = {c["collection"] for c in collections(srv.api_url)}
    alice = Credentials("alice", synthetic_archive.users["alice"])
    logged_in = {c["collection"] for c in collections(srv.api_url, credentials=alice)}
    assert not restricted & anonymous
    assert restricted <= logged_in


def test_collections_cli_table_and_json(srv, public):
    result = run("collections", "--api-url", srv.api_url, "--counts")
    assert result.exit_code == 0, result.output
    names = sorted({s.collection for s in public})
    assert f"{len(names)} collections" in result.output
    for name in names:
        assert name in result.output
    result = run("collections", "--api-url", srv.api_url, "--json")
    assert [json.loads(line)["collection"] for line in result.output.splitlines()] == names


# ------------------------------------------------------------------------------ search


def test_each_filter_selects_exactly_the_matching_series(srv, public, manufacturers):
    first = public[0]

    def uids(**filters: str) -> set[str]:
        return {r.series_uid for r in search_series(srv.api_url, **filters)}

    assert uids(collection=first.collection) == {
        s.series_uid for s in public if s.collection == first.collection}
    assert uids(collection=first.collection.lower()) == uids(collection=first.collection)
    assert uids(patient=first.patient_id) == {
        s.series_uid for s in public if s.patient_id == first.patient_id}
    assert uids(study=first.study_uid) == {
        s.series_uid for s in public if s.study_uid == first.study_uid}
    assert uids(modality="ct") == {s.series_uid for s in public}
    assert uids(modality="MR") == set()
    assert uids(body_part="chest") == {s.series_uid for s in public}
    assert uids(body_part="HEAD") == set()
    maker = manufacturers[first.series_uid]
    picked = uids(collection=first.collection, manufacturer=maker)
    assert picked == {s.series_uid for s in public
                      if s.collection == first.collection and manufacturers[s.series_uid] == maker}
    assert picked < uids(collection=first.collection) or len(set(manufacturers.values())) == 1


def test_search_records_carry_counts_and_sizes(srv, public):
    by_uid = {s.series_uid: s for s in public}
    records = search_series(srv.api_url, modality="CT")
    assert len(records) == len(public)
    for r in records:
        assert isinstance(r, SeriesInfo)
        assert (r.image_count, r.file_size) == (by_uid[r.series_uid].images,
                                                by_uid[r.series_uid].nbytes)
        assert r.collection == by_uid[r.series_uid].collection


def test_search_needs_a_filter(srv):
    with pytest.raises(ValueError, match="at least one filter"):
        search_series(srv.api_url)
    result = CliRunner().invoke(main, ["search", "--api-url", srv.api_url])
    assert result.exit_code == 2
    assert "at least one filter" in result.output
    assert "Traceback" not in result.output


class StubClient:
    """Stands in for a server that refuses (400) or ignores the optional parameters."""

    def __init__(self, rows: list[dict[str, str]], *, refuse: bool) -> None:
        self.rows = rows
        self.refuse = refuse
        self.calls: list[dict[str, str]] = []

    def series(self, **params: str) -> list[dict[str, str]]:
        self.calls.append(params)
        if self.refuse and {"BodyPartExamined", "Manufacturer"} & set(params):
            raise NotPublicError("getSeries: HTTP 400 unknown parameter", status=400)
        return [r for r in self.rows if r["Collection"] == params.get("Collection", "")]


ROWS = [
    {"SeriesInstanceUID": "1.2.1", "Collection": "C", "Manufacturer": "GE",
     "BodyPartExamined": "CHEST", "Modality": "CT"},
    {"SeriesInstanceUID": "1.2.2", "Collection": "C", "Manufacturer": "Siemens",
     "BodyPartExamined": "CHEST", "Modality": "CT"},
    {"SeriesInstanceUID": "1.2.3", "Collection": "C", "Manufacturer": "GE",
     "BodyPartExamined": "HEAD", "Modality": "CT"},
]


@pytest.mark.parametrize("refuse", [False, True])
def test_filters_the_server_ignores_or_refuses_are_applied_here(refuse):
    stub = StubClient(ROWS, refuse=refuse)
    found = search_series(collection="C", manufacturer="ge", body_part="Chest",
                          client=stub)  # type: ignore[arg-type]
    assert [r.series_uid for r in found] == ["1.2.1"]
    assert stub.calls[-1] == ({"Collection": "C"} if refuse else
                              {"Collection": "C", "Manufacturer": "ge",
                               "BodyPartExamined": "Chest"})


def test_search_cli_writes_a_cart_that_download_fetches(srv, public, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    collection = public[0].collection
    wanted = [s for s in public if s.collection == collection]
    result = run("search", "--api-url", srv.api_url, "--collection", collection,
                 "--modality", "CT", "-o", "x-ct.tcia", "--csv", "x-ct.csv")
    assert result.exit_code == 0, result.output
    images = sum(s.images for s in wanted)
    assert f"{len(wanted)} series, {images} images" in result.output
    cart = read_manifest("x-ct.tcia")
    assert set(cart.series_uids) == {s.series_uid for s in wanted}
    assert cart.download_server_url == srv.download_url
    assert api_base_from_download_url(cart.download_server_url).rstrip("/") == srv.api_url
    assert cart.databasket_id == "x-ct.tcia"
    with open("x-ct.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["SeriesInstanceUID"]: int(r["FileSize"]) for r in rows} == {
        s.series_uid: s.nbytes for s in wanted}
    assert read_manifest("x-ct.csv").series_uids == cart.series_uids
    # The README's second command: the cart downloads completely, into x-ct/.
    report = download("x-ct.tcia", "data", backoff_base=0.01, timeout=10.0)
    assert report.ok, report.summary()
    assert report.root == Path("data", "x-ct")
    assert len(report.completed) == len(wanted)


def test_search_with_no_match_fails_cleanly_and_writes_nothing(srv, tmp_path):
    cart = tmp_path / "none.tcia"
    result = run("search", "--api-url", srv.api_url, "--modality", "MR", "-o", str(cart))
    assert result.exit_code == 1
    assert "no series match modality=MR" in result.output
    assert not cart.exists()


def test_search_json_lines(srv, public):
    result = run("search", "--api-url", srv.api_url, "--body-part", "CHEST", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.output.splitlines()]
    assert {r["series_uid"] for r in records} == {s.series_uid for s in public}


def test_download_url_for_inverts_the_manifest_rule(srv):
    assert download_url_for(srv.api_url) == srv.download_url
    assert download_url_for(srv.api_url + "/v4/") == srv.download_url
    assert download_url_for("https://u:pw@host.org/pre/nbia-api/services") == (
        "https://host.org/pre/nbia-download/servlet/DownloadServlet")
    assert "nbia.cancerimagingarchive.net" in download_url_for(None)
    with pytest.raises(NbiaError, match="not an http"):
        download_url_for("ftp://host/nbia-api/services")


def test_write_cart_refuses_an_empty_selection(tmp_path):
    with pytest.raises(ManifestError, match="no series"):
        write_cart([], tmp_path / "empty.tcia", "http://127.0.0.1:1/nbia-api/services")


def test_to_dataframe_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas") as info:
        to_dataframe([SeriesInfo("1.2.3")])
    assert isinstance(info.value, MissingDependencyError)
    assert isinstance(info.value, NbiaError)


def test_to_dataframe_passes_one_row_per_series(monkeypatch):
    seen: dict[str, Any] = {}

    def frame(rows: list[dict[str, Any]], columns: list[str]) -> str:
        seen.update(rows=rows, columns=columns)
        return "frame"

    monkeypatch.setitem(sys.modules, "pandas", types.SimpleNamespace(DataFrame=frame))
    records = [SeriesInfo("1.2.3", collection="C", image_count=5),
               SeriesInfo("1.2.4", modality="CT")]
    assert to_dataframe(records) == "frame"
    assert seen["columns"][0] == "series_uid" and "extra" not in seen["columns"]
    assert [r["series_uid"] for r in seen["rows"]] == ["1.2.3", "1.2.4"]
    assert seen["rows"][0]["image_count"] == 5


# ---------------------------------------------------------------------------- manifest


def test_merge_keeps_order_drops_duplicates_and_first_headers(tmp_path):
    url = "http://127.0.0.1:9/nbia-download/servlet/DownloadServlet"
    a = write_manifest(tmp_path / "a.tcia", ["1.1", "1.2", "1.3"], url, retries=7)
    b = write_manifest(tmp_path / "b.tcia", ["1.3", "1.4", "1.1", "1.5"], url, retries=2)
    lst = tmp_path / "more.txt"
    lst.write_text("1.6\n1.4\n", encoding="utf-8")
    out = tmp_path / "c.tcia"
    result = run("manifest", "merge", str(a), str(b), str(lst), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "6 series from 3 manifests (3 duplicates dropped)" in result.output
    merged = read_manifest(out)
    assert merged.series_uids == ("1.1", "1.2", "1.3", "1.4", "1.5", "1.6")
    assert merged.retries == 7
    assert merged.download_server_url == url
    assert merged.databasket_id == "c.tcia"  # its own download folder, not a.tcia's


def test_merge_refuses_two_servers_unless_forced(tmp_path):
    a = write_manifest(tmp_path / "a.tcia", ["1.1"],
                       "https://one.org/nbia-download/servlet/DownloadServlet")
    b = write_manifest(tmp_path / "b.tcia", ["1.2"],
                       "https://two.org/nbia-download/servlet/DownloadServlet")
    out = tmp_path / "c.tcia"
    result = run("manifest", "merge", str(a), str(b), "-o", str(out))
    assert result.exit_code == 2
    assert "b.tcia" in result.output and "a.tcia" in result.output
    assert "two.org" in result.output and "--force" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    path, written, dropped = merge_manifests([a, b], out, force=True)
    assert (written, dropped) == (2, 0)
    assert read_manifest(path).download_server_url.startswith("https://one.org/")
    # Same server spelled differently (case, trailing path): not a conflict.
    c = write_manifest(tmp_path / "c2.tcia", ["1.3"],
                       "https://ONE.org/nbia-download/servlet/DownloadServlet")
    assert merge_manifests([a, c], tmp_path / "d.tcia")[1] == 2


def test_merge_reports_a_bad_input_by_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1.2.3\nnot a uid\n", encoding="utf-8")
    result = run("manifest", "merge", str(bad), "-o", str(tmp_path / "x.tcia"))
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output


def test_manifest_info_offline_and_from_the_server(srv, public, tmp_path):
    uids = [s.series_uid for s in public] + ["1.2.3.999"]
    m = write_manifest(tmp_path / "m.tcia", uids, srv.download_url)
    srv.clear_requests()
    result = run("manifest", "info", str(m), "--offline")
    assert result.exit_code == 0, result.output
    assert f"series:          {len(uids)}" in result.output
    assert srv.download_url in result.output
    assert not srv.requests, "--offline must not talk to the server"

    info = manifest_summary(m)
    assert info["series"] == len(uids)
    assert info["images"] == sum(s.images for s in public)
    assert info["size"] == sum(s.nbytes for s in public)
    assert info["not_available"] == ["1.2.3.999"]
    assert {k: v["series"] for k, v in info["collections"].items()} == {
        c: sum(1 for s in public if s.collection == c) for c in {s.collection for s in public}}
    result = run("manifest", "info", str(m))
    assert result.exit_code == 0, result.output
    assert f"images:          {info['images']:,}" in result.output
    assert "not available:   1 series" in result.output


def test_manifest_info_uses_an_explicit_client(srv, public, tmp_path):
    m = write_manifest(tmp_path / "m.tcia", [public[0].series_uid],
                       "http://127.0.0.1:9/nbia-download/servlet/DownloadServlet")
    with NbiaClient(srv.api_url) as client:  # the manifest's own server does not exist
        info = manifest_summary(m, client=client)
    assert info["images"] == public[0].images
