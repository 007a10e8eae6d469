"""What makes a staged series good enough to publish: pure rules, no I/O.

The real server answers a failure mid-series with a short but *valid* zip and status
200, and a hostile one can send anything that parses. So a series is published only if
all of these hold, and otherwise the attempt fails (and is retried):

* with MD5s requested, ``md5hashes.csv`` arrived, every file it lists is present, every
  other entry (bar ``LICENSE``) is listed, and every MD5 matches;
* at least as many images as the metadata promises, and not more;
* every entry starts like DICOM, unless it is a non-image the server vouches for
  (listed in ``md5hashes.csv``; without a list, an annotation file); the annotation
  files ``getDCMImage?IncludeAnnotation=true`` sends *after* ``md5hashes.csv`` are never
  listed in it (the real server lists images only), so a non-DICOM entry there, not
  named like an image, is accepted unlisted;
* every image's own header names this series (SeriesInstanceUID), and no two images
  share a SOP Instance UID.

:func:`check_series` raises :class:`~nbia_retriever.errors.IntegrityError` naming the
series and the first rule broken.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import IntegrityError
from ..models import SeriesInfo
from ..naming import ANNOTATION_SUFFIXES, MD5_ENTRY
from ..untrusted import quote


@dataclass(frozen=True, slots=True)
class ImageTags:
    """The header values of one image the engine uses (raw strings; None when absent)."""

    sop_instance_uid: str
    acquisition: str | None = None
    instance: str | None = None
    series_uid: str | None = None
    study_uid: str | None = None
    study_id: str | None = None
    sop_class_uid: str | None = None


@dataclass(slots=True)
class StagedEntry:
    """One zip entry written to staging: where, how big, its MD5, and (for images) tags."""

    name: str
    part: str  # file name inside the staging folder
    size: int
    md5: str
    tags: ImageTags | None = None  # None: not DICOM
    #: Non-DICOM and after md5hashes.csv in the zip: where the server puts annotations.
    annotation: bool = False

    @property
    def is_image(self) -> bool:
        return self.tags is not None


def basename(name: str) -> str:
    """The last part of a zip entry name, whichever separator the server used."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def parse_md5_list(data: bytes, uid: str) -> dict[str, str]:
    """``md5hashes.csv`` (header ``Filename,MD5Hash``) as basename -> lowercase hex."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise IntegrityError(f"series {uid}: {MD5_ENTRY} is not text") from None
    listed: dict[str, str] = {}
    try:
        for row in csv.reader(io.StringIO(text)):
            if len(row) < 2:
                continue
            name, digest = row[0].strip(), row[1].strip().lower()
            if name.lower() == "filename":
                continue
            listed[basename(name)] = digest
    except csv.Error as exc:
        raise IntegrityError(f"series {uid}: {MD5_ENTRY} is malformed ({exc})") from None
    return listed


def check_series(uid: str, info: SeriesInfo, entries: Sequence[StagedEntry],
                 md5_list: Mapping[str, str] | None, *, md5_required: bool) -> None:
    """Raise :class:`IntegrityError` unless the staged series may be published."""
    images = [e for e in entries if e.is_image]
    if md5_required:
        if md5_list is None:
            raise IntegrityError(
                f"series {uid}: no {MD5_ENTRY} in the zip (the stream is incomplete)")
        present = {basename(e.name) for e in entries}
        missing = sum(1 for name in md5_list if name not in present)
        if missing:
            raise IntegrityError(
                f"series {uid}: short zip, {missing} of {len(md5_list)} files listed in "
                f"{MD5_ENTRY} are missing")
        unlisted: list[str] = []
        for entry in entries:
            # Every entry, not one per listed name: a/1.dcm and b/1.dcm share a name in
            # md5hashes.csv, and neither may go unchecked.
            base = basename(entry.name)
            digest = md5_list.get(base)
            if digest is None:
                if entry.annotation and not base.lower().endswith(".dcm"):
                    continue  # the server's annotation files are never in the list
                unlisted.append(entry.name)
            elif entry.md5 != digest:
                raise IntegrityError(f"series {uid}: MD5 mismatch for {quote(base, 120)}")
        if unlisted:
            raise IntegrityError(
                f"series {uid}: {len(unlisted)} files are not in {MD5_ENTRY} "
                f"(first: {quote(unlisted[0], 120)!r})")
    else:
        for entry in entries:
            if not entry.is_image and not basename(entry.name).lower().endswith(
                    ANNOTATION_SUFFIXES):
                raise IntegrityError(f"series {uid}: entry {quote(entry.name, 120)!r} is "
                                     "not a DICOM file")
    if md5_required:
        # Listed non-images are the server's own (annotations); one that claims to be an
        # image (".dcm") but does not start like DICOM is an error page in disguise.
        for entry in entries:
            if not entry.is_image and basename(entry.name).lower().endswith(".dcm"):
                raise IntegrityError(f"series {uid}: entry {quote(entry.name, 120)!r} is "
                                     "not a DICOM file")
    expected = info.image_count
    if expected is not None and len(images) < expected:
        raise IntegrityError(f"series {uid}: short zip, {len(images)} of {expected} images")
    if expected is not None and len(images) > expected:
        raise IntegrityError(f"series {uid}: {len(images)} images, more than the "
                             f"{expected} the metadata promises")
    if not entries:
        raise IntegrityError(f"series {uid}: the zip holds no files")
    if not images:
        raise IntegrityError(f"series {uid}: the zip holds no DICOM images")
    seen: set[str] = set()
    for entry in images:
        tags = entry.tags
        assert tags is not None
        if tags.series_uid != uid:
            other = quote(tags.series_uid or "no SeriesInstanceUID", 80)
            raise IntegrityError(f"series {uid}: image {quote(entry.name, 80)!r} belongs to "
                                 f"another series ({other})")
        sop = tags.sop_instance_uid
        if not sop:
            raise IntegrityError(f"series {uid}: image {quote(entry.name, 80)!r} has no SOP "
                                 "Instance UID")
        if sop in seen:
            raise IntegrityError(f"series {uid}: two images share the SOP Instance UID "
                                 f"{quote(sop, 80)}")
        seen.add(sop)
