"""Trust, round 2 (issue 21): what the client prints and stores about untrusted text.

Every test plays an attacker over real HTTP on loopback, or plants a file: a server that
echoes the bearer token inside a long error page (so a message cut to length would cut
the token in two), server or journal text with terminal escape sequences reaching every
printer, and hosts that look like the archive's or cannot be hosts at all.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from enginehelpers import start_workers, write_manifest
from hostile_server import Crafted, HostileServer, files_of, record, series_zip
from nbia_retriever import make_engine
from nbia_retriever.engine.procs import default_processes
from nbia_retriever.report import write_error_report
from reliability_helpers import CLI, run_cli

PASSWORD = "correct-horse-battery-staple"
FAST = {"backoff_base": 0.01, "timeout": 5.0}
#: The quoted excerpt of an error body is this long (``api.client.error_excerpt``).
EXCERPT = 200
#: No run of this many characters of a secret may be shown or stored.
FRAGMENT = 8


@pytest.fixture(scope="module")
def archive(archive_factory):
    return archive_factory(seed=93, collections=1, patients=1, studies=1, series=5, images=1,
                           rows=8, columns=8, restricted=False, awkward=False)


def env(**extra: str) -> dict[str, str]:
    """No config file of the machine's user, and the test password."""
    base = {k: v for k, v in os.environ.items() if k not in ("NBIA_PASSWORD",)}
    base["NBIA_RETRIEVER_CONFIG"] = os.devnull + ".absent"
    base.update(extra)
    return base


def fragments(secret: str) -> set[bytes]:
    return {secret[i:i + FRAGMENT].encode() for i in range(len(secret) - FRAGMENT + 1)}


def leaked(blob: bytes, secret: str) -> list[bytes]:
    return sorted(f for f in fragments(secret) if f in blob)


# ------------------------------------------------------------------ 6. secrets before cuts


def echoing(archive, server: HostileServer) -> list[str]:
    """The first series is served (it proves the image endpoint, in-process); every
    other one answers 500 with a long page that echoes the token where the excerpt of
    the message is cut (a few characters of it, or most of it, before the cut), or
    with a mark inside it that the cleaning drops (a left-to-right mark: the token is
    whole again once it is gone)."""
    token = server.issued_token
    first, *rest = archive.series
    server.series[first.series_uid] = Crafted(record(first), series_zip(files_of(first)))
    for i, series in enumerate(rest):
        if i == len(rest) - 1:
            body = f"EEEE token {token[:20]}\u200e{token[20:]} refused"
        else:
            kept = (12, 30, 45)[i % 3]  # characters of the token before the cut
            body = "E" * (EXCERPT - 1 - kept) + token + " and more" * 20
        server.series[series.series_uid] = Crafted(record(series), body.encode(), status=500,
                                                   content_type="text/plain")
    return [s.series_uid for s in archive.series]


@pytest.mark.parametrize("processes", ["0", "1"])
def test_a_token_cut_by_an_excerpt_is_redacted_everywhere(tmp_path, archive, processes):
    with HostileServer() as server:
        uids = echoing(archive, server)
        # One retry each, after a backoff: with --processes 1 the retries find the
        # worker up (the engine test below checks attempts really ran in one).
        cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url, retries=1)
        done = subprocess.run(
            [*CLI, "download", str(cart), "-d", str(tmp_path / "dl"), "--user", "alice",
             "--api-url", server.api_url, "--api", "v2", "--backoff", "0.5", "--json",
             "-w", "1", "--processes", processes, "--error-report",
             str(tmp_path / "errors.csv")],
            capture_output=True, env=env(NBIA_PASSWORD=PASSWORD), timeout=120, check=False)
        token = server.issued_token
    assert done.returncode == 1, done.stderr
    assert b"HTTP 500 EEEE" in done.stdout  # the excerpts are there...
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "cart.tcia"]
    assert any(p.name == "journal.sqlite" for p in files)
    assert (tmp_path / "errors.csv").exists()
    for name, blob in [("stdout", done.stdout), ("stderr", done.stderr),
                       *((str(p), p.read_bytes()) for p in files)]:
        assert not leaked(blob, token), (name, leaked(blob, token))  # ...no bit of the token


@pytest.mark.skipif(default_processes() == 0, reason="worker processes need 2 cores")
def test_a_token_cut_in_a_worker_process_is_redacted_everywhere(tmp_path, archive):
    """The same through the engine, checking the attempts really ran in a worker (which
    knows no secret of the engine's process but the header it was given)."""
    with HostileServer() as server:
        uids = echoing(archive, server)
        cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url, retries=1)
        engine = make_engine(cart, tmp_path / "dl", api_url=server.api_url, api="v2",
                             user="alice", password=PASSWORD, processes=1, workers=1, **FAST)
        events: list[str] = []
        engine.subscribe(lambda e: events.append(json.dumps(e.as_dict())))
        start_workers(engine)
        report = engine.run()
        token = server.issued_token
    assert engine.stats().worker_attempts >= len(uids) - 1
    failed = [r for r in report.results.values() if r.error]
    assert len(failed) == len(uids) - 1 and all("HTTP 500 EEE" in r.error for r in failed)
    write_error_report(tmp_path / "errors.csv", report.results.values())
    texts = [*events, *(r.error for r in failed), report.summary(), report.fatal or ""]
    blobs = [("\n".join(texts).encode(), "events and results")]
    blobs += [(p.read_bytes(), str(p)) for p in tmp_path.rglob("*") if p.is_file()
              and p.name != "cart.tcia"]
    for blob, name in blobs:
        assert not leaked(blob, token), (name, leaked(blob, token))




#: Passwords whose 8-character pieces are ordinary words, and a message holding them.
WORDY = [("Collection2024!", "see collection list"),
         ("password123", "wrong password for user")]


def _cut_prefixes(password: str) -> list[str]:
    """A password's starts as a cut excerpt would end with them (in JSON too)."""
    return [password[:k] + end for k in range(4, len(password))
            for end in ("\u2026", "\\u2026")]


@pytest.mark.parametrize("processes", ["0", "1"])
@pytest.mark.parametrize(("password", "phrase"), WORDY)
def test_a_password_is_redacted_whole_and_ordinary_words_stay(tmp_path, archive, password,
                                                              phrase, processes):
    """A password is no random token: the server's message that shares 8 characters
    with it prints intact; the password echoed whole goes; echoed where an excerpt is
    cut (in a worker process the password is unknown), its start goes too."""
    with HostileServer() as server:
        first, words, whole, cut, *_ = archive.series
        server.series[first.series_uid] = Crafted(record(first), series_zip(files_of(first)))
        kept = 6  # characters of the password before the excerpt's cut
        for series, body in ((words, phrase), (whole, f"bad login {password} here"),
                             (cut, "E" * (EXCERPT - 1 - kept) + password + " more" * 20)):
            server.series[series.series_uid] = Crafted(record(series), body.encode(),
                                                       status=500, content_type="text/plain")
        uids = [s.series_uid for s in (first, words, whole, cut)]
        # One retry, after a backoff: with --processes 1 it finds the worker up.
        cart = write_manifest(tmp_path / "cart.tcia", uids, server.download_url, retries=1)
        done = subprocess.run(
            [*CLI, "download", str(cart), "-d", str(tmp_path / "dl"), "--user", "alice",
             "--api-url", server.api_url, "--api", "v2", "--json", "-w", "1",
             "--backoff", "0.5", "--processes", processes,
             "--error-report", str(tmp_path / "errors.csv")],
            capture_output=True, env=env(NBIA_PASSWORD=password), timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert f"HTTP 500 {phrase}".encode() in done.stdout, done.stdout[-2000:]
    assert b"bad login *** here" in done.stdout
    assert b"EEEE***" in done.stdout  # the cut excerpt, its piece of the password gone
    assert phrase.encode() in (tmp_path / "errors.csv").read_bytes()
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "cart.tcia"]
    for name, blob in [("stdout", done.stdout), ("stderr", done.stderr),
                       *((str(p), p.read_bytes()) for p in files)]:
        text = blob.decode("utf-8", "replace")
        assert password not in text, name
        assert not [c for c in _cut_prefixes(password) if c in text], name


def test_the_error_report_cleans_before_it_redacts(tmp_path):
    """A control character inside a secret must not hide it from redaction and then
    vanish, leaving the secret whole in the file."""
    from nbia_retriever.models import SeriesState
    from nbia_retriever.report import SeriesResult
    from nbia_retriever.untrusted import SECRETS

    password = "Collection2024!"
    SECRETS.add_password(password)
    try:
        result = SeriesResult("1.2.3", state=SeriesState.ERROR,
                              error="HTTP 500 you sent Collection\x1b2024! to us")
        write_error_report(tmp_path / "errors.csv", [result])
    finally:
        SECRETS.discard(password)
    text = (tmp_path / "errors.csv").read_text(encoding="utf-8")
    assert password not in text and "you sent *** to us" in text, text


# ------------------------------------------------------------- 7. every printer is plain

#: Terminal escapes a journal in a shared folder or a server can carry: OSC (set the
#: window title), CSI (clear the screen, colours), an 8-bit CSI, a right-to-left override.
ESCAPES = "\x1b]0;owned\x07\x1b[2J\x1b[31m\x9b2J\u202e"
ROOT_NAME = "manifest-1700000000000"


def assert_inert(output: bytes, what: str) -> None:
    """No control character but newlines, no C1 control, no bidi override."""
    text = output.decode("utf-8", "replace")
    bad = sorted({c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7f <= ord(c) <= 0x9f
                  or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"})
    assert not bad, (what, bad, text[:2000])


def planted_root(tmp_path: Path) -> Path:
    """A sharded download root whose journals (a collaborator's, in a shared folder)
    carry escape sequences in a UID, a state, an error and folder names."""
    from nbia_retriever.engine.journal import FileRecord, Journal
    from nbia_retriever.models import SeriesInfo

    root = tmp_path / "dest" / ROOT_NAME
    (root / ".nbia").mkdir(parents=True)
    with Journal(root / ".nbia" / "journal-1-of-2.sqlite") as journal:
        journal.set_state("1.2.3" + ESCAPES, "Error", error="HTTP 500 " + ESCAPES,
                          attempts=2)
        journal.set_state("1.2.4", "Error" + ESCAPES, error="x", attempts=1)
        for uid in ("1.2.5", "1.2.6"):  # two series in one folder: a conflict is printed
            journal.mark_complete(uid, relpath="C/P/St/S", nbytes=1, attempts=1,
                                  files=[FileRecord("1-1" + ESCAPES + ".dcm", 1, "0" * 32)],
                                  info=SeriesInfo(series_uid=uid))
    with Journal(root / ".nbia" / "journal-2-of-2.sqlite") as journal:
        journal.set_state("1.2.7", "Failed", error=ESCAPES * 3, attempts=1)
    folder = root / "C" / "P" / "St" / "S"
    folder.mkdir(parents=True)
    return root


@pytest.mark.parametrize("mode", ["text", "--json", "--check"])
def test_merge_reports_prints_no_escape_from_a_planted_journal(tmp_path, mode):
    root = planted_root(tmp_path)
    done = run_cli(["merge-reports", str(root.parent), *([mode] if mode != "text" else [])],
                   env=env())
    assert done.returncode == 1, done.stderr
    assert "1.2.3" in done.stdout and "HTTP 500" in done.stdout  # reported...
    assert_inert(done.stdout.encode() + done.stderr.encode(), mode)  # ...inert


def test_verify_prints_no_escape_from_a_planted_journal(tmp_path):
    """A file planted in a series folder, with escapes in its name, is reported inertly."""
    from nbia_retriever.engine.journal import FileRecord, Journal
    from nbia_retriever.models import SeriesInfo

    root = tmp_path / "dest" / ROOT_NAME
    (root / ".nbia").mkdir(parents=True)
    (root / "C" / "P" / "St" / "S").mkdir(parents=True)
    (root / "C" / "P" / "St" / "S" / ("planted" + ESCAPES)).write_bytes(b"x")
    with Journal(root / ".nbia" / "journal.sqlite") as journal:
        journal.mark_complete("1.2.5", relpath="C/P/St/S", nbytes=1, attempts=1,
                              files=[FileRecord("1-1.dcm", 1, "0" * 32)],
                              info=SeriesInfo(series_uid="1.2.5"))
    for args in (["verify", str(root)], ["verify", "--quick", str(root)]):
        done = run_cli(args, env=env())
        assert done.returncode == 1, done.stdout + done.stderr
        assert "missing file C/P/St/S/1-1" in done.stdout and "planted" in done.stdout
        assert_inert(done.stdout.encode() + done.stderr.encode(), " ".join(args))


@pytest.mark.parametrize("mode", ["text", "--json"])
def test_manifest_info_prints_no_escape_from_a_shared_manifest(tmp_path, mode):
    cart = tmp_path / "cart.tcia"
    cart.write_text("downloadServerUrl=http://127.0.0.1:9/nbia-api/services/v1\n"
                    f"databasketId=evil{ESCAPES}.tcia\nmanifestVersion=3.0{ESCAPES}\n"
                    "ListOfSeriesToDownload=\n1.2.3\n", encoding="utf-8")
    done = run_cli(["manifest", "info", "--offline", str(cart),
                    *([mode] if mode != "text" else [])], env=env())
    assert done.returncode == 0, done.stderr
    assert "evil" in done.stdout and "3.0" in done.stdout
    assert_inert(done.stdout.encode() + done.stderr.encode(), mode)


# -------------------------------------------------------------------------------- 11. hosts

#: The archive's domain with a Cyrillic "а" (U+0430) for the Latin "a": it looks the same.
LOOKALIKE = "cancerim\u0430gingarchive.net"
#: Its ASCII form, what DNS is asked for (worked out once: IDNA, RFC 3490).
LOOKALIKE_ASCII = "xn--cancerimgingarchive-xop.net"


def test_a_lookalike_host_is_named_in_its_ascii_form(tmp_path):
    """Refusals, config hints and the prompt name the host as DNS sees it, so a
    lookalike of cancerimagingarchive.net shows as the other host it is."""
    from test_trust import _pty_run

    host = "services." + LOOKALIKE_ASCII
    cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"],
                          f"https://services.{LOOKALIKE}/nbia-download/servlet/DownloadServlet")
    args = ["download", str(cart), "-d", str(tmp_path / "dl"), "--user", "alice"]
    done = run_cli(args, env=env(NBIA_PASSWORD=PASSWORD))
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert f"to {host}:" in line and f'add "{host}" to trusted_hosts' in line, line
    assert f"--api-url https://{host}/nbia-api/services" in line, line
    assert LOOKALIKE not in line
    code, seen = _pty_run(args, [(f"Send your password to {host}?", "n")], env())
    assert code == 3 and LOOKALIKE not in seen, seen
    # A lookalike typed as --api-url over plain http: refused, named in ASCII too.
    done = run_cli([*args, "--api-url", f"http://{LOOKALIKE}/nbia-api/services"],
                   env=env(NBIA_PASSWORD=PASSWORD))
    assert done.returncode == 3, done.stderr
    assert f"to {LOOKALIKE_ASCII} over plain http" in done.stderr, done.stderr
    assert LOOKALIKE not in done.stderr
    # What the manifest says is shown as the same host.
    done = run_cli(["manifest", "info", "--offline", str(cart)], env=env())
    assert f"server:          https://{host}/nbia-download" in done.stdout, done.stdout
    assert LOOKALIKE not in done.stdout


def test_an_ipv6_host_is_named_in_brackets(tmp_path):
    from nbia_retriever.api import HostPolicy

    cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"],
                          "http://[::1]:8089/nbia-download/servlet/DownloadServlet")
    done = run_cli(["download", str(cart), "-d", str(tmp_path / "dl"), "--user", "alice"],
                   env=env(NBIA_PASSWORD=PASSWORD))
    assert done.returncode == 3, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "to [::1]:8089:" in line and 'add "[::1]:8089" to trusted_hosts' in line, line
    # What the hint says to add is what the policy then trusts (and the bare address).
    for entry in ("[::1]:8089", "[::1]", "::1"):
        assert HostPolicy(trusted_hosts=[entry]).trusts("http://[::1]:8089/x"), entry


BAD_HOSTS = {
    "space": "exa mple.org",
    "DEL": "exa\x7fmple.org",
    "empty label": "exa..mple.org",
    "label of 64": "a" * 64 + ".org",
    "NUL": "exa\x00mple.org",
}


@pytest.mark.parametrize(("what", "where"), [  # (a command line cannot hold a NUL)
    (what, where) for what in BAD_HOSTS for where in ("--api-url", "manifest")
    if (what, where) != ("NUL", "--api-url")])
def test_a_host_that_cannot_be_is_refused_in_one_line(tmp_path, what, where):
    host = BAD_HOSTS[what]
    with HostileServer() as proxy:  # any request to any http host would arrive here
        if where == "manifest":
            cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"],
                                  f"http://{host}/nbia-download/servlet/DownloadServlet")
            extra: list[str] = []
        else:
            cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"], proxy.download_url)
            extra = ["--api-url", f"http://{host}/nbia-api/services"]
        for user in ([], ["--user", "alice"]):
            done = run_cli(["download", str(cart), "-d", str(tmp_path / "dl"), "--retries",
                            "0", *extra, *user],
                           env=env(NBIA_PASSWORD=PASSWORD, HTTP_PROXY=proxy.url,
                                   http_proxy=proxy.url, NO_PROXY="", no_proxy=""),
                           timeout=60)
            assert done.returncode == 2, (user, done.stdout, done.stderr)
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
            assert (where == "manifest") == ("cart.tcia" in lines[0]), lines[0]
            assert_inert(done.stderr.encode(), what)
        assert proxy.requests == []
    assert not (tmp_path / "dl").exists()


def test_trusted_hosts_are_kept_in_the_form_messages_name_them(tmp_path):
    from nbia_retriever.api import HostPolicy
    from nbia_retriever.config import load_user_config

    config = tmp_path / "config.toml"
    config.write_text(f'trusted_hosts = ["{LOOKALIKE}", "[::1]:8443", "Lab.Example"]\n',
                      encoding="utf-8")
    hosts = load_user_config(config).trusted_hosts
    assert hosts == (LOOKALIKE_ASCII, "[::1]:8443", "lab.example")
    policy = HostPolicy(trusted_hosts=hosts)
    for url in (f"https://{LOOKALIKE}/x", f"https://{LOOKALIKE_ASCII}/x",
                "http://[::1]:8443/x", "https://lab.example:9/x"):
        assert policy.trusts(url), url
    assert not policy.trusts("http://[::1]:8444/x")
    # An entry that cannot be a host: exit 2, one line naming the file and the entry.
    config.write_text('trusted_hosts = ["exa mple.org"]\n', encoding="utf-8")
    cart = write_manifest(tmp_path / "cart.tcia", ["1.2.3"], "http://127.0.0.1:9/x")
    done = run_cli(["download", str(cart), "-d", str(tmp_path / "dl"), "--user", "alice"],
                   env=env(NBIA_PASSWORD=PASSWORD, NBIA_RETRIEVER_CONFIG=str(config)))
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert str(config) in line and "'exa mple.org' holds a space" in line, line


def test_a_proxy_password_from_the_environment_is_a_secret(monkeypatch):
    """HTTPS_PROXY=http://user:pass@host: the password (percent-decoded, as it is sent)
    and the Basic header made of it are redacted like the user's own password."""
    from nbia_retriever.api.http import Origin, _proxy_for
    from nbia_retriever.untrusted import SECRETS, redact

    password = "proxy-s3cret/pass"
    monkeypatch.setenv("HTTPS_PROXY", "http://alice:proxy-s3cret%2Fpass@127.0.0.1:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    try:
        proxy = _proxy_for(Origin.of("https://example.org/x"))
        assert proxy is not None
        basic = proxy.headers["Proxy-Authorization"].split()[1]
        text = redact(f"407 from proxy: you sent {password} as {basic}")
        assert password not in text and basic not in text
        assert "407 from proxy" in text
    finally:
        SECRETS.discard(password, basic)
