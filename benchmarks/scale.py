"""Scale without transfer: parse and plan NLST-sized manifests, each in a fresh process.

Run by run.py (``python benchmarks/scale.py WHAT N WORK_DIR``); prints one JSON line.
A fresh interpreter per measurement keeps the harness's heap and imports out of the
numbers; peak RSS is the process's own ``ru_maxrss``.

* ``parse``: ``read_manifest`` of an N-series .tcia file (written once, cached): the
  first (cold) and the best of 5.
* ``plan``: what ``Engine.prepare`` does for N series once the server has answered:
  read the manifest, open a fresh destination and its journal, then, batch by batch,
  decode the v4 ``getSeriesMetadata`` CSV (10,000 rows a batch, the real 40 columns,
  NLST-shaped: 3 series a study, 2 studies a patient), normalise it, choose every
  folder, journal it. The answers are files on disk (written once, cached), read one
  batch at a time as a server's would arrive, so the RSS is the engine's and not a
  copy of the server. ``decode_s`` (reading and CSV-decoding the answers, and
  freeing the decoded cells, which depends on the wire format, not on us) is reported
  apart from ``plan_s``. The journal rows of the series to do are written by a thread of
  their own while the answers arrive (SQLite runs without the GIL); ``plan_s`` ends when
  ``prepare`` returns, as a download's first series would start.
* ``finish``: turn a planned destination into a finished download of N series (one
  tiny image each), by the engine's own adoption of folders found on disk: what a
  no-op re-run of 200,000 series needs, without downloading 200,000 series. Prints
  the manifest and destination; run.py times the no-op re-run as a whole process.
"""

from __future__ import annotations

import csv
import io
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from bench_manifest import generate_uids

from nbia_retriever.api import MetadataBatch
from nbia_retriever.api.records import csv_table, infos_by_uid
from nbia_retriever.engine import DownloadOptions, Engine, Verdict
from nbia_retriever.manifest import DEFAULT_DOWNLOAD_URL, read_manifest, write_manifest
from nbia_retriever.models import RecordShape, SeriesState
from nbia_retriever.server.builds import CAMEL_COLUMNS

RUNS = 5
BATCH = 10_000
DESCRIPTIONS = ("0OPAGELSPLUSD3602.512080.00.11.5", "2OPAGELSPLUSLUNG3502",
                "0OPAGELSPLUSD3602.512060.00.11.5")


def timed(func: Callable[[], object], runs: int = RUNS) -> tuple[float, float]:
    """(first, best) seconds over ``runs`` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times[0], min(times)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def manifest_path(count: int, work: Path) -> Path:
    path = work / f"manifest-{count}.tcia"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / f"manifest-{count}.tcia.tmp"
        write_manifest(tmp, generate_uids(count), download_server_url=DEFAULT_DOWNLOAD_URL,
                       databasket_id=f"manifest-{count}.tcia")
        tmp.replace(path)
    return path


def parse(count: int, work: Path) -> dict[str, object]:
    path = manifest_path(count, work)
    manifest = read_manifest(path)
    assert len(manifest.series_uids) == count, len(manifest.series_uids)
    first, best = timed(lambda: read_manifest(path))
    return {"series": count, "mb": round(path.stat().st_size / 1e6, 2), "first_s": first,
            "best_s": best, "peak_rss": peak_rss()}


# --------------------------------------------------------------------------- answers

def answers_dir(count: int, work: Path) -> Path:
    """The v4 answers for the whole manifest, one CSV file per 10,000-series batch."""
    folder = work / f"answers-{count}"
    if (folder / "done").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    uids = generate_uids(count)
    for number, start in enumerate(range(0, count, BATCH)):
        out = io.StringIO()
        writer = csv.writer(out, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerow(CAMEL_COLUMNS)
        for i in range(start, min(start + BATCH, count)):
            patient, study = divmod(i // 3, 2)
            values = dict.fromkeys(CAMEL_COLUMNS, "")
            values.update(
                PatientID=str(100000 + patient), PatientSex="M", Phantom="NO",
                StudyInstanceUID=f"1.2.840.113654.2.55.{patient}.{study}",
                StudyDate=f"{1999 + study}-01-02 00:00:00.0", StudyDesc="NLST-LSS",
                StudyID=str(study), SeriesInstanceUID=uids[i], Collection="NLST",
                Site="NLST", Modality="CT", SeriesDescription=DESCRIPTIONS[i % 3],
                BodyPartExamined="CHEST", SeriesNumber=f"{1 + i % 3}.000000",
                AnnotationsFlag="0", Manufacturer="GE MEDICAL SYSTEMS",
                ManufacturerModelName="LightSpeed QX/i", ImageCount="1", FileSize="2560",
                LicenseName="Creative Commons Attribution 4.0 International License",
                LicenseURI="https://creativecommons.org/licenses/by/4.0/",
                DataDescriptionURI="https://doi.org/10.7937/TCIA.HMQ8-J677",
                ReleasedStatus="Released", DateReleased="2020-01-01 00:00:00.0",
                Authorized="1")
            writer.writerow([values[c] for c in CAMEL_COLUMNS])
        (folder / f"batch-{number:04d}.csv").write_text(out.getvalue(), encoding="utf-8")
    (folder / "done").write_text("", encoding="utf-8")
    return folder


class DiskSource:
    """The engine's :class:`~nbia_retriever.engine.Source`, answering metadata from the
    cached CSV files one batch at a time (what ``NbiaClient.metadata_batches`` does with
    a server's v4 answers); it never downloads."""

    name = "bench answers on disk"

    def __init__(self, folder: Path) -> None:
        self.files = sorted(folder.glob("batch-*.csv"))
        self.decode_s = 0.0
        self.normalise_s = 0.0

    def check(self) -> None:
        pass

    def prepare(self) -> None:
        pass

    def metadata_batches(self, uids: Sequence[str]) -> Iterator[MetadataBatch]:
        for number, start in enumerate(range(0, len(uids), BATCH)):
            part = list(uids[start:start + BATCH])
            t0 = time.perf_counter()
            header, rows = csv_table(self.files[number].read_text(encoding="utf-8"), "bench")
            t1 = time.perf_counter()
            want = dict(zip(part, part, strict=True))  # as NbiaClient's v4 batches do
            infos = RecordShape(header).infos(rows, known=want)
            found = infos_by_uid(infos, want)
            t2 = time.perf_counter()
            del header, rows, infos  # freeing the decoded cells is the decoder's cost
            t3 = time.perf_counter()
            self.decode_s += t1 - t0 + t3 - t2
            self.normalise_s += t2 - t1
            yield MetadataBatch(part, found)

    def unavailable(self, uid: str) -> tuple[SeriesState, str]:
        return SeriesState.NO_DATA, "not in the bench answers"

    def open(self, info: object) -> Iterator[object]:
        raise AssertionError("the scale benchmark never downloads")

    def verdict(self, error: Exception) -> Verdict:
        return Verdict(retry=False)

    def close(self) -> None:
        pass


def plan(count: int, work: Path, dest: Path | None = None) -> dict[str, object]:
    path = manifest_path(count, work)
    source = DiskSource(answers_dir(count, work))
    scratch = dest is None
    if dest is None:
        dest = Path(tempfile.mkdtemp(dir=work, prefix="plan-"))
    start = time.perf_counter()
    manifest = read_manifest(path)
    parsed = time.perf_counter()
    engine = Engine(manifest, dest, DownloadOptions(), source=source)  # type: ignore[arg-type]
    engine.prepare(write=True)
    done = time.perf_counter()
    planned = sum(1 for r in engine.results.values() if r.state == SeriesState.NOT_STARTED)
    engine.close()
    if scratch:
        shutil.rmtree(dest, ignore_errors=True)
    assert planned == count, (planned, count)
    total = done - start
    return {"series": count, "parse_s": parsed - start, "decode_s": source.decode_s,
            "normalise_s": source.normalise_s, "plan_s": total - source.decode_s,
            "total_s": total, "peak_rss": peak_rss()}


def finish(count: int, work: Path) -> dict[str, object]:
    """A finished download of ``count`` series under ``work/finished-<count>`` (cached)."""
    dest = work / f"finished-{count}"
    marker = dest / "finished.json"
    path = manifest_path(count, work)
    if not marker.is_file():
        shutil.rmtree(dest, ignore_errors=True)
        root = dest / path.stem
        # The folders the engine would choose, each with its one image ...
        source = DiskSource(answers_dir(count, work))
        engine = Engine(read_manifest(path), dest, DownloadOptions(), source=source)  # type: ignore[arg-type]
        engine.prepare()
        image = b"\0" * 128 + b"DICM" + b"\0" * 2428
        for uid in engine.results:
            folder = root / engine.folder_of(uid)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "1-1.dcm").write_bytes(image)
        engine.close()
        # ... which a run then adopts: journal rows and metadata.csv, the engine's way.
        adopt = Engine(read_manifest(path), dest, DownloadOptions(), source=DiskSource(
            answers_dir(count, work)))  # type: ignore[arg-type]
        adopt.prepare(write=True)
        adopted = adopt.report.adopted
        adopt.close()
        assert adopted == count, (adopted, count)
        marker.write_text(json.dumps({"series": count}), encoding="utf-8")
    return {"series": count, "manifest": str(path), "dest": str(dest)}


def main() -> None:
    what, count, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    work.mkdir(parents=True, exist_ok=True)
    result = {"parse": parse, "plan": plan, "finish": finish}[what](count, work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
