"""Secrets and TLS: the password and the tokens appear nowhere, and certificates are checked.

The scan is deliberately blunt: every byte the client produced (stdout and stderr of
the CLI in every output mode, the error report, every file under the download folder,
journal included, and every log record at DEBUG level of an in-process run) is searched
for the password and for *every* token the server issued during the test (read from the
server's token store, so refreshed tokens count too). Runs include a token expiring
mid-download (401, refresh), a failing series (error report content) and a wrong
password, because secrets leak through error paths, not happy ones.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Callable

import httpx
import pytest

from enginehelpers import write_manifest
from hostile_server import AppThread, self_signed_context
from nbia_retriever import download, make_engine
from nbia_retriever.api import Credentials, NbiaClient, TlsError
from nbia_retriever.engine import DownloadOptions
from nbia_retriever.models import SeriesState
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from reliability_helpers import CLI

_SECRET_WORDS = ("password", "token", "secret", "authorization", "bearer")


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(seed=71, collections=2, patients=1, studies=1, series=2, images=2,
                           rows=16, columns=16)


def issued_tokens(server: ReferenceServer) -> set[str]:
    """Every access and refresh token the server handed out (its private store)."""
    store = server.service.tokens
    return set(store._access) | set(store._refresh)


def cli(args: list[str], password: str, **kw: object) -> subprocess.Popen[bytes]:
    env = {**os.environ, "NBIA_PASSWORD": password}
    return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, **kw)  # type: ignore[call-overload]


def test_password_and_tokens_appear_in_no_output_file_or_url(tmp_path, archive, serve, caplog):
    password = archive.users["alice"]
    uids = [s.series_uid for s in archive.series]
    restricted = [s.series_uid for s in archive.series if s.restricted]
    blobs: dict[str, bytes] = {}
    server = serve(archive.root)
    # One series fails past the budget, so the error report and messages have content.
    server.set_faults(FaultPlan(script={restricted[0]: ["http500"] * 2}))
    cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url, retries=1)
    base = ["download", str(cart), "--user", "alice", "--api-url", server.api_url,
            "--backoff", "0.01"]

    # 1. --json, with the token expiring after the first series: 401, refresh, login.
    proc = cli([*base, "-d", str(tmp_path / "dl1"), "--json", "-w", "1",
                "--error-report", str(tmp_path / "errors1.csv")], password)
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    jumped = False
    for line in proc.stdout:
        out += line
        event = json.loads(line)
        if event.get("state") == SeriesState.COMPLETE and not jumped:
            jumped = True
            server.advance_clock(100_000)
    blobs["json stdout"] = bytes(out)
    blobs["json stderr"] = proc.stderr.read()
    assert proc.wait(60) == 1
    proc.stdout.close()
    proc.stderr.close()
    assert jumped and any(r.status == 401 for r in server.requests)

    # 2. plain (not a terminal) and 3. --quiet, each with an error report.
    for mode in ("plain", "quiet"):
        server.set_faults(FaultPlan(script={restricted[0]: ["http500"] * 2}))
        extra = ["--quiet"] if mode == "quiet" else []
        done = subprocess.run([*CLI, *base, "-d", str(tmp_path / f"dl-{mode}"), *extra,
                               "--error-report", str(tmp_path / f"errors-{mode}.csv")],
                              capture_output=True, env={**os.environ,
                                                        "NBIA_PASSWORD": password},
                              timeout=60, check=False)
        assert done.returncode == 1, done.stderr
        blobs[f"{mode} stdout"], blobs[f"{mode} stderr"] = done.stdout, done.stderr

    # 4. `list` with a login, and a wrong password (the error path of the login).
    for name, args, secret in (("list", ["list", str(cart), "--user", "alice",
                                         "--api-url", server.api_url], password),
                               ("wrong", [*base, "-d", str(tmp_path / "dl-wrong")],
                                password + "-wrong")):
        done = subprocess.run([*CLI, *args], capture_output=True, timeout=60, check=False,
                              env={**os.environ, "NBIA_PASSWORD": secret})
        blobs[f"{name} stdout"], blobs[f"{name} stderr"] = done.stdout, done.stderr
    assert b"alice" in blobs["wrong stderr"] + blobs["wrong stdout"]

    # 5. In-process, every log record of every library at DEBUG.
    server.set_faults(None)
    with caplog.at_level(logging.DEBUG):
        report = download(cart, tmp_path / "dl-api", user="alice", password=password,
                          api_url=server.api_url, backoff_base=0.01)
    assert report.ok, report.summary()
    blobs["log records"] = "\n".join(
        f"{r.name} {r.getMessage()} {r.args!r}" for r in caplog.records).encode()
    assert caplog.records, "nothing was logged: the log scan proves nothing"
    requests = server.requests
    tokens = issued_tokens(server)

    assert len(tokens) >= 4, "the server issued too few tokens for a meaningful test"
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "cart.tcia":
            blobs[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert any(name.endswith("journal.sqlite") for name in blobs)
    assert any(name.startswith("errors") for name in blobs)
    for secret in {password, *tokens}:
        for name, blob in blobs.items():
            assert secret.encode() not in blob, f"a secret leaked into {name}"
    # Never in a URL: no secret-looking query key (the server masks their values as ***),
    # no token or password as a value, and the password grant went in the POST body.
    for record in requests:
        for key, value in record.query.items():
            assert not any(w in key.lower() for w in _SECRET_WORDS), record
            assert value not in tokens and password not in value, record
    grants = [r for r in requests if r.path.endswith("/oauth/token")]
    assert grants and all(r.method == "POST" and not r.query for r in grants)


def test_reprs_hide_the_password(archive):
    password = archive.users["alice"]
    credentials = Credentials("alice", password)
    options = DownloadOptions(credentials=credentials)
    engine = make_engine(["1.2.3"], ".", user="alice", password=password)
    for text in (repr(credentials), str(credentials), repr(options), repr(engine.options)):
        assert password not in text and "alice" in text


# ----------------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls_server(archive: ArchiveSummary, tmp_path_factory: pytest.TempPathFactory):
    """The reference server's app over HTTPS with a self-signed certificate."""
    reference = ReferenceServer(archive.root)  # not started: only its app is used
    context = self_signed_context(tmp_path_factory.mktemp("tls"))
    with AppThread(reference.service.app(), ssl_context=context) as runner:
        reference.service.base_url = runner.url
        yield runner


def test_client_verifies_certificates_by_default(tls_server):
    with NbiaClient(tls_server.url + "/nbia-api/services", version="v1",
                    backoff_base=0.01) as client, pytest.raises(TlsError) as caught:
        client.collections()
    assert "self-signed" in str(caught.value) and "--insecure" in str(caught.value)
    with NbiaClient(tls_server.url + "/nbia-api/services", version="v1",
                    verify=False) as client:
        assert client.collections()
    # And the plain httpx default we rely on is indeed "verify".
    with pytest.raises(httpx.ConnectError):
        httpx.get(tls_server.url + "/", timeout=10)


@pytest.mark.parametrize("extra", [[], ["--api", "v1"], ["--api", "v4"], ["--user", "alice"]],
                         ids=["auto", "v1", "v4", "login"])
def test_self_signed_server_fails_in_one_line_unless_insecure(tmp_path, tls_server, archive,
                                                              extra):
    public = [s.series_uid for s in archive.series if not s.restricted]
    cart = write_manifest(tmp_path / "cart.tcia", public,
                          tls_server.url + "/nbia-download/servlet/DownloadServlet")
    env = {**os.environ, "NBIA_PASSWORD": archive.users["alice"]}
    if "--user" in extra:  # a password goes only to a server the user chose
        extra = [*extra, "--api-url", tls_server.url + "/nbia-api/services"]
    args = [*CLI, "download", str(cart), "-d", str(tmp_path / "dl"), "--backoff", "0.01",
            "--quiet", *extra]
    refused = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60,
                             check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "certificate" in line]
    assert len(lines) == 1 and "--insecure" in lines[0], output
    assert not list((tmp_path / "dl").rglob("*.dcm"))
    accepted = subprocess.run([*args, "--insecure"], capture_output=True, text=True, env=env,
                              timeout=60, check=False)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert len(list((tmp_path / "dl").rglob("*.dcm"))) == sum(
        s.images for s in archive.series if not s.restricted)


def test_insecure_is_never_the_default():
    assert DownloadOptions().verify_tls is True
    from nbia_retriever.cli import download as download_command

    ctx = download_command.make_context("download", ["cart.tcia"])
    assert ctx.params["insecure"] is False
    ctx = download_command.make_context("download", ["cart.tcia", "--insecure"])
    assert ctx.params["insecure"] is True
