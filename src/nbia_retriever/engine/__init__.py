"""The download engine: manifest in, complete and verified series folders out.

One concept per module, data flowing one way (``docs/DESIGN.md`` draws it):

* :mod:`.plan`: the journals, finished series, metadata in batches, folders, adoption;
* :mod:`.scheduler`: how many series stream at once, and which one is next;
* :mod:`.source`: where series come from (the :class:`Source` protocol, :class:`NbiaSource`);
* :mod:`.staging`: one attempt, streamed into this run's staging folder;
* :mod:`.checks`: what makes a staged series good (pure);
* :mod:`.publish`: names, the one rename, LICENSE, journal and metadata.csv;
* :mod:`.journal`: the SQLite journal;
* :mod:`.run`: the :class:`Engine` (controls, workers, events);
* :mod:`.procs`: worker processes that stream and stage series outside the GIL;
* :mod:`.events`, :mod:`.options`: what it says and what it is told.

Names are imported on first use: a worker process imports only ``staging`` and what it
needs (about 60 ms less of start-up on each of them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..ondisk import STATE_DIR
    from .events import Event, EventKind, Stats
    from .options import DEFAULT_MAX_CONNECTIONS, DownloadOptions
    from .run import Engine, make_engine, select_shard, shard_of
    from .scheduler import ConcurrencyLimiter, WorkQueue
    from .source import ByteStream, NbiaSource, Source, Verdict
    from .staging import HEADER_BYTES, read_tags

_WHERE = {
    "STATE_DIR": "..ondisk",
    "Event": ".events", "EventKind": ".events", "Stats": ".events",
    "DEFAULT_MAX_CONNECTIONS": ".options", "DownloadOptions": ".options",
    "Engine": ".run", "make_engine": ".run", "select_shard": ".run", "shard_of": ".run",
    "ConcurrencyLimiter": ".scheduler", "WorkQueue": ".scheduler",
    "ByteStream": ".source", "NbiaSource": ".source", "Source": ".source",
    "Verdict": ".source",
    "HEADER_BYTES": ".staging", "read_tags": ".staging",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "HEADER_BYTES",
    "STATE_DIR",
    "ByteStream",
    "ConcurrencyLimiter",
    "DownloadOptions",
    "Engine",
    "Event",
    "EventKind",
    "NbiaSource",
    "Source",
    "Stats",
    "Verdict",
    "WorkQueue",
    "make_engine",
    "read_tags",
    "select_shard",
    "shard_of",
]
