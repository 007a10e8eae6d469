"""Runs a third-party NBIA client against our reference server (under .venv-peers).

Usage: python peers_driver.py {tcia-utils|nbiatoolkit} SERVER_URL OUT_DIR UID [UID ...]

Each client is pointed at our server the way its users would point it at another NBIA
host: tcia-utils by replacing ``tcia_utils.nbia.setApiUrl``, nbiatoolkit by setting the
client's ``base_url`` and its OAuth client's ``base_url``. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import types


def run_tcia_utils(server: str, out: str, uids: list[str]) -> dict[str, object]:
    from tcia_utils import nbia

    nbia.setApiUrl = lambda endpoint, api_url="": f"{server}/nbia-api/services/v1/"
    nbia.downloadSeries(uids, input_type="list", path=out, format="", max_workers=2)
    return {"client": "tcia-utils"}


def run_nbiatoolkit(server: str, out: str, uids: list[str]) -> dict[str, object]:
    from nbiatoolkit import NBIAClient

    client = NBIAClient(log_level="ERROR")
    client.base_url = types.SimpleNamespace(value=f"{server}/nbia-api/services/")
    client.OAuth_client.base_url = f"{server}/nbia-api/"
    ok = client.downloadSeries(uids, downloadDir=out, nParallel=1)
    return {"client": "nbiatoolkit", "ok": bool(ok)}


def main() -> None:
    name, server, out, *uids = sys.argv[1:]
    runner = {"tcia-utils": run_tcia_utils, "nbiatoolkit": run_nbiatoolkit}[name]
    print(json.dumps(runner(server.rstrip("/"), out, uids)))


if __name__ == "__main__":
    main()
