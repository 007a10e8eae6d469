"""``nbia-retriever open --web MANIFEST``: the same view in a browser, through textual-serve.

textual-serve (the ``web`` extra) runs a small aiohttp server; every browser session that
opens its websocket starts one child process, the plain ``open`` command on the same
manifest, destination and options, and relays its screen. What this module adds to it:

* the child's command line carries no secret: with ``--user`` the child looks the
  password up itself (NBIA_PASSWORD, which it inherits, or the keyring) or asks in the
  view, exactly as ``open`` in a terminal does;
* a session token: the view can start downloads, change the destination and holds a
  login, so only the address printed at start-up (``/?token=…``) opens it. The page then
  keeps the token in an HttpOnly, SameSite=Strict cookie, which the websocket must show
  (with a matching Origin): another user of the machine (loopback is shared) or a web
  page open in the same browser cannot drive the view. The printed address works even
  when the browser still holds an earlier run's cookie for the port;
* children run nothing from the working directory (``python -P``, the server's own
  ``sys.path``): it may be a folder someone else filled;
* quiet, plain output: one line naming the address, no Rich markup made of paths, errors
  without the local variables (the children's environment holds NBIA_PASSWORD), and what
  a child prints on stderr (relayed by textual-serve) made inert;
* children never outlive their page or the server: closing the page, or Ctrl+C / SIGTERM
  on the server, tells the view to quit (its downloads stop as after ``q``: published
  series are complete, the rest resume on the next run), and one that does not is
  stopped by signal. Left alone, textual-serve may exit before its children, and a
  Textual web view whose server is gone keeps running, ignoring SIGTERM.

Several pages on one server are several views on the same destination: that is safe
(concurrent runs of one root share the journal, as shards do).

Imported only by ``open --web``: without textual-serve the import fails and the command
names the extra to install.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
import logging
import os
import secrets
import shlex
import socket
import subprocess
import sys
from asyncio.subprocess import Process
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
from aiohttp import WSMsgType, web
from textual_serve.app_service import AppService
from textual_serve.server import Server, to_int

from ..cli.common import inert
from ..cli.options import to_argv
from ..engine.options import DownloadOptions
from ..untrusted import SECRETS

log = logging.getLogger("nbia_retriever.web")

#: Seconds a child has to quit when its session ends (a running download stops and
#: journals what it had) before it is stopped by signal.
QUIT_SECONDS = 10.0


def child_argv(manifest: str, *, dest: str, options: DownloadOptions,
               user: str | None) -> list[str]:
    """The plain ``open`` command each browser session runs: the server's options written
    back as ``open``'s flags (:func:`~nbia_retriever.cli.options.to_argv`, which parse to
    the same options), absolute paths (the child may start anywhere).

    ``-P``: the child runs in the server's working directory, which may be a folder
    someone else filled (a shared project folder, a download); ``python -m`` would put
    it first on ``sys.path`` and run a planted ``nbia_retriever.py`` or ``textual.py``.
    The package is found through the server's own ``sys.path`` instead
    (:func:`child_environment`), as the download workers do.
    """
    argv = [sys.executable, "-P", "-m", "nbia_retriever.cli", "open",
            "--dest", os.path.abspath(dest), *to_argv(options, "open")]
    if user:
        argv += ["--user", user]  # the name only: the child finds or asks the password
    return [*argv, "--", os.path.abspath(manifest)]


def child_environment(base: dict[str, str]) -> dict[str, str]:
    """``base`` with ``PYTHONPATH`` set to this process's ``sys.path`` made absolute: the
    child imports exactly what the server did, whatever its working directory holds."""
    path = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
    return {**base, "PYTHONPATH": path}


class ChildService(AppService):
    """textual-serve's child launcher, with :func:`child_environment`."""

    def _build_environment(self, width: int = 80, height: int = 24) -> dict[str, str]:
        return child_environment(super()._build_environment(width=width, height=height))


def shell_command(argv: Sequence[str]) -> str:
    """textual-serve starts the child through the shell: every word quoted, and ``exec``
    so that the process it holds (and stops) is the view itself, not a shell."""
    if sys.platform == "win32":
        return subprocess.list2cmdline(list(argv))
    return "exec " + shlex.join(argv)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); names are not resolved."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _origin(host: str, port: int) -> str:
    """``http://host:port`` for the printed address (a wildcard bind names this machine)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def stop(process: Process, wait: float = QUIT_SECONDS, grace: float = 5.0) -> None:
    """Give the child ``wait`` seconds to exit, then SIGTERM, then SIGKILL (a view whose
    server went away may no longer act on SIGTERM)."""
    for signal_it, seconds in ((None, wait), (process.terminate, grace),
                               (process.kill, grace)):
        if process.returncode is not None:
            return
        if signal_it is not None:
            with contextlib.suppress(ProcessLookupError):
                signal_it()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), max(seconds, 0.01))


class InertStream(io.TextIOBase):
    """The server's stdout: textual-serve copies a child's stderr there (a crash report
    may quote a server), which reaches the terminal without control characters (no
    terminal escapes) and without known secrets."""

    def __init__(self, stream: io.TextIOBase | Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(inert(text))
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class WebServer(Server):
    """textual-serve's server with a session token, plain output and a clean stop."""

    def __init__(self, command: str, *, host: str, port: int, title: str,
                 public_url: str | None = None, token: str | None = None) -> None:
        super().__init__(command, host=host, port=port, title=title,
                         public_url=(public_url or _origin(host, port)).rstrip("/"))
        #: URLs in the page follow the address the browser used, unless --public-url.
        self.fixed_public_url = public_url is not None
        self.token = token or secrets.token_urlsafe(24)
        self.cookie = f"nbia_retriever_session_{port}"
        self.sessions: set[web.WebSocketResponse] = set()
        #: Every running child, stopped before the server exits (whatever the browser did).
        self.children: set[Process] = set()
        self._ending: set[asyncio.Future[None]] = set()

    def serve(self, debug: bool = False) -> None:
        """Serve until Ctrl+C or SIGTERM (blocking); every child has ended on return."""
        SECRETS.add_password(os.environ.get("NBIA_PASSWORD"))  # the children inherit it
        original = sys.stdout
        sys.stdout = InertStream(original)
        try:
            super().serve(debug=debug)
        finally:
            sys.stdout = original

    @property
    def address(self) -> str:
        """The address to open: the only way in (it carries the token)."""
        return f"{self.public_url}/?token={self.token}"

    def initialize_logging(self) -> None:
        # Not textual-serve's RichHandler: it prints tracebacks with their local variables
        # (the children's environment, NBIA_PASSWORD included) and access logs.
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    async def on_startup(self, app: web.Application) -> None:
        # Plain text: paths in the command are not Rich markup.
        sys.stdout.write(f"Serving the NBIA Data Retriever view on {self.address}\n"
                         "Open that address in a browser; Ctrl+C stops.\n")
        sys.stdout.flush()

    async def on_shutdown(self, app: web.Application) -> None:
        """Close open sessions (each tells its child to quit) and wait for every child: the
        server never leaves one running without its screen."""
        for websocket in list(self.sessions):
            await websocket.close(code=1001, message=b"server stopping")
        await asyncio.gather(*list(self._ending), *(stop(child) for child in self.children),
                             return_exceptions=True)

    def _authorized(self, request: web.Request, *, allow_query: bool) -> bool:
        """The cookie or (the page only) ``?token=`` matches. Either suffices: a browser
        still holding the cookie of an earlier run on this port must not be refused the
        address this run printed (the page then replaces the stale cookie)."""
        offered = [request.cookies.get(self.cookie, "")]
        if allow_query:
            offered.append(request.query.get("token", ""))
        expected = self.token.encode()
        return any(hmac.compare_digest(o.encode(), expected) for o in offered if o)

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:  # not a browser; the cookie was checked
            return True
        allowed = {request.host.lower(), urlsplit(self.public_url).netloc.lower()}
        return urlsplit(origin).netloc.lower() in allowed

    def _base_url(self, request: web.Request) -> str:
        if self.fixed_public_url:
            return self.public_url
        return f"{request.scheme}://{request.host}"

    async def handle_index(self, request: web.Request) -> web.Response:
        if not self._authorized(request, allow_query=True):
            raise web.HTTPForbidden(text="Open the address nbia-retriever printed: it "
                                         "carries this session's token.\n")
        base = self._base_url(request)
        ws_base = ("wss:" if base.startswith("https:") else "ws:") + base.split(":", 1)[1]
        context = {
            "font_size": to_int(request.query.get("fontsize", "16"), 16),
            "app_websocket_url": f"{ws_base}{request.app.router['websocket'].url_for()}",
            "config": {"static": {"url": f"{base}/static/"}},
            "application": {"name": self.title},  # the template escapes it
        }
        response = aiohttp_jinja2.render_template("app_index.html", request, context)
        response.set_cookie(self.cookie, self.token, httponly=True, samesite="Strict",
                            path="/", secure=base.startswith("https:"))
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"  # the URL holds the token
        return response

    async def handle_download(self, request: web.Request) -> web.StreamResponse:
        """A file the view delivers to the browser: for the session's page only."""
        if not self._authorized(request, allow_query=False):
            raise web.HTTPForbidden(text="No session.\n")
        return await super().handle_download(request)

    async def handle_websocket(self, request: web.Request) -> web.WebSocketResponse:
        if not (self._authorized(request, allow_query=False) and self._same_origin(request)):
            raise web.HTTPForbidden(text="No session: open the address nbia-retriever "
                                         "printed.\n")
        websocket = web.WebSocketResponse(heartbeat=15)
        width = to_int(request.query.get("width", "80"), 80)
        height = to_int(request.query.get("height", "24"), 24)
        await websocket.prepare(request)
        self.sessions.add(websocket)

        async def close() -> None:  # the child said exit: the page shows "Session ended"
            await websocket.close()

        service = ChildService(self.command, write_bytes=websocket.send_bytes,
                             write_str=websocket.send_str, close=close,
                             download_manager=self.download_manager)
        process: Process | None = None
        try:
            await service.start(width, height)
            process = getattr(service, "_process", None)  # textual-serve keeps it private
            if isinstance(process, Process):
                self.children.add(process)
            await self._relay(websocket, service)
        except asyncio.CancelledError:
            await websocket.close()
        except Exception as error:  # one session's failure must not stop the server
            log.error("session ended: %s", error)
        finally:
            self.sessions.discard(websocket)
            # Not cancelled with the request (the server stopping): the child must end.
            ending = asyncio.ensure_future(self._end_session(service, process))
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)
            await asyncio.shield(ending)
        return websocket

    async def _end_session(self, service: AppService, process: Process | None) -> None:
        """Tell the child to quit (its downloads stop as after ``q``) and wait; stop it
        if it does not."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(service.stop(), QUIT_SECONDS)
        if process is not None:
            await stop(process, wait=1.0)
            self.children.discard(process)

    @staticmethod
    async def _relay(websocket: web.WebSocketResponse, service: AppService) -> None:
        """Browser to child: keys and mouse (stdin), size, focus; pings answered."""
        async for message in websocket:
            if message.type != WSMsgType.TEXT:
                continue
            envelope: Any = message.json()
            if not isinstance(envelope, list) or not envelope:
                continue
            kind, data = envelope[0], (envelope[1] if len(envelope) > 1 else None)
            if kind == "stdin" and isinstance(data, str):
                await service.send_bytes(data.encode("utf-8"))
            elif kind == "resize" and isinstance(data, dict):
                await service.set_terminal_size(to_int(str(data.get("width")), 80),
                                                to_int(str(data.get("height")), 24))
            elif kind == "ping":
                await websocket.send_json(["pong", data])
            elif kind == "blur":
                await service.blur()
            elif kind == "focus":
                await service.focus()
