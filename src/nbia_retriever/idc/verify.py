"""``verify --server`` for series that came from IDC: the bucket is their server.

The journal row of an IDC series names the bucket and the version's folder (its
``source``: ``idc s3://<bucket>/<crdc_series_uuid>/ v<release>``, see
:func:`.source.where_text`). The folder is checked against that version's listing: the
same number of files, and the MD5 of the sorted file MD5s equal to the MD5 of the sorted
ETags, the very digest NBIA's ``getMD5Hierarchy`` gives for its copy, so both sources
are judged alike. An ETag that is no MD5 (a multipart upload's) leaves the series at
"image count matches".
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

from ..errors import NbiaError
from ..ondisk import journal_paths

__all__ = ["IDC_SOURCE", "check_idc_series", "idc_rows"]

#: A journal ``source`` value of an IDC series (bucket and uuid checked as the index's).
IDC_SOURCE = re.compile(r"idc s3://(?P<bucket>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/"
                        r"(?P<uuid>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/"
                        r"(?: v\d+)?(?: prior)?")


def idc_rows(root: Path) -> dict[str, tuple[str, str]]:
    """uid -> (bucket, crdc_series_uuid) of the root's finished IDC series, from its
    journals (a value not shaped like ours is not an IDC row: never a URL)."""
    from ..engine.journal import Journal  # verify --server imports this module anyway

    found: dict[str, tuple[str, str]] = {}
    for path in journal_paths(root):
        with Journal(path, readonly=True) as journal:
            for entry in journal.entries():
                match = IDC_SOURCE.fullmatch(entry.source or "")
                if match is not None and entry.state == "Complete":
                    found[entry.uid] = (match["bucket"], match["uuid"])
    return found


def _md5_of(paths: Iterable[Path]) -> list[str]:
    digests = []
    for path in paths:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        digests.append(digest.hexdigest())
    return digests


def check_idc_series(files: list[Path], bucket: str, uuid: str, *, endpoint: str,
                     timeout: float, verify: bool) -> tuple[str, str]:
    """(verdict, detail) of one IDC series folder's ``files`` against its listing;
    verdicts are :class:`~nbia_retriever.verify_server.Verdict` values."""
    from ..api.http import Transport  # the HTTP stack only when an IDC series is checked
    from .s3 import list_objects

    what = f"s3://{bucket}/{uuid}/"
    transport = Transport(timeout=timeout, connect_timeout=min(timeout, 30.0), verify=verify)
    try:
        listed = list_objects(transport, endpoint, bucket, f"{uuid}/", what=what)
    except NbiaError as exc:
        return "error", str(exc)
    finally:
        transport.close()
    if not listed:
        return "unknown", f"{what} lists no object"
    if len(files) < len(listed):
        return "incomplete", f"{len(files)} of {len(listed)} images"
    if len(files) > len(listed):
        return "mismatch", f"{len(files)} images, {what} has {len(listed)}"
    etags = [o.md5 for o in listed]
    if any(e is None for e in etags):
        return "not supported by this server", "image count matches (multipart ETags)"
    if sorted(e for e in etags if e is not None) != sorted(_md5_of(files)):
        return "mismatch", f"the files' MD5s differ from {what}'s ETags"
    return "match", ""
