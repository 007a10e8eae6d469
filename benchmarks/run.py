"""Benchmarks: our client against tcia-utils, nbiatoolkit and the curl+unzip floor.

``make bench`` runs this with NBIA_PEERS_PYTHON pointing at .venv-peers. Everything
happens on this machine: the reference server (``nbia-retriever serve``, a process of
its own whose CPU is reported per run) serves synthetic archives cached under
``bench-work/archives``, and every client runs as its own process tree, measured by
harness.run_measured and checked file by file against the archive's MD5s.

Scenarios (``--scenario NAME``, repeatable; default all), every client at its defaults
side by side, plus ours pinned at 1, 2, 4, 8 and 16 workers on loopback:

* ``lan``     loopback, no caps: 24 series x 40 images x 256 KiB, DEFLATED entries.
* ``stored``  the same, the server sending STORED entries (``serve --zip-stored``).
* ``fast``    issue 26: the same series (252 MB) and 96 of them (1 GB) from the fast
  server (``fastserver.py``: prepared zips sent with sendfile, STORED and DEFLATED), so
  the client and not the reference server sets the pace: ours against the floor at 8.
* ``wan``     the same series, 80 Mbit/s per connection, 100 ms per request.
* ``small``   many small series (the CBIS-DDSM shape): 500 series x 2 images x 128 KiB.
* ``firstbyte`` issue 26: the same 500 series from a server that thinks 1 s before each
  zip's first byte (``--faults first_byte=1``: a server building zips): ours at defaults
  against the floor at 16.
* ``huge``    one 1 GB series (2,000 x 512 KiB): memory must stay flat.
* ``drs``     issue 24 (``drs.py``): a 1 GB DRS object at 80 Mbit/s against curl on the
  same signed URL, cut at 75% (ours resumes with Range; curl restarts), and 1,000 64 KiB
  objects at 100 ms a request against curl 16 at a time (signed URL, then the file).
* ``transports`` the HTTP stacks compared (``transports.py``): what chose the design.
* ``scale``   issue 14: a 50,000-series download on the emulator (first series, total,
  peak RSS, no-op re-run), and planning 200,000 and 1,000,000 series without network.

Ours and the floor run ``--repeat`` times (best wall time kept), peers
``--peer-repeat`` times; runs are interleaved so background load hits every client
alike. A full run writes BENCHMARKS.md at the repository root; ``--quick`` or a
subset of scenarios writes ``bench-work/BENCHMARKS-partial.md`` unless ``--out`` says
otherwise. Raw numbers: ``bench-work/results.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from archives import Archive, ArchiveSpec, ensure_archive
from harness import (
    Checked,
    RunResult,
    ServerProcess,
    check_output,
    dump_json,
    expected_digests,
    remove_tree,
    run_measured,
    write_manifest,
)
from profile_ours import profile_download

from nbia_retriever._zipstream import INFLATE_LIBRARY
from nbia_retriever.engine import DownloadOptions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
OURS = VENV_BIN / "nbia-retriever"
FLOOR = HERE / "floor.sh"
PEER_DRIVER = HERE / "peer_driver.py"
MAX_STREAMS = DownloadOptions().max_connections
#: The floor's concurrency per scenario: the issue's reference points.
FLOOR_STREAMS = {"lan": 8, "stored": 8, "wan": 16, "small": 8, "huge": 8, "fast": 8,
                 "firstbyte": 16}
FAST_SERVER = HERE / "fastserver.py"
WAN_FAULTS = "bandwidth=80mbit,latency=0.1"
FIRST_BYTE_FAULTS = "first_byte=1"
INFLATE = {"isal": "ISA-L (isal)", "zlib": "zlib"}.get(INFLATE_LIBRARY, INFLATE_LIBRARY)
MB = 1e6
SCENARIOS = ("lan", "stored", "fast", "wan", "small", "firstbyte", "huge", "pieces", "idc",
             "drs",
             "transports", "scale")


# --------------------------------------------------------------------------- settings

@dataclass
class Settings:
    work: Path
    repeat: int = 3
    peer_repeat: int = 1
    lan_series: int = 24
    lan_images: int = 40
    image_kib: int = 256
    wan_series: int = 24
    fast_big_series: int = 96
    small_series: int = 500
    small_image_kib: int = 128
    huge_mb: int = 1000
    huge_image_kib: int = 512
    manifest_series: int = 200_000
    million_series: int = 1_000_000
    emulated_series: int = 50_000
    view_series: int = 3_000
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16)
    timeout: float = 600.0
    profile: bool = True
    quick: bool = False

    @classmethod
    def quick_sizes(cls, work: Path) -> Settings:
        return cls(work=work, repeat=1, lan_series=6, lan_images=10, image_kib=64,
                   wan_series=4, fast_big_series=12, small_series=40, small_image_kib=16,
                   huge_mb=64,
                   huge_image_kib=256, manifest_series=20_000, million_series=50_000,
                   emulated_series=500, view_series=300,
                   timeout=300.0, quick=True)


@dataclass
class Client:
    """One way of running one client. ``workers`` None: the client's own default."""

    kind: str  # ours | tcia-utils | nbiatoolkit | floor
    workers: int | None
    repeats: int
    roles: set[str] = field(default_factory=set)  # "default", "sweep", "design", "floor"
    extra: tuple[str, ...] = ()  # more flags for ours
    note: str = ""  # what the flags change, for the label

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "floor (curl+unzip)"
        return f"{self.kind} ({self.note})" if self.note else self.kind

    @property
    def workers_text(self) -> str:
        real = self.effective_workers
        if self.workers is None:
            return f"default ({real})"
        return str(real)

    @property
    def effective_workers(self) -> str:
        if self.workers is not None:
            return str(self.workers)
        return {"ours": f"adaptive, <= {MAX_STREAMS}", "tcia-utils": "10",
                "nbiatoolkit": "1"}.get(self.kind, "?")

    @property
    def slug(self) -> str:
        tail = "-" + "".join(c if c.isalnum() else "-" for c in self.note) if self.note else ""
        return f"{self.kind}-{self.workers if self.workers is not None else 'default'}{tail}"


def transfer_clients(settings: Settings, peers: bool, sweep: Sequence[int],
                     floor_streams: int, design: bool = False) -> list[Client]:
    """Ours at its default and pinned at each sweep point, the floor, the peers at their
    defaults."""
    clients = [Client("ours", None, settings.repeat, {"default"})]
    if design:
        # The design's other half: the same defaults with every stream on threads of one
        # process (no worker processes).
        clients.append(Client("ours", None, settings.repeat, {"design"},
                              extra=("--processes", "0"), note="threads only"))
        clients += [Client("ours", n, settings.repeat, {"design"},
                           extra=("--processes", "0"), note="threads only")
                    for n in (2, 16) if n in sweep]
    clients += [Client("ours", n, settings.repeat, {"sweep"}) for n in sweep]
    clients.append(Client("floor", floor_streams, settings.repeat, {"floor"}))
    if peers:
        clients += [Client(kind, None, settings.peer_repeat, {"default"})
                    for kind in ("tcia-utils", "nbiatoolkit")]
    return clients


# --------------------------------------------------------------------------- running

@dataclass
class Aggregate:
    """A client's runs in one scenario: best wall time, worst memory and completeness."""

    client: Client
    runs: list[RunResult]

    @property
    def best(self) -> RunResult:
        good = [r for r in self.runs if r.checked.complete and r.measured.returncode == 0]
        return min(good or self.runs, key=lambda r: r.measured.wall)

    @property
    def peak_rss(self) -> int:
        return max(r.measured.peak_rss for r in self.runs)

    @property
    def worst_checked(self) -> Checked:
        return min((r.checked for r in self.runs), key=lambda c: (c.ok_files, -c.stray_files))

    @property
    def complete(self) -> bool:
        return all(r.checked.complete for r in self.runs)

    @property
    def failed(self) -> bool:
        return any(r.measured.returncode != 0 or r.measured.timed_out for r in self.runs)


class Runner:
    def __init__(self, settings: Settings, peers_python: Path | None) -> None:
        self.settings = settings
        self.peers_python = peers_python
        self.env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost",
                    "no_proxy": "127.0.0.1,localhost"}
        for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            self.env.pop(var, None)
        # Every client runs as installed, bytecode compiled (pip does it at install; an
        # editable checkout under PYTHONDONTWRITEBYTECODE would recompile us every run).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "src")],
                       check=True, env=self.env)
        self.wanted: set[str] = set()
        self.transports: list[dict[str, object]] | None = None
        self.profile: dict[str, object] | None = None
        self.inflate: list[str] | None = None

    def command(self, client: Client, server: ServerProcess, manifest: Path, uid_file: Path,
                out: Path) -> tuple[list[str], Path | None]:
        """The command line for ``client`` and the file its stdin reads, if any."""
        n = client.workers
        if client.kind == "ours":
            cmd = [str(OURS), "download", str(manifest), "-d", str(out), "-q", *client.extra]
            return ([*cmd, "--workers", str(n)] if n is not None else cmd), None
        if client.kind == "floor":
            return ["sh", str(FLOOR), server.v1_url, str(out), str(n)], uid_file
        assert self.peers_python is not None
        cmd = [str(self.peers_python), str(PEER_DRIVER), client.kind, server.url, str(out),
               str(uid_file)]
        return ([*cmd, str(n)] if n is not None else cmd), None

    def transfer(self, name: str, archive: Archive, uids: Sequence[str],
                 clients: Sequence[Client], faults: str | None,
                 server_args: Sequence[str] = (),
                 server_cmd: Sequence[str] | None = None) -> list[Aggregate]:
        work = self.settings.work
        runs_dir = work / "runs" / name
        remove_tree(runs_dir)
        expected = expected_digests(archive.digests, uids)
        aggregates = {c.slug: Aggregate(c, []) for c in clients}
        with ServerProcess(OURS, archive.root, work / "logs" / name, faults=faults,
                           extra=server_args, command=server_cmd) as server:
            manifest = write_manifest(runs_dir / "manifest.tcia", server.download_url, uids)
            uid_file = runs_dir / "uids.txt"
            uid_file.write_text("\n".join(uids) + "\n", encoding="utf-8")
            for rep in range(max(c.repeats for c in clients)):
                for client in clients:
                    if rep >= client.repeats:
                        continue
                    out = runs_dir / f"{client.slug}-{rep}"
                    cmd, stdin = self.command(client, server, manifest, uid_file, out)
                    measured = run_measured(cmd, cwd=runs_dir, env=self.env,
                                            timeout=self.settings.timeout, stdin_path=stdin,
                                            log_dir=work / "logs" / name / f"{client.slug}-{rep}",
                                            server_pid=server.pid)
                    checked = check_output(out, expected)
                    remove_tree(out)
                    result = RunResult(client.label, client.workers_text, measured, checked)
                    aggregates[client.slug].runs.append(result)
                    print(f"  {name:6s} {client.label:20s} {client.workers_text:18s} "
                          f"{measured.wall:7.2f} s {result.throughput:7.1f} MB/s "
                          f"cpu {measured.cpu:6.2f} s rss {measured.peak_rss / MB:6.0f} MB "
                          f"files {checked.ok_files}/{checked.expected_files} "
                          f"server {measured.server_cpu:5.2f} s"
                          + (f" rc={measured.returncode}" if measured.returncode else "")
                          + (" TIMEOUT" if measured.timed_out else ""), flush=True)
            if name == "lan" and self.settings.profile:
                self.profile = profile_download(
                    OURS, manifest, runs_dir / "profile", work / "logs" / name / "profile",
                    label="LAN download (defaults)")
                remove_tree(runs_dir / "profile")
            if name == "lan" and "transports" in self.wanted:
                from transports import compare

                uid_file = runs_dir / "uids.txt"
                self.transports = compare(server.v1_url, uid_file, archive.total_bytes,
                                          repeat=self.settings.repeat)
            if name == "lan":
                from transports import inflate_comparison

                self.inflate = inflate_comparison(sorted(archive.root.rglob("*.dcm")))
        return list(aggregates.values())



# --------------------------------------------------------------------------- scenarios

def lan_spec(s: Settings) -> ArchiveSpec:
    per = 6 if s.lan_series % 6 == 0 else 1
    return ArchiveSpec("lan", patients=s.lan_series // per, series=per, images=s.lan_images,
                       image_bytes=s.image_kib * 1024)


def _script(runner: Runner, name: str, *args: object, timeout: float) -> dict[str, object]:
    """Run ``benchmarks/<name>`` in a fresh interpreter; its last stdout line is JSON."""
    done = subprocess.run([str(VENV_BIN / "python"), str(HERE / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=runner.env,
                          cwd=HERE)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_scale(runner: Runner) -> dict[str, object]:
    """Issue 14: planning without network (200,000 and 1,000,000 series), the no-op
    re-run of a finished 200,000-series download, a 50,000-series download on the
    emulator, and the interactive view on a slow server."""
    s = runner.settings
    scale_dir = s.work / "scale"
    out: dict[str, object] = {}
    for count in (s.manifest_series, s.million_series):
        # The first call also writes the manifest and the answers (cached); not timed.
        for what in ("parse", "plan"):
            result = _script(runner, "scale.py", what, count, scale_dir, timeout=s.timeout * 3)
            if what == "plan":  # best of 3 fresh processes, as ours is timed elsewhere
                runs = [result, *(_script(runner, "scale.py", what, count, scale_dir,
                                          timeout=s.timeout * 3) for _ in range(2))]
                result = dict(min(runs, key=lambda r: _num(r, "plan_s")))
                result["runs_s"] = [round(_num(r, "plan_s"), 2) for r in runs]
                result["peak_rss"] = max(_num(r, "peak_rss") for r in runs)
            out[f"{what}_{count}"] = result
            print(f"  scale  {what} {count:,}: {_brief(result)}", flush=True)
    out[f"noop_{s.manifest_series}"] = run_noop(runner, scale_dir)
    out["emulated"] = run_emulated(runner)
    out["view"] = run_view(runner)
    return out


def _brief(result: dict[str, object]) -> str:
    return ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else
                     f"{k} {int(v) / MB:.0f} MB" if k.endswith("rss") else f"{k} {v}"
                     for k, v in result.items() if k not in ("manifest", "dest"))


def _noop_runs(runner: Runner, cmd: list[str], cwd: Path, logs: Path,
               expect: int) -> dict[str, object]:
    """Best of three whole-process no-op re-runs; each must skip every series."""
    walls: list[float] = []
    rss = 0
    for rep in range(max(3, runner.settings.repeat)):
        m = run_measured(cmd, cwd=cwd, env=runner.env, timeout=runner.settings.timeout,
                         log_dir=logs / f"noop-{rep}")
        summary = _json_summary(m.stdout_tail)
        if m.returncode != 0 or summary.get("skipped") != expect:
            raise RuntimeError(f"the no-op re-run did work or failed: {summary or m}")
        walls.append(m.wall)
        rss = max(rss, m.peak_rss)
    return {"best_s": min(walls), "runs_s": walls, "peak_rss": rss}


def run_noop(runner: Runner, scale_dir: Path) -> dict[str, object]:
    """A finished download of N series (made once by the engine's adoption, see
    scale.py ``finish``) re-run as a whole process. The API URL is a closed port: a
    no-op must not need the server at all."""
    s = runner.settings
    count = s.manifest_series
    fin = _script(runner, "scale.py", "finish", count, scale_dir, timeout=s.timeout * 6)
    cmd = [str(OURS), "download", str(fin["manifest"]), "-d", str(fin["dest"]), "--json",
           "--api-url", "http://127.0.0.1:9/nbia-api/services"]
    result = {"series": count, **_noop_runs(runner, cmd, scale_dir, s.work / "logs" / "noop",
                                            count)}
    print(f"  scale  no-op re-run of {count:,}: {_brief(result)}", flush=True)
    return result


def _first_complete(stdout: Path, start: float) -> float:
    """Seconds from ``start`` (epoch) to the first "Complete" event of a --json run."""
    with stdout.open(encoding="utf-8") as lines:
        for line in lines:
            if '"Complete"' in line:
                event = json.loads(line)
                if event.get("state") == "Complete" and "time" in event:
                    return float(event["time"]) - start
    raise RuntimeError(f"no series completed; see {stdout}")


def run_emulated(runner: Runner) -> dict[str, object]:
    """N series of one small image each from the reference server (a process of its
    own): time to the first complete series, total, peak RSS, then no-op re-runs."""
    s = runner.settings
    spec = ArchiveSpec("scale", patients=s.emulated_series // 2, series=2, images=1,
                       image_bytes=2048)
    archive = ensure_archive(spec, s.work)
    dest = s.work / "runs" / "emulated"
    logs = s.work / "logs" / "emulated"
    remove_tree(dest)
    with ServerProcess(OURS, archive.root, logs) as server:
        manifest = write_manifest(dest / "manifest.tcia", server.download_url, archive.uids)
        cmd = [str(OURS), "download", str(manifest), "-d", str(dest / "out"), "--json"]
        start = time.time()
        first = run_measured(cmd, cwd=dest, env=runner.env, timeout=s.timeout * 3,
                             log_dir=logs / "first", server_pid=server.pid)
        checked = check_output(dest / "out", expected_digests(archive.digests, archive.uids))
        if not checked.complete or first.returncode != 0:
            raise RuntimeError(f"the {spec.key} download is incomplete; see {logs}")
        result: dict[str, object] = {
            "series": len(archive.uids),
            "first_complete_s": _first_complete(logs / "first" / "stdout.txt", start),
            "total_s": first.wall, "cpu_s": first.cpu, "server_cpu_s": first.server_cpu,
            "peak_rss": first.peak_rss,
        }
        noop = _noop_runs(runner, cmd, dest, logs, len(archive.uids))
        result.update(noop_best_s=noop["best_s"], noop_runs_s=noop["runs_s"],
                      noop_peak_rss=noop["peak_rss"])
    remove_tree(dest / "out")
    print(f"  scale  {len(archive.uids):,} series on the emulator: {_brief(result)}",
          flush=True)
    return result


def run_view(runner: Runner) -> dict[str, object]:
    """The interactive view with N series on a server that holds every metadata answer
    (``--faults hold_metadata=0``): rows on screen, then ``q`` while still loading;
    and the same with the 200,000-series manifest (rows only: the window)."""
    s = runner.settings
    spec = ArchiveSpec("view", patients=s.view_series // 3, series=3, images=1,
                       image_bytes=2048)
    archive = ensure_archive(spec, s.work)
    dest = s.work / "runs" / "view"
    remove_tree(dest)
    with ServerProcess(OURS, archive.root, s.work / "logs" / "view",
                       faults="hold_metadata=0") as server:
        manifest = write_manifest(dest / "manifest.tcia", server.download_url, archive.uids)
        api = f"{server.url}/nbia-api/services"
        result = _script(runner, "view.py", manifest, api, dest / "out", timeout=s.timeout)
        big = s.work / "scale" / f"manifest-{s.manifest_series}.tcia"
        if big.is_file():
            result["large"] = _script(runner, "view.py", big, api, dest / "out-large",
                                      timeout=s.timeout)
    print(f"  scale  view: {result}", flush=True)
    return result


def _json_summary(stdout: str) -> dict[str, object]:
    for line in reversed(stdout.splitlines()):
        if '"summary"' in line:
            try:
                return dict(json.loads(line))
            except ValueError:
                break
    return {}


# --------------------------------------------------------------------------- report

def fmt_mb(n: float) -> str:
    return f"{n / MB:,.0f}"


def table(aggs: Sequence[Aggregate], floor: Aggregate | None) -> list[str]:
    lines = [
        "| client | workers | wall s | MB/s | vs floor | CPU s/GB | peak RSS MB | files ok "
        "| server CPU s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    floor_rate = floor.best.throughput if floor else 0.0
    for agg in aggs:
        best = agg.best
        ratio = f"{best.throughput / floor_rate:.2f}x" if floor_rate else "-"
        cpu = "-" if best.cpu_per_gb is None else f"{best.cpu_per_gb:.1f}"
        checked = agg.worst_checked
        files = f"{checked.ok_files}/{checked.expected_files}"
        if not agg.complete:
            files = f"**{files}**" + (f" ({checked.stray_files} stray)" if checked.stray_files
                                      else "")
        note = ""
        if agg.failed:
            note = " (timed out)" if any(r.measured.timed_out for r in agg.runs) else " (exit≠0)"
        lines.append(
            f"| {agg.client.label}{note} | {agg.client.workers_text} | {best.measured.wall:.2f} "
            f"| {best.throughput:.1f} | {ratio} | {cpu} | {fmt_mb(agg.peak_rss)} | {files} "
            f"| {best.measured.server_cpu:.1f} |"
        )
    return lines


def find(aggs: Sequence[Aggregate], kind: str, role: str) -> Aggregate | None:
    for agg in aggs:
        if agg.client.kind == kind and role in agg.client.roles:
            return agg
    return None


@dataclass
class Target:
    text: str
    met: bool | None  # None: not measured in this run
    detail: str


def evaluate(results: dict[str, list[Aggregate]], scale: dict[str, object] | None
             ) -> list[Target]:
    """Issue 13's targets (and 14's, from the scale scenario)."""
    targets: list[Target] = []

    def vs_floor(scen: str, label: str) -> None:
        aggs = results.get(scen)
        if not aggs:
            targets.append(Target(label, None, "not run"))
            return
        ours, floor = find(aggs, "ours", "default"), find(aggs, "floor", "floor")
        assert ours and floor
        r = ours.best.throughput / floor.best.throughput if floor.best.throughput else 0.0
        targets.append(Target(label, r >= 0.9 and ours.complete,
                              f"{ours.best.throughput:.1f} vs {floor.best.throughput:.1f} "
                              f"MB/s = {r:.2f}x"))

    vs_floor("lan", "Loopback, DEFLATED entries: ours at defaults >= 0.9x the floor at 8")
    vs_floor("stored", "Loopback, STORED entries: ours at defaults >= 0.9x the floor at 8")
    for scen, what in FAST_TITLES.items():
        if scen in results:
            vs_floor(scen, f"{what}: ours at defaults >= 0.9x the floor at 8")
    vs_floor("wan", "80 Mbit/s per connection, 100 ms per request: ours at defaults >= 0.9x "
                    "the floor at 16")
    if "firstbyte" in results:
        vs_floor("firstbyte", "500 series x 2 images, 1 s before each zip's first byte: ours "
                              "at defaults >= 0.9x the floor at 16")

    details, ok_all, any_run = [], True, False
    for scen, aggs in results.items():
        ours = find(aggs, "ours", "default")
        peers = [a for a in aggs if a.client.kind in ("tcia-utils", "nbiatoolkit")]
        if not ours or not peers:
            continue
        any_run = True
        for peer in peers:
            beaten = ours.complete and (
                ours.best.measured.wall < peer.best.measured.wall or not peer.complete)
            ok_all &= beaten
            why = "" if peer.complete else " (peer incomplete)"
            details.append(f"{scen}: {ours.best.measured.wall:.2f} s vs {peer.client.label} "
                           f"{peer.best.measured.wall:.2f} s{why}")
    targets.append(Target("At defaults, faster than tcia-utils and nbiatoolkit at theirs, "
                          "every scenario", ok_all if any_run else None,
                          "; ".join(details) or "not run"))

    lan = results.get("lan")
    pinned = [a for a in lan or [] if a.client.kind == "ours" and a.client.workers
              and not a.client.extra]
    sixteen = next((a for a in pinned if a.client.workers == 16), None)
    if sixteen and pinned:
        best = max(pinned, key=lambda a: a.best.throughput)
        r = sixteen.best.throughput / best.best.throughput
        targets.append(Target("Loopback: 16 pinned workers >= 0.9x the best pinned count",
                              r >= 0.9, f"16: {sixteen.best.throughput:.1f} MB/s, best "
                              f"({best.client.workers}): {best.best.throughput:.1f} MB/s = "
                              f"{r:.2f}x"))
    else:
        targets.append(Target("Loopback: 16 pinned workers >= 0.9x the best pinned count",
                              None, "not run"))

    details, ok_all, any_run = [], True, False
    for scen, aggs in results.items():
        ours, floor = find(aggs, "ours", "default"), find(aggs, "floor", "floor")
        if not ours or not floor or not ours.best.cpu_per_gb or not floor.best.cpu_per_gb:
            continue
        any_run = True
        r = ours.best.cpu_per_gb / floor.best.cpu_per_gb
        ok_all &= r <= 1.5
        details.append(f"{scen} {ours.best.cpu_per_gb:.1f} vs {floor.best.cpu_per_gb:.1f} "
                       f"= {r:.2f}x")
    targets.append(Target("CPU per GB <= 1.5x the floor (ours at defaults)",
                          ok_all if any_run else None, "; ".join(details) or "not run"))

    details, ok_all, any_run = [], True, False
    for scen, aggs in results.items():
        for agg in aggs:
            if agg.client.kind == "ours":
                any_run = True
                ok_all &= agg.peak_rss <= 100 * MB
                note = f" ({agg.client.note})" if agg.client.note else ""
                details.append(f"{scen} {agg.client.workers_text}{note}: "
                               f"{fmt_mb(agg.peak_rss)} MB")
    targets.append(Target("Peak RSS of ours <= 100 MB in every run", ok_all if any_run else None,
                          "; ".join(dict.fromkeys(details)) or "not run"))

    huge = results.get("huge")
    if lan and huge:
        a, b = find(lan, "ours", "default"), find(huge, "ours", "default")
        assert a and b
        flat = b.peak_rss <= a.peak_rss * 1.25 + 10 * MB
        targets.append(Target("Peak RSS flat in series size (the 1 GB series within 25% + "
                              "10 MB of the LAN run's 10 MB series)", flat and b.complete,
                              f"LAN {fmt_mb(a.peak_rss)} MB, huge {fmt_mb(b.peak_rss)} MB, "
                              f"files {b.worst_checked.ok_files}/"
                              f"{b.worst_checked.expected_files}"))
    else:
        targets.append(Target("Peak RSS flat in series size", None,
                              "needs the lan and huge scenarios"))
    if scale:
        targets += scale_targets(scale)
    else:
        targets.append(Target("Issue 14 (scale)", None, "not run"))
    return targets


def _num(data: dict[str, object], key: str) -> float:
    value = data[key]
    assert isinstance(value, int | float), (key, value)
    return float(value)


def _plans(scale: dict[str, object]) -> list[dict[str, object]]:
    return sorted((v for k, v in scale.items() if k.startswith("plan_") and isinstance(v, dict)),
                  key=lambda p: _num(p, "series"))


def scale_targets(scale: dict[str, object]) -> list[Target]:
    """Issue 14's targets, from :func:`run_scale`."""
    out: list[Target] = []
    big = scale.get("emulated")
    if isinstance(big, dict):
        n = int(_num(big, "series"))
        out.append(Target(f"{n:,} series on the emulator: first series complete < 3 s after "
                          "start", _num(big, "first_complete_s") < 3.0,
                          f"{_num(big, 'first_complete_s'):.2f} s (all {n:,}: "
                          f"{_num(big, 'total_s'):.1f} s)"))
        out.append(Target(f"{n:,} series: peak RSS <= 300 MB", _num(big, "peak_rss") <= 300 * MB,
                          f"{fmt_mb(_num(big, 'peak_rss'))} MB"))
        out.append(Target(f"{n:,} series: no-op re-run < 1.5 s (whole process)",
                          _num(big, "noop_best_s") < 1.5,
                          f"best {_num(big, 'noop_best_s'):.2f} s"))
        first = float(big["noop_runs_s"][0])  # type: ignore[index]
        out.append(Target(f"{n:,} series: the FIRST no-op re-run < 1.5 s (issue 26)",
                          first < 1.5, f"first {first:.2f} s"))
    for plan in _plans(scale):
        n = int(_num(plan, "series"))
        limit_s, limit_mb = (3.0, 300) if n <= 200_000 else (10.0, 600)
        out.append(Target(
            f"{n:,}-series manifest: parsed and planned without network < {limit_s:g} s, "
            f"<= {limit_mb} MB (the issue's accounting: from parsed server answers)",
            _num(plan, "plan_s") < limit_s and _num(plan, "peak_rss") <= limit_mb * MB,
            f"{_num(plan, 'plan_s'):.2f} s; with the CSV decoding of the answers "
            f"({_num(plan, 'decode_s'):.2f} s) {_num(plan, 'total_s'):.2f} s; "
            f"{fmt_mb(_num(plan, 'peak_rss'))} MB"))
    for key, noop in scale.items():
        if key.startswith("noop_") and isinstance(noop, dict):
            n = int(_num(noop, "series"))
            out.append(Target(f"{n:,} series: no-op re-run < 5 s, peak RSS <= 300 MB",
                              _num(noop, "best_s") < 5.0 and _num(noop, "peak_rss") <= 300 * MB,
                              f"best {_num(noop, 'best_s'):.2f} s, "
                              f"{fmt_mb(_num(noop, 'peak_rss'))} MB"))
    view = scale.get("view")
    if isinstance(view, dict):
        n = int(_num(view, "series"))
        out.append(Target(f"Interactive view, {n:,} series on a slow server: rows < 1 s, "
                          "q < 1 s", _num(view, "rows_s") < 1.0 and _num(view, "quit_s") < 1.0
                          and bool(view.get("still_loading_at_q")),
                          f"rows {_num(view, 'rows_s'):.2f} s, q {_num(view, 'quit_s'):.2f} s "
                          "(metadata still loading)"))
    return out


def scale_section(scale: dict[str, object]) -> list[str]:
    """The scale scenario's figures, in full (the targets table has the verdicts)."""
    out = ["## Scale (issue 14)", "",
           "Planning is `Engine.prepare` in a fresh process (`benchmarks/scale.py plan`, best "
           "of 3 processes; the peak RSS is the worst of the 3): read "
           "the manifest, open a fresh destination and journal, then per 10,000-series batch "
           "decode the v4 CSV answer (the real 40 columns, NLST-shaped; files on disk read one "
           "batch at a time, as a server's would arrive), normalise it, choose the folders, "
           "journal them. The no-op re-run is the whole `nbia-retriever download` process on "
           "a finished download (made once by the engine adopting the folders), with the API "
           "URL a closed port. The emulated download is the reference server (a process of "
           "its own) serving one 2.5 KB image per series.", "",
           "| what | series | total s | ours s | CSV decode s | normalise s | parse s "
           "| peak RSS MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for plan in _plans(scale):
        runs = plan.get("runs_s")
        shown = f" (runs: {', '.join(f'{r:.2f}' for r in runs)})" if isinstance(runs, list) else ""
        out.append(f"| plan{shown} | {int(_num(plan, 'series')):,} | {_num(plan, 'total_s'):.2f} "
                   f"| {_num(plan, 'plan_s'):.2f} | {_num(plan, 'decode_s'):.2f} "
                   f"| {_num(plan, 'normalise_s'):.2f} | {_num(plan, 'parse_s'):.2f} "
                   f"| {fmt_mb(_num(plan, 'peak_rss'))} |")
    for key, parse in sorted(scale.items()):
        if key.startswith("parse_") and isinstance(parse, dict):
            out.append(f"| parse the manifest only (best of 5; first {_num(parse, 'first_s'):.3f}) "
                       f"| {int(_num(parse, 'series')):,} | {_num(parse, 'best_s'):.3f} | | | | "
                       f"| {fmt_mb(_num(parse, 'peak_rss'))} |")
    for key, noop in scale.items():
        if key.startswith("noop_") and isinstance(noop, dict):
            runs = ", ".join(f"{float(r):.2f}" for r in noop["runs_s"])  # type: ignore[attr-defined]
            out.append(f"| no-op re-run, whole process (runs: {runs}) "
                       f"| {int(_num(noop, 'series')):,} | {_num(noop, 'best_s'):.2f} | | | | "
                       f"| {fmt_mb(_num(noop, 'peak_rss'))} |")
    out.append("")
    big = scale.get("emulated")
    if isinstance(big, dict):
        runs = ", ".join(f"{float(r):.2f}" for r in big["noop_runs_s"])  # type: ignore[attr-defined]
        out += [f"Emulated download of {int(_num(big, 'series')):,} series: first series "
                f"complete {_num(big, 'first_complete_s'):.2f} s after the process started, all "
                f"in {_num(big, 'total_s'):.1f} s ({_num(big, 'cpu_s'):.1f} s CPU; the server "
                f"{_num(big, 'server_cpu_s'):.1f} s on the same 2 cores), peak RSS "
                f"{fmt_mb(_num(big, 'peak_rss'))} MB; no-op re-runs {runs} s "
                f"({fmt_mb(_num(big, 'noop_peak_rss'))} MB).", ""]
    view = scale.get("view")
    if isinstance(view, dict):
        text = (f"Interactive view (`benchmarks/view.py`, Textual's Pilot, headless) on a server "
                f"holding every metadata answer: {int(_num(view, 'series')):,} rows on screen "
                f"{_num(view, 'rows_s'):.2f} s after the app was created, `q` answered in "
                f"{_num(view, 'quit_s'):.2f} s with the metadata still loading")
        large = view.get("large")
        if isinstance(large, dict):
            text += (f"; {int(_num(large, 'series')):,} rows: {_num(large, 'rows_s'):.2f} s, "
                     f"`q` {_num(large, 'quit_s'):.2f} s, peak RSS "
                     f"{fmt_mb(_num(large, 'peak_rss'))} MB (the table holds a window of "
                     "500 rows and pages through the rest)")
        out += [text + ".", ""]
    return out


SCENARIO_TITLES = {
    "lan": "LAN: loopback, no caps, DEFLATED entries",
    "stored": "LAN: loopback, no caps, STORED entries",
    "wan": "WAN: 80 Mbit/s per connection, 100 ms per request",
    "small": "Many small series",
    "firstbyte": "Many small series, 1 s before each zip's first byte (a server building zips)",
    "huge": "One huge series",
}
#: The fast scenario's parts (issue 26): the archive and the entries' method.
FAST_TITLES = {
    "fast-stored": "Fast server, 252 MB, STORED",
    "fast-deflated": "Fast server, 252 MB, DEFLATED",
    "fast1g-stored": "Fast server, 1 GB, STORED",
    "fast1g-deflated": "Fast server, 1 GB, DEFLATED",
}
SCENARIO_TITLES.update({k: f"{v} (prepared zips, sendfile)" for k, v in FAST_TITLES.items()})


def sweep_lines(results: dict[str, list[Aggregate]]) -> list[str]:
    lines = []
    for scen in ("lan", "stored", "wan"):
        aggs = results.get(scen)
        if not aggs:
            continue
        ours = [a for a in aggs if a.client.kind == "ours" and a.client.workers is not None
                and not a.client.extra]
        threads = {a.client.workers: a for a in aggs if a.client.kind == "ours"
                   and a.client.workers is not None and a.client.extra}
        if len(threads) >= 2:
            low, high = min(threads), max(threads)
            r = threads[high].best.throughput / threads[low].best.throughput
            lines.append(f"- {scen.upper()}, threads only (`--processes 0`): "
                         + ", ".join(f"{n}: {a.best.throughput:.1f} MB/s ({fmt_mb(a.peak_rss)} MB)"
                                     for n, a in sorted(threads.items()))
                         + f"; {high} vs {low}: {r:.2f}x.")
        if len(ours) < 2:
            continue
        best = max(ours, key=lambda a: a.best.throughput)
        parts = ", ".join(f"{a.client.workers}: {a.best.throughput:.1f} MB/s "
                          f"({a.best.cpu_per_gb or 0:.1f} CPU s/GB, {fmt_mb(a.peak_rss)} MB)"
                          for a in sorted(ours, key=lambda a: a.client.workers or 0))
        default = find(aggs, "ours", "default")
        tail = f"; adaptive: {default.best.throughput:.1f} MB/s" if default else ""
        lines.append(f"- {scen.upper()}: {parts}; fastest pinned: {best.client.workers}{tail}.")
    return lines


def render(settings: Settings, results: dict[str, list[Aggregate]], sizes: dict[str, str],
           scale: dict[str, object] | None, profile: dict[str, object] | None,
           load: dict[str, list[float]],
           transports_table: list[str] | None = None,
           inflate_table: list[str] | None = None,
           extra_sections: list[str] | None = None) -> str:
    vm = psutil.virtual_memory()
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`benchmarks/run.py`); do not edit by hand.",
        "",
        "## Machine and settings",
        "",
        f"- Date: {now}",
        f"- Machine: {os.cpu_count()} cores ({cpu_model or platform.machine()}), "
        f"{vm.total / 2**30:.1f} GiB RAM, {platform.system()} {platform.release()}",
        f"- Python {platform.python_version()} (ours and the peers); "
        f"curl {_version(['curl', '--version'])}, unzip {_version(['unzip', '-v'])}",
        "- Peers: tcia-utils 3.3.5, nbiatoolkit 1.3.1 (benchmarks/peers-requirements.txt)",
        "- Ours at its defaults: the number of streams is found at run time (from 8, up to "
        f"{MAX_STREAMS}), staged by worker processes (one per core but one, "
        "`--processes`; \"threads only\" rows: `--processes 0`), inflating with "
        f"{INFLATE}; \"pinned\" rows use `--workers N`. Peers at their defaults "
        "(tcia-utils 10 threads, nbiatoolkit 1 process). The floor is `curl -s -o x.zip` of "
        "v1 `getImage` + `unzip -q`, N at a time (xargs -P): 8 on loopback, 16 on the wide "
        "link.",
        f"- Repeats: ours and the floor best of {settings.repeat} (wall), peers "
        f"{settings.peer_repeat}; runs interleaved. Peak RSS is the worst run; files ok the "
        "worst run.",
        "- The machine is shared (other engineers run tests on the same 2 cores): compare "
        "ratios within one run, not absolute numbers across runs. Load average (1 min) at "
        "the start of each scenario: "
        + ", ".join(f"{k} {v[0]:.1f}" for k, v in load.items()) + ".",
        "- Columns: wall time of the best run; MB/s = correct DICOM bytes written / wall "
        "(1 MB = 10^6 B); CPU s/GB = user+sys of the client's whole process tree per GB "
        "written; peak RSS = max of the sampled (50 ms) RSS sum over the tree and the "
        "largest process's ru_maxrss (forked workers share pages, so nbiatoolkit's sum "
        "overstates it a little); files ok = images whose MD5 matches the archive (multiset) "
        "/ expected; server CPU s = the reference server's CPU during that run (it shares "
        "the 2 cores).",
        "",
    ]
    for scen, aggs in results.items():
        out += [f"## {SCENARIO_TITLES[scen]}", "", sizes[scen], ""]
        out += table(aggs, find(aggs, "floor", "floor"))
        out.append("")
    if transports_table:
        out += ["## Transport comparison (what chose the design)", "",
                "Every stack streams the LAN archive with N threads doing the client's "
                "per-byte work (zip reader: inflate and CRC; MD5; one file per entry); only "
                "the way bytes leave the socket differs (`benchmarks/transports.py`). Each "
                "cell: MB/s, CPU seconds of the process tree, peak RSS; best of the repeats. "
                "The last column is what the design needs: many streams no slower than two.",
                "", *transports_table, ""]
    if inflate_table:
        out += ["## Inflate library (what chose ISA-L)", "",
                "Inflating is most of a download's CPU on a fast link. Each library the zip "
                "reader can use inflates the LAN archive's images (deflated at level 6, fed "
                "in 256 KiB pieces as the reader does) and computes their CRC-32 "
                "(`benchmarks/transports.py`); the last column is the same work on two "
                "threads at once against one (1.00: the GIL is released, two cores add up).",
                "", *inflate_table, ""]
    if scale:
        out += scale_section(scale)
    if extra_sections:  # benchmarks/idc.py and huge_pieces.py write their own sections
        out += [*extra_sections, ""]
    targets = evaluate(results, scale)
    out += ["## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for t in targets:
        met = "not run" if t.met is None else ("met" if t.met else "**not met**")
        out.append(f"| {t.text} | {met} | {t.detail} |")
    out.append("")
    lines = sweep_lines(results)
    if lines:
        out += ["## Workers sweep (ours)", "", *lines, ""]
    if profile:
        out += ["## Profile of ours (LAN, default workers, py-spy)", ""]
        out += [str(line) for line in profile.get("lines", [])]  # type: ignore[union-attr]
        out.append("")
    return "\n".join(out)


def _version(cmd: list[str]) -> str:
    try:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return "?"
    match = re.search(r"\d+\.\d+(\.\d+)?", text)
    return match.group(0) if match else "?"


# --------------------------------------------------------------------------- main

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke run")
    ap.add_argument("--scenario", action="append", choices=SCENARIOS,
                    help="run only this scenario (repeatable)")
    ap.add_argument("--work", type=Path, default=REPO / "bench-work",
                    help="where archives, runs and logs go")
    ap.add_argument("--out", type=Path, help="report path (default: BENCHMARKS.md for a full "
                    "run, bench-work/BENCHMARKS-partial.md otherwise)")
    ap.add_argument("--repeat", type=int, help="runs of ours and the floor (best kept)")
    ap.add_argument("--peer-repeat", type=int, help="runs of each peer")
    ap.add_argument("--no-peers", action="store_true", help="skip tcia-utils and nbiatoolkit")
    ap.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    ap.add_argument("--sweep", help="ours' --workers points in LAN and WAN, e.g. 2,4,8")
    ap.add_argument("--timeout", type=float, help="seconds before a client run is killed")
    for name, help_text in (
        ("lan-series", "series in the LAN archive (24)"),
        ("lan-images", "images per LAN series (60)"),
        ("image-kib", "KiB of pixels per LAN/WAN image (256)"),
        ("wan-series", "the first N LAN series are used in WAN (16)"),
        ("fast-big-series", "series in the fast scenario's large archive (96: 1 GB)"),
        ("small-series", "series in the many-small scenario (500)"),
        ("small-image-kib", "KiB per image there (128)"),
        ("huge-mb", "size of the one huge series in MB (1000)"),
        ("huge-image-kib", "KiB per image of the huge series (512)"),
        ("manifest-series", "series of the planned manifest and the no-op re-run (200000)"),
        ("million-series", "series of the largest planned manifest (1000000)"),
        ("emulated-series", "series downloaded from the emulator, one image each (50000)"),
        ("view-series", "series in the interactive view on a slow server (3000)"),
    ):
        ap.add_argument(f"--{name}", type=int, help=help_text)
    return ap.parse_args(argv)


def check_tools(need_floor: bool) -> None:
    missing = [t for t in (("curl", "unzip") if need_floor else ()) if not shutil.which(t)]
    if missing:
        sys.exit(f"benchmarks: {' and '.join(missing)} not found; the floor needs them "
                 f"(apt-get install -y {' '.join(missing)})")
    if not OURS.exists():
        sys.exit(f"benchmarks: {OURS} not found; run `make install` first")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work.resolve()
    settings = Settings.quick_sizes(work) if args.quick else Settings(work=work)
    for name in ("repeat", "peer_repeat", "lan_series", "lan_images", "image_kib", "wan_series",
                 "fast_big_series",
                 "small_series", "small_image_kib", "huge_mb", "huge_image_kib",
                 "manifest_series", "million_series", "emulated_series", "view_series",
                 "timeout"):
        value = getattr(args, name)
        if value is not None:
            setattr(settings, name, value)
    if args.sweep:
        settings.sweep = tuple(int(x) for x in args.sweep.split(","))
    settings.profile = not args.no_profile
    scenarios = args.scenario or list(SCENARIOS)
    check_tools(any(s != "scale" for s in scenarios))

    peers_python: Path | None = None
    if not args.no_peers:
        env_py = os.environ.get("NBIA_PEERS_PYTHON", "")
        candidate = Path(env_py) if env_py else REPO / ".venv-peers" / "bin" / "python"
        if candidate.exists():
            peers_python = candidate
        else:
            print(f"note: no peers python at {candidate} (set NBIA_PEERS_PYTHON or run "
                  "`make peers`); peers skipped", file=sys.stderr)
    runner = Runner(settings, peers_python)
    peers = peers_python is not None
    results: dict[str, list[Aggregate]] = {}
    sizes: dict[str, str] = {}
    load: dict[str, list[float]] = {}
    scale: dict[str, object] | None = None

    def announce(name: str) -> None:
        load[name] = list(os.getloadavg())
        print(f"== {name} (load {load[name][0]:.1f})", flush=True)

    runner.wanted = set(scenarios)
    lan_archive: Archive | None = None
    if {"lan", "stored", "fast", "wan", "transports"} & set(scenarios):
        lan_archive = ensure_archive(lan_spec(settings), work)
    lan_size = ""
    if lan_archive is not None:
        lan_size = (f"{len(lan_archive.uids)} series x {settings.lan_images} images x "
                    f"{settings.image_kib} KiB = {fmt_mb(lan_archive.total_bytes)} MB of DICOM")

    def loopback(name: str, server_args: Sequence[str], what: str) -> None:
        assert lan_archive is not None
        announce(name)
        results[name] = runner.transfer(
            name, lan_archive, lan_archive.uids,
            transfer_clients(settings, peers, settings.sweep, FLOOR_STREAMS[name],
                             design=True), None,
            server_args)
        sizes[name] = f"{lan_size}; {what} on 127.0.0.1."

    def lan() -> None:
        loopback("lan", (), "DEFLATED entries with data descriptors (the real server's), "
                            "server without faults")

    def stored() -> None:
        loopback("stored", ("--zip-stored",), "STORED entries (`serve --zip-stored`)")

    def transports_step() -> None:
        if "lan" not in results and lan_archive is not None:
            announce("transports")
            runner.wanted = {"transports"}
            runner.transfer("lan", lan_archive, lan_archive.uids[:1],
                            [Client("ours", None, 1, {"default"})], None)

    def fast() -> None:
        assert lan_archive is not None
        spec = lan_spec(settings)
        big = ensure_archive(ArchiveSpec("lan", patients=settings.fast_big_series // spec.series,
                                         series=spec.series, images=spec.images,
                                         image_bytes=spec.image_bytes), work)
        for tag, archive in (("fast", lan_archive), ("fast1g", big)):
            for method in ("stored", "deflated"):
                name = f"{tag}-{method}"
                announce(name)
                prepared = work / "prepared" / f"{archive.root.name}-{method}"
                cmd = [str(VENV_BIN / "python"), str(FAST_SERVER), str(archive.root),
                       str(prepared), *(["--stored"] if method == "stored" else [])]
                clients = [Client("ours", None, settings.repeat, {"default"}),
                           Client("ours", 8, settings.repeat, {"sweep"}),
                           Client("floor", FLOOR_STREAMS["fast"], settings.repeat, {"floor"})]
                results[name] = runner.transfer(name, archive, archive.uids, clients, None,
                                                server_cmd=cmd)
                sizes[name] = (f"{len(archive.uids)} series x {spec.images} images x "
                               f"{settings.image_kib} KiB = {fmt_mb(archive.total_bytes)} MB "
                               f"of DICOM, {method.upper()} entries, from `fastserver.py`: "
                               "each series' zip prepared once and sent by sendfile (the "
                               "server costs almost nothing; the client sets the pace).")

    def wan() -> None:
        assert lan_archive is not None
        announce("wan")
        uids = lan_archive.uids[: settings.wan_series]
        nbytes = sum(int(size) for u in uids for _md5, size in lan_archive.digests[u])  # type: ignore[call-overload]
        results["wan"] = runner.transfer(
            "wan", lan_archive, uids,
            transfer_clients(settings, peers, (4, 16), FLOOR_STREAMS["wan"]), WAN_FAULTS)
        sizes["wan"] = (f"The same {len(uids)} series ({fmt_mb(nbytes)} MB); server "
                        f"`--faults \"{WAN_FAULTS}\"`: each zip stream capped at 80 Mbit/s "
                        "(10 MB/s per connection), 100 ms added before every API answer.")

    def small_spec() -> ArchiveSpec:
        per = 10 if settings.small_series % 10 == 0 else 1
        return ArchiveSpec("small", patients=settings.small_series // per, series=per,
                           images=2, image_bytes=settings.small_image_kib * 1024)

    def small() -> None:
        archive = ensure_archive(small_spec(), work)
        announce("small")
        results["small"] = runner.transfer(
            "small", archive, archive.uids,
            transfer_clients(settings, peers, (), FLOOR_STREAMS["small"]), None)
        sizes["small"] = (f"{len(archive.uids)} series x 2 images x {settings.small_image_kib} "
                          f"KiB = {fmt_mb(archive.total_bytes)} MB (CBIS-DDSM has ~6,800 "
                          "series of 1-2 images; `--small-series 2000` for the full shape).")

    def firstbyte() -> None:
        archive = ensure_archive(small_spec(), work)
        announce("firstbyte")
        clients = [Client("ours", None, settings.repeat, {"default"}),
                   Client("ours", 16, settings.repeat, {"sweep"}),
                   Client("floor", FLOOR_STREAMS["firstbyte"], settings.repeat, {"floor"})]
        results["firstbyte"] = runner.transfer("firstbyte", archive, archive.uids, clients,
                                               FIRST_BYTE_FAULTS)
        sizes["firstbyte"] = (f"The {len(archive.uids)} small series above "
                              f"({fmt_mb(archive.total_bytes)} MB); server `--faults "
                              f"\"{FIRST_BYTE_FAULTS}\"`: 1 s before each zip's first byte "
                              "(a server building zips), metadata answered at once. The "
                              "streams in flight, not the bytes, set the pace.")

    def huge() -> None:
        images = max(1, settings.huge_mb * 1_000_000 // (settings.huge_image_kib * 1024))
        spec = ArchiveSpec("huge", patients=1, series=1, images=images,
                           image_bytes=settings.huge_image_kib * 1024)
        archive = ensure_archive(spec, work)
        announce("huge")
        results["huge"] = runner.transfer(
            "huge", archive, archive.uids,
            transfer_clients(settings, peers, (), FLOOR_STREAMS["huge"]), None)
        sizes["huge"] = (f"1 series x {images} images x {settings.huge_image_kib} KiB = "
                         f"{fmt_mb(archive.total_bytes)} MB. One series, so concurrency does "
                         "not matter: memory must stay flat.")

    def scale_step() -> None:
        nonlocal scale
        announce("scale")
        scale = run_scale(runner)

    extra: list[str] = []

    def script_section(name: str, script: str, *args: str) -> None:
        """A scenario with a script of its own (issue 23's IDC against s5cmd, issue 26's
        huge series in pieces): its Markdown goes into the report as written."""
        announce(name)
        section = work / f"{name}.md"
        done = subprocess.run([sys.executable, str(HERE / script), "--out", str(section),
                               *args], check=False)
        if done.returncode == 0 and section.exists():
            text = section.read_text(encoding="utf-8").splitlines()
            if not text or not text[0].startswith("#"):
                text = [f"## {name}", "", *text]
            extra.extend(text)
        else:
            extra.extend([f"## {name}", "", f"`{script}` failed (exit {done.returncode})."])

    steps: dict[str, Callable[[], None]] = {
        "lan": lan, "stored": stored, "fast": fast, "wan": wan, "small": small,
        "firstbyte": firstbyte, "huge": huge,
        "pieces": lambda: script_section("pieces", "huge_pieces.py"),
        "idc": lambda: script_section("idc", "idc.py", "--work", str(work)),
        # issue 24: a 1 GB DRS object at 80 Mbit/s (and cut at 75%), 1,000 small ones
        "drs": lambda: script_section("drs", "drs.py", "--work", str(work),
                                      *(["--big-mb", "100", "--small-count", "100",
                                         "--rounds", "1"] if args.quick else [])),
        "transports": transports_step, "scale": scale_step}
    for name in SCENARIOS:
        if name in scenarios:
            steps[name]()

    full = set(scenarios) == set(SCENARIOS) and not args.quick
    out_path = args.out or (REPO / "BENCHMARKS.md" if full else work / "BENCHMARKS-partial.md")
    from transports import table as transport_table

    report = render(settings, results, sizes, scale, runner.profile, load,
                    transport_table(runner.transports) if runner.transports else None,
                    runner.inflate, extra)
    out_path.write_text(report + "\n", encoding="utf-8")
    dump_json(work / "results.json", {
        "scenarios": {k: [r.as_dict() for a in v for r in a.runs] for k, v in results.items()},
        "scale": scale, "profile": runner.profile, "transports": runner.transports,
    })
    print(f"\nwrote {out_path}")
    targets = evaluate(results, scale)
    for t in targets:
        met = "not run" if t.met is None else ("met" if t.met else "NOT MET")
        print(f"  [{met}] {t.text}: {t.detail}")


if __name__ == "__main__":
    main()
