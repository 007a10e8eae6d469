"""The NBIA REST client: a thin public surface over private modules (httpx's shape).

* :class:`NbiaClient` (``client``): metadata, queries, series streams, MD5 checks,
  across the server builds in the field.
* :class:`Credentials`, :class:`HostPolicy`, :class:`TokenManager` (``auth``): logging
  in, and where a password may go.
* ``http``: the one transport (``http.client``) and its rules (redirects, progress floor).
* ``records``: answers as records.

Errors are this package's own (``nbia_retriever.errors``): nothing that uses the client
needs to import an HTTP library.
"""

from __future__ import annotations

from ..errors import ApiMismatch, StaleToken, TlsError
from ..retry import backoff_delay
from .auth import (
    GUEST_USER,
    TCIA_DOMAIN,
    Credentials,
    HostPolicy,
    TokenManager,
    keyring_service,
    stored_password,
    token_url_for,
)
from .client import (
    API_VERSIONS,
    DEFAULT_API_URL,
    V4_BATCH,
    MetadataBatch,
    NbiaClient,
    SeriesRequest,
    check_status,
    open_series_request,
    parse_retry_after,
)
from .http import MAX_ANSWER_BYTES, USER_AGENT, Origin, SeriesStream, Transport, is_loopback

__all__ = [
    "API_VERSIONS",
    "DEFAULT_API_URL",
    "GUEST_USER",
    "MAX_ANSWER_BYTES",
    "TCIA_DOMAIN",
    "USER_AGENT",
    "V4_BATCH",
    "ApiMismatch",
    "Credentials",
    "HostPolicy",
    "MetadataBatch",
    "NbiaClient",
    "Origin",
    "SeriesRequest",
    "SeriesStream",
    "StaleToken",
    "TlsError",
    "TokenManager",
    "Transport",
    "backoff_delay",
    "check_status",
    "is_loopback",
    "keyring_service",
    "open_series_request",
    "parse_retry_after",
    "stored_password",
    "token_url_for",
]
