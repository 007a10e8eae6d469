"""Fixtures for DRS and PathDB tests: an archive's Gen3 view, and our Gen3/PathDB servers.

Registered for every test module by ``tests/conftest.py`` (``pytest_plugins``), so the
session-scoped archive is made once; import the types for hints with::

    if TYPE_CHECKING:  # a runtime import before pytest's would skip assert rewriting
        from gen3_fixtures import Gen3Archive

* ``gen3_archive`` (session): :class:`Gen3Archive`: a small synthetic archive (2
  collections, the last restricted, 2 patients each, 1 series each of 4 images), its Gen3
  view in ``root``: 3 DICOM series zips (``<SeriesInstanceUID>.zip``, the exact bytes
  of the reference server's ``v4/getImage?IncludeMD5=yes`` with seed 0), 2 reports
  (``<patient>-report.pdf``) and 3 PathDB slides (``.svs``/``.tiff``, 192 KiB).
* ``gen3_server`` (per test): :class:`~nbia_retriever.server.gen3.Gen3Server` over that
  view on 127.0.0.1, faults off: ``url`` (the Gen3 API: ``--gen3-endpoint``),
  ``files_url`` (signed URLs), ``pathdb_url``, ``set_faults(Gen3Faults(...) or "spec")``,
  ``write_credentials(path)``, ``revoke_keys()``, ``requests``, ``token_requests``,
  ``url_requests``.
* ``gen3_serve`` (per test): ``gen3_serve(**options)`` starts another one (``faults=``,
  ``objects=``, ``slides=``, ``root=``; the archive's view by default), stopped at the
  test's end.
* ``gen3_creds`` (per test): the Path of a valid credentials file (mode 0600) for
  ``gen3_server``, in the test's tmp_path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbia_retriever.server.gen3 import Gen3Object, Gen3Server, PathdbSlide, gen3_view
from nbia_retriever.server.synth import ArchiveSummary, generate_archive

#: ``generate_archive`` parameters of the Gen3 archive.
GEN3_ARCHIVE_PARAMS: dict[str, Any] = {"seed": 24, "collections": 2, "patients": 2,
                                       "series": 1, "images": 4}
#: ``gen3_view`` counts of it.
GEN3_VIEW_PARAMS: dict[str, Any] = {"zips": 3, "files": 2, "slides": 3,
                                    "slide_size": 192 * 1024}


@dataclass(frozen=True)
class Gen3Archive:
    """An archive and the DRS objects and PathDB slides made from it under ``root``."""

    summary: ArchiveSummary
    root: Path
    objects: tuple[Gen3Object, ...]
    slides: tuple[PathdbSlide, ...]

    @property
    def zips(self) -> list[Gen3Object]:
        return [o for o in self.objects if o.kind == "zip"]

    @property
    def files(self) -> list[Gen3Object]:
        return [o for o in self.objects if o.kind == "file"]


def make_gen3_archive(folder: Path, **view_options: Any) -> Gen3Archive:
    """Generate the archive under ``folder`` and its Gen3 view in ``folder/gen3``."""
    summary = generate_archive(folder / "archive", **GEN3_ARCHIVE_PARAMS)
    objects, slides = gen3_view(summary.root, folder / "gen3",
                                **{**GEN3_VIEW_PARAMS, **view_options})
    return Gen3Archive(summary, folder / "gen3", objects, slides)


@pytest.fixture(scope="session")
def gen3_archive(tmp_path_factory: pytest.TempPathFactory) -> Gen3Archive:
    """The session's Gen3 archive (read-only)."""
    return make_gen3_archive(tmp_path_factory.mktemp("gen3"))


@pytest.fixture
def gen3_server(gen3_archive: Gen3Archive) -> Iterator[Gen3Server]:
    """Our Gen3 + PathDB servers over :func:`gen3_archive`, faults off, for one test."""
    with Gen3Server(gen3_archive.root, gen3_archive.objects, gen3_archive.slides) as server:
        yield server


@pytest.fixture
def gen3_serve(gen3_archive: Gen3Archive) -> Iterator[Callable[..., Gen3Server]]:
    """``gen3_serve(**options)``: another Gen3 server for this test (``faults``,
    ``objects``, ``slides``, ``root``, ``host``, ``port``), stopped at its end."""
    started: list[Gen3Server] = []

    def start(**options: Any) -> Gen3Server:
        root = options.pop("root", gen3_archive.root)
        objects = options.pop("objects", gen3_archive.objects)
        slides = options.pop("slides", gen3_archive.slides)
        server = Gen3Server(root, objects, slides, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def gen3_creds(gen3_server: Gen3Server, tmp_path: Path) -> Path:
    """A valid Gen3 credentials file for :func:`gen3_server` (mode 0600)."""
    return gen3_server.write_credentials(tmp_path / "credentials.json")
