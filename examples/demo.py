"""`make demo`: the main job end to end, on the bundled reference server.

1. Generate a small synthetic CT archive (several collections, awkward headers).
2. Serve it with the reference NBIA server (`nbia-retriever serve`), faults switched on:
   resets, short-but-valid zips, a corrupted byte, HTTP 500/429; and, on a second port,
   as Imaging Data Commons' S3 buckets (with IDC's index files), which hold the public
   series but one, with S3 faults of their own (503 SlowDown, a corrupted object).
3. Download its manifest with the real CLI (`nbia-retriever download`, `--source auto`):
   the public series IDC holds come from the buckets, the rest (the limited-access
   collection, the one IDC lacks) from the NBIA server, into one tree; every MD5 is
   verified and each series published atomically.
4. Run it again (a no-op resume), verify the result (against the server and the
   buckets), and print the tree, where each series came from, and the summary.
5. Serve it, on three more ports, as CRDC's Gen3 (API keys, short-lived tokens, signed
   URLs that expire, GA4GH DRS) and as TCIA's PathDB, with faults (every transfer cut
   once mid-file, every signed URL good for one request, tokens for three calls), and
   download one mixed sheet: a plain series row, DRS objects (series zips and reports,
   behind the key and the data use policy) and PathDB slides, into one tree: the zips
   as series in the Java tree, the other files in Collection/Patient/ with files.csv.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
WORK = HERE / "demo-work"
BIN = Path(sys.executable).parent / "nbia-retriever"
FAULTS = "reset=0.15,short=0.15,corrupt=0.1,http500=0.1,http429=0.1,max_per_series=2"
GEN3_FAULTS = "drop_after=65536:1,url_uses=1,token_uses=20"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def banner(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def tree(root: Path, limit: int = 40) -> None:
    shown = 0
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] == ".nbia":
            continue
        depth = len(rel.parts) - 1
        if path.is_file() and path.suffix == ".dcm":
            siblings = sorted(p.name for p in path.parent.glob("*.dcm"))
            if path.name != siblings[0]:
                continue
            label = f"{siblings[0]} ... {siblings[-1]}  ({len(siblings)} images)"
        else:
            label = path.name + ("/" if path.is_dir() else "")
        print("    " + "  " * depth + label)
        shown += 1
        if shown >= limit:
            print("    ...")
            return


def public_series(archive: Path) -> list[str]:
    """The UIDs of the public manifest (the archive's ``manifest.tcia``)."""
    lines = (archive / "manifest.tcia").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.strip().lower() == "listofseriestodownload=") + 1
    return [line.strip() for line in lines[start:] if line.strip()]


def journal_sources(root: Path) -> list[tuple[str, str]]:
    import sqlite3

    found: list[tuple[str, str]] = []
    for path in sorted((root / ".nbia").glob("journal*.sqlite")):
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            found += [(str(u), str(s)) for u, s in
                      db.execute("SELECT uid, source FROM series ORDER BY source, uid")]
    return found


def main() -> int:
    from nbia_retriever.server.synth import generate_archive

    archive = WORK / "archive"
    if not (archive / "manifest.tcia").exists():
        banner("Generating a synthetic archive")
        shutil.rmtree(archive, ignore_errors=True)
        summary = generate_archive(archive, seed=7, collections=2, patients=2, studies=1,
                                   series=2, images=12, rows=256, columns=256)
        print(f"    {len(summary.series)} series, {summary.total_files} files, "
              f"{summary.total_bytes / 1e6:.1f} MB in {archive}")
    port, s3_port, gen3_port = free_port(), free_port(), free_port()
    public = public_series(archive)
    s3_faults = f"slowdown=3,corrupt={public[0]}:1"
    index_dir = WORK / "idc-index"
    banner(f"Serving it on http://127.0.0.1:{port} with faults: {FAULTS}\n"
           f"   and as IDC's buckets on http://127.0.0.1:{s3_port} (all public series but "
           f"one) with faults: {s3_faults}")
    server = subprocess.Popen(
        [str(BIN), "serve", str(archive), "--port", str(port), "--faults", FAULTS,
         "--seed", "1", "--s3-port", str(s3_port), "--s3-faults", s3_faults,
         "--idc-index-out", str(index_dir), "--idc-exclude", public[-1],
         "--gen3-port", str(gen3_port), "--gen3-faults", GEN3_FAULTS,
         "--gen3-out", str(WORK / "gen3")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # wait for the server to accept connections
            try:
                urllib.request.urlopen(base + "/nbia-api/services/v1/getCollectionValues",
                                       timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print(server.stderr.read() if server.stderr else "", file=sys.stderr)
                    print("the reference server did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        manifest = WORK / "demo.tcia"
        # Every series, the limited-access collection included: we log in as the demo
        # user (the password travels in NBIA_PASSWORD, never on the command line).
        text = (archive / "manifest-all.tcia").read_text(encoding="utf-8")
        lines = [
            f"downloadServerUrl={base}/nbia-download/servlet/DownloadServlet"
            if line.startswith("downloadServerUrl=") else line
            for line in text.splitlines()
        ]
        manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
        downloads = WORK / "downloads"
        shutil.rmtree(downloads, ignore_errors=True)
        # The password goes only to a server the user chose: --api-url names it (a host
        # that only a manifest names gets nothing).
        api = f"{base}/nbia-api/services"
        endpoint = f"http://127.0.0.1:{s3_port}"
        while not (index_dir / "idc_index.parquet").exists():  # written before it serves
            if server.poll() is not None:
                print("the reference server stopped", file=sys.stderr)
                return 1
            time.sleep(0.2)
        idc = ["--idc-index", str(index_dir), "--idc-endpoint", endpoint]
        banner(f"nbia-retriever list {manifest.name} --idc-index ... (where each comes from)")
        subprocess.run([str(BIN), "list", str(manifest), "--api-url", api, "--user", "alice",
                        *idc], env={**os.environ, "COLUMNS": "160",
                                    "NBIA_PASSWORD": "wonderland-secret"})
        banner(f"NBIA_PASSWORD=... nbia-retriever download {manifest.name} -d {downloads.name}"
               f" --user alice --api-url {api} --idc-index ... --idc-endpoint {endpoint}")
        cmd = [str(BIN), "download", str(manifest), "-d", str(downloads),
               "--backoff", "0.2", "--error-report", str(WORK / "errors.csv"),
               "--user", "alice", "--api-url", api, *idc]
        env = {**os.environ, "NBIA_PASSWORD": "wonderland-secret",
               "NBIA_IDC_ENDPOINT": endpoint}
        first = subprocess.run(cmd, env=env)
        banner("Same command again: a no-op resume")
        start = time.monotonic()
        second = subprocess.run([*cmd, "--quiet"], env=env)
        print(f"    (took {time.monotonic() - start:.2f} s)")
        roots = [p for p in downloads.iterdir() if p.is_dir()] if downloads.is_dir() else []
        if not roots:
            print("the download made no folder", file=sys.stderr)
            return 1
        root = roots[0]
        banner(f"nbia-retriever verify {root.name}")
        local = subprocess.run([str(BIN), "verify", str(root)])
        banner(f"nbia-retriever verify {root.name} --server (MD5s against the server's)")
        remote = subprocess.run([str(BIN), "verify", str(root), "--server", "--api-url", api,
                                 "--user", "alice"], env=env)
        banner(f"The download: {root}")
        tree(root)
        banner("Where each series came from (the journal's source column)")
        for uid, source in journal_sources(root):
            print(f"    {uid[-12:]}  {source}")
        banner("metadata.csv (first rows)")
        for line in (root / "metadata.csv").read_text(encoding="utf-8").splitlines()[:4]:
            print("    " + line[:160])
        files = mixed_download(api, public, gen3_port, downloads, env)
        return (first.returncode or second.returncode or local.returncode
                or remote.returncode or files)
    finally:
        server.terminate()
        server.wait(10)


def mixed_download(api: str, public: list[str], gen3_port: int, downloads: Path,
                   env: dict[str, str]) -> int:
    """Step 5: one sheet naming a series, DRS objects and PathDB slides."""
    import csv

    out = WORK / "gen3"
    while not (out / "pathdb-manifest.csv").exists():  # written before it serves
        time.sleep(0.2)
    gen3 = f"http://127.0.0.1:{gen3_port}"
    sheet = WORK / "mixed.csv"
    header = ["Series UID", "drs_uri", "imageUrl", "name", "collection", "patient_id",
              "file_size_bytes"]
    rows = [header, [public[-1], "", "", "", "", "", ""]]  # one plain series row
    with (out / "drs-manifest.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append(["", row["drs_uri"], "", row["name"], row["collection"],
                         row["patient_id"], row["file_size_bytes"]])
    with (out / "pathdb-manifest.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            rows.append(["", "", row["imageUrl"], "", row["collectionName"],
                         row["subjectId"], ""])
    with sheet.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    banner(f"A mixed sheet ({sheet.name}): 1 series row, DRS objects behind a Gen3 key, "
           f"PathDB slides\n   Gen3 on {gen3} with faults: {GEN3_FAULTS}")
    subprocess.run([str(BIN), "list", str(sheet), "--gen3-endpoint", gen3, "--api-url", api],
                   env={**env, "COLUMNS": "160"})
    banner(f"nbia-retriever download {sheet.name} -d {downloads.name} --auth "
           "gen3/credentials.json --gen3-endpoint ... --accept-data-policy")
    done = subprocess.run([str(BIN), "download", str(sheet), "-d", str(downloads),
                           "--auth", str(out / "credentials.json"), "--gen3-endpoint", gen3,
                           "--accept-data-policy", "--api-url", api, "--user", "alice",
                           "--backoff", "0.2"], env=env)
    root = downloads / "mixed"
    if (root / "files.csv").is_file():
        banner(f"The download: {root}")
        tree(root)
        banner("files.csv")
        for line in (root / "files.csv").read_text(encoding="utf-8").splitlines()[:6]:
            print("    " + line[:160])
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
