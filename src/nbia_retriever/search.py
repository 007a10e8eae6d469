"""Finding series and managing selections: search, carts, manifest merge/info, shard reports.

The portal is the usual way to build a cart, but people on a cluster (or in a notebook)
want "all CT series of collection X" as a file without a browser, and want to combine,
inspect and check the results of their downloads. Everything here is a thin layer over
:class:`~nbia_retriever.api.NbiaClient`, the manifest reader/writer and the journals, so
what a search writes is exactly what ``download`` reads.

* :func:`collections`, :func:`search_series`, :func:`to_dataframe`, :func:`write_cart`,
  :func:`write_csv`: query the server, keep the selection.
* :func:`merge_manifests`, :func:`manifest_summary`: combine and describe manifests.
* :func:`merge_reports`: after a sharded download (``download --shard K/N`` on many
  nodes into one destination) check that the journals and ``metadata.csv`` add up, clean
  the CSV, and list every series that is still missing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .api import DEFAULT_API_URL, NbiaClient
from .errors import AuthError, ManifestError, NbiaError, NotPublicError, TlsError
from .errors import MissingDependencyError as MissingDependencyError  # re-export
from .manifest import (
    _STANDARD_KEYS,
    DEFAULT_DOWNLOAD_URL,
    api_base_from_download_url,
    read_manifest,
    write_manifest,
)
from .models import (
    ALIASES,
    INFO_FIELDS,
    SeriesInfo,
    SeriesState,
    is_file_uid,
    normalise_series_metadata,
)
from .ondisk import STATE_DIR, atomic_write_text, check_regular
from .report import (
    CSV_NEWLINE,
    FILES_CSV,
    METADATA_HEADER,
    FilesCsv,
    files_row,
    item_label,
    metadata_row,
)
from .session import open_session, resolve_server

__all__ = [
    "CSV_COLUMNS",
    "MergeReport",
    "MissingDependencyError",
    "MissingSeries",
    "collections",
    "download_url_for",
    "find_root",
    "manifest_summary",
    "merge_manifests",
    "merge_reports",
    "search_series",
    "to_dataframe",
    "write_cart",
    "write_csv",
]

#: The part of an API URL that the DownloadServlet path replaces (and vice versa).
_API_MARKER = "/nbia-api/services"
_SERVLET = "/nbia-download/servlet/DownloadServlet"
#: getSeries parameters every NBIA version knows; the others may be refused or ignored.
_CORE_PARAMS = ("Collection", "PatientID", "StudyInstanceUID", "Modality")

#: search_series keyword -> (getSeries parameter, SeriesInfo attribute).
FILTERS: dict[str, tuple[str, str]] = {
    "collection": ("Collection", "collection"),
    "patient": ("PatientID", "patient_id"),
    "study": ("StudyInstanceUID", "study_uid"),
    "modality": ("Modality", "modality"),
    "body_part": ("BodyPartExamined", "body_part"),
    "manufacturer": ("Manufacturer", "manufacturer"),
}

#: Columns of :func:`write_csv`: getSeries' own names, so the file reads like the API's
#: answer and ``download`` accepts it as a manifest (it has a SeriesInstanceUID column).
CSV_COLUMNS: tuple[tuple[str, str], ...] = (
    ("SeriesInstanceUID", "series_uid"),
    ("Collection", "collection"),
    ("PatientID", "patient_id"),
    ("StudyInstanceUID", "study_uid"),
    ("StudyDate", "study_date"),
    ("StudyDescription", "study_description"),
    ("SeriesNumber", "series_number"),
    ("SeriesDescription", "series_description"),
    ("Modality", "modality"),
    ("BodyPartExamined", "body_part"),
    ("Manufacturer", "manufacturer"),
    ("ImageCount", "image_count"),
    ("FileSize", "file_size"),
    ("LicenseName", "license_name"),
)


# ------------------------------------------------------------------------------- clients


@contextlib.contextmanager
def _client(api_url: str | None, client: NbiaClient | None,
            options: Mapping[str, Any]) -> Iterator[NbiaClient]:
    """The caller's client as is, or a fresh one closed on exit (its pool is per call)."""
    if client is not None:
        yield client
        return
    with NbiaClient(resolve_server(None, api_url), **options) as fresh:
        yield fresh


def download_url_for(api_url: str | None) -> str:
    """The DownloadServlet URL a manifest must carry for the server behind ``api_url``.

    Inverse of :func:`~nbia_retriever.manifest.api_base_from_download_url`: the Java
    retriever and our ``download`` both derive the API from ``downloadServerUrl``. The
    public TCIA API maps to the URL the TCIA portal writes, since its API host
    (``services.``) is not the host the portal's manifests name.
    """

    if not api_url or api_url.rstrip("/") == DEFAULT_API_URL:
        return DEFAULT_DOWNLOAD_URL
    text = api_url.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise NbiaError(f"API URL {text!r} is not an http(s) URL with a host")
    host = parts.netloc.rpartition("@")[2]  # never copy credentials into a file
    path = parts.path
    index = path.lower().find(_API_MARKER)
    prefix = path[:index].rstrip("/") if index >= 0 else ""
    return f"{parts.scheme.lower()}://{host}{prefix}{_SERVLET}"


# ------------------------------------------------------------------------------- queries


def collections(api_url: str | None = None, *, counts: bool = False,
                client: NbiaClient | None = None, workers: int = 4,
                **client_options: Any) -> list[dict[str, Any]]:
    """Every collection the server shows us, sorted by name.

    Each item is ``{"collection": name}``; with ``counts`` also ``patients``,
    ``series``, ``images`` and ``size`` (bytes), which cost two requests per collection
    (getPatient and getSeries), run ``workers`` at a time to stay polite. A count the
    server refuses is ``None``. A count the server does not answer (after the client's
    retries: an error status, an HTML page, a broken connection) is ``None`` too, and the
    item then carries ``"error"``, one line saying which call failed and why: one broken
    collection must not hide the others. A failed login or TLS check still raises.
    ``client_options`` go to :class:`~nbia_retriever.api.NbiaClient` (``version``,
    ``credentials``, ``timeout``, ``verify``).
    """
    with _client(api_url, client, client_options) as api:
        names = sorted(set(api.collections()), key=str.casefold)
        items: list[dict[str, Any]] = [{"collection": name} for name in names]
        if not counts or not items:
            return items

        def failed(item: dict[str, Any], call: str, exc: NbiaError) -> None:
            # Each reason once: the client's message may name the call already, and
            # both calls of a collection usually fail for the same reason.
            reason = " ".join(str(exc).split())
            if reason.startswith(f"{call}: "):
                reason = reason[len(call) + 2:]
            calls = item.setdefault("_reasons", {})
            calls.setdefault(reason, []).append(call)
            item["error"] = "; ".join(f"{', '.join(names)}: {why}"
                                      for why, names in calls.items())

        def count(item: dict[str, Any]) -> dict[str, Any]:
            name = item["collection"]
            try:
                patients = api.query("getPatient", Collection=name)
                ids = {str(p.get("PatientId") or p.get("PatientID") or "") for p in patients}
                item["patients"] = len(ids - {""}) or len(patients)
            except NotPublicError:
                item["patients"] = None
            except (AuthError, TlsError):
                raise
            except NbiaError as exc:
                item["patients"] = None
                failed(item, "getPatient", exc)
            try:
                series = [normalise_series_metadata(r) for r in
                          api.series(Collection=name)]
            except NotPublicError:
                item.update(series=None, images=None, size=None)
                return item
            except (AuthError, TlsError):
                raise
            except NbiaError as exc:
                item.update(series=None, images=None, size=None)
                failed(item, "getSeries", exc)
                return item
            item["series"] = len(series)
            item["images"] = _total(s.image_count for s in series)
            item["size"] = _total(s.file_size for s in series)
            return item

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as pool:
            counted = list(pool.map(count, items))
        for item in counted:
            item.pop("_reasons", None)
        return counted


def _total(values: Iterable[int | None]) -> int | None:
    """Sum of known values; ``None`` when the server gave none at all."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _alias_keys(attribute: str) -> set[str]:
    return {re.sub(r"[^a-z0-9]", "", name.lower()) for name in ALIASES.get(attribute, ())}


def _carried(record: Mapping[str, object], attribute: str) -> bool:
    """Whether a raw record has a field for ``attribute`` at all (even an empty one)."""
    keys = _alias_keys(attribute)
    return any(re.sub(r"[^a-z0-9]", "", str(k).lower()) in keys for k in record)


def search_series(
    api_url: str | None = None,
    *,
    collection: str | None = None,
    patient: str | None = None,
    study: str | None = None,
    modality: str | None = None,
    body_part: str | None = None,
    manufacturer: str | None = None,
    client: NbiaClient | None = None,
    **client_options: Any,
) -> list[SeriesInfo]:
    """Series matching every given filter (getSeries), as :class:`SeriesInfo`, sorted.

    Filters are exact and case-insensitive. They are sent to the server, and applied
    again here to every record that carries the field, because servers differ: some
    ignore ``BodyPartExamined``/``Manufacturer``, v4 refuses parameters it does not know
    (then we ask with the core parameters only and filter the answer ourselves), and a
    server that compares names with their case gets, when it finds nothing, the
    collection's name as its own getCollectionValues spells it (``lidc-idri`` ->
    ``LIDC-IDRI``). At
    least one filter is required: the unfiltered list of a real archive is millions of
    series. ``image_count`` and ``file_size`` come from getSeries' ImageCount/FileSize.
    """
    given = {name: value.strip() for name, value in {
        "collection": collection, "patient": patient, "study": study,
        "modality": modality, "body_part": body_part, "manufacturer": manufacturer,
    }.items() if value and value.strip()}
    if not given:
        raise ValueError("give at least one filter (collection, patient, study, modality, "
                         "body_part or manufacturer)")
    params = {FILTERS[name][0]: value for name, value in given.items()}
    with _client(api_url, client, client_options) as api:
        refused: NotPublicError | None = None
        try:
            raw = _series_query(api, params)
        except NotPublicError as exc:  # "No Data": perhaps only the case of the name
            raw, refused = [], exc
        if not raw and "Collection" in params:
            wanted = params["Collection"].casefold()
            try:
                names = api.collections()
            except (AuthError, TlsError):
                raise
            except NbiaError:
                names = []  # the first answer stands
            spelled = [n for n in names if n.casefold() == wanted and n != params["Collection"]]
            if spelled:
                raw, refused = _series_query(api, {**params, "Collection": spelled[0]}), None
        if refused is not None:
            raise refused
    found: dict[str, SeriesInfo] = {}
    for record in raw:
        info = normalise_series_metadata(record)
        if not info.series_uid or info.series_uid in found:
            continue
        if all(getattr(info, FILTERS[name][1]).casefold() == value.casefold()
               for name, value in given.items() if _carried(record, FILTERS[name][1])):
            found[info.series_uid] = info
    return sorted(found.values(), key=lambda s: (s.collection, s.patient_id, s.study_uid,
                                                 _number(s.series_number), s.series_uid))


def _series_query(api: NbiaClient, params: Mapping[str, str]) -> list[dict[str, Any]]:
    """getSeries with every filter, or with the core ones when the server refuses the
    others (v4 knows no BodyPartExamined on some builds)."""
    try:
        return api.series(**params)
    except NotPublicError:
        core = {k: v for k, v in params.items() if k in _CORE_PARAMS}
        if core == params or not core:
            raise
        return api.series(**core)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return float("inf")


# ----------------------------------------------------------------------------- outputs


def _uids(records: Iterable[SeriesInfo | Mapping[str, Any] | str]) -> list[str]:
    uids: list[str] = []
    for record in records:
        if isinstance(record, str):
            uids.append(record)
        elif isinstance(record, SeriesInfo):
            uids.append(record.series_uid)
        else:
            uids.append(normalise_series_metadata(record).series_uid)
    return uids


def write_cart(records: Iterable[SeriesInfo | Mapping[str, Any] | str],
               path: str | os.PathLike[str], api_url: str | None = None) -> Path:
    """Write the selection as a ``.tcia`` manifest (v3.0) for the server behind ``api_url``.

    Both our ``download`` and the Java retriever accept it: ``downloadServerUrl`` is
    derived from the API URL (:func:`download_url_for`), ``databasketId`` is the file
    name, so the download lands in a folder named like the file.
    """

    uids = _uids(records)
    if not uids:
        raise ManifestError("no series to write (the search found nothing)", source=str(path))
    return write_manifest(path, uids, download_server_url=download_url_for(api_url))


#: The column of :func:`write_csv` that names the server the rows came from, under the
#: ``.tcia`` header's own name: a column (not a comment line) so that csv.DictReader,
#: pandas and spreadsheets read the file as before.
CSV_SERVER_COLUMN = "downloadServerUrl"


def write_csv(records: Iterable[SeriesInfo], path: str | os.PathLike[str],
              api_url: str | None = None) -> Path:
    """The selection as CSV with getSeries' column names (:data:`CSV_COLUMNS`) and a
    last column, :data:`CSV_SERVER_COLUMN`, naming the server it came from (the
    DownloadServlet URL a ``.tcia`` of that server carries: :func:`download_url_for`).

    It has a ``SeriesInstanceUID`` column, so ``download FILE`` reads it as a manifest
    too. Written atomically.
    """
    server = download_url_for(api_url)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*(name for name, _ in CSV_COLUMNS), CSV_SERVER_COLUMN])
    for info in records:
        writer.writerow([*("" if (v := getattr(info, attr)) is None else v
                           for _, attr in CSV_COLUMNS), server])
    return _atomic_write(Path(path), buf.getvalue())


def to_dataframe(records: Iterable[SeriesInfo]) -> Any:
    """A pandas DataFrame, one row per series, columns named as :class:`SeriesInfo`'s.

    pandas is optional (not a dependency of the downloader); without it this raises
    :class:`MissingDependencyError`, an ``ImportError`` saying what to install.
    """
    try:
        import pandas  # optional, and slow to import: only when a frame is asked for
    except ImportError:
        raise MissingDependencyError(
            "to_dataframe needs pandas, which is not installed: pip install pandas"
        ) from None
    columns = list(INFO_FIELDS)
    rows = [dict(zip(columns, r.values(), strict=True)) for r in records]
    return pandas.DataFrame(rows, columns=columns)


def _atomic_write(path: Path, text: str) -> Path:

    try:
        return atomic_write_text(path, text, newline="")
    except OSError as exc:
        raise NbiaError(f"{path}: cannot write: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------- manifests


def _server_key(url: str | None) -> str | None:
    """Two download URLs name the same server when they give the same API base."""
    if not url:
        return None

    try:
        return api_base_from_download_url(url).lower()
    except NbiaError:
        return url.strip().lower()


def merge_manifests(sources: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
                    *, force: bool = False) -> tuple[Path, int, int]:
    """Union of manifests, first-seen order, duplicates dropped, written to ``out``.

    Headers come from the first manifest (``databasketId`` excepted: it follows ``out``'s
    name, so the merged download gets its own root folder and journal). Manifests that
    name different servers are refused unless ``force`` (the first one's server is
    then kept): a download talks to one server, so series of the other would all fail
    as unknown. Spreadsheets and plain lists name no server and merge with anything.
    Returns ``(path, series written, duplicates dropped)``.
    """

    if not sources:
        raise ManifestError("no manifests to merge", source=str(out))
    manifests = [read_manifest(s) for s in sources]
    server: tuple[str, str] | None = None  # (key, source) of the first named server
    for m in manifests:
        key = _server_key(m.download_server_url)
        if key is None:
            continue
        if server is None:
            server = (key, m.source or "?")
        elif key != server[0] and not force:
            first = next(x for x in manifests if _server_key(x.download_server_url))
            raise ManifestError(
                f"points at {m.download_server_url} but {first.source} points at "
                f"{first.download_server_url}; a download uses one server (use --force to "
                "merge anyway, keeping the first server)", source=m.source)
    seen: dict[str, None] = {}
    total = 0
    for m in manifests:
        total += len(m.series_uids)
        for uid in m.series_uids:
            seen.setdefault(uid, None)
    head = manifests[0]
    url = next((m.download_server_url for m in manifests if m.download_server_url),
               None) or DEFAULT_DOWNLOAD_URL
    standard = {k.casefold() for k in _STANDARD_KEYS}
    extra = {k: v for k, v in head.headers.items() if k.strip().casefold() not in standard}
    path = write_manifest(out, seen, download_server_url=url,
                          include_annotation=head.include_annotation, retries=head.retries,
                          extra_headers=extra)
    return path, len(seen), total - len(seen)


def manifest_summary(path: str | os.PathLike[str], *, offline: bool = False,
                     api_url: str | None = None, client: NbiaClient | None = None,
                     **client_options: Any) -> dict[str, Any]:
    """What a manifest holds: its headers, and unless ``offline``, what the server says
    about its series (per collection counts, images, bytes, series not available).

    The server is ``api_url``, else the one the manifest names, else the public TCIA API.
    """

    manifest = read_manifest(path)
    summary: dict[str, Any] = {
        "file": str(path),
        "kind": manifest.kind,
        "series": len(manifest.series_uids),
        "duplicates_dropped": manifest.duplicates_dropped,
        "download_server_url": manifest.download_server_url,
        "databasket_id": manifest.databasket_id,
        "root_name": manifest.root_name,
        "manifest_version": manifest.version,
        "retries": manifest.retries,
        "include_annotation": manifest.include_annotation,
    }
    if offline:
        return summary
    session = open_session(manifest, api_url=api_url)
    if api_url is None and client is None and "policy" not in client_options:
        # The manifest's server is its claim, not the caller's choice: no password to it
        # unless the caller's config trusts it.
        client_options["policy"] = session.policy
    with _client(session.api_url, client, client_options) as api:
        infos = api.series_metadata(list(manifest.series_uids))
        summary["api_url"] = api.api_url
    per: dict[str, dict[str, int]] = {}
    for info in infos.values():
        row = per.setdefault(info.collection or "(unknown)",
                             {"series": 0, "images": 0, "size": 0})
        row["series"] += 1
        row["images"] += info.image_count or 0
        row["size"] += info.file_size or 0
    summary["collections"] = dict(sorted(per.items(), key=lambda kv: kv[0].casefold()))
    summary["images"] = sum(r["images"] for r in per.values())
    summary["size"] = sum(r["size"] for r in per.values())
    summary["not_available"] = [u for u in manifest.series_uids if u not in infos]
    return summary


# ------------------------------------------------------------------------- shard reports

_JOURNAL_RE = re.compile(r"^journal(?:-(\d+)-of-(\d+))?\.sqlite$")


@dataclass
class MissingSeries:
    """A series that is not complete on disk, and what the journals know about it."""

    uid: str
    state: str  # journal state, or "Not Started" when no journal has it
    error: str = ""
    shard: str = ""  # "K/N" when the download was sharded


@dataclass
class MergeReport:
    """The outcome of :func:`merge_reports`; ``ok`` is what the exit code reflects."""

    root: Path
    expected: int = 0
    complete: int = 0
    journals: list[str] = field(default_factory=list)
    missing: list[MissingSeries] = field(default_factory=list)
    #: series complete in two journals with different folders, or two series claiming one
    #: folder: a shard overwrote another's work, or two runs disagree.
    conflicts: list[str] = field(default_factory=list)
    csv_rows: int = 0
    csv_duplicates: int = 0
    csv_headers_removed: int = 0
    csv_bad_lines: int = 0
    csv_added: int = 0
    csv_rewritten: bool = False
    #: files.csv rows of complete file items (issue 24) written again from the journals.
    files_added: int = 0
    #: One line per journal whose rows named folders outside the root: those series are
    #: not taken as complete (and their folders never named).
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.conflicts

    def summary(self) -> str:
        lines = [f"{self.complete} of {self.expected} series complete "
                 f"({len(self.journals)} journal(s) in {self.root})"]
        fixes = [f"{n} {what}" for n, what in (
            (self.csv_duplicates, "duplicate rows dropped"),
            (self.csv_headers_removed, "repeated headers dropped"),
            (self.csv_bad_lines, "malformed lines dropped"),
            (self.csv_added, "rows added from the journals"),
        ) if n]
        state = "rewritten" if self.csv_rewritten else ("needs fixing" if fixes else "clean")
        lines.append(f"metadata.csv: {self.csv_rows} rows, {state}"
                     + (f" ({', '.join(fixes)})" if fixes else ""))
        if self.files_added:
            lines.append(f"{FILES_CSV}: {self.files_added} rows added from the journals")
        if self.conflicts:
            lines.append(f"{len(self.conflicts)} conflict(s)")
        if self.missing:
            lines.append(f"{len(self.missing)} series missing: re-run the same download "
                         "command(s) to resume them")
        return "\n".join(lines)


def find_root(path: str | os.PathLike[str], manifest_root_name: str | None = None) -> Path:
    """The download root (the folder holding ``.nbia/``) given it or its destination:
    :func:`nbia_retriever.verify.find_download_root` (AmbiguousRootError lists the
    roots of a destination that holds several)."""
    from .verify import find_download_root  # the journal code only for merge-reports

    return find_download_root(path, manifest_root_name)


def merge_reports(root: str | os.PathLike[str], *,
                  manifest: str | os.PathLike[str] | None = None,
                  fix: bool = True) -> MergeReport:
    """Check a (sharded) download root: journals, folders and ``metadata.csv`` together.

    Every shard appends to the one ``<root>/metadata.csv``. Whole-line appends are safe,
    but two processes can both see an empty file and both write the header, and a crash
    between a journal commit and the CSV append loses a row; so the rows are re-read,
    repeated headers, malformed lines and duplicate Series UIDs dropped (first kept), rows
    of complete series that are missing are rebuilt from the journals, and with ``fix``
    the file is rewritten atomically (only if anything changed).

    A series is complete when some journal says so and its folder exists. The expected
    series are the manifest's when given, else every series any journal knows.
    """
    # The engine (and sqlite3) only for merge-reports: search, collections and manifest
    # commands never load it.
    from .engine import shard_of
    from .engine.journal import Journal, JournalEntry

    parsed = read_manifest(manifest) if manifest is not None else None
    base = find_root(root, parsed.root_name if parsed else None)
    result = MergeReport(root=base)
    journal_paths = sorted((base / STATE_DIR).glob("journal*.sqlite"))
    shard_counts: set[int] = set()
    entries: dict[str, list[tuple[str, JournalEntry]]] = {}
    for path in journal_paths:
        match = _JOURNAL_RE.match(path.name)
        if not match:
            continue
        if match.group(2):
            shard_counts.add(int(match.group(2)))
        result.journals.append(path.name)
        with Journal(path, readonly=True) as journal:
            for entry in journal.entries():
                entries.setdefault(entry.uid, []).append((path.name, entry))
            message = journal.refused_message()
            if message:
                result.warnings.append(message)
    if not result.journals and parsed is None:
        raise NbiaError(f"{base}: no journals in {STATE_DIR}/ and no --manifest given")

    expected = list(parsed.keys) if parsed else list(entries)
    result.expected = len(expected)
    count = next(iter(shard_counts)) if len(shard_counts) == 1 else None

    # Which folder each complete series lives in, and who else claims it.
    done: dict[str, JournalEntry] = {}
    owners: dict[str, str] = {}
    for uid, found in entries.items():
        complete = [(name, e) for name, e in found if e.state == SeriesState.COMPLETE]
        folders = {e.relpath for _, e in complete}
        if len(folders) > 1:
            result.conflicts.append(
                f"series {uid} is complete in {len(folders)} folders ("
                + ", ".join(f"{name}: {e.relpath}" for name, e in complete) + ")")
        for _, e in complete:
            other = owners.setdefault(e.relpath, uid)
            if other != uid:
                result.conflicts.append(
                    f"series {uid} and {other} both claim the folder {e.relpath}: one "
                    "overwrote the other")
            elif _published(base, e):
                done.setdefault(uid, e)
    for uid in expected:
        if uid in done:
            result.complete += 1
            continue
        found = entries.get(uid, [])
        if found:
            _, entry = max(found, key=lambda item: item[1].attempts)
            state = entry.state
            error = entry.last_error
            if state == SeriesState.COMPLETE:
                state, error = "Folder missing", f"{entry.relpath} is not on disk"
                if is_file_uid(uid):
                    state = "File missing"
            if is_file_uid(uid) and entry.info is not None:  # named as people know it
                error = f"{item_label(uid, entry.info)}: {error}" if error \
                    else item_label(uid, entry.info)
        else:
            state = SeriesState.NOT_STARTED
            error = ("in no journal: did this shard's job run?" if count
                     else "in no journal: not yet part of a download into this root")
        shard = f"{shard_of(uid, count)}/{count}" if count else ""
        result.missing.append(MissingSeries(uid, state, error, shard))

    _merge_csv(base / "metadata.csv", done, result, fix=fix)
    _merge_files_csv(base, done, result, fix=fix)
    return result


def _published(base: Path, entry: Any) -> bool:
    """A complete row's series folder is there; a file item's (issue 24) file is, as a
    regular file (a link is no file of ours)."""
    path: Path = base / entry.relpath
    if not is_file_uid(entry.uid):
        return path.is_dir()
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _merge_files_csv(base: Path, done: Mapping[str, Any], result: MergeReport, *,
                     fix: bool) -> None:
    """files.csv rows of complete file items that it lacks, from the journals (appended
    like the engine's: the file is never rewritten)."""
    items = {uid: e for uid, e in done.items()
             if is_file_uid(uid) and e.info is not None and e.files}
    if not items:
        return
    table = FilesCsv(base / FILES_CSV)
    owed = [files_row(e.info, uid, "./" + e.relpath, e.files[0].name, e.files[0].size,
                      e.files[0].md5, e.completed)
            for uid, e in items.items() if uid not in table]
    result.files_added = len(owed)
    if owed and fix:
        table.append_many(owed)


def _merge_csv(path: Path, done: Mapping[str, Any], result: MergeReport, *, fix: bool) -> None:

    rows: list[list[str]] = []
    seen: set[str] = set()
    changed = False
    check_regular(path)  # no link, FIFO or device: a FIFO blocks the read, /dev/zero never ends
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise NbiaError(f"{path}: cannot read: {exc}") from None
        reader = csv.reader(io.StringIO(text, newline=""))
        first = True
        for row in reader:
            if not row:
                continue
            if list(row) == list(METADATA_HEADER):
                if not first:
                    result.csv_headers_removed += 1
                    changed = True
                first = False
                continue
            if first:  # the header itself was lost: the rewrite restores it
                changed = True
            first = False
            if len(row) != len(METADATA_HEADER) or not row[0]:
                result.csv_bad_lines += 1
                changed = True
                continue
            if row[0] in seen:
                result.csv_duplicates += 1
                changed = True
                continue
            seen.add(row[0])
            rows.append(row)
    for uid, entry in done.items():
        if uid in seen or entry.info is None or is_file_uid(uid):  # files.csv's
            continue
        images = sum(1 for f in entry.files if f.name.lower().endswith(".dcm"))
        rows.append(metadata_row(entry.info, "./" + entry.relpath, entry.completed,
                             images=images, size=entry.bytes))
        seen.add(uid)
        result.csv_added += 1
        changed = True
    result.csv_rows = len(rows)
    if changed and fix and (rows or path.exists()):

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator=CSV_NEWLINE)
        writer.writerow(METADATA_HEADER)
        writer.writerows(rows)
        _atomic_write(path, buf.getvalue())
        result.csv_rewritten = True

