"""Imaging Data Commons: TCIA's public series in IDC's public cloud buckets.

Most public TCIA series are also in IDC, as one object per instance
(``s3://<bucket>/<crdc_series_uuid>/<crdc_instance_uuid>.dcm``), anonymous and with no
per-host politeness limit. This package finds a series in IDC's own index files
(:mod:`.index`, the ``idc-index-data`` package), lists and fetches its objects
(:mod:`.s3`, :mod:`.stream`), and is the ``idc`` source of the engine (:mod:`.source`):
the objects are staged, checked (ETag MD5s, header UIDs, instance count) and published
into the same Java tree as an NBIA download of the series.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import UsageError

__all__ = ["check_endpoint"]


def check_endpoint(url: str, what: str = "--idc-endpoint") -> str:
    """``--idc-endpoint``: ``http(s)://host[:port][/path]``, https unless loopback (the
    objects are checked by MD5, but a listing over plain http could be swapped on the
    way, and with it the ETags). Returns it without a trailing ``/``. ``what``: the flag
    named in errors (``--gen3-endpoint`` follows the same rules: its key and tokens must
    not cross a network in clear, nor sit in a URL)."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Never echoed: the user name and password are the secret (IDC is anonymous).
        raise UsageError(f"{what} {parts.scheme}://{parts.hostname or '?'}: remove the "
                         "user name and password from the URL")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query \
            or parts.fragment:
        raise UsageError(f"{what} must be an http(s) URL without query or "
                         f"credentials, not {url!r}")
    from ..api.http import is_loopback  # the HTTP stack only when an endpoint is named

    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise UsageError(f"{what} {parts.hostname}: plain http is accepted only "
                         "on loopback; use https")
    return url.rstrip("/")
