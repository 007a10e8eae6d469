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
]
