"""IDC's own index of its series: which TCIA series IDC holds, in which bucket, as which
version, with the metadata an NBIA download of it would have.

The index is idc-index-data's parquet files (``idc_index``, ``collections_index``,
``prior_versions_index``, optionally ``version_metadata_index``), either those of the
installed package (``pip install 'nbia-retriever[idc]'``) or a folder the user names
(``--idc-index DIR``) with the same file and column names.

Reading: duckdb, in a short-lived child process (:mod:`._lookup`, JSON over a pipe).
duckdb finds 2,000 series in the real 74 MB ``idc_index.parquet`` in about 0.2 s, where
pyarrow took 0.6-3.9 s and 600 MB; but its engine and buffers (150-200 MB) would stay in
the downloader's memory for the whole run. In a child they are gone when it exits; the
downloader keeps only the rows it asked for. One child answers the opening's column
check and the lookups that follow it (a run's are within a second of each other), and
ends once :data:`._lookup.IDLE` seconds pass without a request: starting Python and
importing duckdb is ~0.15 s of CPU, which a run paid twice.

Trust: a parquet file from a folder the user named is input like a manifest. A missing
column is a one-line :class:`IndexUnavailable` naming the file and the column. A row whose
bucket or ``crdc_series_uuid`` is not plainly shaped (see :func:`~..manifest.is_s3_bucket`
and :func:`~..manifest.is_crdc_uuid`), whose SeriesInstanceUID is not a UID, or whose
instance count is missing is not used (never in a URL, never a folder name): it is
skipped and counted in :attr:`IdcIndex.rejected`, and that series is then simply not in
IDC (``auto`` asks NBIA). Text fields lose their control characters
(:func:`~..untrusted.plain`), as NBIA's metadata does.

Versions: ``idc_index`` holds each series' current version; ``prior_versions_index``
holds older ones (by ``crdc_series_uuid``), and series IDC removed. A bare
SeriesInstanceUID always means the current version; ``prior_versions_index`` answers only
for a UID ``idc_index`` lacks (a removed series: its last version). TCIA's Go retriever
loads the prior index second and so resolves every revised series to an old version;
this module does not copy that. An ``.s5cmd`` manifest names versions by uuid
(:func:`resolve_manifest`): those are fetched as named, old or not.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NbiaError
from ..manifest import Manifest, is_crdc_uuid, is_s3_bucket, is_valid_uid
from ..models import SeriesInfo
from ..untrusted import plain, quote

if TYPE_CHECKING:
    from .uidfilter import UidFilter

__all__ = [
    "INDEX_FILES",
    "LOOKUP_TIMEOUT",
    "IdcIndex",
    "IdcSeries",
    "IndexUnavailable",
    "Resolved",
    "license_of",
    "resolve_manifest",
]

#: The files of a folder given as ``--idc-index`` (the last one is optional).
INDEX_FILES = ("idc_index.parquet", "collections_index.parquet",
               "prior_versions_index.parquet", "version_metadata_index.parquet")
#: Seconds one lookup may take (a folder on a slow network share, 50,000 series).
LOOKUP_TIMEOUT = 300.0
#: Reasons kept in :attr:`IdcIndex.rejected` (the count goes on).
MAX_REASONS = 100

#: idc_index columns read, and how (idc-index-data's ``idc_index_schema.json``).
_CURRENT: dict[str, str] = {
    "SeriesInstanceUID": "str", "crdc_series_uuid": "str", "aws_bucket": "str",
    "series_revised_idc_version": "int", "collection_id": "str", "PatientID": "str",
    "StudyInstanceUID": "str", "StudyDate": "str", "StudyDescription": "str",
    "SeriesDescription": "str", "SeriesNumber": "str", "Modality": "str",
    "instanceCount": "int", "series_size_MB": "float", "license_short_name": "str",
}
#: Read when present (older releases, hand-made folders may lack them): the rest of
#: what an NBIA metadata.csv row holds.
_CURRENT_OPTIONAL: dict[str, str] = {
    "Manufacturer": "str", "BodyPartExamined": "str", "SOPClassUID": "str",
    "sop_class_name": "str", "source_DOI": "str", "analysis_result_id": "str",
}
_PRIOR: dict[str, str] = {
    "SeriesInstanceUID": "str", "crdc_series_uuid": "str", "aws_bucket": "str",
    "collection_id": "str", "PatientID": "str", "StudyInstanceUID": "str", "Modality": "str",
    "series_size_MB": "float", "min_idc_version": "int", "max_idc_version": "int",
}
_COLLECTIONS = ("collection_id", "collection_name")


class IndexUnavailable(NbiaError):
    """No usable IDC index: neither a folder nor the installed package, a file missing or
    unreadable, a column missing, duckdb not installed. The message is one line."""


# ----------------------------------------------------------------------------- licences

_CC_PARTS = {"BY": "Attribution", "NC": "NonCommercial", "SA": "ShareAlike",
             "ND": "NoDerivatives"}
_CC = re.compile(r"CC ((?:BY)(?:-(?:NC|SA|ND))*) (\d\.\d)", re.ASCII)
_NLM = "National Library of Medicine Terms and Conditions"
_NLM_URL = "https://www.nlm.nih.gov/databases/download/terms_and_conditions.html"


def license_of(short_name: str) -> tuple[str, str]:
    """IDC's ``license_short_name`` as NBIA names the licence: ``(name, url)``.

    >>> license_of("CC BY 4.0")
    ('Creative Commons Attribution 4.0 International License', 'https://creativecommons.org/licenses/by/4.0/')
    >>> license_of("CC BY-NC 3.0")[0]
    'Creative Commons Attribution-NonCommercial 3.0 Unported License'

    Anything else keeps its short name, with no URL.
    """
    text = short_name.strip()
    match = _CC.fullmatch(text)
    if match is not None:
        parts = match[1].split("-")
        version = match[2]
        words = "-".join(_CC_PARTS[p] for p in parts)
        if version == "3.0":
            words = words.replace("NoDerivatives", "NoDerivs")
        scope = {"4.0": "International", "3.0": "Unported"}.get(version, "Generic")
        return (f"Creative Commons {words} {version} {scope} License",
                f"https://creativecommons.org/licenses/{match[1].lower()}/{version}/")
    if text.startswith(_NLM):
        return text, _NLM_URL
    return text, ""


# ----------------------------------------------------------------------------- series


@dataclass(frozen=True, slots=True)
class IdcSeries:
    """One version of one series in IDC: where its objects are and what NBIA would say
    about it (:meth:`info`).

    ``version`` is the IDC release of this version (``series_revised_idc_version``, or
    for a prior version the last release that served it; 0 when the index does not say).
    ``current`` is whether it is the version IDC serves today. ``instance_count`` is
    ``None`` for a prior version (``prior_versions_index`` does not say: the listing
    decides). ``size_bytes`` is ``series_size_MB`` x 10^6.
    """

    series_uid: str
    crdc_series_uuid: str
    bucket: str
    version: int
    current: bool
    collection_id: str
    collection: str
    patient_id: str
    study_uid: str
    study_date: str
    study_description: str
    series_description: str
    series_number: str
    modality: str
    instance_count: int | None
    size_bytes: int | None
    license_short_name: str
    manufacturer: str = ""
    body_part: str = ""
    sop_class_uid: str = ""
    sop_class_name: str = ""
    doi: str = ""
    #: IDC's ``analysis_result_id``: the series is a third party's analysis result
    #: (NBIA's "3rd Party Analysis" YES).
    analysis: str = ""

    @property
    def url(self) -> str:
        """``s3://BUCKET/<crdc_series_uuid>/*``, IDC's ``series_aws_url``."""
        return f"s3://{self.bucket}/{self.crdc_series_uuid}/*"

    def info(self) -> SeriesInfo:
        """What NBIA's metadata would say: the study date as ``MM-DD-YYYY``, NBIA's
        licence name and URL, the image count and the size from the index."""
        from ..layout import normalise_date  # layout is heavy; only when a series is used

        name, url = license_of(self.license_short_name)
        return SeriesInfo(
            self.series_uid, collection=self.collection, patient_id=self.patient_id,
            study_uid=self.study_uid, study_date=normalise_date(self.study_date),
            study_description=self.study_description,
            series_description=self.series_description, series_number=self.series_number,
            modality=self.modality, manufacturer=self.manufacturer, body_part=self.body_part,
            sop_class_uid=self.sop_class_uid, sop_class_name=self.sop_class_name,
            image_count=self.instance_count, file_size=self.size_bytes,
            license_name=name, license_url=url,
            data_description_uri=f"https://doi.org/{self.doi}" if self.doi else "",
            third_party="YES" if self.analysis else "NO",
        )


@dataclass(frozen=True, slots=True)
class Resolved:
    """An ``.s5cmd`` manifest in SeriesInstanceUIDs (see :func:`resolve_manifest`).

    ``uids``: what to download, in manifest order. ``pinned``: the version each uuid
    line named (fetched as that version). ``unknown``: uuids the index does not hold.
    ``dropped``: uuids naming a series an earlier line already named in another version
    (one folder cannot hold two versions; the first line wins).
    """

    uids: list[str]
    pinned: dict[str, IdcSeries]
    unknown: list[str]
    dropped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- the index


def _package_folder() -> Path | None:
    """The installed idc-index-data's folder, found without importing it (its import
    walks every file of its distribution)."""
    try:
        spec = importlib.util.find_spec("idc_index_data")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules[module] is None)
        return False


def _package_release() -> int | None:
    try:
        text = metadata.version("idc-index-data")
    except metadata.PackageNotFoundError:
        return None
    head = text.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def _text(value: object) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return plain(text).strip()


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _size(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0 or value > 1e12:
        return None
    return round(value * 1_000_000)


class _Reader:
    """The :mod:`._lookup` child of one index, reused from request to request (module
    docstring); a request at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None
        self._errors: Any = None
        self._why = ""
        self._status: int | None = None

    def alive(self) -> bool:
        return self._child is not None and self._child.poll() is None

    def _start(self) -> subprocess.Popen[bytes]:
        self.close()
        if self._errors is not None:
            self._errors.close()
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the child
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-P", "-m", "nbia_retriever.idc._lookup"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._errors)
        except OSError as exc:
            raise IndexUnavailable(f"cannot start the IDC index reader: "
                                   f"{exc.strerror or exc}") from None
        return self._child

    def ask(self, line: bytes, on_row: Callable[[str, list[Any]], None] | None,
            timeout: float, folder: Path) -> tuple[object, bool]:
        """Send one request line; returns the answer's last line (None when cut short)
        and whether any line came at all."""
        child = self._child if self.alive() else self._start()
        assert child is not None and child.stdin is not None and child.stdout is not None
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            child.kill()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        answered = False
        final: object = None
        try:
            try:
                child.stdin.write(line)
                child.stdin.flush()
            except (BrokenPipeError, ValueError):
                return None, False  # it had ended (idle) or died: its stderr says why
            for raw in child.stdout:
                answered = True
                try:
                    value = json.loads(raw)
                except ValueError:
                    break
                if isinstance(value, dict):
                    final = value
                    break
                if not (isinstance(value, list) and value and isinstance(value[0], str)):
                    break
                if on_row is not None:
                    on_row(value[0], value[1:])
        finally:
            timer.cancel()
            if expired.is_set():
                self._why = f"reading the IDC index took more than {timeout:g} s"
                self.close()
            elif final is None:
                self._why = ""
                self.close()
        return final, answered

    def failure(self) -> str:
        """Why the last request got no answer (after :meth:`ask` returned None)."""
        if self._why:
            return self._why
        tail: list[str] = []
        if self._errors is not None:
            self._errors.seek(0)
            tail = self._errors.read()[-4096:].decode("utf-8", "replace").strip().splitlines()
        return "the IDC index reader failed: " + (quote(tail[-1], 200) if tail else
                                                    f"exit status {self._status}")

    def close(self) -> None:
        """End the child (it would end by itself once idle)."""
        child, self._child = self._child, None
        if child is not None:
            if child.stdin is not None:
                with contextlib.suppress(OSError):
                    child.stdin.close()
            if child.poll() is None:
                child.kill()
            self._status = child.wait()
            if child.stdout is not None:
                child.stdout.close()


class IdcIndex:
    """The IDC index in one folder (see the module docstring). Build with :meth:`open`.

    ``version`` is the IDC data release (``version_metadata_index``, else the installed
    package's major version; ``None`` when a folder does not say). ``rejected`` counts
    rows not used because a field was not plainly shaped, ``reasons`` says why (the
    first :data:`MAX_REASONS`).
    """

    def __init__(self, folder: Path, files: Mapping[str, Path], *, version: int | None,
                 optional: Sequence[str] = (), timeout: float = LOOKUP_TIMEOUT) -> None:
        self.folder = folder
        self.files = dict(files)
        self.version = version
        self.timeout = timeout
        self._current = {**_CURRENT, **{c: _CURRENT_OPTIONAL[c] for c in optional}}
        self._reader = _Reader()
        #: The digests of every SeriesInstanceUID it holds (:mod:`.uidfilter`): a UID
        #: not in it is not looked up. None: every UID is.
        self._filter: UidFilter | None = None
        self.rejected = 0
        self.reasons: list[str] = []

    def __repr__(self) -> str:
        return f"IdcIndex({str(self.folder)!r}, version={self.version!r})"

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, folder: Path | None = None, *,
             timeout: float = LOOKUP_TIMEOUT) -> IdcIndex:
        """The index in ``folder``, or the installed idc-index-data's when ``None``.

        Checks, in a child process, that every file is readable parquet with the columns
        this module reads; raises :class:`IndexUnavailable` (one line) otherwise.
        """
        installed = folder is None
        if folder is None:
            found = _package_folder()
            if found is None:
                raise IndexUnavailable("the idc-index-data package is not installed "
                                       "(pip install 'nbia-retriever[idc]', or --idc-index "
                                       "DIR)")
            folder = found
        if not folder.is_dir():
            raise IndexUnavailable(f"{folder}: not a folder")
        if not _installed("duckdb"):
            raise IndexUnavailable("reading the IDC index needs duckdb "
                                   "(pip install 'nbia-retriever[idc]')")
        files: dict[str, Path] = {}
        for name in INDEX_FILES:
            path = folder / name
            if path.is_file():
                files[name.removesuffix(".parquet")] = path
            elif name != "version_metadata_index.parquet":
                raise IndexUnavailable(f"{path}: missing (an IDC index folder holds "
                                       f"{', '.join(INDEX_FILES[:3])})")
        from .uidfilter import UidFilter, filter_path  # (small; only when an index opens)

        cache = filter_path(files)
        known = UidFilter.load(cache) if cache is not None else None
        if known is not None and known.header.get("checked") is True:
            # This very index (same files, sizes, times) was checked and its UIDs filed:
            # no child until one of the run's series is in it (see .uidfilter).
            header = known.header
            optional = [c for c in header.get("optional", []) if c in _CURRENT_OPTIONAL]
            version = header.get("version")
            opened = cls(folder, files, version=version if isinstance(version, int) else None,
                         optional=optional, timeout=timeout)
            opened._filter = known
            return opened
        index = cls(folder, files, version=None, timeout=timeout)
        answer = index._run({"op": "schema"})
        columns: dict[str, list[str]] = answer.get("columns", {})
        for name, needed in (("idc_index", _CURRENT), ("prior_versions_index", _PRIOR),
                             ("collections_index", _COLLECTIONS)):
            have = set(columns.get(name, ()))
            for column in needed:
                if column not in have:
                    raise IndexUnavailable(f"{files[name]}: no column {column!r} (not an "
                                           "idc-index-data index file?)")
        have = set(columns.get("idc_index", ()))
        optional = [c for c in _CURRENT_OPTIONAL if c in have]
        version = _int(answer.get("version"))
        if version is None and installed:
            version = _package_release()
        opened = cls(folder, files, version=version, optional=optional, timeout=timeout)
        opened._reader = index._reader  # its child, still running, answers the lookups
        if cache is not None:
            with tempfile.TemporaryDirectory() as scratch:
                words = Path(scratch) / "uids.bin"
                opened._run({"op": "uids", "out": str(words)})
                opened._filter = UidFilter.from_words(
                    words, {"checked": True, "version": version, "optional": optional})
            if opened._filter is not None:
                opened._filter.save(cache)
        return opened

    def release(self) -> None:
        """End the reader child now: a run's index work is done (its RSS would count
        beside the download's until it idled out)."""
        with self._reader.lock:
            self._reader.close()

    # -- the child ----------------------------------------------------------------------------
    def _run(self, request: dict[str, Any],
             on_row: Callable[[str, list[Any]], None] | None = None) -> dict[str, Any]:
        """One request to :mod:`._lookup` in a child process: each row of its answer goes
        to ``on_row`` as it arrives (so neither side holds the whole answer), and its last
        line is returned. :class:`IndexUnavailable` names the file a failure concerns.
        The child of the previous request answers if it still runs; one that ended
        before reading this request (idle) is replaced once."""
        request = {**request, "files": {k: str(v) for k, v in self.files.items()},
                   "current": self._current, "prior": _PRIOR}
        line = (json.dumps(request) + "\n").encode()
        with self._reader.lock:
            reused = self._reader.alive()
            final, answered = self._reader.ask(line, on_row, self.timeout, self.folder)
            if final is None and not answered and reused:
                final, answered = self._reader.ask(line, on_row, self.timeout, self.folder)
            if not isinstance(final, dict):
                why = self._reader.failure()
                raise IndexUnavailable(f"{self.folder}: {why}")
        if "error" in final:
            where = self.files.get(str(final.get("file") or ""), self.folder)
            raise IndexUnavailable(f"{where}: {quote(str(final['error']), 200)}")
        return final

    # -- lookups ------------------------------------------------------------------------------
    def by_series_uid(self, uids: Iterable[str]) -> dict[str, IdcSeries]:
        """The series of ``uids`` IDC holds: the current version (``idc_index``); for a
        UID only ``prior_versions_index`` has (a removed series), its last version."""
        keys = {u: u for u in uids if is_valid_uid(u)}  # the caller's own strings, shared
        if self._filter is not None:
            may = self._filter.may_hold
            keys = {u: u for u in keys if may(u)}
        if not keys:
            return {}  # (with the filter: no child was started)
        found: dict[str, IdcSeries] = {}
        latest: dict[str, IdcSeries] = {}
        shared: dict[str, str] = {}

        def take(tag: str, row: list[Any]) -> None:
            series = self._series(row, tag != "p", shared, keys)
            if series is None or series.series_uid not in keys:
                return
            if tag == "c":
                self._keep(found, series.series_uid, series)
            elif tag == "p" and series.series_uid not in found:
                kept = latest.get(series.series_uid)
                if kept is None or series.version > kept.version:
                    latest[series.series_uid] = series

        self._run({"op": "series", "keys": list(keys)}, take)
        for uid, series in latest.items():
            found.setdefault(uid, series)
        return found

    def by_crdc_uuid(self, uuids: Iterable[str]) -> dict[str, IdcSeries]:
        """The series versions of ``uuids`` (``crdc_series_uuid``): from ``idc_index``,
        else ``prior_versions_index`` (an older version: ``current`` is False)."""
        keys = {u: u for u in uuids if is_crdc_uuid(u)}
        if not keys:
            return {}
        found: dict[str, IdcSeries] = {}
        older: dict[str, IdcSeries] = {}
        context: dict[str, IdcSeries] = {}
        shared: dict[str, str] = {}

        def take(tag: str, row: list[Any]) -> None:
            series = self._series(row, tag != "p", shared, None)
            if series is None:
                return
            uuid = series.crdc_series_uuid
            if tag == "c" and uuid in keys:
                self._keep(found, uuid, series)
            elif tag == "p" and uuid in keys and uuid not in found:
                kept = older.get(uuid)
                # one version on several rows (it moved buckets): the last bucket serves it
                if kept is None or series.version > kept.version:
                    older[uuid] = series
            elif tag == "x":
                context[series.series_uid] = series

        self._run({"op": "uuids", "keys": list(keys)}, take)
        for uuid, series in older.items():
            now = context.get(series.series_uid)
            found.setdefault(uuid, series if now is None else _with_metadata_of(series, now))
        return found

    def _keep(self, found: dict[str, IdcSeries], key: str, series: IdcSeries) -> None:
        if key in found:
            self._reject("idc_index", key, "listed twice")
            return
        found[key] = series

    def _reject(self, file: str, what: str, why: str) -> None:
        self.rejected += 1
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"{self.files.get(file, file)}: {quote(what, 80)}: {why}; "
                                "not used")

    def _series(self, row: list[Any], current: bool, shared: dict[str, str],
                keys: Mapping[str, str] | None) -> IdcSeries | None:
        """One row of the child's answer as a validated :class:`IdcSeries`, or None
        (counted in :attr:`rejected`; see the module docstring). Repeated text (a
        collection, a study's fields) is one string object for all its series."""
        file = "idc_index" if current else "prior_versions_index"
        columns = self._current if current else _PRIOR
        if len(row) != len(columns) + 1:  # + the collection's name
            self._reject(file, "a row", "not the columns asked for")
            return None
        value = dict(zip(columns, row, strict=False))
        uid = value["SeriesInstanceUID"]
        uuid = value["crdc_series_uuid"]
        bucket = value["aws_bucket"]
        name = uid if isinstance(uid, str) else repr(uid)
        if not isinstance(uid, str) or not is_valid_uid(uid):
            self._reject(file, name, "SeriesInstanceUID is not a DICOM UID")
            return None
        if not isinstance(uuid, str) or not is_crdc_uuid(uuid):
            self._reject(file, name, f"crdc_series_uuid {quote(str(uuid), 60)!r} is not "
                                     "a lower-case UUID")
            return None
        if not isinstance(bucket, str) or not is_s3_bucket(bucket):
            self._reject(file, name, f"aws_bucket {quote(str(bucket), 70)!r} is not a "
                                     "bucket name")
            return None
        count: int | None = None
        if current:
            count = _int(value["instanceCount"])
            if count is None or count <= 0:
                self._reject(file, name, "no instanceCount")
                return None
            version = _int(value["series_revised_idc_version"])
        else:
            version = _int(value["max_idc_version"])

        def text(column: str) -> str:
            got = _text(value.get(column))
            return shared.setdefault(got, got)

        collection_id = text("collection_id")
        collection = _text(row[-1])
        return IdcSeries(
            series_uid=keys.get(uid, uid) if keys is not None else uid,
            crdc_series_uuid=uuid, bucket=shared.setdefault(bucket, bucket),
            version=version if version is not None and version >= 0 else 0,
            current=current, collection_id=collection_id,
            collection=shared.setdefault(collection, collection) or collection_id,
            patient_id=text("PatientID"), study_uid=text("StudyInstanceUID"),
            study_date=text("StudyDate"), study_description=text("StudyDescription"),
            series_description=text("SeriesDescription"), series_number=text("SeriesNumber"),
            modality=text("Modality"), instance_count=count,
            size_bytes=_size(value["series_size_MB"]),
            license_short_name=text("license_short_name"), manufacturer=text("Manufacturer"),
            body_part=text("BodyPartExamined"), sop_class_uid=text("SOPClassUID"),
            sop_class_name=text("sop_class_name"), doi=text("source_DOI"),
            analysis=text("analysis_result_id"),
        )


def _with_metadata_of(old: IdcSeries, now: IdcSeries) -> IdcSeries:
    """A prior version with the descriptive metadata of the series' current row (the
    prior index carries only its IDs, modality and size): the folder it lands in is the
    one the series has. Where, which version and how big stay the old version's."""
    return IdcSeries(
        series_uid=old.series_uid, crdc_series_uuid=old.crdc_series_uuid, bucket=old.bucket,
        version=old.version, current=False, collection_id=old.collection_id or now.collection_id,
        collection=old.collection or now.collection, patient_id=old.patient_id or now.patient_id,
        study_uid=old.study_uid or now.study_uid, study_date=now.study_date,
        study_description=now.study_description, series_description=now.series_description,
        series_number=now.series_number, modality=old.modality or now.modality,
        instance_count=None, size_bytes=old.size_bytes,
        license_short_name=now.license_short_name, manufacturer=now.manufacturer,
        body_part=now.body_part, sop_class_uid=now.sop_class_uid,
        sop_class_name=now.sop_class_name, doi=now.doi, analysis=now.analysis,
    )


def resolve_manifest(manifest: Manifest, index: IdcIndex) -> Resolved:
    """The SeriesInstanceUIDs an ``.s5cmd`` manifest names, each pinned to the version
    its uuid names; its bare UID lines too (the current version, as anywhere). Any other
    manifest comes back as its UIDs, and the index is not read."""
    if not manifest.crdc_uuids:
        return Resolved(list(manifest.series_uids), {}, [])
    versions = index.by_crdc_uuid(manifest.crdc_uuids)
    uids: dict[str, None] = {}
    pinned: dict[str, IdcSeries] = {}
    unknown: list[str] = []
    dropped: list[str] = []
    for uuid in manifest.crdc_uuids:
        series = versions.get(uuid)
        if series is None:
            unknown.append(uuid)
        elif series.series_uid in pinned:
            dropped.append(uuid)
        else:
            pinned[series.series_uid] = series
            uids[series.series_uid] = None
    uids.update(dict.fromkeys(manifest.series_uids))
    return Resolved(list(uids), pinned, unknown, dropped)

