"""nbia-retriever: download DICOM series from TCIA and other NBIA servers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    ApiError,
    AuthError,
    DestinationError,
    IntegrityError,
    ManifestError,
    NbiaError,
    NetworkError,
    NotPublicError,
    ServerUnreachableError,
    UnsafeArchiveError,
    UsageError,
)
from .models import SeriesInfo, SeriesState
from .report import Report, SeriesFailedError, SeriesResult

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence
    from typing import Unpack

    from .engine import Engine
    from .engine.options import DownloadKwargs
    from .manifest import Manifest


def download(manifest: Manifest | str | os.PathLike[str] | Sequence[str],
             dest: str | os.PathLike[str] = ".", *, progress: bool | None = None,
             **options: Unpack[DownloadKwargs]) -> Report:
    """Download every series of ``manifest`` into ``dest`` and return the :class:`Report`.

    ``manifest`` is a path (``.tcia``, CSV/TSV, UID list), a parsed ``Manifest`` or a list
    of Series Instance UIDs. ``options`` are the fields of
    :class:`~nbia_retriever.engine.DownloadOptions` (``workers``, ``retries``,
    ``api_url``, ``layout``, ``md5``, ``only_failed``, ...), with its defaults, plus
    ``user``/``password`` for limited-access collections: typed keyword parameters
    (:class:`~nbia_retriever.engine.options.DownloadKwargs`), so mypy checks a call. Blocks
    until done; for start/pause/resume use :func:`make_engine` (an
    :class:`~nbia_retriever.engine.Engine`).

    ``progress``: a progress bar (rich) is drawn in a notebook or an interactive
    terminal; ``False`` never draws one, ``True`` always does.

    Series that fail stay in the report (``report.failed``, ``report.to_dataframe()``;
    ``report.raise_for_failures()`` turns them into an exception). What stops the whole
    run raises a subclass of :class:`NbiaError` instead: a manifest that cannot be read
    (:class:`ManifestError`), a destination that cannot be used
    (:class:`~nbia_retriever.errors.DestinationError`), a refused login
    (:class:`AuthError`), a server that cannot be reached
    (:class:`ServerUnreachableError`, a :class:`~nbia_retriever.errors.NetworkError`).
    The exception's ``report`` attribute holds what was done before it stopped.

    >>> report = download("cart.tcia", "downloads", workers=4)   # doctest: +SKIP
    >>> report                                                   # doctest: +SKIP
    <Report 12/12 complete, 0 failed, 840.3 MB in 41.2 s>
    >>> report.to_dataframe()                                    # doctest: +SKIP
    """
    # Imported here: ``import nbia_retriever`` (and every CLI command) need not load the
    # engine and rich.
    from .bar import run_with_bar, wanted
    from .engine import make_engine

    engine = make_engine(manifest, dest, **options)
    report: Report = run_with_bar(engine) if wanted(progress) else engine.run()
    fatal = engine.fatal_error
    if fatal is not None:
        fatal.report = report  # type: ignore[attr-defined]
        raise fatal
    return report


def make_engine(manifest: Manifest | str | os.PathLike[str] | Sequence[str],
                dest: str | os.PathLike[str] = ".",
                **options: Unpack[DownloadKwargs]) -> Engine:
    """An :class:`~nbia_retriever.engine.Engine` with ``start``, ``pause``, ``resume``,
    ``cancel``, ``wait`` and ``subscribe`` (progress events), not yet started; the same
    keyword parameters as :func:`download`."""
    from .engine import make_engine as _make  # here: see download()

    return _make(manifest, dest, **options)


__all__ = [
    "ApiError",
    "AuthError",
    "DestinationError",
    "IntegrityError",
    "ManifestError",
    "NbiaError",
    "NetworkError",
    "NotPublicError",
    "Report",
    "SeriesFailedError",
    "SeriesInfo",
    "SeriesResult",
    "SeriesState",
    "ServerUnreachableError",
    "UnsafeArchiveError",
    "UsageError",
    "__version__",
    "download",
    "make_engine",
]
