"""One huge series on a capped link: one zip stream against parallel pieces (issue 26 item 4).

TCIA serves about 80 Mbit/s per connection, so one 1 to 2 GB series (digital breast
tomosynthesis) streamed as one zip takes minutes whatever the client's concurrency. The
reference server caps every answer at ``--rate`` (``bandwidth`` fault: per connection)
and serves v4 ``getSOPInstanceUIDs``/``getSingleImage``/``getMD5HashForImage``; ours
downloads the one series three ways, interleaved, best of ``--rounds``:

* ``one stream``: ``NBIA_PIECES_ABOVE=off``, the zip as before (the baseline);
* ``pieces (defaults)``: the series above 300 MB goes in pieces, the controller finds
  the connections (it starts at 4 and raises while throughput rises);
* ``pieces -w 16``: 16 connections pinned.

Every run's tree is checked by content (each image's MD5 and size). Target: pieces >= 8x
one stream. Run: ``.venv/bin/python benchmarks/huge_pieces.py [--size-mb 1024] [--rate
80mbit] [--rounds 3] [--out BENCH-HUGE.md]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from archives import ArchiveSpec, ensure_archive
from harness import (
    Measured,
    ServerProcess,
    check_output,
    dump_json,
    expected_digests,
    remove_tree,
    run_measured,
    write_manifest,
)

ROOT = Path(__file__).resolve().parent.parent
OURS = ROOT / ".venv" / "bin" / "nbia-retriever"
IMAGE_BYTES = 8 * 1024 * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--size-mb", type=int, default=1024, help="the series' size (MiB)")
    ap.add_argument("--rate", default="80mbit", help="per-connection cap (faults syntax)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-work")
    ap.add_argument("--out", type=Path, default=None, help="a Markdown table here too")
    ap.add_argument("--above", default=None, help="NBIA_PIECES_ABOVE for the pieces runs "
                    "(bytes; default: ours, 300 MB): to try a small series")
    ap.add_argument("--deflated", action="store_true",
                    help="DEFLATED zip entries (the synthetic pixel data compresses about "
                         "2x, real DBT hardly: STORED by default, the same bytes on the wire "
                         "as the images)")
    ap.add_argument("--clients", default="one,defaults,w16",
                    help="which of one, defaults, w16 (comma-separated)")
    args = ap.parse_args()

    images = max(1, args.size_mb * 1024 * 1024 // IMAGE_BYTES)
    spec = ArchiveSpec("huge", patients=1, series=1, images=images, image_bytes=IMAGE_BYTES,
                       seed=26)
    archive = ensure_archive(spec, args.work)
    work = args.work / "huge-pieces"
    out = work / "out"
    above = {"NBIA_PIECES_ABOVE": args.above} if args.above else {}
    clients = {
        "one stream": ({"NBIA_PIECES_ABOVE": "off"}, []),
        "pieces (defaults)": (above, []),
        "pieces -w 16": (above, ["--workers", "16"]),
    }
    chosen = {"one": "one stream", "defaults": "pieces (defaults)", "w16": "pieces -w 16"}
    clients = {chosen[c]: clients[chosen[c]] for c in args.clients.split(",")}
    expected = expected_digests(archive.digests, archive.uids)
    results: dict[str, list[tuple[Measured, bool, int]]] = {c: [] for c in clients}
    with ServerProcess(ROOT / ".venv" / "bin" / "nbia-retriever", archive.root, work / "logs",
                       faults=f"bandwidth={args.rate}",
                       extra=[] if args.deflated else ["--zip-stored"]) as server:
        manifest = write_manifest(work / "huge.tcia", server.download_url, archive.uids)
        for r in range(args.rounds):
            for client, (env, extra) in clients.items():  # interleaved
                remove_tree(out)
                cmd = [str(OURS), "download", str(manifest), "-d", str(out), "--quiet", *extra]
                measured = run_measured(cmd, cwd=work, env={**os.environ, **env},
                                        log_dir=work / "logs" / client.replace(" ", "_"),
                                        server_pid=server.pid, timeout=1800)
                checked = check_output(out, expected)
                results[client].append((measured, checked.complete, checked.ok_bytes))
                print(f"round {r + 1} {client:18s} {measured.wall:7.1f} s  "
                      f"{checked.ok_bytes / 1e6 / measured.wall:7.1f} MB/s  "
                      f"cpu {measured.cpu:5.1f} s  server cpu {measured.server_cpu:5.1f} s  "
                      f"rss {measured.peak_rss / 2**20:5.0f} MiB  "
                      f"{'ok' if checked.complete else 'INCOMPLETE'}", flush=True)
    remove_tree(out)
    best = {c: min(runs, key=lambda t: t[0].wall) for c, runs in results.items() if runs}
    base = best.get("one stream")
    lines = [f"One series of {archive.total_bytes / 1e9:.2f} GB ({archive.total_files} images "
             f"x {IMAGE_BYTES >> 20} MiB), {args.rate} per connection, "
             f"{'DEFLATED' if args.deflated else 'STORED'} zip, best of {args.rounds}:",
             "", "| client | wall s | MB/s | vs one stream | CPU s | server CPU s | peak RSS MiB "
             "| complete |", "|---|---|---|---|---|---|---|---|"]
    for client, (m, ok, nbytes) in best.items():
        ratio = f"{base[0].wall / m.wall:.1f}x" if base else "-"
        lines.append(f"| {client} | {m.wall:.1f} | {nbytes / 1e6 / m.wall:.1f} | {ratio} | "
                     f"{m.cpu:.1f} | {m.server_cpu:.1f} | {m.peak_rss / 2**20:.0f} | "
                     f"{'yes' if ok else 'NO'} |")
    text = "\n".join(lines)
    print(text)
    dump_json(work / "results.json", {c: [{"wall": m.wall, "cpu": m.cpu, "rss": m.peak_rss,
                                           "complete": ok, "bytes": b} for m, ok, b in runs]
                                      for c, runs in results.items()})
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(json.dumps({c: round(m.wall, 2) for c, (m, _, _) in best.items()}))


if __name__ == "__main__":
    main()
