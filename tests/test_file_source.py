"""files.source.FileSource: the engine's source for DRS and PathDB rows (issue 24).

Over real HTTP against our Gen3 emulator and PathDB host (tests/gen3_fixtures.py):
planning costs no request, a missing key or an untrusted host is refused before any,
a dead key stops the run (fatal verdict), the bearer token reaches the Gen3 API only,
a series zip streams as a series, DRS gives the MD5 a sheet lacks, 404/403 are final,
and a file cut in one run resumes in the next, fetching only the rest."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nbia_retriever.errors import (
    ApiError,
    AuthError,
    IntegrityError,
    NbiaError,
    NetworkError,
    UntrustedHostError,
)
from nbia_retriever.files.gen3 import Gen3Credentials
from nbia_retriever.files.source import FileSource, FileStream, SpooledZip
from nbia_retriever.files.transfer import FetchedFile, part_paths
from nbia_retriever.models import FileItem, SeriesState
from nbia_retriever.server.gen3 import Gen3Faults

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive
    from nbia_retriever.server.gen3 import Gen3Object, Gen3Server, PathdbSlide

MB = 1 << 20


def drs_item(server: Gen3Server, obj: Gen3Object, *, md5: bool = True,
             size: bool = True, line: int = 2) -> FileItem:
    uri = server.drs_uri(obj)
    return FileItem("drs", uri, obj.series_uid if obj.kind == "zip" else uri, obj.name,
                    collection=obj.collection, patient_id=obj.patient_id,
                    study_uid=obj.study_uid, modality=obj.modality,
                    size=obj.size if size else None, md5=obj.md5 if md5 else None, line=line)


def slide_item(server: Gen3Server, slide: PathdbSlide) -> FileItem:
    url = server.slide_url(slide)
    return FileItem("url", url, url, slide.name, collection=slide.collection,
                    patient_id=slide.patient_id, line=3)


@pytest.fixture
def make_source(tmp_path: Path) -> Iterator[Callable[..., FileSource]]:
    made: list[FileSource] = []

    def make(items: list[FileItem], server: Gen3Server | None, creds: Path | None, *,
             endpoint: bool = True, spool: Path | None = None) -> FileSource:
        source = FileSource(items, creds=Gen3Credentials.load(creds) if creds else None,
                            endpoint=server.url if server is not None and endpoint else None,
                            policy=None, timeout=30)
        source.bind_run(spool or tmp_path / "root" / ".nbia" / "pieces", None)
        made.append(source)
        return source

    yield make
    for source in made:
        source.close()


def _fetch(source: FileSource, item: FileItem) -> FetchedFile:
    progress: list[int] = []
    with source.open(FileSource.info(item)) as stream:
        assert isinstance(stream, FileStream)
        got = stream.fetch(checkpoint=lambda: None, on_progress=progress.append)
    assert progress and progress[-1] == got.size
    return got


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_planning_is_from_the_rows_without_a_request(gen3_server: Gen3Server,
                                                     gen3_archive: Gen3Archive,
                                                     gen3_creds: Path,
                                                     make_source: Callable[..., FileSource]
                                                     ) -> None:
    zip_obj, file_obj = gen3_archive.zips[0], gen3_archive.files[0]
    items = [drs_item(gen3_server, zip_obj), drs_item(gen3_server, file_obj)]
    source = make_source(items, gen3_server, gen3_creds)
    source.check()
    (batch,) = list(source.metadata_batches([i.key for i in items] + ["1.2.3"]))
    zinfo, finfo = batch.infos[zip_obj.series_uid], batch.infos[items[1].key]
    assert zinfo.image_count is None and zinfo.file_size == zip_obj.size
    assert finfo.image_count == 1 and finfo.series_description == file_obj.name
    assert finfo.collection == file_obj.collection and finfo.patient_id == file_obj.patient_id
    assert "1.2.3" not in batch.infos
    assert gen3_server.requests == []


def test_no_key_and_untrusted_host_refused_before_any_request(
        gen3_server: Gen3Server, gen3_archive: Gen3Archive, gen3_creds: Path,
        make_source: Callable[..., FileSource]) -> None:
    items = [drs_item(gen3_server, gen3_archive.files[0])]
    with pytest.raises(AuthError) as err:
        make_source(items, gen3_server, None).check()
    assert "--auth FILE" in str(err.value) and "NBIA_GEN3_AUTH" in str(err.value)
    with pytest.raises(UntrustedHostError):  # the manifest's host, not --gen3-endpoint
        make_source(items, gen3_server, gen3_creds, endpoint=False).check()
    assert gen3_server.requests == [] and gen3_server.token_requests == 0


def test_prepare_gets_one_token_and_a_dead_key_is_fatal(
        gen3_server: Gen3Server, gen3_archive: Gen3Archive, gen3_creds: Path,
        make_source: Callable[..., FileSource]) -> None:
    items = [drs_item(gen3_server, o) for o in gen3_archive.objects]
    source = make_source(items, gen3_server, gen3_creds)
    source.prepare()
    assert gen3_server.token_requests == 1
    gen3_server.revoke_keys()
    other = make_source(items, gen3_server, gen3_creds)
    with pytest.raises(AuthError) as err:
        other.prepare()
    verdict = other.verdict(err.value)
    assert verdict.fatal and not verdict.retry


def test_file_item_fetched_with_the_bearer_only_on_the_api(
        gen3_server: Gen3Server, gen3_archive: Gen3Archive, gen3_creds: Path,
        make_source: Callable[..., FileSource], tmp_path: Path) -> None:
    obj = gen3_archive.files[0]
    source = make_source([drs_item(gen3_server, obj)], gen3_server, gen3_creds)
    got = _fetch(source, drs_item(gen3_server, obj))
    assert got.path.parent == tmp_path / "root" / ".nbia" / "files"
    assert got.name == obj.name and got.md5 == obj.md5 == _md5(got.path)
    assert got.path.read_bytes() == obj.path.read_bytes()
    by_origin = {(r.origin, r.authorization) for r in gen3_server.requests}
    assert ("files", True) not in by_origin and ("files", False) in by_origin
    assert all(r.authorization for r in gen3_server.requests
               if r.origin == "api" and "access_token" not in r.path)


def test_series_zip_streams_its_bytes_then_leaves_nothing(
        gen3_server: Gen3Server, gen3_archive: Gen3Archive, gen3_creds: Path,
        make_source: Callable[..., FileSource], tmp_path: Path) -> None:
    obj = gen3_archive.zips[0]
    item = drs_item(gen3_server, obj)
    source = make_source([item], gen3_server, gen3_creds)
    with source.open(FileSource.info(item)) as stream:
        assert isinstance(stream, SpooledZip)
        body = b"".join(stream.chunks())
        assert stream.bytes_received == obj.size
    assert body == obj.path.read_bytes()
    assert list((tmp_path / "root" / ".nbia" / "files").iterdir()) == []


def test_md5_from_drs_when_the_sheet_has_none(gen3_server: Gen3Server,
                                              gen3_archive: Gen3Archive, gen3_creds: Path,
                                              make_source: Callable[..., FileSource]) -> None:
    obj = gen3_archive.files[1]
    item = drs_item(gen3_server, obj, md5=False, size=False)
    gen3_server.set_faults(Gen3Faults(wrong_byte=frozenset({obj.object_id})))
    source = make_source([item], gen3_server, gen3_creds)
    with pytest.raises(IntegrityError, match="its MD5"):  # DRS's checksum, not the ETag
        _fetch(source, item)
    assert any(r.path.startswith("/ga4gh/drs/v1/objects/") for r in gen3_server.requests)
    gen3_server.set_faults(None)
    assert _fetch(source, item).md5 == obj.md5
    gen3_server.set_faults(Gen3Faults(no_drs=True))  # a commons without DRS: the ETag
    assert _fetch(source, item).md5 == obj.md5
    gen3_server.set_faults(Gen3Faults(no_drs=True, wrong_byte=frozenset({obj.object_id})))
    with pytest.raises(IntegrityError, match="its ETag"):
        _fetch(source, item)


def test_missing_and_forbidden_objects_are_final(gen3_server: Gen3Server,
                                                 gen3_archive: Gen3Archive, gen3_creds: Path,
                                                 make_source: Callable[..., FileSource]
                                                 ) -> None:
    gone, refused = gen3_archive.files[0], gen3_archive.files[1]
    gen3_server.set_faults(Gen3Faults(missing=frozenset({gone.object_id}),
                                      forbidden=frozenset({refused.object_id})))
    items = [drs_item(gen3_server, gone), drs_item(gen3_server, refused)]
    source = make_source(items, gen3_server, gen3_creds)
    with pytest.raises(ApiError) as err:
        _fetch(source, items[0])
    assert "not found on" in str(err.value)
    verdict = source.verdict(err.value)
    assert not verdict.retry and verdict.state == SeriesState.ERROR and not verdict.fatal
    with pytest.raises(NbiaError) as err2:
        _fetch(source, items[1])
    verdict = source.verdict(err2.value)
    assert not verdict.retry and verdict.state == SeriesState.NOT_AUTHORIZED
    assert source.verdict(NetworkError("reset")).retry
    assert source.verdict(ApiError("busy", status=503)).retry


def test_pathdb_needs_no_key_and_sends_no_secret(gen3_server: Gen3Server,
                                                 gen3_archive: Gen3Archive,
                                                 make_source: Callable[..., FileSource]
                                                 ) -> None:
    slide = gen3_archive.slides[0]
    item = slide_item(gen3_server, slide)
    source = make_source([item], None, None)
    source.check()
    source.prepare()
    got = _fetch(source, item)
    assert got.md5 == slide.md5 and got.name == slide.name
    assert gen3_server.token_requests == 0
    assert not any(r.authorization for r in gen3_server.requests)


def test_a_cut_file_resumes_in_the_next_run(gen3_serve: Callable[..., Gen3Server],
                                            tmp_path: Path, make_source: Callable[..., FileSource]
                                            ) -> None:
    from gen3_fixtures import make_gen3_archive

    archive = make_gen3_archive(tmp_path / "a", zips=0, files=1, slides=0, file_size=8 * MB)
    server = gen3_serve(root=archive.root, objects=archive.objects, slides=archive.slides,
                        faults=Gen3Faults(drop_after=6 * MB, url_uses=1))
    creds = server.write_credentials(tmp_path / "c.json")
    obj = archive.files[0]
    item = drs_item(server, obj)
    with pytest.raises(NetworkError):
        _fetch(make_source([item], server, creds), item)
    spool = tmp_path / "root" / ".nbia" / "files"
    kept = json.loads(part_paths(spool, item.key)[1].read_text())["offset"]
    assert kept >= 4 * MB
    nxt = make_source([item], server, creds)  # another run: a new source, same root
    got = _fetch(nxt, item)
    assert got.md5 == obj.md5 == _md5(got.path)
    gets = [r for r in server.requests if r.origin == "files" and r.method == "GET"]
    assert [r.status for r in gets] == [200, 206]
    assert gets[1].range == f"bytes={kept}-" and gets[1].bytes_sent == obj.size - kept


def test_abort_mid_file_keeps_the_part_for_the_next_attempt(
        gen3_serve: Callable[..., Gen3Server], tmp_path: Path,
        make_source: Callable[..., FileSource]) -> None:
    """Cancel (abort from the engine) and pause (checkpoint raises) both stop the
    transfer with the part and its sidecar kept; the next attempt asks for the rest."""
    from gen3_fixtures import make_gen3_archive

    archive = make_gen3_archive(tmp_path / "a", zips=0, files=0, slides=1,
                                slide_size=12 * MB)
    server = gen3_serve(root=archive.root, objects=archive.objects, slides=archive.slides)
    slide = archive.slides[0]
    item = slide_item(server, slide)
    source = make_source([item], None, None)
    with source.open(FileSource.info(item)) as stream:
        assert isinstance(stream, FileStream)

        def cancel_at_3mb(total: int) -> None:
            if total >= 3 * MB:
                stream.abort()

        with pytest.raises(NetworkError, match="stopped"):
            stream.fetch(checkpoint=lambda: None, on_progress=cancel_at_3mb)

    class Paused(Exception):
        pass

    def pause_at_7mb() -> None:
        if sizes and sizes[-1] >= 7 * MB:
            raise Paused

    sizes: list[int] = []
    with source.open(FileSource.info(item)) as stream, pytest.raises(Paused):
        stream.fetch(checkpoint=pause_at_7mb, on_progress=sizes.append)
    assert stream.resumed_from >= 3 * MB
    got = _fetch(source, item)
    assert got.md5 == slide.md5
    gets = [r for r in server.requests if r.method == "GET"]
    assert [r.status for r in gets] == [200, 206, 206]
    assert gets[1].range is not None and int(gets[1].range[6:-1]) >= 3 * MB
    # bytes sent but never read (socket buffers at the abort) aside, each byte once
    assert sum(r.bytes_sent for r in gets) < slide.size * 3 // 2
