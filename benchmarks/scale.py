"""Scale without transfer: parse and plan an NLST-sized manifest, in a fresh process.

Run by run.py (``python benchmarks/scale.py parse|plan N WORK_DIR``); prints one JSON
line. A fresh interpreter per measurement keeps the harness's own heap and imports out
of the numbers. ``parse`` reports the best of 5 and the first (cold) run; ``plan``, slower, one run.

* ``parse``: ``read_manifest`` of an N-series .tcia file (written once, cached).
* ``plan``: what the engine does locally once the metadata has arrived, for N series:
  normalise N v4 metadata records, choose every folder (``series_relpaths``, which
  resolves clashes across the whole set), and record them in a fresh journal
  (``ensure`` + ``set_infos``). The network part of planning (v4 batch POSTs) is not
  included: it depends on the server, not on us.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_manifest import generate_uids

from nbia_retriever.engine.journal import Journal
from nbia_retriever.layout import series_relpaths
from nbia_retriever.manifest import DEFAULT_DOWNLOAD_URL, read_manifest, write_manifest
from nbia_retriever.models import SeriesInfo, SeriesState, normalise_series_metadata

RUNS = 5


def timed(func: Callable[[], object], runs: int = RUNS) -> tuple[float, float]:
    """(first, best) seconds over ``runs`` calls."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times[0], min(times)


def parse(count: int, work: Path) -> dict[str, object]:
    path = work / f"manifest-{count}.tcia"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        tmp = work / f"manifest-{count}.tcia.tmp"
        write_manifest(tmp, generate_uids(count), download_server_url=DEFAULT_DOWNLOAD_URL,
                       databasket_id=f"manifest-{count}.tcia")
        tmp.replace(path)
    manifest = read_manifest(path)
    assert len(manifest.series_uids) == count, len(manifest.series_uids)
    first, best = timed(lambda: read_manifest(path))
    return {"series": count, "mb": round(path.stat().st_size / 1e6, 2), "first_s": first,
            "best_s": best}


def _records(uids: list[str]) -> list[dict[str, str]]:
    """v4 getSeriesMetadata rows, shaped like NLST: 3 series per study, 2 studies each."""
    rows = []
    for i, uid in enumerate(uids):
        patient, study = divmod(i // 3, 2)
        rows.append({
            "Series Instance UID": uid, "Collection": "NLST", "Patient ID": f"{100000 + patient}",
            "Study Instance UID": f"1.2.840.113654.2.55.{patient}.{study}",
            "Study Date": f"{1 + study % 12:02d}-02-2000", "Study Description": "NLST-LSS",
            "Series Description": ["0OPAGELSPLUSD3602.512080.00.11.5", "2OPAGELSPLUSLUNG3502",
                                   "0OPAGELSPLUSD3602.512060.00.11.5"][i % 3],
            "Series Number": str(1 + i % 3), "Modality": "CT", "Manufacturer": "GE",
            "Image Count": "130", "File Size": "68000000",
            "License Name": "Creative Commons Attribution 4.0 International License",
        })
    return rows


def plan(count: int, work: Path) -> dict[str, object]:
    uids = generate_uids(count)
    records = _records(uids)
    infos: list[SeriesInfo] = []

    def normalise() -> None:
        infos[:] = [normalise_series_metadata(r) for r in records]

    n_first, n_best = timed(normalise, 1)
    p_first, p_best = timed(lambda: series_relpaths(infos), 1)
    assert len(series_relpaths(infos)) == count

    def journal() -> None:
        with tempfile.TemporaryDirectory(dir=work) as tmp:
            j = Journal(Path(tmp) / "journal.sqlite")
            j.ensure(uids, SeriesState.NOT_STARTED)
            j.set_infos(infos)
            j.close()

    work.mkdir(parents=True, exist_ok=True)
    j_first, j_best = timed(journal, 1)
    return {"series": count, "normalise_s": n_best, "folders_s": p_best, "journal_s": j_best,
            "total_best_s": n_best + p_best + j_best,
            "total_first_s": n_first + p_first + j_first}


def main() -> None:
    what, count, work = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    result = {"parse": parse, "plan": plan}[what](count, work)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
