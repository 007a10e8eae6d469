"""The synthetic archive as CRDC (Gen3 DRS objects) and PathDB hold it: files and manifests.

Since 2025-07-08 TCIA's controlled-access series come from the NCI Cancer Research Data
Commons as DRS objects (General Commons names a DICOM series ``<SeriesInstanceUID>.zip``),
beside other files (reports, PDFs), and its pathology slides from PathDB as plain URLs
(reference section 10 C, D). Tests, the demo and the benchmark need such objects for an
archive the NBIA reference server serves, with every value agreeing with what that server
says about the same series, so that a series fetched from either source lands byte for
byte in the same place. :func:`gen3_view` writes them, deterministically:

* a series zip holds the EXACT bytes the reference server sends for ``v4/getImage?
  IncludeMD5=yes`` (the client's first choice: LICENSE, the images, md5hashes.csv) with
  the same ``seed``, made by the server's own :meth:`~.app.NbiaService.zip_entries`;
* other files (``<patient>-report.pdf``) and slides (``.svs``/``.tiff``) are
  pseudo-random bytes fixed by their name, written a chunk at a time (a 1 GB slide for the
  benchmark never sits in memory), their MD5 computed while writing;
* object ids are ``dg.4DFC/`` + ``uuid5(NAMESPACE_URL, name)``, as on CRDC a GUID under
  the ``dg.4DFC`` prefix.

:func:`write_drs_manifest` and :func:`write_pathdb_manifest` write the sheets users get,
with the real columns (section 10 C: the TCIA benchmark sheets, CTDC, ICDC; D: PathDB).
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

from ..errors import ArchiveError
from ..models import DEFAULT_DRS_HOST
from ..ondisk import atomic_write_text
from .config import load_config
from .index import ArchiveIndex, SeriesRecord
from .zipwriter import stream_zip

__all__ = [
    "DRS_PREFIX",
    "DRS_STYLES",
    "PATHDB_URL",
    "Gen3Object",
    "PathdbSlide",
    "drs_uri",
    "gen3_view",
    "object_id_for",
    "pathdb_url",
    "write_drs_manifest",
    "write_pathdb_manifest",
]

#: The CRDC's GUID prefix (its dataguids.org namespace).
DRS_PREFIX = "dg.4DFC"
DRS_STYLES = ("tcia", "ctdc", "icdc")
_CHUNK = 1024 * 1024
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: PathDB's origin (``imageUrl`` of the real sheets)
PATHDB_URL = "https://pathdb.cancerimagingarchive.net"
#: a fixed upload time: the DRS ``created_time`` and PathDB's ``created``/``changed``
CREATED = "2025-07-08T00:00:00Z"


@dataclass(frozen=True)
class Gen3Object:
    """One DRS object: its id, its file name and bytes on disk, and where it belongs.

    ``kind`` is ``"zip"`` (a DICOM series zip named ``<SeriesInstanceUID>.zip``) or
    ``"file"``. ``path`` holds the bytes (served a piece at a time, never read whole).
    """

    object_id: str
    name: str
    size: int
    md5: str
    path: Path
    kind: str
    collection: str = ""
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""

    @property
    def uuid(self) -> str:
        """The GUID after the ``dg.4DFC/`` prefix (CTDC's ``File UUID``)."""
        return self.object_id.partition("/")[2]


@dataclass(frozen=True)
class PathdbSlide:
    """One PathDB slide: served at ``/system/files/<url_path>`` (no auth, no checksum
    published: ``md5`` is for the tests)."""

    name: str
    size: int
    md5: str
    path: Path
    collection: str
    collection_id: int
    patient_id: str
    #: PathDB's ``imageid`` (the file name's stem, as in the real sheets)
    image_id: str
    #: PathDB's node id (``nid``), the sheets' ``slideId``
    slide_id: int
    #: below ``/system/files/``: ``wsi/ross/<collection>/<name>``
    url_path: str

    @property
    def object_id(self) -> str:
        """What fault targets call a slide: its ``url_path``."""
        return self.url_path


def object_id_for(name: str) -> str:
    """``dg.4DFC/<uuid5 of name>``: the object id :func:`gen3_view` gives ``name``."""
    return f"{DRS_PREFIX}/{uuid.uuid5(uuid.NAMESPACE_URL, name)}"


def _safe(text: str) -> str:
    return _SAFE.sub("_", text).strip("._") or "x"


def _write_random(path: Path, size: int, seed: str, head: bytes = b"") -> str:
    """Write ``head`` then pseudo-random bytes (fixed by ``seed``) up to ``size``, a chunk
    at a time; return the MD5. Existing files of that size are kept (a bench's 1 GB slide
    is written once), their MD5 read back."""
    digest = hashlib.md5(usedforsecurity=False)
    if path.is_file() and path.stat().st_size == size:
        with path.open("rb") as handle:
            while block := handle.read(_CHUNK):
                digest.update(block)
        return digest.hexdigest()
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with part.open("wb") as handle:
        first = head[:size]
        handle.write(first)
        digest.update(first)
        remaining = size - len(first)
        while remaining > 0:
            block = rng.randbytes(min(_CHUNK, remaining))
            handle.write(block)
            digest.update(block)
            remaining -= len(block)
    part.replace(path)
    return digest.hexdigest()


def _write_zip(path: Path, chunks: Iterable[bytes]) -> tuple[int, str]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with part.open("wb") as handle:
        for block in chunks:
            handle.write(block)
            digest.update(block)
            size += len(block)
    part.replace(path)
    return size, digest.hexdigest()


def gen3_view(
    archive_root: str | Path | ArchiveIndex,
    out_dir: str | Path,
    *,
    zips: int = 2,
    files: int = 2,
    slides: int = 2,
    slide_size: int = 256 * 1024,
    file_size: int = 48 * 1024,
    seed: int = 0,
    series: Sequence[str] | None = None,
) -> tuple[tuple[Gen3Object, ...], tuple[PathdbSlide, ...]]:
    """Write ``zips`` series zips, ``files`` other files and ``slides`` PathDB slides for
    the archive under ``out_dir`` (``drs/`` and ``pathdb/``); return (objects, slides).

    Series are taken in (collection, patient, UID) order (or ``series``, UIDs), restricted
    collections included: controlled data is what CRDC holds. Files and slides go to the
    archive's patients in turn. ``seed`` is the reference server's (the image order
    inside the zips). Raises :class:`ArchiveError` for a count the archive cannot fill.
    """
    from .app import NbiaService  # the server app only when zips are made

    index = archive_root if isinstance(archive_root, ArchiveIndex) \
        else ArchiveIndex.load(Path(archive_root))
    if min(zips, files, slides) < 0 or slide_size < 0 or file_size < 0:
        raise ArchiveError("gen3_view: counts and sizes must not be negative")
    out = Path(out_dir)
    records = sorted(index.series.values(),
                     key=lambda s: (s.collection, s.patient_id, s.series_uid))
    if series is not None:
        missing = [uid for uid in series if uid not in index.series]
        if missing:
            raise ArchiveError(f"{index.root}: no series {missing[0]} in the archive")
        chosen = [index.series[uid] for uid in series]
    else:
        if zips > len(records):
            raise ArchiveError(f"{index.root}: {zips} zips asked for, the archive has "
                               f"{len(records)} series")
        chosen = records[:zips]
    service = NbiaService(index, load_config(index.root), seed=seed)
    objects: list[Gen3Object] = []
    for record in chosen:
        name = f"{record.series_uid}.zip"
        entries = service.zip_entries(record, md5=True, license_entry=True)
        size, md5 = _write_zip(out / "drs" / name, stream_zip(entries))
        objects.append(Gen3Object(object_id_for(name), name, size, md5, out / "drs" / name,
                                  "zip", **_where(record)))
    patients = sorted({(s.collection, s.patient_id): s for s in records}.items())
    if (files or slides) and not patients:
        raise ArchiveError(f"{index.root}: the archive has no patients to give files to")
    seen: dict[str, int] = {}
    for k in range(files):
        record = patients[k % len(patients)][1]
        base = _safe(record.patient_id) + "-report"
        seen[base] = seen.get(base, 0) + 1
        name = f"{base}.pdf" if seen[base] == 1 else f"{base}-{seen[base]}.pdf"
        path = out / "drs" / name
        size = file_size + 997 * k  # not all alike
        md5 = _write_random(path, size, f"gen3-file|{name}", b"%PDF-1.4\n")
        objects.append(Gen3Object(object_id_for(name), name, size, md5, path, "file",
                                  **_where(record)))
    collections = sorted({s.collection for s in records})
    wsi: list[PathdbSlide] = []
    for k in range(slides):
        record = patients[k % len(patients)][1]
        ext = ".svs" if k % 2 == 0 else ".tiff"
        name = f"{_safe(record.patient_id)}-{k + 1:02d}{ext}"
        folder = _safe(record.collection)
        path = out / "pathdb" / folder / name
        head = b"II*\x00" if ext == ".tiff" else b"II*\x00SVS"
        md5 = _write_random(path, slide_size, f"pathdb|{name}", head)
        wsi.append(PathdbSlide(
            name=name, size=slide_size, md5=md5, path=path, collection=record.collection,
            collection_id=collections.index(record.collection) + 1,
            patient_id=record.patient_id, image_id=name.rpartition(".")[0],
            slide_id=2060 + k,
            url_path=f"wsi/ross/{folder}/{name}"))
    return tuple(objects), tuple(wsi)


def _where(record: SeriesRecord) -> dict[str, str]:
    return {"collection": record.collection, "patient_id": record.patient_id,
            "study_uid": record.study_uid, "series_uid": record.series_uid,
            "modality": record.modality}


def _drs_host(base_url: str | None) -> str:
    if base_url is None:
        return DEFAULT_DRS_HOST
    host = urlsplit(base_url).netloc
    if not host:
        raise ValueError(f"base_url {base_url!r} has no host")
    return host


def drs_uri(obj: Gen3Object, base_url: str | None = None) -> str:
    """``drs://<host:port of base_url>/dg.4DFC/<uuid>`` (the CRDC host without one)."""
    return f"drs://{_drs_host(base_url)}/{obj.object_id}"


def write_drs_manifest(path: str | Path, objects: Iterable[Gen3Object], *,
                       base_url: str | None = None, style: str = "tcia") -> Path:
    """A DRS manifest of ``objects`` as the real sheets have it (section 10 C):

    * ``tcia``: ``drs_uri,name,collection,patient_id,modality,file_size_bytes,
      source_manifest_url`` (TCIA's benchmark sheets: size, no MD5);
    * ``ctdc``: ``name,drs_uri,study_short_name,participant_id,File ID,Md5sum`` (MD5, no
      size; ``File ID`` is the bare object id);
    * ``icdc``: ``name,drs_uri,Study Code,Case ID,File Type,File Format,File Size,md5sum,
      File UUID,File Location,Patient ID``.

    ``drs_uri`` names ``base_url``'s host and port (the Gen3 server under test).
    """
    rows: list[list[str]]
    if style == "tcia":
        header = ["drs_uri", "name", "collection", "patient_id", "modality",
                  "file_size_bytes", "source_manifest_url"]
        rows = [[drs_uri(o, base_url), o.name, o.collection, o.patient_id,
                 o.modality if o.kind == "zip" else "", str(o.size),
                 "https://www.cancerimagingarchive.net/synthetic-manifest.csv"]
                for o in objects]
    elif style == "ctdc":
        header = ["name", "drs_uri", "study_short_name", "participant_id", "File ID",
                  "Md5sum"]
        rows = [[o.name, drs_uri(o, base_url), o.collection, o.patient_id, o.object_id,
                 o.md5] for o in objects]
    elif style == "icdc":
        header = ["name", "drs_uri", "Study Code", "Case ID", "File Type", "File Format",
                  "File Size", "md5sum", "File UUID", "File Location", "Patient ID"]
        rows = [[o.name, drs_uri(o, base_url), o.collection, o.patient_id,
                 "DICOM" if o.kind == "zip" else "Pathology Report",
                 o.name.rpartition(".")[2], str(o.size), o.md5, o.uuid,
                 f"s3://nci-cbiit-synthetic-file/{o.uuid}/{quote(o.name)}", o.patient_id]
                for o in objects]
    else:
        raise ValueError(f"style {style!r}: one of {', '.join(DRS_STYLES)}")
    return _write_csv(Path(path), header, rows)


def pathdb_url(base_url: str, slide: PathdbSlide, *, index_php: bool = False) -> str:
    """The slide's ``imageUrl`` on the PathDB server at ``base_url``."""
    prefix = "/index.php" if index_php else ""
    return f"{base_url.rstrip('/')}{prefix}/system/files/{quote(slide.url_path)}"


def write_pathdb_manifest(path: str | Path, slides: Iterable[PathdbSlide], *,
                          base_url: str = PATHDB_URL) -> Path:
    """A PathDB manifest (tcia_utils' ``getImages`` CSV, section 10 D: no size, no
    checksum; ``imagedWidth`` spelled as there) whose ``imageUrl`` is ``base_url`` plus
    the slide's path."""
    header = ["collectionName", "collectionId", "subjectId", "imageId", "slideId",
              "imageHeight", "imagedWidth", "physicalPixelSizeX", "physicalPixelSizeY",
              "imageUrl", "created", "changed"]
    rows = [[s.collection, str(s.collection_id), s.patient_id, s.image_id, str(s.slide_id),
             "6165", "7324", "0", "0", pathdb_url(base_url, s), "2025-07-08 00-00-00",
             "2025-07-08 00-00-00"] for s in slides]
    return _write_csv(Path(path), header, rows)


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return atomic_write_text(path, text.getvalue())
