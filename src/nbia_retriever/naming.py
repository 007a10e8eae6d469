"""File names inside a series folder (reference section 5).

The server names zip entries ``00000001.dcm``... in database order, which says nothing
about the image, and its ``NewFileNames=Yes`` sorts by InstanceNumber only. Clients that
trust InstanceNumber alone overwrite images that share one (a peer lost 681 of 1,440
files that way). Here the name comes from the DICOM headers, by the documented rule:

* order by AcquisitionNumber, then InstanceNumber, as numbers; an empty, absent or
  non-numeric value sorts before any number;
* ties (equal numbers, both empty included) are broken by SOP Instance UID compared
  component by component as numbers, then as text, and finally by the zip entry name,
  so every image gets its own name and the same name on every run;
* name ``<a>-<i>.dcm``: ``a`` is the ordinal of the acquisition (absent values form
  one acquisition of their own, sorting first), ``i`` the ordinal within it; ``a`` is
  zero-padded to the digits of the number of acquisitions, ``i`` to the digits of the
  largest acquisition. With that padding, sorting names as text gives image order.

Values are IS strings as found in the header and parsed leniently: ``" 3 "``, ``"3.0"``
and ``"+3"`` all mean 3 (and are the same acquisition).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from .errors import UnsafeArchiveError
from .layout import fit_component, sanitize_component

__all__ = [
    "ANNOTATION_SUFFIXES",
    "LICENSE_ENTRY",
    "MD5_ENTRY",
    "ImageKey",
    "assign_names",
    "image_sort_key",
    "parse_is",
    "safe_entry_name",
]

#: The MD5 list the server appends as the last zip entry.
MD5_ENTRY = "md5hashes.csv"
#: The collection's license, the first zip entry.
LICENSE_ENTRY = "LICENSE"
#: Names of the annotation files NBIA keeps beside a series' images (LIDC's reader XML,
#: JSON and text notes): what the reference server serves with ``IncludeAnnotation``, and
#: the non-DICOM entries a client accepts as annotations when no MD5 list vouches for them.
ANNOTATION_SUFFIXES = (".xml", ".json", ".txt")
#: Fallback for a non-image entry whose name sanitises to nothing.
UNNAMED_ENTRY = "unnamed"

_IS = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_IMAGE_NAME = re.compile(r"\d+-\d+\.dcm", re.ASCII | re.IGNORECASE)
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True, slots=True)
class ImageKey:
    """The header values naming needs, as raw strings (``None`` when the tag is absent)."""

    entry: str
    acquisition: str | None
    instance: str | None
    sop_instance_uid: str


def parse_is(value: str | None) -> Decimal | None:
    """An IS value as a number; ``None`` for absent, empty or non-numeric values.

    Decimal rather than int so that ``"3.0"`` equals ``"3"`` and a (non-conforming)
    ``"2.5"`` still sorts between 2 and 3; no int conversion, so ``"1e999999"`` is cheap.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or _IS.fullmatch(text) is None:
        return None
    try:
        number = Decimal(text)
    except InvalidOperation:  # an exponent beyond what Decimal accepts: not a real IS
        return None
    return number if number.is_finite() else None


def _uid_key(uid: str) -> tuple[tuple[int, int, str], ...]:
    """UID components compared as numbers without int() (no digit limit, no cost)."""
    key: list[tuple[int, int, str]] = []
    for part in uid.strip().split("."):
        if part.isascii() and part.isdigit():
            digits = part.lstrip("0") or "0"
            key.append((0, len(digits), digits))
        else:
            key.append((1, 0, part))
    return tuple(key)


def _number_key(value: Decimal | None) -> tuple[int, Decimal]:
    return (0, Decimal(0)) if value is None else (1, value)


def image_sort_key(image: ImageKey) -> tuple[object, ...]:
    """The total order of reference section 5 (plus the UID text and entry name last)."""
    return (
        _number_key(parse_is(image.acquisition)),
        _number_key(parse_is(image.instance)),
        _uid_key(image.sop_instance_uid),
        image.sop_instance_uid,
        image.entry,
    )


def assign_names(images: Sequence[ImageKey]) -> dict[str, str]:
    """Zip entry name -> ``<a>-<i>.dcm`` for every image of one series.

    Two images with the same entry name cannot both be kept, so that is an
    :class:`UnsafeArchiveError` (a well-formed series zip never repeats a name).
    """
    seen: set[str] = set()
    for image in images:
        if image.entry in seen:
            raise UnsafeArchiveError(f"zip entry {image.entry!r} appears twice")
        seen.add(image.entry)
    ordered = sorted(images, key=image_sort_key)
    groups: list[list[ImageKey]] = []
    current: tuple[int, Decimal] | None = None
    for image in ordered:
        acquisition = _number_key(parse_is(image.acquisition))
        if not groups or acquisition != current:
            groups.append([])
            current = acquisition
        groups[-1].append(image)
    if not groups:
        return {}
    a_width = len(str(len(groups)))
    i_width = len(str(max(len(group) for group in groups)))
    names: dict[str, str] = {}
    for a, group in enumerate(groups, start=1):
        for i, image in enumerate(group, start=1):
            names[image.entry] = f"{a:0{a_width}d}-{i:0{i_width}d}.dcm"
    return names


def safe_entry_name(name: str) -> str:
    """A non-image zip entry's file name inside the series folder (annotations, LICENSE).

    Basename only: both ``/`` and ``\\`` separate folders, a drive letter (``C:``) is
    dropped, ``.`` and ``..`` segments are ignored; then sanitised like any path
    component and never empty (``"unnamed"``). Entries must never masquerade as files
    with a meaning of their own, so a name that would read as ``md5hashes.csv`` (any
    case) or as a generated image name (``1-01.dcm``) gets a leading ``_``; the
    engine consumes the real ``md5hashes.csv`` itself and never calls this for it. Two
    different entries can still come out alike (``a/x.xml``, ``b/x.xml``): the caller
    de-duplicates within the folder.
    """
    segments = [s for s in re.split(r"[/\\]", name) if s.strip() not in ("", ".", "..")]
    base = segments[-1] if segments else ""
    base = _DRIVE.sub("", base)
    result = sanitize_component(base, fallback=UNNAMED_ENTRY)
    # Marks are added within the 255 bytes a name may have (a full-length name is cut).
    if result.casefold() == MD5_ENTRY or _IMAGE_NAME.fullmatch(result):
        result = fit_component("_" + result, "")
    if result.casefold().endswith(".dcm") and not base.strip().casefold().endswith(".dcm"):
        # Sanitising dropped what followed ".dcm" (e.g. "x.dcm."): a non-image must not
        # come out looking like a DICOM file.
        result = fit_component(result, "_")
    return result
