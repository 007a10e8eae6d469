"""Shared fixtures: a small synthetic archive and a reference server over it.

The archive is generated once per session (``generate_archive`` defaults: 2 collections,
the last one restricted, users alice and bob, every awkward naming case); each test gets
its own server on a free 127.0.0.1 port with faults off, so fault plans, the request
log and the clock never leak between tests. Startup is cheap: the index is cached in
the archive's ``.nbia-server-cache`` after the first server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hostile_server import Crafted, HostileServer, files_of, record, series_zip
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary, generate_archive

# IDC's fixtures (s3_archive, s3_server, s3_serve, moto_s3): registered once, so the
# session-scoped ones (moto above all) start once for the whole run; Gen3's and PathDB's
# (gen3_archive, gen3_server, gen3_serve, gen3_creds) likewise.
pytest_plugins = ["s3_fixtures", "gen3_fixtures"]


@pytest.fixture(scope="session", autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The key that signs journal rows (``engine.rows``) lives in a folder of the test
    session's, never in the real user's data folder; subprocesses inherit it."""
    from nbia_retriever.engine.rows import ENV_DATA
    from nbia_retriever.idc.uidfilter import ENV_CACHE

    saved = {name: os.environ.get(name) for name in (ENV_DATA, ENV_CACHE)}
    os.environ[ENV_DATA] = str(tmp_path_factory.mktemp("user-data"))
    # (and IDC's UID filters, idc.uidfilter, in a cache folder of the session's)
    os.environ[ENV_CACHE] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def write_empty_idc_index(folder: os.PathLike[str] | str) -> None:
    """IDC's three index files with idc-index-data's columns and no row."""
    import json
    from pathlib import Path

    import duckdb
    import idc_index_data

    types = {"STRING": "VARCHAR", "INTEGER": "BIGINT", "FLOAT": "DOUBLE",
             "BOOLEAN": "BOOLEAN", "RECORD": "VARCHAR", "DATE": "DATE",
             "TIMESTAMP": "TIMESTAMP", "NUMERIC": "DOUBLE"}
    package = Path(idc_index_data.__file__).parent
    for name in ("idc_index", "collections_index", "prior_versions_index"):
        schema = json.loads((package / f"{name}_schema.json").read_text())
        columns = ", ".join(f'NULL::{types.get(c["type"], "VARCHAR")} AS "{c["name"]}"'
                            for c in schema["columns"])
        target = Path(folder) / f"{name}.parquet"
        duckdb.connect().execute(f"COPY (SELECT {columns} WHERE false) TO '{target}' "
                                 "(FORMAT parquet)")


@pytest.fixture(scope="session", autouse=True)
def _empty_idc_index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``--source auto`` (the default) looks every series up in IDC's index: the suite's
    synthetic series are in none, and the real idc-index-data (74 MB) would cost every
    run a lookup. An empty index of the real columns keeps the default path exercised
    at no cost; the IDC tests name their own (``--idc-index``)."""
    saved = os.environ.get("NBIA_IDC_INDEX")
    folder = tmp_path_factory.mktemp("idc-index-empty")
    write_empty_idc_index(folder)
    os.environ["NBIA_IDC_INDEX"] = str(folder)
    yield
    if saved is None:
        os.environ.pop("NBIA_IDC_INDEX", None)
    else:
        os.environ["NBIA_IDC_INDEX"] = saved


@pytest.fixture(scope="session")
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory) -> ArchiveSummary:
    """The session's small archive (read-only: copy it before changing anything)."""
    return generate_archive(tmp_path_factory.mktemp("synthetic") / "archive")


@pytest.fixture
def server(synthetic_archive: ArchiveSummary) -> Iterator[ReferenceServer]:
    """A fresh reference server over :func:`synthetic_archive`, faults off."""
    with ReferenceServer(synthetic_archive.root) as srv:
        yield srv


@pytest.fixture(scope="session")
def archive_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., ArchiveSummary]:
    """``archive_factory(**generate_archive_params)``: one archive per parameter set for
    the whole session (read-only: copy it before changing anything)."""
    cache: dict[tuple[tuple[str, Any], ...], ArchiveSummary] = {}

    def make(**params: Any) -> ArchiveSummary:
        key = tuple(sorted(params.items()))
        if key not in cache:
            cache[key] = generate_archive(tmp_path_factory.mktemp("archive") / "a", **params)
        return cache[key]

    return make


class _Servers:
    """``servers(archive_root, **ReferenceServer_options)`` starts a reference server;
    :meth:`stop_all` stops every one it started."""

    def __init__(self) -> None:
        self.started: list[ReferenceServer] = []

    def __call__(self, root: Any, **options: Any) -> ReferenceServer:
        srv = ReferenceServer(root, **options)
        srv.start()
        self.started.append(srv)
        return srv

    def stop_all(self) -> None:
        for srv in self.started:
            srv.stop()


@pytest.fixture
def serve() -> Iterator[Callable[..., ReferenceServer]]:
    """``serve(archive_root, **ReferenceServer_options)``: a reference server for this test,
    stopped at its end (several may run at once)."""
    servers = _Servers()
    yield servers
    servers.stop_all()


@pytest.fixture(scope="module")
def module_serve() -> Iterator[Callable[..., ReferenceServer]]:
    """:func:`serve` for module-scoped fixtures: the servers it starts are shared by the
    module's tests and stopped at its end (their fault plans and request logs are too)."""
    servers = _Servers()
    yield servers
    servers.stop_all()


@pytest.fixture()
def hostile(archive: ArchiveSummary) -> Iterator[HostileServer]:
    """A hostile server (``hostile_server.py``) serving every series of the module's own
    ``archive`` fixture honestly, for a test to make lie; stopped at the test's end."""
    with HostileServer() as srv:
        for series in archive.series:
            srv.series[series.series_uid] = Crafted(record(series), series_zip(files_of(series)))
        yield srv
