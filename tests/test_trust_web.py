"""Issue 21, the web view: its children and its session token are not fooled.

* ``open --web`` started in a folder someone else filled (a shared project folder, a
  download) runs none of its Python files: the view's children start with ``-P``;
* the address printed by this run opens the page even when the browser still holds the
  cookie of an earlier run on the same port.

Real ``open --web`` processes on a free loopback port, driven over HTTP and websockets.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest

pytest.importorskip("textual_serve")

from test_web import (  # after the skip: test_web needs textual_serve too
    Browser,
    WebProcess,
    environment,
    free_port,
    open_children,
    wait_until_listening,
)

#: Modules a child started with the working directory on sys.path would import from it.
PLANTED = ("nbia_retriever.py", "textual.py", "click.py", "sitecustomize.py",
           "usercustomize.py")


@pytest.fixture(scope="module")
def manifest(archive_factory: Any) -> Path:
    root = archive_factory(seed=1, collections=1, patients=1, studies=1, series=1, images=1,
                           awkward=False).root
    return Path(root) / "manifest.tcia"


class SafeWebProcess(WebProcess):
    """``open --web`` started with ``-P`` itself: only its children can import from the
    working directory, so what is imported there is theirs."""

    python_options = ("-P",)


def test_the_views_children_run_no_code_from_the_working_directory(manifest: Path,
                                                                   tmp_path: Path) -> None:
    work = tmp_path / "shared-folder"
    work.mkdir()
    imported = tmp_path / "imported"
    imported.mkdir()
    for name in PLANTED:
        (work / name).write_text(f"open({str(imported / name)!r}, 'w').close()\n",
                                 encoding="utf-8")
    port = free_port()
    process = SafeWebProcess(["--port", str(port), str(manifest)], work, environment())
    try:
        address = process.address()
        wait_until_listening(port)
        browser = Browser(address, port)
        deadline = time.monotonic() + 60
        # The view draws its screen, or a planted module runs (and the child dies).
        while (b"manifest.tcia" not in browser.screen and browser.ended is None
               and browser.error is None and not any(imported.iterdir())):
            assert time.monotonic() < deadline, browser.screen[-2000:]
            time.sleep(0.05)
        assert sorted(p.name for p in imported.iterdir()) == [], "ran planted code"
        assert b"manifest.tcia" in browser.screen, browser.screen[-2000:]
        browser.leave.set()
        browser.thread.join(timeout=30)
        assert process.stop() == 0
    finally:
        process.kill()
    assert sorted(p.name for p in imported.iterdir()) == []


def test_the_printed_address_wins_over_a_stale_cookie(manifest: Path, tmp_path: Path) -> None:
    port = free_port()
    name = f"nbia_retriever_session_{port}"
    earlier = WebProcess(["--port", str(port), str(manifest)], tmp_path, environment())
    try:
        old_address = earlier.address()
        wait_until_listening(port)
        page = httpx.get(old_address)
        assert page.status_code == 200
        stale = page.cookies[name]
        assert earlier.stop() == 0
    finally:
        earlier.kill()

    # The same port, a new run: the browser still sends the earlier run's cookie.
    later = WebProcess(["--port", str(port), str(manifest)], tmp_path, environment())
    try:
        address = later.address()
        wait_until_listening(port)
        assert address != old_address
        with httpx.Client(cookies={name: stale}) as browser:
            page = browser.get(address)
            assert page.status_code == 200, page.text
            fresh = page.cookies[name]
            assert fresh != stale and fresh in address
            # the stale cookie alone opens nothing, nor does the old address
            assert httpx.get(f"http://127.0.0.1:{port}/",
                             cookies={name: stale}).status_code == 403
            assert httpx.get(old_address).status_code == 403

        async def handshake(cookie: str) -> int:
            async with aiohttp.ClientSession() as client:
                try:
                    async with client.ws_connect(f"ws://127.0.0.1:{port}/ws",
                                                 headers={"Cookie": f"{name}={cookie}"},
                                                 origin=f"http://127.0.0.1:{port}"):
                        return 101
                except aiohttp.WSServerHandshakeError as exc:
                    return exc.status

        assert asyncio.run(handshake(stale)) == 403
        assert not open_children(later.proc.pid)
        assert asyncio.run(handshake(fresh)) == 101  # the page the new cookie came with
        assert later.stop() == 0
    finally:
        later.kill()

