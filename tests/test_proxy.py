"""Proxies (issue 25 item 7): ``--proxy`` (``NBIA_PROXY``, the config file's ``proxy``)
sends every request through an ``http://`` CONNECT proxy or a SOCKS5 proxy, and the
password inside the proxy URL is never printed, logged, stored or put on a child's
command line.

The proxies are real ones on loopback, written here (a thread per connection, sockets):
each demands the user and password, counts the tunnels it opened and the bytes it
carried, and knows a host name that nothing else resolves (``nbia.proxy-only.test``),
so a download that names that server can only have gone through it.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from enginehelpers import write_manifest
from hostile_server import AppThread, self_signed_context
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.s3 import S3Server
from nbia_retriever.server.synth import ArchiveSummary
from reliability_helpers import CLI

if TYPE_CHECKING:  # the module is a plugin here: imported by pytest, not before
    from s3_fixtures import S3Archive

pytest_plugins = ["s3_fixtures"]  # IDC's S3 (the reference server's S3 mode)

USER = "proxy-user"
PASSWORD = "pr0xy-Pa55:w/rd-7731"  # ':' and '/' percent-encoded in the URL
QUOTED = PASSWORD.replace(":", "%3A").replace("/", "%2F")
FAKE_HOST = "nbia.proxy-only.test"  # only the proxies know where it is
SERVICES = "/nbia-api/services"
SERVLET = "/nbia-download/servlet/DownloadServlet"


class LoopbackProxy:
    """A proxy on 127.0.0.1 that checks ``USER``/``PASSWORD``, maps :data:`FAKE_HOST` to
    ``upstream`` and pipes bytes both ways. ``tunnels`` counts the connections it opened
    for a client, ``refused`` those it turned away, ``carried`` the bytes it brought
    back; ``targets`` are the addresses clients asked for."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tunnels = self.refused = self.carried = 0
        self.targets: list[str] = []
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self._open:
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(client)
            threading.Thread(target=self._serve_safely, args=(client,), daemon=True).start()

    def _serve_safely(self, client: socket.socket) -> None:
        try:
            self.serve(client)
        except OSError:
            client.close()

    def serve(self, client: socket.socket) -> None:
        raise NotImplementedError

    def resolve(self, host: str, port: int) -> tuple[str, int]:
        with self._lock:
            self.targets.append(f"{host}:{port}")
        return self.upstream if host == FAKE_HOST else (host, port)

    def tunnel(self, client: socket.socket, upstream: socket.socket) -> None:
        with self._lock:
            self.tunnels += 1
            self._open.append(upstream)

        def pipe(src: socket.socket, dst: socket.socket, count: bool) -> None:
            try:
                while data := src.recv(1 << 16):
                    dst.sendall(data)
                    if count:
                        with self._lock:
                            self.carried += len(data)
            except OSError:
                pass
            finally:
                for sock in (src, dst):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pipe, args=(upstream, client, True), daemon=True).start()
        pipe(client, upstream, False)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise OSError("closed")
        data += more
    return data


class ConnectProxy(LoopbackProxy):
    """An HTTP proxy that only tunnels (``CONNECT``), after ``Proxy-Authorization``; with
    ``tls``, spoken inside TLS (an ``https://`` proxy)."""

    def __init__(self, upstream: tuple[str, int], tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        super().__init__(upstream)

    def serve(self, client: socket.socket) -> None:
        if self.tls is not None:
            client = self.tls.wrap_socket(client, server_side=True)
        head = b""
        while b"\r\n\r\n" not in head:
            more = client.recv(4096)
            if not more or len(head) > 65536:
                client.close()
                return
            head += more
        lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        wanted = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        if headers.get("proxy-authorization") != wanted:
            with self._lock:
                self.refused += 1
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                           b"Proxy-Authenticate: Basic realm=\"test\"\r\n"
                           b"Content-Length: 0\r\nConnection: close\r\n\r\n")
            client.close()
            return
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            client.close()
            return
        host, _, port = target.rpartition(":")
        upstream = socket.create_connection(self.resolve(host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.tunnel(client, upstream)


class Socks5Proxy(LoopbackProxy):
    """A SOCKS5 proxy (RFC 1928) with user/password authentication only (RFC 1929)."""

    def serve(self, client: socket.socket) -> None:
        version, count = read_exactly(client, 2)
        methods = read_exactly(client, count)
        if version != 5 or 2 not in methods:
            client.sendall(b"\x05\xff")
            client.close()
            return
        client.sendall(b"\x05\x02")
        _, length = read_exactly(client, 2)
        user = read_exactly(client, length).decode()
        (length,) = read_exactly(client, 1)
        password = read_exactly(client, length).decode()
        if (user, password) != (USER, PASSWORD):
            with self._lock:
                self.refused += 1
            client.sendall(b"\x01\x01")
            client.close()
            return
        client.sendall(b"\x01\x00")
        _, command, _, kind = read_exactly(client, 4)
        if kind == 1:
            host = socket.inet_ntoa(read_exactly(client, 4))
        elif kind == 3:
            (length,) = read_exactly(client, 1)
            host = read_exactly(client, length).decode()
        else:
            host = socket.inet_ntop(socket.AF_INET6, read_exactly(client, 16))
        (port,) = struct.unpack("!H", read_exactly(client, 2))
        if command != 1:
            client.sendall(b"\x05\x07\x00\x01" + bytes(6))
            client.close()
            return
        upstream = socket.create_connection(self.resolve(host, port))
        client.sendall(b"\x05\x00\x00\x01" + bytes(6))
        self.tunnel(client, upstream)


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(seed=25, collections=1, patients=2, studies=1, series=2, images=3,
                           rows=16, columns=16, restricted=False)


@pytest.fixture(scope="module")
def tls_origin(archive: ArchiveSummary,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """The reference server over HTTPS (self-signed: the runs pass --insecure), its own
    URLs naming :data:`FAKE_HOST`, as a server behind a proxy would."""
    reference = ReferenceServer(archive.root)  # only its app is used
    context = self_signed_context(tmp_path_factory.mktemp("tls"))
    with AppThread(reference.service.app(), ssl_context=context) as runner:
        reference.service.base_url = f"https://{FAKE_HOST}:{runner.port}"
        yield runner


@pytest.fixture()
def proxies() -> Iterator[list[LoopbackProxy]]:
    started: list[LoopbackProxy] = []
    yield started
    for proxy in started:
        proxy.close()


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any proxy of the machine's (and no config file)."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k != "NBIA_RETRIEVER_CONFIG"}
    env["NBIA_RETRIEVER_CONFIG"] = os.devnull + ".none"
    env["NBIA_SOURCE"] = "nbia"  # the NBIA servers here, whatever IDC's index holds
    return {**env, **extra}


def images(archive: ArchiveSummary) -> int:
    return sum(s.images for s in archive.series)


def everything_written(folder: Path) -> bytes:
    """Every byte of every file under ``folder`` (downloads, journal, reports)."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def assert_no_password(*texts: str | bytes) -> None:
    for text in texts:
        data = text.encode() if isinstance(text, str) else text
        for secret in (PASSWORD, QUOTED, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()):
            assert secret.encode() not in data, secret


def download(tmp_path: Path, archive: ArchiveSummary, *, host: str, port: int, scheme: str,
             args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cart = write_manifest(tmp_path / "cart.tcia", [s.series_uid for s in archive.series],
                          f"{scheme}://{host}:{port}{SERVLET}")
    return subprocess.run(
        [*CLI, "download", str(cart), "-d", str(tmp_path / "dl"), "--backoff", "0.01",
         "--retries", "1", "--api-url", f"{scheme}://{host}:{port}{SERVICES}", *args],
        capture_output=True, text=True, env=env, timeout=120, check=False)


# -- through an HTTP CONNECT proxy ----------------------------------------------------------


def test_download_through_an_http_connect_proxy(tmp_path: Path, archive: ArchiveSummary,
                                                tls_origin: AppThread,
                                                proxies: list[LoopbackProxy]) -> None:
    """``--proxy http://user:pass@host:port``: a server only the proxy can reach is
    downloaded from through its tunnels (series zips included: the bytes it carried);
    the password is sent (the proxy checks it) and shown nowhere."""
    proxy = ConnectProxy(("127.0.0.1", tls_origin.port))
    proxies.append(proxy)
    url = f"http://{USER}:{QUOTED}@127.0.0.1:{proxy.port}"
    done = download(tmp_path, archive, host=FAKE_HOST, port=tls_origin.port, scheme="https",
                    args=["--proxy", url, "--insecure"], env=clean_env())
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert len(list((tmp_path / "dl").rglob("*.dcm"))) == images(archive)
    assert proxy.tunnels >= 1 and proxy.refused == 0
    assert set(proxy.targets) == {f"{FAKE_HOST}:{tls_origin.port}"}
    dcm_bytes = sum(p.stat().st_size for p in (tmp_path / "dl").rglob("*.dcm"))
    assert proxy.carried > dcm_bytes // 2  # the zips (deflated) came through it
    assert_no_password(output, everything_written(tmp_path))


def test_a_wrong_proxy_password_is_one_line_without_it(tmp_path: Path, archive: ArchiveSummary,
                                                       tls_origin: AppThread,
                                                       proxies: list[LoopbackProxy]) -> None:
    proxy = ConnectProxy(("127.0.0.1", tls_origin.port))
    proxies.append(proxy)
    wrong = QUOTED + "x"
    done = download(tmp_path, archive, host=FAKE_HOST, port=tls_origin.port, scheme="https",
                    args=["--insecure"],
                    env=clean_env(NBIA_PROXY=f"http://{USER}:{wrong}@127.0.0.1:{proxy.port}"))
    output = done.stdout + done.stderr
    assert done.returncode != 0 and proxy.refused >= 1 and proxy.tunnels == 0
    assert "Traceback" not in output and "407" in output, output
    assert f"the proxy http://127.0.0.1:{proxy.port} refused" in output, output
    assert_no_password(output, everything_written(tmp_path))
    assert PASSWORD + "x" not in output


def test_a_malformed_proxy_url_never_shows_its_password(tmp_path: Path) -> None:
    """An unencoded '/' in the password makes the URL malformed: the error still names
    the proxy without any of it."""
    cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"], "http://127.0.0.1:9" + SERVLET)
    done = subprocess.run([*CLI, "list", str(cart), "--proxy",
                           f"http://{USER}:{PASSWORD}@127.0.0.1:3128"], capture_output=True,
                          text=True, env=clean_env(), timeout=60, check=False)
    assert done.returncode == 2 and "127.0.0.1:3128" in done.stderr, done.stderr
    assert_no_password(done.stdout, done.stderr)
    assert "w/rd" not in done.stderr


def test_download_through_an_https_proxy(tmp_path: Path, archive: ArchiveSummary,
                                         tls_origin: AppThread, proxies: list[LoopbackProxy],
                                         tmp_path_factory: pytest.TempPathFactory) -> None:
    """``https://`` proxy: TLS to the proxy, CONNECT inside it, and the server's TLS inside
    that (TLS in TLS); its certificate is checked like the server's (--insecure here)."""
    proxy = ConnectProxy(("127.0.0.1", tls_origin.port),
                         tls=self_signed_context(tmp_path_factory.mktemp("proxy-tls")))
    proxies.append(proxy)
    url = f"https://{USER}:{QUOTED}@127.0.0.1:{proxy.port}"
    done = download(tmp_path, archive, host=FAKE_HOST, port=tls_origin.port, scheme="https",
                    args=["--proxy", url, "--insecure"], env=clean_env())
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert len(list((tmp_path / "dl").rglob("*.dcm"))) == images(archive)
    assert proxy.tunnels >= 1 and proxy.refused == 0
    assert set(proxy.targets) == {f"{FAKE_HOST}:{tls_origin.port}"}
    assert_no_password(output, everything_written(tmp_path))


# -- through a SOCKS5 proxy ------------------------------------------------------------------


def test_download_through_socks5h_names_resolved_by_the_proxy(
        tmp_path: Path, archive: ArchiveSummary, tls_origin: AppThread,
        proxies: list[LoopbackProxy]) -> None:
    """``socks5h://``: the proxy resolves the server's name (nothing here can), TLS to the
    server runs inside the tunnel; NBIA_PROXY (the environment) sets it as --proxy does,
    and worker processes download through it too (they inherit it)."""
    proxy = Socks5Proxy(("127.0.0.1", tls_origin.port))
    proxies.append(proxy)
    env = clean_env(NBIA_PROXY=f"socks5h://{USER}:{QUOTED}@127.0.0.1:{proxy.port}")
    done = download(tmp_path, archive, host=FAKE_HOST, port=tls_origin.port, scheme="https",
                    args=["--insecure", "--processes", "1"], env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert len(list((tmp_path / "dl").rglob("*.dcm"))) == images(archive)
    assert proxy.tunnels >= 1 and proxy.refused == 0
    assert set(proxy.targets) == {f"{FAKE_HOST}:{tls_origin.port}"}
    dcm_bytes = sum(p.stat().st_size for p in (tmp_path / "dl").rglob("*.dcm"))
    assert proxy.carried > dcm_bytes // 2
    assert_no_password(output, everything_written(tmp_path))


def test_download_through_socks5_from_the_config_file(tmp_path: Path, archive: ArchiveSummary,
                                                      serve: Callable[..., ReferenceServer],
                                                      proxies: list[LoopbackProxy]) -> None:
    """``socks5://`` (names resolved here) named by the config file's ``proxy`` key, to a
    plain-http server: every connection is a tunnel of the proxy's."""
    server = serve(archive.root)
    proxy = Socks5Proxy(("127.0.0.1", server.port or 0))
    proxies.append(proxy)
    config = tmp_path / "config.toml"
    config.write_text(f'proxy = "socks5://{USER}:{QUOTED}@127.0.0.1:{proxy.port}"\n',
                      encoding="utf-8")
    env = clean_env(NBIA_RETRIEVER_CONFIG=str(config))
    done = download(tmp_path, archive, host="127.0.0.1", port=server.port or 0, scheme="http",
                    args=[], env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert len(list((tmp_path / "dl").rglob("*.dcm"))) == images(archive)
    assert proxy.tunnels >= 1 and proxy.refused == 0
    assert set(proxy.targets) == {f"127.0.0.1:{server.port}"}
    assert_no_password(output, everything_written(tmp_path / "dl"))


def test_list_through_a_proxy_and_a_refused_socks_login(tmp_path: Path,
                                                       archive: ArchiveSummary,
                                                       serve: Callable[..., ReferenceServer],
                                                       proxies: list[LoopbackProxy]) -> None:
    """Every command that talks to a server takes --proxy (``list`` here); a SOCKS
    refusal is one line naming the proxy without the password."""
    server = serve(archive.root)
    proxy = Socks5Proxy(("127.0.0.1", server.port or 0))
    proxies.append(proxy)
    cart = write_manifest(tmp_path / "cart.tcia", [s.series_uid for s in archive.series],
                          server.download_url)
    good = f"socks5://{USER}:{QUOTED}@127.0.0.1:{proxy.port}"
    listed = subprocess.run([*CLI, "list", str(cart), "--proxy", good], capture_output=True,
                            text=True, env=clean_env(), timeout=60, check=False)
    assert listed.returncode == 0, listed.stderr
    assert proxy.tunnels >= 1
    assert_no_password(listed.stdout, listed.stderr)
    wrong = f"socks5://{USER}:{QUOTED}zz@127.0.0.1:{proxy.port}"
    refused = subprocess.run([*CLI, "list", str(cart), "--proxy", wrong], capture_output=True,
                             text=True, env=clean_env(), timeout=60, check=False)
    assert refused.returncode != 0 and proxy.refused >= 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{proxy.port}" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr and "zz" not in refused.stderr
    assert_no_password(refused.stdout, refused.stderr)


def test_idc_objects_come_through_the_proxy_too(tmp_path: Path, s3_archive: S3Archive,
                                                s3_server: S3Server,
                                                serve: Callable[..., ReferenceServer],
                                                proxies: list[LoopbackProxy]) -> None:
    """``--source idc``: IDC's S3 client uses the same transport, so its listings and
    objects go through the proxy too (in the worker processes as well)."""
    nbia = serve(s3_archive.root)
    port = int(s3_server.url.rsplit(":", 1)[1].rstrip("/"))
    proxy = Socks5Proxy(("127.0.0.1", port))
    proxies.append(proxy)
    cart = write_manifest(tmp_path / "cart.tcia", list(s3_archive.idc_uids), nbia.download_url)
    done = subprocess.run(
        [*CLI, "download", str(cart), "-d", str(tmp_path / "dl"), "--source", "idc",
         "--idc-index", str(s3_archive.index_dir), "--idc-endpoint", s3_server.url,
         "--proxy", f"socks5://{USER}:{QUOTED}@127.0.0.1:{proxy.port}"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert list((tmp_path / "dl").rglob("*.dcm"))
    assert proxy.tunnels >= 1 and set(proxy.targets) == {f"127.0.0.1:{port}"}
    assert_no_password(output, everything_written(tmp_path / "dl"))


# -- the URL, the Python API, the children ---------------------------------------------------


@pytest.mark.parametrize("url, why", [
    ("ftp://u:secret-pw-1@127.0.0.1:21", "use an http://, https://, socks5:// or socks5h://"),
    ("socks5://u:secret-pw-1@127.0.0.1:notaport", "not a host and port"),
    ("http://u:secret-pw-1@127.0.0.1:3128/some/path", "host:port only"),
])
def test_a_bad_proxy_url_is_exit_2_naming_it_without_its_password(tmp_path: Path, url: str,
                                                                  why: str) -> None:
    cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"], "http://127.0.0.1:9" + SERVLET)
    done = subprocess.run([*CLI, "list", str(cart), "--proxy", url], capture_output=True,
                          text=True, env=clean_env(), timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and "127.0.0.1" in lines[0], done.stderr
    assert "secret-pw-1" not in done.stderr + done.stdout


def test_python_api_proxy_logs_and_children(tmp_path: Path, archive: ArchiveSummary,
                                            serve: Callable[..., ReferenceServer],
                                            proxies: list[LoopbackProxy],
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """``download(..., proxy=URL)`` goes through it; the DEBUG log, the options' repr and
    the web view's child command line never hold the password, while the child's
    environment carries the proxy (that is how children get it)."""
    from nbia_retriever import download as api_download
    from nbia_retriever.engine import DownloadOptions

    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NBIA_PROXY", "")  # restored (removed) after the test
    monkeypatch.setenv("NBIA_RETRIEVER_CONFIG", str(tmp_path / "none.toml"))
    server = serve(archive.root)
    proxy = Socks5Proxy(("127.0.0.1", server.port or 0))
    proxies.append(proxy)
    url = f"socks5://{USER}:{QUOTED}@127.0.0.1:{proxy.port}"
    caplog.set_level(logging.DEBUG)
    report = api_download([s.series_uid for s in archive.series], tmp_path / "dl",
                          api_url=server.api_url, proxy=url, processes=0, progress=False,
                          source="nbia")
    assert report.ok and proxy.tunnels >= 1
    assert_no_password(caplog.text, everything_written(tmp_path / "dl"))
    options = DownloadOptions(proxy=url)
    assert f"127.0.0.1:{proxy.port}" in repr(options)
    assert_no_password(repr(options))
    assert os.environ["NBIA_PROXY"] == url  # what a child process inherits
    pytest.importorskip("textual_serve")
    from nbia_retriever.tui.web import child_argv, child_environment

    argv = child_argv("m.tcia", dest=".", options=options, user=None)
    assert_no_password(" ".join(argv))
    assert "--proxy" not in argv
    assert child_environment(dict(os.environ))["NBIA_PROXY"] == url


def test_no_proxy_still_bypasses(tmp_path: Path, archive: ArchiveSummary,
                                 serve: Callable[..., ReferenceServer],
                                 proxies: list[LoopbackProxy]) -> None:
    """NO_PROXY names hosts that are reached directly, with --proxy as with HTTPS_PROXY."""
    server = serve(archive.root)
    proxy = Socks5Proxy(("127.0.0.1", server.port or 0))
    proxies.append(proxy)
    env = clean_env(NBIA_PROXY=f"socks5://{USER}:{QUOTED}@127.0.0.1:{proxy.port}",
                    NO_PROXY="127.0.0.1")
    done = download(tmp_path, archive, host="127.0.0.1", port=server.port or 0, scheme="http",
                    args=[], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert proxy.tunnels == 0


def test_the_resume_line_never_carries_a_proxy_password(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from nbia_retriever.cli.download_command import resume_command

    monkeypatch.setattr(sys, "argv", ["nbia-retriever", "download", "m.tcia", "-d", "out",
                                      "--proxy", "socks5h://ann:s3cr3t@127.0.0.1:1080"])
    line = resume_command()
    assert line is not None and "s3cr3t" not in line and "ann" not in line
    assert line.startswith("nbia-retriever download m.tcia -d out")
    assert "NBIA_PROXY" in line
    monkeypatch.setattr(sys, "argv", ["nbia-retriever", "download", "m.tcia",
                                      "--proxy=http://127.0.0.1:3128"])
    assert resume_command() == "nbia-retriever download m.tcia --proxy=http://127.0.0.1:3128"
