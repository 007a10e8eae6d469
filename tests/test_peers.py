"""Two independent NBIA clients from PyPI download from our reference server.

They prove the wire format is what real clients expect: if our server drifted from the
real NBIA (zip shape, md5hashes.csv, token endpoint, URL forms), these would break.
They run in their own virtualenv (their pins conflict with ours), as subprocesses;
`make test` builds it and sets NBIA_PEERS_PYTHON.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

PEERS_PYTHON = os.environ.get("NBIA_PEERS_PYTHON", "")
DRIVER = Path(__file__).with_name("peers_driver.py")

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(not (PEERS_PYTHON and Path(PEERS_PYTHON).exists()),
                       reason="NBIA_PEERS_PYTHON not set (make test sets it)"),
]


def digests(root: Path) -> Counter[str]:
    return Counter(hashlib.md5(p.read_bytes(), usedforsecurity=False).hexdigest()
                   for p in root.rglob("*.dcm"))


@pytest.fixture(scope="module")
def plain_archive(archive_factory):
    # No awkward headers: nbiatoolkit names files by InstanceNumber and would overwrite
    # duplicates (a known flaw of it, not of the wire format we are testing here).
    return archive_factory(seed=21, collections=1, patients=2, series=2, images=4,
                           awkward=False, restricted=False)


@pytest.mark.parametrize("client", ["tcia-utils", "nbiatoolkit"])
def test_peer_client_downloads_everything(client, plain_archive, serve, tmp_path):
    uids = [s.series_uid for s in plain_archive.series]
    out = tmp_path / "out"
    server = serve(plain_archive.root)
    done = subprocess.run([PEERS_PYTHON, str(DRIVER), client, server.url, str(out), *uids],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    image_requests = [r for r in server.requests if "getImage" in r.path]
    assert len(image_requests) == len(uids)
    assert all(r.status == 200 for r in image_requests)
    assert digests(out) == digests(plain_archive.root), f"{client} did not get every image"
    if client == "nbiatoolkit":
        assert json.loads(done.stdout.strip().splitlines()[-1])["ok"] is not False
