"""Licences (issue 25, item 9).

Before the first download of a collection whose licence is not a plain CC BY (CC BY-NC,
TCIA's restricted licence...), a person at a terminal is shown its name and URL and asked
once (the yes is remembered per collection in the config file, ``[licenses] accepted``);
a headless run needs ``--agree-to-license`` (the Java CLI's flag) and says so in one
line naming the collections and licences. ``list`` shows each series' licence;
``--license``/``--exclude-license`` keep or drop series by licence before any image is
fetched. The reference server gives one collection CC BY-NC; everything runs over real
HTTP on 127.0.0.1 (the terminal is a real pty).
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever.config import accept_licenses, load_user_config
from nbia_retriever.engine.licenses import needs_agreement
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.config import load_config
from nbia_retriever.server.synth import ArchiveSummary
from test_cli_people import cli

NC_NAME = "Creative Commons Attribution-NonCommercial 3.0 Unported License"
NC_URL = "https://creativecommons.org/licenses/by-nc/3.0/"
ROOT = "manifest-1700000000000"


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(collections=2, patients=1, series=2, images=2, awkward=False,
                           restricted=False)


@pytest.fixture
def srv(archive: ArchiveSummary, serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    """The second collection is CC BY-NC; the first keeps CC BY 4.0."""
    config = load_config(archive.root)
    nc = archive.series[-1].collection
    collections = {**config.collections,
                   nc: replace(config.collection(nc), license_name=NC_NAME, license_url=NC_URL)}
    return serve(archive.root, config=replace(config, collections=collections))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A config file of the test's own (never the user's)."""
    return {"NBIA_RETRIEVER_CONFIG": str(tmp_path / "config.toml")}


def split(archive: ArchiveSummary) -> tuple[list[str], list[str], str]:
    nc = archive.series[-1].collection
    by = [s.series_uid for s in archive.series if s.collection != nc]
    return by, [s.series_uid for s in archive.series if s.collection == nc], nc


def downloaded(root: Path, collection: str) -> int:
    folder = root / collection
    return len(list(folder.rglob("*.dcm"))) if folder.is_dir() else 0


def test_plain_cc_by_asks_nothing_the_others_do() -> None:
    assert not needs_agreement("Creative Commons Attribution 4.0 International License",
                               "https://creativecommons.org/licenses/by/4.0/")
    assert not needs_agreement("CC BY 4.0", "")  # IDC's license_short_name
    assert not needs_agreement("", "")  # no licence at all: Java writes no LICENSE either
    assert needs_agreement(NC_NAME, NC_URL)
    assert needs_agreement("CC BY-NC 4.0", "")
    assert needs_agreement("TCIA Restricted License", "https://www.cancerimagingarchive.net/"
                           "data-usage-policies-and-restrictions/")
    assert needs_agreement("Creative Commons Attribution 4.0 International License",
                           "https://creativecommons.org/licenses/by-sa/4.0/")
    # IDC series carry the licence too: license_short_name, named as NBIA names it.
    from nbia_retriever.idc.index import license_of

    assert not needs_agreement(*license_of("CC BY 4.0"))
    assert not needs_agreement(*license_of("CC BY 3.0"))
    assert needs_agreement(*license_of("CC BY-NC 4.0"))
    assert needs_agreement(*license_of("TCIA Restricted"))


def test_headless_without_the_flag_says_so_in_one_line_and_leaves_them_out(
        srv, archive, tmp_path, env):
    """Before: the CC BY-NC collection was downloaded without a word. After: its series
    end as Not Authorized with the reason, one line names the collection and licence and
    the flag, the CC BY series are downloaded; --agree-to-license then fetches the rest."""
    by, nc_uids, nc = split(archive)
    write_manifest(tmp_path / "m.tcia", [*by, *nc_uids], srv.download_url)
    done = cli("download", "-d", "out", "m.tcia", cwd=tmp_path, env=env)
    assert done.returncode == 1, done.stderr
    root = tmp_path / "out" / ROOT
    assert downloaded(root, nc) == 0
    assert downloaded(root, archive.series[0].collection) == 2 * len(by)
    lines = [line for line in done.stderr.splitlines() if "licence not accepted:" in line
             and line.startswith("not downloaded")]
    assert lines == [f"not downloaded, licence not accepted: {nc} ({NC_NAME}, {NC_URL}). "
                     "Re-run with --agree-to-license to accept, or --exclude-license TEXT "
                     "to leave them out"], done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("Not Authorized")]
    assert len(failed) == len(nc_uids)
    assert all(f"licence not accepted: {nc} is under {NC_NAME} ({NC_URL})" in line
               for line in failed)
    steps = [line for line in done.stdout.splitlines() if line.startswith("next: ")]
    assert len(steps) == 1 and steps[0].endswith(
        f"; {len(nc_uids)} need their licence accepted (--agree-to-license)"), steps
    again = cli("download", "--agree-to-license", "-d", "out", "m.tcia", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert downloaded(root, nc) == 2 * len(nc_uids)
    assert not (tmp_path / "config.toml").exists()  # a flag is for this run, not remembered


def test_an_accepted_licence_in_the_config_file_is_not_asked_again(srv, archive, tmp_path,
                                                                    env):
    _, nc_uids, nc = split(archive)
    Path(env["NBIA_RETRIEVER_CONFIG"]).write_text(
        f'trusted_hosts = ["nbia.example.org"]\n\n[licenses]\naccepted = ["{nc}"]\n')
    write_manifest(tmp_path / "m.tcia", nc_uids, srv.download_url)
    done = cli("download", "-d", "out", "m.tcia", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert downloaded(tmp_path / "out" / ROOT, nc) == 2 * len(nc_uids)


@pytest.mark.parametrize(("flag", "keep_nc"), [("--exclude-license", False),
                                               ("--license", True)])
def test_the_filter_keeps_or_drops_series_before_any_image_is_fetched(
        srv, archive, tmp_path, env, flag, keep_nc):
    """--exclude-license by-nc: only the CC BY series are in the run (exit 0, no
    licence question); --license by-nc: only the CC BY-NC ones (with the agreement)."""
    by, nc_uids, _ = split(archive)
    write_manifest(tmp_path / "m.tcia", [*by, *nc_uids], srv.download_url)
    srv.clear_requests()
    done = cli("download", flag, "BY-NC", "--agree-to-license", "--json", "-d", "out",
               "m.tcia", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    import json

    summary = json.loads(done.stdout.splitlines()[-1])
    kept = nc_uids if keep_nc else by
    assert (summary["series"], summary["complete"]) == (len(kept), len(kept))
    fetched = {r.series_uid for r in srv.requests if "getImage" in r.path and r.series_uid}
    assert fetched == set(kept)


def _pty_run(args: list[str], cwd: Path, env: dict[str, str], answer: bytes | None,
             ) -> tuple[int, str]:
    """Run the CLI on a real terminal; type ``answer`` when it asks. The reads wait for
    output (select), never for time; the 120 s are only a guard against a hang."""
    master, slave = os.openpty()
    full = {k: v for k, v in os.environ.items() if k not in ("NBIA_PASSWORD", "COLUMNS")}
    full.update(env, TERM="xterm", COLUMNS="100")
    proc = subprocess.Popen([sys.executable, "-m", "nbia_retriever.cli", *args], cwd=cwd,
                            env=full, stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True)
    os.close(slave)
    seen = b""
    typed = False
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, seen.decode(errors="replace")
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child is gone (EIO)
                break
            if not chunk:
                break
            seen += chunk
            if answer is not None and not typed and b"[y/N]" in seen:
                os.write(master, answer)
                typed = True
    finally:
        os.close(master)
    return proc.wait(timeout=120), seen.decode("utf-8", errors="replace")


def test_a_terminal_shows_the_licence_and_asks_once(srv, archive, tmp_path, env):
    """On a terminal: the collection, the licence's name and URL, one question; yes
    downloads it and is remembered in the config file (kept as it was otherwise), so the
    next run asks nothing."""
    _, nc_uids, nc = split(archive)
    config = Path(env["NBIA_RETRIEVER_CONFIG"])
    config.write_text('# mine\ntrusted_hosts = ["nbia.example.org"]\n')
    write_manifest(tmp_path / "m.tcia", nc_uids, srv.download_url)
    code, out = _pty_run(["download", "-d", "out", "m.tcia"], tmp_path, env, b"y\n")
    assert code == 0, out
    flat = " ".join(out.split())
    assert f"The {nc} collection is distributed under the {NC_NAME} ({NC_URL})." in flat
    assert flat.count("Do you agree to its terms?") == 1
    assert downloaded(tmp_path / "out" / ROOT, nc) == 2 * len(nc_uids)
    saved = tomllib.loads(config.read_text())
    assert saved["licenses"]["accepted"] == [nc]
    assert config.read_text().startswith("# mine\n") and saved["trusted_hosts"]
    code, out = _pty_run(["download", "-d", "out2", "m.tcia"], tmp_path, env, None)
    assert code == 0, out
    assert "Do you agree" not in out


def test_a_no_at_the_terminal_downloads_nothing_of_it_and_remembers_nothing(
        srv, archive, tmp_path, env):
    _, nc_uids, nc = split(archive)
    write_manifest(tmp_path / "m.tcia", nc_uids, srv.download_url)
    code, out = _pty_run(["download", "-d", "out", "m.tcia"], tmp_path, env, b"n\n")
    assert code == 1, out
    assert downloaded(tmp_path / "out" / ROOT, nc) == 0
    assert not Path(env["NBIA_RETRIEVER_CONFIG"]).exists()


def test_list_shows_each_series_licence(srv, archive, tmp_path, env):
    by, nc_uids, _ = split(archive)
    write_manifest(tmp_path / "m.tcia", [*by, *nc_uids], srv.download_url)
    done = cli("list", "m.tcia", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in done.stdout.splitlines()]
    header = rows[0]
    licence = {row[header.index("Series UID")]: (row[header.index("License")],
                                                 row[header.index("License URL")])
               for row in rows[1:]}
    assert {licence[u] for u in by} == {("CC BY 4.0",
                                         "https://creativecommons.org/licenses/by/4.0/")}
    assert {licence[u] for u in nc_uids} == {("CC BY-NC 3.0", NC_URL)}


def test_the_python_api_needs_the_agreement_or_asks_through_a_callback(srv, archive, tmp_path,
                                                                       env):
    """In a fresh interpreter: without agree_to_license the CC BY-NC series are left out
    (Not Authorized, the reason given); confirm_license is asked once per collection, and
    its yes is remembered in the config file."""
    _, nc_uids, nc = split(archive)
    script = textwrap.dedent(f"""
        import nbia_retriever
        from nbia_retriever import SeriesState
        uids = {nc_uids!r}
        report = nbia_retriever.download(uids, {str(tmp_path / 'a')!r},
                                         api_url={srv.api_url!r}, progress=False)
        print(report.count(SeriesState.NOT_AUTHORIZED), report.results[uids[0]].error)
        asked = []
        def confirm(collection, name, url):
            asked.append((collection, name, url))
            return True
        report = nbia_retriever.download(uids, {str(tmp_path / 'b')!r},
                                         api_url={srv.api_url!r}, progress=False,
                                         confirm_license=confirm)
        print(report.count(SeriesState.COMPLETE), asked)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()[-2:]
    assert first.startswith(f"{len(nc_uids)} licence not accepted: {nc} is under {NC_NAME}")
    assert second == f"{len(nc_uids)} {[(nc, NC_NAME, NC_URL)]!r}"
    assert load_user_config(Path(env["NBIA_RETRIEVER_CONFIG"])).accepted_licenses == (nc,)


def test_accepting_keeps_the_rest_of_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('# my servers\ntrusted_hosts = ["a.example"]\nproxy = "http://p:1"\n')
    accept_licenses(["LIDC-IDRI"], path)
    accept_licenses(["NLST", "LIDC-IDRI"], path)
    text = path.read_text()
    assert text.startswith('# my servers\ntrusted_hosts = ["a.example"]\nproxy = "http://p:1"\n')
    loaded = load_user_config(path)
    assert loaded.accepted_licenses == ("LIDC-IDRI", "NLST")
    assert loaded.trusted_hosts == ("a.example",) and loaded.proxy == "http://p:1"


# -- the view (Pilot) -----------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("accept", [True, False])
async def test_the_view_shows_the_licence_and_asks_once(srv, archive, tmp_path, env,
                                                        monkeypatch, anyio_backend, accept):
    """The view: a dialog names the collection, the licence's name and URL; Accept is
    remembered in the config file and its series download; "Not this collection" leaves
    them Not Authorized with the reason, and remembers nothing."""
    import time

    from nbia_retriever.engine import DownloadOptions
    from nbia_retriever.manifest import read_manifest
    from nbia_retriever.models import SeriesState
    from nbia_retriever.tui import RetrieverApp
    from nbia_retriever.tui.app import FINISHED, READY
    from nbia_retriever.tui.license import LicenseScreen

    monkeypatch.setenv("NBIA_RETRIEVER_CONFIG", env["NBIA_RETRIEVER_CONFIG"])
    by, nc_uids, nc = split(archive)
    write_manifest(tmp_path / "m.tcia", [*by, *nc_uids], srv.download_url)
    options = DownloadOptions(api_url=srv.api_url, workers=2, retries=1, backoff_base=0.01,
                              timeout=20)
    app = RetrieverApp(read_manifest(tmp_path / "m.tcia"), tmp_path / "dl", options,
                       show_rates=False)

    async def wait_for(pilot, condition, what):  # a condition the user could see
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {app.message}"
            await pilot.pause(0.01)

    async with app.run_test(size=(130, 36)) as pilot:
        await wait_for(pilot, lambda: isinstance(app.screen, LicenseScreen)
                       and bool(app.screen.query("#accept")), "the question")
        dialog = app.screen
        text = " ".join(str(label.render()) for label in dialog.query("Label"))
        assert f"The {nc} collection is distributed under the {NC_NAME} ({NC_URL})." \
            in " ".join(text.split())
        await pilot.press("y" if accept else "n")
        await wait_for(pilot, lambda: app.phase == READY, "the metadata")
        await pilot.press("s")
        await wait_for(pilot, lambda: app.phase == FINISHED, "the run")
        states = {uid: row.state for uid, row in app.rows.items()}
        assert {states[u] for u in by} == {SeriesState.COMPLETE}
        expected = SeriesState.COMPLETE if accept else SeriesState.NOT_AUTHORIZED
        assert {states[u] for u in nc_uids} == {expected}
        assert not isinstance(app.screen, LicenseScreen)  # asked once, not per series
    saved = load_user_config(Path(env["NBIA_RETRIEVER_CONFIG"])).accepted_licenses
    assert saved == ((nc,) if accept else ())
