"""Where our client's CPU goes: one download under py-spy, summarised by cost centre.

py-spy samples every thread (cProfile sees only the main one, and our work happens in
worker threads), including time in C calls that release the GIL: zlib, MD5, file I/O.
Samples are attributed to the innermost frame of our own code or of the library doing
the work, then grouped into cost centres (inflate, CRC, MD5, file writes, ...). py-spy
is optional (``pip install py-spy`` into .venv); without it the profile is skipped.

Usage alone: ``python benchmarks/profile_ours.py MANIFEST OUT_DIR [--workers N]``.
"""

from __future__ import annotations

import linecache
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nbia_retriever

RATE = 250  # samples per second

#: Keywords of the source line an innermost frame of ours is executing: such a line is a
#: C call (zlib, hashlib, file I/O) that py-spy cannot see into without --native.
LINE_CENTRES: list[tuple[str, tuple[str, ...]]] = [
    # A worker process's socket and queues: blocked, not working.
    ("waiting (locks, events)", ("sock.recv(", "recv_fds(", "jobs.get()", "answers.get()")),
    ("inflate (ISA-L or zlib decompress)", ("decompress(",)),
    ("CRC-32", ("crc32(",)),
    ("MD5 of each image", ('["md5"].update(', "md5.update(", ".hexdigest(")),
    ("write image bytes to staging", (".write(",)),
    ("open/close/rename staging files", ("open(", ".close()", "rename(", "mkdir(", "rmtree(")),
]
#: Library frames by path prefix.
LIB_CENTRES: list[tuple[str, tuple[str, ...]]] = [
    ("HTTP read (httpx/httpcore/h11)", ("httpcore/", "h11/", "httpx/", "ssl.py", "socket.py")),
    ("DICOM header parse for naming (pydicom)", ("pydicom/",)),
    ("journal/report (sqlite, csv)", ("sqlite3/", "csv.py")),
    ("imports and start-up", ("<frozen importlib", "importlib/", "click/")),
    ("waiting (locks, events)", ("threading.py", "queue.py")),
]
FILE_CENTRES = {
    "_zipstream.py": "zip reader bookkeeping (Python)",
    "procs.py": "worker process messages (Python)",
    "engine.py": "engine bookkeeping (Python)",
    "journal.py": "journal/report (sqlite, csv)",
    "report.py": "journal/report (sqlite, csv)",
    "naming.py": "naming and layout (Python)",
    "layout.py": "naming and layout (Python)",
    "api.py": "HTTP read (httpx/httpcore/h11)",
}


def _split(frame: str) -> tuple[str, str, int]:
    """``"func (path/file.py:12)"`` -> (func, path, line)."""
    name, _, where = frame.rpartition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    return name, path, int(line) if line.isdigit() else 0


def _source_line(path: str, line: int) -> str:
    if not path.startswith("nbia_retriever/"):
        return ""
    full = Path(nbia_retriever.__file__).resolve().parent.parent / path
    return linecache.getline(str(full), line)


def classify(frames: list[str]) -> str:
    """The cost centre of one sample, from its innermost frame (outwards if unknown)."""
    for frame in reversed(frames):
        _func, path, line = _split(frame)
        if path.startswith("nbia_retriever/"):
            text = _source_line(path, line)
            for centre, keys in LINE_CENTRES:
                if any(k in text for k in keys):
                    return centre
            return FILE_CENTRES.get(path.rsplit("/", 1)[-1], "other (ours)")
        for centre, prefixes in LIB_CENTRES:
            if any(p in path for p in prefixes):
                return centre
    return "other"


def summarise(raw: Path, wall: float, label: str = "download") -> dict[str, object]:
    """Self time per frame and per cost centre from py-spy's raw (collapsed) output."""
    total = 0
    self_time: Counter[str] = Counter()
    centres: Counter[str] = Counter()
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        func, path, lineno = _split(frames[-1])
        where = "/".join(path.split("/")[-2:])
        text = _source_line(path, lineno).strip()
        self_time[f"{where}:{lineno} {func}" + (f": {text}" if text else "")] += n
        centres[classify(frames)] += n
    seconds = total / RATE
    lines = [
        f"One {label} sampled at {RATE} Hz: {total} samples (~{seconds:.1f} s) over "
        f"{wall:.1f} s wall (py-spy slows the run; the shares are what matter).",
        "",
        "| cost centre | share of samples |",
        "|---|---:|",
    ]
    for centre, n in centres.most_common():
        lines.append(f"| {centre} | {100 * n / max(total, 1):.1f}% |")
    lines += ["", "Top lines by self time:", "", "| line | self |", "|---|---:|"]
    for frame, n in self_time.most_common(12):
        shown = frame.replace("|", "\\|")
        lines.append(f"| `{shown[:110]}` | {100 * n / max(total, 1):.1f}% |")
    return {"samples": total, "wall": wall, "centres": dict(centres),
            "top": self_time.most_common(25), "lines": lines}


def profile_download(ours: Path, manifest: Path, out: Path, log_dir: Path,
                     workers: int | None = None, label: str = "download"
                     ) -> dict[str, object] | None:
    """Download ``manifest`` twice under py-spy; None when py-spy is not installed.

    First with ``--gil`` (only the thread holding the GIL is sampled: the Python work
    that serialises the workers, which is what limits a threaded client on 2 cores), then
    all threads (where wall time goes, C calls included; a thread waiting to get the GIL
    back after a C call is charged to that call's line, so read this one with care).
    """
    spy = shutil.which("py-spy", path=str(ours.parent)) or shutil.which("py-spy")
    if not spy:
        print("  profile skipped: py-spy not installed (pip install py-spy into .venv)")
        return None
    log_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"lines": []}
    lines: list[str] = result["lines"]  # type: ignore[assignment]
    for mode, flags, title in (
        ("gil", ["--gil"], "Holding the GIL (py-spy --gil)"),
        ("threads", [], "All threads, C calls included (py-spy)"),
    ):
        raw = log_dir / f"py-spy-{mode}.txt"
        shutil.rmtree(out, ignore_errors=True)
        # --subprocesses: the worker processes (engine.procs) do the byte work.
        cmd = [spy, "record", "-r", str(RATE), "-f", "raw", "-o", str(raw), "--threads",
               "--subprocesses", *flags, "--", sys.executable, str(ours), "download",
               str(manifest), "-d", str(out), "-q"]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (log_dir / f"py-spy-{mode}.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0 or not raw.is_file():
            print(f"  profile failed (see {log_dir / f'py-spy-{mode}.log'})")
            return None
        summary = summarise(raw, wall, label)
        result[mode] = {k: v for k, v in summary.items() if k != "lines"}
        lines += [f"### {title}", "", *summary["lines"], ""]  # type: ignore[misc]
        centres = Counter(summary["centres"])  # type: ignore[arg-type]
        total = max(int(summary["samples"]), 1)  # type: ignore[call-overload]
        print(f"  profile ({mode}): " + ", ".join(
            f"{c} {100 * n / total:.0f}%" for c, n in centres.most_common(5)), flush=True)
    return result


def main() -> None:
    manifest, out = Path(sys.argv[1]), Path(sys.argv[2])
    workers = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--workers" else None
    ours = Path(sys.executable).parent / "nbia-retriever"
    result = profile_download(ours, manifest, out, out.parent / "profile-logs", workers)
    if result:
        print("\n".join(str(line) for line in result["lines"]))  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
