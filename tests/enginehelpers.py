"""Shared helpers for end-to-end tests: what the archive holds vs what a client wrote."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from nbia_retriever.naming import ImageKey, assign_names
from nbia_retriever.report import Report

if TYPE_CHECKING:
    from nbia_retriever.engine import Engine


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes(), usedforsecurity=False).hexdigest()


def expected_series(archive_root: Path) -> dict[str, dict[str, str]]:
    """series uid -> {md5: expected file name} computed from the archive's own files.

    The names come from the headers of the archive files through the naming rule, so a
    client that names from anything else (zip order, server names) fails the comparison.
    """
    by_series: dict[str, list[tuple[Path, ImageKey]]] = {}
    for path in sorted(archive_root.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        acq = ds.get("AcquisitionNumber")
        inst = ds.get("InstanceNumber")
        key = ImageKey(
            entry=str(path),
            acquisition=None if acq in (None, "") else str(acq),
            instance=None if inst in (None, "") else str(inst),
            sop_instance_uid=str(ds.SOPInstanceUID),
        )
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append((path, key))
    result: dict[str, dict[str, str]] = {}
    for uid, items in by_series.items():
        names = assign_names([k for _, k in items])
        result[uid] = {md5(p): names[k.entry] for p, k in items}
    return result


def downloaded_series(root: Path) -> dict[str, dict[str, str]]:
    """series uid -> {md5: file name} of every .dcm under a download root (staging excluded)."""
    result: dict[str, dict[str, str]] = {}
    for path in sorted(root.rglob("*.dcm")):
        if ".nbia" in path.relative_to(root).parts:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        series = result.setdefault(str(ds.SeriesInstanceUID), {})
        series[md5(path)] = path.name
    return result


def series_folders(root: Path) -> dict[str, Path]:
    """series uid -> the folder holding its images."""
    folders: dict[str, Path] = {}
    for path in root.rglob("*.dcm"):
        if ".nbia" in path.relative_to(root).parts:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        folders[str(ds.SeriesInstanceUID)] = path.parent
    return folders


def write_manifest(path: Path, uids: list[str], download_url: str, *, retries: int = 4,
                   basket: str = "manifest-1700000000000.tcia") -> Path:
    lines = [
        f"downloadServerUrl={download_url}",
        "includeAnnotation=true",
        f"noOfrRetry={retries}",
        f"databasketId={basket}",
        "manifestVersion=3.0",
        "ListOfSeriesToDownload=",
        *uids,
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the Java Data Retriever's folder names, worked out from the DICOM headers ------------
# (independently of nbia_retriever.layout, so tests can check it against the Java rules)


def java_clean(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9 .-]", "", text) or "NA"


def java_part(text: str) -> str:
    return "" if text in ("", "null") else text + "-"


def java_desc(text: str) -> str:
    text = text.replace("/", "-")
    return "" if text in ("", "null", "-") else text[:53] + "-"


def raw(ds: pydicom.Dataset, keyword: str) -> str:
    """A header value as the archive's database holds it (multi-values joined by a
    backslash, as DICOM writes them)."""
    value = ds.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def java_series_folder(path: Path, collection: str) -> str:
    """What the Java GUI names the folder of the series this file belongs to."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    raw_date = str(ds.get("StudyDate", ""))
    date = f"{raw_date[4:6]}-{raw_date[6:8]}-{raw_date[:4]}" if len(raw_date) == 8 else ""
    number = ds.get("SeriesNumber")
    number_text = "" if number in (None, "") else f"{float(number):.6f}"
    study = (java_part(date) + java_part(java_clean(raw(ds, "StudyID")))
             + java_desc(java_clean(raw(ds, "StudyDescription")))
             + str(ds.StudyInstanceUID)[-5:])
    series = (java_part(number_text) + java_desc(java_clean(raw(ds, "SeriesDescription")))
              + str(ds.SeriesInstanceUID)[-5:])
    return f"{collection}/{ds.PatientID}/{study}/{series}"


def download_report(*args: object, **kwargs: object) -> Report:
    """``nbia_retriever.download`` for tests that look at the report of a run that may
    stop: what stops the run is raised (an ``NbiaError`` carrying ``.report``); this
    returns that report instead, so the test can check what was left behind."""
    from nbia_retriever import NbiaError, download

    try:
        return download(*args, **kwargs)  # type: ignore[no-any-return]
    except NbiaError as exc:
        report = getattr(exc, "report", None)
        if report is None:
            raise
        return report  # type: ignore[no-any-return]


def start_workers(engine: Engine, count: int = 1) -> Engine:
    """Start ``engine``'s worker processes and wait until ``count`` take attempts
    (attempts do not wait for a worker: they run on threads until one is ready, so a
    test that needs workers waits for them first)."""
    engine.start_workers()
    deadline = time.monotonic() + 60
    while engine.stats().processes < count:
        assert time.monotonic() < deadline, "the worker processes did not start"
        engine.wait(0.02)
    return engine
