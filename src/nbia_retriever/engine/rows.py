"""What a journal row may be believed to say (issue 21: a shared root is untrusted).

A download root on a cluster is a group folder: anyone of the group can plant a journal
in ``.nbia/`` or add rows to a group-writable one. So a row is input, like a manifest:

* its folder (``relpath``) must be one the layouts could have made, inside the root:
  :func:`safe_relpath` is the lexical rule (four components, none empty, none starting
  with a dot, so never ``.``, ``..`` or ``.nbia``; no ``\\``, NUL, control character or
  ``:``; not absolute), and :class:`FolderCheck` the physical one (every component a real
  folder, no symbolic link anywhere, checked with ``lstat`` and never followed);
* a file item's row (a DRS object or PathDB slide that is not a series, its key a URI:
  :func:`~nbia_retriever.models.is_file_uid`) names one file, ``Collection/Patient/name``:
  exactly three components by the same rules (:func:`is_safe_file_relpath`), the last a
  *regular file* reached without following a link at any level. Which rule applies is
  the row's key's, never the path's (:func:`row_relpath_ok`): a series row naming a
  file, or a file row naming a folder, is refused like a row naming a folder outside;
* a Complete row is believed by one ``stat`` only when it carries a MAC under a key only
  this user holds (:func:`row_key`, ``0600`` in the user's data folder) over what it
  says (:func:`sign`); any other row is re-checked by counting the folder's files.

The MAC covers the folder's *stamp*, :func:`folder_stamp`: its ``st_ctime`` on POSIX.
Unlike the mtime, no one can set a ctime (``utime`` makes it "now"), so a folder someone
swapped in under the same name, with the mtime copied, is never taken as unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from ..models import is_file_uid

#: How deep series folders sit below the root (Collection/Patient/Study/Series).
SERIES_DEPTH = 4
#: ``NBIA_RETRIEVER_DATA`` names the folder of the row key (tests; several accounts).
ENV_DATA = "NBIA_RETRIEVER_DATA"
KEY_NAME = "journal-rows.key"
_KEY_BYTES = 32

# One component as the layouts write it: no leading dot (so never "." or ".." or
# ".nbia"), no "/" "\\" ":" NUL or other control character, at most 255 characters
# (the byte limit is checked apart, for the rare non-ASCII name).
_PART = r"[^./\\:\x00-\x1f\x7f][^/\\:\x00-\x1f\x7f]{0,254}"
_RELPATH = re.compile(rf"{_PART}(?:/{_PART}){{{SERIES_DEPTH - 1}}}")
#: How deep a file item's file sits below the root (Collection/Patient/name).
FILE_DEPTH = 3
_FILE_RELPATH = re.compile(rf"{_PART}(?:/{_PART}){{{FILE_DEPTH - 1}}}")


def _short_parts(text: str) -> bool:
    """Every component within 255 bytes (the rare non-ASCII name; a lone surrogate is
    never a name the layouts make)."""
    if text.isascii():
        return True
    try:
        return all(len(part.encode("utf-8")) <= 255 for part in text.split("/"))
    except UnicodeEncodeError:
        return False


def is_safe_relpath(text: object) -> bool:
    """:func:`safe_relpath` as a bool, without building a path (200,000 rows a re-run)."""
    if not isinstance(text, str) or _RELPATH.fullmatch(text) is None:
        return False
    return _short_parts(text)


def is_safe_file_relpath(text: object) -> bool:
    """A file item's ``Collection/Patient/name`` by the rules of :func:`safe_relpath`
    (three components instead of four)."""
    return isinstance(text, str) and _FILE_RELPATH.fullmatch(text) is not None \
        and _short_parts(text)


def row_kind_ok(uid: object, relpath: str) -> bool:
    """Whether a row's relpath has its key's depth (a file item's three components, a
    series' four; "" is fine), by counting: the cheap half of :func:`row_relpath_ok`
    for the bulk read, whose :meth:`FolderCheck.stamps` checks the rest."""
    if not relpath:
        return True
    return (isinstance(uid, str) and is_file_uid(uid)) == (relpath.count("/") == FILE_DEPTH - 1)


def row_relpath_ok(uid: object, relpath: object) -> bool:
    """Lexically, what a row of key ``uid`` may name: a file item's file (its key a URI)
    or a series' folder, by the key's kind; "" (nothing published) is fine."""
    if relpath == "":
        return True
    if isinstance(uid, str) and is_file_uid(uid):
        return is_safe_file_relpath(relpath)
    return is_safe_relpath(relpath)


def safe_relpath(text: object) -> PurePosixPath | None:
    """``text`` as a series folder relative to the root, or None when a layout could
    never have written it (module docstring): absolute, ``..``, ``.``, empty components,
    ``.nbia``, backslashes, NUL, control characters, another depth."""
    return PurePosixPath(text) if is_safe_relpath(text) else None  # type: ignore[arg-type]


def folder_stamp(st: os.stat_result) -> int:
    """What says a folder is unchanged: its ctime (ns) on POSIX, which no one can set;
    its mtime elsewhere (Windows' ``st_ctime`` is a creation time)."""
    return st.st_ctime_ns if os.name == "posix" else st.st_mtime_ns


#: :meth:`FolderCheck.folder` for a row that names something other than a folder below
#: the root (through a link, or a link, file or device itself).
REFUSED = False


class FolderCheck:
    """Where journal rows point, checked without following any link.

    Series share their collection, patient and study folders, so those are checked once
    each (cached): a re-run of 200,000 series costs one ``lstat`` per series folder and a
    few per study, not four per series.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root) + os.sep
        self._parents: dict[str, bool] = {}
        #: The relpaths the last :meth:`stamps` took as a file item's (usually none).
        self.files_seen: set[str] = set()

    def _parent_ok(self, prefix: str) -> bool:
        """A real folder or absent (then the series simply is not there): not a link."""
        ok = self._parents.get(prefix)
        if ok is None:
            try:
                ok = stat.S_ISDIR(os.lstat(self.root + prefix).st_mode)
            except OSError:
                ok = True
            self._parents[prefix] = ok
        return ok

    def folder(self, relpath: object, *, file: bool = False) -> os.stat_result | bool | None:
        """The ``lstat`` of a row's series folder; None when it is absent; :data:`REFUSED`
        when the row names anything but a folder inside the root ("": no folder). With
        ``file`` (a file item's row) the same for its ``Collection/Patient/name``, which
        must be a regular file."""
        if file:
            return self._file(relpath)
        if not is_safe_relpath(relpath):
            return None if relpath == "" else REFUSED
        assert isinstance(relpath, str)
        study = relpath[:relpath.rfind("/")]
        ok = self._parents.get(study)
        if ok is None:
            # Top down: lstat follows every component but the last, so each parent is
            # known to be a real folder before the next is looked at through it. A
            # study folder is cached only once its parents were checked, so the common
            # case (a study seen before) costs one lookup.
            head = study.find("/")
            ok = (self._parent_ok(study[:head])
                  and self._parent_ok(study[:study.find("/", head + 1)])
                  and self._parent_ok(study))
            self._parents[study] = ok
        if not ok:
            return REFUSED
        try:
            st = os.lstat(self.root + relpath)
        except OSError:
            return None
        return st if stat.S_ISDIR(st.st_mode) else REFUSED

    def _file(self, relpath: object) -> os.stat_result | bool | None:
        """:meth:`folder` for a file item's row: both parents real folders (or absent),
        the leaf a regular file, nothing followed."""
        if not is_safe_file_relpath(relpath):
            return None if relpath == "" else REFUSED
        assert isinstance(relpath, str)
        patient = relpath[:relpath.rfind("/")]
        if not (self._parent_ok(patient[:patient.find("/")]) and self._parent_ok(patient)):
            return REFUSED
        try:
            st = os.lstat(self.root + relpath)
        except OSError:
            return None
        return st if stat.S_ISREG(st.st_mode) else REFUSED

    def stamps(self, relpaths: Iterable[str]) -> dict[str, int | bool | None]:
        """relpath -> the :func:`folder_stamp` of its folder, None when absent,
        :data:`REFUSED` as :meth:`folder` says, for many rows at once.

        In path order, each collection, patient and study folder opened once, relative
        to its parent's descriptor with ``O_NOFOLLOW`` (a link anywhere is refused, and
        nothing can be swapped in between), and each series folder looked at relative
        to its study's: a fraction of the path walks of one ``lstat`` per row, which is
        what a no-op re-run of 200,000 series spends its time on.

        A three-component relpath is a file item's (:func:`is_safe_file_relpath`): its
        leaf must be a regular file, its stamp the file's. Which relpaths were taken so
        is left in :attr:`files_seen`, for the caller, who knows each row's key, to
        refuse the rows whose kind differs (:func:`row_kind_ok`).
        """
        if not _FD_OK:  # pragma: no cover - Windows: one row at a time
            relpaths = list(relpaths)
            self.files_seen = {r for r in relpaths if is_safe_file_relpath(r)}
            return {r: (folder_stamp(st) if isinstance(st, os.stat_result) else st)
                    for r in relpaths
                    for st in (self.folder(r, file=r in self.files_seen),)}
        found: dict[str, int | bool | None] = {}
        self.files_seen = set()
        # (name, descriptor or None for absent or REFUSED) of the open collection,
        # patient and study folders.
        open_: list[tuple[str, int | bool | None]] = []
        root = os.open(self.root, _DIR_FLAGS)
        try:
            for relpath in sorted(set(relpaths)):
                # (by counting first: 200,000 series rows pay no second regex)
                is_file = isinstance(relpath, str) and relpath.count("/") == FILE_DEPTH - 1 \
                    and is_safe_file_relpath(relpath)
                if is_file:
                    self.files_seen.add(relpath)
                elif not is_safe_relpath(relpath):
                    found[relpath] = None if relpath == "" else REFUSED
                    continue
                *parents, name = relpath.split("/")
                depth = 0
                while depth < min(len(open_), len(parents)) \
                        and open_[depth][0] == parents[depth]:
                    depth += 1
                for _, fd in open_[depth:]:
                    if type(fd) is int:  # (not None, not REFUSED: a bool)
                        os.close(fd)
                del open_[depth:]
                for part in parents[depth:]:
                    above = open_[-1][1] if open_ else root
                    open_.append((part, _open_below(above, part)))
                where = open_[-1][1]
                if where is None or where is REFUSED:
                    found[relpath] = where
                    continue
                try:
                    st = os.stat(name, dir_fd=where, follow_symlinks=False)
                except OSError:
                    found[relpath] = None
                    continue
                kind_ok = stat.S_ISREG(st.st_mode) if is_file else stat.S_ISDIR(st.st_mode)
                found[relpath] = folder_stamp(st) if kind_ok else REFUSED
        finally:
            for _, fd in open_:
                if type(fd) is int:
                    os.close(fd)
            os.close(root)
        return found

    def forget(self) -> None:
        """Drop the cache (a folder may become a link later; and it is memory)."""
        self._parents = {}


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_FD_OK = (os.open in os.supports_dir_fd and os.stat in os.supports_dir_fd
          and bool(_NOFOLLOW))


def _open_below(above: int | bool | None, name: str) -> int | bool | None:
    """``name`` in the folder ``above`` (a descriptor), opened without following a
    link; None when it (or ``above``) is absent, :data:`REFUSED` when it (or ``above``)
    is a link or no folder."""
    if above is None or above is REFUSED:
        return above
    try:
        return os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=above)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            return REFUSED
        return None


def file_count(folder: str | Path) -> int | None:
    """Regular files in ``folder`` (links are not counted, nor followed); None when it
    cannot be listed. A file item's row names its one file: 1 when ``folder`` is a
    regular file itself (never a link: ``lstat``)."""
    try:
        with os.scandir(folder) as entries:
            return sum(1 for e in entries if e.is_file(follow_symlinks=False))
    except NotADirectoryError:
        try:
            return 1 if stat.S_ISREG(os.lstat(folder).st_mode) else None
        except OSError:
            return None
    except OSError:
        return None


def refused_message(journal: Path, count: int) -> str:
    """The one warning per journal file that names folders outside the root."""
    rows = "1 row names a folder" if count == 1 else f"{count:,} rows name folders"
    return (f"warning: {journal}: {rows} outside the download root (or through a "
            "symbolic link); those series are not taken as done")


# ----------------------------------------------------------------------------- the MAC


def key_path() -> Path:
    override = os.environ.get(ENV_DATA)
    if override:
        return Path(override).expanduser() / KEY_NAME
    from platformdirs import user_data_dir  # 4 ms: only when the row key is looked for

    from ..config import APP_NAME  # with platformdirs: only when the row key is looked for

    return Path(user_data_dir(APP_NAME, appauthor=False)) / KEY_NAME


_KEYS: dict[Path, bytes] = {}


def _load_key(path: Path, create: bool) -> bytes | None:
    key = _KEYS.get(path) or _read_key(path)
    if key is not None or not create:
        if key is not None:
            _KEYS[path] = key
        return key
    with contextlib.suppress(OSError):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written whole to a private temp file, then linked to its name: two runs that
        # start at once never see half a key, and the first one's key wins (link fails
        # on an existing name where rename would replace it).
        fd, tmp = tempfile.mkstemp(prefix=".key-", dir=path.parent)
        try:
            os.write(fd, secrets.token_bytes(_KEY_BYTES))
            os.fsync(fd)
            os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    key = _read_key(path)
    if key is not None:
        _KEYS[path] = key
    return key


def _read_key(path: Path) -> bytes | None:
    """The key, if the file is this user's own, private and whole; None otherwise (then
    no row is believed without a count: slower, never wrong)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != _KEY_BYTES:
            return None
        if os.name == "posix" and (st.st_uid != os.geteuid() or st.st_mode & 0o077):
            return None
        key = os.read(fd, _KEY_BYTES + 1)
    finally:
        os.close(fd)
    return key if len(key) == _KEY_BYTES else None


def row_key(*, create: bool = False) -> bytes | None:
    """This user's key for journal rows (created when ``create`` and absent)."""
    return _load_key(key_path(), create)


def sign(key: bytes, uid: str, state: str, relpath: str, nfiles: int, stamp: int,
         checked: float) -> str:
    """The MAC of what a Complete row says (hex; 128 bits are plenty)."""
    message = f"{uid}\0{state}\0{relpath}\0{nfiles}\0{stamp}\0{checked!r}"
    return hashlib.blake2b(message.encode("utf-8", "surrogatepass"), key=key,
                           digest_size=16).hexdigest()


def signed(key: bytes | None, mac: object, uid: str, state: str, relpath: str,
           nfiles: int, stamp: int, checked: float) -> bool:
    return key is not None and isinstance(mac, str) and hmac.compare_digest(
        mac, sign(key, uid, state, relpath, nfiles, stamp, checked))
