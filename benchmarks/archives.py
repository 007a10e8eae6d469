"""Synthetic archives for the benchmarks, generated once and cached under bench-work/.

An archive is keyed by its parameters: a folder ``<name>-<hash>`` holds the DICOM files,
the server's index cache (pre-compressed images, built here so no timed run pays for
it) and ``bench-archive.json``, written last, with the parameters and each series'
(md5, size) list. Its presence means "complete"; a folder without it is a crashed
generation and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness import dump_json, md5_file

from nbia_retriever.server.index import ArchiveIndex
from nbia_retriever.server.synth import generate_archive

MARKER = "bench-archive.json"


@dataclass(frozen=True)
class ArchiveSpec:
    """Counts as in ``generate_archive``; ``patients`` x ``series`` series in total."""

    name: str
    patients: int
    series: int
    images: int
    image_bytes: int
    seed: int = 1

    @property
    def total_series(self) -> int:
        return self.patients * self.series

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return f"{self.name}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"


@dataclass
class Archive:
    root: Path
    uids: list[str]  # manifest order
    digests: dict[str, list[list[object]]]  # uid -> [[md5, size], ...]
    total_bytes: int
    total_files: int


def ensure_archive(spec: ArchiveSpec, work: Path, log: bool = True) -> Archive:
    """The archive for ``spec``, generating and indexing it on first use."""
    root = work / "archives" / spec.key
    marker = root / MARKER
    if not marker.is_file():
        if root.exists():
            shutil.rmtree(root)
        start = time.perf_counter()
        if log:
            print(f"  generating archive {spec.key} ({spec.total_series} series x "
                  f"{spec.images} images x {spec.image_bytes // 1024} KiB) ...", flush=True)
        # awkward=False: nbiatoolkit names files by InstanceNumber and would overwrite the
        # awkward cases' duplicates; the benchmark measures speed, the tests correctness.
        summary = generate_archive(root, seed=spec.seed, collections=1, patients=spec.patients,
                                   studies=1, series=spec.series, images=spec.images,
                                   image_bytes=spec.image_bytes, awkward=False,
                                   restricted=False)
        digests = {s.series_uid: [[md5_file(p), p.stat().st_size] for p in s.files]
                   for s in summary.series}
        ArchiveIndex.load(root)  # pre-compress every image into the server's cache
        manifest = (root / "manifest.tcia").read_text(encoding="utf-8").splitlines()
        start_at = next(i for i, line in enumerate(manifest)
                        if line.strip().lower() == "listofseriestodownload=") + 1
        uids = [line.strip() for line in manifest[start_at:] if line.strip()]
        dump_json(marker, {"spec": asdict(spec), "uids": uids, "digests": digests,
                           "total_bytes": summary.total_bytes,
                           "total_files": summary.total_files})
        if log:
            print(f"  ... {summary.total_bytes / 1e6:.0f} MB in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    data = json.loads(marker.read_text(encoding="utf-8"))
    return Archive(root=root, uids=list(data["uids"]), digests=data["digests"],
                   total_bytes=int(data["total_bytes"]), total_files=int(data["total_files"]))
