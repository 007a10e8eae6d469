"""One aiohttp app served from a background thread: the plumbing every server here
shares (the reference server, its S3 mode, the tests' hostile servers). A module of its
own so that :mod:`.runner` and :mod:`.s3` both build on it without importing each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from types import TracebackType
from typing import Self

from aiohttp import web


class AppThread:
    """Serve an aiohttp app from a background thread that owns its event loop.

    The one piece of plumbing behind :class:`ReferenceServer` and the tests' hostile
    servers: start() returns once the socket listens (or re-raises what stopped it),
    stop() drains connections for ``shutdown_timeout`` seconds and joins the thread.
    """

    def __init__(self, app: web.Application, *, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None, shutdown_timeout: float = 0.5,
                 name: str = "nbia-server") -> None:
        self.app = app
        self.host = host
        self.ssl_context = ssl_context
        self.port: int | None = None
        self._requested_port = port
        self._shutdown_timeout = shutdown_timeout
        self._name = name
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the server is not running; call start() or use `with`")
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{host}:{self.port}"

    def start(self) -> AppThread:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            error, self._error = self._error, None
            self._thread.join()
            self._thread = None
            raise error
        return self

    def stop(self) -> None:
        """Stop serving; in-flight streams are cut after the grace period."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None
        self.port = None

    def __enter__(self) -> AppThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # reported to start()'s caller
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _startup(self) -> None:
        runner = web.AppRunner(self.app, access_log=None,
                               shutdown_timeout=self._shutdown_timeout, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, reuse_address=True,
                           ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class ServedApp:
    """start(), stop(), ``with`` and ``port`` for a server that serves the app
    :meth:`_make_app` builds from an :class:`AppThread` (the reference server, its S3
    mode)."""

    host: str
    _requested_port: int
    _serving: AppThread | None
    #: the serving thread's name
    _thread_name = "nbia-server"

    def _make_app(self) -> web.Application:
        raise NotImplementedError

    def _started(self) -> None:
        """Called once the socket listens."""

    @property
    def port(self) -> int | None:
        return self._serving.port if self._serving is not None else None

    def start(self) -> Self:
        if self._serving is None:
            self._serving = AppThread(self._make_app(), host=self.host,
                                      port=self._requested_port,
                                      name=self._thread_name).start()
            self._started()
        return self

    def stop(self) -> None:
        """Stop serving; in-flight streams are cut after a short grace period."""
        if self._serving is not None:
            self._serving.stop()
            self._serving = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
