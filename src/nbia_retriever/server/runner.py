"""Running the reference server: in a background thread (tests, demo) or in the foreground.

The background thread owns its own event loop, so synchronous test code and clients can
talk to the server over real HTTP on 127.0.0.1 while the test thread blocks on I/O.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from .app import API_PREFIX, DOWNLOAD_PATH, MANIFEST_PATH, NbiaService, RequestRecord
from .appthread import AppThread as AppThread  # re-exported: tests import it from here
from .appthread import ServedApp
from .auth import ServerClock
from .config import ServerConfig, load_config
from .faults import FaultPlan
from .index import ArchiveIndex

if TYPE_CHECKING:
    from aiohttp import web

    from .gen3 import Gen3Server
    from .s3 import S3Server


class ReferenceServer(ServedApp):
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
        #: The Gen3 and PathDB servers beside it, when :func:`run_server` was asked for
        #: them, and the folder it wrote their credentials and manifests to.
        self.gen3: Gen3Server | None = None
        self.gen3_out: Path | None = None

    def __repr__(self) -> str:
        where = self.url if self.port else "not started"
        return f"ReferenceServer({str(self.archive)!r}, {where})"

    # -- addresses --------------------------------------------------------------------
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
    _thread_name = "nbia-reference-server"

    def _make_app(self) -> web.Application:
        return self.service.app()

    def _started(self) -> None:
        self.service.base_url = self.url


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
    gen3_port: int | None = None,
    gen3_faults_spec: str | None = None,
    gen3_out: str | Path | None = None,
    on_ready: Callable[[ReferenceServer], None] | None = None,
) -> None:
    """Serve until Ctrl+C or SIGTERM (blocking). ``on_ready`` runs once it listens.

    ``s3_port`` (0: a free one) also serves the archive's IDC view (:mod:`.idcdata`) as
    anonymous path-style S3 (:mod:`.s3`, faults ``s3_faults_spec``) at the root of that
    port, as ``server.s3``; ``idc_index_out`` writes the parquet files describing the
    same view (``idc_version``, ``idc_revised`` series with an older version,
    ``idc_exclude`` series IDC does not hold) there, as ``server.idc_index``.

    ``gen3_port`` (0: a free one) also serves the archive as CRDC and PathDB do
    (:mod:`.gen3`: a Gen3 API there, its signed-URL host and a PathDB on two more free
    ports, faults ``gen3_faults_spec``) as ``server.gen3``; its objects are made once in
    the archive's cache folder. ``gen3_out`` gets ``credentials.json``,
    ``drs-manifest.csv`` and ``pathdb-manifest.csv`` for it once it listens.
    """
    plan = FaultPlan.parse(faults_spec, seed=seed) if faults_spec else FaultPlan(seed=seed)
    server = ReferenceServer(archive, faults=plan, host=host, port=port,
                             token_lifetime=token_lifetime, seed=seed, build=build,
                             stored=stored)
    if s3_port is not None or idc_index_out is not None:
        from .idcdata import IdcView  # the S3 mode (and duckdb) only when asked for
        from .s3 import S3Faults, S3Server

        view = IdcView.build(server.index, version=idc_version, prior=idc_revised,
                             exclude=idc_exclude)
        if idc_index_out is not None:
            server.idc_index = view.write_index(idc_index_out)
        if s3_port is not None:
            server.s3 = S3Server(view, faults=S3Faults.parse(s3_faults_spec), host=host,
                                 port=s3_port)
    if gen3_port is not None:
        from .gen3 import Gen3Faults, Gen3Server, gen3_view  # only with --gen3-port

        gen3_plan = Gen3Faults.parse(gen3_faults_spec)  # a bad spec before any work
        folder = server.index.cache_dir / "gen3"
        objects, slides = gen3_view(server.index, folder, zips=min(3, len(server.index.series)),
                                    seed=seed)
        server.gen3 = Gen3Server(folder, objects, slides, gen3_plan, host=host,
                                 port=gen3_port)
    stopped = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    server.start()
    try:
        if server.s3 is not None:
            server.s3.start()
        if server.gen3 is not None:
            server.gen3.start()
            if gen3_out is not None:
                server.gen3_out = write_gen3_files(server.gen3, gen3_out)
        if on_ready is not None:
            on_ready(server)
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        if server.gen3 is not None:
            server.gen3.stop()
        if server.s3 is not None:
            server.s3.stop()
        server.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def write_gen3_files(gen3: Gen3Server, folder: str | Path) -> Path:
    """``credentials.json`` (mode 0600), ``drs-manifest.csv`` (TCIA's columns, every
    object) and ``pathdb-manifest.csv`` (every slide) for a running Gen3 server, in
    ``folder``: what a demo points the client at."""
    from .gen3 import write_drs_manifest, write_pathdb_manifest  # only with --gen3-out

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    gen3.write_credentials(out / "credentials.json")
    write_drs_manifest(out / "drs-manifest.csv", gen3.objects, base_url=gen3.url)
    write_pathdb_manifest(out / "pathdb-manifest.csv", gen3.slides, base_url=gen3.pathdb_url)
    return out
