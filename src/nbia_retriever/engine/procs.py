"""Worker processes: series streamed, inflated, hashed and staged outside the GIL.

Why: on a fast link the client is CPU-bound, and one Python process shares one GIL
among all its streams: measured on 2 cores (BENCHMARKS.md), a quarter of the CPU of a
download is Python holding the GIL (zip parsing, HTTP framing, file bookkeeping), so 16
threads were slower than 4 and the whole run stayed below the curl+unzip floor. A
worker process with several streams on threads has a GIL of its own, and the engine's
process keeps its GIL for planning, publishing and events.

What moves and what stays. A worker does only the byte work of one attempt: it opens the
stream its source's picklable opener (:class:`~.source.StreamOpener`) describes, on
its own keep-alive connections, and runs
:func:`~nbia_retriever.engine.staging.stage_series` into the run's staging folder (the
same code, the same checks, the same caps). Everything that decides stays in the
engine's process: planning, the journal, retries and their verdicts, the scheduler,
pause and cancel, checks, publishing, events. So a worker holds no journal, no lock file
and no credentials beyond the one ``Authorization`` header of the request it runs,
received over a private socket (never argv, environment or a file).

The conversation, one socket pair per attempt (length-prefixed pickles, parent and its
own children only):

* parent -> worker: ``("job", opener, info, staging, root)``; ``("hold", on)`` when the
  run is paused or resumed; ``("go",)`` answering ``held``; ``("cancel",)`` at any time;
* worker -> parent: ``("rx", received)`` every :data:`RX_STEP` bytes off the wire (for the
  scheduler's throughput samples), ``("progress", received, written)`` every
  :data:`~nbia_retriever.engine.staging.PROGRESS_STEP` bytes written, ``("held", ...)``
  when its checkpoint (between chunks, as in-process) finds the run paused: it waits for
  ``go`` (the engine's own checkpoint returned: resumed) or ``cancel``; then one of
  ``("done", staged, received)``, ``("error", error, received)``, ``("cancelled",)``.

A worker that dies mid-attempt is an attempt that failed (retried like a dropped
connection) and is replaced; one that does not stop within :data:`CANCEL_GRACE` of a
cancel is killed before the engine discards the attempt's staging folder. A worker that
cannot start leaves the engine on its own threads, which is also the path for a source
that cannot hand out requests, and for the first request of each image endpoint (made
in-process, one at a time, so a build that refuses it answers once). Workers ignore
SIGINT and SIGTERM and run in their own session: the engine stops them, and they exit
when its socket closes, even if it was killed.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import NbiaError
from ..untrusted import SECRETS

__all__ = ["RemoteAttempt", "WorkerPool", "available_cores", "default_processes",
           "processes_supported"]

_LEN = 4
#: Variables a worker's environment does not inherit.
SECRET_ENV = frozenset({"NBIA_PASSWORD"})
#: Most worker processes at defaults (each costs ~25 MB; 16 streams need no more).
MAX_DEFAULT = 4
#: A worker that died this many times in one run is not replaced: threads take over.
MAX_RESPAWNS = 3
#: Bytes off the wire between two ``rx`` reports of a worker (the scheduler samples
#: throughput every 0.25 s; each report costs both processes a message).
RX_STEP = 512 << 10
#: Seconds a cancelled attempt's worker has to stop before it is killed.
CANCEL_GRACE = 10.0


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (SLURM's cpuset) and, in a container,
    the cgroup CPU quota (``cpu.max``: Docker ``--cpus``, Kubernetes limits)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max" and int(period) > 0:
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def processes_supported() -> str | None:
    """Why worker processes cannot run here, or None when they can."""
    if sys.platform == "win32" or not hasattr(socket, "send_fds"):
        return "this platform cannot pass sockets between processes"
    if getattr(sys, "frozen", False):
        return "a frozen application's executable is not a Python interpreter"
    if not sys.executable:
        return "no Python interpreter to start (sys.executable is empty)"
    return None


def default_processes() -> int:
    """Worker processes at defaults: one per core but one (the engine's own process is
    busy too: planning, publishing, relaying), at most :data:`MAX_DEFAULT`; none on one
    core or where :func:`processes_supported` says no.

    Measured on 2 cores (BENCHMARKS.md): one worker makes 16 streams as fast as 2 (on
    threads of one process 16 were 0.86x of 2); a second worker adds no speed there and
    ~25 MB, which would take the client past 100 MB.
    """
    if processes_supported() is not None:
        return 0
    return min(available_cores() - 1, MAX_DEFAULT)


# -- framing ---------------------------------------------------------------------------
def _send(sock: socket.socket, lock: threading.Lock, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        sock.sendall(len(data).to_bytes(_LEN, "big") + data)


def _exactly(sock: socket.socket, n: int) -> bytes | None:
    parts = bytearray()
    while len(parts) < n:
        piece = sock.recv(n - len(parts))
        if not piece:
            return None
        parts += piece
    return bytes(parts)


def _recv(sock: socket.socket) -> tuple[Any, ...] | None:
    """The next message, or None when the other side is gone."""
    try:
        head = _exactly(sock, _LEN)
        if head is None:
            return None
        body = _exactly(sock, int.from_bytes(head, "big"))
    except OSError:
        return None
    if body is None:
        return None
    message = pickle.loads(body)
    assert isinstance(message, tuple)
    return message


def _pack_error(exc: BaseException) -> tuple[Any, ...]:
    """An exception as (class, args, attributes), rebuilt as the same class without
    calling its ``__init__`` (ours format their message there, and take keyword
    arguments plain pickling loses). Others keep their own pickling when it round-trips
    (OSError's errno and filename, UnicodeDecodeError's text)."""
    if not isinstance(exc, NbiaError):
        with contextlib.suppress(Exception):
            data = pickle.dumps(exc)
            if type(pickle.loads(data)) is type(exc):
                return ("pickle", data)
    return ("rebuild", type(exc), exc.args, dict(getattr(exc, "__dict__", {})))


def _unpack_error(packed: tuple[Any, ...]) -> BaseException:
    if packed[0] == "pickle":
        exc = pickle.loads(packed[1])
        assert isinstance(exc, BaseException)
        return exc
    cls, args, attrs = packed[1], packed[2], packed[3]
    try:
        rebuilt: BaseException = cls.__new__(cls)
        rebuilt.args = tuple(args)
        rebuilt.__dict__.update(attrs)
        return rebuilt
    except Exception:
        return NbiaError(str(args[0]) if args else cls.__name__)


# -- the engine's side -----------------------------------------------------------------
class _Child:
    def __init__(self, proc: subprocess.Popen[bytes], control: socket.socket) -> None:
        self.proc = proc
        self.control = control
        self.lock = threading.Lock()
        self.ready = False
        self.jobs = 0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def poll_ready(self) -> bool:
        if not self.ready:
            with contextlib.suppress(OSError):
                self.ready = self.control.recv(1, socket.MSG_DONTWAIT) == b"r"
        return self.ready

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.control.close()


class RemoteAttempt:
    """The engine's handle on an attempt running in a worker: :meth:`abort` is what
    ``Engine.cancel`` calls on every open stream, :meth:`hold` what pause and resume
    call."""

    def __init__(self, sock: socket.socket, kill: Callable[[], None] = lambda: None) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._kill = kill
        self._timer: threading.Timer | None = None
        self.expired = False

    def abort(self) -> None:
        """Ask the worker to stop; one that has not within :data:`CANCEL_GRACE` is killed
        and the conversation cut, so the engine's side never waits for it forever."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(CANCEL_GRACE, self._expire)
            self._timer.daemon = True
            self._timer.start()
        with contextlib.suppress(OSError):
            _send(self._sock, self._lock, ("cancel",))

    def _expire(self) -> None:
        self.expired = True
        self._kill()  # it must not write into staging once that is discarded
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # the engine's recv returns at once

    def finish(self) -> None:
        """The conversation is over: no timer may fire after it."""
        with self._lock:
            timer, self._timer = self._timer, threading.Timer(0, lambda: None)
        if timer is not None:
            timer.cancel()

    def hold(self, on: bool) -> None:
        with contextlib.suppress(OSError):
            _send(self._sock, self._lock, ("hold", on))

    def send(self, message: tuple[Any, ...]) -> None:
        _send(self._sock, self._lock, message)


class WorkerPool:
    """``size`` worker processes, started at once, used as they become ready.

    :meth:`stage` runs one attempt in the least busy ready worker and returns what
    ``stage_series`` would have; None when no worker is ready (the caller stages it
    itself). Thread-safe.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._closed = False
        self._respawns = 0

    def start(self) -> None:
        with self._lock:
            while len(self._children) < self.size:
                child = self._spawn()
                if child is None:
                    break
                self._children.append(child)

    def _spawn(self) -> _Child | None:
        """A new worker, or None if one cannot be started (threads do the work then)."""
        if processes_supported() is not None:
            return None
        parent, child_end = socket.socketpair()
        path = os.pathsep.join(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
        # The same package (PYTHONPATH, and -P: nothing from the working directory);
        # not the password a user may keep in the environment: a worker only ever gets
        # the one header of its request.
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        env["PYTHONPATH"] = path
        try:
            proc = subprocess.Popen(
                [sys.executable, "-P", "-c",
                 "from nbia_retriever.engine.procs import _main; _main()",
                 str(child_end.fileno())],
                pass_fds=(child_end.fileno(),), env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                close_fds=True)
        except Exception:  # no worker is not an error: threads stage
            parent.close()
            return None
        finally:
            child_end.close()
        return _Child(proc, parent)

    def _pick(self) -> _Child | None:
        with self._lock:
            if self._closed:
                return None
            for i, child in enumerate(self._children):
                if child.alive():
                    continue
                if self._respawns >= MAX_RESPAWNS:
                    continue  # dead for good: never ready again
                self._respawns += 1
                replacement = self._spawn()
                if replacement is not None:
                    child.close()
                    self._children[i] = replacement
            ready = [c for c in self._children if c.alive() and c.poll_ready()]
            if not ready:
                return None
            best = min(ready, key=lambda c: c.jobs)
            best.jobs += 1
            return best

    def ready(self) -> int:
        """How many workers are up and taking attempts."""
        with self._lock:
            return sum(1 for c in self._children if c.alive() and c.poll_ready())

    def _done(self, child: _Child) -> None:
        with self._lock:
            child.jobs -= 1

    def stage(self, request: object, info: object, staging: Path, root: Path, *,
              progress: Any, on_progress: Callable[[int], None],
              checkpoint: Callable[[], None], on_open: Callable[[RemoteAttempt], None],
              cancelled: Callable[[], BaseException]) -> Any:
        """One attempt in a worker (see the module docstring); None if none is ready.

        Raises what the attempt raised there (the same classes as in-process), or
        ``cancelled()`` when it was cancelled. Returns or raises only once the worker
        is done with ``staging`` (or was killed): the caller may discard it then.
        """
        child = self._pick()
        if child is None:
            return None
        try:
            mine, theirs = socket.socketpair()
            try:
                with child.lock:
                    socket.send_fds(child.control, [b"j"], [theirs.fileno()])
            except OSError:
                mine.close()
                return None
            finally:
                theirs.close()
            with mine:
                attempt = RemoteAttempt(mine, kill=child.kill)
                try:
                    attempt.send(("job", request, info, str(Path(staging).absolute()),
                                  str(Path(root).absolute())))
                    on_open(attempt)
                    return self._converse(mine, attempt, request, progress, on_progress,
                                          checkpoint, cancelled)
                finally:
                    attempt.finish()
        finally:
            self._done(child)

    @staticmethod
    def _converse(sock: socket.socket, attempt: RemoteAttempt, request: object,
                  progress: Any, on_progress: Callable[[int], None],
                  checkpoint: Callable[[], None],
                  cancelled: Callable[[], BaseException]) -> Any:
        stop: BaseException | None = None
        while True:
            message = _recv(sock)
            if message is None:
                if attempt.expired:  # cancelled, and killed for not stopping
                    raise stop if stop is not None else cancelled()
                if stop is not None:
                    raise stop
                what = getattr(request, "what", "series")
                raise NbiaError(f"{what}: lost the worker process streaming it")
            kind = message[0]
            if kind == "rx":
                progress.received = message[1]
            elif kind == "progress":
                progress.received, progress.written = message[1], message[2]
                if stop is None:
                    on_progress(message[2])
            elif kind == "held":
                progress.received, progress.written = message[1], message[2]
                if stop is not None:
                    continue
                try:
                    checkpoint()  # holds while paused; raises on cancel
                except BaseException as exc:
                    stop = exc
                    attempt.abort()
                    continue
                with contextlib.suppress(OSError):
                    # Running again: a "hold" that raced with resume is taken back too.
                    attempt.send(("hold", False))
                    attempt.send(("go",))
            elif kind == "done":
                progress.received = message[2]
                if stop is not None:
                    raise stop
                return message[1]
            elif kind == "cancelled":
                raise stop if stop is not None else cancelled()
            else:  # "error"
                progress.received = message[2]
                if stop is not None:
                    raise stop
                raise _unpack_error(message[1])

    def close(self) -> None:
        """Stop the workers (each exits when its socket closes)."""
        with self._lock:
            self._closed = True
            children, self._children = self._children, []
        for child in children:
            child.close()
        for child in children:
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                child.kill()


# -- the worker's side -----------------------------------------------------------------
class _Stop(Exception):
    """The engine cancelled this attempt."""


def _main() -> None:
    """A worker process: take attempts from the engine until its socket closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    control = socket.socket(fileno=int(sys.argv[1]))
    # The imports a worker needs, before it says it is ready (the NBIA source's opener
    # and its transport).
    from . import source  # noqa: F401

    cache: dict[Any, Any] = {}
    jobs: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
    idle = [0]
    idle_lock = threading.Lock()

    def serve() -> None:
        while True:
            job = jobs.get()
            with contextlib.suppress(BaseException):
                _run_job(job, cache)
            with contextlib.suppress(OSError):
                job.close()
            with idle_lock:
                idle[0] += 1

    control.sendall(b"r")
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            break
        if not message:
            break  # the engine closed its end (or died)
        if not fds:
            continue  # a descriptor lost on the way (the fd limit): the engine sees EOF
        job = socket.socket(fileno=fds[0])
        with idle_lock:
            spare = idle[0] > 0
            if spare:
                idle[0] -= 1
        jobs.put(job)
        if spare:
            continue
        # Long-lived threads, so each keeps its keep-alive connection between series.
        try:
            threading.Thread(target=serve, daemon=True).start()
        except RuntimeError:  # no thread to be had (a pids limit): drop this attempt
            with contextlib.suppress(Exception):
                jobs.get_nowait().close()
    os._exit(0)


def _know_secrets(opener: Any) -> None:
    """This process's :data:`~nbia_retriever.untrusted.SECRETS` learn the credentials of
    ``opener``: an error page that echoes one is cut to an excerpt here, and a token cut
    in two would escape the engine's redaction of the whole token."""
    SECRETS.add(*opener.secrets())


def _run_job(sock: socket.socket, cache: dict[Any, Any]) -> None:
    """One attempt; always ends with a final message (unless the engine is gone).

    The attempt's :class:`~.source.StreamOpener` (whichever source made it) opens the
    stream; ``cache`` keeps what it wants kept between attempts (connections)."""
    # Here, not at the top: a worker is ready (and the pool up) before the staging code
    # (isal, the zip reader: ~20 ms) loads; the first attempt pays it once.
    from .staging import Progress, stage_series

    lock = threading.Lock()
    progress = Progress()
    answers: queue.SimpleQueue[bool] = queue.SimpleQueue()
    cancel = threading.Event()
    hold = threading.Event()
    # The stream while it is being read, under a lock: once it is done its connection
    # goes back to this thread's pool for the next series, and a late cancel must not
    # abort that one.
    live: list[Any] = []
    live_lock = threading.Lock()

    def listen() -> None:
        while True:
            message = _recv(sock)
            if message is None or message[0] == "cancel":
                cancel.set()
                with live_lock:
                    for s in live:
                        with contextlib.suppress(Exception):
                            s.abort()
                answers.put(False)
                return
            if message[0] == "hold":
                if message[1]:
                    hold.set()
                else:
                    hold.clear()
            else:  # "go"
                answers.put(True)

    rx_sent = [0]

    def checkpoint() -> None:
        """Between chunks, as in-process: honour cancel, hold while paused."""
        if cancel.is_set():
            raise _Stop
        if progress.received - rx_sent[0] >= RX_STEP:
            rx_sent[0] = progress.received
            _send(sock, lock, ("rx", progress.received))
        if hold.is_set():
            _send(sock, lock, ("held", progress.received, progress.written))
            if not answers.get():
                raise _Stop

    def on_progress(written: int) -> None:
        _send(sock, lock, ("progress", progress.received, written))

    listener: threading.Thread | None = None
    reply: tuple[Any, ...]
    try:
        first = _recv(sock)
        if first is None or first[0] != "job":
            return
        _, opener, info, staging, root = first
        _know_secrets(opener)
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        with opener.open_stream(cache) as opened:
            with live_lock:
                live.append(opened)
            try:
                checkpoint()
                staged = stage_series(info.series_uid, info, opened.chunks(), Path(staging),
                                      root=Path(root), checkpoint=checkpoint,
                                      progress=progress, on_progress=on_progress,
                                      reader=getattr(opened, "reader", None))
            finally:
                with live_lock:
                    live.clear()
        reply = ("done", staged, progress.received)
    except _Stop:
        reply = ("cancelled",)
    except BaseException as exc:
        reply = ("cancelled",) if cancel.is_set() else \
            ("error", _pack_error(exc), progress.received)
    try:
        try:
            _send(sock, lock, reply)
        except OSError:
            return
        except Exception as exc:  # a reply that does not pickle: still say what failed
            _send(sock, lock, ("error", ("rebuild", NbiaError,
                                         (f"worker process: {type(exc).__name__}: {exc}",),
                                         {}), progress.received))
    except Exception:  # the engine is gone: nobody to tell
        return
    finally:
        # The listener must be off this socket before it is closed (its number could be
        # the next attempt's).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if listener is not None:
            listener.join(timeout=5)
