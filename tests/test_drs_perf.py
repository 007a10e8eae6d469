"""What issue 24's speed targets rest on, counted, not timed (benchmarks/drs.py times them).

Over real HTTP against our Gen3 emulator (tests/gen3_fixtures.py):

* a whole run of N small DRS objects from a sheet that gives size and MD5 asks Fence for
  one token, one signed URL per object and the object once: no DRS record, nothing
  asked twice (the floor, curl, does exactly that much);
* a sheet that gives no MD5 (TCIA's own sheets: a size only) needs the GA4GH DRS record
  for it; that record is asked for beside the signed URL, not before it. The proof is
  a server that holds each DRS record answer until the same object's signed URL was
  asked for: a client that waited for the record first would never ask (the held
  answer then gives up after a while, and the test sees it)."""

from __future__ import annotations

import asyncio
import csv
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pytest
from aiohttp import web

from nbia_retriever.files.gen3 import Gen3Credentials
from nbia_retriever.files.source import FileSource, FileStream
from nbia_retriever.models import FileItem
from nbia_retriever.server.gen3 import Gen3Server, Gen3Service, write_drs_manifest
from reliability_helpers import run_cli

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive

#: How long a held DRS record waits for its object's signed-URL request before it gives
#: up (a client asking in turn makes every record wait this long, and fails the test).
HOLD_SECONDS = 20.0


def _kinds(server: Gen3Server) -> dict[str, int]:
    counts = {"token": 0, "signed_url": 0, "drs_record": 0, "file_get": 0, "other": 0}
    for r in server.requests:
        kind = ("token" if "access_token" in r.path else
                "signed_url" if r.path.startswith("/user/data/download/") else
                "drs_record" if r.path.startswith("/ga4gh/") else
                "file_get" if r.path.startswith("/signed/") and r.method == "GET" else
                "other")
        counts[kind] += 1
    return counts


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Gen3Archive:
    """24 small DRS files (no zips, no slides)."""
    from gen3_fixtures import make_gen3_archive

    return make_gen3_archive(tmp_path_factory.mktemp("drs-many"), zips=0, files=24,
                             slides=0, file_size=8 * 1024)


def test_sheet_with_size_and_md5_asks_one_url_and_one_get_per_object(
        tmp_path: Path, many: Gen3Archive, gen3_serve: Callable[..., Gen3Server]) -> None:
    server = gen3_serve(root=many.root, objects=many.objects, slides=())
    creds = server.write_credentials(tmp_path / "credentials.json")
    sheet = write_drs_manifest(tmp_path / "sheet.csv", many.objects, base_url=server.url,
                               style="icdc")  # size and md5 columns
    out = tmp_path / "out"
    done = run_cli(["download", str(sheet), "-d", str(out), "--auth", str(creds),
                    "--gen3-endpoint", server.url, "--accept-data-policy", "-q"])
    assert done.returncode == 0, done.stdout + done.stderr
    n = len(many.objects)
    assert _kinds(server) == {"token": 1, "signed_url": n, "drs_record": 0, "file_get": n,
                              "other": 0}
    got = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in out.rglob("*.pdf")}
    assert got == {o.name: o.md5 for o in many.objects}
    with next(out.rglob("files.csv")).open(newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == n


class HeldRecords(Gen3Service):
    """Gen3's API, but each DRS record answer waits until a signed URL for the same
    object was asked for (or :data:`HOLD_SECONDS` passed): ``overlapped`` says, per
    record, which it was."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.overlapped: list[bool] = []
        self._asked: dict[str, asyncio.Event] = {}  # touched on the server's loop only

    def _event(self, object_id: str) -> asyncio.Event:
        return self._asked.setdefault(object_id, asyncio.Event())

    def api_app(self) -> web.Application:
        app = super().api_app()

        @web.middleware
        async def hold(request: web.Request, handler: Any) -> web.StreamResponse:
            path = request.path
            if path.startswith("/user/data/download/"):
                self._event(unquote(path.removeprefix("/user/data/download/"))).set()
            elif path.startswith("/ga4gh/drs/v1/objects/"):
                event = self._event(unquote(path.removeprefix("/ga4gh/drs/v1/objects/")))
                try:
                    await asyncio.wait_for(event.wait(), HOLD_SECONDS)
                    self.overlapped.append(True)
                except TimeoutError:
                    self.overlapped.append(False)
            return await handler(request)

        app.middlewares.append(hold)
        return app


@pytest.fixture
def held(many: Gen3Archive) -> Iterator[tuple[Gen3Server, HeldRecords]]:
    server = Gen3Server(many.root, many.objects[:4])
    service = server.service = HeldRecords(server.objects, server.slides)
    with server:
        yield server, service


def test_sheet_without_md5_asks_the_drs_record_beside_the_signed_url(
        tmp_path: Path, held: tuple[Gen3Server, HeldRecords]) -> None:
    server, service = held
    creds = Gen3Credentials.load(server.write_credentials(tmp_path / "credentials.json"))
    items = [FileItem("drs", server.drs_uri(o), server.drs_uri(o), o.name,
                      collection=o.collection, patient_id=o.patient_id, size=o.size,
                      md5=None, line=2 + k) for k, o in enumerate(server.objects)]
    source = FileSource(items, creds=creds, endpoint=server.url, policy=None, timeout=60)
    source.bind_run(tmp_path / "root" / ".nbia" / "pieces", None)
    try:
        for item, obj in zip(items, server.objects, strict=True):
            with source.open(FileSource.info(item)) as stream:
                assert isinstance(stream, FileStream)
                got = stream.fetch(checkpoint=lambda: None, on_progress=lambda _: None)
            assert got.md5 == obj.md5 == hashlib.md5(got.path.read_bytes()).hexdigest()
    finally:
        source.close()
    n = len(items)
    assert service.overlapped == [True] * n  # never a record waiting for its URL alone
    assert _kinds(server) == {"token": 1, "signed_url": n, "drs_record": n, "file_get": n,
                              "other": 0}
