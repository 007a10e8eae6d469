"""Shared helpers for end-to-end tests: what the archive holds vs what a client wrote."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pydicom

from nbia_retriever.naming import ImageKey, assign_names


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
