"""Annotation files (issue 25, item 8), as the Java retriever gets them.

The Java CLI asks ``getDCMImage?SeriesInstanceUID=X&IncludeAnnotation=<the manifest's
includeAnnotation>&MD5Verification=...``; the server (``V1_getDCMImage``) sends the
images, then ``md5hashes.csv`` (images only), then each annotation file under its own
name, and the CLI saves them beside the images. metadata.csv's "Number of Images" counts
images only, its "File Size" adds the annotations' bytes. The reference server keeps
annotation files beside a series' images (``generate_archive(annotations=N)``) and serves
them the same way; everything here runs over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever.engine.checks import check_series
from nbia_retriever.engine.staging import Progress, stage_series
from nbia_retriever.errors import IntegrityError
from nbia_retriever.models import SeriesInfo
from nbia_retriever.report import java_size
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries
from test_cli_people import cli

ROOT = "manifest-1700000000000"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    """Three series; the first two carry two annotation files each."""
    return archive_factory(collections=1, patients=1, series=3, images=3, awkward=False,
                           restricted=False, annotations=2)


@pytest.fixture
def srv(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


def series_dir(root: Path, series: SynthSeries) -> Path:
    found = [p.parent for p in root.rglob("*.dcm")
             if p.parent.name.endswith(series.series_uid[-5:])]
    assert len(set(found)) == 1, found
    return found[0]


def manifest(path: Path, srv: ReferenceServer, uids: list[str], include: str | None) -> Path:
    write_manifest(path, uids, srv.download_url)
    text = path.read_text()
    if include is None:
        text = text.replace("includeAnnotation=true\n", "")
    else:
        text = text.replace("includeAnnotation=true", f"includeAnnotation={include}")
    path.write_text(text)
    return path


def test_the_reference_server_serves_annotations_after_the_md5_list(srv, archive):
    """getDCMImage: images, md5hashes.csv (images only), then the annotation files by
    their own names; the metadata gives their size and flag."""
    import httpx

    noted = archive.series[0]
    answer = httpx.get(f"{srv.api_url}/v1/getDCMImage", params={
        "SeriesInstanceUID": noted.series_uid, "IncludeAnnotation": "true",
        "MD5Verification": "true"})
    assert answer.status_code == 200
    names = zipfile.ZipFile(io.BytesIO(answer.content)).namelist()
    assert names[-3:] == ["md5hashes.csv", "069.xml", "1-1.dcm.xml"]
    listed = zipfile.ZipFile(io.BytesIO(answer.content)).read("md5hashes.csv").decode()
    assert "xml" not in listed and len(listed.splitlines()) == 1 + noted.images
    bare = httpx.get(f"{srv.api_url}/v1/getDCMImage",
                     params={"SeriesInstanceUID": noted.series_uid})
    assert [n for n in zipfile.ZipFile(io.BytesIO(bare.content)).namelist()
            if not n.endswith(".dcm")] == []
    meta = httpx.get(f"{srv.api_url}/v1/getSeriesMetaData",
                     params={"SeriesInstanceUID": noted.series_uid}).json()[0]
    assert meta["Annotations Flag"] == "true"
    assert int(meta["Annotation Size"]) == sum(p.stat().st_size for p in noted.annotations)
    plain = httpx.get(f"{srv.api_url}/v1/getSeriesMetaData",
                      params={"SeriesInstanceUID": archive.series[2].series_uid}).json()[0]
    assert (plain["Annotations Flag"], plain["Annotation Size"]) == ("false", "0")


@pytest.mark.parametrize("api", ["v4", "v1"])
def test_include_annotation_true_saves_them_beside_the_images(srv, archive, tmp_path, api):
    """Before: the annotation files never arrived (getImage has none). After: each
    annotated series' folder holds them byte for byte under their own names (one named
    like an image name stays apart from the images), the images are as before,
    metadata.csv counts images only and adds the annotations' bytes to File Size, and a
    series without annotations is fetched with getImage as before."""
    uids = [s.series_uid for s in archive.series]
    manifest(tmp_path / "m.tcia", srv, uids, "true")
    done = cli("download", "--api", api, "-d", "out", "m.tcia", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    root = tmp_path / "out" / ROOT
    for series in archive.series:
        folder = series_dir(root, series)
        images = sorted(p.name for p in folder.glob("*.dcm"))
        assert len(images) == series.images
        notes = {p.name: p.read_bytes() for p in series.annotations}
        kept = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix == ".xml"}
        assert kept == notes
    rows = {r["Series UID"]: r for r in csv.DictReader(
        (root / "metadata.csv").read_text().splitlines())}
    for series in archive.series:
        row = rows[series.series_uid]
        assert row["Number of Images"] == str(series.images)
        extra = sum(p.stat().st_size for p in series.annotations)
        assert row["File Size"] == java_size(series.nbytes + extra)
    asked = {(r.path.rsplit("/", 1)[-1], r.series_uid) for r in srv.requests
             if r.series_uid and "Image" in r.path}
    assert ("getDCMImage", archive.series[0].series_uid) in asked
    plain = {name for name, uid in asked if uid == archive.series[2].series_uid}
    assert plain and all(name.startswith("getImage") for name in plain), plain


@pytest.mark.parametrize(("include", "flag", "expected"), [
    ("false", None, False), (None, None, False), ("false", "yes", True), ("true", "no", False),
])
def test_the_manifest_decides_unless_annotations_says(srv, archive, tmp_path, include, flag,
                                                      expected):
    """As the Java CLI: includeAnnotation=false or absent, no annotations; --annotations
    yes/no overrides the manifest."""
    noted = archive.series[0]
    manifest(tmp_path / "m.tcia", srv, [noted.series_uid], include)
    args = ["download", "-d", "out", "m.tcia"]
    if flag:
        args[1:1] = ["--annotations", flag]
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = series_dir(tmp_path / "out" / ROOT, noted)
    assert bool(list(folder.glob("*.xml"))) is expected


def test_the_python_api_takes_annotations_in_a_fresh_interpreter(srv, archive, tmp_path):
    """nbia_retriever.download(uids, annotations=True): a list of UIDs has no header to
    say includeAnnotation, so the keyword asks for them."""
    noted = archive.series[1]
    script = textwrap.dedent(f"""
        import nbia_retriever
        report = nbia_retriever.download([{noted.series_uid!r}], {str(tmp_path)!r},
                                         api_url={srv.api_url!r}, annotations=True,
                                         progress=False)
        print(report.count(nbia_retriever.SeriesState.COMPLETE))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "1"
    xml = sorted(p.name for p in tmp_path.rglob("*.xml"))
    assert xml == ["069.xml", "1-1.dcm.xml"]


def _zip(entries: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in entries:
            z.writestr(name, data)
    return out.getvalue()


def test_only_entries_after_the_md5_list_pass_unlisted(archive, tmp_path):
    """The check keeps its teeth: an unlisted non-DICOM entry before md5hashes.csv is
    still refused, and after it an entry named like an image (.dcm) is too."""
    import hashlib

    series = archive.series[2]
    images = [(f"{i}.dcm", p.read_bytes()) for i, p in enumerate(series.files, start=1)]
    listed = "Filename,MD5Hash\n" + "".join(
        f"{n},{hashlib.md5(d).hexdigest()}\n" for n, d in images)
    info = SeriesInfo(series.series_uid, image_count=series.images)

    def staged(entries: list[tuple[str, bytes]], name: str) -> None:
        folder = tmp_path / name
        result = stage_series(series.series_uid, info, [_zip(entries)], folder,
                              root=tmp_path, checkpoint=lambda: None, progress=Progress(),
                              on_progress=lambda n: None)
        check_series(series.series_uid, info, result.entries, result.md5_list,
                     md5_required=True)

    staged([*images, ("md5hashes.csv", listed.encode()), ("a.xml", b"<a/>")], "ok")
    with pytest.raises(IntegrityError, match=r"not in md5hashes\.csv"):
        staged([("a.xml", b"<a/>"), *images, ("md5hashes.csv", listed.encode())], "before")
    with pytest.raises(IntegrityError, match=r"x\.dcm"):
        staged([*images, ("md5hashes.csv", listed.encode()), ("x.dcm", b"<html>")], "dcm")
