"""Which SeriesInstanceUIDs IDC's index holds, answered without duckdb.

``--source auto`` is the default, so every run with the index installed asks it about
every series; the answer for an NBIA-only manifest (a local archive, a limited-access
collection) is "none", and finding that out started the duckdb reader child: 0.2-0.4 s and
about 170 MB more peak memory for the process tree, in every run. This module keeps, per
index (its files' paths, sizes and modification times), the sorted 64-bit BLAKE2b
digests of every SeriesInstanceUID in ``idc_index`` and ``prior_versions_index``, in one
file of the user's cache folder (about 8 bytes a series: 8 MB for IDC's million), built
once by the child (``_lookup``'s ``uids`` request writes them) and read with :mod:`array`.
A UID whose digest is absent is not in IDC: no child is started for it; one whose digest
is present is looked up as before (a digest collision costs one lookup, never a wrong
answer). The file also keeps what opening the index checked (its columns were fine, its
version), so a run with a known index starts no child at all until one of its series is
in IDC.

The cache is the user's own folder, but it is still read as input: a file that is not
exactly in this format is ignored and rebuilt; a wrong one can only send a series to
NBIA that IDC holds (or cost a lookup), never fetch the wrong bytes.
"""

from __future__ import annotations

import array
import bisect
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ENV_CACHE", "UidFilter", "digest", "filter_path"]

#: Overrides the cache folder (tests; several accounts on one machine).
ENV_CACHE = "NBIA_RETRIEVER_CACHE"
_MAGIC = b"NBIAUID1"
#: Most bytes of the JSON header (what opening the index checked).
_MAX_HEADER = 1 << 16


def digest(uid: str) -> int:
    """The 64-bit digest a UID is filed under."""
    return int.from_bytes(hashlib.blake2b(uid.encode("ascii", "replace"),
                                          digest_size=8).digest(), "little")


def cache_folder() -> Path:
    override = os.environ.get(ENV_CACHE)
    if override:
        return Path(override).expanduser()
    from platformdirs import user_cache_dir  # only when an index is opened

    from ..config import APP_NAME  # (with platformdirs)

    return Path(user_cache_dir(APP_NAME, appauthor=False))


def filter_path(files: Mapping[str, Path]) -> Path | None:
    """The cache file of the index made of ``files`` (None: a file cannot be read)."""
    h = hashlib.blake2b(digest_size=12)
    try:
        for name in sorted(files):
            path = files[name]
            st = path.stat()
            h.update(f"{name}\0{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))
    except OSError:
        return None
    return cache_folder() / "idc" / f"uids-{h.hexdigest()}.bin"


class UidFilter:
    """The sorted digests of one index's SeriesInstanceUIDs, and what its opening found."""

    def __init__(self, digests: array.array[int], header: dict[str, Any]) -> None:
        self._digests = digests
        self.header = header

    def __len__(self) -> int:
        return len(self._digests)

    def may_hold(self, uid: str) -> bool:
        """False: the index does not hold ``uid`` (certain); True: look it up."""
        found = self._digests
        key = digest(uid)
        i = bisect.bisect_left(found, key)
        return i < len(found) and found[i] == key

    @classmethod
    def build(cls, uids: Iterable[str], header: dict[str, Any]) -> UidFilter:
        digests = array.array("Q", sorted({digest(u) for u in uids}))
        return cls(digests, header)

    @classmethod
    def from_words(cls, path: Path, header: dict[str, Any]) -> UidFilter | None:
        """The digests the reader child wrote (sorted little-endian words); None when
        the file is not a whole number of them or not sorted."""
        digests = array.array("Q")
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) % 8:
            return None
        digests.frombytes(data)
        if sys.byteorder != "little":
            digests.byteswap()
        if any(digests[i] >= digests[i + 1] for i in range(len(digests) - 1)):
            return None
        return cls(digests, header)

    @classmethod
    def load(cls, path: Path) -> UidFilter | None:
        """The filter in ``path``; None when it is missing or not exactly ours."""
        try:
            with open(path, "rb") as handle:
                if handle.read(len(_MAGIC)) != _MAGIC:
                    return None
                size = int.from_bytes(handle.read(4), "little")
                if size > _MAX_HEADER:
                    return None
                header = json.loads(handle.read(size))
                count = int.from_bytes(handle.read(8), "little")
                digests = array.array("Q")
                digests.frombytes(handle.read(count * 8 + 1))
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(header, dict) or len(digests) != count:
            return None
        if sys.byteorder != "little":  # (written little-endian)
            digests.byteswap()
        return cls(digests, header)

    def save(self, path: Path) -> None:
        """Write it atomically (a temporary file, then a rename); a cache that cannot be
        written is no error (the next run builds it again)."""
        with contextlib.suppress(OSError):
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            header = json.dumps(self.header, separators=(",", ":")).encode()
            digests = self._digests
            if sys.byteorder != "little":
                digests = array.array("Q", digests)
                digests.byteswap()
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as handle:
                handle.write(_MAGIC + len(header).to_bytes(4, "little") + header
                             + len(digests).to_bytes(8, "little"))
                digests.tofile(handle)
            os.replace(tmp, path)
