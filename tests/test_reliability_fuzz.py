"""Fuzzing: random manifests and damaged zip streams, through the real code paths.

Two properties. A manifest, whatever its bytes, either parses or raises
:class:`ManifestError` with a one-line message (never another exception: that would be a
traceback for the user). A series zip, truncated or bit-flipped anywhere and split into
chunks anyhow, fed through the *engine* (stream reader, staging, MD5 and count checks,
naming, publishing) never crashes the engine and never publishes anything but the exact
original files: either the series completes byte-identical, or it fails and nothing of it
is left outside the staging area.

test_zipstream.py fuzzes the stream reader on its own; this file adds everything after
it, which is where a wrong file would actually get published.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_server import series_zip
from nbia_retriever.api import MetadataBatch
from nbia_retriever.engine import DownloadOptions, Engine, Verdict
from nbia_retriever.errors import ManifestError
from nbia_retriever.manifest import Manifest, parse_manifest, read_manifest
from nbia_retriever.models import SeriesInfo, SeriesState
from nbia_retriever.server.synth import ArchiveSummary

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ------------------------------------------------------------------------------ manifests

_FRAGMENTS = [
    "downloadServerUrl=", "https://services.cancerimagingarchive.net/nbia-api/services/v1",
    "http://127.0.0.1:1/nbia-download/servlet/DownloadServlet", "includeAnnotation=",
    "true", "false", "maybe", "noOfrRetry=", "4", "-1", "1e9", "99999999999999999999",
    "databasketId=", "manifest-1.tcia", "../../etc/passwd.tcia", "manifestVersion=", "3.0",
    "ListOfSeriesToDownload=", "1.2.3", "1.2.840.113619.2.55.3", "01.2", "1..2", "1.2.",
    "Series Instance UID", "SeriesInstanceUID,Collection", ",", ";", "\t", "#", "=", "==",
    "\\", "\\u0000", "\x00", "\ufeff", "\r", "\n", "\r\n", " ", "é", "\U0001F600", "\udcff",
    "<html>", "PK\x03\x04", "a" * 300,
]
fragments = st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=12)),
                     max_size=40).map("".join)


def _exercise(manifest: Manifest) -> None:
    """Every property a front end reads must work or raise ManifestError too."""
    for name in ("download_server_url", "retries", "databasket_id", "version",
                 "include_annotation", "root_name"):
        with contextlib.suppress(ManifestError):
            getattr(manifest, name)
    assert all(isinstance(uid, str) and uid for uid in manifest.series_uids)


def test_bare_cr_and_nul_are_a_manifest_error() -> None:
    with pytest.raises(ManifestError, match=r"fuzz\.tcia"):
        parse_manifest("\n\r\x00", source="fuzz.tcia")


def test_cli_turns_any_manifest_slip_into_one_line_exit_2(tmp_path) -> None:
    bad = tmp_path / "bad.tcia"
    bad.write_bytes(b"\n\r\x00")
    done = subprocess.run([sys.executable, "-m", "nbia_retriever.cli", "download", str(bad),
                           "-d", str(tmp_path / "dl")], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "bad.tcia" in done.stderr


@FUZZ
@given(text=fragments)
def test_any_manifest_text_parses_or_raises_manifest_error(text: str) -> None:
    try:
        manifest = parse_manifest(text, source="fuzz.tcia")
    except ManifestError as exc:
        assert "\n" not in str(exc) and str(exc).strip()
        return
    _exercise(manifest)


@FUZZ
@given(data=st.binary(max_size=400) | fragments.map(lambda t: t.encode("utf-8", "replace")),
       suffix=st.sampled_from([".tcia", ".csv", ".tsv", ".txt", ".xlsx", ""]))
def test_any_manifest_file_reads_or_raises_manifest_error(tmp_path_factory, data: bytes,
                                                          suffix: str) -> None:
    path = tmp_path_factory.mktemp("m") / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        assert "\n" not in str(exc)
        return
    _exercise(manifest)


# --------------------------------------------------------------------- damaged zip streams


@pytest.fixture(scope="module")
def original(
        archive_factory: Callable[..., ArchiveSummary]) -> tuple[bytes, dict[str, bytes], str]:
    """A real series zip as the server streams it, the files it holds, its series UID."""
    archive = archive_factory(seed=61, collections=1, patients=1, studies=1, series=1,
                              images=3, rows=16, columns=16, restricted=False, awkward=False)
    files = {f"{i:08d}.dcm": p.read_bytes()
             for i, p in enumerate(archive.series[0].files, start=1)}
    return series_zip(list(files.items())), files, archive.series[0].series_uid


class _Stream:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self.bytes_received = 0

    def chunks(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.bytes_received += len(chunk)
            yield chunk


class StubSource:
    """A second Source (the engine's seam): fixed metadata, the damaged bytes as the stream."""

    name = "stub"

    def __init__(self, info: SeriesInfo, chunks: list[bytes]) -> None:
        self.info = info
        self.chunks = chunks

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def metadata_batches(self, uids):  # type: ignore[no-untyped-def]
        yield MetadataBatch(list(uids), {u: self.info for u in uids
                                         if u == self.info.series_uid})

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return SeriesState.NOT_AUTHORIZED, "unknown"

    @contextlib.contextmanager
    def open(self, info: SeriesInfo) -> Iterator[_Stream]:
        yield _Stream(self.chunks)

    def verdict(self, error: Exception) -> Verdict:
        return Verdict(retry=True)

    def close(self) -> None:
        pass


def damage(data: st.DataObject, blob: bytes) -> tuple[bytes, str]:
    kind = data.draw(st.sampled_from(["truncate", "flip", "flips", "none"]))
    if kind == "truncate":
        cut = data.draw(st.integers(0, len(blob) - 1))
        return blob[:cut], f"truncated at {cut}"
    damaged = bytearray(blob)
    count = {"flip": 1, "flips": data.draw(st.integers(2, 8)), "none": 0}[kind]
    for _ in range(count):
        pos = data.draw(st.integers(0, len(blob) - 1))
        damaged[pos] ^= 1 << data.draw(st.integers(0, 7))
    return bytes(damaged), f"{count} bit flips"


def chunked(data: st.DataObject, blob: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=6)))
    edges = [0, *cuts, len(blob)]
    return [blob[a:b] for a, b in itertools.pairwise(edges) if b > a]


@FUZZ
@given(data=st.data(), md5=st.booleans())
def test_damaged_zip_is_never_published_and_never_crashes(original, data, md5: bool) -> None:
    blob, files, uid = original
    damaged, how = damage(data, blob)
    info = SeriesInfo(series_uid=uid, collection="Fuzz", patient_id="P1", study_uid="1.2.3",
                      image_count=len(files), file_size=sum(map(len, files.values())))
    manifest = Manifest(series_uids=(uid,), headers={}, source=None, duplicates_dropped=0)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(manifest, tmp, DownloadOptions(retries=0, md5=md5, workers=1),
                        source=StubSource(info, chunked(data, damaged)))
        report = engine.run()
        result = report.results[uid]
        assert not report.fatal, report.fatal
        assert "internal error" not in result.error, f"{how}: {result.error}"
        published = [p for p in Path(report.root).rglob("*")
                     if p.is_file() and ".nbia" not in p.relative_to(report.root).parts]
        images = {hashlib.md5(p.read_bytes()).hexdigest() for p in published
                  if p.suffix == ".dcm"}
        if result.state == SeriesState.COMPLETE:
            # Accepted: then it is exactly the original, file for file.
            assert images == {hashlib.md5(d).hexdigest() for d in files.values()}, how
        else:
            assert result.state == SeriesState.ERROR and result.error, how
            assert images == set(), f"{how}: a failed series left files behind"
            staging = Path(report.root) / ".nbia" / "staging"
            assert not any(staging.iterdir()), how
        assert damaged != blob or result.state == SeriesState.COMPLETE
