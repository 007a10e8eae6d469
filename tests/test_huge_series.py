"""A huge series fetched as images, several at once (engine.pieces), over real HTTP.

The reference server plays the v4 per-image API the way the real one answers it
(``getSOPInstanceUIDs`` JSON, ``getSingleImage`` application/dicom, ``getMD5HashForImage``
text/plain); ``pieces_above=0`` makes every series "huge" so a small archive exercises
the path. Every test compares the tree with the archive byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from enginehelpers import downloaded_series, expected_series, write_manifest
from nbia_retriever.api import NbiaClient
from nbia_retriever.engine import Engine
from nbia_retriever.engine.options import DownloadOptions
from nbia_retriever.engine.source import NbiaSource
from nbia_retriever.manifest import read_manifest
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=26, collections=1, patients=2, studies=1, series=2,
                           images=7, rows=48, columns=48)


@pytest.fixture(scope="module")
def expected(archive) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture()
def uids(archive) -> list[str]:
    return [s.series_uid for s in archive.series]


def run(tmp_path: Path, server, uids, *, workers: int = 4, retries: int = 3,
        pieces_above: int | None = 0) -> tuple[Engine, NbiaSource]:
    manifest = read_manifest(write_manifest(tmp_path / "cart.tcia", list(uids),
                                            server.download_url))
    source = NbiaSource(NbiaClient(server.api_url, backoff_base=0.01, timeout=10.0),
                        pieces_above=pieces_above, pieces_fast=None)  # (no link probe)
    options = DownloadOptions(workers=workers, retries=retries, backoff_base=0.01,
                              timeout=10.0, processes=0)
    engine = Engine(manifest, tmp_path / "dl", options, source=source)
    engine.run()
    return engine, source


def sops(server, uid: str) -> list[str]:
    return [image.sop_instance_uid for image in server.index.series[uid].images]


def endpoint_counts(server) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in server.service.requests:
        name = record.path.rpartition("/")[2]
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_server_answers_the_per_image_api_as_the_real_one(serve, archive):
    """The shapes read in CBIIT/NBIA-TCIA (V4_getSOPInstanceUIDs, V4_getSingleImage,
    V4_getMD5HashForImage): JSON list of {"SOPInstanceUID"}, the raw DICOM with an
    unquoted filename, the MD5 as text; unknown images: 500 and 204."""
    server = serve(archive.root)
    series = archive.series[0]
    base = server.api_url + "/v4/"
    with urllib.request.urlopen(base + "getSOPInstanceUIDs?SeriesInstanceUID="
                                + series.series_uid) as answer:
        assert answer.headers["Content-Type"].startswith("application/json")
        listed = [row["SOPInstanceUID"] for row in json.load(answer)]
    assert sorted(listed) == sorted(sops(server, series.series_uid))
    sop = listed[0]
    with urllib.request.urlopen(f"{base}getSingleImage?SeriesInstanceUID="
                                f"{series.series_uid}&SOPInstanceUID={sop}") as answer:
        assert answer.headers["Content-Type"] == "application/dicom"
        assert answer.headers["Content-Disposition"] == f"attachment; filename={sop}.dcm"
        body = answer.read()
        assert int(answer.headers["Content-Length"]) == len(body)
    assert body[128:132] == b"DICM"
    with urllib.request.urlopen(base + "getMD5HashForImage?SOPInstanceUID=" + sop) as answer:
        md5 = answer.read().decode()
    assert md5 == hashlib.md5(body).hexdigest()
    with urllib.request.urlopen(base + "getMD5HashForImage?SOPInstanceUID=1.2.3") as answer:
        assert answer.status == 204
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{base}getSingleImage?SeriesInstanceUID="
                               f"{series.series_uid}&SOPInstanceUID=1.2.3")
    assert caught.value.code == 500
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{base}getSingleImage?SeriesInstanceUID=1&SOPInstanceUID=2&x=1")
    assert caught.value.code == 400


def test_series_in_pieces_is_the_same_tree_within_the_budget(tmp_path, serve, archive,
                                                              uids, expected):
    server = serve(archive.root)
    engine, source = run(tmp_path, server, uids, workers=3)
    report = engine.report
    assert all(r.state == SeriesState.COMPLETE for r in report.results.values()), \
        [(r.state, r.error) for r in report.results.values()]
    got = downloaded_series(engine.root)
    assert got == {uid: expected[uid] for uid in uids}
    counts = endpoint_counts(server)
    images = sum(s.images for s in archive.series)
    assert counts.get("getSingleImage") == images
    assert counts.get("getMD5HashForImage") == images
    assert "getImage" not in counts and source.pieces_series == len(uids)
    # never more image requests at once than the run's budget (3 connections)
    assert 1 <= server.service.peak_downloads <= 3
    # no image left behind: the series' .pieces folders went with them
    assert not any((engine.root / ".nbia").rglob("*.dcm"))


def test_one_huge_series_alone_takes_the_whole_budget(tmp_path, serve, archive, uids,
                                                       expected):
    server = serve(archive.root)
    engine, source = run(tmp_path, server, uids[:1], workers=4)
    assert downloaded_series(engine.root) == {uids[0]: expected[uids[0]]}
    assert server.service.peak_downloads <= 4
    # the first round of images went out on 4 connections: its own and 3 borrowed
    assert source.pieces_series == 1


def test_a_wrong_byte_in_one_image_is_caught_and_only_that_image_fetched_again(
        tmp_path, serve, archive, uids, expected):
    series = archive.series[0]
    server = serve(archive.root)
    bad = sops(server, series.series_uid)[3]
    server.service.set_faults(FaultPlan(script={bad: ["corrupt"]}))
    # one connection: images one after the other, so what each attempt fetched is known
    engine, source = run(tmp_path, server, [series.series_uid], workers=1)
    result = engine.report.results[series.series_uid]
    assert result.state == SeriesState.COMPLETE and result.attempts == 2
    assert downloaded_series(engine.root) == {series.series_uid: expected[series.series_uid]}
    fetched = [r.query.get("SOPInstanceUID") for r in server.service.requests
               if r.path.endswith("/getSingleImage")]
    # every image once, the corrupted one twice: the second attempt kept those before it
    assert sorted(fetched) == sorted([*sops(server, series.series_uid), bad])
    assert source.pieces_reused == fetched.index(bad) > 0


def test_a_wrong_byte_every_time_fails_the_series_naming_the_image(tmp_path, serve, archive):
    series = archive.series[1]
    server = serve(archive.root)
    bad = sops(server, series.series_uid)[0]
    server.service.set_faults(FaultPlan(script={bad: ["corrupt"] * 5}))
    engine, _ = run(tmp_path, server, [series.series_uid], workers=2, retries=1)
    result = engine.report.results[series.series_uid]
    assert result.state != SeriesState.COMPLETE
    assert "MD5" in result.error and bad in result.error
    assert not downloaded_series(engine.root)


def test_a_reset_mid_image_is_retried(tmp_path, serve, archive, expected):
    series = archive.series[2]
    server = serve(archive.root)
    bad = sops(server, series.series_uid)[1]
    server.service.set_faults(FaultPlan(script={bad: ["reset"]}))
    engine, source = run(tmp_path, server, [series.series_uid], workers=1)
    assert downloaded_series(engine.root) == {series.series_uid: expected[series.series_uid]}
    fetched = [r.query.get("SOPInstanceUID") for r in server.service.requests
               if r.path.endswith("/getSingleImage")]
    assert sorted(fetched) == sorted([*sops(server, series.series_uid), bad])
    assert source.pieces_reused == fetched.index(bad)


@pytest.mark.parametrize("build", ["2025-06", "no-v4"])
def test_a_server_without_the_endpoints_gets_one_stream(tmp_path, serve, archive, uids,
                                                         expected, build):
    server = serve(archive.root, build=build)
    engine, source = run(tmp_path, server, uids, workers=2)
    assert downloaded_series(engine.root) == {uid: expected[uid] for uid in uids}
    counts = endpoint_counts(server)
    assert "getSingleImage" not in counts and source.pieces_series == 0
    # asked once at most (2025-06 has v4 but answers 404), then never again this run
    assert counts.get("getSOPInstanceUIDs", 0) <= 1


def test_small_series_stay_one_zip(tmp_path, serve, archive, uids, expected):
    server = serve(archive.root)
    engine, _ = run(tmp_path, server, uids, pieces_above=10**9)
    assert downloaded_series(engine.root) == {uid: expected[uid] for uid in uids}
    counts = endpoint_counts(server)
    assert "getSOPInstanceUIDs" not in counts and "getSingleImage" not in counts


def test_the_default_run_goes_in_pieces_above_the_threshold(tmp_path, serve, archive, uids,
                                                             expected, monkeypatch):
    """The CLI's path: --source auto (IDC's index empty: every series from NBIA) and the
    source from the registry, its threshold from NBIA_PIECES_ABOVE."""
    from nbia_retriever import make_engine

    server = serve(archive.root)
    monkeypatch.setenv("NBIA_PIECES_ABOVE", "0")
    manifest = write_manifest(tmp_path / "cart.tcia", uids[:2], server.download_url)
    engine = make_engine(manifest, tmp_path / "dl", workers=2, backoff_base=0.01,
                         timeout=10.0)
    engine.run()
    assert all(r.state == SeriesState.COMPLETE for r in engine.report.results.values()), \
        [(r.state, r.error) for r in engine.report.results.values()]
    assert downloaded_series(engine.root) == {uid: expected[uid] for uid in uids[:2]}
    counts = endpoint_counts(server)
    assert counts.get("getSingleImage") == sum(s.images for s in archive.series[:2])
    assert "getImage" not in counts and server.service.peak_downloads <= 2


def test_a_later_run_keeps_the_images_an_earlier_one_fetched(tmp_path, serve, archive,
                                                              expected):
    """Resume across runs: the first run fails the series at its 5th image; a kept image
    that was damaged since is fetched anew, the other kept ones are not fetched again."""
    series = archive.series[3]
    server = serve(archive.root)
    listed = server.service.image_order(server.index.series[series.series_uid])
    bad = listed[4].sop_instance_uid  # the 5th image fetched (one at a time)
    server.service.set_faults(FaultPlan(script={bad: ["corrupt"]}))
    engine, _ = run(tmp_path, server, [series.series_uid], workers=1, retries=0)
    assert engine.report.results[series.series_uid].state != SeriesState.COMPLETE
    kept = sorted((engine.root / ".nbia" / "pieces").rglob("*.dcm"))
    assert len(kept) == 4
    damaged = bytearray(kept[0].read_bytes())
    damaged[-1] ^= 0xFF
    kept[0].write_bytes(bytes(damaged))
    server.service.set_faults(None)
    server.service.clear_requests()
    engine, source = run(tmp_path, server, [series.series_uid], workers=1)
    assert engine.report.results[series.series_uid].state == SeriesState.COMPLETE
    assert downloaded_series(engine.root) == {series.series_uid: expected[series.series_uid]}
    fetched = [r for r in server.service.requests if r.path.endswith("/getSingleImage")]
    assert len(fetched) == series.images - 3 and source.pieces_reused == 3
    assert not any((engine.root / ".nbia").rglob("*.dcm"))


def _probed(tmp_path: Path, server, uids, pieces_fast: float) -> tuple[Engine, NbiaSource]:
    manifest = read_manifest(write_manifest(tmp_path / "cart.tcia", list(uids),
                                            server.download_url))
    source = NbiaSource(NbiaClient(server.api_url, backoff_base=0.01, timeout=10.0),
                        pieces_above=0, pieces_fast=pieces_fast)
    options = DownloadOptions(workers=2, retries=1, backoff_base=0.01, timeout=10.0,
                              processes=0)
    engine = Engine(manifest, tmp_path / "dl", options, source=source)
    engine.run()
    return engine, source


def test_a_link_one_stream_fills_keeps_huge_series_whole(tmp_path, serve, archive, uids,
                                                          expected):
    """The first huge series probes the link with one image: where it comes faster than
    PIECES_FAST (here: any rate at all), one zip stream per series for the whole run
    (on loopback pieces ran at 0.6x one stream, for twice the CPU)."""
    server = serve(archive.root)
    engine, source = _probed(tmp_path, server, uids, pieces_fast=1.0)
    assert all(r.state == SeriesState.COMPLETE for r in engine.report.results.values())
    assert downloaded_series(engine.root) == expected
    assert source.probed_rate is not None and source.probed_rate >= 1.0
    assert source.pieces_series == 0
    counts = endpoint_counts(server)
    assert counts.get("getSingleImage") == 1  # the probe, and nothing more
    assert counts.get("getImage") == len(uids)


def test_a_slow_link_takes_huge_series_in_pieces(tmp_path, serve, archive, uids, expected):
    """A link where one image comes slower than PIECES_FAST (here: 0.05 s of latency on
    every answer, and a bar no link reaches) fetches huge series in pieces."""
    server = serve(archive.root)
    server.service.set_faults(FaultPlan(latency=0.05))
    engine, source = _probed(tmp_path, server, uids, pieces_fast=1e12)
    assert all(r.state == SeriesState.COMPLETE for r in engine.report.results.values())
    assert downloaded_series(engine.root) == expected
    assert source.probed_rate is not None and source.probed_rate < 1e12
    assert source.pieces_series == len(uids)
    assert "getImage" not in endpoint_counts(server)
