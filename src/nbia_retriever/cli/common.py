"""What every command shares: exit codes, one-line errors, the API options, logging in.

Exit codes (stable, for scripts and job schedulers): 0 every series complete, 1 some
series failed (or the run stopped), 2 bad usage or an unreadable manifest, 3 login
failed or not allowed, 4 the server could not be reached (nothing was done; try again
later), 130 interrupted (Ctrl-C; re-run the same command to resume).
Which exception gets which code is decided once, by
:func:`nbia_retriever.errors.exit_code`: commands call :func:`fail_for` (an exception)
or :func:`run_exit_code` (a finished run), never pick a code for an exception themselves.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from ..errors import EXIT_AUTH as EXIT_AUTH  # re-export: the codes live in errors.py
from ..errors import EXIT_FAILED as EXIT_FAILED
from ..errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ..errors import EXIT_OK as EXIT_OK
from ..errors import EXIT_UNREACHABLE as EXIT_UNREACHABLE
from ..errors import EXIT_USAGE as EXIT_USAGE
from ..errors import ManifestError, NbiaError, UsageError, exit_code
from ..manifest import read_manifest
from ..report import human_size
from ..untrusted import plain, redact

if TYPE_CHECKING:
    from ..session import Session


def inert(text: str) -> str:
    """The one sanitiser of everything printed: messages quote servers (zip entry names,
    error pages), manifests and journals of shared folders; no control character (no
    terminal escape) and no known secret, nor a piece of one, reaches the terminal.
    Line breaks stay (multi-line summaries); each line is plain before it is redacted,
    so a character that ``plain`` drops cannot hide a secret from ``redact``."""
    return "\n".join(redact(plain(line)) for line in text.split("\n"))


def say(text: str, *, err: bool = False) -> None:
    """Print ``text`` through :func:`inert`: how every command prints anything that may
    hold a server's, a manifest's or a journal's text."""
    click.echo(inert(text), err=err)


def cell(text: str) -> Any:
    """A table cell through :func:`inert`, shown verbatim (a ``rich`` Text: server
    strings are never console markup)."""
    from rich.text import Text  # rich (13 ms) only for the commands that draw tables

    return Text(inert(text))


def _inert_values(data: Any) -> Any:
    if isinstance(data, str):
        return inert(data)
    if isinstance(data, dict):
        return {k: _inert_values(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_inert_values(v) for v in data]
    return data


def say_json(data: Any) -> None:
    """One JSON line, every string in it through :func:`inert` (JSON escapes C0 controls
    but neither C1 ones nor bidirectional overrides, and a log is read on a terminal)."""
    click.echo(json.dumps(_inert_values(data), ensure_ascii=False))


def fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    """One clear line on stderr (and one ``error`` event with ``--json``) and a meaningful
    exit code: never a traceback."""
    line = inert(message).replace("\n", " ")
    if as_json:
        sys.stdout.write(json.dumps({"event": "error", "message": line, "exit": code},
                                    ensure_ascii=False) + "\n")
        sys.stdout.flush()
    click.echo(f"nbia-retriever: error: {line}", err=True)
    sys.exit(code)


def fail_for(error: BaseException, *, as_json: bool = False) -> NoReturn:
    """:func:`fail` with ``str(error)`` and the exit code :func:`~..errors.exit_code`
    gives it (3 login, 2 bad input, 1 anything else)."""
    fail(str(error), exit_code(error), as_json=as_json)


def run_exit_code(report: Any) -> int:
    """A finished run's exit code: that of what stopped it (the engine records it from
    :func:`~..errors.exit_code`), 130 when the user interrupted it, else 0 or 1."""
    if report.auth_failed:
        return EXIT_AUTH
    if report.usage_error:
        return EXIT_USAGE
    if getattr(report, "unreachable", False):
        return EXIT_UNREACHABLE
    if report.cancelled and not report.fatal:
        return EXIT_INTERRUPTED
    return EXIT_OK if report.ok else EXIT_FAILED


def exit_at_once(signum: int, frame: object) -> None:
    """An impatient second Ctrl-C: stop now, still with exit code 130 and no traceback.

    Safe: nothing is published before it is verified and journaled, and a re-run clears
    whatever staging the workers leave. ``os._exit`` skips joining them. (Here, not in
    :mod:`.download_command`: both output modes, it and :mod:`.live`, install it.)
    """
    os.write(2, b"interrupted again: stopped at once (re-run the same command to resume)\n")
    os._exit(EXIT_INTERRUPTED)


#: Skipped manifest lines named one by one on stderr; the rest are counted.
SKIPPED_SHOWN = 5


def load_manifest(path: str, *, as_json: bool = False) -> Any:
    """The parsed manifest, or exit 2 with one line naming the file (and line)."""


    if Path(path).is_dir():
        fail(f"{path}: is a folder, not a manifest", EXIT_USAGE, as_json=as_json)
    try:
        parsed = read_manifest(path)
    except ManifestError as exc:
        fail_for(exc, as_json=as_json)
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}", EXIT_USAGE, as_json=as_json)
    except (ValueError, csv.Error) as exc:
        # The parser's contract is ManifestError only; a slip must still not be a traceback.
        fail(f"{path}: cannot read this manifest ({exc})", EXIT_USAGE, as_json=as_json)
    # Lines the parser skipped (a DRS cell that is not a DRS URI, a gs:// line): said
    # on stderr, or a user believes a sheet fully downloaded that was not fully read.
    skipped = getattr(parsed, "skipped", ())
    for reason in skipped[:SKIPPED_SHOWN]:
        say(f"warning: {path}: {reason}", err=True)
    rest = list(skipped[SKIPPED_SHOWN:])
    if rest:
        counted = re.fullmatch(r"([\d,]+) more lines skipped", rest[-1])
        more = len(rest) - 1 + int(counted.group(1).replace(",", "")) if counted else len(rest)
        say(f"warning: {path}: {more:,} more line(s) skipped", err=True)
    return parsed


def check_api_url(url: str | None, *, as_json: bool = False) -> None:
    """A malformed ``--api-url`` (``ftp://``, no host, bad port) is exit 2, at once."""
    if not url:
        return
    from ..session import check_api_url as check  # start-up time: not for --help

    try:
        check(url)
    except UsageError as exc:
        fail_for(exc, as_json=as_json)


def open_cli_session(manifest: Any, *, api: str, api_url: str | None, user: str | None,
                     insecure: bool, timeout: float, interactive: bool = True,
                     as_json: bool = False) -> Session:
    """A command's :class:`~nbia_retriever.session.Session`, opened once: the server
    resolved (a malformed URL is exit 2), and with ``--user`` the login allowed to go
    there (exit 3 otherwise, asking first when someone can answer) before the password
    is asked for; then the password."""
    from ..session import open_session  # start-up time: not for --help

    try:
        session = open_session(manifest, api_url=api_url, version=api, timeout=timeout,
                               verify=not insecure,
                               confirm=confirm_host_prompt(interactive and not as_json))
        if user:  # a config file that cannot be read is exit 2, an untrusted host exit 3
            session.check_login(user)
    except NbiaError as exc:
        fail_for(exc, as_json=as_json)
    if user:
        session.credentials = get_credentials(user, session.host,
                                              interactive=interactive and not as_json)
    return session


def get_credentials(user: str | None, host: str, *, interactive: bool = True) -> Any:
    """The password from NBIA_PASSWORD, the keyring entry for (host, user), or a hidden
    prompt that names the host.

    The password never comes from argv: command lines are visible to every user of a
    shared HPC node through ``ps``.
    """
    # the API client (35 ms): only with --user
    from ..api import Credentials, keyring_service, stored_password

    if not user:
        return None
    password = stored_password(host, user)
    if password is None:
        if interactive and sys.stdin.isatty():
            password = click.prompt(f"Password for {user} at {host}", hide_input=True,
                                    default="", show_default=False, err=True)
        else:
            fail(f"no password for {user!r} at {host}: set NBIA_PASSWORD or store it in the "
                 f"keyring (keyring set {keyring_service(host)} {user})", EXIT_AUTH)
    return Credentials(user, password or "")


def confirm_host_prompt(interactive: bool) -> Any:
    """A callback that asks, naming the host, before a password goes to a host only the
    manifest names; None (the answer is no) when nobody can be asked."""
    if not (interactive and sys.stdin.isatty()):
        return None

    def confirm(host: str) -> bool:
        return bool(click.confirm(
            f"The manifest names the server {host}, which you have not chosen. Send your "
            f"password to {host}?", default=False, err=True))

    return confirm


def warn_insecure(insecure: bool) -> None:
    if insecure:
        click.echo("nbia-retriever: warning: --insecure: TLS certificates are NOT verified; "
                   "anyone on the way can pose as the server", err=True)


def with_api_options(func: Any) -> Any:
    """``--api``, ``--api-url``, ``--user``, ``--insecure``, ``--timeout``, declared once
    with the download options (:mod:`.options`)."""
    # Imported here: ``nbia-retriever --help`` loads this module, not the options.
    from .options import connection_flags

    return connection_flags(func)


def human(size: int | None) -> str:

    return human_size(size)


# ----------------------------------------------------------- series as people know them


def series_fields(info: Any) -> list[str]:
    """What people know a series by, from its metadata: Collection, Patient ID, Study
    Date, Modality, Series Description (raw: printers make them :func:`inert`)."""
    if info is None:
        return ["", "", "", "", ""]
    return [info.collection, info.patient_id, info.study_date, info.modality,
            info.series_description]


def series_label(uid: str, info: Any, *, wide: bool = False, limit: int = 40) -> str:
    """One series on one line, as people know it: ``SYNTH-CT-A · P-0001 · 12-10-2019 · CT
    · CHEST 5MM · 6 images (…099129866961)``, the description cut at ``limit``
    characters, the UID's tail (``wide``: the whole UID). Without metadata, the UID."""
    from ..report import short_uid  # report (its csv and dataclasses) only when printing

    uid_text = uid if wide else short_uid(uid)
    if info is None:
        return f"series {uid_text}"
    if ":" in uid:  # a file of a DRS/PathDB sheet (models.is_file_uid): no study, no images
        from ..report import item_label

        return item_label(uid, info)
    parts = series_fields(info)
    description = parts[-1]
    if len(description) > limit:
        parts[-1] = description[: limit - 1] + "…"
    shown = " · ".join(p for p in parts if p)
    count = getattr(info, "image_count", None)
    if count is not None:
        shown += f" · {count:,} image{'s' if count != 1 else ''}"
    return f"{shown} ({uid_text})" if shown else f"series {uid_text}"


def fit_widths(naturals: list[int], room: int, minimum: int = 4) -> list[int]:
    """Widths for columns of free text sharing ``room`` characters: a column that needs
    less than an equal share keeps its natural width and leaves the rest to the others
    (a short collection name is never cut to make room it does not use).

    >>> fit_widths([10, 40, 60], 50)
    [10, 20, 20]
    """
    widths = [minimum] * len(naturals)
    left = max(room, minimum * len(naturals))
    order = sorted(range(len(naturals)), key=naturals.__getitem__)
    for done, i in enumerate(order):
        share = left // (len(order) - done)
        widths[i] = max(minimum, min(naturals[i], share))
        left -= widths[i]
    return widths
