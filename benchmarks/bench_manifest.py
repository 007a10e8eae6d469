"""Micro benchmark: parse (and format) a 200,000-series manifest, NLST-sized.

Not a test (timings depend on the machine); run it by hand:
``.venv/bin/python benchmarks/bench_manifest.py [N]``. Prints the best of 5 runs.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nbia_retriever.manifest import (
    DEFAULT_DOWNLOAD_URL,
    format_manifest,
    parse_manifest,
    read_manifest,
)

ROOT = "1.3.6.1.4.1.14519.5.2.1."  # TCIA's re-identification root, as real manifests


def generate_uids(count: int, seed: int = 20240827) -> list[str]:
    rng = random.Random(seed)
    return [ROOT + str(rng.randrange(10**37, 10**38)) for _ in range(count)]


def best_of(runs: int, func: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    uids = generate_uids(count)
    text = format_manifest(uids, download_server_url=DEFAULT_DOWNLOAD_URL,
                           databasket_id="manifest-bench.tcia")
    crlf = "\ufeff" + text.replace("\n", ",\r\n")  # BOM, CRLF, trailing commas
    assert parse_manifest(text).series_uids == tuple(uids)
    print(f"{count:,} series, {len(text) / 1e6:.1f} MB of manifest")
    print(f"parse (LF)                 {best_of(5, lambda: parse_manifest(text)) * 1000:7.1f} ms")
    print(f"parse (BOM, CRLF, commas)  {best_of(5, lambda: parse_manifest(crlf)) * 1000:7.1f} ms")
    print(f"format                     {best_of(5, lambda: format_manifest(uids)) * 1000:7.1f} ms")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest-bench.tcia"
        path.write_text(text, encoding="utf-8")
        seconds = best_of(5, lambda: read_manifest(path))
        print(f"read_manifest (file)       {seconds * 1000:7.1f} ms")


if __name__ == "__main__":
    main()
