"""Per-request state shared by the reference servers' middleware and request log."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

if TYPE_CHECKING:
    from .app import RequestRecord

_RequestKey: Any
try:
    from aiohttp.web import RequestKey as _RequestKey
except ImportError:  # aiohttp < 3.12: plain string keys
    _RequestKey = None


@dataclass
class RequestState:
    """What a handler learns about a request that the log should keep."""

    series_uid: str | None = None
    fault: str | None = None
    bytes_sent: int | None = None
    logged: bool = False
    started: float = 0.0
    t0: float = 0.0


S = TypeVar("S", bound=RequestState)


def state_key(name: str, cls: type[RequestState]) -> Any:
    """The request key under which a service keeps its ``cls`` state."""
    if _RequestKey is None:  # aiohttp < 3.12: plain string keys
        return name
    return _RequestKey(name, cls)


def request_state(request: web.Request, key: Any, cls: type[S]) -> S:
    """The request's state under ``key``, made (as ``cls()``) on first use."""
    state: S | None = request.get(key)
    if state is None:
        state = cls()
        request[key] = state
    return state


def bytes_sent(state: RequestState, response: web.StreamResponse | None) -> int:
    """The bytes a stream counted, else the length of the response's body."""
    sent = state.bytes_sent
    if sent is None:
        body = getattr(response, "body", None)
        sent = len(body) if isinstance(body, bytes | bytearray) else 0
    return int(sent)


async def answered(request: web.Request, answer: Callable[[], Awaitable[web.StreamResponse]],
                   log: Callable[[web.Request, int, web.StreamResponse | None], None],
                   ) -> web.StreamResponse:
    """``answer()``'s response, the request logged once it is done whatever happened:
    with its status, an HTTP error's, or 500 for anything else (a handler's bug, a
    cancel). The servers' middlewares share it so their logs agree on what a status is."""
    status = 500
    response: web.StreamResponse | None = None
    try:
        response = await answer()
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        log(request, status, response)


class RequestLog:
    """The log of the requests a service answered, read from any thread."""

    _log_lock: threading.Lock
    _log: deque[RequestRecord]

    @property
    def requests(self) -> list[RequestRecord]:
        with self._log_lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._log_lock:
            self._log.clear()
