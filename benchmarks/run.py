"""Benchmarks: our client against tcia-utils, nbiatoolkit and the curl+unzip floor.

``make bench`` runs this with NBIA_PEERS_PYTHON pointing at .venv-peers. Everything
happens on this machine: the reference server (``nbia-retriever serve``, a process of
its own whose CPU is reported per run) serves synthetic archives cached under
``bench-work/archives``, and every client runs as its own process tree, measured by
harness.run_measured and checked file by file against the archive's MD5s.

Scenarios (``--scenario NAME``, repeatable; default all):

* ``lan``    loopback, no caps: 24 series x 60 images x 256 KiB.
* ``wan``    the first 16 of those series, 80 Mbit/s per connection, 100 ms per request.
* ``small``  many small series (the CBIS-DDSM shape): 500 series x 2 images x 128 KiB.
* ``huge``   one 1 GB series (2,000 x 512 KiB): memory must stay flat.
* ``scale``  no transfer: parse and plan a 200,000-series manifest; no-op re-run of a
  finished 10,000-series download.

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

from nbia_retriever.engine import DownloadOptions

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
OURS = VENV_BIN / "nbia-retriever"
FLOOR = HERE / "floor.sh"
PEER_DRIVER = HERE / "peer_driver.py"
DEFAULT_WORKERS = DownloadOptions().workers
EQUAL = 4  # the equal-concurrency point every client is also run at
WAN_FAULTS = "bandwidth=80mbit,latency=0.1"
MB = 1e6
SCENARIOS = ("lan", "wan", "small", "huge", "scale")


# --------------------------------------------------------------------------- settings

@dataclass
class Settings:
    work: Path
    repeat: int = 3
    peer_repeat: int = 1
    lan_series: int = 24
    lan_images: int = 60
    image_kib: int = 256
    wan_series: int = 16
    small_series: int = 500
    small_image_kib: int = 128
    huge_mb: int = 1000
    huge_image_kib: int = 512
    manifest_series: int = 200_000
    resume_series: int = 10_000
    sweep: tuple[int, ...] = (2, 4, 8)
    timeout: float = 600.0
    profile: bool = True
    quick: bool = False

    @classmethod
    def quick_sizes(cls, work: Path) -> Settings:
        return cls(work=work, repeat=1, lan_series=6, lan_images=10, image_kib=64,
                   wan_series=4, small_series=40, small_image_kib=16, huge_mb=64,
                   huge_image_kib=256, manifest_series=20_000, resume_series=300,
                   timeout=300.0, quick=True)


@dataclass
class Client:
    """One way of running one client. ``workers`` None: the client's own default."""

    kind: str  # ours | tcia-utils | nbiatoolkit | floor
    workers: int | None
    repeats: int
    roles: set[str] = field(default_factory=set)  # "default", "equal", "sweep"

    @property
    def label(self) -> str:
        if self.kind == "floor":
            return "floor (curl+unzip)"
        return self.kind

    @property
    def workers_text(self) -> str:
        real = self.effective_workers
        if self.workers is None:
            return f"default ({real})"
        return str(real)

    @property
    def effective_workers(self) -> int:
        if self.workers is not None:
            return self.workers
        return {"ours": DEFAULT_WORKERS, "tcia-utils": 10, "nbiatoolkit": 1}.get(self.kind, EQUAL)

    @property
    def slug(self) -> str:
        return f"{self.kind}-{self.workers if self.workers is not None else 'default'}"


def transfer_clients(settings: Settings, peers: bool, sweep: Sequence[int],
                     peers_equal: bool = True) -> list[Client]:
    """Ours at its default and at each sweep point, the floor at EQUAL, peers at both."""
    clients: list[Client] = []
    ours_points = sorted({*sweep, EQUAL})
    for n in ours_points:
        roles = {"equal"} if n == EQUAL else {"sweep"}
        if n == DEFAULT_WORKERS:
            roles.add("default")
        clients.append(Client("ours", n, settings.repeat, roles))
    if DEFAULT_WORKERS not in ours_points:
        clients.append(Client("ours", None, settings.repeat, {"default"}))
    clients.append(Client("floor", EQUAL, settings.repeat, {"equal", "floor"}))
    if peers:
        for kind in ("tcia-utils", "nbiatoolkit"):
            clients.append(Client(kind, None, settings.peer_repeat, {"default"}))
            if peers_equal:
                clients.append(Client(kind, EQUAL, settings.peer_repeat, {"equal"}))
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

    def command(self, client: Client, server: ServerProcess, manifest: Path, uid_file: Path,
                out: Path) -> tuple[list[str], Path | None]:
        """The command line for ``client`` and the file its stdin reads, if any."""
        n = client.workers
        if client.kind == "ours":
            cmd = [str(OURS), "download", str(manifest), "-d", str(out), "-q"]
            return ([*cmd, "--workers", str(n)] if n is not None else cmd), None
        if client.kind == "floor":
            return ["sh", str(FLOOR), server.v1_url, str(out), str(n or EQUAL)], uid_file
        assert self.peers_python is not None
        cmd = [str(self.peers_python), str(PEER_DRIVER), client.kind, server.url, str(out),
               str(uid_file)]
        return ([*cmd, str(n)] if n is not None else cmd), None

    def transfer(self, name: str, archive: Archive, uids: Sequence[str],
                 clients: Sequence[Client], faults: str | None) -> list[Aggregate]:
        work = self.settings.work
        runs_dir = work / "runs" / name
        remove_tree(runs_dir)
        expected = expected_digests(archive.digests, uids)
        aggregates = {c.slug: Aggregate(c, []) for c in clients}
        with ServerProcess(OURS, archive.root, work / "logs" / name, faults=faults) as server:
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
                    print(f"  {name:6s} {client.label:20s} {client.workers_text:12s} "
                          f"{measured.wall:7.2f} s {result.throughput:7.1f} MB/s "
                          f"cpu {measured.cpu:6.2f} s rss {measured.peak_rss / MB:6.0f} MB "
                          f"files {checked.ok_files}/{checked.expected_files} "
                          f"server {measured.server_cpu:5.2f} s"
                          + (f" rc={measured.returncode}" if measured.returncode else "")
                          + (" TIMEOUT" if measured.timed_out else ""), flush=True)
            if name == "lan" and self.settings.profile:
                self.profile = profile_download(
                    OURS, manifest, runs_dir / "profile", work / "logs" / name / "profile",
                    label="LAN download (default workers)")
                remove_tree(runs_dir / "profile")
        return list(aggregates.values())

    profile: dict[str, object] | None = None


# --------------------------------------------------------------------------- scenarios

def lan_spec(s: Settings) -> ArchiveSpec:
    per = 6 if s.lan_series % 6 == 0 else 1
    return ArchiveSpec("lan", patients=s.lan_series // per, series=per, images=s.lan_images,
                       image_bytes=s.image_kib * 1024)


def run_scale(runner: Runner) -> dict[str, object]:
    s = runner.settings
    scale_dir = s.work / "scale"
    py = str(VENV_BIN / "python")
    out: dict[str, object] = {}
    for what, count in (("parse", s.manifest_series), ("plan", s.manifest_series)):
        done = subprocess.run([py, str(HERE / "scale.py"), what, str(count), str(scale_dir)],
                              capture_output=True, text=True, check=True, timeout=s.timeout)
        out[what] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  scale  {what}: {out[what]}", flush=True)
    out["resume"] = run_resume(runner)
    return out


def run_resume(runner: Runner) -> dict[str, object]:
    """Time a no-op re-run of a finished download (built once, kept between runs)."""
    s = runner.settings
    spec = ArchiveSpec("resume", patients=s.resume_series, series=1, images=1, image_bytes=2048)
    archive = ensure_archive(spec, s.work)
    dest = s.work / "resume-dest" / spec.key
    marker = dest / "finished.json"
    logs = s.work / "logs" / "resume"
    result: dict[str, object] = {"series": len(archive.uids)}
    with ServerProcess(OURS, archive.root, logs) as server:
        manifest = write_manifest(dest / "manifest.tcia", server.download_url, archive.uids)
        cmd = [str(OURS), "download", str(manifest), "-d", str(dest / "out"), "--json"]
        if not marker.is_file():
            remove_tree(dest / "out")
            first = run_measured(cmd, cwd=dest, env=runner.env, timeout=s.timeout * 3,
                                 log_dir=logs / "first", server_pid=server.pid)
            checked = check_output(dest / "out", expected_digests(archive.digests,
                                                                  archive.uids))
            print(f"  scale  first download of {len(archive.uids)} series: {first.wall:.1f} s, "
                  f"files {checked.ok_files}/{checked.expected_files}", flush=True)
            if not checked.complete or first.returncode != 0:
                raise RuntimeError(f"the first {spec.key} download is incomplete; see {logs}")
            dump_json(marker, {"first_download_s": first.wall, "cpu_s": first.cpu,
                               "peak_rss": first.peak_rss})
        result["first_download_s"] = json.loads(marker.read_text())["first_download_s"]
        walls: list[float] = []
        rss = 0
        for rep in range(max(3, s.repeat)):
            m = run_measured(cmd, cwd=dest, env=runner.env, timeout=s.timeout,
                             log_dir=logs / f"noop-{rep}", server_pid=server.pid)
            summary = _json_summary(m.stdout_tail)
            if m.returncode != 0 or summary.get("skipped") != len(archive.uids):
                raise RuntimeError(f"the no-op re-run did work or failed: {summary or m}")
            walls.append(m.wall)
            rss = max(rss, m.peak_rss)
        result.update(noop_best_s=min(walls), noop_runs_s=walls, noop_peak_rss=rss)
        print(f"  scale  no-op resume of {len(archive.uids)} series: "
              f"best {min(walls):.3f} s of {[round(w, 3) for w in walls]}", flush=True)
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


def evaluate(results: dict[str, list[Aggregate]], scale: dict[str, object] | None) -> list[Target]:
    targets: list[Target] = []

    def ratio_target(scen: str, minimum: float, label: str) -> None:
        aggs = results.get(scen)
        if not aggs:
            targets.append(Target(label, None, "not run"))
            return
        ours, floor = find(aggs, "ours", "equal"), find(aggs, "floor", "floor")
        assert ours and floor
        r = ours.best.throughput / floor.best.throughput if floor.best.throughput else 0.0
        ok = r >= minimum and ours.complete
        targets.append(Target(label, ok, f"{ours.best.throughput:.1f} vs "
                              f"{floor.best.throughput:.1f} MB/s = {r:.2f}x"))

    ratio_target("lan", 0.9, "LAN: throughput >= 0.9x the floor at equal concurrency (4)")
    ratio_target("wan", 0.9, "WAN: throughput >= 0.9x the floor at equal concurrency (4)")
    ratio_target("small", 0.8, "Many small series: throughput >= 0.8x the floor (4 workers)")

    details, ok_all, any_run = [], True, False
    for scen, aggs in results.items():
        ours = find(aggs, "ours", "default")
        peers = [a for a in aggs if a.client.kind in ("tcia-utils", "nbiatoolkit")
                 and "default" in a.client.roles]
        if not ours or not peers:
            continue
        any_run = True
        for peer in peers:
            beaten = ours.complete and (
                ours.best.measured.wall < peer.best.measured.wall or not peer.complete)
            ok_all &= beaten
            why = "" if peer.complete else " (peer incomplete)"
            details.append(f"{scen}: {ours.best.measured.wall:.1f} s vs {peer.client.label} "
                           f"{peer.best.measured.wall:.1f} s{why}")
    targets.append(Target("At defaults, faster than every peer at its defaults, every scenario",
                          ok_all if any_run else None, "; ".join(details) or "not run"))

    details, ok_all, any_run = [], True, False
    for scen, aggs in results.items():
        ours, floor = find(aggs, "ours", "equal"), find(aggs, "floor", "floor")
        if not ours or not floor or not ours.best.cpu_per_gb or not floor.best.cpu_per_gb:
            continue
        any_run = True
        r = ours.best.cpu_per_gb / floor.best.cpu_per_gb
        ok_all &= r <= 1.5
        details.append(f"{scen} {ours.best.cpu_per_gb:.1f} vs {floor.best.cpu_per_gb:.1f} "
                       f"= {r:.2f}x")
    targets.append(Target("CPU s/GB <= 1.5x the floor (4 workers)", ok_all if any_run else None,
                          "; ".join(details) or "not run"))

    details, ok_all, any_run = [], True, False
    for scen, aggs in results.items():
        for agg in aggs:
            if agg.client.kind == "ours" and agg.client.roles & {"default", "equal"}:
                any_run = True
                ok_all &= agg.peak_rss <= 100 * MB
                details.append(f"{scen} {agg.client.workers_text}: {fmt_mb(agg.peak_rss)} MB")
    targets.append(Target("Peak RSS of ours <= 100 MB in every scenario (default and 4 workers)",
                          ok_all if any_run else None, "; ".join(dict.fromkeys(details))
                          or "not run"))

    lan, huge = results.get("lan"), results.get("huge")
    if lan and huge:
        a, b = find(lan, "ours", "equal"), find(huge, "ours", "equal")
        assert a and b
        flat = b.peak_rss <= a.peak_rss * 1.25 + 10 * MB
        targets.append(Target("Peak RSS flat in series size (1 GB series within 25% + 10 MB of "
                              "the LAN run's 16 MB series)", flat,
                              f"LAN {fmt_mb(a.peak_rss)} MB, huge {fmt_mb(b.peak_rss)} MB"))
        targets.append(Target("Issue 4: one 1 GB series, ours at 4 workers, peak RSS < 100 MB",
                              b.peak_rss < 100 * MB and b.complete,
                              f"{fmt_mb(b.peak_rss)} MB, files "
                              f"{b.worst_checked.ok_files}/{b.worst_checked.expected_files}"))
    else:
        targets.append(Target("Peak RSS flat in series size; issue 4 (1 GB series < 100 MB)",
                              None, "needs the lan and huge scenarios"))

    if scale:
        parse = scale["parse"]
        resume = scale["resume"]
        assert isinstance(parse, dict) and isinstance(resume, dict)
        targets.append(Target(f"Parse a {parse['series']:,}-series manifest < 0.5 s",
                              float(parse["best_s"]) < 0.5,
                              f"best {float(parse['best_s']):.3f} s, first "
                              f"{float(parse['first_s']):.3f} s"))
        targets.append(Target(f"No-op resume of {resume['series']:,} finished series < 1 s",
                              float(resume["noop_best_s"]) < 1.0,
                              f"best {float(resume['noop_best_s']):.3f} s (whole process)"))
    else:
        targets.append(Target("Manifest parse < 0.5 s; no-op resume < 1 s", None, "not run"))
    return targets


SCENARIO_TITLES = {
    "lan": "LAN: loopback, no caps",
    "wan": "WAN: 80 Mbit/s per connection, 100 ms per request",
    "small": "Many small series",
    "huge": "One huge series",
}


def sweep_lines(results: dict[str, list[Aggregate]]) -> list[str]:
    lines = []
    for scen in ("lan", "wan"):
        aggs = results.get(scen)
        if not aggs:
            continue
        ours = [a for a in aggs if a.client.kind == "ours" and a.client.workers is not None]
        if len(ours) < 2:
            continue
        best = max(ours, key=lambda a: a.best.throughput)
        parts = ", ".join(f"{a.client.workers}: {a.best.throughput:.1f} MB/s "
                          f"({a.best.cpu_per_gb or 0:.1f} CPU s/GB, {fmt_mb(a.peak_rss)} MB)"
                          for a in sorted(ours, key=lambda a: a.client.workers or 0))
        lines.append(f"- {scen.upper()}: {parts}; fastest: {best.client.workers}.")
    return lines


def render(settings: Settings, results: dict[str, list[Aggregate]], sizes: dict[str, str],
           scale: dict[str, object] | None, profile: dict[str, object] | None,
           load: dict[str, list[float]]) -> str:
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
        f"- Ours: default `--workers` {DEFAULT_WORKERS}; equal concurrency is {EQUAL} for every "
        "client; the floor is `curl -s -o x.zip` of v1 `getImage` + `unzip -q`, "
        f"{EQUAL} at a time (xargs -P).",
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
    if scale:
        parse, plan, resume = scale["parse"], scale["plan"], scale["resume"]
        assert isinstance(parse, dict) and isinstance(plan, dict) and isinstance(resume, dict)
        out += [
            "## Scale without transfer",
            "",
            "| measurement | result |",
            "|---|---:|",
            f"| `read_manifest` of {parse['series']:,} series ({parse['mb']} MB), best of 5 | "
            f"{float(parse['best_s']):.3f} s (first {float(parse['first_s']):.3f} s) |",
            f"| plan {plan['series']:,} series: normalise v4 metadata | "
            f"{float(plan['normalise_s']):.2f} s |",
            f"| plan: choose every folder (`series_relpaths`) | {float(plan['folders_s']):.2f} s |",
            f"| plan: journal `ensure` + `set_infos` | {float(plan['journal_s']):.2f} s |",
            f"| plan: total (no network) | {float(plan['total_best_s']):.2f} s |",
            f"| first download of {resume['series']:,} series x 1 image (built once, cached) | "
            f"{float(resume['first_download_s']):.1f} s |",
            f"| no-op re-run of that finished download (whole `nbia-retriever download` "
            f"process), best of {len(resume['noop_runs_s'])} | "  # type: ignore[arg-type]
            f"{float(resume['noop_best_s']):.3f} s |",
            f"| peak RSS of the no-op re-run | {fmt_mb(int(resume['noop_peak_rss']))} MB |",
            "",
        ]
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
        ("small-series", "series in the many-small scenario (500)"),
        ("small-image-kib", "KiB per image there (128)"),
        ("huge-mb", "size of the one huge series in MB (1000)"),
        ("huge-image-kib", "KiB per image of the huge series (512)"),
        ("manifest-series", "series in the parsed and planned manifest (200000)"),
        ("resume-series", "series of the finished download re-run as a no-op (10000)"),
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
                 "small_series", "small_image_kib", "huge_mb", "huge_image_kib",
                 "manifest_series", "resume_series", "timeout"):
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

    lan_archive: Archive | None = None
    if {"lan", "wan"} & set(scenarios):
        lan_archive = ensure_archive(lan_spec(settings), work)

    steps: dict[str, Callable[[], None]] = {}

    def lan() -> None:
        assert lan_archive is not None
        announce("lan")
        uids = lan_archive.uids
        results["lan"] = runner.transfer("lan", lan_archive, uids,
                                         transfer_clients(settings, peers, settings.sweep), None)
        sizes["lan"] = (f"{len(uids)} series x {settings.lan_images} images x "
                        f"{settings.image_kib} KiB = {fmt_mb(lan_archive.total_bytes)} MB of "
                        "DICOM; server without faults on 127.0.0.1.")

    def wan() -> None:
        assert lan_archive is not None
        announce("wan")
        uids = lan_archive.uids[: settings.wan_series]
        nbytes = sum(int(size) for u in uids for _md5, size in lan_archive.digests[u])  # type: ignore[call-overload]
        results["wan"] = runner.transfer("wan", lan_archive, uids,
                                         transfer_clients(settings, peers, settings.sweep),
                                         WAN_FAULTS)
        sizes["wan"] = (f"The first {len(uids)} LAN series ({fmt_mb(nbytes)} MB); server "
                        f"`--faults \"{WAN_FAULTS}\"`: each zip stream capped at 80 Mbit/s "
                        "(10 MB/s per connection), 100 ms added before every API answer.")

    def small() -> None:
        per = 10 if settings.small_series % 10 == 0 else 1
        spec = ArchiveSpec("small", patients=settings.small_series // per, series=per,
                           images=2, image_bytes=settings.small_image_kib * 1024)
        archive = ensure_archive(spec, work)
        announce("small")
        results["small"] = runner.transfer("small", archive, archive.uids,
                                           transfer_clients(settings, peers, ()), None)
        sizes["small"] = (f"{len(archive.uids)} series x 2 images x {settings.small_image_kib} "
                          f"KiB = {fmt_mb(archive.total_bytes)} MB (CBIS-DDSM has ~6,800 "
                          "series of 1-2 images; 500 by default keeps the run under 10 "
                          "minutes; `--small-series 2000` for the full shape).")

    def huge() -> None:
        images = max(1, settings.huge_mb * 1_000_000 // (settings.huge_image_kib * 1024))
        spec = ArchiveSpec("huge", patients=1, series=1, images=images,
                           image_bytes=settings.huge_image_kib * 1024)
        archive = ensure_archive(spec, work)
        announce("huge")
        # One series: concurrency means nothing, so peers run once at their defaults.
        clients = transfer_clients(settings, peers, (), peers_equal=False)
        results["huge"] = runner.transfer("huge", archive, archive.uids, clients, None)
        sizes["huge"] = (f"1 series x {images} images x {settings.huge_image_kib} KiB = "
                         f"{fmt_mb(archive.total_bytes)} MB. One series, so worker counts do "
                         "not matter; peers run at their defaults only.")

    def scale_step() -> None:
        nonlocal scale
        announce("scale")
        scale = run_scale(runner)

    steps = {"lan": lan, "wan": wan, "small": small, "huge": huge, "scale": scale_step}
    for name in SCENARIOS:
        if name in scenarios:
            steps[name]()

    full = set(scenarios) == set(SCENARIOS) and not args.quick
    out_path = args.out or (REPO / "BENCHMARKS.md" if full else work / "BENCHMARKS-partial.md")
    report = render(settings, results, sizes, scale, runner.profile, load)
    out_path.write_text(report + "\n", encoding="utf-8")
    dump_json(work / "results.json", {
        "scenarios": {k: [r.as_dict() for a in v for r in a.runs] for k, v in results.items()},
        "scale": scale, "profile": runner.profile,
    })
    print(f"\nwrote {out_path}")
    targets = evaluate(results, scale)
    for t in targets:
        met = "not run" if t.met is None else ("met" if t.met else "NOT MET")
        print(f"  [{met}] {t.text}: {t.detail}")


if __name__ == "__main__":
    main()
