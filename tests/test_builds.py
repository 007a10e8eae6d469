"""Every NBIA server build gives the Java retriever's tree, byte for byte (issue 12).

The same manifest is downloaded from the reference server playing each build in the
field (current v4, the v4 builds of mid-2025 with their three column sets and their 400
on IncludeMD5, a server without v4), with ``--api v1`` and logged in (v2). Every run must
leave the same files under the same Java folder names, a LICENSE in every collection,
and the same metadata.csv rows (timestamps aside). The expected folder names are worked
out here from the archive's own DICOM headers with the Java rules, independently of the
layout module.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pytest

from enginehelpers import java_series_folder, write_manifest
from nbia_retriever import download
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, load_config

FAST = {"backoff_base": 0.01, "timeout": 10.0}
RUNS = [("current", {}), ("2025-10", {}), ("2025-08", {}), ("2025-06", {}), ("no-v4", {}),
        ("current", {"api": "v1"}), ("current", {"login": True}),
        ("2025-10", {"login": True})]


def tree(root: Path) -> dict[str, str]:
    """relpath -> MD5 of every file the download left (.nbia/ and metadata.csv aside: its
    rows are compared without their timestamps)."""
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and ".nbia" not in p.relative_to(root).parts
            and p.name != "metadata.csv"}


def csv_rows(root: Path) -> list[list[str]]:
    data = (root / "metadata.csv").read_bytes()
    assert data.endswith(b"\r\n") and b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    rows = list(csv.reader(data.decode("utf-8").splitlines()))
    return sorted(row[:-1] for row in rows[1:])  # the timestamp aside


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=7, images=3)


def test_every_build_gives_the_same_java_tree(tmp_path, archive, serve):
    public = [s for s in archive.series if not s.restricted]
    uids = [s.series_uid for s in public]
    results: dict[str, tuple[dict[str, str], list[list[str]]]] = {}
    for build, how in RUNS:
        server = serve(archive.root, build=build)
        name = f"{build}{''.join(f'-{k}' for k in how)}"
        manifest = write_manifest(tmp_path / f"{name}.tcia", uids, server.download_url)
        options: dict[str, object] = {**FAST}
        if how.get("login"):
            options.update(user="alice", password=archive.users["alice"],
                           api_url=server.api_url)
        if "api" in how:
            options["api"] = how["api"]
        report = download(manifest, tmp_path / name, **options)
        assert report.ok, f"{name}: {report.summary()}"
        if build != "current" and not how:
            image_calls = [r.path for r in server.requests if "getImage" in r.path]
            if build == "no-v4":
                assert all("/v1/" in p for p in image_calls), image_calls
            else:  # IncludeMD5 refused once (400), then getImageWithMD5Hash for all
                refused = [r for r in server.requests
                           if r.status == 400 and r.path.endswith("/getImage")]
                assert len(refused) == 1 and "IncludeMD5" in str(refused[0].query)
                assert {p.rsplit("/", 1)[1] for p in image_calls} == {
                    "getImage", "getImageWithMD5Hash"}
        results[name] = (tree(report.root), csv_rows(report.root))
    first_tree, first_rows = next(iter(results.values()))
    for name, (files, rows) in results.items():
        assert files == first_tree, f"{name}: a different tree"
        assert rows == first_rows, f"{name}: different metadata.csv rows"
    # The Java names, from the headers; one LICENSE per collection, in the Java text.
    config = load_config(archive.root)
    folders = {path.rsplit("/", 1)[0] for path in first_tree if path.endswith(".dcm")}
    expected = {java_series_folder(s.files[0], s.collection) for s in public}
    assert folders == expected
    for collection in {s.collection for s in public}:
        cfg = config.collection(collection)
        assert f"{collection}/LICENSE" in first_tree
        text = (tmp_path / RUNS[0][0] / "manifest-1700000000000" / collection /
                "LICENSE").read_text(encoding="utf-8")
        assert text == (f"License\n\nThe {collection} collection is distributed under the "
                        f"{cfg.license_name} ({cfg.license_url}). \nBy downloading the data, "
                        "you agree to abide by terms of this license.\n")
    # metadata.csv in the Java value forms.
    for row in first_rows:
        assert re.fullmatch(r"\d+(\.\d\d (KB|MB|GB))?( B)?", row[14]), row[14]
        assert row[15].startswith(f"./{row[1]}/")
        assert row[12] and row[11]  # SOP Class UID and Name, from the images
        assert re.fullmatch(r"(\d\d-\d\d-\d{4})?", row[7])


def test_a_refused_include_md5_is_never_not_authorized(tmp_path, archive, serve):
    server = serve(archive.root, build="2025-10",
                   faults=FaultPlan())
    uids = [s.series_uid for s in archive.series if not s.restricted][:2]
    report = download(write_manifest(tmp_path / "c.tcia", uids, server.download_url),
                      tmp_path / "dl", **FAST)
    assert report.ok
    assert all(r.attempts == 1 for r in report.results.values())  # the fallback is free
    assert SeriesState.NOT_AUTHORIZED not in {r.state for r in report.results.values()}


@pytest.mark.parametrize(("fault", "words"), [("http460", "login needed"),
                                              ("http462", "insufficient privilege")])
def test_460_and_462_read_as_what_they_mean(tmp_path, archive, serve, fault, words):
    uid = next(s.series_uid for s in archive.series if not s.restricted)
    server = serve(archive.root, faults=FaultPlan(script={uid: [fault]}))
    report = download(write_manifest(tmp_path / "c.tcia", [uid], server.download_url),
                      tmp_path / "dl", **FAST)
    result = report.results[uid]
    assert result.state == SeriesState.NOT_AUTHORIZED and words in result.error
    assert result.attempts == 1
