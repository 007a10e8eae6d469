"""Everything a run can be told; the defaults are what a user gets without flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..layout import Layout

if TYPE_CHECKING:
    from ..api import Credentials

#: Polite ceiling on concurrent series streams to one host (``--max-connections``).
DEFAULT_MAX_CONNECTIONS = 16
API_CHOICES = ("auto", "v1", "v2", "v4")


@dataclass
class DownloadOptions:
    """The settings of one run (the CLI's flags, the Python API's keyword arguments).

    ``workers=None`` (the default) lets the scheduler find the number of concurrent
    streams the link needs, between 1 and ``max_connections``; a number pins it.
    ``trusted_hosts`` are hosts the user has chosen besides the known TCIA ones and the
    host of ``api_url``: only those ever see a password or token.
    """

    workers: int | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    retries: int | None = None  # None: the manifest's noOfrRetry (default 4)
    timeout: float = 60.0  # seconds in which an attempt must move at least a few bytes
    api: str = "auto"
    api_url: str | None = None  # None: derived from the manifest's downloadServerUrl
    layout: Layout | str = Layout.DESCRIPTIVE
    md5: bool = True
    only_failed: bool = False
    credentials: Credentials | None = None
    verify_tls: bool = True
    backoff_base: float = 2.0
    shard: tuple[int, int] | None = None  # (k, n), 1-based k
    adaptive: bool = True  # halve concurrency on 429/503, creep back up on success
    trusted_hosts: tuple[str, ...] = ()
    #: Worker processes that stream and stage series (None: one per core but one, see
    #: ``engine.procs``); 0 keeps every stream on threads of this process.
    processes: int | None = None
    #: Where series come from: a name in the source registry (``engine.source.SOURCES``).
    source: str = "nbia"

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise UsageError(f"workers must be a whole number of at least 1, not {self.workers!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise UsageError("max_connections must be a whole number of at least 1, not "
                             f"{self.max_connections!r}")
        if not isinstance(self.timeout, int | float) or not math.isfinite(self.timeout) \
                or self.timeout <= 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if self.processes is not None and (not isinstance(self.processes, int)
                                           or isinstance(self.processes, bool)
                                           or self.processes < 0):
            raise UsageError(f"processes must be 0 or more, not {self.processes!r}")
        if self.processes:
            from .procs import processes_supported

            why = processes_supported()
            if why is not None:
                raise UsageError(f"worker processes cannot run here ({why}): use processes=0")
        if self.retries is not None and (not isinstance(self.retries, int) or self.retries < 0):
            raise UsageError(f"retries must be 0 or more, not {self.retries!r}")
        if self.api not in API_CHOICES:
            raise UsageError(f"api must be one of {', '.join(API_CHOICES)}, not {self.api!r}")
        try:
            self.layout = Layout(self.layout)
        except ValueError:
            raise UsageError(f"layout must be descriptive or classic, not {self.layout!r}") \
                from None
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 1 <= k <= n):
                raise UsageError(f"shard must be K/N with 1 <= K <= N, not {k}/{n}")
        self.trusted_hosts = tuple(self.trusted_hosts)
        if not isinstance(self.source, str) or not self.source:
            raise UsageError(f"source must be the name of a source, not {self.source!r}")

    @property
    def streams_cap(self) -> int:
        """The most streams this run may open at once."""
        if self.workers is not None:
            return self.workers
        return self.max_connections

    def __repr__(self) -> str:  # never show credentials, even by accident
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "credentials"}
        user = self.credentials.username if self.credentials else None
        return f"DownloadOptions(user={user!r}, {shown})"
