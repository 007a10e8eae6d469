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
* :mod:`.events`, :mod:`.options`: what it says and what it is told.
"""

from __future__ import annotations

from ..ondisk import STATE_DIR
from .events import Event, EventKind, Stats
from .options import DEFAULT_MAX_CONNECTIONS, DownloadOptions
from .run import Engine, make_engine, select_shard, shard_of
from .scheduler import ConcurrencyLimiter, WorkQueue
from .source import ByteStream, NbiaSource, Source, Verdict
from .staging import HEADER_BYTES, read_tags

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
