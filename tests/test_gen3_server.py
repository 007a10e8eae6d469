"""The Gen3 (Fence + DRS) emulator and the PathDB file server, over real HTTP on loopback.

Every endpoint, each fault, Range/206/416, token and signed-URL use-up, the files host
refusing an Authorization header, and the series zips equal to the NBIA reference
server's. Clients here are http.client and urllib: nothing of ours on the client side.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import pytest
from click.testing import CliRunner

from nbia_retriever.errors import ArchiveError, FaultSpecError
from nbia_retriever.server import serve_command
from nbia_retriever.server.gen3 import (
    PAGE_SIZE,
    Gen3Faults,
    Gen3Server,
    gen3_view,
    jwt_claims,
    object_id_for,
    write_drs_manifest,
    write_pathdb_manifest,
)
from reliability_helpers import banner_url, serving

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
        if method != "HEAD" and len(data) < int(got.get("content-length", 0)):
            return Answer(response.status, got, bytes(data), "short")  # closed early
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


def test_download_expires_in_and_redirect(gen3_server: Gen3Server,
                                          gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[0]
    base = f"{gen3_server.url}/user/data/download/{obj.object_id}"
    auth = bearer(gen3_server)
    url = call(base + "?protocol=s3&expires_in=0", headers=auth).json()["url"]
    assert call(url).status == 403  # expired at once
    moved = call(base + "?redirect=true", headers=auth)
    assert moved.status == 302
    location = moved.headers["location"]
    assert location.startswith(gen3_server.files_url + "/signed/")
    assert call(location, headers=auth).status == 400  # followed with the token: refused
    assert md5(call(location).body) == obj.md5


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


def test_pathdb_list_of_images(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    """tcia_utils' getCollections and getImages: Drupal's fields, pages from 0 until an
    empty one; the rows are those of the PathDB manifest."""
    collections = call(f"{gen3_server.pathdb_url}/collections?_format=json").json()
    names = {c["tid"][0]["value"]: c["name"][0]["value"] for c in collections}
    cid = gen3_archive.slides[0].collection_id
    assert names[cid] == gen3_archive.slides[0].collection
    items: list[dict[str, Any]] = []
    page = 0
    while True:
        answer = call(f"{gen3_server.pathdb_url}/listofimages/{cid}?_format=json&page={page}")
        assert answer.status == 200
        if not answer.json():
            break
        assert len(answer.json()) <= PAGE_SIZE
        items += answer.json()
        page += 1
    expected = [s for s in gen3_archive.slides if s.collection_id == cid]
    assert page == -(-len(expected) // PAGE_SIZE) and len(items) == len(expected)
    for item, slide in zip(items, expected, strict=True):
        assert item["field_wsiimage"][0]["url"] == gen3_server.slide_url(slide)
        assert item["field_collection"][0]["target_id"] == cid
        assert (item["studyid"][0]["value"], item["clinicaltrialsubjectid"][0]["value"],
                item["imageid"][0]["value"], item["nid"][0]["value"]) == (
            slide.collection, slide.patient_id, slide.image_id, slide.slide_id)
        assert call(gen3_server.slide_url(slide), "HEAD").status == 200


# -- GA4GH DRS -----------------------------------------------------------------------
def test_drs_object_and_access(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.zips[0]
    auth = bearer(gen3_server)
    base = f"{gen3_server.url}/ga4gh/drs/v1/objects/"
    answer = call(base + obj.object_id, headers=auth)
    assert answer.status == 200
    body = answer.json()
    host = urlsplit(gen3_server.url).netloc
    assert body["id"] == obj.object_id and body["self_uri"] == f"drs://{host}/{obj.object_id}"
    assert (body["name"], body["size"]) == (obj.name, obj.size)
    assert body["checksums"] == [{"type": "md5", "checksum": obj.md5}]
    assert body["created_time"]
    method = body["access_methods"][0]
    assert method["type"] == "https"
    access = call(f"{base}{obj.object_id}/access/{method['access_id']}", headers=auth)
    assert access.status == 200
    got = call(access.json()["url"])
    assert got.status == 200 and md5(got.body) == obj.md5
    assert gen3_server.url_requests == 1
    escaped = call(base + obj.object_id.replace("/", "%2F"), headers=auth)
    assert escaped.status == 200 and escaped.json()["id"] == obj.object_id


def test_drs_errors(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[0]
    base = f"{gen3_server.url}/ga4gh/drs/v1/objects/"
    unauth = call(base + obj.object_id)
    assert unauth.status == 401 and unauth.json()["status_code"] == 401
    assert "msg" in unauth.json()
    auth = bearer(gen3_server)
    assert call(base + "dg.4DFC/nope", headers=auth).json() == {
        "msg": "No such object: dg.4DFC/nope", "status_code": 404}
    assert call(f"{base}{obj.object_id}/access/gs", headers=auth).status == 404
    gen3_server.set_faults(Gen3Faults(forbidden=frozenset([obj.object_id])))
    assert call(base + obj.object_id, headers=auth).json()["status_code"] == 403
    assert call(f"{base}{obj.object_id}/access/s3", headers=auth).status == 403
    gen3_server.set_faults("no_drs")
    assert call(base + gen3_archive.zips[0].object_id, headers=auth).status == 404
    # Fence's own endpoint still answers without DRS
    assert call(f"{gen3_server.url}/user/data/download/{obj.object_id}",
                headers=auth).status == 200


# -- faults: tokens and URLs ---------------------------------------------------------
def test_token_ttl_zero_issues_expired_tokens(gen3_server: Gen3Server,
                                              gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[0]
    gen3_server.set_faults(Gen3Faults(token_ttl=0))
    stale = bearer(gen3_server)
    answer = call(f"{gen3_server.url}/user/data/download/{obj.object_id}", headers=stale)
    assert answer.status == 401 and "expired" in answer.body.decode()
    assert gen3_server.requests[-1].fault == "token_expired"
    gen3_server.set_faults(None)
    assert call(f"{gen3_server.url}/user/data/download/{obj.object_id}",
                headers=bearer(gen3_server)).status == 200


def test_expires_in_and_the_whole_credentials_body(gen3_server: Gen3Server,
                                                   gen3_creds: Path) -> None:
    """gen3sdk POSTs the whole credentials JSON to the cdis alias; ?expires_in shortens."""
    answer = call(gen3_server.url + "/user/credentials/cdis/access_token?expires_in=60",
                  "POST", headers={"Content-Type": "application/json"},
                  body=gen3_creds.read_bytes())
    assert answer.status == 200
    claims = jwt_claims(answer.json()["access_token"])
    assert claims is not None and 50 <= claims["exp"] - claims["iat"] <= 60


def test_token_uses(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    gen3_server.set_faults(Gen3Faults(token_uses=2))
    url = f"{gen3_server.url}/user/data/download/{gen3_archive.files[0].object_id}"
    auth = bearer(gen3_server)
    assert [call(url, headers=auth).status for _ in range(3)] == [200, 200, 401]
    assert gen3_server.requests[-1].fault == "token_uses"
    assert call(url, headers=bearer(gen3_server)).status == 200  # a refreshed token works
    assert gen3_server.token_requests == 2


def test_revoked_keys_end_their_tokens(gen3_server: Gen3Server,
                                       gen3_archive: Gen3Archive) -> None:
    url = f"{gen3_server.url}/user/data/download/{gen3_archive.files[0].object_id}"
    auth = bearer(gen3_server)
    gen3_server.revoke_keys()
    assert call(url, headers=auth).status == 401
    assert token(gen3_server).status == 401


def test_url_uses(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[0]
    gen3_server.set_faults(Gen3Faults(url_uses=1))
    url = signed(gen3_server, obj.object_id)
    assert call(url, "HEAD").status == 200  # HEADs are free
    assert call(url, headers={"Range": "bytes=0-99"}).status == 206
    used = call(url, headers={"Range": "bytes=100-"})
    assert used.status == 403 and b"Request has expired" in used.body
    assert b"<Code>AccessDenied</Code>" in used.body
    fresh = call(signed(gen3_server, obj.object_id), headers={"Range": "bytes=100-"})
    assert fresh.status == 206 and fresh.body == obj.path.read_bytes()[100:]


def test_url_ttl_zero(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    gen3_server.set_faults("url_ttl=0")
    answer = call(signed(gen3_server, gen3_archive.files[0].object_id))
    assert answer.status == 403 and b"Request has expired" in answer.body
    assert gen3_server.requests[-1].fault == "url_expired"


# -- faults: bodies ------------------------------------------------------------------
@pytest.mark.parametrize("times", [1, 2])
def test_drop_after_then_resume(gen3_server: Gen3Server, gen3_archive: Gen3Archive,
                                times: int) -> None:
    obj = gen3_archive.zips[2]
    data = obj.path.read_bytes()
    gen3_server.set_faults(Gen3Faults(drop_after=5000, drop_times=times))
    url = signed(gen3_server, obj.object_id)
    first = call(url)
    assert first.error is not None and first.body == data[:5000]
    second = call(url, headers={"Range": "bytes=5000-"})
    if times == 2:
        assert second.error is not None and second.body == data[5000:10000]
        second = call(url, headers={"Range": "bytes=10000-"})
        assert second.status == 206 and second.body == data[10000:]
    else:
        assert second.status == 206 and second.error is None
        assert data[:5000] + second.body == data
    drops = [r for r in gen3_server.requests if r.fault == "drop"]
    assert len(drops) == times and drops[0].bytes_sent == 5000


def test_reset_after(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    """A TCP reset instead of a close: the client keeps at most the N bytes sent."""
    obj = gen3_archive.zips[0]
    data = obj.path.read_bytes()
    gen3_server.set_faults("reset_after=5000")
    first = call(signed(gen3_server, obj.object_id))
    assert first.error is not None and len(first.body) <= 5000
    assert first.body == data[:len(first.body)]
    reset = [r for r in gen3_server.requests if r.fault == "reset"]
    assert len(reset) == 1 and reset[0].bytes_sent == 5000
    again = call(signed(gen3_server, obj.object_id))
    assert again.status == 200 and again.body == data


def test_drop_on_pathdb(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    slide = gen3_archive.slides[1]
    gen3_server.set_faults("drop_after=70000")
    first = call(gen3_server.slide_url(slide))
    assert first.error is not None and len(first.body) == 70000
    rest = call(gen3_server.slide_url(slide), headers={"Range": "bytes=70000-"})
    assert rest.status == 206 and md5(first.body + rest.body) == slide.md5


def test_wrong_byte_every_time(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.files[1]
    gen3_server.set_faults(f"wrong_byte={obj.object_id}")
    url = signed(gen3_server, obj.object_id)
    for _ in range(2):
        got = call(url)
        assert got.status == 200 and len(got.body) == obj.size and md5(got.body) != obj.md5
        assert got.headers["etag"] == f'"{obj.md5}"'  # only an MD5 check catches it
    data = obj.path.read_bytes()
    at = obj.size // 2
    assert got.body[:at] == data[:at] and got.body[at + 1:] == data[at + 1:]
    head = call(url, headers={"Range": f"bytes=0-{at - 1}"})  # not covering it: clean
    assert head.body == data[:at]


def test_wrong_byte_times(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    slide = gen3_archive.slides[2]
    gen3_server.set_faults(f"wrong_byte={slide.object_id}:1")
    url = gen3_server.slide_url(slide)
    assert md5(call(url).body) != slide.md5
    assert md5(call(url).body) == slide.md5


def test_ignore_range(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    obj = gen3_archive.zips[0]
    gen3_server.set_faults(Gen3Faults(ignore_range=True))
    got = call(signed(gen3_server, obj.object_id), headers={"Range": "bytes=100-"})
    assert got.status == 200 and got.body == obj.path.read_bytes()
    assert "content-range" not in got.headers
    slide = call(gen3_server.slide_url(gen3_archive.slides[0]),
                 headers={"Range": "bytes=100-"})
    assert slide.status == 200 and len(slide.body) == gen3_archive.slides[0].size


def test_etag_off_on_pathdb(gen3_server: Gen3Server, gen3_archive: Gen3Archive) -> None:
    gen3_server.set_faults("etag=off")
    assert "etag" not in call(gen3_server.slide_url(gen3_archive.slides[0])).headers
    obj = gen3_archive.files[0]  # the signed-URL host keeps S3's ETag
    assert call(signed(gen3_server, obj.object_id)).headers["etag"] == f'"{obj.md5}"'


def test_paced_and_delayed_bodies_are_whole(gen3_server: Gen3Server,
                                            gen3_archive: Gen3Archive) -> None:
    """rate, first_byte_delay and latency change when bytes come, never which (no
    timing asserted here: the benches measure it)."""
    gen3_server.set_faults("rate=50MB,first_byte_delay=1ms,latency=1ms")
    slide = gen3_archive.slides[0]
    got = call(gen3_server.slide_url(slide), headers={"Range": "bytes=1-"})
    assert got.status == 206 and got.body == slide.path.read_bytes()[1:]
    obj = gen3_archive.zips[1]
    assert md5(call(signed(gen3_server, obj.object_id)).body) == obj.md5


# -- the fault spec ------------------------------------------------------------------
def test_fault_spec_round_trip() -> None:
    plan = Gen3Faults.parse("token_ttl=5, token_uses=3, url_uses=1, url_ttl=60, "
                            "drop_after=1000:2, wrong_byte=dg.4DFC/a:1, wrong_byte=x, "
                            "ignore_range, forbidden=dg.4DFC/b, missing=dg.4DFC/c, no_drs, "
                            "rate=80mbit, first_byte_delay=50ms, latency=0.1, etag=off")
    assert plan == Gen3Faults(
        token_ttl=5, token_uses=3, url_uses=1, url_ttl=60, drop_after=1000, drop_times=2,
        wrong_byte=frozenset(["dg.4DFC/a", "x"]), wrong_byte_times=1, ignore_range=True,
        forbidden=frozenset(["dg.4DFC/b"]), missing=frozenset(["dg.4DFC/c"]), no_drs=True,
        rate=10_000_000, first_byte_delay=0.05, latency=0.1, etag=False)
    text = plan.describe()
    for word in ("token_ttl=5s", "token_uses=3", "drop_after=1000", "wrong_byte=2",
                 "ignore_range", "no_drs", "rate=10000000B/s", "etag=off"):
        assert word in text
    assert Gen3Faults.parse(None) == Gen3Faults() and Gen3Faults().describe() == "none"
    reset = Gen3Faults.parse("reset_after=10:3")
    assert (reset.drop_after, reset.drop_times, reset.drop_reset) == (10, 3, True)
    assert "reset_after=10" in reset.describe()


@pytest.mark.parametrize("spec", ["bogus=1", "token_uses=0", "token_uses=x", "drop_after",
                                  "rate=fast", "latency=-1", "etag=maybe"])
def test_fault_spec_errors(spec: str) -> None:
    with pytest.raises(FaultSpecError) as caught:
        Gen3Faults.parse(spec)
    assert "\n" not in str(caught.value)


def test_objects_must_lie_under_the_root(gen3_archive: Gen3Archive, tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not under"):
        Gen3Server(tmp_path, gen3_archive.objects, ())


# -- manifests -----------------------------------------------------------------------
def rows_of(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(("style", "columns"), [
    ("tcia", ["drs_uri", "name", "collection", "patient_id", "modality", "file_size_bytes",
              "source_manifest_url"]),
    ("ctdc", ["name", "drs_uri", "study_short_name", "participant_id", "File ID", "Md5sum"]),
    ("icdc", ["name", "drs_uri", "Study Code", "Case ID", "File Type", "File Format",
              "File Size", "md5sum", "File UUID", "File Location", "Patient ID"]),
])
def test_drs_manifest(gen3_server: Gen3Server, gen3_archive: Gen3Archive, tmp_path: Path,
                      style: str, columns: list[str]) -> None:
    path = write_drs_manifest(tmp_path / f"{style}.csv", gen3_archive.objects,
                              base_url=gen3_server.url, style=style)
    rows = rows_of(path)
    assert list(rows[0]) == columns and len(rows) == len(gen3_archive.objects)
    auth = bearer(gen3_server)
    host = urlsplit(gen3_server.url).netloc
    for row, obj in zip(rows, gen3_archive.objects, strict=True):
        assert row["drs_uri"] == f"drs://{host}/{obj.object_id}" and row["name"] == obj.name
        object_id = row["drs_uri"].split("/", 3)[3]
        assert md5(call(signed(gen3_server, object_id, auth)).body) == obj.md5
    if style == "ctdc":
        assert rows[0]["File ID"] == gen3_archive.objects[0].object_id
        assert rows[0]["Md5sum"] == gen3_archive.objects[0].md5
    default = rows_of(write_drs_manifest(tmp_path / "d.csv", gen3_archive.objects[:1]))
    assert default[0]["drs_uri"].startswith("drs://nci-crdc.datacommons.io/dg.4DFC/")


def test_pathdb_manifest(gen3_server: Gen3Server, gen3_archive: Gen3Archive,
                         tmp_path: Path) -> None:
    rows = rows_of(write_pathdb_manifest(tmp_path / "p.csv", gen3_archive.slides,
                                         base_url=gen3_server.pathdb_url))
    assert list(rows[0]) == ["collectionName", "collectionId", "subjectId", "imageId",
                             "slideId", "imageHeight", "imagedWidth", "physicalPixelSizeX",
                             "physicalPixelSizeY", "imageUrl", "created", "changed"]
    for row, slide in zip(rows, gen3_archive.slides, strict=True):
        assert (row["collectionName"], row["subjectId"]) == (slide.collection,
                                                             slide.patient_id)
        assert (row["imageId"], row["slideId"]) == (slide.image_id, str(slide.slide_id))
        assert row["collectionId"] == str(slide.collection_id)
        assert md5(call(row["imageUrl"]).body) == slide.md5


# -- nbia-retriever serve --gen3-port ------------------------------------------------
def test_serve_gen3(gen3_archive: Gen3Archive, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with serving([str(gen3_archive.summary.root), "--port", "0", "--gen3-port", "0",
                  "--gen3-out", str(out), "--gen3-faults", "url_uses=1"]) as lines:
        banner = "\n".join(lines)
        api = banner_url(lines, "Gen3:")
        pathdb = banner_url(lines, "PathDB:")
        assert "url_uses=1" in banner and "credentials.json" in banner
        key = json.loads((out / "credentials.json").read_text())["api_key"]
        assert stat.S_IMODE(os.stat(out / "credentials.json").st_mode) == 0o600
        answer = call(api + "/user/credentials/api/access_token", "POST",
                      body=json.dumps({"api_key": key}).encode())
        auth = {"Authorization": "Bearer " + answer.json()["access_token"]}
        row = rows_of(out / "drs-manifest.csv")[0]
        assert row["drs_uri"].startswith(f"drs://{urlsplit(api).netloc}/")
        object_id = row["drs_uri"].split("/", 3)[3]
        url = call(f"{api}/user/data/download/{object_id}", headers=auth).json()["url"]
        got = call(url)
        assert got.status == 200 and len(got.body) == int(row["file_size_bytes"])
        assert call(url).status == 403  # url_uses=1
        slide = rows_of(out / "pathdb-manifest.csv")[0]["imageUrl"]
        assert slide.startswith(pathdb) and call(slide).status == 200


def test_serve_gen3_bad_spec(gen3_archive: Gen3Archive) -> None:
    result = CliRunner().invoke(serve_command, [str(gen3_archive.summary.root),
                                                "--gen3-port", "0", "--gen3-faults",
                                                "token_uses=0"])
    assert result.exit_code == 2 and "--gen3-faults" in result.output
    assert "Traceback" not in result.output
    alone = CliRunner().invoke(serve_command, [str(gen3_archive.summary.root),
                                               "--gen3-out", "x"])
    assert alone.exit_code == 2 and "--gen3-port" in alone.output


# -- memory ----------------------------------------------------------------------------
def test_big_slides_are_written_and_served_in_pieces(gen3_archive: Gen3Archive,
                                                     tmp_path: Path) -> None:
    """A 48 MB slide is written a chunk at a time and served a piece at a time (the
    wrong_byte fault keeps the server off sendfile, on its own read loop): Python's
    allocations stay far below the file's size on both sides."""
    import tracemalloc

    size = 48 * 1024 * 1024
    tracemalloc.start()
    try:
        _, slides = gen3_view(gen3_archive.summary.root, tmp_path, zips=0, files=0,
                              slides=1, slide_size=size)
        written_peak = tracemalloc.get_traced_memory()[1]
        slide = slides[0]
        with Gen3Server(tmp_path, (), slides, f"wrong_byte={slide.object_id}") as server:
            tracemalloc.reset_peak()
            parts = urlsplit(server.slide_url(slide))
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            conn.request("GET", parts.path)
            response = conn.getresponse()
            digest = hashlib.md5(usedforsecurity=False)
            received = 0
            while block := response.read(65536):
                digest.update(block)
                received += len(block)
            conn.close()
            served_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert received == size and digest.hexdigest() != slide.md5  # the flipped byte
    assert written_peak < 8 * 1024 * 1024, written_peak
    assert served_peak < 8 * 1024 * 1024, served_peak
