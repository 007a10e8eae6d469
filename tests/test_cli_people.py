"""The command line as a person meets it (issue 16, item 4).

Every test here runs ``python -m nbia_retriever.cli`` in a subprocess (or click's
CliRunner where only the exit code and the streams matter) against a real server on
127.0.0.1: the reference server, or :class:`QuirkyServer`, a small proxy in front of it
that is wrong in one chosen way (names compared with their case, a collection answered
with an HTML page). What is asserted is what a person reads: the lines, their width,
the exit code, and that no traceback ever shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web

from enginehelpers import write_manifest
from nbia_retriever.cli.download_command import QUIET_REASONS
from nbia_retriever.manifest import parse_manifest
from nbia_retriever.report import UID_TAIL
from nbia_retriever.server import FaultPlan, ReferenceServer
from nbia_retriever.server.runner import AppThread
from nbia_retriever.server.synth import ArchiveSummary, SynthSeries

API_PREFIX = "/nbia-api/services"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``nbia-retriever ARGS`` in a fresh interpreter, stdout and stderr apart; stdin is
    not a terminal (nobody to prompt), output goes to pipes unless ``env`` says so."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE",
                             "NBIA_PASSWORD")}
    full_env.update(env or {})
    done = subprocess.run([sys.executable, "-m", "nbia_retriever.cli", *map(str, args)],
                          capture_output=True, text=True, encoding="utf-8", env=full_env,
                          cwd=cwd, stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def lines(text: str) -> list[str]:
    return [ANSI.sub("", line) for line in text.splitlines()]


# --------------------------------------------------------------------------- servers


@pytest.fixture(scope="module")
def three(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    """SYNTH-CT-A and SYNTH-CT-B public, SYNTH-CT-C restricted."""
    return archive_factory(collections=3)


@pytest.fixture(scope="module")
def srv(three: ArchiveSummary, module_serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return module_serve(three.root)


@pytest.fixture(scope="module")
def public(three: ArchiveSummary) -> list[SynthSeries]:
    return [s for s in three.series if not s.restricted]


class QuirkyServer:
    """A proxy to a reference server, with two ways of being wrong:

    * ``case_sensitive``: getSeries/getPatient find nothing (200, empty body: NBIA's
      "no results") unless Collection is spelled exactly as getCollectionValues does;
    * ``broken``: collections whose getSeries/getPatient are answered with a 200 HTML
      maintenance page, as proxies in front of real NBIA servers do.
    """

    def __init__(self, upstream: ReferenceServer, *, case_sensitive: bool = False,
                 broken: Iterable[str] = ()) -> None:
        self.upstream = upstream
        self.case_sensitive = case_sensitive
        self.broken = set(broken)
        self.asked: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._thread = AppThread(app, name="quirky-nbia")

    @property
    def api_url(self) -> str:
        return self._thread.url + API_PREFIX

    def __enter__(self) -> QuirkyServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.stop()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        endpoint = request.path.rsplit("/", 1)[-1]
        name = request.query.get("Collection")
        self.asked.append(f"{endpoint}?Collection={name}" if name is not None else endpoint)
        async with ClientSession() as session:
            if name is not None and endpoint in ("getSeries", "getPatient"):
                if name in self.broken:
                    return web.Response(text="<html><head><title>503</title></head><body>"
                                             "<h1>Down for maintenance</h1></body></html>",
                                        content_type="text/html")
                if self.case_sensitive:
                    url = f"{self.upstream.api_url}/v1/getCollectionValues"
                    async with session.get(url) as answer:
                        names = {r["Collection"] for r in await answer.json()}
                    if name not in names:
                        return web.Response(status=200, body=b"")
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() in ("content-type", "authorization", "accept")}
            async with session.request(request.method, self.upstream.url + request.path_qs,
                                       data=await request.read(), headers=headers) as answer:
                body = await answer.read()
                kept = {k: v for k, v in answer.headers.items()
                        if k.lower() in ("content-type", "retry-after")}
                return web.Response(status=answer.status, body=body, headers=kept)


# --------------------------------------------------- 1. search --collection, any case


def _search_uids(done: subprocess.CompletedProcess[str]) -> set[str]:
    return {json.loads(line)["series_uid"] for line in done.stdout.splitlines()}


@pytest.mark.parametrize("spelling", ["synth-ct-a", "Synth-Ct-A", " SYNTH-ct-a "])
def test_search_collection_ignores_case(srv, public, tmp_path, spelling):
    expected = {s.series_uid for s in public if s.collection == "SYNTH-CT-A"}
    done = cli("search", "--collection", spelling, "--json", "--api-url", srv.api_url)
    assert done.returncode == 0, done.stderr
    assert _search_uids(done) == expected
    # The cart it writes is what download reads.
    cart = tmp_path / "cart.tcia"
    done = cli("search", "--collection", spelling, "-o", cart, "--api-url", srv.api_url)
    assert done.returncode == 0, done.stderr
    assert set(parse_manifest(cart.read_text(), source=str(cart)).series_uids) == expected
    assert f"wrote manifest {cart}: {len(expected)} series" in done.stderr


def test_search_collection_ignores_case_on_a_server_that_does_not(srv, public):
    """A server that matches Collection with its case finds nothing for ``synth-ct-a``:
    the client asks again with the name as the server spells it."""
    expected = {s.series_uid for s in public if s.collection == "SYNTH-CT-A"}
    with QuirkyServer(srv, case_sensitive=True) as quirky:
        done = cli("search", "--collection", "synth-ct-a", "--json", "--api-url",
                   quirky.api_url)
        assert done.returncode == 0, done.stderr
        assert _search_uids(done) == expected
        assert "getSeries?Collection=SYNTH-CT-A" in quirky.asked
        # A name no spelling matches is still "nothing", with exit 1 and one line.
        done = cli("search", "--collection", "no-such-collection", "--api-url",
                   quirky.api_url)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "nbia-retriever: error: no series match collection=no-such-collection"]


# --------------------------------------------- 2. collections --counts, partly answered


def _expected_counts(public: list[SynthSeries], name: str) -> tuple[int, int, int]:
    mine = [s for s in public if s.collection == name]
    return len({s.patient_id for s in mine}), len(mine), sum(s.images for s in mine)


def test_collections_counts_mark_what_the_server_did_not_answer(srv, public):
    with QuirkyServer(srv, broken={"SYNTH-CT-B"}) as quirky:
        table = cli("collections", "--counts", "--api-url", quirky.api_url,
                    env={"COLUMNS": "100"})
        as_json = cli("collections", "--counts", "--json", "--api-url", quirky.api_url)
    # Exit 0: what came is right, and the stderr says what did not.
    assert table.returncode == 0, table.stderr
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("│ ").split("│")] for line in lines(table.stdout)
             if line.startswith("│"))}
    assert set(rows) == {"SYNTH-CT-A", "SYNTH-CT-B"}
    patients, series, images = _expected_counts(public, "SYNTH-CT-A")
    assert rows["SYNTH-CT-A"][:3] == [str(patients), str(series), str(images)]
    assert rows["SYNTH-CT-A"][3].endswith(("KB", "MB"))
    assert rows["SYNTH-CT-B"] == ["?", "?", "?", "?"]
    assert "?: the server did not answer" in table.stdout
    warnings = table.stderr.splitlines()
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("nbia-retriever: warning: SYNTH-CT-B: counts not available")
    assert "HTML page" in warnings[0]
    assert warnings[1] == ("nbia-retriever: warning: 1 of 2 collections without counts "
                           "(marked ?)")
    # --json: every collection, the unanswered one with its error and no numbers.
    assert as_json.returncode == 0, as_json.stderr
    records = {r["collection"]: r for r in map(json.loads, as_json.stdout.splitlines())}
    assert set(records) == {"SYNTH-CT-A", "SYNTH-CT-B"}
    assert "error" not in records["SYNTH-CT-A"]
    assert records["SYNTH-CT-A"]["series"] == series
    assert records["SYNTH-CT-B"]["series"] is None
    assert records["SYNTH-CT-B"]["patients"] is None
    assert "getPatient" in records["SYNTH-CT-B"]["error"]
    assert "getSeries" in records["SYNTH-CT-B"]["error"]


def test_collections_counts_none_answered_is_exit_1_with_the_names(srv):
    with QuirkyServer(srv, broken={"SYNTH-CT-A", "SYNTH-CT-B"}) as quirky:
        done = cli("collections", "--counts", "--api-url", quirky.api_url)
    assert done.returncode == 1
    assert "SYNTH-CT-A" in done.stdout and "SYNTH-CT-B" in done.stdout
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert errors == ["nbia-retriever: error: the server answered none of the counts of the 2 "
                      "collections (they are listed without them)"]


def test_collections_reference_server_faults_on_the_names_call_are_retried(srv):
    """The one call without which nothing can be listed is retried like any other."""
    srv.set_faults(FaultPlan(metadata_script=[None, "http503:0"]))
    try:
        done = cli("collections", "--api-url", srv.api_url)
    finally:
        srv.set_faults(None)
    assert done.returncode == 0, done.stderr
    assert "SYNTH-CT-A" in done.stdout and "SYNTH-CT-B" in done.stdout


# ----------------------------------------------------------- 3. list in 80 columns


@pytest.fixture
def listed(srv, public, tmp_path) -> tuple[Path, list[SynthSeries]]:
    unknown = "1.2.826.0.1.3680043.8.498.99999999999999999999999999999999999999"
    path = write_manifest(tmp_path / "m.tcia", [s.series_uid for s in public] + [unknown],
                          srv.download_url)
    return path, public


def test_list_piped_is_tsv_with_whole_uids(listed):
    """Piped, ``list`` is data: a header line and whole cells (issue 25 item 3)."""
    path, public = listed
    piped = cli("list", path, env={"COLUMNS": "80"})
    assert piped.returncode == 0, piped.stderr
    rows = [line.split("\t") for line in piped.stdout.splitlines()]
    study, series = rows[0].index("Study UID"), rows[0].index("Series UID")
    assert [r[series] for r in rows[1:-1]] == [s.series_uid for s in public]
    assert all(r[study] == s.study_uid for r, s in zip(rows[1:], public, strict=False))
    assert "1 series not described by the server" in piped.stderr


@pytest.mark.parametrize("terminal", [True], ids=["terminal"])
def test_list_fits_80_columns_and_wide_shows_whole_uids(listed, terminal):
    path, public = listed
    env = {"COLUMNS": "80"}
    if terminal:
        env["TTY_COMPATIBLE"] = "1"  # rich: act as in an 80-column terminal
    narrow = cli("list", path, env=env)
    assert narrow.returncode == 0, narrow.stderr
    out = lines(narrow.stdout) + lines(narrow.stderr)
    assert max(len(line) for line in out) <= 80, "\n".join(out)
    text = "\n".join(out)
    for s in public:
        assert s.series_uid not in text  # shortened ...
        assert "…" + s.series_uid[-UID_TAIL:] in text  # ... to the part that differs
    assert "n/a" in text and "1 series not described by the server" in narrow.stderr

    wide = cli("list", "--wide", path, env=env)
    assert wide.returncode == 0, wide.stderr
    rows = lines(wide.stdout)
    for s in public:
        assert any(s.series_uid in row and s.study_uid in row for row in rows), s.series_uid


# ------------------------------------------------------ 4. UTF-16 without a BOM


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_manifest_without_bom_is_read(srv, public, tmp_path, encoding):
    text = write_manifest(tmp_path / "utf8.tcia", [s.series_uid for s in public],
                          srv.download_url).read_text()
    path = tmp_path / f"windows-{encoding}.tcia"
    path.write_bytes(text.replace("\n", "\r\n").encode(encoding))
    assert not path.read_bytes().startswith((b"\xff\xfe", b"\xfe\xff"))
    info = cli("manifest", "info", "--offline", "--json", path)
    assert info.returncode == 0, info.stderr
    summary = json.loads(info.stdout)
    assert summary["series"] == len(public)
    assert summary["download_server_url"] == srv.download_url
    assert summary["kind"] == "tcia"
    listed = cli("list", "--json", path)
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(r)["series_uid"] for r in listed.stdout.splitlines()] == [
        s.series_uid for s in public]
    # Text that went through a UTF-8 read on the way (Path.read_text) still parses.
    assert parse_manifest(path.read_text(encoding="utf-8"), source=str(path)).series_uids \
        == tuple(s.series_uid for s in public)


def test_truncated_utf16_manifest_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "cut.tcia"
    data = "ListOfSeriesToDownload=\r\n1.2.3.4\r\n".encode("utf-16-le")[:-1]
    path.write_bytes(data)
    done = cli("manifest", "info", "--offline", path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [  # the last byte is the half character
        f"nbia-retriever: error: {path}: not valid UTF-16 text (little endian, no BOM; "
        f"byte {len(data)}: truncated data)"]


# ------------------------------------------------------ 5. -q still says why


def test_quiet_download_gives_one_capped_reason_line_per_failed_series(srv, public,
                                                                       tmp_path):
    unknown = [f"1.2.826.0.1.3680043.8.498.{n}" for n in range(1, QUIET_REASONS + 4)]
    broken = public[0].series_uid
    manifest = write_manifest(tmp_path / "m.tcia",
                              [broken, *unknown, *(s.series_uid for s in public[1:])],
                              srv.download_url)
    srv.set_faults(FaultPlan(script={broken: ["http500"] * 3}))
    try:
        done = cli("download", "-q", "--retries", "0", "-d", tmp_path / "out", manifest)
    finally:
        srv.set_faults(None)
    assert done.returncode == 1
    assert done.stdout == ""
    err = done.stderr.splitlines()
    failed = 1 + len(unknown)
    reasons = [line for line in err if re.match(r"^[A-Z][A-Za-z ]+: 1\.2\.", line)]
    assert len(reasons) == QUIET_REASONS, err
    assert len({line.split(": ")[1] for line in reasons}) == QUIET_REASONS
    assert all(len(line.split(": ", 2)) == 3 and line.split(": ", 2)[2] for line in reasons)
    assert any(line.startswith(f"Error: {broken}: ") and "HTTP 500" in line for line in reasons)
    assert any(line.startswith(f"Not Authorized: {unknown[0]}: ") for line in reasons)
    assert (f"... and {failed - QUIET_REASONS} more failed series (--error-report FILE "
            "lists them all)") in err
    # No progress chatter with -q, and the summary closes the log.
    assert not [line for line in err if line.startswith(("Retrying", "Complete"))]
    assert any(f"{len(public) - 1} of {len(public) + len(unknown)} series complete" in line
               for line in err[-4:]), err


# -------------------------------------------- 6. download --json with a bad manifest


BAD_MANIFESTS: dict[str, tuple[bytes | None, str]] = {
    "not-a-uid": (b"downloadServerUrl=http://127.0.0.1:9/x\nListOfSeriesToDownload=\n"
                  b"1.2.3.4\nhello\n", r"bad\.tcia:4: not a DICOM UID: 'hello'"),
    "html-page": (b"<!DOCTYPE html>\n<html><body>Session expired</body></html>\n",
                  r"bad\.tcia:1: "),
    "binary": (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(256)) * 4,
               r"bad\.tcia: binary file, not a manifest"),
    "empty": (b"", r"bad\.tcia: no series listed"),
    "missing": (None, r"bad\.tcia: cannot read: No such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_download_json_bad_manifest_is_one_error_event(tmp_path, case):
    content, message = BAD_MANIFESTS[case]
    path = tmp_path / "bad.tcia"
    if content is not None:
        path.write_bytes(content)
    done = cli("download", "--json", "-d", tmp_path / "out", "bad.tcia", cwd=tmp_path)
    assert done.returncode == 2
    out = done.stdout.splitlines()
    assert len(out) == 1, done.stdout
    event = json.loads(out[0])
    assert event["event"] == "error" and event["exit"] == 2
    assert re.match(message, event["message"]), event
    assert done.stderr.splitlines() == [f"nbia-retriever: error: {event['message']}"]
    assert not (tmp_path / "out").exists()


def test_download_json_folder_as_manifest_is_one_error_event(tmp_path):
    done = cli("download", "--json", "-d", tmp_path / "out", tmp_path)
    assert done.returncode == 2
    event = json.loads(done.stdout)
    assert event == {"event": "error", "exit": 2,
                     "message": f"{tmp_path}: is a folder, not a manifest"}
    assert done.stderr.splitlines() == [f"nbia-retriever: error: {event['message']}"]


# ----------------------------------------------- bad input: one line, never a traceback


@pytest.mark.parametrize("args", [
    ("collections", "--api-url", "ftp://example.org/nbia-api/services"),
    ("collections", "--counts", "--api-url", "http://"),
    ("search", "--collection", "X", "--api-url", "ftp://example.org/nbia-api/services"),
    ("list", "{manifest}", "--api-url", "ftp://example.org/nbia-api/services"),
    ("download", "{manifest}", "--api-url", "http://example.org:notaport/x"),
])
def test_bad_api_url_is_exit_2_at_once_naming_it(tmp_path, args):
    manifest = write_manifest(tmp_path / "m.tcia", ["1.2.3.4"], "http://127.0.0.1:9/x")
    argv: list[Any] = [str(manifest) if a == "{manifest}" else a for a in args]
    done = cli(*argv, "-d", tmp_path / "out", timeout=20) if args[0] == "download" else \
        cli(*argv, timeout=20)
    assert done.returncode == 2, done.stderr
    url = args[args.index("--api-url") + 1]
    assert done.stderr.splitlines() == [
        next(line for line in done.stderr.splitlines() if line.startswith("nbia-retriever: "))]
    assert "--api-url" in done.stderr and url in done.stderr


def test_unreachable_server_is_one_line_naming_the_host(tmp_path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = cli("search", "--collection", "X", "--api-url",
               f"http://127.0.0.1:{port}/nbia-api/services")
    assert done.returncode == 1
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith(f"nbia-retriever: error: cannot reach http://127.0.0.1:{port}")


def test_bad_manifest_line_is_named_by_every_command(tmp_path):
    path = tmp_path / "m.tcia"
    path.write_text("downloadServerUrl=http://127.0.0.1:9/x\nnoOfrRetry=many\n"
                    "ListOfSeriesToDownload=\n1.2.3.4\n")
    for argv in (("list", path), ("manifest", "info", "--offline", path),
                 ("download", "-d", tmp_path / "out", path)):
        done = cli(*argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert done.stderr.splitlines() == [
            f"nbia-retriever: error: {path}:2: noOfrRetry must be a whole number >= 0, "
            "got 'many'"], argv
