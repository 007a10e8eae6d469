"""IDC as a source, end to end (issue 23): the reference server's NBIA endpoints and its S3
mode serve the same archive (``tests/s3_fixtures.py``), moto is a real S3, and every
download goes through the CLI or the Python API over real HTTP on 127.0.0.1.

What must hold: a series lands in the same folder with the same bytes whichever source
served it; ``auto`` sends the NBIA server nothing for a series IDC holds; a wrong byte, a
missing object or a short listing is never published (retried, then NBIA under
``auto``); ``.s5cmd`` manifests fetch the version they name; ``verify --server`` checks
IDC series against their bucket.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nbia_retriever import download
from nbia_retriever.engine.journal import Journal
from nbia_retriever.idc.source import IDC_ATTEMPTS
from nbia_retriever.models import SeriesState
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.idcdata import crdc_series_uuid, prior_series_uuid
from nbia_retriever.server.s3 import S3Server
from reliability_helpers import metadata_rows, run_cli, tree

if TYPE_CHECKING:
    from s3_fixtures import S3Archive


def write_tcia(path: Path, server: ReferenceServer, uids: Iterable[str]) -> Path:
    lines = [f"downloadServerUrl={server.download_url}", "includeAnnotation=true",
             "noOfrRetry=2", "databasketId=manifest-idc.tcia", "manifestVersion=3.0",
             "ListOfSeriesToDownload=", *uids]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def rows_without_time(root: Path) -> list[list[str]]:
    """metadata.csv rows, sorted, without the download timestamp column."""
    rows = metadata_rows(root)
    return sorted([cell for i, cell in enumerate(row) if i != len(row) - 1] for row in rows)


def sources(root: Path) -> dict[str, tuple[str, str]]:
    """uid -> (state, source) from the root's journal(s)."""
    found: dict[str, tuple[str, str]] = {}
    for path in sorted((root / ".nbia").glob("journal*.sqlite")):
        with Journal(path, readonly=True) as journal:
            for entry in journal.entries():
                found[entry.uid] = (entry.state, entry.source)
    return found


def image_requests(server: ReferenceServer) -> list[str]:
    """Series whose images the NBIA server was asked for."""
    return [r.series_uid or "" for r in server.requests
            if "getImage" in r.path or "DownloadServlet" in r.path]


def asked_about(server: ReferenceServer, uids: Iterable[str]) -> set[str]:
    """Which of ``uids`` any NBIA request named (path, query or series)."""
    wanted = set(uids)
    seen: set[str] = set()
    for r in server.requests:
        text = " ".join([r.path, *map(str, r.query.values()), r.series_uid or ""])
        seen |= {u for u in wanted if u in text}
    return seen


@pytest.fixture
def nbia(s3_archive: S3Archive, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(s3_archive.root)


def idc_args(s3_archive: S3Archive, endpoint: str) -> list[str]:
    return ["--idc-index", str(s3_archive.index_dir), "--idc-endpoint", endpoint]


def test_a_series_from_idc_lands_byte_for_byte_where_nbia_puts_it(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    uids = s3_archive.idc_uids
    manifest = write_tcia(tmp_path / "m.tcia", nbia, uids)
    by_nbia = run_cli(["download", str(manifest), "-d", str(tmp_path / "nbia"), "--quiet",
                       "--source", "nbia"])
    assert by_nbia.returncode == 0, by_nbia.stderr
    by_idc = run_cli(["download", str(manifest), "-d", str(tmp_path / "idc"), "--quiet",
                      "--source", "idc", *idc_args(s3_archive, s3_server.url)])
    assert by_idc.returncode == 0, by_idc.stderr
    root_nbia, root_idc = tmp_path / "nbia" / "manifest-idc", tmp_path / "idc" / "manifest-idc"
    nbia_tree, idc_tree = tree(root_nbia), tree(root_idc)
    assert sum(p.endswith(".dcm") for p in idc_tree) == sum(
        len(s3_archive.view.current[u].objects) for u in uids)
    assert any(p.endswith("LICENSE") for p in idc_tree)
    assert idc_tree == nbia_tree  # the same folders, names, bytes and LICENSE files
    assert rows_without_time(root_idc) == rows_without_time(root_nbia)
    # The IDC run never asked NBIA for an image, and the journal says where each came from.
    assert not image_requests(nbia) or set(image_requests(nbia)) <= set(uids)
    journal = sources(root_idc)
    for uid in uids:
        state, source = journal[uid]
        assert state == SeriesState.COMPLETE
        # The version of the series (the IDC release that last revised it).
        version = 22 if uid == s3_archive.revised else 1
        assert source == f"idc s3://idc-open-data/{crdc_series_uuid(uid)}/ v{version}"
    assert {s for _, s in sources(root_nbia).values()} == {"nbia"}


def test_auto_sends_the_nbia_server_nothing_for_the_series_idc_holds(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    idc_uids = s3_archive.idc_uids
    uids = [*idc_uids, s3_archive.nbia_only]
    manifest = write_tcia(tmp_path / "m.tcia", nbia, uids)
    done = run_cli(["download", str(manifest), "-d", str(tmp_path), "--quiet",
                    *idc_args(s3_archive, s3_server.url)])  # --source auto: the default
    assert done.returncode == 0, done.stderr
    assert asked_about(nbia, idc_uids) == set()  # no metadata, no image, nothing
    assert image_requests(nbia) and set(image_requests(nbia)) == {s3_archive.nbia_only}
    journal = sources(tmp_path / "manifest-idc")
    assert journal[s3_archive.nbia_only] == (SeriesState.COMPLETE, "nbia")
    assert all(journal[u][1].startswith("idc s3://") for u in idc_uids)
    served = {r.path.split("/")[2] for r in s3_server.requests if r.path.count("/") >= 3}
    assert served == {crdc_series_uuid(u) for u in idc_uids}


def test_idc_only_fails_a_series_the_index_lacks_and_says_so(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    uids = [s3_archive.idc_uids[0], s3_archive.nbia_only]
    manifest = write_tcia(tmp_path / "m.tcia", nbia, uids)
    done = run_cli(["download", str(manifest), "-d", str(tmp_path), "--source", "idc",
                    "--error-report", str(tmp_path / "errors.csv"),
                    *idc_args(s3_archive, s3_server.url)])
    assert done.returncode == 1, done.stderr
    assert "not in IDC's index" in (tmp_path / "errors.csv").read_text()
    assert asked_about(nbia, uids) == set()
    journal = sources(tmp_path / "manifest-idc")
    assert journal[s3_archive.idc_uids[0]][0] == SeriesState.COMPLETE
    assert journal[s3_archive.nbia_only][0] == SeriesState.NO_DATA


@pytest.mark.parametrize("fault", ["corrupt", "missing", "truncate"])
def test_a_bad_idc_copy_is_never_published_and_auto_takes_nbia_s_instead(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server, fault: str) -> None:
    uid = s3_archive.idc_uids[1]
    s3_server.set_faults(f"{fault}={uid}")  # every time: IDC's copy stays bad
    manifest = write_tcia(tmp_path / "m.tcia", nbia, [uid])
    report = download(manifest, tmp_path, idc_index=str(s3_archive.index_dir),
                      idc_endpoint=s3_server.url, backoff_base=0.0, retries=4)
    assert report.ok, report.summary()
    assert report.results[uid].attempts == IDC_ATTEMPTS + 1  # IDC's, then NBIA's
    assert image_requests(nbia) == [uid] * len(image_requests(nbia)) != []
    assert sources(tmp_path / "manifest-idc")[uid] == (SeriesState.COMPLETE, "nbia")
    assert any("IDC's copy failed" in w for w in report.warnings)
    expected = tree(tmp_path / "manifest-idc")
    assert sum(p.endswith(".dcm") for p in expected) == len(
        s3_archive.view.current[uid].objects)


@pytest.mark.parametrize("fault", ["corrupt:1", "missing:1", "truncate:1", "reset:1"])
def test_a_passing_idc_fault_is_retried_from_idc(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server, fault: str) -> None:
    uid = s3_archive.idc_uids[1]
    kind, _, times = fault.partition(":")
    s3_server.set_faults(f"{kind}={uid}:{times}")
    manifest = write_tcia(tmp_path / "m.tcia", nbia, [uid])
    report = download(manifest, tmp_path, source="idc", idc_index=str(s3_archive.index_dir),
                      idc_endpoint=s3_server.url, backoff_base=0.0)
    assert report.ok, report.summary()
    assert report.results[uid].attempts == 2
    assert not image_requests(nbia)


def test_idc_only_never_publishes_a_wrong_byte(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    uid = s3_archive.idc_uids[1]
    s3_server.set_faults(f"corrupt={uid}")
    manifest = write_tcia(tmp_path / "m.tcia", nbia, [uid])
    report = download(manifest, tmp_path, source="idc", idc_index=str(s3_archive.index_dir),
                      idc_endpoint=s3_server.url, backoff_base=0.0, retries=1)
    assert not report.ok
    assert "MD5 mismatch" in (report.results[uid].error or "")
    assert not any(p.endswith(".dcm") for p in tree(tmp_path / "manifest-idc"))


def test_s3_slowdown_is_retried_and_slows_the_run(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    s3_server.set_faults("slowdown=3")
    manifest = write_tcia(tmp_path / "m.tcia", nbia, s3_archive.idc_uids)
    report = download(manifest, tmp_path, source="idc", idc_index=str(s3_archive.index_dir),
                      idc_endpoint=s3_server.url, backoff_base=0.0)
    assert report.ok, report.summary()
    assert sum(r.status == 503 for r in s3_server.requests) == 3


def test_an_s5cmd_manifest_fetches_the_versions_it_names(
        tmp_path: Path, s3_archive: S3Archive, s3_server: S3Server) -> None:
    revised = s3_archive.revised
    current = next(u for u in s3_archive.idc_uids if u != revised)
    manifest = tmp_path / "cohort.s5cmd"
    manifest.write_text(
        "# To download the files in this manifest, install idc-index,\n"
        "# IDC Data Version(s): v21\n"
        f"cp s3://idc-open-data/{prior_series_uuid(revised)}/* .\n"
        f"cp   s3://idc-open-data/{crdc_series_uuid(current)}/*  .\n"
        "cp s3://idc-open-data/00000000-0000-4000-8000-000000000000/* .\n", encoding="utf-8")
    done = run_cli(["download", str(manifest), "-d", str(tmp_path), "--quiet",
                    *idc_args(s3_archive, s3_server.url)])
    assert done.returncode == 0, done.stderr
    assert "00000000-0000-4000-8000-000000000000" in done.stderr  # said, not fatal
    journal = sources(tmp_path / "cohort")
    assert journal[revised] == (SeriesState.COMPLETE,
                                f"idc s3://idc-open-data/{prior_series_uuid(revised)}/ v21 prior")
    assert journal[current][1].startswith(f"idc s3://idc-open-data/{crdc_series_uuid(current)}/")
    prefixes = {r.query.get("prefix", "") for r in s3_server.requests}
    assert f"{crdc_series_uuid(revised)}/" not in prefixes  # the named version only


def test_a_bare_uid_of_a_revised_series_is_the_current_version(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    revised = s3_archive.revised
    manifest = write_tcia(tmp_path / "m.tcia", nbia, [revised])
    report = download(manifest, tmp_path, source="idc", idc_index=str(s3_archive.index_dir),
                      idc_endpoint=s3_server.url)
    assert report.ok, report.summary()
    prefixes = {r.query.get("prefix", "") for r in s3_server.requests if r.query}
    assert prefixes == {f"{crdc_series_uuid(revised)}/"}  # not the prior version's


def test_verify_server_checks_idc_series_against_their_bucket(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    uids = s3_archive.idc_uids[:2]
    manifest = write_tcia(tmp_path / "m.tcia", nbia, uids)
    report = download(manifest, tmp_path, source="idc", idc_index=str(s3_archive.index_dir),
                      idc_endpoint=s3_server.url)
    assert report.ok, report.summary()
    root = tmp_path / "manifest-idc"
    env = {"NBIA_IDC_ENDPOINT": s3_server.url}
    ok = run_cli(["verify", str(root), "--server", "--api-url", nbia.api_url], env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "all match" in ok.stdout
    assert asked_about(nbia, uids) == set()  # the bucket is their server
    victim = next(p for p in sorted(root.rglob("*.dcm")))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = run_cli(["verify", str(root), "--server", "--api-url", nbia.api_url], env=env)
    assert bad.returncode == 1
    assert "mismatch" in bad.stdout and "ETags" in bad.stdout


def test_moto_s3_serves_a_download_like_idc(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer, moto_s3: str) -> None:
    uids = s3_archive.idc_uids
    manifest = write_tcia(tmp_path / "m.tcia", nbia, uids)
    report = download(manifest, tmp_path / "idc", source="idc", processes=1,
                      idc_index=str(s3_archive.index_dir), idc_endpoint=moto_s3)
    assert report.ok, report.summary()
    by_nbia = download(manifest, tmp_path / "nbia", source="nbia")
    assert by_nbia.ok
    assert tree(tmp_path / "idc" / "manifest-idc") == tree(tmp_path / "nbia" / "manifest-idc")


def test_shards_and_a_rerun_work_for_idc_as_for_nbia(
        tmp_path: Path, s3_archive: S3Archive, nbia: ReferenceServer,
        s3_server: S3Server) -> None:
    uids = s3_archive.idc_uids
    manifest = write_tcia(tmp_path / "m.tcia", nbia, uids)
    for k in (1, 2):
        done = run_cli(["download", str(manifest), "-d", str(tmp_path), "--quiet",
                        "--shard", f"{k}/2", "--source", "idc",
                        *idc_args(s3_archive, s3_server.url)])
        assert done.returncode == 0, done.stderr
    journal = sources(tmp_path / "manifest-idc")
    assert sorted(journal) == sorted(uids)
    assert {state for state, _ in journal.values()} == {SeriesState.COMPLETE}
    s3_server.clear_requests()
    again = download(manifest, tmp_path, source="idc", idc_index=str(s3_archive.index_dir),
                     idc_endpoint=s3_server.url)
    assert again.ok and s3_server.requests == []  # a re-run asks the bucket nothing


def test_an_idc_endpoint_over_plain_http_elsewhere_is_refused(tmp_path: Path,
                                                              s3_archive: S3Archive) -> None:
    manifest = tmp_path / "m.txt"
    manifest.write_text(s3_archive.idc_uids[0] + "\n")
    done = run_cli(["download", str(manifest), "-d", str(tmp_path), "--source", "idc",
                    "--idc-index", str(s3_archive.index_dir),
                    "--idc-endpoint", "http://s3.example.org"])
    assert done.returncode == 2
    assert "plain http is accepted only on loopback" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_journal_source_that_is_not_ours_is_never_a_url(tmp_path: Path) -> None:
    from nbia_retriever.idc.verify import IDC_SOURCE

    assert IDC_SOURCE.fullmatch("idc s3://idc-open-data/" + "a" * 8 + "-aaaa-aaaa-aaaa-"
                                + "a" * 12 + "/ v22")
    for hostile in ("idc s3://evil.example.org@x/../", "idc s3://idc-open-data/../../etc/ v1",
                    "idc s3://UPPER/00000000-0000-0000-0000-000000000000/"):
        assert IDC_SOURCE.fullmatch(hostile) is None
