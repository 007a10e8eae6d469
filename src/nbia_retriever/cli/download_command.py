"""``nbia-retriever download``: the main job, in a terminal, a log file or a pipeline.

Three output modes: a live display in a terminal (:mod:`.live`), one line per event
for logs and batch jobs, and ``--json`` (one JSON event per line on stdout). Before
anything is sent, the command checks what would be unsafe: a malformed URL or timeout
is exit 2, and a password is sent only to a host the user chose (exit 3 otherwise, with
the line that says how to trust it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from ..config import config_path
from ..engine import DownloadOptions, Engine, EventKind
from ..errors import NbiaError, UsageError
from ..models import FAILED_STATES, SeriesState, is_file_uid
from ..report import failure_line, item_label, write_error_report
from .common import (
    EXIT_USAGE,
    check_api_url,
    exit_at_once,
    fail,
    fail_for,
    inert,
    load_manifest,
    open_cli_session,
    run_exit_code,
    warn_insecure,
    with_api_options,
)
from .options import download_flags, options_from_params

#: With -q, failed series beyond this many are summarised as a count.
QUIET_REASONS = 20


@click.command()
@click.argument("manifest", type=click.Path())  # a folder: load_manifest's one line (--json)
@click.option("-d", "--dest", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Destination folder; the download goes into a folder named after the "
                   "manifest's databasketId.")
@download_flags("download")
@click.option("--error-report", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write the failed series (table columns + error) to this CSV.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress display: one line per failed series and the summary.")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line on stdout.")
@with_api_options
def download(manifest: str, dest: str, error_report: str | None, quiet: bool, as_json: bool,
             user: str | None, **flags: Any) -> None:
    """Download every series of MANIFEST (a .tcia file, spreadsheet or list of UIDs).

    Re-running the same command resumes: finished series are skipped in milliseconds.

    \b
    Exit codes: 0 every series complete; 1 some series failed (the last lines say
    which, and what to do next); 2 bad usage or an unreadable manifest; 3 login failed
    or not allowed; 4 the server could not be reached (nothing was done, no folder
    was created: try again later); 130 interrupted (the summary gives the command
    that resumes).
    """

    parsed = load_manifest(manifest, as_json=as_json)
    values = options_from_params(flags)  # the DownloadOptions the flags say
    api_url, insecure = values["api_url"], not values["verify_tls"]
    check_api_url(api_url, as_json=as_json)
    if error_report:
        # Find out now, not after a day of downloading, that the report cannot be written.
        folder = Path(error_report).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            fail(f"--error-report {error_report}: folder {folder} is missing or not writable",
                 EXIT_USAGE, as_json=as_json)
    session = open_cli_session(parsed, api=values["api"], api_url=api_url, user=user,
                               insecure=insecure, timeout=values["timeout"], as_json=as_json)
    credentials = session.credentials
    trusted = session.policy.trusted_hosts if user else ()
    # On a terminal, a licence that is not plain CC BY is asked about (once per
    # collection, remembered); headless, such series need --agree-to-license.
    ask = license_prompt() if (not as_json and not values.get("agree_to_license")
                               and sys.stdin.isatty() and sys.stderr.isatty()) else None
    try:
        options = DownloadOptions(**values, credentials=credentials, trusted_hosts=trusted,
                                  confirm_license=ask)
        session.backoff_base = min(options.backoff_base, 1.0)
        engine = Engine(parsed, dest, options, session=session)
    except UsageError as exc:
        fail_for(exc, as_json=as_json)
    if ask is not None:
        # The question comes from planning: plan before the live display takes the
        # terminal (a run that cannot plan says why at its end, as it would have).
        with contextlib.suppress(NbiaError):
            engine.prepare()
    warn_insecure(insecure)
    if parsed.duplicates_dropped and not as_json:
        click.echo(f"note: {parsed.duplicates_dropped} duplicate series dropped from {manifest}",
                   err=True)
    if as_json:
        engine.subscribe(_json_printer())
        report = run_plain(engine)
    elif quiet or not sys.stderr.isatty():
        if not quiet:
            engine.subscribe(plain_printer(engine))
        report = run_plain(engine)
    else:
        from .live import run_with_progress  # the live display (rich, 25 ms) only on a terminal

        report = run_with_progress(engine)
    if error_report:
        try:
            n = write_error_report(Path(error_report), report.results.values())
        except (OSError, NbiaError) as exc:
            n = 0
            click.echo(inert(f"nbia-retriever: error: cannot write {error_report}: "
                             f"{getattr(exc, 'strerror', None) or exc}"), err=True)
        if n and not as_json:
            click.echo(f"error report: {n} failed series written to {error_report}", err=True)
    command = resume_command()
    if as_json:
        sys.stdout.write(json.dumps({"event": "summary", **summary_dict(report, command)},
                                    ensure_ascii=False) + "\n")
        if report.cancelled and not report.fatal:  # whoever pressed Ctrl-C reads this
            click.echo(inert(report.summary(command)), err=True)
    elif (report.usage_error or report.auth_failed or report.unreachable) \
            and not report.bytes_downloaded:
        # Nothing was done: the one line that says why is the whole answer (printed
        # once: the event printers leave the run's fatal error to this line).
        fail(report.fatal, run_exit_code(report))
    else:
        if quiet:
            for warning in report.warnings:
                click.echo(inert(warning), err=True)
            _quiet_reasons(report)
        click.echo(inert(report.summary(command)), err=quiet)
    sys.exit(run_exit_code(report))


def license_prompt() -> Any:
    """The terminal's question before the first download of a collection whose licence
    is not a plain CC BY: its name and URL, then yes or no (no is the default)."""

    def confirm(collection: str, name: str, url: str) -> bool:
        what = f"{name} ({url})" if name and url else name or url
        click.echo(inert(f"The {collection} collection is distributed under the {what}."),
                   err=True)
        return bool(click.confirm(
            inert(f"Do you agree to its terms? (remembered for {collection} in "
                  f"{config_path()})"), default=False, err=True))

    return confirm


def resume_command() -> str | None:
    """The command line that resumes this run, as typed (quoted for a POSIX shell), or
    None when this process is not ``nbia-retriever download`` (a test's CliRunner, an
    embedding program): the summary then says "the same command". No secret is in it:
    passwords never come from the command line."""
    args = sys.argv[1:]
    if "download" not in args:
        return None
    kept: list[str] = []
    secret_proxy = False
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
            continue
        value = arg.partition("=")[2] if arg.startswith("--proxy=") else (
            args[i + 1] if arg == "--proxy" and i + 1 < len(args) else None)
        if value is not None and "@" in value.partition("://")[2].partition("/")[0]:
            # A proxy URL with a user name or password: not printed (a log would keep
            # it); the resumed run finds it in NBIA_PROXY, which the user sets.
            secret_proxy = True
            skip = arg == "--proxy"
            continue
        kept.append(arg)
    line = shlex.join(["nbia-retriever", *kept])
    return f"{line}  # with NBIA_PROXY set to the proxy URL" if secret_proxy else line


def summary_dict(report: Any, command: str | None = None) -> dict[str, Any]:

    return {
        "root": str(report.root),
        "series": len(report.results),
        "complete": report.count(SeriesState.COMPLETE),
        "failed": len(report.failed),
        "skipped": report.skipped,
        "adopted": report.adopted,
        "bytes": report.bytes_downloaded,
        "elapsed": round(report.elapsed, 3),
        "fatal": inert(report.fatal),
        "failures": [{"uid": r.uid, "state": str(r.state), "error": inert(r.error),
                      "attempts": r.attempts} for r in report.failed],
        "interrupted": report.count(SeriesState.INTERRUPTED),
        "interrupted_bytes": report.interrupted_bytes,
        "next": [inert(line) for line in report.next_steps(command)],
    }


def _json_printer() -> Any:
    lock = threading.Lock()

    def emit(event: Any) -> None:
        # Wall-clock time of each event (seconds since the epoch, ms resolution): what a
        # batch log needs to line events up with the scheduler's and the server's.
        line = json.dumps({**event.as_dict(), "time": round(time.time(), 3)},
                          ensure_ascii=False)
        with lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    return emit


def plain_printer(engine: Any = None) -> Any:
    """Line-per-event output for logs and non-terminals (HPC batch jobs).

    A failed series is one line that names it once, with the reason and the attempts
    (``engine``'s results say how many). Interrupted series and the error that stopped
    the run are not printed as they happen: the summary counts the first and states the
    second, once."""

    def attempts(uid: str) -> int:
        result = engine.results.get(uid) if engine is not None else None
        return result.attempts if result is not None else 0

    def who(uid: str) -> str:
        """A series by its UID (what logs are searched for); a file (issue 24) as people
        know it, then its key: ``SYNTH-CT-A · P-1 · slide.svs (https://...)``."""
        if not is_file_uid(uid) or engine is None:
            return uid
        result = engine.results.get(uid)
        info = result.info if result is not None else None
        return f"{item_label(uid, info)} ({uid})" if info is not None else uid

    def printer(event: Any) -> None:
        kind = event.kind
        if kind is EventKind.STATE and event.state == SeriesState.COMPLETE:
            extra = f": {event.message}" if event.message else ""
            click.echo(inert(f"{event.state:<14} {who(event.uid)}{extra}"), err=True)
        elif kind is EventKind.STATE and event.state in FAILED_STATES:
            result = engine.results.get(event.uid) if engine is not None else None
            line = failure_line(event.uid, event.message or "", attempts(event.uid),
                                result.info if result is not None else None)
            click.echo(inert(f"{event.state:<14} {line}"), err=True)
        elif kind is EventKind.RETRY:
            reason = failure_line(event.uid, event.message or "", 0).partition(": ")[2]
            click.echo(inert(f"{'Retrying':<14} {who(event.uid)} (attempt {event.attempt}: "
                             f"{reason})"), err=True)
        elif kind is EventKind.THROTTLE or (
                kind is EventKind.PLANNED and "so far" not in event.message) or (
                kind is EventKind.MESSAGE and not event.uid):  # warnings of the run
            click.echo(inert(event.message), err=True)

    return printer


def _quiet_reasons(report: Any) -> None:
    """With -q: one reason line per failed series (capped), so a log says why."""
    failed = report.failed
    for r in failed[:QUIET_REASONS]:
        click.echo(inert(f"{r.state}: {failure_line(r.uid, r.error, r.attempts)}"), err=True)
    if len(failed) > QUIET_REASONS:
        click.echo(f"... and {len(failed) - QUIET_REASONS} more failed series (--error-report "
                   "FILE lists them all)", err=True)


def run_plain(engine: Any) -> Any:
    engine.start()
    try:
        while not engine.finished:
            engine.wait(0.5)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, exit_at_once)
        click.echo("interrupted: stopping (re-run the same command to resume)", err=True)
        engine.cancel()
        engine.wait()
    return engine.report
