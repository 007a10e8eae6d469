"""The first no-op re-run after a big download, against the ones after it (issue 26 item 5).

``python benchmarks/noop_first.py prepare N`` downloads N one-image series from the
reference server once, into ``bench-work/noop/N/kept/out``, and saves the journal files
(``.nbia/journal.sqlite`` and its -wal/-shm, as the download left them) beside it.
``python benchmarks/noop_first.py time N`` puts those journal files back and times three
whole-process no-op re-runs in place (the first pays whatever the download left behind).
The iteration loop for issue 26 item 5; run.py's scale scenario measures the same thing on
50,000 series.

Only the journal is restored, never the tree: a copy of the tree (``cp -a``) gives every
folder a new ctime, the stamp a journal row is signed with (a ctime cannot be set back,
which is why it is the stamp), so the first run after a copy counts every folder and
signs every row again: it measured the copy, not the download (21.5 s against 4 s,
where in place it is 2.0 s against 1.3-1.5 s on the same busy machine). A no-op run
writes nothing but the journal (``.nbia/staging`` gets a run folder, removed again).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from archives import ArchiveSpec, ensure_archive
from harness import ServerProcess, remove_tree, write_manifest

HERE = Path(__file__).resolve().parent
OURS = Path(sys.executable).parent / "nbia-retriever"
WORK = HERE.parent / "bench-work"


JOURNAL_FILES = ("journal.sqlite", "journal.sqlite-wal", "journal.sqlite-shm")


def state_dir(out: Path) -> Path:
    """The root's .nbia (the one root under ``out``: the manifest's basket name)."""
    found = sorted(out.glob("*/.nbia/journal.sqlite"))
    if len(found) != 1:
        raise SystemExit(f"expected one download root under {out}, found {len(found)}")
    return found[0].parent


def main() -> None:
    what, count = sys.argv[1], int(sys.argv[2])
    spec = ArchiveSpec("scale", patients=count // 2, series=2, images=1, image_bytes=2048)
    base = WORK / "noop" / str(count)
    keep = base / "kept"
    saved = keep / "journal-after-download"
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
        saved.mkdir()
        state = state_dir(keep / "out")
        for name in JOURNAL_FILES:
            if (state / name).exists():
                shutil.copy2(state / name, saved / name)
        return
    state = state_dir(keep / "out")
    for name in JOURNAL_FILES:  # the journal as the download left it; the tree as is
        (state / name).unlink(missing_ok=True)
        if (saved / name).exists():
            shutil.copy2(saved / name, state / name)
            # On disk before the clock starts: the first run's checkpoint would otherwise
            # flush the copy (a quarter of a GB), which the download had flushed itself.
            fd = os.open(state / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    cmd = [str(OURS), "download", str(keep / "manifest.tcia"), "-d", str(keep / "out"),
           "--json", "--api-url", "http://127.0.0.1:9/nbia-api/services"]
    walls, cpus = [], []
    for _ in range(3):
        before = os.times()
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        walls.append(round(time.perf_counter() - start, 2))
        after = os.times()
        cpus.append(round(after.children_user + after.children_system
                          - before.children_user - before.children_system, 2))
        last = json.loads(done.stdout.strip().splitlines()[-1])
        if done.returncode != 0 or last.get("skipped") != count:
            raise SystemExit(f"not a no-op: rc {done.returncode} {str(last)[:300]}")
    print(json.dumps({"series": count, "runs_s": walls, "cpu_s": cpus}))


if __name__ == "__main__":
    main()
