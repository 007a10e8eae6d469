"""DRS benchmark (issue 24): ours against curl, the same objects from our Gen3 emulator.

A Gen3 emulator (``nbia_retriever.server.gen3``: Fence's token and signed-URL endpoints,
GA4GH DRS, an S3-like signed-URL host) runs in a process of its own (``drs.py serve``,
driven over its stdin: faults set and counters reset between runs) and serves
synthetic objects written once per bench run under ``bench-work/drs/objects``:

* ``big``: one 1 GB file, every file response paced to 80 Mbit/s (``rate=80mbit``).
  The floor is one ``curl`` per step as a user would do it by hand: the access token
  (``POST /user/credentials/api/access_token``), the signed URL (``GET
  /user/data/download/<id>``), then the file; all three are in the floor's time, as
  ours asks for the same three. Ours downloads a one-row DRS sheet (size and MD5 given,
  as CTDC/ICDC sheets have them) at its defaults.
* ``big-drop``: the same, the connection closed after 75% of the file on its first GET
  (``drop_after=750000000``). Ours resumes with ``Range`` in the same run; the cost is
  its time over ``big``'s. ``curl`` without resume (``--retry`` restarts from zero) is
  run once to show what the drop costs a client that cannot resume.
* ``small``: 1,000 objects of 64 KB with 100 ms before every answer of every origin
  (``latency=100ms``). The floor: the token once, then ``xargs -P16`` of a two-request
  step per object (signed URL, then the file). Ours downloads the 1,000-row sheet
  (size and MD5 given) at its defaults.

Every client runs best of 3, interleaved, as its own process tree (wall, CPU of the
tree, peak RSS of the tree, ``harness.run_measured``), and its output is checked by
content (every object's MD5 must be there once). The server's request counts per run
are kept too (signed URLs, DRS records, file GETs, bytes sent).

Run: ``.venv/bin/python benchmarks/drs.py --out bench-work/drs.md`` (``benchmarks/run.py
--scenario drs`` runs it as part of ``make bench``); ``--big-mb 200 --small-count 200
--rounds 1`` for a quick look.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Measured, remove_tree, run_measured

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VENV_BIN = Path(sys.executable).parent
OURS = VENV_BIN / "nbia-retriever"
MB = 1e6
BIG_RATE = "80mbit"
SMALL_LATENCY = "100ms"
FLOOR_STREAMS = 16

#: The floor's step for one small object: the signed URL (bearer token from a header
#: file, never argv), then the file. ``$0`` is the object id, ``$1`` its file name.
SMALL_STEP = r"""
url=$(curl -sf -H @"$hdr" "$api/user/data/download/$0" |
      sed -n 's/.*"url": *"\([^"]*\)".*/\1/p') &&
[ -n "$url" ] && curl -sf -o "$out/$1" "$url"
"""
#: The floor for one big object: token, signed URL, file (curl's own options after).
BIG_FLOOR = r"""
set -eu
api=$1 out=$2 id=$3 name=$4 creds=$5; shift 5
token=$(curl -sf -X POST -H 'Content-Type: application/json' --data-binary @"$creds" \
        "$api/user/credentials/api/access_token" |
        sed -n 's/.*"access_token": *"\([^"]*\)".*/\1/p')
mkdir -p "$out"
printf 'Authorization: Bearer %s\n' "$token" > "$out.hdr"
url=$(curl -sf -H @"$out.hdr" "$api/user/data/download/$id" |
      sed -n 's/.*"url": *"\([^"]*\)".*/\1/p')
rm -f "$out.hdr"
exec curl -sf "$@" -o "$out/$name" "$url"
"""
#: The floor for many small objects: the token once, then 16 objects at a time.
SMALL_FLOOR = r"""
set -eu
api=$1 out=$2 list=$3 creds=$4 n=$5
token=$(curl -sf -X POST -H 'Content-Type: application/json' --data-binary @"$creds" \
        "$api/user/credentials/api/access_token" |
        sed -n 's/.*"access_token": *"\([^"]*\)".*/\1/p')
mkdir -p "$out"
hdr="$out.hdr"
printf 'Authorization: Bearer %s\n' "$token" > "$hdr"
export api out hdr
status=0
xargs -P "$n" -n 2 sh -c '""" + SMALL_STEP.replace("'", "'\\''") + r"""' < "$list" || status=$?
rm -f "$hdr"
exit $status
"""


# --------------------------------------------------------------------------- the server

def _objects(folder: Path, big_mb: int, small_count: int, small_kib: int) -> list[Any]:
    """The bench's DRS objects (written once; an existing file of the right size is
    kept and only hashed)."""
    from nbia_retriever.server.gen3 import Gen3Object, object_id_for
    from nbia_retriever.server.gen3data import _write_random

    objects = []
    if big_mb:
        name = f"big-{big_mb}MB.svs"
        size = big_mb * 1_000_000
        path = folder / name
        md5 = _write_random(path, size, f"drs-bench|{name}", b"II*\x00SVS")
        objects.append(Gen3Object(object_id_for(name), name, size, md5, path, "file",
                                  collection="DRS-BENCH", patient_id="BIG-0001"))
    for k in range(small_count):
        name = f"small-{k:05d}.pdf"
        path = folder / "small" / name
        md5 = _write_random(path, small_kib * 1024, f"drs-bench|{name}", b"%PDF-1.4\n")
        objects.append(Gen3Object(object_id_for(name), name, small_kib * 1024, md5, path,
                                  "file", collection="DRS-BENCH",
                                  patient_id=f"SMALL-{k % 10:04d}"))
    return objects


def serve(work: Path, big_mb: int, small_count: int, small_kib: int) -> None:
    """The Gen3 emulator over the bench's objects, driven over stdin, one command a
    line, one JSON answer a line: ``faults SPEC`` (counters start afresh), ``stats``
    (requests per kind since the last ``faults``), ``quit``."""
    from nbia_retriever.server.gen3 import Gen3Server, write_drs_manifest

    folder = work / "objects"
    objects = _objects(folder, big_mb, small_count, small_kib)
    with Gen3Server(folder, objects) as gen3:
        gen3.write_credentials(work / "credentials.json")
        big = [o for o in objects if o.name.startswith("big-")]
        small = [o for o in objects if o.name.startswith("small-")]
        info: dict[str, Any] = {"url": gen3.url, "files_url": gen3.files_url,
                                "pid": os.getpid(), "big": None, "small": []}
        if big:
            write_drs_manifest(work / "big.csv", big, base_url=gen3.url, style="icdc")
            info["big"] = {"id": big[0].object_id, "name": big[0].name,
                           "size": big[0].size, "md5": big[0].md5}
        if small:
            write_drs_manifest(work / "small.csv", small, base_url=gen3.url, style="icdc")
            # TCIA's own sheets give a size and no MD5: ours then asks DRS for the MD5
            write_drs_manifest(work / "small-size-only.csv", small, base_url=gen3.url,
                               style="tcia")
            (work / "small-ids.txt").write_text(
                "".join(f"{o.object_id} {o.name}\n" for o in small), encoding="utf-8")
            info["small"] = [[o.name, o.md5] for o in small]
        print(json.dumps(info), flush=True)
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "faults":
                gen3.set_faults(arg or None)
                gen3.clear_requests()
                print(json.dumps({"ok": gen3.faults.describe()}), flush=True)
            elif command == "stats":
                kinds: Counter[str] = Counter()
                sent = 0
                for r in gen3.requests:
                    path = r.path
                    kind = ("token" if "access_token" in path else
                            "signed_url" if path.startswith("/user/data/download/") else
                            "drs_record" if path.startswith("/ga4gh/") else
                            "file_get" if path.startswith("/signed/") else "other")
                    kinds[kind] += 1
                    sent += int(getattr(r, "bytes_sent", 0) or 0)
                print(json.dumps({**kinds, "bytes_sent": sent}), flush=True)
            elif command == "quit":
                break


@dataclass
class Server:
    """``drs.py serve`` in a process of its own (its CPU is not the clients')."""

    work: Path
    big_mb: int
    small_count: int
    small_kib: int
    proc: subprocess.Popen[str] | None = None
    info: dict[str, Any] | None = None

    def __enter__(self) -> Server:
        self.work.mkdir(parents=True, exist_ok=True)
        log = open(self.work / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", str(self.work),
             str(self.big_mb), str(self.small_count), str(self.small_kib)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
            start_new_session=True)
        first = self._read()
        if first is None:
            raise RuntimeError("the Gen3 emulator did not start: "
                               + (self.work / "server.log").read_text(errors="replace"))
        self.info = first
        return self

    def _read(self) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        line = self.proc.stdout.readline()
        return json.loads(line) if line.strip() else None

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        if answer is None:
            raise RuntimeError(f"the Gen3 emulator died at {command!r}")
        return answer

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ask("quit")
            self.proc.wait(20)
        except (OSError, RuntimeError, subprocess.TimeoutExpired):
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# --------------------------------------------------------------------------- checking

def check(out: Path, expected: Counter[str]) -> bool:
    """Every expected MD5 exactly once among the regular files under ``out`` (ours' own
    bookkeeping, ``.nbia/`` and the CSVs beside the tree, left out)."""
    found: Counter[str] = Counter()
    if out.is_dir():
        for path in out.rglob("*"):
            if ".nbia" in path.parts or path.suffix in (".csv", ".hdr") \
                    or not path.is_file() or path.is_symlink():
                continue
            digest = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    digest.update(block)
            found[digest.hexdigest()] += 1
    return found == expected


@dataclass
class Run:
    measured: Measured
    complete: bool
    stats: dict[str, Any]


def best(runs: list[Run]) -> dict[str, Any]:
    ok = [r for r in runs if r.complete and r.measured.returncode == 0]
    pick = min(ok or runs, key=lambda r: r.measured.wall)
    return {"wall": pick.measured.wall if ok else float("nan"),
            "walls": [round(r.measured.wall, 2) for r in runs],
            "cpu": min(r.measured.cpu for r in (ok or runs)),
            "rss": max(r.measured.peak_rss for r in runs),
            "server_cpu": pick.measured.server_cpu,
            "complete": len(ok) == len(runs), "stats": pick.stats}


# --------------------------------------------------------------------------- scenarios

def clients_for(name: str, work: Path, info: dict[str, Any], out: Path) -> dict[str, list[str]]:
    creds = work / "credentials.json"
    api = info["url"]
    ours_common = ["--auth", str(creds), "--gen3-endpoint", api, "--accept-data-policy",
                   "-d", str(out), "--quiet"]
    if name in ("big", "big-drop"):
        big = info["big"]
        floor = ["sh", "-c", BIG_FLOOR, "floor", api, str(out), big["id"], big["name"],
                 str(creds)]
        return {"curl (floor)": floor,
                "ours (defaults)": [str(OURS), "download", str(work / "big.csv"),
                                    *ours_common]}
    floor = ["sh", "-c", SMALL_FLOOR, "floor", api, str(out), str(work / "small-ids.txt"),
             str(creds), str(FLOOR_STREAMS)]
    return {f"curl x{FLOOR_STREAMS} (floor)": floor,
            "ours (defaults)": [str(OURS), "download", str(work / "small.csv"),
                                *ours_common],
            "ours (sheet without MD5)": [str(OURS), "download",
                                         str(work / "small-size-only.csv"), *ours_common],
            # what the engine's start at 8 streams (then climbing) costs here
            "ours (--workers 16)": [str(OURS), "download", str(work / "small.csv"),
                                    *ours_common, "--workers", "16"]}


def run_scenario(name: str, server: Server, work: Path, rounds: int,
                 faults: str, expected: Counter[str],
                 clients: dict[str, list[str]] | None = None,
                 only: Sequence[str] = ()) -> dict[str, Any]:
    info = server.info
    assert info is not None
    out = work / "out"
    table = clients or clients_for(name, work, info, out)
    if only:
        table = {k: v for k, v in table.items() if k in only}
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "NBIA_GEN3_AUTH", "GEN3_API_KEY"):
        env.pop(var, None)
    runs: dict[str, list[Run]] = {c: [] for c in table}
    for r in range(rounds):
        for client, cmd in table.items():  # interleaved: a drift hits every client
            remove_tree(out)
            server.ask(f"faults {faults}")  # counters (drop on the first GET) afresh
            measured = run_measured(cmd, cwd=work, env=env, timeout=3600,
                                    log_dir=work / "logs" / name / client / str(r),
                                    server_pid=server.pid)
            stats = server.ask("stats")
            complete = check(out, expected)
            runs[client].append(Run(measured, complete, stats))
            print(f"  drs {name} {client} #{r + 1}: {measured.wall:.2f} s, cpu "
                  f"{measured.cpu:.2f} s, rss {measured.peak_rss / MB:.0f} MB, "
                  f"{'complete' if complete else 'INCOMPLETE'}, rc {measured.returncode}, "
                  f"server {stats}", flush=True)
    remove_tree(out)
    return {"scenario": name, "faults": faults,
            "results": {c: best(rs) for c, rs in runs.items()}}


def render(results: list[dict[str, Any]], sizes: dict[str, int], counts: dict[str, int],
           rounds: int) -> list[str]:
    lines = ["## DRS (CRDC Gen3) and big files: ours against curl (issue 24)", "",
             "Our Gen3 emulator (Fence token and signed URLs, GA4GH DRS, an S3-like "
             "signed-URL host; `benchmarks/drs.py`) in a process of its own. Each client "
             f"best of {rounds}, interleaved, every object's MD5 checked after each run; "
             "CPU and peak RSS are the client's whole process tree. Ours at its defaults "
             "from a DRS sheet giving size and MD5 (CTDC/ICDC's columns), so it asks for "
             "the token once, a signed URL per object and the object: what curl does.", "",
             "| scenario | client | wall s | ratio to floor | peak RSS | CPU s/GB | "
             "requests (signed URL / DRS record / file GET) | complete |",
             "|---|---|---|---|---|---|---|---|"]
    floor_walls: dict[str, float] = {}
    for res in results:
        name = res["scenario"]
        table = res["results"]
        floor_key = next((k for k in table if "floor" in k), "")
        # a scenario without a floor of its own (the drop) compares with the uncut floor
        floor = table[floor_key]["wall"] if floor_key else floor_walls.get("big", float("nan"))
        floor_walls[name] = floor
        total = sizes[name]
        label = {"big": f"1 file of {total / MB:,.0f} MB, {BIG_RATE}/connection",
                 "big-drop": f"the same, connection closed at 75% ({res['faults']})",
                 "small": f"{counts['small']:,} objects x "
                          f"{total / counts['small'] / 1024:.0f} KiB, {SMALL_LATENCY} per "
                          "request",
                 "big-curl-restart": "the same cut, curl restarting from zero",
                 }.get(name, name)
        for client, r in table.items():
            wall = r["wall"]
            ratio = floor / wall if wall == wall and floor == floor else float("nan")
            st = r["stats"]
            lines.append(
                f"| {label} | {client} | {wall:.2f} | "
                f"{'' if client == floor_key else f'{ratio:.2f}x'} | "
                f"{r['rss'] / MB:.0f} MB | {r['cpu'] / (total / 1e9):.2f} | "
                f"{st.get('signed_url', 0)} / {st.get('drs_record', 0)} / "
                f"{st.get('file_get', 0)} | {'yes' if r['complete'] else 'NO'} |")
    lines.append("")
    by = {res["scenario"]: res["results"] for res in results}
    notes = []
    if "big" in by:
        ours, floor = by["big"]["ours (defaults)"], by["big"]["curl (floor)"]
        notes.append(f"* {sizes['big'] / MB:,.0f} MB at {BIG_RATE}: ours "
                     f"{floor['wall'] / ours['wall']:.2f}x curl (target >= 0.9x), peak RSS "
                     f"{ours['rss'] / MB:.0f} MB (target <= 100 MB). "
                     "The floor's time includes its token and signed-URL requests.")
    if "big" in by and "big-drop" in by:
        ours, cut = by["big"]["ours (defaults)"], by["big-drop"]["ours (defaults)"]
        extra = cut["wall"] / ours["wall"] - 1
        notes.append(f"* Cut at 75%: ours {cut['wall']:.1f} s against {ours['wall']:.1f} s "
                     f"uncut: **{extra:+.0%}** (target <= +30%); it asked for "
                     f"{cut['stats'].get('file_get', 0)} file GETs (the second a Range from "
                     "where the first stopped).")
        if "big-curl-restart" in by:
            restart = by["big-curl-restart"]["curl --retry (no resume)"]
            cfloor = by["big"]["curl (floor)"]
            notes.append(f"* curl without resume (`--retry`, the whole file again) after "
                         f"the same cut: {restart['wall']:.1f} s, "
                         f"{restart['wall'] / cfloor['wall'] - 1:+.0%} over its uncut run.")
    if "small" in by:
        table = by["small"]
        floor_key = next(k for k in table if "floor" in k)
        ours, floor = table["ours (defaults)"], table[floor_key]
        # what 16 at a time would take if starting curl, sh and sed cost nothing: the
        # floor spawns ~4 processes an object, and on two cores that is its limit
        ideal = counts["small"] * 2 * 0.1 / FLOOR_STREAMS
        notes.append(f"* {counts['small']:,} small objects: ours "
                     f"{floor['wall'] / ours['wall']:.2f}x the floor (target >= 0.9x). The "
                     f"floor's CPU ({floor['cpu']:.1f} s: a curl, sh and sed per request) "
                     f"limits it on two cores; its round trips alone would take "
                     f"{ideal:.1f} s (2 requests x 100 ms x {counts['small']:,} / "
                     f"{FLOOR_STREAMS}), of which ours is {ideal / ours['wall']:.2f}x.")
    return [*lines, *notes]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        serve(Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=REPO / "bench-work")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=1000)
    ap.add_argument("--small-count", type=int, default=1000)
    ap.add_argument("--small-kib", type=int, default=64)
    ap.add_argument("--scenario", action="append",
                    choices=["big", "big-drop", "big-curl-restart", "small"])
    ap.add_argument("--out", type=Path, default=None, help="Write the markdown here.")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not shutil.which("curl"):
        raise SystemExit("benchmarks/drs.py: curl not found (apt-get install -y curl)")
    names = args.scenario or ["big", "big-drop", "big-curl-restart", "small"]
    work = args.work.resolve() / "drs"
    big_mb = args.big_mb if {"big", "big-drop", "big-curl-restart"} & set(names) else 0
    small_count = args.small_count if "small" in names else 0
    results: list[dict[str, Any]] = []
    with Server(work, big_mb, small_count, args.small_kib) as server:
        info = server.info
        assert info is not None
        sizes: dict[str, int] = {}
        counts = {"small": small_count}
        drop = f"rate={BIG_RATE},drop_after={int(big_mb * 1_000_000 * 0.75)}"
        if info["big"]:
            big_expected = Counter([info["big"]["md5"]])
            for name in ("big", "big-drop"):
                sizes[name] = info["big"]["size"]
                if name in names:
                    faults = f"rate={BIG_RATE}" if name == "big" else drop
                    # curl cannot resume after the cut (the restart is measured below)
                    only = ("ours (defaults)",) if name == "big-drop" else ()
                    results.append(run_scenario(name, server, work, args.rounds, faults,
                                                big_expected, only=only))
            if "big-curl-restart" in names:
                sizes["big-curl-restart"] = info["big"]["size"]
                big = info["big"]
                cmd = ["sh", "-c", BIG_FLOOR, "floor", info["url"], str(work / "out"),
                       big["id"], big["name"], str(work / "credentials.json"),
                       "--retry", "3", "--retry-all-errors", "--retry-delay", "0"]
                results.append(run_scenario("big-curl-restart", server, work, 1, drop,
                                            big_expected,
                                            clients={"curl --retry (no resume)": cmd}))
        if info["small"]:
            sizes["small"] = sum(args.small_kib * 1024 for _ in info["small"])
            expected = Counter(md5 for _name, md5 in info["small"])
            results.append(run_scenario("small", server, work, args.rounds,
                                        f"latency={SMALL_LATENCY}", expected))
    text = "\n".join(render([r for r in results if r["scenario"] != "big-curl-restart"]
                            + [r for r in results if r["scenario"] == "big-curl-restart"],
                            sizes, counts, args.rounds)) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    # the last line: the results as JSON (run.py's scripts convention)
    print(json.dumps({"results": results}, default=str))


if __name__ == "__main__":
    main()
