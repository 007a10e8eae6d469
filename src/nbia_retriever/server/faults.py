"""Deterministic fault injection: what the field throws at NBIA clients, on demand.

Two ways to say what goes wrong:

* **Probabilities** (benchmarks, soak tests, the demo): each image request draws at most
  one fault. The draw depends only on ``(seed, series UID, attempt number for that
  series)``, never on the order in which concurrent clients arrive, so a run with the
  same seed fails the same series the same way.
* **A script** (unit tests): ``FaultPlan(script={uid: ["reset", "short", None]})`` means
  attempt 1 of that series is reset, attempt 2 gets a short zip, attempt 3 and later are
  clean. Scripted series ignore the probabilities and ``max_faults_per_series``.
  ``metadata_script`` does the same for successive metadata requests (any endpoint).

Fault kinds (script entries are ``"kind"`` or ``"kind:param"``):

=========  ============================================================  ===================
kind       what the client sees                                          param
=========  ============================================================  ===================
http500    500 with an HTML error page (Tomcat style)                    -
http503    503 with an HTML page                                         Retry-After seconds
http429    429 with ``Retry-After``                                      Retry-After seconds
reset      200, part of the zip, then a TCP RST (SO_LINGER 0)            body bytes first
short      200 and a *valid* zip that stops after k images (the real     k
           server's silent failure); ``md5hashes.csv`` still lists all
corrupt    200 and a valid zip with one image byte flipped *at rest*:    image (1-based)
           CRC matches, the MD5 in ``md5hashes.csv`` does not
stall      200, part of the zip, then silence for N seconds, then rest   seconds
http460    460 "Login needed." (the download servlets; scripts only)     -
http462    462 "Insufficient privilege." (idem)                          -
=========  ============================================================  ===================

Conditions that are not faults: ``latency`` (seconds added before every API answer),
``first_byte`` (seconds before each zip download is answered: a server that builds a
series' zip before it sends a byte, as the real one does under load; metadata answers are
not delayed),
``bandwidth`` (bytes per second per zip stream; HTTP/1.1 sends one response at a time on a
connection, so this is a per-connection cap) and ``hold_metadata=N`` (metadata answers
after the first N, 0 for all, wait until a series zip has been sent whole, at most a minute: a
server whose later metadata batches are slow, made deterministic; a client that waits
for all its metadata before downloading anything is held the whole minute).

The CLI spec (``--faults``) is a comma-separated list of ``key=value``::

    reset=0.2,short=0.1,corrupt=0.1,http500=0.1,http503=0.05,http429=0.1:2,
    stall=0.05:3,latency=0.1,first_byte=1,bandwidth=10mbit,max_per_series=2,metadata=yes,
    seed=7

Probabilities are in [0, 1] and add up to at most 1; ``http429=P:S`` and ``http503=P:S``
set the Retry-After seconds, ``stall=P:S`` the stall length. Bandwidth units: ``bit``,
``kbit``, ``mbit``, ``gbit`` (bits/s) or ``b``, ``kb``, ``mb``, ``gb``, ``kib``, ``mib``,
``gib`` (bytes/s); a bare number is bytes/s. ``metadata=yes`` applies the 5xx/429
probabilities to metadata and query endpoints too. ``none`` or an empty spec: no faults.
"""

from __future__ import annotations

import math
import random
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import FaultSpecError as FaultSpecError  # re-export

HTTP_KINDS = ("http500", "http503", "http429")
STREAM_KINDS = ("reset", "short", "corrupt", "stall")
FAULT_KINDS = HTTP_KINDS + STREAM_KINDS
#: Kinds a script may name but no probability draws.
SCRIPT_KINDS = ("http460", "http462")
#: Every kind answered with a status instead of a stream.
STATUS_KINDS = HTTP_KINDS + SCRIPT_KINDS
_ALIASES = {"500": "http500", "503": "http503", "429": "http429"}


@dataclass(frozen=True)
class Fault:
    """One decided fault; ``param`` as in the module table, ``None`` for "pick one"."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str | Fault) -> Fault:
        if isinstance(text, Fault):
            return text
        kind, _, param = str(text).strip().partition(":")
        kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
        if kind not in FAULT_KINDS + SCRIPT_KINDS:
            raise FaultSpecError(f"unknown fault {text!r}; use one of "
                                 f"{', '.join(FAULT_KINDS + SCRIPT_KINDS)}")
        if not param.strip():
            return cls(kind)
        value = _number(param, f"fault {text!r}")
        if value < 0:
            raise FaultSpecError(f"fault {text!r}: the parameter must not be negative")
        return cls(kind, value)


ScriptEntry = str | Fault | None


@dataclass(frozen=True)
class FaultPlan:
    """What to break and how often. The default plan breaks nothing."""

    seed: int = 0
    http500: float = 0.0
    http503: float = 0.0
    http429: float = 0.0
    reset: float = 0.0
    short: float = 0.0
    corrupt: float = 0.0
    stall: float = 0.0
    stall_seconds: float = 3.0
    retry_after: float = 1.0
    latency: float = 0.0
    first_byte: float = 0.0
    bandwidth: float | None = None
    hold_metadata: int | None = None
    max_faults_per_series: int | None = None
    metadata: bool = False
    script: Mapping[str, Sequence[ScriptEntry]] = field(default_factory=dict)
    metadata_script: Sequence[ScriptEntry] = ()

    def __post_init__(self) -> None:
        total = 0.0
        for kind in FAULT_KINDS:
            p = getattr(self, kind)
            if not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
                raise FaultSpecError(f"{kind}={p!r}: a probability must be between 0 and 1")
            total += p
        if total > 1.0 + 1e-9:
            raise FaultSpecError(f"fault probabilities add up to {total:g}, more than 1")
        for name in ("stall_seconds", "retry_after", "latency", "first_byte"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise FaultSpecError(f"{name}={value!r} must be a non-negative number")
        if self.bandwidth is not None and not (self.bandwidth > 0):
            raise FaultSpecError(f"bandwidth={self.bandwidth!r} must be positive")
        if self.hold_metadata is not None and self.hold_metadata < 0:
            raise FaultSpecError("hold_metadata must not be negative")
        if self.max_faults_per_series is not None and self.max_faults_per_series < 0:
            raise FaultSpecError("max_faults_per_series must not be negative")
        script = {
            str(uid): tuple(None if e is None else Fault.parse(e) for e in entries)
            for uid, entries in self.script.items()
        }
        meta = tuple(None if e is None else Fault.parse(e) for e in self.metadata_script)
        for fault in meta:
            if fault is not None and fault.kind not in HTTP_KINDS:
                raise FaultSpecError(f"metadata_script: {fault.kind} applies to zips only")
        object.__setattr__(self, "script", script)
        object.__setattr__(self, "metadata_script", meta)

    @property
    def probability(self) -> float:
        return float(sum(getattr(self, kind) for kind in FAULT_KINDS))

    @property
    def active(self) -> bool:
        return bool(self.probability or self.script or self.metadata_script or self.latency
                    or self.first_byte or self.bandwidth or self.hold_metadata is not None)

    def describe(self) -> str:
        """A one-line summary for the CLI banner (scripts are summarised, not listed)."""
        parts = [f"{k}={getattr(self, k):g}" for k in FAULT_KINDS if getattr(self, k)]
        if self.stall:
            parts.append(f"stall_seconds={self.stall_seconds:g}")
        if self.http429 or self.http503:
            parts.append(f"retry_after={self.retry_after:g}")
        if self.latency:
            parts.append(f"latency={self.latency:g}s")
        if self.first_byte:
            parts.append(f"first_byte={self.first_byte:g}s")
        if self.bandwidth:
            parts.append(f"bandwidth={self.bandwidth:.0f}B/s")
        if self.max_faults_per_series is not None:
            parts.append(f"max_per_series={self.max_faults_per_series}")
        if self.hold_metadata is not None:
            parts.append(f"hold_metadata={self.hold_metadata}")
        if self.metadata:
            parts.append("metadata=yes")
        if self.script:
            parts.append(f"script for {len(self.script)} series")
        if self.metadata_script:
            parts.append(f"metadata script of {len(self.metadata_script)}")
        return ", ".join(parts) + f" (seed {self.seed})" if parts else "none"

    @classmethod
    def parse(cls, spec: str | None, *, seed: int = 0) -> FaultPlan:
        """Parse the ``--faults`` syntax documented in the module docstring."""
        values: dict[str, object] = {"seed": seed}
        text = (spec or "").strip()
        if text.lower() in ("", "none", "off", "no"):
            return cls(**values)  # type: ignore[arg-type]
        for item in text.split(","):
            item = item.strip()
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = _ALIASES.get(key.strip().lower(), key.strip().lower().replace("-", "_"))
            value = value.strip()
            if not eq and key != "metadata":
                raise FaultSpecError(f"--faults: {item!r} is not key=value")
            if key in FAULT_KINDS:
                probability, _, param = value.partition(":")
                values[key] = _number(probability, f"--faults {item!r}")
                if param:
                    target = {"stall": "stall_seconds", "http429": "retry_after",
                              "http503": "retry_after"}.get(key)
                    if target is None:
                        raise FaultSpecError(f"--faults {item!r}: {key} takes no parameter")
                    values[target] = _number(param, f"--faults {item!r}")
            elif key in ("stall_seconds", "retry_after", "latency", "first_byte"):
                values[key] = _number(value.removesuffix("s"), f"--faults {item!r}")
            elif key == "bandwidth":
                values[key] = parse_rate(value)
            elif key == "hold_metadata":
                values[key] = _integer(value, f"--faults {item!r}")
            elif key in ("max_per_series", "max_faults_per_series"):
                values["max_faults_per_series"] = _integer(value, f"--faults {item!r}")
            elif key == "seed":
                values["seed"] = _integer(value, f"--faults {item!r}")
            elif key == "metadata":
                values["metadata"] = _flag(value or "yes", item)
            else:
                known = [*FAULT_KINDS, "stall_seconds", "retry_after", "latency", "first_byte",
                         "bandwidth", "max_per_series", "hold_metadata", "metadata", "seed"]
                raise FaultSpecError(
                    f"--faults: unknown key {key!r}; known: {', '.join(known)}"
                )
        return cls(**values)  # type: ignore[arg-type]


_RATE_UNITS = {
    "": 1, "b": 1, "bps": 1, "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_rate(text: str) -> float:
    """``10mbit`` -> 1250000.0 bytes/s; ``512kib``, ``2MB/s``, ``100000`` also work."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*(?:/s|ps)?\s*",
                         text.lower())
    if not match or match.group(2) not in _RATE_UNITS:
        raise FaultSpecError(
            f"bandwidth {text!r}: use a number with a unit such as 10mbit, 500kbit, 2mb, 512kib"
        )
    rate = float(match.group(1)) * _RATE_UNITS[match.group(2)]
    if rate <= 0:
        raise FaultSpecError(f"bandwidth {text!r} must be positive")
    return rate


def _number(text: str, where: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise FaultSpecError(f"{where}: {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise FaultSpecError(f"{where}: {text.strip()!r} is not a finite number")
    return value


def _integer(text: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise FaultSpecError(f"{where}: {text.strip()!r} is not an integer") from None


def _flag(text: str, where: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("yes", "true", "1", "on"):
        return True
    if lowered in ("no", "false", "0", "off"):
        return False
    raise FaultSpecError(f"--faults {where!r}: use yes or no")


def seeded_rng(seed: int, *key: object) -> random.Random:
    """``random.Random`` seeded from a string: stable across runs and Python versions."""
    return random.Random("|".join(str(part) for part in (seed, *key)))


class FaultInjector:
    """A plan plus its counters (attempts and faults per series). Thread-safe."""

    def __init__(self, plan: FaultPlan | None = None) -> None:
        self.plan = plan or FaultPlan()
        self._lock = threading.Lock()
        self._attempts: dict[str, int] = {}
        self._faulted: dict[str, int] = {}
        self._metadata_attempts: dict[str, int] = {}
        self._metadata_count = 0

    def rng(self, *key: object) -> random.Random:
        """A generator fixed by the plan's seed and ``key``: same inputs, same choices."""
        return seeded_rng(self.plan.seed, *key)

    def image_fault(self, series_uid: str) -> tuple[Fault | None, int]:
        """Decide the fault for the next image request of a series; (fault, attempt)."""
        plan = self.plan
        with self._lock:
            attempt = self._attempts.get(series_uid, 0) + 1
            self._attempts[series_uid] = attempt
            if series_uid in plan.script:
                entries = plan.script[series_uid]
                fault = entries[attempt - 1] if attempt <= len(entries) else None
                return fault, attempt  # type: ignore[return-value]
            cap = plan.max_faults_per_series
            if cap is not None and self._faulted.get(series_uid, 0) >= cap:
                return None, attempt
            fault = self._draw(FAULT_KINDS, "image", series_uid, attempt)
            if fault is not None:
                self._faulted[series_uid] = self._faulted.get(series_uid, 0) + 1
            return fault, attempt

    def metadata_fault(self, key: str) -> Fault | None:
        """The fault for a metadata/query request identified by ``key`` (path + query)."""
        plan = self.plan
        with self._lock:
            self._metadata_count += 1
            if plan.metadata_script:
                index = self._metadata_count - 1
                if index < len(plan.metadata_script):
                    return plan.metadata_script[index]  # type: ignore[return-value]
                return None
            if not plan.metadata:
                return None
            attempt = self._metadata_attempts.get(key, 0) + 1
            self._metadata_attempts[key] = attempt
            return self._draw(HTTP_KINDS, "metadata", key, attempt)

    def _draw(self, kinds: Sequence[str], *key: object) -> Fault | None:
        u = self.rng(*key, "draw").random()
        edge = 0.0
        for kind in kinds:
            edge += getattr(self.plan, kind)
            if u < edge:
                return Fault(kind)
        return None

    def stats(self) -> dict[str, int]:
        """Attempts per series so far (tests and the demo use it to explain a run)."""
        with self._lock:
            return dict(self._attempts)


__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultInjector",
    "FaultPlan",
    "FaultSpecError",
    "parse_rate",
    "seeded_rng",
]
