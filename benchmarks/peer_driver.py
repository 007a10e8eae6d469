"""Runs one third-party NBIA client against the reference server (under .venv-peers).

Usage: ``python peer_driver.py {tcia-utils|nbiatoolkit} SERVER_URL OUT_DIR UID_FILE [WORKERS]``

WORKERS omitted means the client's own default: tcia-utils ``downloadSeries`` uses
``max_workers=10`` threads, nbiatoolkit ``NBIAClient.downloadSeries`` ``nParallel=1``
process (both read from their sources, versions pinned in peers-requirements.txt).

Each client is pointed at our server the way its users would point it at another NBIA
host: tcia-utils by replacing ``tcia_utils.nbia.setApiUrl(endpoint, api_url)`` (it
returns the versioned services root, ``.../nbia-api/services/v1/``; its ``getImage``
call appends ``getImage?NewFileNames=Yes&SeriesInstanceUID=``), nbiatoolkit by setting
the client's ``base_url`` (an enum whose ``.value`` is ``.../nbia-api/services/``, to
which it appends ``v2/getImageWithMD5Hash``) and its OAuth client's ``base_url``
(``.../nbia-api/``; it logs in as nbia_guest through ``oauth/token``).
"""

from __future__ import annotations

import json
import sys
import types


def run_tcia_utils(server: str, out: str, uids: list[str], workers: int | None) -> dict:
    from tcia_utils import nbia

    def set_api_url(endpoint: str, api_url: str = "") -> str:
        return f"{server}/nbia-api/services/v1/"

    nbia.setApiUrl = set_api_url
    kwargs = {} if workers is None else {"max_workers": workers}
    nbia.downloadSeries(uids, input_type="list", path=out, format="", **kwargs)
    return {"client": "tcia-utils"}


def run_nbiatoolkit(server: str, out: str, uids: list[str], workers: int | None) -> dict:
    from nbiatoolkit import NBIAClient

    client = NBIAClient(log_level="ERROR")
    client.base_url = types.SimpleNamespace(value=f"{server}/nbia-api/services/")
    client.OAuth_client.base_url = f"{server}/nbia-api/"
    kwargs = {} if workers is None else {"nParallel": workers}
    ok = client.downloadSeries(uids, downloadDir=out, **kwargs)
    return {"client": "nbiatoolkit", "ok": bool(ok)}


def main() -> None:
    name, server, out, uid_file, *rest = sys.argv[1:]
    workers = int(rest[0]) if rest else None
    with open(uid_file, encoding="utf-8") as handle:
        uids = [line.strip() for line in handle if line.strip()]
    runner = {"tcia-utils": run_tcia_utils, "nbiatoolkit": run_nbiatoolkit}[name]
    print(json.dumps(runner(server.rstrip("/"), out, uids, workers)))


if __name__ == "__main__":
    main()
