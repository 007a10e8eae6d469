"""Synthetic NBIA archives: realistic CT series on disk, for the reference server and tests.

Real TCIA collections cannot be downloaded in CI, and their sharp edges (several
acquisitions in a series, missing or repeated InstanceNumbers, descriptions full of path
characters or non-ASCII text...) are exactly what breaks clients. This module writes a
folder the reference server can serve, with every one of those edges present on purpose.

On-disk contract (read by ``nbia_retriever.server``)::

    OUT/<Collection>/<PatientID>/<StudyInstanceUID>/<SeriesInstanceUID>/<n>.dcm
    OUT/nbia-archive.toml      licenses, restricted collections, users, token lifetime
    OUT/manifest.tcia          v3.0 manifest of the public series
    OUT/manifest-all.tcia      v3.0 manifest of every series, restricted ones included

The server reads patient/study/series from the DICOM headers, never from folder names.

Generation streams: one DICOM dataset per series is reused for every image, the pixel
data of an image is a slice of one cached buffer, and nothing larger than one image is
held in memory, so a 1 GB series costs what the disk costs. Everything is derived from
``seed`` (``random.Random(seed)``, UIDs hashed from the seed, fixed dates), so the same
seed gives byte-identical files.
"""

from __future__ import annotations

import array
import functools
import json
import math
import random
import re
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, ClassVar

import click
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from ..errors import NbiaError
from ..errors import SynthError as SynthError  # re-export

__all__ = [
    "AWKWARD_SERIES_KINDS",
    "AWKWARD_STUDY_KINDS",
    "ArchiveSummary",
    "SynthError",
    "SynthSeries",
    "generate_archive",
    "synth_command",
]

#: pydicom's registered root; the rest of each UID is a hash of the seed and position.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
#: The DownloadServlet URL written into the manifests; a placeholder the server's users
#: rewrite (or the reference server's default address).
PLACEHOLDER_DOWNLOAD_URL = "http://127.0.0.1:8080/nbia-download/servlet/DownloadServlet"
ARCHIVE_TOML = "nbia-archive.toml"
PUBLIC_MANIFEST = "manifest.tcia"
ALL_MANIFEST = "manifest-all.tcia"
TOKEN_LIFETIME = 7200
LICENSE_NAME = "Creative Commons Attribution 4.0 International License"
LICENSE_URL = "https://creativecommons.org/licenses/by/4.0/"
DESCRIPTION_URI = "https://doi.org/10.7937/synthetic"
#: Who may log in. alice sees the restricted collection, bob proves that a valid login is
#: not the same as an authorisation.
USERS: dict[str, str] = {"alice": "wonderland-secret", "bob": "builder-secret"}
_MANIFEST_EPOCH_MS = 1_700_000_000_000

# Awkward cases. Series kinds change a series' images or descriptions; study kinds change
# the study-level text (shared by every series of the study, as in real archives).
MULTI_ACQUISITION = "multi-acquisition"  # two acquisitions, InstanceNumber restarts at 1
ACQUISITION_ABSENT = "acquisition-absent"  # no AcquisitionNumber on any image
INSTANCE_ABSENT = "instance-absent"  # one image without InstanceNumber
DUPLICATE_INSTANCE = "duplicate-instance"  # two images of one acquisition share a number
SPARSE_INSTANCES = "sparse-instances"  # 3, 10, 250, ...
SERIES_NUMBER_ABSENT = "series-number-absent"
DESC_SPECIAL = "description-special"  # / : * ? < > | and a backslash
DESC_UNICODE = "description-unicode"  # non-ASCII, SpecificCharacterSet ISO_IR 192
DESC_LONG = "description-long"  # longer than the 53 characters layouts keep
DESC_EMPTY = "description-empty"  # empty SeriesDescription (and, via the study, the rest)
STUDY_EMPTY = "study-empty"  # empty StudyDescription and StudyID

AWKWARD_SERIES_KINDS: tuple[str, ...] = (
    MULTI_ACQUISITION,
    ACQUISITION_ABSENT,
    INSTANCE_ABSENT,
    DUPLICATE_INSTANCE,
    SPARSE_INSTANCES,
    SERIES_NUMBER_ABSENT,
    DESC_SPECIAL,
    DESC_UNICODE,
    DESC_LONG,
    DESC_EMPTY,
)
AWKWARD_STUDY_KINDS: tuple[str, ...] = (STUDY_EMPTY, DESC_SPECIAL, DESC_UNICODE, DESC_LONG)
_DESCRIPTION_KINDS = frozenset({DESC_SPECIAL, DESC_UNICODE, DESC_LONG, DESC_EMPTY})

SPECIAL_SERIES_DESCRIPTION = 'AX/COR: w*o? <lung> | "recon"\\2'
SPECIAL_STUDY_DESCRIPTION = "CT Thorax/Abdomen: w*o? <contrast> | follow-up"
UNICODE_DESCRIPTION = "Tête – Thorax ✓ 肺"
#: 62 characters: over the 53 the layouts keep, under LO's limit of 64.
LONG_DESCRIPTION = "CHEST ABDOMEN PELVIS W CONTRAST PORTAL VENOUS PHASE 1.25MM B30F"
_PLAIN_SERIES_DESCRIPTIONS = (
    "AXIAL 1.25MM",
    "LUNG 1.0 B70F",
    "SOFT TISSUE 3MM",
    "CHEST 2.5MM STD",
    "RECON 2 BONE",
    "MEDIASTINUM 5MM",
)
_PLAIN_STUDY_DESCRIPTIONS = ("CT CHEST WITHOUT CONTRAST", "CT THORAX", "LUNG SCREENING LOW DOSE")
_MANUFACTURERS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips", "TOSHIBA")
_THICKNESSES = ("0.625", "1.0", "1.25", "2.5", "5.0")


@dataclass(frozen=True)
class SynthSeries:
    """One generated series, as a test or the server would want to check it."""

    collection: str
    patient_id: str
    study_uid: str
    series_uid: str
    images: int
    nbytes: int  # sum of the .dcm file sizes
    restricted: bool
    files: tuple[Path, ...]
    #: Annotation files beside the images (``annotations=`` of :func:`generate_archive`).
    annotations: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ArchiveSummary:
    """What :func:`generate_archive` wrote; ``users`` maps username -> password."""

    root: Path
    series: tuple[SynthSeries, ...]
    total_files: int
    total_bytes: int
    users: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- planning


@dataclass
class _StudyPlan:
    patient_index: int
    study_index: int
    kinds: set[str] = field(default_factory=set)


@dataclass
class _SeriesPlan:
    study: _StudyPlan
    series_index: int
    kinds: set[str] = field(default_factory=set)


def _compatible(kind: str, taken: set[str], images: int) -> bool:
    """Whether ``kind`` can join the kinds already given to one series or study.

    A series or study has one description and one way of numbering acquisitions, and a
    duplicate or missing InstanceNumber needs enough images in the first acquisition to
    leave a normal one beside it (else one case would silently erase the other).
    """
    combined = taken | {kind}
    if len(combined & _DESCRIPTION_KINDS) > 1:
        return False
    if STUDY_EMPTY in combined and combined & _DESCRIPTION_KINDS:
        return False
    if {MULTI_ACQUISITION, ACQUISITION_ABSENT} <= combined:
        return False
    if MULTI_ACQUISITION in combined and images < 2:
        return False
    first = (images + 1) // 2 if MULTI_ACQUISITION in combined else images
    needed = 3 if INSTANCE_ABSENT in combined else 2
    return not (DUPLICATE_INSTANCE in combined and first < needed)


def _spread(
    kinds: Sequence[str],
    slots: Sequence[set[str]],
    images: int,
    prefer: Callable[[str, int], bool] | None = None,
) -> None:
    """Give each kind to one slot, round-robin, skipping slots it cannot join.

    Round-robin from a moving cursor spreads the cases over the first slots of a
    collection (so most of a big archive stays plain, like real data) and combines them
    only when there are fewer slots than cases. ``prefer`` lets a kind pick a slot first
    (the empty series description goes into the study whose description is empty).
    """
    cursor = 0
    count = len(slots)
    for kind in kinds:
        order = [(cursor + step) % count for step in range(count)]
        if prefer is not None:
            order.sort(key=lambda index: not prefer(kind, index))
        for index in order:
            if _compatible(kind, slots[index], images):
                slots[index].add(kind)
                if prefer is None or not prefer(kind, index):
                    cursor = index + 1
                break


def _plan_collection(
    patients: int, studies: int, series: int, images: int, awkward: bool
) -> list[_SeriesPlan]:
    study_plans = [_StudyPlan(p, s) for p in range(patients) for s in range(studies)]
    plans = [_SeriesPlan(st, k) for st in study_plans for k in range(series)]
    if awkward:
        _spread(AWKWARD_STUDY_KINDS, [st.kinds for st in study_plans], images)

        def prefer(kind: str, index: int) -> bool:
            return kind == DESC_EMPTY and STUDY_EMPTY in plans[index].study.kinds

        _spread(AWKWARD_SERIES_KINDS, [sp.kinds for sp in plans], images, prefer)
    return plans


def _image_numbers(
    kinds: set[str], images: int, rng: random.Random
) -> list[tuple[int | None, int | None]]:
    """(AcquisitionNumber, InstanceNumber) per image, ``None`` meaning absent.

    With two acquisitions the InstanceNumbers restart at 1, as scanners do: the pair,
    not the InstanceNumber alone, identifies an image (and clients that forget it lose
    files).
    """
    if MULTI_ACQUISITION in kinds and images >= 2:
        first = (images + 1) // 2
        groups = [first, images - first]
    else:
        groups = [images]
    numbers: list[tuple[int | None, int | None]] = []
    for acquisition, size in enumerate(groups, start=1):
        if SPARSE_INSTANCES in kinds:
            instances = [3, 10, 250][:size]
            while len(instances) < size:
                instances.append(instances[-1] + rng.randint(1, 97))
        else:
            instances = list(range(1, size + 1))
        instance_values: list[int | None] = list(instances)
        if DUPLICATE_INSTANCE in kinds and size >= 2:
            instance_values[size - 1] = instance_values[size - 2]
        if INSTANCE_ABSENT in kinds and acquisition == 1:
            instance_values[0] = None
        acq: int | None = None if ACQUISITION_ABSENT in kinds else acquisition
        numbers.extend((acq, inst) for inst in instance_values)
    return numbers


# --------------------------------------------------------------------------- pixels


@functools.lru_cache(maxsize=4)
def _pixel_source(rows: int, columns: int) -> bytes:
    """Two copies, back to back, of one CT-like slice: 12-bit values, little endian.

    A body-shaped ellipse with a slow texture and a denser core, air around it, and five
    bits of noise: deflate shrinks it about 2:1, like real CT, so zip and transfer costs
    are realistic. Doubling the buffer lets each image be a rotated copy made with one
    slice. Values stay below 2048, valid for both signed and unsigned 12-bit storage.
    """
    rng = random.Random(rows * 65536 + columns)
    cy, cx = rows / 2, columns / 2
    ry, rx = max(rows * 0.42, 1.0), max(columns * 0.47, 1.0)
    texture_x = [int(60 * math.sin(x * 0.05)) for x in range(columns)]
    pixels = array.array("H")
    for y in range(rows):
        dy = (y - cy) / ry
        dy2 = dy * dy
        texture_y = 1000 + int(60 * math.cos(y * 0.07))
        row = []
        for x in range(columns):
            dx = (x - cx) / rx
            d = dx * dx + dy2
            if d < 1.0:
                row.append(texture_y + texture_x[x] + (400 if d < 0.15 else 0))
            else:
                row.append(24)
        noise = rng.randbytes(columns)
        pixels.extend(value + (n & 31) for value, n in zip(row, noise, strict=True))
    if pixels.itemsize != 2:  # pragma: no cover - "H" is 2 bytes on every CPython
        raise SynthError("unsigned short is not 16 bits on this platform")
    if array.array("H", [1]).tobytes() != b"\x01\x00":  # pragma: no cover - big endian
        pixels.byteswap()
    data = pixels.tobytes()
    return data + data


# --------------------------------------------------------------------------- naming


def _collection_name(index: int) -> str:
    """SYNTH-CT-A ... SYNTH-CT-Z, SYNTH-CT-AA ...: plain names the server uses verbatim."""
    letters = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return f"SYNTH-CT-{letters}"


def _safe_component(text: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip("._") or "NA"
    return cleaned[:64]


def _uid(seed: int, *parts: object) -> str:
    return str(generate_uid(UID_ROOT, ["nbia-synth", str(seed), *(str(p) for p in parts)]))


def _toml_str(text: str) -> str:
    # JSON string escapes (\" \\ \n \uXXXX) are all valid in TOML basic strings.
    return json.dumps(text, ensure_ascii=False)


# --------------------------------------------------------------------------- writing


def _resolve_size(rows: int, columns: int, image_bytes: int | None) -> tuple[int, int]:
    if image_bytes is None:
        return rows, columns
    if image_bytes < 2:
        raise SynthError(f"image_bytes must be at least 2 (one 16-bit pixel), got {image_bytes}")
    pixels = image_bytes / 2
    columns = max(1, round(math.sqrt(pixels)))
    rows = max(1, round(pixels / columns))
    if rows > 65535 or columns > 65535:
        raise SynthError(f"image_bytes={image_bytes} needs more than 65535 rows or columns")
    return rows, columns


def _check_params(**counts: int) -> None:
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SynthError(f"{name} must be a whole number of at least 1, got {value!r}")
    for name in ("rows", "columns"):
        if counts[name] > 65535:
            raise SynthError(f"{name} must be at most 65535, got {counts[name]}")


def _study_text(kinds: set[str], rng: random.Random) -> tuple[str, str]:
    """(StudyDescription, StudyID) for a study with these awkward kinds."""
    study_id = str(rng.randint(1, 99999))
    if STUDY_EMPTY in kinds:
        return "", ""
    if DESC_SPECIAL in kinds:
        return SPECIAL_STUDY_DESCRIPTION, study_id
    if DESC_UNICODE in kinds:
        return UNICODE_DESCRIPTION, study_id
    if DESC_LONG in kinds:
        return LONG_DESCRIPTION, study_id
    return rng.choice(_PLAIN_STUDY_DESCRIPTIONS), study_id


def _series_description(kinds: set[str], rng: random.Random) -> str:
    plain = rng.choice(_PLAIN_SERIES_DESCRIPTIONS)
    if DESC_SPECIAL in kinds:
        return SPECIAL_SERIES_DESCRIPTION
    if DESC_UNICODE in kinds:
        return UNICODE_DESCRIPTION
    if DESC_LONG in kinds:
        return LONG_DESCRIPTION
    if DESC_EMPTY in kinds:
        return ""
    return plain


def _series_dataset(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    study_date: str,
    study_id: str,
    study_description: str,
    series_description: str,
    series_number: int | None,
    rows: int,
    columns: int,
    signed: bool,
    rng: random.Random,
) -> Dataset:
    """The dataset every image of one series shares; per-image fields are set later."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(series_uid)  # replaced per image
    meta.ImplementationVersionName = "NBIA_SYNTH_1"  # not pydicom's: stable across upgrades
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    texts = (patient_name, study_description, series_description)
    if any(not t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = f"{rng.randint(7, 18):02d}{rng.randint(0, 59):02d}{rng.randint(0, 59):02d}"
    ds.SeriesTime = ds.StudyTime
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = rng.choice(_MANUFACTURERS)
    ds.InstitutionName = "Synthetic Imaging Center"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = rng.choice(("F", "M", "O"))
    ds.PatientAge = f"{rng.randint(35, 85):03d}Y"
    ds.BodyPartExamined = "CHEST"
    thickness = rng.choice(_THICKNESSES)
    ds.SliceThickness = thickness
    ds.KVP = rng.choice(("100", "120", "140"))
    ds.ConvolutionKernel = rng.choice(("B30f", "STANDARD", "LUNG", "FC51"))
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_id
    if series_number is not None:
        ds.SeriesNumber = series_number
    # SOPInstanceUID, AcquisitionNumber, InstanceNumber, ImagePositionPatient and
    # SliceLocation are per image: see _SeriesEncoder.
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = _uid(0, "frame", series_uid)
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    spacing = f"{rng.uniform(0.55, 0.95):.6f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


#: The elements that differ between the images of one series; everything else is encoded
#: once per series.
_PER_IMAGE_TAGS: tuple[BaseTag, ...] = tuple(
    Tag(keyword)
    for keyword in (
        "SOPInstanceUID",
        "AcquisitionNumber",
        "InstanceNumber",
        "ImagePositionPatient",
        "SliceLocation",
    )
)
_MEDIA_SOP_INSTANCE = Tag("MediaStorageSOPInstanceUID")
_GROUP_LENGTH = Tag("FileMetaInformationGroupLength")
_PIXEL_DATA = Tag("PixelData")
_ENCODED: dict[tuple[BaseTag, str, str, tuple[str, ...]], bytes] = {}


def _encode(elem: DataElement, encodings: list[str]) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, elem, encodings)
    return buffer.getvalue()


class _SeriesEncoder:
    """Writes the images of one series as ``dcmwrite(enforce_file_format=True)`` would.

    ``dcmwrite`` spends ~2 ms per file re-encoding ~60 header elements, more than the
    disk needs for a small image (2,000 series x 2 images). Explicit VR Little Endian is a
    plain concatenation of elements in tag order, so pydicom encodes the series-constant
    elements once and the five per-image elements per image, and the pieces are joined.
    The pixel data goes from the shared buffer to the file without a copy.
    ``tests/test_synth.py`` checks every file is byte-identical to what ``dcmwrite``
    makes of the same dataset.
    """

    def __init__(self, template: Dataset) -> None:
        validate_file_meta(template.file_meta, enforce_standard=True)  # fills version etc.
        self._encodings = convert_encodings(template.get("SpecificCharacterSet", "ISO_IR 6"))
        meta = [e for e in template.file_meta if e.tag != _GROUP_LENGTH]
        self._meta_before = b"".join(self._cached(e) for e in meta if e.tag < _MEDIA_SOP_INSTANCE)
        self._meta_after = b"".join(self._cached(e) for e in meta if e.tag > _MEDIA_SOP_INSTANCE)
        # segments[i] holds the constant elements sorting before _PER_IMAGE_TAGS[i]; the
        # last one those after every per-image tag (up to the pixel data).
        bounds = [*_PER_IMAGE_TAGS, _PIXEL_DATA]
        pieces: list[list[bytes]] = [[] for _ in bounds]
        slot = 0
        for elem in template:  # tag order
            while elem.tag >= bounds[slot]:
                slot += 1
            pieces[slot].append(self._cached(elem))
        self._segments = [b"".join(piece) for piece in pieces]

    def _cached(self, elem: DataElement) -> bytes:
        """Encode a series-constant element, reusing the bytes when another series had it.

        Most header elements (Modality, Rows, BitsStored...) are the same in every series,
        and encoding them again for each of 2,000 small series would cost more than
        writing the files.
        """
        key = (elem.tag, elem.VR, str(elem.value), tuple(self._encodings))
        encoded = _ENCODED.get(key)
        if encoded is None:
            encoded = _encode(elem, self._encodings)
            if len(_ENCODED) < 4096:
                _ENCODED[key] = encoded
        return encoded

    def write(self, path: Path, values: Sequence[object | None], pixels: memoryview) -> int:
        """Write one image; ``values`` follow ``_PER_IMAGE_TAGS``, ``None`` = absent."""
        sop = _encode(DataElement(_MEDIA_SOP_INSTANCE, "UI", values[0]), self._encodings)
        meta_body = self._meta_before + sop + self._meta_after
        group_length = _encode(DataElement(_GROUP_LENGTH, "UL", len(meta_body)), [])
        parts = [b"\0" * 128, b"DICM", group_length, meta_body]
        for tag, value, segment in zip(_PER_IMAGE_TAGS, values, self._segments, strict=False):
            parts.append(segment)
            if value is not None:
                parts.append(_encode(DataElement(tag, dictionary_VR(tag), value), self._encodings))
        parts.append(self._segments[-1])
        parts.append(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)))
        header = b"".join(parts)
        with path.open("wb") as handle:
            handle.write(header)
            handle.write(pixels)
        return len(header) + len(pixels)


def generate_archive(
    out: Path | str,
    *,
    seed: int = 0,
    collections: int = 2,
    patients: int = 2,
    studies: int = 1,
    series: int = 2,
    images: int = 6,
    rows: int = 64,
    columns: int = 64,
    awkward: bool = True,
    restricted: bool = True,
    image_bytes: int | None = None,
    annotations: int = 0,
) -> ArchiveSummary:
    """Write a synthetic NBIA archive under ``out`` and describe it.

    Counts are per level: ``patients`` per collection, ``studies`` per patient, ``series``
    per study, ``images`` per series. ``image_bytes`` overrides ``rows``/``columns`` to
    get about that much 16-bit pixel data per image. With ``awkward`` the hard cases
    (see ``AWKWARD_SERIES_KINDS``/``AWKWARD_STUDY_KINDS``) are spread over the first
    series and studies of every collection, so each collection, and hence the public
    manifest, carries each case once the counts allow it (the defaults do).
    With ``restricted`` and at least two collections the last collection is restricted
    (a one-collection archive stays public, else it would have nothing to serve without a
    login); users ``alice`` (may see it) and ``bob`` (may not) are written either way.
    ``annotations``: the first that many series of every collection get two annotation
    files (AIM-like XML) beside their images, which the reference server's
    ``getDCMImage?IncludeAnnotation=true`` sends after the images, under their own names,
    as the real one does; the archive index never reads them (not DICOM).

    Raises :class:`SynthError` for impossible parameters, or when ``out`` already holds an
    archive (mixing two runs would break the byte-for-byte determinism).
    """
    _check_params(
        collections=collections,
        patients=patients,
        studies=studies,
        series=series,
        images=images,
        rows=rows,
        columns=columns,
    )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SynthError(f"seed must be an integer, got {seed!r}")
    if isinstance(annotations, bool) or not isinstance(annotations, int) or annotations < 0:
        raise SynthError(f"annotations must be a count of series, got {annotations!r}")
    rows, columns = _resolve_size(rows, columns, image_bytes)
    root = Path(out)
    names = [_collection_name(i) for i in range(collections)]
    if root.exists() and not root.is_dir():
        raise SynthError(f"{root}: exists and is not a folder")
    clashes = [n for n in (ARCHIVE_TOML, *names) if (root / n).exists()]
    if clashes:
        raise SynthError(f"{root}: already holds {clashes[0]}; generate into an empty folder")
    root.mkdir(parents=True, exist_ok=True)

    rng = random.Random(seed)
    source = _pixel_source(rows, columns)
    frame = rows * columns * 2
    restricted_names = {names[-1]} if restricted and collections >= 2 else set()
    result: list[SynthSeries] = []
    base_day = date(2001, 1, 1)

    for c_index, collection in enumerate(names):
        plans = _plan_collection(patients, studies, series, images, awkward)
        study_cache: dict[tuple[int, int], tuple[str, str, str, str]] = {}
        for s_index, plan in enumerate(plans):
            st = plan.study
            patient_id = f"SYNTH-{collection.removeprefix('SYNTH-CT-')}-{st.patient_index + 1:04d}"
            key = (st.patient_index, st.study_index)
            if key not in study_cache:
                study_uid = _uid(seed, "study", c_index, *key)
                day = base_day + timedelta(days=rng.randrange(7300))
                description, study_id = _study_text(st.kinds, rng)
                study_cache[key] = (study_uid, day.strftime("%Y%m%d"), description, study_id)
            study_uid, study_date, study_description, study_id = study_cache[key]
            series_uid = _uid(seed, "series", c_index, *key, plan.series_index)
            numbers = _image_numbers(plan.kinds, images, rng)
            ds = _series_dataset(
                patient_id=patient_id,
                patient_name=f"SYNTH^{collection.removeprefix('SYNTH-CT-')}{st.patient_index + 1}",
                study_uid=study_uid,
                series_uid=series_uid,
                study_date=study_date,
                study_id=study_id,
                study_description=study_description,
                series_description=_series_description(plan.kinds, rng),
                series_number=(
                    None if SERIES_NUMBER_ABSENT in plan.kinds else plan.series_index + 1
                ),
                rows=rows,
                columns=columns,
                signed=rng.random() < 0.5,
                rng=rng,
            )
            folder = root / collection / _safe_component(patient_id) / study_uid / series_uid
            folder.mkdir(parents=True, exist_ok=True)
            thickness = float(ds.SliceThickness)
            start_row = rng.randrange(rows)
            positions: dict[int | None, int] = {}
            files: list[Path] = []
            nbytes = 0
            encoder = _SeriesEncoder(ds)
            pixels = memoryview(source)
            for index, (acquisition, instance) in enumerate(numbers):
                slot = positions.get(acquisition, 0)
                positions[acquisition] = slot + 1
                z = round(-slot * thickness, 3) + 0.0  # never "-0.0"
                values = (
                    _uid(seed, "image", series_uid, index),
                    acquisition,
                    instance,
                    [-250.0, -250.0, z],
                    z,
                )
                offset = ((start_row + 7 * index) % rows) * columns * 2
                path = folder / f"{index + 1}.dcm"
                nbytes += encoder.write(path, values, pixels[offset : offset + frame])
                files.append(path)
            notes = _write_annotations(folder, series_uid) if s_index < annotations else ()
            result.append(
                SynthSeries(
                    collection=collection,
                    patient_id=patient_id,
                    study_uid=study_uid,
                    series_uid=series_uid,
                    images=len(files),
                    nbytes=nbytes,
                    restricted=collection in restricted_names,
                    files=tuple(files),
                    annotations=notes,
                )
            )

    users = dict(USERS) if restricted else {}
    _write_toml(root / ARCHIVE_TOML, names, restricted_names, users)
    basket = _MANIFEST_EPOCH_MS + 2 * (seed % 1_000_000_000)
    _write_manifest(
        root / PUBLIC_MANIFEST, [s.series_uid for s in result if not s.restricted], basket
    )
    _write_manifest(root / ALL_MANIFEST, [s.series_uid for s in result], basket + 1)
    return ArchiveSummary(
        root=root,
        series=tuple(result),
        total_files=sum(s.images for s in result),
        total_bytes=sum(s.nbytes for s in result),
        users=users,
    )


def _write_annotations(folder: Path, series_uid: str) -> tuple[Path, ...]:
    """Two small annotation files for one series, as a real archive keeps them beside the
    images (LIDC's reader XML): one whose name looks like a generated image name, so
    that a client must keep it apart from the images it names itself."""
    paths: list[Path] = []
    for name, reader in (("069.xml", 1), ("1-1.dcm.xml", 2)):
        text = ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<LidcReadMessage><ResponseHeader><SeriesInstanceUid>{series_uid}'
                f'</SeriesInstanceUid></ResponseHeader><readingSession><servicingRadiologistID>'
                f'reader-{reader}</servicingRadiologistID></readingSession></LidcReadMessage>\n')
        path = folder / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return tuple(paths)


def _write_toml(
    path: Path, names: Sequence[str], restricted: set[str], users: dict[str, str]
) -> None:
    lines = [
        "# Synthetic NBIA archive, generated by nbia-retriever synth.",
        f"token_lifetime = {TOKEN_LIFETIME}            # seconds",
        "",
    ]
    for name in names:
        lines += [
            f"[collections.{_toml_str(name)}]",
            f"license_name = {_toml_str(LICENSE_NAME)}",
            f"license_url = {_toml_str(LICENSE_URL)}",
            f"description_uri = {_toml_str(DESCRIPTION_URI)}",
            f"restricted = {'true' if name in restricted else 'false'}",
            "",
        ]
    for user, password in users.items():
        allowed = sorted(restricted) if user == "alice" else []
        lines += [
            f"[users.{_toml_str(user)}]",
            f"password = {_toml_str(password)}",
            f"collections = [{', '.join(_toml_str(n) for n in allowed)}]",
            "",
        ]
    path.write_text("\n".join(lines), encoding="utf-8")


def _write_manifest(path: Path, series_uids: Sequence[str], basket: int) -> None:
    """A v3.0 manifest as the TCIA portal writes it (reference section 1)."""
    header = [
        f"downloadServerUrl={PLACEHOLDER_DOWNLOAD_URL}",
        "includeAnnotation=true",
        "noOfrRetry=4",
        f"databasketId=manifest-{basket}.tcia",
        "manifestVersion=3.0",
        "ListOfSeriesToDownload=",
    ]
    path.write_text("\n".join([*header, *series_uids]) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- CLI


class _ByteSize(click.ParamType):  # type: ignore[type-arg]
    """Sizes such as ``262144``, ``256K``, ``256KB``, ``1M`` (binary multiples)."""

    name = "size"
    _UNITS: ClassVar[dict[str, int]] = {
        **dict.fromkeys(("", "B"), 1),
        **dict.fromkeys(("K", "KB", "KIB"), 1024),
        **dict.fromkeys(("M", "MB", "MIB"), 1024**2),
    }

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        unit = match.group(2).upper() if match else ""
        if not match or unit not in self._UNITS:
            self.fail(f"{value!r} is not a size like 262144, 256K or 1M", param, ctx)
        size = int(float(match.group(1)) * self._UNITS[unit])
        if size < 2:
            self.fail(f"{value!r} is smaller than one 16-bit pixel", param, ctx)
        return size


@click.command("synth")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same bytes.")
@click.option("--collections", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--patients", type=click.IntRange(min=1), default=2, show_default=True,
              help="Patients per collection.")
@click.option("--studies", type=click.IntRange(min=1), default=1, show_default=True,
              help="Studies per patient.")
@click.option("--series", type=click.IntRange(min=1), default=2, show_default=True,
              help="Series per study.")
@click.option("--images", type=click.IntRange(min=1), default=40, show_default=True,
              help="Images per series.")
@click.option("--rows", type=click.IntRange(1, 65535), default=512, show_default=True)
@click.option("--columns", type=click.IntRange(1, 65535), default=512, show_default=True)
@click.option("--image-bytes", type=_ByteSize(), default=None,
              help="Pixel bytes per image (e.g. 256K); overrides --rows/--columns.")
@click.option("--awkward/--no-awkward", default=True, show_default=True,
              help="Include the hard cases (acquisitions, missing/duplicate numbers, odd text).")
@click.option("--restricted/--no-restricted", default=True, show_default=True,
              help="Make the last collection restricted and add users alice and bob.")
def synth_command(
    out: Path,
    seed: int,
    collections: int,
    patients: int,
    studies: int,
    series: int,
    images: int,
    rows: int,
    columns: int,
    image_bytes: int | None,
    awkward: bool,
    restricted: bool,
) -> None:
    """Write a synthetic CT archive to OUT for `nbia-retriever serve`, with manifests."""
    started = time.perf_counter()
    try:
        summary = generate_archive(
            out,
            seed=seed,
            collections=collections,
            patients=patients,
            studies=studies,
            series=series,
            images=images,
            rows=rows,
            columns=columns,
            awkward=awkward,
            restricted=restricted,
            image_bytes=image_bytes,
        )
    except NbiaError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"{out}: {exc.strerror or exc}") from exc
    elapsed = time.perf_counter() - started
    public = sum(1 for s in summary.series if not s.restricted)
    restricted_names = sorted({s.collection for s in summary.series if s.restricted})
    access = (
        f" Restricted: {', '.join(restricted_names)} (users: {', '.join(summary.users)};"
        f" passwords in {ARCHIVE_TOML})."
        if restricted_names
        else ""
    )
    click.echo(
        f"Wrote {len(summary.series)} series, {summary.total_files} images,"
        f" {summary.total_bytes / 1e6:.1f} MB in {collections} collection(s) to {summary.root}"
        f" in {elapsed:.1f} s. Manifests: {PUBLIC_MANIFEST} ({public} public series),"
        f" {ALL_MANIFEST} ({len(summary.series)} series).{access}"
        f" Serve it with: nbia-retriever serve {summary.root}"
    )
