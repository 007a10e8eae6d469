"""An anonymous, path-style S3 client for IDC's public buckets, on the NBIA transport.

Two calls are all a series needs: list the objects under ``<crdc_series_uuid>/``
(``GET ENDPOINT/BUCKET?list-type=2&prefix=...``, following continuation tokens) and get
one object (``GET ENDPOINT/BUCKET/KEY``, optionally from a byte offset). They go through
:class:`~nbia_retriever.api.http.Transport`, so TLS verification, timeouts, the progress
floor, proxies, redaction and the mapping of socket and TLS failures are NBIA's, and a
redirect to another host is never followed. Nothing is signed: IDC's buckets are public,
so no credential exists that could leak (and boto3 would be 80 MB of imports for two GETs).

Server bytes are untrusted, the listing most of all, since its keys become file names:

* a listing page is read whole but capped (:data:`MAX_LISTING_BYTES`), and parsed by
  ``xml.etree`` only after a check that it declares no DTD (no ``<!DOCTYPE``/``<!ENTITY``:
  expat expands internal entities, a "billion laughs" page would not stay 8 MiB);
* every key must be ``<prefix><name>`` with a plain, safe ``name`` (letters, digits,
  ``._-``, no folder, not a name the engine keeps for itself), sizes are decimal and
  bounded, a truncated page must carry a new continuation token; anything else is an
  :class:`~nbia_retriever.errors.IntegrityError` naming the key or the page.

S3's answers map onto the one hierarchy (:func:`~nbia_retriever.retry.classify` needs no
row of its own): 503 ``SlowDown`` and 429 are :class:`ApiError` with that status, which
classify reads as "the server asked to slow down" exactly as for NBIA; a 404
``NoSuchKey`` for an object the listing named is an :class:`IntegrityError` (retried:
listing and object disagree, the next attempt may agree); 403 ``AccessDenied`` is a final
:class:`ApiError` that says the bucket is not public; resets, timeouts and bodies cut
short are :class:`~nbia_retriever.errors.NetworkError` from the transport.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote as urlquote
from urllib.parse import urlencode

from ..api.client import error_excerpt, parse_retry_after
from ..api.http import Response, Transport
from ..errors import ApiError, IntegrityError
from ..naming import LICENSE_ENTRY, MD5_ENTRY
from ..untrusted import quote

__all__ = ["MAX_LISTING_BYTES", "S3Object", "get_object", "list_objects", "list_page",
           "object_url"]

#: Largest listing page accepted (a page of 1,000 keys is ~350 KB).
MAX_LISTING_BYTES = 8 * 1024 * 1024
#: Largest object size believed (S3's own limit is 5 TB).
MAX_OBJECT_SIZE = 5 * 1024**4
#: Pages one listing may take before it is judged endless (a million keys).
MAX_PAGES = 1000
#: An object's name under its series' prefix: what IDC uses (``<uuid>.dcm``) and any
#: other plain name, never a path, a dot name or a terminal escape.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", re.ASCII)
_PLAIN_MD5 = re.compile(r"[0-9a-f]{32}", re.ASCII)
#: Names the engine reads as the server's own entries (the MD5 list, the licence).
_RESERVED = frozenset({MD5_ENTRY.casefold(), LICENSE_ENTRY.casefold()})
_CODE = re.compile(r"<Code>([A-Za-z0-9.]{1,64})</Code>")


@dataclass(frozen=True, slots=True)
class S3Object:
    """One listed object: its key, its size and its ETag (unquoted, lower case)."""

    key: str
    size: int
    etag: str

    @property
    def name(self) -> str:
        """The key's last part: the staged file's name."""
        return self.key.rpartition("/")[2]

    @property
    def md5(self) -> str | None:
        """The object's MD5 when its ETag is one (a single-part upload's); a multipart
        upload's ETag (``<hex>-<parts>``) is no digest of the bytes."""
        return self.etag if _PLAIN_MD5.fullmatch(self.etag) else None


def object_url(endpoint: str, bucket: str, key: str = "") -> str:
    """The path-style URL of ``bucket`` (or of ``key`` in it)."""
    url = f"{endpoint.rstrip('/')}/{urlquote(bucket, safe='')}"
    return f"{url}/{urlquote(key, safe='/')}" if key else url


def _raise_for_status(response: Response, what: str, *, key: str | None = None) -> None:
    """Raise what an S3 error answer means (module docstring); nothing for 2xx."""
    status = response.status
    if status < 300:
        return
    text = response.read_text(1 << 14)
    found = _CODE.search(text)
    code = found.group(1) if found else ""
    label = f"HTTP {status}" + (f" {code}" if code else "")
    if status in (429, 503):
        raise ApiError(f"{what}: {label} (the server asks to slow down)", status=status,
                       retry_after=parse_retry_after(response.header("Retry-After")))
    if status == 404 and key is not None and code in ("NoSuchKey", ""):
        raise IntegrityError(f"{what}: object {quote(key, 120)} was listed but is missing "
                             f"({label})")
    if status == 404 and code == "NoSuchBucket":
        raise ApiError(f"{what}: {label}: the bucket does not exist at this endpoint",
                       status=status)
    if status == 403:
        raise ApiError(f"{what}: {label}: the bucket refuses anonymous access (not a public "
                       "IDC bucket, or the endpoint is not IDC's)", status=status)
    detail = code or error_excerpt(text)
    raise ApiError(f"{what}: HTTP {status}" + (f" {detail}" if detail else ""), status=status,
                   retry_after=parse_retry_after(response.header("Retry-After")))


def _local(tag: str) -> str:
    """An element's name without its namespace (S3 uses one, some servers none)."""
    return tag.rpartition("}")[2]


def _text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def list_page(body: bytes, what: str, prefix: str) -> tuple[list[S3Object], str | None]:
    """One ListBucketResult page: its objects (keys checked, see the module docstring)
    and the continuation token when the page says more follow."""
    if len(body) > MAX_LISTING_BYTES:
        raise IntegrityError(f"{what}: a listing page exceeds {MAX_LISTING_BYTES >> 20} MiB")
    head = body.lower()
    if b"<!doctype" in head or b"<!entity" in head:
        raise IntegrityError(f"{what}: the listing declares a DTD (refused)")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise IntegrityError(f"{what}: the listing is not XML ({exc})") from None
    if _local(root.tag) != "ListBucketResult":
        raise IntegrityError(f"{what}: the answer is not a listing (<{quote(root.tag, 60)}>)")
    objects: list[S3Object] = []
    for element in root:
        if _local(element.tag) != "Contents":
            continue
        key = _text(element, "Key") or ""
        size_text = (_text(element, "Size") or "").strip()
        etag = (_text(element, "ETag") or "").strip().strip('"').lower()
        if key == prefix and size_text == "0":
            continue  # a "folder" marker some uploaders leave
        name = key[len(prefix):] if key.startswith(prefix) else ""
        if not _SAFE_NAME.fullmatch(name) or name.casefold() in _RESERVED:
            raise IntegrityError(f"{what}: the listing names an unexpected key "
                                 f"{quote(key, 120)!r} (not {prefix}<plain name>)")
        if not size_text.isascii() or not size_text.isdigit() \
                or int(size_text) > MAX_OBJECT_SIZE:
            raise IntegrityError(f"{what}: the listing gives key {quote(key, 120)} the size "
                                 f"{quote(size_text, 40)!r}")
        objects.append(S3Object(key, int(size_text), etag))
    truncated = (_text(root, "IsTruncated") or "").strip().lower() == "true"
    token = _text(root, "NextContinuationToken") if truncated else None
    if truncated and not token:
        raise IntegrityError(f"{what}: a listing page says more follow but gives no "
                             "continuation token")
    return objects, token


def list_objects(transport: Transport, endpoint: str, bucket: str, prefix: str, *,
                 what: str, limit: int | None = None) -> list[S3Object]:
    """Every object under ``prefix``, in key order, following continuation tokens.

    ``limit``: more objects than this is an :class:`IntegrityError` (a series that
    promises 100 instances does not list a million) found without reading the rest.
    """
    url = object_url(endpoint, bucket)
    objects: list[S3Object] = []
    seen: set[str] = set()
    token: str | None = None
    for _ in range(MAX_PAGES):
        params = {"list-type": "2", "prefix": prefix}
        if token is not None:
            params["continuation-token"] = token
        with transport.open("GET", f"{url}?{urlencode(params)}", what=what) as response:
            _raise_for_status(response, what)
            body = bytearray()
            for chunk in response.chunks():
                body += chunk
                if len(body) > MAX_LISTING_BYTES:
                    raise IntegrityError(f"{what}: a listing page exceeds "
                                         f"{MAX_LISTING_BYTES >> 20} MiB")
        page, nxt = list_page(bytes(body), what, prefix)
        for obj in page:
            if obj.key in seen:
                raise IntegrityError(f"{what}: the listing names {quote(obj.key, 120)} twice")
            seen.add(obj.key)
        objects += page
        if limit is not None and len(objects) > limit:
            raise IntegrityError(f"{what}: the listing has more than {limit} objects")
        if nxt is None:
            objects.sort(key=lambda o: o.key.encode())  # S3's own order: UTF-8 bytes
            return objects
        if nxt == token:
            raise IntegrityError(f"{what}: the listing repeats its continuation token")
        token = nxt
    raise IntegrityError(f"{what}: the listing goes on past {MAX_PAGES} pages")


@contextlib.contextmanager
def get_object(transport: Transport, endpoint: str, bucket: str, obj: S3Object, *,
               what: str, start: int = 0) -> Iterator[Response]:
    """The body of ``obj`` from byte ``start`` (a ``Range`` request when not 0), its
    status checked: an object that changed since it was listed (another ETag or length)
    is an :class:`IntegrityError`, as the next attempt lists it afresh."""
    headers = {"Range": f"bytes={start}-"} if start else None
    url = object_url(endpoint, bucket, obj.key)
    with transport.open("GET", url, what=what, headers=headers) as response:
        _raise_for_status(response, what, key=obj.key)
        if start and response.status != 206:
            raise IntegrityError(f"{what}: {quote(obj.key, 120)}: a range request answered "
                                 f"HTTP {response.status}, not 206")
        etag = (response.header("ETag") or "").strip().strip('"').lower()
        if etag and obj.etag and etag != obj.etag:
            raise IntegrityError(f"{what}: object {quote(obj.key, 120)} changed since it was "
                                 "listed (another ETag)")
        length = response.header("Content-Length")
        if length is not None and length.strip() != str(obj.size - start):
            raise IntegrityError(f"{what}: object {quote(obj.key, 120)} is "
                                 f"{quote(length, 20)} bytes long, the listing says "
                                 f"{obj.size - start}")
        yield response
