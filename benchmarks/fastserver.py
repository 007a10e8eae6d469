"""A fast NBIA server for the benchmarks: the reference server with every series' zip
prepared on disk and sent with ``sendfile`` (issue 26 item 1).

The reference server builds each zip as it streams it, in Python, on one event loop: on
loopback it, not the client, sets the pace (about 150 MB/s a stream). The real server is
a JVM on many cores, and an independent emulator serving prepared zips moves 600 to
1,000 MB/s a stream. So this mode prepares each series' zip once (the very bytes the
reference server would stream: same entries, order, names, LICENSE and md5hashes.csv,
STORED or DEFLATED) under ``bench-work/prepared`` and answers ``getImage`` /
``getImageWithMD5Hash`` with the file itself (the kernel copies it: the server costs
almost nothing and the client is what is measured). Every other endpoint (metadata,
tokens, MD5 hierarchy) is the reference server's own. No faults: a fast server is a
healthy one.

``python benchmarks/fastserver.py ARCHIVE PREPARED_DIR [--stored]`` prints the same
``API:`` line as ``nbia-retriever serve`` and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

from aiohttp import web

from nbia_retriever.server.app import ZIP_TYPE, NbiaService, _safe_name, _yes
from nbia_retriever.server.index import SeriesRecord
from nbia_retriever.server.runner import ReferenceServer
from nbia_retriever.server.zipwriter import stream_zip

#: (md5hashes.csv, LICENSE) pairs the endpoints send: getImage (v1/v2, and v4 without
#: IncludeMD5), v4 getImage?IncludeMD5=yes, getImageWithMD5Hash.
KINDS = ((False, True), (True, True), (True, False))
MARKER = "prepared.done"


class PreparedService(NbiaService):
    """The reference service whose image endpoints send prepared zip files."""

    def __init__(self, *args: object, prepared: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.prepared = prepared

    def zip_path(self, uid: str, md5: bool, license_entry: bool) -> Path:
        return self.prepared / f"{_safe_name(uid)}-{int(md5)}{int(license_entry)}.zip"

    def prepare(self) -> int:
        """Write every series' zips (once per archive and mode: a marker says done)."""
        if (self.prepared / MARKER).is_file():
            return 0
        self.prepared.mkdir(parents=True, exist_ok=True)
        count = 0
        series: list[SeriesRecord] = list(self._all_visible("v1", None))
        for record in series:
            for md5, license_entry in KINDS:
                path = self.zip_path(record.series_uid, md5, license_entry)
                entries = self.zip_entries(record, md5=md5, license_entry=license_entry)
                with open(path, "wb") as out:
                    for chunk in stream_zip(entries, chunk=1 << 20):
                        out.write(chunk)
                count += 1
        (self.prepared / MARKER).write_text("ok\n", encoding="utf-8")
        return count

    async def _image(self, request: web.Request, version: str, user: str | None,
                     query: dict[str, str], *, md5: bool,
                     license_entry: bool) -> web.StreamResponse:
        uid = query.get("SeriesInstanceUID", "").strip()
        series = self._lookup(uid, version, user) if uid else None
        path = self.zip_path(uid, md5, license_entry) if series is not None else None
        if path is None or _yes(query.get("NewFileNames")) or not path.is_file():
            return await super()._image(request, version, user, query, md5=md5,
                                        license_entry=license_entry)
        return web.FileResponse(path, chunk_size=1 << 20, headers={
            "Content-Type": ZIP_TYPE,
            "Content-Disposition": f'attachment; filename="{_safe_name(uid)}.zip"',
        })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("archive", type=Path)
    ap.add_argument("prepared", type=Path, help="where the zips are kept (per mode)")
    ap.add_argument("--stored", action="store_true", help="STORED image entries")
    args = ap.parse_args()
    server = ReferenceServer(args.archive, stored=args.stored)
    server.service = PreparedService(server.index, server.config, stored=args.stored,
                                     prepared=args.prepared)
    made = server.service.prepare()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with server:
        print(f"Prepared {made} zips in {args.prepared} (pid {os.getpid()})", flush=True)
        print(f"API:      {server.api_url}  (fast: prepared zips)", flush=True)
        stopped.wait()


if __name__ == "__main__":
    main()
