"""A DRS object's signed URL (Fence) and its size and MD5 (GA4GH DRS).

``GET /user/data/download/<id>`` with the bearer token answers ``{"url": ...}``: a
pre-signed URL on the storage host (S3, GCS), valid for minutes, that is fetched with
NO ``Authorization`` header (the token is for the Gen3 API only; a storage host that
got it could replay it). The id is sent with its ``/`` as is (``dg.4DFC/<uuid>``), as
gen3sdk and TCIA's Python utilities send it; Fence routes the path whole.

Where the commons offers GA4GH DRS (``/ga4gh/drs/v1/objects/<id>``), its ``size`` and
``md5`` checksum let a file be verified when the manifest gives neither (CTDC's sheets
carry an MD5, TCIA's General Commons sheets only a size). A commons without it (404)
simply gives nothing more: the transfer then checks what it can.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

from ..errors import ApiError
from ..models import DEFAULT_DRS_HOST, FileItem
from ..untrusted import quote
from .gen3 import raise_for_status
from .transfer import plain_md5

if TYPE_CHECKING:
    from .gen3 import Gen3Auth

__all__ = ["DrsInfo", "drs_object", "gen3_origin", "signed_url"]


@dataclass(frozen=True)
class DrsInfo:
    """What GA4GH DRS says of an object (None: it does not say)."""

    size: int | None
    md5: str | None
    name: str


def gen3_origin(item: FileItem, endpoint_override: str | None) -> str:
    """The Gen3 API origin of a DRS item: ``--gen3-endpoint`` when given, else
    ``https://HOST`` of its ``drs://HOST/...`` URI."""
    if endpoint_override:
        parts = urlsplit(endpoint_override.strip())
        return f"{parts.scheme.lower()}://{parts.netloc}"
    return f"https://{item.host or DEFAULT_DRS_HOST}"


def _path_id(object_id: str) -> str:
    """The id in a URL path: its ``/`` kept, anything else that is not a path
    character escaped (a manifest's id is untrusted: no ``?``, ``#`` or ``..`` trick
    reaches the server as anything but part of the id)."""
    return "/".join(url_quote(part, safe="") if part not in (".", "..") else "%2E" * len(part)
                    for part in object_id.split("/"))


def signed_url(auth: Gen3Auth, object_id: str) -> str:
    """The object's signed URL (``/user/data/download/<id>``). 404: not found on the
    host (the item fails); 403: not authorised (the item is Not Authorized); a second
    401: :class:`~nbia_retriever.errors.AuthError` (the run stops)."""
    what = f"download URL of {quote(object_id, 80)} at {auth.host}"
    answer = auth.get(f"/user/data/download/{_path_id(object_id)}", what=what)
    raise_for_status(answer, what, name=f"{quote(object_id, 80)}")
    try:
        body = json.loads(answer.body)
    except (ValueError, RecursionError):
        body = None
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or urlsplit(url).scheme.lower() not in ("http", "https") \
            or not urlsplit(url).hostname:
        raise ApiError(f"{what}: no usable 'url' in the answer", status=None)
    return url


def drs_object(auth: Gen3Auth, object_id: str) -> DrsInfo | None:
    """The GA4GH DRS record of the object, or None when the commons has no DRS service
    or no record of it (404)."""
    what = f"DRS record of {quote(object_id, 80)} at {auth.host}"
    answer = auth.get(f"/ga4gh/drs/v1/objects/{_path_id(object_id)}", what=what)
    if answer.status == 404:
        return None
    raise_for_status(answer, what, name=f"{quote(object_id, 80)}")
    try:
        body = json.loads(answer.body)
    except (ValueError, RecursionError):
        raise ApiError(f"{what}: malformed JSON") from None
    if not isinstance(body, dict):
        raise ApiError(f"{what}: not a DRS object")
    size = body.get("size")
    md5 = None
    checksums = body.get("checksums")
    for entry in checksums if isinstance(checksums, list) else ():
        if isinstance(entry, dict) and str(entry.get("type", "")).lower() == "md5":
            md5 = plain_md5(str(entry.get("checksum", "")))
            break
    name = body.get("name")
    return DrsInfo(size if isinstance(size, int) and not isinstance(size, bool)
                   and size >= 0 else None, md5, name if isinstance(name, str) else "")
