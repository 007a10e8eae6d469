"""Trees the Java Data Retriever left: adopted, completed, verified against the server.

A tree is built here the way the Java GUI leaves it: its folder names, files named by the
server's NewFileNames rule, md5hashes.csv kept in each series folder, its metadata.csv
(CRLF, unquoted) and a LICENSE per collection. Two series are removed; ``download``
must fetch exactly those two (the server's request log shows no other image request),
``verify --server`` must pass the tree, and fail it, naming the series, once one byte of
one image changes; ``--repair`` then fetches just that series again.
"""

from __future__ import annotations

import io
import shutil
import time
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest

from enginehelpers import java_clean, java_series_folder, write_manifest
from nbia_retriever import download
from nbia_retriever.report import METADATA_HEADER, java_size
from nbia_retriever.server import load_config
from reliability_helpers import metadata_rows, run_cli

BASKET = "manifest-1700000000000"
FAST = {"backoff_base": 0.01, "timeout": 10.0}


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=17, collections=2, patients=2, studies=1, series=2,
                           images=3, restricted=False)


def build_java_tree(archive, server, dest: Path) -> Path:
    """What the Java GUI leaves after downloading every series of ``archive``."""
    root = dest / BASKET
    config = load_config(archive.root)
    rows = []
    with httpx.Client(timeout=30) as http:
        for series in archive.series:
            relpath = java_series_folder(series.files[0], series.collection)
            folder = root / relpath
            folder.mkdir(parents=True)
            zipped = http.get(server.api_url + "/v1/getImageWithMD5Hash",
                              params={"SeriesInstanceUID": series.series_uid,
                                      "NewFileNames": "Yes"}).content
            with zipfile.ZipFile(io.BytesIO(zipped)) as archive_zip:
                archive_zip.extractall(folder)  # 1-01.dcm ... and md5hashes.csv
            ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
            cfg = config.collection(series.collection)
            rows.append(",".join([
                series.series_uid, series.collection, "NO",
                java_clean(cfg.description_uri).replace("-", ""), series.patient_id,
                series.study_uid, java_clean(str(ds.get("StudyDescription", ""))),
                _date(str(ds.get("StudyDate", ""))),
                java_clean(str(ds.get("SeriesDescription", ""))),
                java_clean(str(ds.get("Manufacturer", ""))), str(ds.get("Modality", "")),
                "CT Image Storage", str(ds.SOPClassUID), str(series.images),
                java_size(series.nbytes), "./" + relpath, "2024-08-27T10:00:00.123"]))
            (root / series.collection / "LICENSE").write_text(
                f"License\n\nThe {series.collection} collection is distributed under the "
                f"{cfg.license_name} ({cfg.license_url}). \n", encoding="utf-8")
    (root / "metadata.csv").write_bytes(
        ("\r\n".join([",".join(METADATA_HEADER), *rows]) + "\r\n").encode())
    return root


def _date(raw: str) -> str:
    return f"{raw[4:6]}-{raw[6:8]}-{raw[:4]}" if len(raw) == 8 else ""


def image_requests(server) -> list[str]:
    return [r.series_uid for r in server.requests
            if "getImage" in r.path and r.series_uid and r.status == 200]


def test_a_java_tree_is_adopted_completed_and_verified(tmp_path, archive, serve):
    server = serve(archive.root)
    uids = [s.series_uid for s in archive.series]
    root = build_java_tree(archive, server, tmp_path / "dl")
    server.clear_requests()
    gone = archive.series[1], archive.series[3]
    for series in gone:  # the folder and its metadata.csv row
        shutil.rmtree(root / java_series_folder(series.files[0], series.collection))
    lines = (root / "metadata.csv").read_bytes().split(b"\r\n")
    (root / "metadata.csv").write_bytes(b"\r\n".join(
        line for line in lines if not any(s.series_uid.encode() in line for s in gone)))
    manifest = write_manifest(tmp_path / "cart.tcia", uids, server.download_url,
                              basket=BASKET + ".tcia")
    report = download(manifest, tmp_path / "dl", **FAST)
    assert report.ok, report.summary()
    assert report.adopted == len(uids) - 2
    assert sorted(image_requests(server)) == sorted(s.series_uid for s in gone)
    # Each series once in metadata.csv: the Java rows kept, the two new ones added.
    rows = metadata_rows(root)
    assert sorted(r[0] for r in rows) == sorted(uids)
    assert sum(1 for r in rows if r[16] == "2024-08-27T10:00:00.123") == len(uids) - 2
    # Re-run: nothing at all to fetch.
    server.clear_requests()
    again = download(manifest, tmp_path / "dl", **FAST)
    assert again.ok and again.skipped == len(uids) and image_requests(server) == []

    checked = run_cli(["verify", str(root), "--server", "--api-url", server.api_url],
                      timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"checked {len(uids)} series against the server: all match" in checked.stdout

    victim = archive.series[0]
    folder = root / java_series_folder(victim.files[0], victim.collection)
    image = sorted(folder.glob("*.dcm"))[-1]
    data = bytearray(image.read_bytes())
    data[-1] ^= 0x01
    image.write_bytes(bytes(data))
    checked = run_cli(["verify", str(root), "--server", "--api-url", server.api_url],
                      timeout=60)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    bad = [line for line in checked.stdout.splitlines() if line.startswith("mismatch")]
    assert len(bad) == 1 and victim.series_uid in bad[0], checked.stdout

    server.clear_requests()
    repaired = run_cli(["verify", str(root), "--server", "--api-url", server.api_url,
                        "--repair"], timeout=120)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert image_requests(server) == [victim.series_uid]
    checked = run_cli(["verify", str(root), "--server", "--api-url", server.api_url],
                      timeout=60)
    assert checked.returncode == 0 and "all match" in checked.stdout, checked.stdout


def test_verify_server_on_a_server_without_the_endpoint(tmp_path, archive, serve):
    server = serve(archive.root, build="no-v4")
    uids = [s.series_uid for s in archive.series]
    report = download(write_manifest(tmp_path / "c.tcia", uids, server.download_url),
                      tmp_path / "dl", **FAST)
    assert report.ok
    checked = run_cli(["verify", str(report.root), "--server", "--api-url", server.api_url],
                      timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "not supported by this server" in checked.stdout


def test_an_incomplete_or_unknown_folder_is_named(tmp_path, archive, serve):
    server = serve(archive.root)
    uids = [s.series_uid for s in archive.series]
    report = download(write_manifest(tmp_path / "c.tcia", uids, server.download_url),
                      tmp_path / "dl", **FAST)
    first = report.results[uids[0]]
    sorted((report.root / first.relpath).glob("*.dcm"))[0].unlink()
    checked = run_cli(["verify", str(report.root), "--server", "--api-url", server.api_url],
                      timeout=60)
    assert checked.returncode == 1
    assert f"incomplete {uids[0]}" in checked.stdout and "2 of 3 images" in checked.stdout


def test_a_different_layout_than_the_root_was_made_with_is_exit_2(tmp_path, archive, serve):
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "c.tcia", [archive.series[0].series_uid],
                              server.download_url)
    assert download(manifest, tmp_path / "dl", **FAST).ok
    done = run_cli(["download", str(manifest), "-d", str(tmp_path / "dl"), "--layout",
                    "classic", "--quiet"], timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--layout descriptive" in done.stderr and "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "error" in line]) == 1


def test_timestamps_are_java_iso_local(tmp_path, archive, serve):
    server = serve(archive.root)
    manifest = write_manifest(tmp_path / "c.tcia", [archive.series[0].series_uid],
                              server.download_url)
    before = time.strftime("%Y-%m-%dT")
    report = download(manifest, tmp_path / "dl", **FAST)
    [row] = metadata_rows(report.root)
    assert row[16].startswith(before) and "+" not in row[16] and "Z" not in row[16]
