"""Gen3 credentials, the access token and where the key may go (files.gen3, issue 24).

Over real HTTP against our Gen3 emulator (tests/gen3_fixtures.py) and, for redirects,
a small hostile server of this module: the key and token reach only the Gen3 API
origin the user chose, never the storage host, never a redirect's target, never a
message; a dead key stops with one line naming the host (exit 3)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from nbia_retriever.api import HostPolicy, Transport
from nbia_retriever.errors import (
    ApiError,
    AuthError,
    UntrustedHostError,
    UsageError,
    exit_code,
)
from nbia_retriever.files.drs import signed_url
from nbia_retriever.files.gen3 import (
    AUTH_ENV,
    GEN3_ENV,
    Gen3Auth,
    Gen3Credentials,
    check_origin,
    find_credentials,
    jwt_claims,
)
from nbia_retriever.server.appthread import AppThread
from nbia_retriever.server.gen3 import Gen3Faults

if TYPE_CHECKING:
    from gen3_fixtures import Gen3Archive
    from nbia_retriever.server.gen3 import Gen3Server


@pytest.fixture
def transport() -> Iterator[Transport]:
    t = Transport(timeout=30)
    yield t
    t.close()


def _auth(server: Gen3Server, creds: Path, transport: Transport, **kw: object) -> Gen3Auth:
    return Gen3Auth(server.url, Gen3Credentials.load(creds), transport, None,
                    chosen=server.url, **kw)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the file


def test_credentials_load_trims_and_hides_the_key(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"api_key": "  a.b.c-secret-key-123  ", "key_id": "k1"}))
    path.chmod(0o600)
    creds = Gen3Credentials.load(path)
    assert creds.api_key == "a.b.c-secret-key-123" and creds.key_id == "k1"
    assert creds.warning is None
    assert "secret" not in repr(creds)


def test_credentials_errors_name_the_file_never_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"api_key": "topsecret-value-999", oops}')
    with pytest.raises(AuthError) as err:
        Gen3Credentials.load(bad)
    assert str(bad) in str(err.value) and "topsecret" not in str(err.value)
    assert "\n" not in str(err.value)
    none = tmp_path / "none.json"
    none.write_text('{"key_id": "x"}')
    with pytest.raises(AuthError, match="'api_key' not found"):
        Gen3Credentials.load(none)
    with pytest.raises(UsageError, match="cannot read"):
        Gen3Credentials.load(tmp_path / "absent.json")


def test_credentials_readable_by_others_warns(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"api_key": "some-long-api-key-value"}))
    path.chmod(0o644)
    creds = Gen3Credentials.load(path)
    assert creds.warning is not None and "chmod 600" in creds.warning


def test_find_credentials_order(tmp_path: Path) -> None:
    files = {}
    for name in ("flag", "ours", "sdk"):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({"api_key": f"api-key-of-{name}-0000"}))
    env = {AUTH_ENV: str(files["ours"]), GEN3_ENV: str(files["sdk"])}
    found = find_credentials(files["flag"], env)
    assert found is not None and found.path == files["flag"]
    found = find_credentials(None, env)
    assert found is not None and found.path == files["ours"]
    found = find_credentials(None, {GEN3_ENV: str(files["sdk"])})
    assert found is not None and found.path == files["sdk"]
    assert find_credentials(None, {}) is None


def test_jwt_claims() -> None:
    assert jwt_claims("not a jwt") == {}
    assert jwt_claims("a.!!!.c") == {}


# ----------------------------------------------------------------------------- trust


def test_origin_trust_rules() -> None:
    check_origin("https://nci-crdc.datacommons.io", None)  # known CRDC host
    check_origin("http://127.0.0.1:9", None, chosen="http://127.0.0.1:9")
    with pytest.raises(UntrustedHostError, match="over http"):
        check_origin("http://gen3.example.org", None, chosen="http://gen3.example.org")
    with pytest.raises(UntrustedHostError, match="--gen3-endpoint"):
        check_origin("https://evil.example.org", None)
    check_origin("https://evil.example.org", HostPolicy(trusted_hosts=["evil.example.org"]))
    with pytest.raises(UntrustedHostError):  # the manifest's loopback host, not chosen
        check_origin("http://127.0.0.1:9", None)


# ----------------------------------------------------------------------------- the token


def test_token_fetched_once_and_only_to_the_api(gen3_server: Gen3Server, gen3_creds: Path,
                                               gen3_archive: Gen3Archive,
                                               transport: Transport) -> None:
    auth = _auth(gen3_server, gen3_creds, transport)
    urls = [signed_url(auth, obj.object_id) for obj in gen3_archive.objects[:3]]
    assert gen3_server.token_requests == 1 and auth.fetched == 1
    assert all(u.startswith(gen3_server.files_url) for u in urls)
    api = [r for r in gen3_server.requests if r.path.startswith("/user/data/download")]
    assert len(api) == 3 and all(r.authorization for r in api)


def test_used_up_token_is_refreshed_once(gen3_server: Gen3Server, gen3_creds: Path,
                                         gen3_archive: Gen3Archive,
                                         transport: Transport) -> None:
    gen3_server.set_faults(Gen3Faults(token_uses=1))
    auth = _auth(gen3_server, gen3_creds, transport)
    obj = gen3_archive.objects[0]
    signed_url(auth, obj.object_id)
    signed_url(auth, obj.object_id)  # the token is used up: 401, one refresh, success
    assert gen3_server.token_requests == 2
    statuses = [r.status for r in gen3_server.requests
                if r.path.startswith("/user/data/download")]
    assert statuses == [200, 401, 200]


def test_token_refreshed_before_exp(gen3_server: Gen3Server, gen3_creds: Path,
                                    gen3_archive: Gen3Archive, transport: Transport) -> None:
    gen3_server.set_faults(Gen3Faults(token_ttl=600))
    ahead = [0.0]
    auth = _auth(gen3_server, gen3_creds, transport,
                 clock=lambda: time.time() + ahead[0])
    obj = gen3_archive.objects[0]
    signed_url(auth, obj.object_id)
    ahead[0] = 500.0  # 600 s life: refreshed 60 s (a tenth) before exp, not at 500 s
    signed_url(auth, obj.object_id)
    assert gen3_server.token_requests == 1
    ahead[0] = 545.0
    signed_url(auth, obj.object_id)
    assert gen3_server.token_requests == 2  # before exp: no 401 on the way
    assert all(r.status == 200 for r in gen3_server.requests
               if r.path.startswith("/user/data/download"))


def test_revoked_key_is_one_line_naming_the_host(gen3_server: Gen3Server, gen3_creds: Path,
                                                 transport: Transport) -> None:
    gen3_server.revoke_keys()
    key = Gen3Credentials.load(gen3_creds).api_key
    auth = _auth(gen3_server, gen3_creds, transport, host="gen3.example.org")
    with pytest.raises(AuthError) as err:
        auth.authorization()
    text = str(err.value)
    assert "gen3.example.org" in text and "download a new API key" in text
    assert "https://gen3.example.org/" in text and "\n" not in text
    assert key not in text and key[:20] not in text
    assert exit_code(err.value) == 3


def test_dead_token_twice_is_auth_error(gen3_server: Gen3Server, gen3_creds: Path,
                                        gen3_archive: Gen3Archive,
                                        transport: Transport) -> None:
    gen3_server.set_faults(Gen3Faults(token_uses=1))
    auth = _auth(gen3_server, gen3_creds, transport)
    signed_url(auth, gen3_archive.objects[0].object_id)
    gen3_server.revoke_keys()  # the token is used up, and the refresh after the 401 fails
    with pytest.raises(AuthError, match="rejected"):
        signed_url(auth, gen3_archive.objects[0].object_id)
    assert gen3_server.token_requests == 2


def test_key_file_from_the_server_is_mode_600(gen3_creds: Path) -> None:
    assert os.stat(gen3_creds).st_mode & 0o077 == 0
    assert Gen3Credentials.load(gen3_creds).warning is None


# ----------------------------------------------------------------------------- redirects


class _Redirecting:
    """A Gen3 API that hands out a token, then redirects the signed-URL request to
    another origin (``target``), which records every request it gets."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.target = AppThread(self._target_app(), shutdown_timeout=0.2, name="target")
        self.api = AppThread(self._api_app(), shutdown_timeout=0.2, name="redirecting")

    def _target_app(self) -> web.Application:
        async def anything(request: web.Request) -> web.Response:
            self.seen.append(dict(request.headers))
            return web.json_response({"url": "http://127.0.0.1:9/x"})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", anything)
        return app

    def _api_app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            return web.json_response({"access_token": "hostile-token-abcdefghijklmnop"})

        async def download(request: web.Request) -> web.Response:
            raise web.HTTPFound(self.target.url + request.path)

        app = web.Application()
        app.router.add_post("/user/credentials/api/access_token", token)
        app.router.add_get("/user/data/download/{tail:.*}", download)
        return app


def test_bearer_never_follows_a_redirect(tmp_path: Path, transport: Transport) -> None:
    hostile = _Redirecting()
    hostile.target.start()
    hostile.api.start()
    try:
        creds = tmp_path / "c.json"
        creds.write_text(json.dumps({"api_key": "a-key-for-the-hostile-api"}))
        auth = Gen3Auth(hostile.api.url, Gen3Credentials.load(creds), transport, None,
                        chosen=hostile.api.url)
        with pytest.raises(ApiError) as err:
            signed_url(auth, "dg.4DFC/0000")
        assert "redirect" in str(err.value)
        assert "hostile-token" not in str(err.value)
        assert hostile.seen == []  # never followed: the other host saw nothing at all
    finally:
        hostile.api.stop()
        hostile.target.stop()
