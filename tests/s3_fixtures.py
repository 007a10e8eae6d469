"""Fixtures for IDC tests: an archive's IDC view, our S3 mode over it, and moto's real S3.

Use them from a test module with::

    pytest_plugins = ["s3_fixtures"]
    if TYPE_CHECKING:  # a runtime import before pytest's would skip assert rewriting
        from s3_fixtures import S3Archive

(the plugin is registered once, so the session-scoped fixtures, moto above all, are
shared by every module that names it; ``from s3_fixtures import s3_archive, ...`` would
work too but start them once per importing module).

* ``s3_archive`` (session): :class:`S3Archive`: a small synthetic archive (4 public
  series of 6 images, a restricted collection IDC leaves out), its
  :class:`~nbia_retriever.server.idcdata.IdcView` with one *revised* series (an older
  version in prior_versions_index, served too) and one public series IDC does not hold
  (``nbia_only``), and idc-index-data's three parquet files for it in ``index_dir``.
* ``s3_server`` (per test): :class:`~nbia_retriever.server.s3.S3Server` over that view on
  127.0.0.1, faults off; ``s3_server.set_faults(S3Faults(...) or "spec")``,
  ``s3_server.url`` (the endpoint), ``s3_server.requests`` (the log).
* ``s3_serve`` (per test): ``s3_serve(source, **S3Server options)`` starts another one
  (another view: ``buckets=``, ``prior=``...), stopped at the test's end.
* ``moto_s3`` (session): the endpoint URL (``http://127.0.0.1:PORT``) of moto's S3
  server, with IDC's buckets holding every object of the view (public-read, so anonymous
  path-style GETs work as on IDC). Its ETags are plain MD5s (single-part uploads). Read
  only: a test that writes to it must use its own bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbia_retriever.server.idcdata import IDC_BUCKETS, IdcView
from nbia_retriever.server.s3 import S3Server
from nbia_retriever.server.synth import ArchiveSummary, generate_archive

#: ``generate_archive`` parameters of the IDC archive (also a key for archive_factory).
S3_ARCHIVE_PARAMS: dict[str, Any] = {"seed": 23, "collections": 2, "patients": 2,
                                     "series": 2, "images": 6}
IDC_VERSION = 22


@dataclass(frozen=True)
class S3Archive:
    """An archive, the IDC view tests serve and the parquet files that describe it."""

    summary: ArchiveSummary
    view: IdcView
    index_dir: Path
    revised: str  # a SeriesInstanceUID with a prior version too
    nbia_only: str  # a public SeriesInstanceUID IDC does not hold

    @property
    def root(self) -> Path:
        return self.summary.root

    @property
    def idc_uids(self) -> list[str]:
        """Public series IDC holds (current versions), sorted."""
        return sorted(self.view.current)


def make_s3_archive(folder: Path, **view_options: Any) -> S3Archive:
    """Generate the archive under ``folder`` and describe it as IDC (defaults: the first
    public series revised, the last public one left to NBIA)."""
    summary = generate_archive(folder / "archive", **S3_ARCHIVE_PARAMS)
    public = [s.series_uid for s in summary.series if not s.restricted]
    revised = view_options.pop("revised", public[0])
    nbia_only = view_options.pop("nbia_only", public[-1])
    view = IdcView.build(summary, version=IDC_VERSION, prior=[revised], exclude=[nbia_only],
                         **view_options)
    index_dir = view.write_index(folder / "idc-index")
    return S3Archive(summary, view, index_dir, revised, nbia_only)


@pytest.fixture(scope="session")
def s3_archive(tmp_path_factory: pytest.TempPathFactory) -> S3Archive:
    """The session's IDC archive (read-only)."""
    return make_s3_archive(tmp_path_factory.mktemp("idc"))


@pytest.fixture
def s3_server(s3_archive: S3Archive) -> Iterator[S3Server]:
    """Our S3 mode over :func:`s3_archive`'s view, faults off, for one test."""
    with S3Server(s3_archive.view) as server:
        yield server


def fill_s3(endpoint: str, view: IdcView) -> None:
    """Create IDC's buckets at ``endpoint`` and upload every object of ``view``
    (single-part, public-read) with boto3."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for bucket in IDC_BUCKETS:
        client.create_bucket(Bucket=bucket, ACL="public-read")
    for obj in view.objects:
        with obj.path.open("rb") as body:
            client.put_object(Bucket=obj.bucket, Key=obj.key, Body=body, ACL="public-read",
                              ContentType="application/dicom")


@pytest.fixture(scope="session")
def moto_s3(s3_archive: S3Archive) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 holding :func:`s3_archive`'s objects: its URL."""
    pytest.importorskip("moto", reason="moto[server] is in the 'test' extra")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        fill_s3(endpoint, s3_archive.view)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture
def s3_serve() -> Iterator[Callable[..., S3Server]]:
    """``s3_serve(source, **S3Server_options)``: another S3 mode for this test (another
    view, bucket or port), stopped at its end."""
    started: list[S3Server] = []

    def start(source: Any, **options: Any) -> S3Server:
        server = S3Server(source, **options).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
