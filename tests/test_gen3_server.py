"""The Gen3 (Fence + DRS) emulator and the PathDB file server, over real HTTP on loopback.

Every endpoint, each fault, Range/206/416, token and signed-URL use-up, the files host
refusing an Authorization header, and the series zips equal to the NBIA reference
server's. Clients here are http.client and urllib: nothing of ours on the client side.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import pytest

from nbia_retriever.server.gen3 import (
    Gen3Faults,
    Gen3Server,
    gen3_view,
    jwt_claims,
    object_id_for,
)

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive

pytestmark = pytest.mark.timeout(60)


# -- a tiny client -------------------------------------------------------------------
class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes,
                 error: str | None = None) -> None:
        self.status, self.headers, self.body, self.error = status, headers, body, error

    def json(self) -> Any:
        return json.loads(self.body)


def call(url: str, method: str = "GET", *, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> Answer:
    """One request on a new connection; a reset mid-body is reported, not raised."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        got = {k.lower(): v for k, v in response.getheaders()}
        data = bytearray()
        try:
            while block := response.read(65536):
                data += block
        except (ConnectionError, http.client.IncompleteRead) as exc:
            if isinstance(exc, http.client.IncompleteRead):
                data += exc.partial
            return Answer(response.status, got, bytes(data), type(exc).__name__)
        return Answer(response.status, got, bytes(data))
    finally:
        conn.close()


def token(server: Gen3Server, key: str | None = None, *, alias: bool = False) -> Answer:
    path = "/user/credentials/cdis/access_token" if alias \
        else "/user/credentials/api/access_token"
    return call(server.url + path, "POST", headers={"Content-Type": "application/json"},
                body=json.dumps({"api_key": key or server.api_key}).encode())


def bearer(server: Gen3Server) -> dict[str, str]:
    answer = token(server)
    assert answer.status == 200, answer.body
    return {"Authorization": "Bearer " + answer.json()["access_token"]}


def signed(server: Gen3Server, object_id: str, auth: dict[str, str] | None = None) -> str:
    answer = call(f"{server.url}/user/data/download/{object_id}",
                  headers=auth or bearer(server))
    assert answer.status == 200, answer.body
    return str(answer.json()["url"])


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# -- the view ------------------------------------------------------------------------
def test_view_objects_and_slides(gen3_archive: Gen3Archive) -> None:
    zips, files, slides = gen3_archive.zips, gen3_archive.files, gen3_archive.slides
    assert len(zips) == 3 and len(files) == 2 and len(slides) == 3
    for obj in gen3_archive.objects:
        data = obj.path.read_bytes()
        assert (len(data), md5(data)) == (obj.size, obj.md5)
        assert obj.object_id == object_id_for(obj.name)
        assert obj.object_id.startswith("dg.4DFC/") and obj.collection and obj.patient_id
    for obj in zips:
        assert obj.name == f"{obj.series_uid}.zip" and obj.path.read_bytes()[:2] == b"PK"
    assert files[0].name.endswith("-report.pdf")
    assert {s.name.rsplit(".", 1)[1] for s in slides} == {"svs", "tiff"}
    for slide in slides:
        assert slide.path.stat().st_size == slide.size == 192 * 1024
        assert md5(slide.path.read_bytes()) == slide.md5


def test_view_is_deterministic(gen3_archive: Gen3Archive, tmp_path: Path) -> None:
    again, slides = gen3_view(gen3_archive.summary.root, tmp_path, zips=3, files=2,
                              slides=3, slide_size=192 * 1024)
    assert [(o.object_id, o.md5) for o in again] == \
        [(o.object_id, o.md5) for o in gen3_archive.objects]
    assert [s.md5 for s in slides] == [s.md5 for s in gen3_archive.slides]


def test_zip_bytes_equal_the_reference_servers(gen3_archive: Gen3Archive, serve: Any
                                               ) -> None:
    """A DRS series zip is the zip NBIA's v4 getImage?IncludeMD5=yes sends, byte for byte
    (a public one here: v4 without a token)."""
    ref = serve(gen3_archive.summary.root)
    public = {s.series_uid for s in gen3_archive.summary.series if not s.restricted}
    obj = next(o for o in gen3_archive.zips if o.series_uid in public)
    answer = call(f"{ref.api_url}/v4/getImage?SeriesInstanceUID={obj.series_uid}"
                  "&IncludeMD5=yes")
    assert answer.status == 200
    assert answer.body == obj.path.read_bytes()


# -- Fence: tokens -------------------------------------------------------------------
@pytest.mark.parametrize("alias", [False, True])
def test_token(gen3_server: Gen3Server, alias: bool) -> None:
    answer = token(gen3_server, alias=alias)
    assert answer.status == 200
    claims = jwt_claims(answer.json()["access_token"])
    assert claims is not None and claims["purpose"] == "access"
    assert 1190 <= claims["exp"] - claims["iat"] <= 1200
    assert gen3_server.token_requests == 1
    key = jwt_claims(gen3_server.api_key)
    assert key is not None and key["iss"] == gen3_server.url + "/user"
    assert key["purpose"] == "api_key" and key["exp"] > key["iat"]


def test_token_refused(gen3_server: Gen3Server, tmp_path: Path) -> None:
    forged = json.loads(gen3_server.write_credentials(tmp_path / "bad.json", valid=False)
                        .read_text())["api_key"]
    assert token(gen3_server, forged).status == 401
    assert token(gen3_server, "not a jwt").status == 401
    answer = call(gen3_server.url + "/user/credentials/api/access_token", "POST",
                  body=b"{nope")
    assert answer.status == 400
    gen3_server.revoke_keys()
    refused = token(gen3_server)
    assert refused.status == 401 and "revoked" in refused.body.decode()


def test_credentials_file(gen3_server: Gen3Server, gen3_creds: Path) -> None:
    data = json.loads(gen3_creds.read_text())
    assert data == {"api_key": gen3_server.api_key, "key_id": gen3_server.key_id}
    assert stat.S_IMODE(os.stat(gen3_creds).st_mode) == 0o600
    assert token(gen3_server, data["api_key"]).status == 200


# -- Fence: signed URLs --------------------------------------------------------------
def test_download_gives_a_signed_url_on_the_files_host(gen3_server: Gen3Server,
                                                       gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.zips[0]
    auth = bearer(gen3_server)
    for path in (obj.object_id, obj.object_id.replace("/", "%2F")):
        answer = call(f"{gen3_server.url}/user/data/download/{path}", headers=auth)
        assert answer.status == 200, answer.body
        url = answer.json()["url"]
        assert url.startswith(gen3_server.files_url + "/signed/")
        got = call(url)
        assert got.status == 200 and got.body == obj.path.read_bytes()
        assert got.headers["content-length"] == str(obj.size)
        assert got.headers["etag"] == f'"{obj.md5}"'
    assert gen3_server.url_requests == 2


def test_download_refusals(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[0]
    base = f"{gen3_server.url}/user/data/download/"
    assert call(base + obj.object_id).status == 401
    assert call(base + obj.object_id, headers={"Authorization": "Bearer x.y.z"}).status == 401
    auth = bearer(gen3_server)
    assert call(base + "dg.4DFC/00000000-0000-0000-0000-000000000000",
                headers=auth).status == 404
    gen3_server.set_faults(Gen3Faults(forbidden=frozenset([obj.object_id]),
                                      missing=frozenset([gen3_archive.zips[0].object_id])))
    assert call(base + obj.object_id, headers=auth).status == 403
    assert call(base + gen3_archive.zips[0].object_id, headers=auth).status == 404


# -- the files host ------------------------------------------------------------------
def test_range_206_and_416(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.zips[1]
    data = obj.path.read_bytes()
    url = signed(gen3_server, obj.object_id)
    tail = call(url, headers={"Range": "bytes=1000-"})
    assert tail.status == 206 and tail.body == data[1000:]
    assert tail.headers["content-range"] == f"bytes 1000-{obj.size - 1}/{obj.size}"
    assert tail.headers["content-length"] == str(obj.size - 1000)
    middle = call(url, headers={"Range": "bytes=10-19"})
    assert middle.status == 206 and middle.body == data[10:20]
    beyond = call(url, headers={"Range": f"bytes={obj.size}-"})
    assert beyond.status == 416 and beyond.headers["content-range"] == f"bytes */{obj.size}"
    other = call(url, headers={"Range": "bytes=5-", "If-Range": '"another"'})
    assert other.status == 200 and other.body == data


def test_files_host_refuses_an_authorization_header(gen3_server: Gen3Server,
                                                    gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[1]
    auth = bearer(gen3_server)
    url = signed(gen3_server, obj.object_id, auth)
    answer = call(url, headers=auth)
    assert answer.status == 400 and b"InvalidArgument" in answer.body
    leaked = [r for r in gen3_server.requests if r.origin == "files" and r.authorization]
    assert len(leaked) == 1 and leaked[0].status == 400
    assert "authorization" in leaked[0].headers
    assert call(url).status == 200  # the same URL without the header is fine


def test_bad_signature(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    url = signed(gen3_server, gen3_archive.files[0].object_id)
    answer = call(url[:-4] + "0000")
    assert answer.status == 403 and b"SignatureDoesNotMatch" in answer.body
    other = gen3_archive.files[1].object_id
    assert call(url.replace(quote(gen3_archive.files[0].object_id), quote(other))
                ).status == 403


def test_log_holds_no_secrets(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    auth = bearer(gen3_server)
    url = signed(gen3_server, gen3_archive.zips[0].object_id, auth)
    assert call(url).status == 200
    text = repr(gen3_server.requests)
    assert gen3_server.api_key not in text
    assert auth["Authorization"].split()[1] not in text
    origins = [r.origin for r in gen3_server.requests]
    assert origins == ["api", "api", "files"]
    assert [r.authorization for r in gen3_server.requests] == [False, True, False]


# -- PathDB --------------------------------------------------------------------------
@pytest.mark.parametrize("index_php", [False, True])
def test_pathdb_slide(gen3_server: Gen3Server, gen3_archive: Gen3Archive,
                      index_php: bool) -> None:
    slide = gen3_archive.slides[0]
    data = slide.path.read_bytes()
    url = gen3_server.slide_url(slide, index_php=index_php)
    whole = call(url)
    assert whole.status == 200 and whole.body == data
    assert whole.headers["content-length"] == str(slide.size)
    assert whole.headers["etag"] == f'"{slide.md5}"'
    tail = call(url, headers={"Range": "bytes=100000-"})
    assert tail.status == 206 and tail.body == data[100000:]
    assert call(url, headers={"Range": f"bytes={slide.size}-"}).status == 416
    assert call(url, headers={"Authorization": "Bearer x"}).status == 400
    assert call(gen3_server.pathdb_url + "/system/files/wsi/nope.svs").status == 404
