"""The synthetic archive as Imaging Data Commons holds it: buckets, keys, ETags, index files.

IDC keeps a copy of most public TCIA series in public S3 buckets (reference section 10 A):
each instance is one object ``<crdc_series_uuid>/<crdc_instance_uuid>.dcm`` whose bytes
are the DICOM file itself, and idc-index-data's parquet files map SeriesInstanceUIDs to
those uuids. Tests, the demo and the benchmark need the same thing for an archive the
reference server serves, with every value agreeing with what the NBIA endpoints say about
the same series, so that a series fetched from either source must land byte for byte in
the same place. This module derives that view, deterministically:

* ``crdc_series_uuid = uuid5(NAMESPACE_OID, "series:" + SeriesInstanceUID)`` and
  ``crdc_instance_uuid = uuid5(NAMESPACE_OID, "instance:" + SOPInstanceUID)``;
* bucket ``idc-open-data`` (``buckets=`` moves a series to another of IDC's buckets);
* an object's bytes are the archive's image file, so its MD5 (and plain ETag) is the MD5
  the NBIA server lists in ``md5hashes.csv``;
* restricted collections are left out (IDC holds public data only), and so is any series
  named in ``exclude=`` (to make a manifest whose series come from both sources);
* ``prior=`` gives series an older version: a second crdc_series_uuid
  (``uuid5(NAMESPACE_OID, "series:<uid>:prior")``) in ``prior_versions_index`` whose
  objects are served too. It holds the same instances (same instance uuids and bytes),
  so counts and MD5s check out whichever version a client fetches; only the prefix,
  hence the request log, tells them apart. The current version is then marked revised in
  ``version`` (``series_revised_idc_version``), the prior one served until ``version - 1``.

:func:`write_idc_index` writes ``idc_index.parquet``, ``collections_index.parquet`` and
``prior_versions_index.parquet`` with idc-index-data's column names and types (checked
against its ``*_schema.json`` by ``tests/test_s3_server.py``), through duckdb (an optional
dependency: imported only here, when the files are written).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from ..errors import ArchiveError
from .config import ServerConfig, load_config
from .index import ArchiveIndex, SeriesRecord
from .synth import ArchiveSummary

__all__ = [
    "DEFAULT_BUCKET",
    "DEFAULT_VERSION",
    "IDC_BUCKETS",
    "IdcObject",
    "IdcSeriesVersion",
    "IdcView",
    "collection_id",
    "crdc_instance_uuid",
    "crdc_series_uuid",
    "license_short_name",
    "list_objects",
    "write_idc_index",
]

#: IDC's S3 buckets and the GCS bucket each mirrors (reference 10 A; prior_versions_index
#: names the GCS one in ``gcs_bucket``).
IDC_BUCKETS: dict[str, str] = {
    "idc-open-data": "public-datasets-idc",
    "idc-open-data-two": "idc-open-idc1",
    "idc-open-data-cr": "idc-open-cr",
}
DEFAULT_BUCKET = "idc-open-data"
DEFAULT_VERSION = 22
#: The release in which every synthetic series "first appeared".
FIRST_VERSION = 1
INDEX_FILES = ("idc_index.parquet", "collections_index.parquet",
               "prior_versions_index.parquet")

_ArchiveLike = ArchiveIndex | ArchiveSummary | str | Path


def crdc_series_uuid(series_uid: str) -> str:
    """The current version's crdc_series_uuid of a synthetic series."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "series:" + series_uid))


def prior_series_uuid(series_uid: str) -> str:
    """The older version's crdc_series_uuid of a series given one with ``prior=``."""
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "series:" + series_uid + ":prior"))


def crdc_instance_uuid(sop_instance_uid: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_OID, "instance:" + sop_instance_uid))


def collection_id(name: str) -> str:
    """IDC's id of an NBIA collection name: ``4D-Lung`` -> ``4d_lung``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def license_short_name(license_name: str, license_url: str) -> str:
    """IDC's ``license_short_name`` for NBIA's licence: a Creative Commons URL
    ``.../licenses/by-nc/3.0/`` -> ``CC BY-NC 3.0``; anything else keeps its name."""
    match = re.search(r"creativecommons\.org/licenses/([a-z-]+)/([0-9.]+)", license_url)
    if match:
        return f"CC {match.group(1).upper()} {match.group(2)}"
    return license_name


def _iso(raw: str) -> str | None:
    """DICOM ``YYYYMMDD`` -> IDC's ``YYYY-MM-DD``; empty -> NULL."""
    if len(raw) == 8 and raw.isdigit():
        return f"{raw[:4]}-{raw[4:6]}-{raw[6:]}"
    return raw or None


def _doi(uri: str) -> str | None:
    """``https://doi.org/10.7937/X`` -> ``10.7937/x`` (IDC lower-cases its DOIs)."""
    text = re.sub(r"^https?://(dx\.)?doi\.org/", "", uri.strip(), flags=re.I)
    return text.lower() or None


@dataclass(frozen=True, slots=True)
class IdcObject:
    """One S3 object: ``path`` holds its exact bytes."""

    bucket: str
    key: str
    path: Path
    size: int
    md5: str
    series_uid: str
    crdc_series_uuid: str
    sop_instance_uid: str

    @property
    def etag(self) -> str:
        """S3's ETag of a single-part upload: the quoted MD5 of the bytes."""
        return f'"{self.md5}"'


@dataclass(frozen=True, slots=True)
class IdcSeriesVersion:
    """One version of a series in IDC (``current``: in idc_index, else prior)."""

    record: SeriesRecord
    crdc_series_uuid: str
    bucket: str
    current: bool
    min_version: int
    max_version: int
    objects: tuple[IdcObject, ...]  # key order

    @property
    def series_uid(self) -> str:
        return self.record.series_uid

    @property
    def size_bytes(self) -> int:
        return sum(o.size for o in self.objects)

    @property
    def size_mb(self) -> float:
        """``series_size_MB``: decimal megabytes, six places (bytes survive *1e6)."""
        return round(self.size_bytes / 1e6, 6)

    @property
    def aws_url(self) -> str:
        return f"s3://{self.bucket}/{self.crdc_series_uuid}/*"


class IdcView:
    """An archive as IDC would hold it; build with :meth:`build`."""

    def __init__(self, index: ArchiveIndex, config: ServerConfig, version: int,
                 current: dict[str, IdcSeriesVersion], prior: list[IdcSeriesVersion]) -> None:
        self.index = index
        self.config = config
        self.version = version
        self.current = current  # by SeriesInstanceUID
        self.prior = prior
        self.versions = [*current.values(), *prior]
        self.by_uuid = {v.crdc_series_uuid: v for v in self.versions}
        self.objects: list[IdcObject] = sorted(
            (o for v in self.versions for o in v.objects), key=lambda o: (o.bucket, o.key))

    def __repr__(self) -> str:
        return (f"IdcView({str(self.index.root)!r}, v{self.version}, "
                f"{len(self.current)} series, {len(self.prior)} prior)")

    @classmethod
    def build(
        cls,
        archive: _ArchiveLike | IdcView,
        *,
        version: int = DEFAULT_VERSION,
        prior: Iterable[str] = (),
        exclude: Iterable[str] = (),
        buckets: Mapping[str, str] | None = None,
        include_restricted: bool = False,
    ) -> IdcView:
        """The IDC view of ``archive`` (a folder, a generated archive, or its index).

        ``prior``: SeriesInstanceUIDs given an older version too; ``exclude``: series IDC
        does not hold; ``buckets``: SeriesInstanceUID -> one of :data:`IDC_BUCKETS`.
        Raises :class:`ArchiveError` for a UID not in the archive or an unknown bucket,
        so a typo in a test cannot silently test nothing.
        """
        if isinstance(archive, IdcView):
            return archive
        if version < 2:
            raise ArchiveError(f"IDC version {version}: must be at least 2 (a prior "
                               "version needs a release before it)")
        if isinstance(archive, ArchiveIndex):
            index = archive
        else:
            root = archive.root if isinstance(archive, ArchiveSummary) else Path(archive)
            index = ArchiveIndex.load(root)
        config = load_config(index.root)
        prior_set, excluded = set(prior), set(exclude)
        placed = dict(buckets or {})
        for uid in sorted(prior_set | excluded | set(placed)):
            if uid not in index.series:
                raise ArchiveError(f"{index.root}: no series {uid} in the archive")
        for uid, bucket in placed.items():
            if bucket not in IDC_BUCKETS:
                raise ArchiveError(f"series {uid}: bucket {bucket!r} is not one of IDC's "
                                   f"({', '.join(IDC_BUCKETS)})")
        current: dict[str, IdcSeriesVersion] = {}
        older: list[IdcSeriesVersion] = []
        for uid in sorted(index.series):
            record = index.series[uid]
            if uid in excluded or (config.is_restricted(record.collection)
                                   and not include_restricted):
                continue
            bucket = placed.get(uid, DEFAULT_BUCKET)
            revised = uid in prior_set
            current[uid] = _version(index, record, crdc_series_uuid(uid), bucket, True,
                                    FIRST_VERSION, version if revised else FIRST_VERSION)
            if revised:
                older.append(_version(index, record, prior_series_uuid(uid), bucket, False,
                                      FIRST_VERSION, version - 1))
        return cls(index, config, version, current, older)

    # -- the index files --------------------------------------------------------------
    def idc_index_rows(self) -> list[dict[str, object]]:
        rows: list[dict[str, object]] = []
        for v in self.current.values():
            s = v.record
            cfg = self.config.collection(s.collection)
            extra = _header_extras(self.index.image_path(s.images[0])) if s.images else {}
            sop_class = s.sop_class_uid or None
            syntax = extra.get("TransferSyntaxUID")
            rows.append({
                "collection_id": collection_id(s.collection),
                "analysis_result_id": None,
                "PatientID": s.patient_id,
                "SeriesInstanceUID": s.series_uid,
                "StudyInstanceUID": s.study_uid,
                "source_DOI": _doi(cfg.description_uri),
                "PatientAge": s.patient_age or None,
                "PatientSex": s.patient_sex or None,
                "StudyDate": _iso(s.study_date),
                "StudyDescription": s.study_description or None,
                "BodyPartExamined": s.body_part or None,
                "Modality": s.modality or None,
                "SOPClassUID": sop_class,
                "sop_class_name": UID(sop_class).name if sop_class else None,
                "TransferSyntaxUID": syntax,
                "transfer_syntax_name": UID(syntax).name if syntax else None,
                "PhotometricInterpretation": extra.get("PhotometricInterpretation"),
                "PixelRepresentation": extra.get("PixelRepresentation"),
                "Manufacturer": s.manufacturer or None,
                "ManufacturerModelName": s.manufacturer_model or None,
                "SeriesDate": _iso(s.series_date),
                "SeriesDescription": s.series_description or None,
                "SeriesNumber": s.series_number or None,
                "instanceCount": len(v.objects),
                "license_short_name": license_short_name(cfg.license_name, cfg.license_url),
                "series_init_idc_version": v.min_version,
                "series_revised_idc_version": v.max_version,
                "aws_bucket": v.bucket,
                "crdc_series_uuid": v.crdc_series_uuid,
                "series_aws_url": v.aws_url,
                "series_size_MB": v.size_mb,
            })
        return rows

    def prior_rows(self) -> list[dict[str, object]]:
        return [{
            "collection_id": collection_id(v.record.collection),
            "PatientID": v.record.patient_id,
            "SeriesInstanceUID": v.record.series_uid,
            "StudyInstanceUID": v.record.study_uid,
            "Modality": v.record.modality or None,
            "gcs_bucket": IDC_BUCKETS[v.bucket],
            "crdc_series_uuid": v.crdc_series_uuid,
            "series_size_MB": v.size_mb,
            "series_aws_url": v.aws_url,
            "aws_bucket": v.bucket,
            "min_idc_version": v.min_version,
            "max_idc_version": v.max_version,
        } for v in self.prior]

    def collection_rows(self) -> list[dict[str, object]]:
        names = sorted({v.record.collection for v in self.versions}, key=str.lower)
        rows: list[dict[str, object]] = []
        for name in names:
            cfg = self.config.collection(name)
            members = [v for v in self.current.values() if v.record.collection == name]
            modalities = ", ".join(sorted({v.record.modality for v in members
                                           if v.record.modality}))
            doi = _doi(cfg.description_uri)
            rows.append({
                "collection_name": name,
                "collection_id": collection_id(name),
                "cancer_types": "Synthetic",
                "tumor_locations": "Chest",
                "subjects": len({v.record.patient_id for v in members}),
                "species": "Human",
                "sources": [{
                    "source_id": collection_id(name),
                    "source_title": f"Data from {name}",
                    "source_type": "original_data",
                    "source_doi": doi,
                    "source_url": cfg.description_uri or None,
                    "modalities": modalities or None,
                    "license": {
                        "license_url": cfg.license_url,
                        "license_long_name": cfg.license_name,
                        "license_short_name": license_short_name(cfg.license_name,
                                                                 cfg.license_url),
                    },
                    "citation": f"Synthetic data: {name}. nbia-retriever synth.",
                    "provenance": {
                        "data_contributor": "TCIA",
                        "source_data_provider": "UNKNOWN",
                        "deidentification_party": "TCIA",
                        "dicom_conversion_by": "NOT_APPLICABLE",
                    },
                    "Access": "Public",
                    "ImageTypes": modalities or None,
                }],
                "supporting_data": None,
                "program_id": "community",
                "status": "Complete",
                "updated": cfg.date_released or None,
                "description": f"The synthetic collection {name}, generated for tests.",
            })
        return rows

    def write_index(self, folder: str | Path) -> Path:
        """Write the three parquet files into ``folder`` (created); each file appears
        whole (written beside, then renamed). Returns the folder."""
        try:
            import duckdb  # noqa: F401  (the optional 'idc' dependency; only the writer)
        except ImportError:
            raise ArchiveError("writing IDC index files needs duckdb: "
                               "pip install 'nbia-retriever[idc]'") from None
        out = Path(folder)
        for name, columns, rows in (
            ("idc_index.parquet", IDC_INDEX_COLUMNS, self.idc_index_rows()),
            ("collections_index.parquet", COLLECTIONS_COLUMNS, self.collection_rows()),
            ("prior_versions_index.parquet", PRIOR_COLUMNS, self.prior_rows()),
        ):
            try:
                out.mkdir(parents=True, exist_ok=True)
                _write_parquet(out / name, columns, rows)
            except OSError as exc:
                raise ArchiveError(f"{out / name}: cannot write: {exc.strerror or exc}"
                                   ) from None
        return out


def _version(index: ArchiveIndex, record: SeriesRecord, series_uuid: str, bucket: str,
             current: bool, first: int, last: int) -> IdcSeriesVersion:
    objects = []
    for position, image in enumerate(record.images):
        sop = image.sop_instance_uid or f"{record.series_uid}.{position + 1}"
        objects.append(IdcObject(
            bucket=bucket,
            key=f"{series_uuid}/{crdc_instance_uuid(sop)}.dcm",
            path=index.image_path(image),
            size=image.size,
            md5=image.md5,
            series_uid=record.series_uid,
            crdc_series_uuid=series_uuid,
            sop_instance_uid=sop,
        ))
    objects.sort(key=lambda o: o.key)
    return IdcSeriesVersion(record, series_uuid, bucket, current, first, last, tuple(objects))


def _header_extras(path: Path) -> dict[str, str]:
    """TransferSyntaxUID, PhotometricInterpretation and PixelRepresentation of one
    image: idc_index has them, the server's index does not (headers only, no pixels)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PhotometricInterpretation", "PixelRepresentation"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return {}
    extras: dict[str, str] = {}
    syntax = getattr(ds.file_meta, "TransferSyntaxUID", None)
    if syntax:
        extras["TransferSyntaxUID"] = str(syntax)
    for keyword in ("PhotometricInterpretation", "PixelRepresentation"):
        value = ds.get(keyword)
        if value is not None and str(value) != "":
            extras[keyword] = str(value)
    return extras


def list_objects(archive: _ArchiveLike | IdcView, **options: object) -> list[IdcObject]:
    """Every object of the archive's IDC view (``IdcView.build`` options), by bucket
    and key."""
    return IdcView.build(archive, **options).objects  # type: ignore[arg-type]


def write_idc_index(
    archive: _ArchiveLike | IdcView,
    folder: str | Path,
    *,
    version: int = DEFAULT_VERSION,
    prior: Iterable[str] = (),
    exclude: Iterable[str] = (),
    buckets: Mapping[str, str] | None = None,
) -> IdcView:
    """Write idc-index-data's three parquet files for ``archive`` into ``folder``;
    returns the view they describe (what the S3 mode must serve for them to be true)."""
    view = IdcView.build(archive, version=version, prior=prior, exclude=exclude,
                         buckets=buckets)
    view.write_index(folder)
    return view


# -- parquet -------------------------------------------------------------------------
# duckdb types of idc-index-data's columns (its *_schema.json: STRING -> VARCHAR,
# INTEGER -> BIGINT, FLOAT -> DOUBLE, a REPEATED RECORD -> a list of structs), in its order.
_S = "VARCHAR"
IDC_INDEX_COLUMNS: dict[str, str] = {
    **dict.fromkeys(("collection_id", "analysis_result_id", "PatientID", "SeriesInstanceUID",
                     "StudyInstanceUID", "source_DOI", "PatientAge", "PatientSex",
                     "StudyDate", "StudyDescription", "BodyPartExamined", "Modality",
                     "SOPClassUID", "sop_class_name", "TransferSyntaxUID",
                     "transfer_syntax_name", "PhotometricInterpretation",
                     "PixelRepresentation", "Manufacturer", "ManufacturerModelName",
                     "SeriesDate", "SeriesDescription", "SeriesNumber"), _S),
    "instanceCount": "BIGINT",
    "license_short_name": _S,
    "series_init_idc_version": "BIGINT",
    "series_revised_idc_version": "BIGINT",
    "aws_bucket": _S,
    "crdc_series_uuid": _S,
    "series_aws_url": _S,
    "series_size_MB": "DOUBLE",
}
_SOURCE = (
    "STRUCT(source_id VARCHAR, source_title VARCHAR, source_type VARCHAR, "
    "source_doi VARCHAR, source_url VARCHAR, modalities VARCHAR, "
    "license STRUCT(license_url VARCHAR, license_long_name VARCHAR, "
    "license_short_name VARCHAR), citation VARCHAR, "
    "provenance STRUCT(data_contributor VARCHAR, source_data_provider VARCHAR, "
    "deidentification_party VARCHAR, dicom_conversion_by VARCHAR), "
    '"Access" VARCHAR, ImageTypes VARCHAR)[]'
)
COLLECTIONS_COLUMNS: dict[str, str] = {
    "collection_name": _S, "collection_id": _S, "cancer_types": _S, "tumor_locations": _S,
    "subjects": "BIGINT", "species": _S, "sources": _SOURCE, "supporting_data": _S,
    "program_id": _S, "status": _S, "updated": _S, "description": _S,
}
PRIOR_COLUMNS: dict[str, str] = {
    "collection_id": _S, "PatientID": _S, "SeriesInstanceUID": _S, "StudyInstanceUID": _S,
    "Modality": _S, "gcs_bucket": _S, "crdc_series_uuid": _S, "series_size_MB": "DOUBLE",
    "series_aws_url": _S, "aws_bucket": _S, "min_idc_version": "BIGINT",
    "max_idc_version": "BIGINT",
}


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _write_parquet(path: Path, columns: Mapping[str, str], rows: list[dict[str, object]]
                   ) -> None:
    """Rows -> a parquet file with exactly these column names and types.

    The rows go through newline-delimited JSON read with an explicit column spec, so
    any number of rows costs one duckdb statement (no per-row inserts), and nested
    ``sources`` keep their struct types.
    """
    import duckdb  # the optional 'idc' dependency; only this writer needs it

    fd, tmp_json = tempfile.mkstemp(suffix=".ndjson", dir=path.parent, prefix=".idc-")
    tmp_parquet = path.with_name(f".{path.name}.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({c: row.get(c) for c in columns}) + "\n")
        spec = "{" + ", ".join(f"{_sql_text(c)}: {_sql_text(t)}" for c, t in columns.items()) + "}"
        select = ", ".join(f"CAST({_quote(c)} AS {t}) AS {_quote(c)}"
                           for c, t in columns.items())
        source = f"read_json({_sql_text(tmp_json)}, format='newline_delimited', columns={spec})"
        if not rows:  # read_json cannot infer from an empty file; the types are explicit
            source = "(SELECT " + ", ".join(f"CAST(NULL AS {t}) AS {_quote(c)}"
                                            for c, t in columns.items()) + " LIMIT 0)"
        with duckdb.connect() as con:
            con.execute(f"COPY (SELECT {select} FROM {source}) TO "
                        f"{_sql_text(str(tmp_parquet))} (FORMAT parquet, COMPRESSION zstd)")
        os.replace(tmp_parquet, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_json)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_parquet)


def release_date(version: int) -> datetime.datetime:
    """A fixed, plausible publication time for objects of release ``version`` (the
    listing's LastModified): deterministic, so two runs list the same bytes."""
    return datetime.datetime(2020, 6, 1, tzinfo=datetime.UTC) + datetime.timedelta(
        days=60 * (version - 1))


def iter_series(view: IdcView) -> Iterator[IdcSeriesVersion]:
    """Every version (current first), for callers that fill another S3 (moto)."""
    yield from view.versions
