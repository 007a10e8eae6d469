"""Series zips as the reference server streams them (reference s3), the index and its cache."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from nbia_retriever.server import ArchiveError, ArchiveIndex, ReferenceServer, load_config
from nbia_retriever.server import index as index_module
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries
from nbia_retriever.server.zipwriter import ZipEntry, deflated_entry, stream_zip, zip_size


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def public(archive: ArchiveSummary) -> list[SynthSeries]:
    return [s for s in archive.series if not s.restricted]


def md5s(series: SynthSeries) -> set[str]:
    return {hashlib.md5(p.read_bytes()).hexdigest() for p in series.files}


def fetch(http: httpx.Client, server: ReferenceServer, uid: str, endpoint: str = "v1/getImage",
          **params: str) -> httpx.Response:
    response = http.get(f"{server.api_url}/{endpoint}",
                        params={"SeriesInstanceUID": uid, **params})
    assert response.status_code == 200, response.text
    return response


def test_zip_with_md5_structure(server, http, synthetic_archive):
    series = public(synthetic_archive)[0]
    response = fetch(http, server, series.series_uid, "v1/getImageWithMD5Hash")
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers
    assert "accept-ranges" not in response.headers
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    infos = archive.infolist()
    names = [i.filename for i in infos]
    # getImageWithMD5Hash: the images, then md5hashes.csv; no LICENSE (getImage has one).
    assert names[-1] == "md5hashes.csv" and "LICENSE" not in names
    assert names[:-1] == [f"{n:08d}.dcm" for n in range(1, series.images + 1)]
    assert all(i.compress_type == zipfile.ZIP_DEFLATED and i.flag_bits & 0x08 for i in infos)
    licensed = zipfile.ZipFile(io.BytesIO(fetch(http, server, series.series_uid).content))
    assert licensed.namelist()[0] == "LICENSE"
    assert b"Creative Commons" in licensed.read("LICENSE")
    lines = archive.read("md5hashes.csv").decode().splitlines()
    assert lines[0] == "Filename,MD5Hash"
    listed = dict(line.split(",") for line in lines[1:])
    assert sorted(listed) == names[:-1]
    for name, digest in listed.items():
        assert hashlib.md5(archive.read(name)).hexdigest() == digest
    assert set(listed.values()) == md5s(series)


def test_local_headers_defer_sizes_to_data_descriptors(server, http, synthetic_archive):
    series = public(synthetic_archive)[1]
    data = fetch(http, server, series.series_uid, "v1/getImageWithMD5Hash").content
    central = {i.filename: i for i in zipfile.ZipFile(io.BytesIO(data)).infolist()}
    offset = 0
    seen = []
    while data[offset:offset + 4] == b"PK\x03\x04":
        (_, _, flags, method, _, _, crc, csize, usize, name_len, extra_len
         ) = struct.unpack_from("<IHHHHHIIIHH", data, offset)
        name = data[offset + 30: offset + 30 + name_len].decode()
        info = central[name]
        assert flags & 0x08 and method == 8
        assert (crc, csize, usize) == (0, 0, 0)
        end = offset + 30 + name_len + extra_len + info.compress_size
        signature, d_crc, d_csize, d_usize = struct.unpack_from("<IIII", data, end)
        assert signature == 0x08074B50
        assert (d_crc, d_csize, d_usize) == (info.CRC, info.compress_size, info.file_size)
        seen.append(name)
        offset = end + 16
    assert seen == list(central)
    assert data[offset:offset + 4] == b"PK\x01\x02"  # central directory comes last


def test_zip_stored_sends_images_uncompressed_with_sizes_up_front(http, synthetic_archive,
                                                                  serve, tmp_path):
    """``serve --zip-stored``: the STORED entries some builds and proxies produce; the
    local header carries CRC and sizes, no data descriptor; the client reads them too."""
    from nbia_retriever import download

    series = public(synthetic_archive)[0]
    server = serve(synthetic_archive.root, stored=True)
    data = fetch(http, server, series.series_uid, "v1/getImageWithMD5Hash").content
    images = [i for i in zipfile.ZipFile(io.BytesIO(data)).infolist()
              if i.filename.endswith(".dcm")]
    assert images and all(i.compress_type == zipfile.ZIP_STORED for i in images)
    (_, _, flags, method, _, _, crc, csize, usize
     ) = struct.unpack_from("<IHHHHHIII", data, 0)
    assert method == 0 and not flags & 0x08
    assert (crc, csize, usize) == (images[0].CRC, images[0].file_size, images[0].file_size)
    report = download(synthetic_archive.root / "manifest.tcia", tmp_path,
                      api_url=server.api_url, retries=0)
    assert not report.failed and report.count("Complete") == len(public(synthetic_archive))


def test_image_order_is_arbitrary_but_deterministic(server, http, synthetic_archive):
    unsorted = 0
    for series in public(synthetic_archive):
        first = zipfile.ZipFile(io.BytesIO(fetch(http, server, series.series_uid).content))
        again = zipfile.ZipFile(io.BytesIO(fetch(http, server, series.series_uid).content))
        images = [n for n in first.namelist() if n.endswith(".dcm")]
        assert [first.read(n) for n in images] == [again.read(n) for n in images]
        numbers = [pydicom.dcmread(io.BytesIO(first.read(n))).get("InstanceNumber")
                   for n in images]
        known = [int(n) for n in numbers if n is not None]
        unsorted += known != sorted(known)
    assert unsorted >= 1


def test_seed_changes_the_order(synthetic_archive, serve, http):
    series = public(synthetic_archive)[0]
    orders = []
    for seed in (0, 1, 2):
        server = serve(synthetic_archive.root, seed=seed)
        archive = zipfile.ZipFile(io.BytesIO(fetch(http, server, series.series_uid).content))
        orders.append([hashlib.md5(archive.read(n)).hexdigest()
                       for n in archive.namelist() if n.endswith(".dcm")])
    assert len({tuple(o) for o in orders}) > 1


def test_md5_flag_per_endpoint(server, http, synthetic_archive):
    uid = public(synthetic_archive)[0].series_uid
    cases = [("v1/getImage", {}, False), ("v4/getImage", {}, False),
             ("v4/getImage", {"IncludeMD5": "yes"}, True),
             ("v1/getImageWithMD5Hash", {}, True)]
    for endpoint, params, has_md5 in cases:
        names = zipfile.ZipFile(io.BytesIO(fetch(http, server, uid, endpoint, **params).content)
                                ).namelist()
        assert ("md5hashes.csv" in names) == has_md5, endpoint
        assert (names[0] == "LICENSE") == ("WithMD5Hash" not in endpoint), endpoint


def test_new_file_names(server, http, synthetic_archive):
    series = public(synthetic_archive)[0]
    names = zipfile.ZipFile(io.BytesIO(
        fetch(http, server, series.series_uid, NewFileNames="Yes").content)).namelist()
    images = [n for n in names if n.endswith(".dcm")]
    assert len(set(images)) == series.images
    assert all(re.fullmatch(r"\d+-\d+\.dcm", n) for n in images)


def test_range_is_ignored(server, http, synthetic_archive):
    uid = public(synthetic_archive)[0].series_uid
    full = fetch(http, server, uid).content
    ranged = http.get(server.api_url + "/v1/getImage", params={"SeriesInstanceUID": uid},
                      headers={"Range": "bytes=100-"})
    assert ranged.status_code == 200 and ranged.content == full


def test_request_log_counts_body_bytes(server, http, synthetic_archive):
    uid = public(synthetic_archive)[0].series_uid
    body = fetch(http, server, uid).content
    record = server.requests[-1]
    assert record.series_uid == uid and record.bytes_sent == len(body) and record.fault is None


# -- the writer itself ------------------------------------------------------------------
def test_zip_size_is_exact_and_chunks_are_bounded():
    entries = [deflated_entry(f"{i:08d}.dcm", bytes([i % 7]) * (i * 3000)) for i in range(40)]
    chunks = list(stream_zip(entries, chunk=4096))
    assert sum(map(len, chunks)) == zip_size(entries)
    assert max(map(len, chunks[:-1])) < 2 * 4096 + 200


def test_zip64_end_records_for_many_entries():
    empty = deflated_entry("x", b"")
    entries = [ZipEntry(f"{i}.txt", empty.crc32, empty.compressed_size, 0, data=empty.data)
               for i in range(0xFFFF)]
    data = b"".join(stream_zip(entries))
    assert b"PK\x06\x06" in data[-200:] and b"PK\x06\x07" in data[-200:]
    assert len(zipfile.ZipFile(io.BytesIO(data)).infolist()) == 0xFFFF


def test_zip64_entry_headers():
    huge = ZipEntry("big.dcm", 123, 5 * 2**30, 6 * 2**30, data=b"")
    descriptor = b"".join(stream_zip([huge]))
    header = struct.unpack_from("<IHHHHHIIIHH", descriptor, 0)
    assert header[1] == 45 and header[7] == header[8] == 0xFFFFFFFF
    extra = descriptor[30 + 7: 30 + 7 + 20]
    assert struct.unpack("<HHQQ", extra) == (1, 16, 0, 0)
    tail = descriptor[30 + 7 + 20: 30 + 7 + 20 + 24]
    assert struct.unpack("<IIQQ", tail) == (0x08074B50, 123, 5 * 2**30, 6 * 2**30)


# -- index and cache --------------------------------------------------------------------
def copy_archive(synthetic_archive: ArchiveSummary, tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    shutil.copytree(synthetic_archive.root, root,
                    ignore=shutil.ignore_patterns(".nbia-server-cache"))
    return root


def test_index_matches_archive_and_caches_blobs(synthetic_archive, tmp_path):
    index = ArchiveIndex.load(copy_archive(synthetic_archive, tmp_path))
    assert set(index.series) == {s.series_uid for s in synthetic_archive.series}
    for series in synthetic_archive.series:
        record = index.series[series.series_uid]
        assert record.image_count == series.images and record.file_size == series.nbytes
        assert record.collection == series.collection
        assert {i.md5 for i in record.images} == md5s(series)
        for image in record.images:
            blob = index.blob_path(image)
            assert blob.stat().st_size == image.compressed_size
            assert blob.name == f"{image.md5}.z"


def test_cached_index_is_reused_and_invalidated(synthetic_archive, tmp_path, monkeypatch):
    root = copy_archive(synthetic_archive, tmp_path)
    first = ArchiveIndex.load(root)
    calls: list[str] = []
    real = index_module._index_file

    def spy(root_: Path, cache: Path, collection: str, rel: str, size: int, mtime: int):
        calls.append(rel)
        return real(root_, cache, collection, rel, size, mtime)

    monkeypatch.setattr(index_module, "_index_file", spy)
    again = ArchiveIndex.load(root)
    assert calls == [] and set(again.series) == set(first.series)
    victim = synthetic_archive.series[0].files[0]
    target = root / victim.relative_to(synthetic_archive.root)
    target.write_bytes(target.read_bytes() + b"\0\0")  # a DICOM with trailing padding
    (root / "SYNTH-CT-A" / "junk.dcm").write_bytes(b"not a dicom file")
    third = ArchiveIndex.load(root)
    assert sorted(calls) == sorted([target.relative_to(root).as_posix(), "SYNTH-CT-A/junk.dcm"])
    assert third.skipped == ["SYNTH-CT-A/junk.dcm"]
    image = next(i for i in third.series[synthetic_archive.series[0].series_uid].images
                 if i.relpath == target.relative_to(root).as_posix())
    assert image.md5 == hashlib.md5(target.read_bytes()).hexdigest()
    target.unlink()
    fourth = ArchiveIndex.load(root)
    assert fourth.series[synthetic_archive.series[0].series_uid].image_count == (
        synthetic_archive.series[0].images - 1)


def test_bad_archive_and_config_errors_are_one_line(tmp_path):
    with pytest.raises(ArchiveError, match="not a folder"):
        ArchiveIndex.load(tmp_path / "missing")
    (tmp_path / "nbia-archive.toml").write_text('[collections."A"]\nrestriced = true\n')
    with pytest.raises(ArchiveError, match=r"nbia-archive\.toml: unknown key .*restriced"):
        load_config(tmp_path)
    (tmp_path / "nbia-archive.toml").write_text("token_lifetime = -5\n")
    with pytest.raises(ArchiveError, match="token_lifetime must be positive"):
        load_config(tmp_path)
    (tmp_path / "nbia-archive.toml").write_text("token_lifetime = [\n")
    with pytest.raises(ArchiveError, match="invalid TOML"):
        load_config(tmp_path)
