"""Running the reference server: in a background thread (tests, demo) or in the foreground.

The background thread owns its own event loop, so synchronous test code and clients can
talk to the server over real HTTP on 127.0.0.1 while the test thread blocks on I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from aiohttp import web

from .app import API_PREFIX, DOWNLOAD_PATH, MANIFEST_PATH, NbiaService, RequestRecord
from .auth import ServerClock
from .config import ServerConfig, load_config
from .faults import FaultPlan
from .index import ArchiveIndex

if TYPE_CHECKING:  # s3 builds on this module's AppThread
    from .s3 import S3Server


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


class ReferenceServer:
    """An NBIA server over ``archive`` on ``host:port`` (port 0: any free port).

    Use as a context manager, or call :meth:`start` and :meth:`stop`::

        with ReferenceServer(archive, faults=FaultPlan(reset=0.2, seed=1)) as server:
            httpx.get(server.api_url + "/v1/getCollectionValues")

    The index is built (or loaded from its cache) in the constructor; ``config`` defaults
    to ``archive/nbia-archive.toml``; ``token_lifetime`` (seconds) overrides the config;
    ``seed`` fixes the arbitrary image order inside the zips.
    """

    def __init__(
        self,
        archive: str | Path,
        *,
        config: ServerConfig | None = None,
        faults: FaultPlan | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token_lifetime: float | None = None,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        build: str = "current",
        stored: bool = False,
    ) -> None:
        self.archive = Path(archive)
        self.index = ArchiveIndex.load(self.archive, cache_dir=cache_dir)
        config = config if config is not None else load_config(self.archive)
        if token_lifetime is not None:
            if token_lifetime <= 0:
                raise ValueError("token_lifetime must be positive")
            config = replace(config, token_lifetime=float(token_lifetime))
        self.config = config
        self.host = host
        self._requested_port = port
        self.service = NbiaService(self.index, config, faults=faults, seed=seed,
                                   clock=ServerClock(), build=build, stored=stored)
        self._serving: AppThread | None = None
        #: The S3 mode beside it, when :func:`run_server` was asked for one.
        self.s3: S3Server | None = None
        #: Where :func:`run_server` wrote the IDC index files, if it did.
        self.idc_index: Path | None = None

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"ReferenceServer({str(self.archive)!r}, {where})"

    # -- addresses --------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self._serving.port if self._serving is not None else None

    @property
    def url(self) -> str:
        if self._serving is None:
            raise RuntimeError("the server is not running; call start() or use `with`")
        return self._serving.url

    @property
    def api_url(self) -> str:
        return self.url + API_PREFIX

    @property
    def download_url(self) -> str:
        """What a manifest's ``downloadServerUrl`` carries for this server."""
        return self.url + DOWNLOAD_PATH

    @property
    def manifest_url(self) -> str:
        return self.url + MANIFEST_PATH

    # -- knobs ------------------------------------------------------------------------
    def set_faults(self, plan: FaultPlan | None) -> None:
        """Replace the fault plan (``None``: no faults); attempt counters start afresh."""
        self.service.set_faults(plan)

    @property
    def faults(self) -> FaultPlan:
        return self.service.injector.plan

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of the request log (thread-safe; the newest last)."""
        return self.service.requests

    def clear_requests(self) -> None:
        self.service.clear_requests()

    def in_flight(self) -> list[str]:
        """Paths of the requests being answered right now (e.g. held by a fault)."""
        return self.service.in_flight

    def advance_clock(self, seconds: float) -> None:
        """Move the server's clock forward: expires tokens without sleeping."""
        self.service.clock.advance(seconds)

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> ReferenceServer:
        if self._serving is None:
            self._serving = AppThread(self.service.app(), host=self.host,
                                      port=self._requested_port,
                                      name="nbia-reference-server").start()
            self.service.base_url = self.url
        return self

    def stop(self) -> None:
        """Stop serving; in-flight streams are cut after a short grace period."""
        if self._serving is not None:
            self._serving.stop()
            self._serving = None

    def __enter__(self) -> ReferenceServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def run_server(
    archive: str | Path,
    host: str = "127.0.0.1",
    port: int = 8080,
    faults_spec: str | None = None,
    seed: int = 0,
    *,
    token_lifetime: float | None = None,
    build: str = "current",
    stored: bool = False,
    s3_port: int | None = None,
    s3_faults_spec: str | None = None,
    idc_index_out: str | Path | None = None,
    idc_version: int = 22,
    idc_revised: Iterable[str] = (),
    idc_exclude: Iterable[str] = (),
    on_ready: Callable[[ReferenceServer], None] | None = None,
) -> None:
    """Serve until Ctrl+C or SIGTERM (blocking). ``on_ready`` runs once it listens.

    ``s3_port`` (0: a free one) also serves the archive's IDC view (:mod:`.idcdata`) as
    anonymous path-style S3 (:mod:`.s3`, faults ``s3_faults_spec``) at the root of that
    port, as ``server.s3``; ``idc_index_out`` writes the parquet files describing the
    same view (``idc_version``, ``idc_revised`` series with an older version,
    ``idc_exclude`` series IDC does not hold) there, as ``server.idc_index``.
    """
    plan = FaultPlan.parse(faults_spec, seed=seed) if faults_spec else FaultPlan(seed=seed)
    server = ReferenceServer(archive, faults=plan, host=host, port=port,
                             token_lifetime=token_lifetime, seed=seed, build=build,
                             stored=stored)
    if s3_port is not None or idc_index_out is not None:
        from .idcdata import IdcView
        from .s3 import S3Faults, S3Server

        view = IdcView.build(server.index, version=idc_version, prior=idc_revised,
                             exclude=idc_exclude)
        if idc_index_out is not None:
            server.idc_index = view.write_index(idc_index_out)
        if s3_port is not None:
            server.s3 = S3Server(view, faults=S3Faults.parse(s3_faults_spec), host=host,
                                 port=s3_port)
    stopped = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    try:
        if server.s3 is not None:
            server.s3.start()
        if on_ready is not None:
            on_ready(server)
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if server.s3 is not None:
            server.s3.stop()
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
