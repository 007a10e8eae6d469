"""files.transfer: resumable, verified downloads into the spool (issue 24 Deliver 2, 3).

Over real HTTP against our Gen3 emulator's signed-URL and PathDB hosts
(tests/gen3_fixtures.py); every fault comes from the server (drop_after, url_uses,
ignore_range, wrong_byte, etag=off), and what a resume costs is read from the server's
own request log (the bytes it sent), not from the client."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from nbia_retriever.api import Transport
from nbia_retriever.errors import ApiError, DestinationError, IntegrityError, NetworkError
from nbia_retriever.files.transfer import FetchedFile, fetch_to_spool, part_paths
from nbia_retriever.server.gen3 import Gen3Faults

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive
    from nbia_retriever.server.gen3 import Gen3Server, PathdbSlide

MB = 1 << 20


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Gen3Archive:
    """One 40 MB slide and one 4 MB DRS file."""
    from gen3_fixtures import make_gen3_archive

    return make_gen3_archive(tmp_path_factory.mktemp("big"), zips=0, files=1, slides=1,
                             slide_size=40 * MB, file_size=4 * MB)


@pytest.fixture
def transport() -> Iterator[Transport]:
    t = Transport(timeout=30)
    yield t
    t.close()


def _fetch(url_for: Callable[[], str], spool: Path, key: str, transport: Transport, *,
           size: int | None, md5: str | None, etag_check: bool = True,
           progress: Callable[[int], None] = lambda _: None) -> FetchedFile:
    return fetch_to_spool(url_for, spool, key, expected_size=size, expected_md5=md5,
                          transport=transport, checkpoint=lambda: None,
                          on_progress=progress, etag_check=etag_check, name="x.svs")


def _md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def _gets(server: Gen3Server, name: str) -> list[object]:
    return [r for r in server.requests if r.method == "GET" and r.path.endswith(name)]


def test_plain_fetch_is_verified_and_left_as_done(gen3_server: Gen3Server,
                                                  gen3_archive: Gen3Archive, tmp_path: Path,
                                                  transport: Transport) -> None:
    slide = gen3_archive.slides[0]
    url = gen3_server.slide_url(slide)
    got = _fetch(lambda: url, tmp_path, url, transport, size=None, md5=None)
    assert got.size == slide.size and got.md5 == slide.md5 == _md5(got.path)
    part, sidecar, done = part_paths(tmp_path, url)
    assert got.path == done and not part.exists() and not sidecar.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [done.name]


def test_resume_after_a_drop_fetches_only_the_rest(gen3_serve: Callable[..., Gen3Server],
                                                   big: Gen3Archive, tmp_path: Path,
                                                   transport: Transport) -> None:
    """A 40 MB file cut at 30 MB costs ~10 MB more, not 40, in the engine's next
    attempt (the same run) as in the next run: the part and its signed sidecar stay."""
    server = gen3_serve(root=big.root, objects=big.objects, slides=big.slides,
                        faults=Gen3Faults(drop_after=30 * MB))
    slide = big.slides[0]
    url = server.slide_url(slide)
    with pytest.raises(NetworkError):
        _fetch(lambda: url, tmp_path, url, transport, size=slide.size, md5=slide.md5)
    part, sidecar, _ = part_paths(tmp_path, url)
    kept = json.loads(sidecar.read_text())["offset"]
    assert 20 * MB < kept <= 30 * MB and part.stat().st_size >= kept
    got = _fetch(lambda: url, tmp_path, url, transport, size=slide.size, md5=slide.md5)
    assert got.md5 == slide.md5 == _md5(got.path)
    _, second = _gets(server, slide.name)
    assert second.range == f"bytes={kept}-" and second.status == 206  # type: ignore[attr-defined]
    assert second.bytes_sent == slide.size - kept < 20 * MB  # type: ignore[attr-defined]


def test_expired_signed_url_is_renewed_within_the_attempt(
        gen3_serve: Callable[..., Gen3Server], big: Gen3Archive, tmp_path: Path,
        transport: Transport) -> None:
    server = gen3_serve(root=big.root, objects=big.objects, slides=big.slides,
                        faults=Gen3Faults(url_uses=1, drop_after=3 * MB))
    obj = big.files[0]
    used = server.signed_url(obj)
    asked: list[str] = []

    def url_for() -> str:
        asked.append(used if not asked else server.signed_url(obj))
        return asked[-1]

    with pytest.raises(NetworkError):  # the URL's one GET is cut at 3 MB
        _fetch(url_for, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    assert len(asked) == 1
    asked.clear()
    got = _fetch(url_for, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    assert got.md5 == obj.md5
    assert len(asked) == 2  # the used-up URL answered 403 "expired": one new URL
    statuses = [r.status for r in _gets(server, obj.object_id.partition("/")[2])]
    assert statuses == [200, 403, 206]


def test_server_ignoring_range_restarts_cleanly(gen3_serve: Callable[..., Gen3Server],
                                                big: Gen3Archive, tmp_path: Path,
                                                transport: Transport) -> None:
    server = gen3_serve(root=big.root, objects=big.objects, slides=big.slides,
                        faults=Gen3Faults(drop_after=1 * MB, ignore_range=True))
    obj = big.files[0]
    url = server.signed_url(obj)
    with pytest.raises(NetworkError):
        _fetch(lambda: url, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    got = _fetch(lambda: url, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    assert got.size == obj.size and _md5(got.path) == obj.md5
    second = _gets(server, obj.object_id.partition("/")[2])[1]
    assert second.range is not None and second.status == 200  # type: ignore[attr-defined]


def test_wrong_byte_is_integrity_error_and_nothing_left(gen3_server: Gen3Server,
                                                        gen3_archive: Gen3Archive,
                                                        tmp_path: Path,
                                                        transport: Transport) -> None:
    obj = gen3_archive.files[0]
    gen3_server.set_faults(Gen3Faults(wrong_byte=frozenset({obj.object_id})))
    url = gen3_server.signed_url(obj)
    with pytest.raises(IntegrityError, match="MD5 mismatch"):
        _fetch(lambda: url, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    assert list(tmp_path.iterdir()) == []


def test_whole_part_answers_416_and_is_complete(gen3_server: Gen3Server,
                                                gen3_archive: Gen3Archive, tmp_path: Path,
                                                transport: Transport) -> None:
    """Stopped after the last byte, before the check: the next attempt asks for
    ``bytes=SIZE-``, gets 416, and finds the part whole."""
    slide = gen3_archive.slides[0]
    url = gen3_server.slide_url(slide)

    def stop_at_end(total: int) -> None:
        if total == slide.size:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fetch(lambda: url, tmp_path, url, transport, size=slide.size, md5=None,
               progress=stop_at_end)
    got = _fetch(lambda: url, tmp_path, url, transport, size=slide.size, md5=None)
    assert got.md5 == slide.md5
    statuses = [r.status for r in _gets(gen3_server, slide.name)]  # type: ignore[attr-defined]
    assert statuses == [200, 416]


def test_tampered_sidecar_starts_from_zero(gen3_serve: Callable[..., Gen3Server],
                                           big: Gen3Archive, tmp_path: Path,
                                           transport: Transport) -> None:
    server = gen3_serve(root=big.root, objects=big.objects, slides=big.slides,
                        faults=Gen3Faults(drop_after=1 * MB))
    obj = big.files[0]
    url = server.signed_url(obj)
    with pytest.raises(NetworkError):
        _fetch(lambda: url, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    sidecar = part_paths(tmp_path, "k")[1]
    fields = json.loads(sidecar.read_text())
    fields["offset"] = 1000  # a shorter prefix, its MAC left as it was
    sidecar.write_text(json.dumps(fields))
    got = _fetch(lambda: url, tmp_path, "k", transport, size=obj.size, md5=obj.md5)
    assert got.md5 == obj.md5
    assert _gets(server, obj.object_id.partition("/")[2])[1].range is None  # type: ignore[attr-defined]


def test_pathdb_etag_checked_when_no_md5(gen3_server: Gen3Server, gen3_archive: Gen3Archive,
                                         tmp_path: Path, transport: Transport) -> None:
    slide: PathdbSlide = gen3_archive.slides[1]
    gen3_server.set_faults(Gen3Faults(wrong_byte=frozenset({slide.object_id})))
    url = gen3_server.slide_url(slide)
    with pytest.raises(IntegrityError, match="ETag"):
        _fetch(lambda: url, tmp_path, url, transport, size=None, md5=None)


def test_pathdb_without_etag_checks_the_length(gen3_serve: Callable[..., Gen3Server],
                                               big: Gen3Archive, tmp_path: Path,
                                               transport: Transport) -> None:
    server = gen3_serve(root=big.root, objects=big.objects, slides=big.slides,
                        faults=Gen3Faults(etag=False, drop_after=5 * MB))
    slide = big.slides[0]
    url = server.slide_url(slide)
    with pytest.raises(NetworkError):  # the body ends before its Content-Length
        _fetch(lambda: url, tmp_path, url, transport, size=None, md5=None)
    got = _fetch(lambda: url, tmp_path, url, transport, size=None, md5=None)
    assert got.size == slide.size and got.md5 == slide.md5
    gets = _gets(server, slide.name)
    assert [r.status for r in gets] == [200, 206]  # type: ignore[attr-defined]
    assert all(r.headers for r in gets)  # type: ignore[attr-defined]


def test_missing_file_is_404(gen3_server: Gen3Server, tmp_path: Path,
                             transport: Transport) -> None:
    url = gen3_server.pathdb_url + "/system/files/wsi/nothing/here.svs"
    with pytest.raises(ApiError, match="not found on") as err:
        _fetch(lambda: url, tmp_path, url, transport, size=None, md5=None)
    assert err.value.status == 404
    assert list(tmp_path.iterdir()) == []  # no empty part or sidecar left behind


def test_a_planted_spool_link_is_never_written_through(gen3_server: Gen3Server,
                                                       gen3_archive: Gen3Archive,
                                                       tmp_path: Path,
                                                       transport: Transport) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "spool").symlink_to(elsewhere)
    url = gen3_server.slide_url(gen3_archive.slides[0])
    with pytest.raises(DestinationError):
        _fetch(lambda: url, tmp_path / "spool", url, transport, size=None, md5=None)
    assert list(elsewhere.iterdir()) == []


_RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from nbia_retriever.api import Transport
    from nbia_retriever.files.transfer import fetch_to_spool
    url, spool, size, md5 = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    transport = Transport(timeout=60)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = fetch_to_spool(lambda: url, spool, url, expected_size=size, expected_md5=md5,
                         transport=transport, checkpoint=lambda: None,
                         on_progress=lambda _: None)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert got.md5 == md5
    print(after - before)
""")


def test_memory_flat_for_a_200_mb_file(gen3_serve: Callable[..., Gen3Server],
                                       tmp_path: Path) -> None:
    from gen3_fixtures import make_gen3_archive

    huge = make_gen3_archive(tmp_path / "huge", zips=0, files=0, slides=1,
                             slide_size=200 * MB)
    server = gen3_serve(root=huge.root, objects=huge.objects, slides=huge.slides)
    slide = huge.slides[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, server.slide_url(slide), str(tmp_path / "spool"),
         str(slide.size), slide.md5], capture_output=True, text=True, env=env, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    growth_kb = int(done.stdout.split()[-1])
    assert growth_kb < 30 * 1024, f"RSS grew {growth_kb} kB for a 200 MB file"


def test_signed_url_refuses_the_bearer(gen3_server: Gen3Server, gen3_archive: Gen3Archive
                                       ) -> None:
    """The emulator's storage host refuses any Authorization header (so a client that
    leaked the token would fail the tests above loudly)."""
    url = gen3_server.signed_url(gen3_archive.files[0])
    request = urllib.request.Request(url, headers={"Authorization": "Bearer x"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    assert err.value.code == 400
