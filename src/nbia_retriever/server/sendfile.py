"""A byte range of a file onto a response: the sender the S3 emulator and the Gen3
signed-URL host share. One copy, so that the faults both inject (a pace, a flipped byte,
a body cut short) behave alike and the zero-copy path is kept in one place; and the two
ways every server here ends a body short (:func:`close`, :func:`reset`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from .requestlog import RequestState

PIECE = 256 * 1024
"""What is read and written at a time: memory stays flat in the object's size."""


async def send_range(request: web.Request, response: web.StreamResponse, path: Path,
                     start: int, stop: int, *, state: RequestState,
                     log: Callable[[], None], flip: int | None = None,
                     cut: int | None = None, rate: float | None = None,
                     reset_at_cut: bool = True) -> None:
    """Bytes [start, stop) of ``path`` onto the prepared ``response``, a piece at a time,
    paced to ``rate`` bytes/s; byte ``flip`` inverted; once ``cut`` is reached, a TCP
    reset (or without ``reset_at_cut`` a close) short of the promised length.

    ``state.bytes_sent`` counts what was written; ``log()`` is called before the client
    can see the end (or the cut), so a client that saw it finds the request's record.
    """
    loop = asyncio.get_running_loop()
    piece = PIECE if rate is None else max(1024, min(PIECE, int(rate / 20)))
    began = loop.time()
    position = start
    try:
        with path.open("rb", buffering=0) as handle:
            transport = request.transport
            if flip is None and cut is None and rate is None and transport is not None:
                # Nothing to change on the way: the kernel copies file to socket (what
                # aiohttp's FileResponse does), a third of the CPU per byte. The last
                # byte goes through the loop below, so the log comes before the end.
                with contextlib.suppress(NotImplementedError):
                    if stop - start > 1:
                        await loop.sendfile(transport, handle, start, stop - start - 1)
                    position = max(start, stop - 1)
            handle.seek(position)
            while position < stop:
                want = min(piece, stop - position)
                if cut is not None:
                    want = min(want, max(0, cut - position))
                if want == 0:  # cut reached: the client gets a short body, not an end
                    log()
                    await (reset(request) if reset_at_cut else close(request))
                    return
                block = handle.read(want)
                if not block:  # the file shrank under us: end short, like a reset
                    log()
                    await reset(request)
                    return
                if flip is not None and position <= flip < position + len(block):
                    changed = bytearray(block)
                    changed[flip - position] ^= 0xFF
                    block = bytes(changed)
                position += len(block)
                state.bytes_sent = position - start
                if position >= stop:  # logged before the client can see the end
                    log()
                await response.write(block)
                if rate is not None:
                    delay = began + (position - start) / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
        log()
        await response.write_eof()
    except ConnectionError:
        pass


async def close(request: web.Request) -> None:
    """Close the connection once what was written has left (a FIN: the client reads
    every byte sent, then an end short of Content-Length)."""
    transport = request.transport
    if transport is not None:
        await _drained(transport)
        transport.close()


async def reset(request: web.Request) -> None:
    """A real TCP RST after the bytes written so far have left: SO_LINGER 0, then close."""
    transport = request.transport
    if transport is None:
        return
    await _drained(transport)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _drained(transport: asyncio.Transport) -> None:
    """Until what was written has left (or 2 s: a client that stopped reading)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.0
    while (transport.get_write_buffer_size() and not transport.is_closing()
           and loop.time() < deadline):
        await asyncio.sleep(0.005)
