"""Measuring one client run: a process tree's wall time, CPU, peak memory and output.

Every client (ours, the peers, the curl+unzip floor) runs as its own process so the
numbers are comparable: CPU is the user+sys of the whole tree (``wait4`` accounts every
descendant its parent reaped: curl and unzip under xargs, nbiatoolkit's pool workers),
and peak RSS is the larger of two views: the sum of RSS over the live tree, sampled every
50 ms (forked workers share pages, so this overstates a multi-process client a little),
and the largest single process's ``ru_maxrss`` (exact, no sampling gap).

``ru_maxrss`` survives ``exec``: a child forked from this (large) harness inherits the
harness's high-water mark. So the client is started under GNU ``time``, a small process
whose own child's ``ru_maxrss`` is clean, and ``time`` writes it to a file. Without
``/usr/bin/time`` only the sampled view is used.

Output is checked by content, not by count: the MD5 multiset of every ``*.dcm`` written
against the archive's. A client that drops or overwrites images is caught however fast
it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.05
GNU_TIME = "/usr/bin/time"
_READ = 1 << 20


@dataclass
class Measured:
    """What one process tree cost; ``peak_rss`` in bytes, times in seconds."""

    wall: float
    user: float
    sys: float
    peak_rss: int
    returncode: int
    timed_out: bool = False
    server_cpu: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""

    @property
    def cpu(self) -> float:
        return self.user + self.sys


@dataclass
class Checked:
    """The output compared with the archive: files and bytes that match, and strays."""

    expected_files: int
    expected_bytes: int
    ok_files: int = 0
    ok_bytes: int = 0
    stray_files: int = 0  # .dcm files that match nothing expected (corrupt or duplicated)

    @property
    def complete(self) -> bool:
        return self.ok_files == self.expected_files and self.stray_files == 0


@dataclass
class RunResult:
    """One client run in one scenario."""

    client: str
    workers: str
    measured: Measured
    checked: Checked
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        """MB/s (1e6 bytes) of correct DICOM bytes written."""
        return self.checked.ok_bytes / 1e6 / self.measured.wall if self.measured.wall else 0.0

    @property
    def cpu_per_gb(self) -> float | None:
        if not self.checked.ok_bytes:
            return None
        return self.measured.cpu / (self.checked.ok_bytes / 1e9)

    def as_dict(self) -> dict[str, object]:
        return {
            "client": self.client,
            "workers": self.workers,
            "measured": asdict(self.measured),
            "checked": asdict(self.checked),
            "throughput_mb_s": round(self.throughput, 2),
            "cpu_s_per_gb": None if self.cpu_per_gb is None else round(self.cpu_per_gb, 2),
            **self.extra,
        }


def _tree_rss(root: psutil.Process, include_root: bool) -> int:
    total = 0
    try:
        procs = [root] if include_root else []
        procs += root.children(recursive=True)
    except psutil.Error:
        return 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def run_measured(
    cmd: Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
    stdin_path: Path | None = None,
    log_dir: Path,
    server_pid: int | None = None,
) -> Measured:
    """Run ``cmd`` to completion and measure its process tree.

    The child gets a session of its own so a timeout can stop the whole tree (and only
    it). ``server_pid``: also return that process's CPU seconds over the same window,
    so the reader knows how much of the two cores the server took.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    server = psutil.Process(server_pid) if server_pid else None
    server_before = sum(server.cpu_times()[:2]) if server else 0.0
    stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL  # noqa: SIM115
    rss_file = log_dir / "maxrss.txt"
    rss_file.unlink(missing_ok=True)
    wrapped = os.access(GNU_TIME, os.X_OK)
    argv = [GNU_TIME, "-q", "-f", "%M", "-o", str(rss_file), *cmd] if wrapped else list(cmd)
    try:
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=cwd, env=dict(env) if env else None,
                                    stdin=stdin, stdout=out, stderr=err,
                                    start_new_session=True)
            peak = 0
            done = threading.Event()
            timed_out = threading.Event()

            def sample() -> None:
                nonlocal peak
                try:
                    root = psutil.Process(proc.pid)
                except psutil.Error:
                    return
                while not done.is_set():
                    peak = max(peak, _tree_rss(root, include_root=not wrapped))
                    if time.perf_counter() - start > timeout and not timed_out.is_set():
                        timed_out.set()
                        with contextlib.suppress(ProcessLookupError):
                            os.killpg(proc.pid, signal.SIGKILL)
                    done.wait(SAMPLE_SECONDS)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
            done.set()
            sampler.join()
            # Anything the client left running (it should not) dies with its session.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if stdin_path:
            stdin.close()  # type: ignore[union-attr]
    server_cpu = sum(server.cpu_times()[:2]) - server_before if server else 0.0
    maxrss = 0
    if wrapped:
        with contextlib.suppress(OSError, ValueError):
            maxrss = int(rss_file.read_text().split()[-1]) * 1024
    return Measured(
        wall=wall,
        user=usage.ru_utime,
        sys=usage.ru_stime,
        peak_rss=max(peak, maxrss),
        returncode=proc.returncode,
        timed_out=timed_out.is_set(),
        server_cpu=server_cpu,
        stdout_tail=_tail(out_path),
        stderr_tail=_tail(err_path),
    )


def md5_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(_READ):
            digest.update(block)
    return digest.hexdigest()


def check_output(out: Path, expected: Counter[tuple[str, int]]) -> Checked:
    """Compare every ``*.dcm`` under ``out`` with the expected (md5, size) multiset."""
    found: Counter[tuple[str, int]] = Counter()
    for dirpath, _dirs, files in os.walk(out):
        for name in files:
            if name.lower().endswith(".dcm"):
                path = Path(dirpath) / name
                found[(md5_file(path), path.stat().st_size)] += 1
    ok = found & expected
    return Checked(
        expected_files=sum(expected.values()),
        expected_bytes=sum(size * n for (_md5, size), n in expected.items()),
        ok_files=sum(ok.values()),
        ok_bytes=sum(size * n for (_md5, size), n in ok.items()),
        stray_files=sum((found - expected).values()),
    )


def expected_digests(digests: Mapping[str, Sequence[Sequence[object]]],
                     uids: Iterable[str]) -> Counter[tuple[str, int]]:
    """The (md5, size) multiset of the given series, from an archive's digest table."""
    out: Counter[tuple[str, int]] = Counter()
    for uid in uids:
        for md5, size in digests[uid]:
            out[(str(md5), int(size))] += 1  # type: ignore[call-overload]
    return out


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the server

_API_LINE = re.compile(r"API:\s+(http://127\.0\.0\.1:(\d+))/nbia-api/services")


class ServerProcess:
    """``nbia-retriever serve`` as a process of its own, so its CPU is measured apart."""

    def __init__(self, exe: Path, archive: Path, log_dir: Path, faults: str | None = None,
                 startup_timeout: float = 900.0, extra: Sequence[str] = (),
                 command: Sequence[str] | None = None) -> None:
        self.exe = exe
        #: The whole command line instead of ``exe serve ARCHIVE`` (the fast server).
        self.command = list(command) if command is not None else None
        self.archive = archive
        self.faults = faults
        self.extra = list(extra)
        self.log = log_dir / "server.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command or [str(self.exe), "serve", str(self.archive), "--port", "0"]
        if self.faults:
            cmd += ["--faults", self.faults]
        cmd += self.extra
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            match = _API_LINE.search(self.log.read_text(errors="replace"))
            if match:
                self.url = match.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)  # polling a log file for readiness, not synchronising threads
        self.stop()
        raise RuntimeError(f"the reference server did not start; see {self.log}:\n"
                           + _tail(self.log))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def download_url(self) -> str:
        return f"{self.url}/nbia-download/servlet/DownloadServlet"

    @property
    def v1_url(self) -> str:
        return f"{self.url}/nbia-api/services/v1/"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_manifest(path: Path, download_url: str, uids: Sequence[str],
                   basket: str = "manifest-bench.tcia") -> Path:
    """A v3.0 manifest pointing at the running server (its port changes per run)."""
    lines = [
        f"downloadServerUrl={download_url}",
        "includeAnnotation=true",
        "noOfrRetry=4",
        f"databasketId={basket}",
        "manifestVersion=3.0",
        "ListOfSeriesToDownload=",
        *uids,
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def dump_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)
