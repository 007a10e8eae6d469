"""The view's trust decision: may the password go to this host, asked before the password.

Only the manifest names a server the user did not choose (``downloadServerUrl``), and a
shared manifest must not be able to collect passwords: the engine refuses to send them
there (:class:`~nbia_retriever.api.HostPolicy`). The CLI asks on the terminal; the view
asks in its login dialog, *before* the password field is offered, and the answer is
"this run" (the window's session trusts the host until it closes) or "always" (the host
is added to ``trusted_hosts`` in the user's config file, :mod:`nbia_retriever.config`).

The config file is the user's own text, comments included: :func:`remember_trusted_host`
changes only the ``trusted_hosts`` value (or adds the key at the top) and checks, by
parsing the result, that nothing else changed before it replaces the file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from ..config import config_path
from ..errors import UsageError

#: The answers of the dialog's trust question (``LoginAnswer.trust``).
TRUST_RUN, TRUST_ALWAYS = "run", "always"

_KEY = re.compile(r"^[ \t]*trusted_hosts[ \t]*=[ \t]*\[", re.MULTILINE)


@dataclass(frozen=True)
class LoginTrust:
    """What the login dialog says about the host the password would go to.

    ``host``: its ASCII (``xn--``) form, as ``trusted_hosts`` takes it (a lookalike
    international name shows as the ``xn--`` it is). ``ask``: only the manifest names
    it, so the dialog asks before offering the password field. ``refused``: a reason no
    answer can change (plain http to another machine), shown instead of the fields.
    """

    host: str
    ask: bool = False
    refused: str = ""


def login_trust(session: object) -> LoginTrust:
    """The trust question for ``session``'s login (no I/O besides the config file)."""
    from ..api import Origin, is_loopback, token_url_for  # the HTTP stack: the view has it

    api_url: str = getattr(session, "api_url", "")
    token_url = token_url_for(api_url)
    origin = Origin.of(token_url)
    host = origin.label
    if origin.scheme != "https" and not is_loopback(origin.host):
        return LoginTrust(host, refused=(
            f"{host} is plain http: anyone on the way could read the password. Logging in "
            "needs an https address for this server (--api-url https://…)."))
    try:
        trusted = bool(session.policy.trusts(token_url))  # type: ignore[attr-defined]
    except UsageError as exc:  # a malformed config file: say which, ask nothing
        return LoginTrust(host, refused=str(exc))
    return LoginTrust(host, ask=not trusted)


def remember_trusted_host(host: str, path: Path | None = None) -> Path:
    """Add ``host`` to ``trusted_hosts`` in the user's config file (created if missing);
    the file's path. Raises :class:`UsageError` naming the file when it cannot be read,
    parsed or rewritten safely (the user can then add the line by hand)."""
    path = path or config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read: {exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from None
    hosts = data.get("trusted_hosts", [])
    if not isinstance(hosts, list):
        raise UsageError(f"{path}: trusted_hosts must be a list of host names")
    if host in hosts:
        return path
    wanted = [*hosts, host]
    array = "[" + ", ".join(json.dumps(h) for h in wanted) + "]"
    match = _KEY.search(text)
    if "trusted_hosts" not in data:
        # Top-level keys go before any [table]: at the top is always valid TOML.
        new = ("# Servers that may receive your password, besides *.cancerimagingarchive.net"
               f" (https) and --api-url.\ntrusted_hosts = {array}\n" + text)
    elif match is None or (end := _array_end(text, match.end())) < 0:
        new = ""
    else:
        new = text[:match.start()] + f"trusted_hosts = {array}" + text[end:]
    try:
        parsed = tomllib.loads(new) if new else None
    except tomllib.TOMLDecodeError:
        parsed = None
    if parsed is None or parsed != {**data, "trusted_hosts": wanted}:
        raise UsageError(f"{path}: cannot add {host!r} to trusted_hosts safely; add it "
                         f"yourself: trusted_hosts = {array}")
    _write_atomically(path, new)
    return path


def _array_end(text: str, start: int) -> int:
    """The index just after the ``]`` closing the array that opens before ``start``
    (strings and comments skipped: an IPv6 entry holds brackets); -1 if none."""
    depth, i, quote = 1, start, ""
    while i < len(text):
        char = text[i]
        if quote:
            if char == "\\" and quote == '"':
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "#":
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
            continue
        elif char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file in one step (a crash leaves the old file or the new one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".toml", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            if path.exists():
                os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UsageError(f"{path}: cannot write: {exc.strerror or exc}") from None
