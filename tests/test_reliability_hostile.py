"""Hostile server: nothing a server sends may write outside the download root, crash the
client, publish unverified data or reach the user's terminal as control codes.

Every test serves crafted answers from :mod:`hostile_server` (a real HTTP server on
127.0.0.1) and runs the real engine against it. "Outside the root" is checked by
listing *everything* under the test's temporary folder afterwards: path tricks are
aimed so that, if followed, they would land inside that folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from enginehelpers import downloaded_series, expected_series, write_manifest
from hostile_server import (
    Crafted,
    HostileServer,
    endless_deflate,
    endless_garbage,
    files_of,
    record,
    series_zip,
    zip_bytes,
)
from nbia_retriever import download
from nbia_retriever.models import SeriesState
from nbia_retriever.report import Report
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.server.zipwriter import ZipEntry, deflated_entry
from reliability_helpers import assert_root_clean, metadata_rows, staging_leftovers

ROOT_NAME = "manifest-1700000000000"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(seed=53, collections=1, patients=1, studies=1, series=6, images=2,
                           rows=16, columns=16, restricted=False, awkward=False)


@pytest.fixture(scope="module")
def expected(archive: ArchiveSummary) -> dict[str, dict[str, str]]:
    return expected_series(archive.root)


@pytest.fixture()
def hostile():
    with HostileServer() as srv:
        yield srv


def run(tmp_path: Path, hostile: HostileServer, uids: list[str], *, retries: int = 0,
        **options: object) -> Report:
    cart = write_manifest(tmp_path / "cart.tcia", uids, hostile.download_url, retries=retries)
    return download(cart, tmp_path / "dl", api="v1", backoff_base=0.01, timeout=5.0,
                    **options)


def assert_contained(tmp_path: Path) -> None:
    """Every file the run created is inside the download root."""
    root = tmp_path / "dl" / ROOT_NAME
    for dirpath, _, filenames in os.walk(tmp_path):
        for name in filenames:
            path = Path(dirpath) / name
            if path == tmp_path / "cart.tcia":
                continue
            assert path.is_relative_to(root), f"written outside the download root: {path}"


def assert_failed_cleanly(report: Report, uid: str, cause: str) -> None:
    result = report.results[uid]
    assert result.state == SeriesState.ERROR, (result.state, result.error)
    assert cause in result.error, result.error
    assert "\n" not in result.error and "internal error" not in result.error
    assert uid not in downloaded_series(report.root)
    assert uid not in {r[0] for r in metadata_rows(report.root)}
    assert staging_leftovers(report.root) == []


# ----------------------------------------------------------------- entry names as paths

TRAVERSALS = ["../" * 6 + "ESCAPED-rel", "a/../../../../../../ESCAPED-mid", "..", ".", "",
              "C:\\ESCAPED-drive", "C:ESCAPED-drive2", "\\\\server\\share\\ESCAPED-unc",
              "./.nbia/journal.sqlite", "../metadata.csv", "LICENSE/../../x", "md5hashes.CSV",
              "1-1", "\x1b[31mred\x07", "nul", "a" * 300]


def test_entry_names_that_are_paths_never_escape(tmp_path, hostile, archive, expected):
    series = archive.series[0]
    images = files_of(series)
    # Images under hostile names (absolute, traversing, drive-lettered) ...
    tricks = [str(tmp_path / "ESCAPED-abs.dcm"), "../" * 6 + "ESCAPED-img.dcm"]
    named = [(trick, data) for trick, (_, data) in zip(tricks, images, strict=True)]
    # ... and every other kind of trick as a non-image entry (an "annotation"), listed in
    # md5hashes.csv (the server vouches for it, so it is kept, under a harmless name).
    others = [(name, f"payload {i}".encode()) for i, name in enumerate(TRAVERSALS)]
    others.append((str(tmp_path / "ESCAPED-abs-other"), b"absolute"))
    body = series_zip([*named, *others])
    hostile.series[series.series_uid] = Crafted(record(series), body)
    report = run(tmp_path, hostile, [series.series_uid])
    assert_contained(tmp_path)
    result = report.results[series.series_uid]
    # Accepted (names are never used as paths): the images are exactly the archive's,
    # named from their headers, and every other entry sits flat in the series folder
    # under a harmless name of its own.
    assert result.state == SeriesState.COMPLETE, result.error
    assert_root_clean(report.root, complete=[series.series_uid], expected=expected)
    folder = report.root / result.relpath
    names = [p.name for p in folder.iterdir()]
    assert len(names) == 2 + len(others)
    for name in names:
        assert not name.startswith(".") and not CONTROL.search(name), name
        assert name.lower() not in ("md5hashes.csv", "license", "nul")
    assert sum(1 for n in names if n.endswith(".dcm")) == 2


def test_a_non_image_entry_never_becomes_a_dcm_file(tmp_path, hostile, archive):
    series = archive.series[0]
    body = series_zip([*files_of(series), ("notes.dcm.", b"not DICOM")])
    hostile.series[series.series_uid] = Crafted(record(series), body)
    report = run(tmp_path, hostile, [series.series_uid])
    assert_contained(tmp_path)
    folder = report.root / report.results[series.series_uid].relpath
    assert sum(1 for p in folder.iterdir() if p.suffix == ".dcm") == series.images


def test_two_images_with_one_basename_are_both_md5_checked(tmp_path, hostile, archive):
    # a/1.dcm and b/1.dcm share the basename md5hashes.csv lists: the corrupted one
    # must not slip through because only the other was compared.
    series = archive.series[1]
    (_, good), (_, other) = files_of(series)
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    listed = "00000001.dcm"
    entries = [deflated_entry("LICENSE", b"license"), deflated_entry("a/" + listed, bytes(bad)),
               deflated_entry("b/" + listed, good), deflated_entry("00000002.dcm", other),
               deflated_entry("md5hashes.csv", (
                   f"Filename,MD5Hash\n{listed},{hashlib.md5(good).hexdigest()}\n"
                   f"00000002.dcm,{hashlib.md5(other).hexdigest()}\n").encode())]
    hostile.series[series.series_uid] = Crafted(record(series, images=3),
                                                zip_bytes(entries))
    report = run(tmp_path, hostile, [series.series_uid])
    assert_contained(tmp_path)
    assert_failed_cleanly(report, series.series_uid, "")


def test_duplicate_entry_is_refused(tmp_path, hostile, archive):
    series = archive.series[2]
    images = files_of(series)
    body = series_zip([images[0], images[0], images[1]])
    hostile.series[series.series_uid] = Crafted(record(series), body)
    report = run(tmp_path, hostile, [series.series_uid])
    assert_failed_cleanly(report, series.series_uid, "duplicate zip entry")


# ------------------------------------------------------------------- bombs and endless


@functools.cache
def zeros_deflated(size: int) -> ZipEntry:
    return deflated_entry("x", bytes(size), level=9)


def bomb_entry(name: str, size: int) -> bytes:
    """A DEFLATED entry of ``size`` zero bytes (1000:1), in a zip with its descriptor."""
    return zip_bytes([dataclasses.replace(zeros_deflated(size), name=name)])


@pytest.mark.parametrize(("name", "cause"), [
    ("00000001.dcm", "inflates beyond"),      # an image: capped by the metadata's size
    ("LICENSE", "implausibly large"),         # kept in memory: capped at 16 MiB
    ("md5hashes.csv", "implausibly large"),
])
def test_zip_bomb_is_capped_and_aborted(tmp_path, hostile, archive, name, cause):
    series = archive.series[3]
    # The metadata says ~20 KB; the entry inflates to 300 MiB from ~300 KB on the wire.
    hostile.series[series.series_uid] = Crafted(record(series),
                                                bomb_entry(name, 300 * 1024 * 1024))
    report = run(tmp_path, hostile, [series.series_uid])
    assert_contained(tmp_path)
    assert_failed_cleanly(report, series.series_uid, cause)


@pytest.mark.parametrize(("body", "cause"), [
    (endless_garbage(), "unknown zip record signature"),
    (endless_deflate(), "inflates beyond"),
], ids=["zeros", "deflate"])
def test_endless_body_is_cut_off(tmp_path, hostile, archive, body, cause):
    series = archive.series[4]
    hostile.series[series.series_uid] = Crafted(record(series), body)
    report = run(tmp_path, hostile, [series.series_uid])
    assert_contained(tmp_path)
    assert_failed_cleanly(report, series.series_uid, cause)


def test_endless_error_page_is_not_read_to_the_end(tmp_path, hostile, archive):
    series = archive.series[4]
    hostile.series[series.series_uid] = Crafted(record(series), endless_garbage(),
                                                status=500, content_type="text/plain")
    report = run(tmp_path, hostile, [series.series_uid])
    assert_failed_cleanly(report, series.series_uid, "HTTP 500")
    # Whatever sat in socket buffers aside, the client stopped reading after 64 KiB.
    assert hostile.sent[series.series_uid] < 64 * 1024 * 1024


@pytest.mark.parametrize(("ctype", "body", "cause"), [
    ("text/html; charset=utf-8", b"<html><body>Service down</body></html>", "text/html"),
    ("application/json", b'{"error": "no"}', "application/json"),
    ("application/x-zip-compressed", b"<!doctype html><html>oops</html>",
     "unknown zip record signature"),
    ("application/x-zip-compressed", b"", "empty"),
    ("application/octet-stream", zlib.compress(b"not a zip"), "unknown zip record signature"),
], ids=["html", "json", "html-as-zip", "empty", "zlib"])
def test_status_200_that_is_not_a_zip(tmp_path, hostile, archive, ctype, body, cause):
    series = archive.series[5]
    hostile.series[series.series_uid] = Crafted(record(series), body, content_type=ctype)
    report = run(tmp_path, hostile, [series.series_uid], retries=1)
    assert_failed_cleanly(report, series.series_uid, cause)
    assert report.results[series.series_uid].attempts == 2
    assert hostile.image_requests(series.series_uid) == 2


# ----------------------------------------------------------------- metadata path tricks

METADATA_TRICKS = [
    {"collection": "../../../../ESCAPED", "patient": "../..", "Study Description": "/etc/x"},
    {"collection": "/tmp/ESCAPED-abs", "patient": "C:\\Windows\\x",
     "Series Description": "a/../../../b"},
    {"collection": "..", "patient": ".", "Series Description": "..", "Series Number": "../1"},
    {"collection": "", "patient": "", "study_uid": "", "Series Description": ""},
    {"collection": "CON", "patient": "nul.txt", "Study Description": "x" * 5000},
    {"collection": "evil\x00null", "patient": "line\nbreak\r\n",
     "Study Description": "\x1b]0;owned\x07\x1b[2J", "Series Description": "tab\there\x7f"},
    {"collection": ".nbia", "patient": "staging", "Study Description": "metadata.csv"},
]


def test_metadata_path_tricks_and_control_characters(tmp_path, hostile, archive, expected):
    uids = []
    for series, trick in zip(archive.series, METADATA_TRICKS, strict=False):
        kw = {k: v for k, v in trick.items() if k in ("collection", "patient", "study_uid")}
        extra = {k: v for k, v in trick.items() if k not in kw}
        hostile.series[series.series_uid] = Crafted(record(series, **kw, **extra),
                                                    series_zip(files_of(series)))
        uids.append(series.series_uid)
    report = run(tmp_path, hostile, uids)
    assert report.ok, report.summary()
    assert_contained(tmp_path)
    assert_root_clean(report.root, complete=uids, expected=expected)
    for uid in uids:
        relpath = Path(report.results[uid].relpath)
        assert not relpath.is_absolute() and ".." not in relpath.parts
        assert relpath.parts[0] != ".nbia"
        assert not any(CONTROL.search(part) for part in relpath.parts), relpath
    # metadata.csv: one physical line per series, whatever the descriptions hold (CRLF,
    # as the Java tool writes it).
    lines = (report.root / "metadata.csv").read_bytes().split(b"\r\n")
    assert lines[-1] == b"" and len(lines) == 1 + len(uids) + 1
    assert not any(CONTROL.search(line.decode()) for line in lines)


def test_server_text_never_reaches_the_terminal_as_control_codes(tmp_path, hostile, archive):
    # An error page and a zip entry name, both carrying terminal escape sequences
    # (retitle the window, clear the screen), must come out of the CLI inert.
    evil = "\x1b]0;owned\x07\x1b[2J\x1b[31m"
    first, second = archive.series[0], archive.series[1]
    hostile.series[first.series_uid] = Crafted(
        record(first), f"<p>{evil}</p>".encode(), status=500, content_type="text/plain")
    (name, data), (name2, data2) = files_of(second)
    bad = bytearray(data)
    bad[-1] ^= 1
    md5_list = (f"Filename,MD5Hash\n{evil + name},{hashlib.md5(data).hexdigest()}\n"
                f"{name2},{hashlib.md5(data2).hexdigest()}\n")
    hostile.series[second.series_uid] = Crafted(record(second), zip_bytes([
        deflated_entry(evil + name, bytes(bad)), deflated_entry(name2, data2),
        deflated_entry("md5hashes.csv", md5_list.encode())]))
    cart = write_manifest(tmp_path / "cart.tcia", [first.series_uid, second.series_uid],
                          hostile.download_url, retries=0)
    for mode in ("--json", "--quiet", "--plain"):
        args = [sys.executable, "-m", "nbia_retriever.cli", "download", str(cart), "-d",
                str(tmp_path / mode), "--api", "v1", "--backoff", "0.01"]
        done = subprocess.run([*args, *([mode] if mode != "--plain" else [])],
                              capture_output=True, text=True, timeout=60, check=False)
        output = done.stdout + done.stderr
        assert done.returncode == 1, output
        assert "Traceback" not in output
        assert "\x1b" not in output and "\x07" not in output, repr(output)
        assert "2 series Error" in output
        if mode != "--quiet":
            assert "HTTP 500" in output and "MD5 mismatch" in output
