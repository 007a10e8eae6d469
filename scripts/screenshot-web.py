#!/usr/bin/env python3
"""Take docs/images/web-view.png: ``nbia-retriever open --web`` in headless Chromium.

Starts the reference server on a synthetic archive, ``open --web`` on its manifest
(``--api-url`` the server's API), then headless Chromium on the printed address; presses
``s`` (Start) in the page, waits until the view has drawn the finished downloads and
saves the screenshot; stops everything.

Chromium is driven over its DevTools protocol (``--remote-debugging-port``) rather than
``chromium --headless --screenshot --virtual-time-budget=MS URL``: virtual time does not
wait for a websocket, so that shot shows textual-serve's splash before the view has
connected, whatever the budget. Here the page is watched in real time: the shot is taken
once two frames a moment apart are the same.

Needs the web extra (``pip install 'nbia-retriever[web]'``) and Chromium (Debian:
``apt-get install chromium``). From the repository root::

    .venv/bin/python scripts/screenshot-web.py [--out docs/images/web-view.png] [--no-start]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "nbia_retriever.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def started(argv: list[str], cwd: Path) -> Iterator[subprocess.Popen[str]]:
    """A subprocess, stopped (SIGINT, then killed) on the way out."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def line_with(proc: subprocess.Popen[str], needle: str) -> str:
    """The first output line holding ``needle`` (both commands flush their addresses)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if needle in line:
            return line.strip()
    err = proc.stderr.read() if proc.stderr else ""
    raise SystemExit(f"{proc.args!r} exited: {err.strip()}")


def wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on port {port}") from None
            time.sleep(0.05)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if found := shutil.which(name):
            return found
    raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")


class DevTools:
    """Just enough of the DevTools protocol: commands on one page, answers by id."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def __call__(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.receive_str(timeout=60))
            if message.get("id") == ident:
                if "error" in message:
                    raise SystemExit(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        answer = await self("Runtime.evaluate", expression=expression, returnByValue=True)
        return answer.get("result", {}).get("value")

    async def screenshot(self) -> bytes:
        return base64.b64decode((await self("Page.captureScreenshot", format="png"))["data"])

    async def settled(self, timeout: float, interval: float = 1.0) -> bytes:
        """The frame once two shots ``interval`` apart are the same."""
        deadline = time.monotonic() + timeout
        previous = b""
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            shot = await self.screenshot()
            if shot == previous:
                return shot
            previous = shot
        raise SystemExit("the page never settled")

    async def press(self, key: str) -> None:
        for kind in ("keyDown", "keyUp"):
            await self("Input.dispatchKeyEvent", type=kind, key=key, text=key,
                       code=f"Key{key.upper()}", windowsVirtualKeyCode=ord(key.upper()))


async def shoot(chromium: str, address: str, profile: Path, size: str,
                start: bool) -> bytes:
    proc = await asyncio.create_subprocess_exec(
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
        "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
        "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
        f"--user-data-dir={profile}", f"--window-size={size}", "about:blank",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while b"DevTools listening on" not in (line := await proc.stderr.readline()):
            if not line:
                raise SystemExit("chromium exited before listening")
        devtools_port = int(line.decode().rsplit(":", 1)[1].split("/", 1)[0])
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{devtools_port}/json/list") as answer:
                targets = await answer.json()
            page = next(t for t in targets if t["type"] == "page")
            async with client.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = DevTools(ws)
                width, height = (int(n) for n in size.split(","))
                await cdp("Emulation.setDeviceMetricsOverride", width=width, height=height,
                          deviceScaleFactor=1, mobile=False)
                await cdp("Page.enable")
                await cdp("Page.navigate", url=address)
                deadline = time.monotonic() + 60
                # textual.js marks the body once the view's first bytes arrived
                while not await cdp.evaluate(
                        "document.body && document.body.classList.contains('-first-byte')"):
                    if time.monotonic() > deadline:
                        raise SystemExit("the view never connected")
                    await asyncio.sleep(0.2)
                await cdp.settled(timeout=60)
                if start:
                    # keys go to xterm's hidden textarea, as when the page has the focus
                    await cdp.evaluate("document.querySelector('.xterm-helper-textarea')"
                                       ".focus()")
                    await cdp.press("s")
                return await cdp.settled(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "web-view.png")
    parser.add_argument("--size", default="1280,800", help="Window size (default 1280,800).")
    parser.add_argument("--no-start", dest="start", action="store_false",
                        help="Shoot the table before Start (no downloads).")
    args = parser.parse_args()

    from nbia_retriever.server.synth import generate_archive

    chromium = find_chromium()
    with tempfile.TemporaryDirectory(prefix="nbia-web-shot-") as tmp:
        work = Path(tmp)
        # a fixed destination, so the shot does not change with the temporary folder
        dest = Path(tempfile.gettempdir()) / "nbia-web-view" / "downloads"
        shutil.rmtree(dest.parent, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = generate_archive(work / "archive", seed=7, collections=2, patients=5,
                                   studies=1, series=2, images=4, awkward=False,
                                   restricted=False)
        manifest = Path(archive.root) / "manifest.tcia"
        with started([*CLI, "serve", str(archive.root), "--port", "0"], work) as server:
            api_url = line_with(server, "API:").split()[1]
            port = free_port()
            with started([*CLI, "open", "--web", "--port", str(port), "--api-url", api_url,
                          "-d", str(dest), str(manifest)], work) as view:
                address = line_with(view, " on http://").split(" on ", 1)[1]
                wait_listening(port)
                png = asyncio.run(shoot(chromium, address, work / "chromium-profile",
                                        args.size, args.start))
        shutil.rmtree(dest.parent, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(png)
    print(f"{args.out} ({len(png) // 1024} KB)")


if __name__ == "__main__":
    main()
