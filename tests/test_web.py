"""``nbia-retriever open --web``: the view served in a browser through textual-serve.

Real subprocesses on a free loopback port: the page (and its session token), the
websocket that starts one ``open`` child per session (it renders the view; its argv holds
no password), a clean stop on SIGINT and SIGTERM, and the one-line errors (no extra,
options without --web, a busy port).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import pytest
from click.testing import CliRunner

pytest.importorskip("textual_serve")

TITLE = "NBIA Data Retriever"
EXTRA_HINT = "pip install 'nbia-retriever[web]'"


@pytest.fixture(scope="module")
def manifest(archive_factory: Any) -> Path:
    root = archive_factory(seed=1, collections=1, patients=1, studies=1, series=1, images=1,
                           awkward=False).root
    return Path(root) / "manifest.tcia"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NBIA_PASSWORD"}
    env.update(extra)
    return env


class WebProcess:
    """``open --web`` in a subprocess: its output lines, read as they come."""

    #: Options of the Python that runs it (before ``-m``).
    python_options: tuple[str, ...] = ()

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, *self.python_options, "-m", "nbia_retriever.cli", "open", "--web",
             *args],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append),
                         daemon=True).start()

    @staticmethod
    def _pump(stream: Any, sink: Any) -> None:
        for line in stream:
            sink(line)

    def address(self, timeout: float = 30.0) -> str:
        """The printed address, once the port answers."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no address printed; stderr: {''.join(self.stderr)}"
            assert self.proc.poll() is None, f"exited: {''.join(self.stderr)}"
            try:
                line = self.lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if " on http://" in line:
                return line.split(" on ", 1)[1].strip()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def web_process(manifest: Path, cwd: Path, *args: str,
                env: dict[str, str] | None = None) -> Iterator[tuple[WebProcess, int]]:
    port = free_port()
    process = WebProcess(["--port", str(port), *args, str(manifest)], cwd,
                         env or environment())
    try:
        yield process, port
    finally:
        process.kill()


def wait_until_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert time.monotonic() < deadline, f"port {port} never answered"
            time.sleep(0.05)


def open_children(server_pid: int) -> list[psutil.Process]:
    return [p for p in psutil.Process(server_pid).children(recursive=True)
            if "open" in p.cmdline() and "--web" not in p.cmdline()]


def test_the_page_needs_the_printed_address(manifest: Path, tmp_path: Path) -> None:
    with web_process(manifest, tmp_path) as (process, port):
        address = process.address()
        wait_until_listening(port)
        assert address.startswith(f"http://127.0.0.1:{port}/?token=")
        base = f"http://127.0.0.1:{port}/"
        assert httpx.get(base).status_code == 403
        assert httpx.get(base + "?token=guess").status_code == 403
        page = httpx.get(address)
        assert page.status_code == 200
        html = page.text
        # textual-serve's page: its terminal, script and websocket, named after our app
        assert 'class="textual-terminal"' in html
        assert "/static/js/textual.js" in html
        assert f'data-session-websocket-url="ws://127.0.0.1:{port}/ws"' in html
        assert f"{TITLE} — manifest.tcia" in html
        cookie = page.cookies.get(f"nbia_retriever_session_{port}")
        assert cookie and cookie in address
        assert "samesite=strict" in page.headers["set-cookie"].lower()
        assert "httponly" in page.headers["set-cookie"].lower()
        # the page's URLs follow the address the browser used
        assert 'ws://localhost:' in httpx.get(address.replace("127.0.0.1", "localhost")).text
        assert process.stop(signal.SIGTERM) == 0


def test_the_title_is_text_not_html(manifest: Path, tmp_path: Path) -> None:
    odd = tmp_path / "<img src=x onerror=alert(1)>&.tcia"
    odd.write_bytes(manifest.read_bytes())
    with web_process(odd, tmp_path) as (process, port):
        address = process.address()
        wait_until_listening(port)
        html = httpx.get(address).text
        assert "<img src=x" not in html
        assert f"{TITLE} — &lt;img src=x onerror=alert(1)&gt;&amp;.tcia" in html
        # files the view delivers are for the session's page only
        assert httpx.get(f"http://127.0.0.1:{port}/download/x").status_code == 403
        assert process.stop() == 0


def test_relayed_child_output_is_inert() -> None:
    import io

    from nbia_retriever.tui.web import InertStream
    from nbia_retriever.untrusted import SECRETS

    SECRETS.add("hunter2-web-secret")
    try:
        out = io.StringIO()
        stream = InertStream(out)
        text = "Traceback\n  error page \x1b]0;pwned\x07\x1b[2J hunter2-web-secret\n"
        assert stream.write(text) == len(text)
        assert out.getvalue() == "Traceback\n  error page ]0;pwned[2J ***\n"
    finally:
        SECRETS.discard("hunter2-web-secret")


def test_the_websocket_needs_the_session_cookie_and_origin(manifest: Path,
                                                           tmp_path: Path) -> None:
    async def handshake(cookie: str | None, origin: str | None) -> int:
        headers = {"Cookie": f"nbia_retriever_session_{port}={cookie}"} if cookie else {}
        async with aiohttp.ClientSession() as client:
            try:
                async with client.ws_connect(f"ws://127.0.0.1:{port}/ws", headers=headers,
                                             origin=origin):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    with web_process(manifest, tmp_path) as (process, port):
        token = process.address().split("token=", 1)[1]
        wait_until_listening(port)
        assert asyncio.run(handshake(None, f"http://127.0.0.1:{port}")) == 403
        assert asyncio.run(handshake("wrong", f"http://127.0.0.1:{port}")) == 403
        assert asyncio.run(handshake(token, "http://evil.example")) == 403
        assert not open_children(process.proc.pid)  # no child started for any of them
        assert process.stop() == 0


class Browser:
    """One browser session in a thread: the page, its websocket and the child's screen."""

    def __init__(self, address: str, port: int, keys: str = "") -> None:
        self.address, self.port, self.keys = address, port, keys
        self.screen = b""
        self.ended: aiohttp.WSMsgType | None = None
        self.error: BaseException | None = None
        self.leave = threading.Event()  # set: the browser closes the page
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            asyncio.run(self._session())
        except BaseException as exc:  # reported in the test's thread
            self.error = exc

    async def _session(self) -> None:
        jar = aiohttp.CookieJar(unsafe=True)  # browsers keep 127.0.0.1's cookies, aiohttp not
        async with aiohttp.ClientSession(cookie_jar=jar) as client:
            async with client.get(self.address) as page:
                assert page.status == 200
            async with client.ws_connect(f"ws://127.0.0.1:{self.port}/ws?width=120&height=36",
                                         origin=f"http://127.0.0.1:{self.port}") as ws:
                await ws.send_json(["resize", {"width": 120, "height": 36}])
                keys_sent = False
                while not self.leave.is_set():
                    try:
                        message = await ws.receive(timeout=0.1)
                    except TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.BINARY:
                        self.screen += message.data
                        if self.keys and not keys_sent and b"to download" in self.screen:
                            await ws.send_json(["stdin", self.keys])
                            keys_sent = True
                    elif message.type != aiohttp.WSMsgType.TEXT:
                        self.ended = message.type
                        return

    def wait_for(self, text: bytes, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            assert self.error is None, self.error
            assert self.ended is None, f"session ended ({self.ended}): {self.screen[-500:]!r}"
            assert time.monotonic() < deadline, f"no {text!r}: {self.screen[-2000:]!r}"
            time.sleep(0.05)


def wait_for_child(process: WebProcess, timeout: float = 60.0) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while not (children := open_children(process.proc.pid)):
        assert time.monotonic() < deadline, "no child started for the session"
        time.sleep(0.05)
    [child] = children  # exec: the view itself, no shell in between
    return child


def test_a_session_runs_the_view_and_ends_with_the_page(manifest: Path,
                                                        tmp_path: Path) -> None:
    env = environment(NBIA_PASSWORD="s3cret-web-password")
    with web_process(manifest, tmp_path, "--user", "alice", "--workers", "2",
                     env=env) as (process, port):
        address = process.address()
        wait_until_listening(port)
        browser = Browser(address, port)
        child = wait_for_child(process)
        browser.wait_for(b"manifest.tcia")
        assert TITLE.encode() in browser.screen  # the view drew its header
        argv = child.cmdline()
        assert argv[1:5] == ["-P", "-m", "nbia_retriever.cli", "open"]
        assert argv[argv.index("--user") + 1] == "alice"
        assert argv[argv.index("--workers") + 1] == "2"
        assert argv[argv.index("--dest") + 1] == str(tmp_path)
        assert argv[-2:] == ["--", str(manifest)]
        assert not any("s3cret" in word for word in argv)  # the name only, never a password
        # the page closes: its view quits, the server stays
        browser.leave.set()
        browser.thread.join(timeout=30)
        _gone, alive = psutil.wait_procs([child], timeout=30)
        assert not alive
        assert process.proc.poll() is None
        assert process.stop() == 0
        assert "s3cret" not in "".join(process.stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stopping_the_server_ends_running_sessions(archive_factory: Any, serve: Any,
                                                   tmp_path: Path, sig: int) -> None:
    from nbia_retriever.server import FaultPlan

    archive = archive_factory(collections=1, patients=1, studies=1, series=3, images=20,
                              awkward=False)
    slow = serve(archive.root, faults=FaultPlan(bandwidth=40_000))
    with web_process(archive.root / "manifest.tcia", tmp_path, "--api-url", slow.api_url,
                     "-d", str(tmp_path / "dl")) as (process, port):
        address = process.address()
        wait_until_listening(port)
        browser = Browser(address, port, keys="s")
        child = wait_for_child(process)
        browser.wait_for("Downloading…".encode())
        started = time.monotonic()
        assert process.stop(sig) == 0
        assert time.monotonic() - started < 10, "the view was stopped by signal, not by quit"
        _gone, alive = psutil.wait_procs([child], timeout=5)
        assert not alive, child.cmdline()
        browser.thread.join(timeout=30)
        assert browser.ended in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        stderr = "".join(process.stderr)
        assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_without_textual_serve_one_line_names_the_extra(manifest: Path, tmp_path: Path) -> None:
    fake = tmp_path / "fake"
    (fake / "textual_serve").mkdir(parents=True)
    (fake / "textual_serve" / "__init__.py").write_text(
        'raise ImportError("No module named textual_serve")\n')
    env = environment(PYTHONPATH=os.pathsep.join(
        [str(fake), *filter(None, [os.environ.get("PYTHONPATH")])]))
    done = subprocess.run([sys.executable, "-m", "nbia_retriever.cli", "open", "--web",
                           "--port", str(free_port()), str(manifest)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and EXTRA_HINT in lines[0], done.stderr
    assert done.stdout == ""


def test_a_busy_port_is_one_line(manifest: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "nbia_retriever.cli", "open", "--web",
                               "--port", str(port), str(manifest)], cwd=tmp_path,
                              env=environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["--port", "9000"], ["--host", "127.0.0.1"],
                                  ["--public-url", "https://example.org"]])
def test_web_options_need_web(manifest: Path, args: list[str]) -> None:
    from nbia_retriever.tui import open_command

    result = CliRunner().invoke(open_command, [*args, str(manifest)])
    assert result.exit_code == 2
    assert f"{args[0]}: only with --web" in result.output


def test_a_bad_public_url_is_refused(manifest: Path) -> None:
    from nbia_retriever.tui import open_command

    result = CliRunner().invoke(open_command, ["--web", "--public-url", "ftp://x",
                                               str(manifest)])
    assert result.exit_code == 2
    assert "--public-url" in result.output


def test_another_host_than_loopback_warns(manifest: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from nbia_retriever.tui import open_command, web

    served: list[web.WebServer] = []
    monkeypatch.setattr(web.WebServer, "serve", lambda self: served.append(self))
    result = CliRunner().invoke(open_command, ["--web", "--host", "0.0.0.0", "--port", "8123",
                                               str(manifest)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0]
    assert served and served[0].host == "0.0.0.0" and served[0].port == 8123
    assert served[0].public_url == f"http://{socket.gethostname()}:8123"
    quiet = CliRunner().invoke(open_command, ["--web", str(manifest)])
    assert "warning" not in quiet.output and served[-1].host == "127.0.0.1"


def test_loopback_and_the_child_command(manifest: Path, tmp_path: Path) -> None:
    from nbia_retriever.tui.web import child_argv, is_loopback, shell_command

    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org", ""):
        assert not is_loopback(host), host
    from nbia_retriever.engine import DownloadOptions

    argv = child_argv(str(manifest), dest="out dir", user="bob",
                      options=DownloadOptions(api="v2", api_url=None, workers=3,
                                              layout="classic"))
    assert argv[1:5] == ["-P", "-m", "nbia_retriever.cli", "open"]
    assert "--api-url" not in argv and "--web" not in argv
    assert argv[argv.index("--dest") + 1] == os.path.abspath("out dir")
    if sys.platform != "win32":  # what /bin/sh runs is exactly these words
        words = ["$(touch x); 'q'", "a b", "--", "*"]
        shown = subprocess.run(shell_command(["printf", "%s\\n", *words]), shell=True,
                               cwd=tmp_path, capture_output=True, text=True, check=True)
        assert shown.stdout.splitlines() == words
        assert not (tmp_path / "x").exists()
