"""The first no-op re-run after a big download, against the ones after it (issue 26 item 5).

``python benchmarks/noop_first.py prepare N`` downloads N one-image series from the
reference server once and keeps a copy of the finished tree (``cp -a``: mtimes and the
journal's -wal/-shm files as the download left them). ``python benchmarks/noop_first.py
time N`` restores that copy and times three whole-process no-op re-runs (the first pays
whatever the download left behind). The iteration loop for issue 26 item 5; run.py's
scale scenario measures the same thing on 50,000 series.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from archives import ArchiveSpec, ensure_archive
from harness import ServerProcess, remove_tree, write_manifest

HERE = Path(__file__).resolve().parent
OURS = Path(sys.executable).parent / "nbia-retriever"
WORK = HERE.parent / "bench-work"


def main() -> None:
    what, count = sys.argv[1], int(sys.argv[2])
    spec = ArchiveSpec("scale", patients=count // 2, series=2, images=1, image_bytes=2048)
    base = WORK / "noop" / str(count)
    keep, live = base / "kept", base / "live"
    if what == "prepare":
        archive = ensure_archive(spec, WORK)
        remove_tree(base)
        base.mkdir(parents=True)
        with ServerProcess(OURS, archive.root, base / "logs") as server:
            manifest = write_manifest(keep / "manifest.tcia", server.download_url,
                                      archive.uids)
            start = time.perf_counter()
            subprocess.run([str(OURS), "download", str(manifest), "-d", str(keep / "out"),
                            "-q"], check=True)
            print(f"download {time.perf_counter() - start:.1f} s", flush=True)
        return
    remove_tree(live)
    subprocess.run(["cp", "-a", str(keep), str(live)], check=True)
    cmd = [str(OURS), "download", str(live / "manifest.tcia"), "-d", str(live / "out"),
           "--json", "--api-url", "http://127.0.0.1:9/nbia-api/services"]
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(round(time.perf_counter() - start, 2))
        last = json.loads(done.stdout.strip().splitlines()[-1])
        if done.returncode != 0 or last.get("skipped") != count:
            raise SystemExit(f"not a no-op: rc {done.returncode} {str(last)[:300]}")
    print(json.dumps({"series": count, "runs_s": walls}))


if __name__ == "__main__":
    main()
