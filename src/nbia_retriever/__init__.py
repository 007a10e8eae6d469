"""nbia-retriever: download DICOM series from TCIA and other NBIA servers."""

from __future__ import annotations

from .errors import (
    ApiError,
    AuthError,
    IntegrityError,
    ManifestError,
    NbiaError,
    NotPublicError,
    UnsafeArchiveError,
)
from .models import SeriesInfo

__version__ = "0.1.0"


def download(manifest, dest=".", **options):  # type: ignore[no-untyped-def]
    """Download every series of ``manifest`` into ``dest`` and return the :class:`Report`.

    ``manifest`` is a path (``.tcia``, CSV/TSV, UID list), a parsed ``Manifest`` or a list
    of Series Instance UIDs. ``options`` are the fields of
    :class:`~nbia_retriever.engine.DownloadOptions` (``workers``, ``retries``,
    ``api_url``, ``layout``, ``md5``, ``only_failed``, ...) plus ``user``/``password``
    for limited-access collections. Blocks until done; for start/pause/resume use
    :func:`make_engine` (an :class:`~nbia_retriever.engine.Engine`).

    >>> report = download("cart.tcia", "downloads", workers=4)   # doctest: +SKIP
    >>> print(report.summary())                                  # doctest: +SKIP
    """
    from .engine import make_engine

    return make_engine(manifest, dest, **options).run()


def make_engine(manifest, dest=".", **options):  # type: ignore[no-untyped-def]
    """An :class:`~nbia_retriever.engine.Engine` with ``start``, ``pause``, ``resume``,
    ``cancel``, ``wait`` and ``subscribe`` (progress events), not yet started."""
    from .engine import make_engine as _make

    return _make(manifest, dest, **options)

__all__ = [
    "ApiError",
    "AuthError",
    "IntegrityError",
    "ManifestError",
    "NbiaError",
    "NotPublicError",
    "SeriesInfo",
    "UnsafeArchiveError",
    "__version__",
    "download",
    "make_engine",
]
