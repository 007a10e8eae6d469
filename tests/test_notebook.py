"""The Python API as a notebook user meets it: a fresh interpreter (no kernel) imports
``nbia_retriever``, calls ``download()`` against the reference server and looks at the
report. Each script runs in a subprocess so that what it prints is what a user sees.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary


@pytest.fixture(scope="module")
def archive(archive_factory: Callable[..., ArchiveSummary]) -> ArchiveSummary:
    return archive_factory(seed=16, collections=1, patients=2, studies=1, series=2, images=2,
                           awkward=False)


@pytest.fixture
def server(archive: ArchiveSummary,
           serve: Callable[..., ReferenceServer]) -> ReferenceServer:
    return serve(archive.root)


def python(script: str, *, tty: bool = False, timeout: float = 120) -> tuple[int, str]:
    """Run ``script`` in a fresh interpreter; (exit code, everything it printed)."""
    code = textwrap.dedent(script)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "100"}
    env.pop("NBIA_NO_PROGRESS", None)
    if not tty:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env)
        return done.returncode, done.stdout + done.stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=follower, stdout=follower,
                            stderr=follower, env=env, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout), b"".join(chunks).decode("utf-8", "replace")


def test_download_returns_a_report_with_a_one_line_repr_and_a_flat_dataframe(
        archive: ArchiveSummary, server: ReferenceServer, tmp_path: Path) -> None:
    code, out = python(f"""
        import json, nbia_retriever
        report = nbia_retriever.download({str(archive.root / "manifest.tcia")!r},
                                         {str(tmp_path)!r}, api_url={server.api_url!r},
                                         progress=False)
        print("REPR", repr(report))
        df = report.to_dataframe()
        cells = {{type(v).__name__ for v in df.to_numpy().ravel()}}
        print("FRAME", json.dumps({{"columns": list(df.columns), "rows": len(df),
                                    "cells": sorted(cells),
                                    "states": sorted(set(df["state"])),
                                    "folders": all(df["folder"].str.len() > 0)}}))
        report.raise_for_failures()
    """)
    assert code == 0, out
    lines = out.splitlines()
    assert [line for line in lines if not line.startswith(("REPR", "FRAME"))] == []  # no bar
    text = next(line for line in lines if line.startswith("REPR"))
    assert text.startswith("REPR <Report 4/4 complete, 0 failed") and len(text) < 100
    frame = json.loads(next(line for line in lines if line.startswith("FRAME"))[6:])
    for column in ("SeriesInstanceUID", "Collection", "PatientID", "StudyInstanceUID",
                   "Modality", "images", "bytes", "state", "error", "folder"):
        assert column in frame["columns"]
    assert frame["rows"] == 4 and frame["states"] == ["Complete"] and frame["folders"]
    assert not {"dict", "list", "tuple"} & set(frame["cells"])


def test_a_progress_bar_in_a_terminal_and_none_when_told(
        archive: ArchiveSummary, server: ReferenceServer, tmp_path: Path) -> None:
    script = """
        import nbia_retriever
        report = nbia_retriever.download({manifest!r}, {dest!r}, api_url={api!r}{extra})
        print("DONE", report.count("Complete"))
    """
    manifest, api = str(archive.root / "manifest.tcia"), server.api_url
    code, out = python(script.format(manifest=manifest, dest=str(tmp_path / "a"), api=api,
                                     extra=""), tty=True)
    assert code == 0, out
    assert "DONE 4" in out and "4/4 series" in out  # the bar, drawn on the terminal
    code, out = python(script.format(manifest=manifest, dest=str(tmp_path / "b"), api=api,
                                     extra=", progress=False"), tty=True)
    assert code == 0, out
    assert "DONE 4" in out and "series" not in out.replace("DONE", "")
    code, out = python(script.format(manifest=manifest, dest=str(tmp_path / "c"), api=api,
                                     extra=""))  # not a terminal: no bar unless asked
    assert code == 0 and out.strip() == "DONE 4", out


def test_failed_series_stay_in_the_report(archive: ArchiveSummary, server: ReferenceServer,
                                          tmp_path: Path) -> None:
    known = archive.series[0].series_uid
    code, out = python(f"""
        import nbia_retriever
        report = nbia_retriever.download([{known!r}, "1.2.3.4.5.6.7.8.9"], {str(tmp_path)!r},
                                         api_url={server.api_url!r}, retries=0,
                                         progress=False)
        print("FAILED", [r.uid for r in report.failed])
        try:
            report.raise_for_failures()
        except nbia_retriever.SeriesFailedError as exc:
            print("RAISED", isinstance(exc, nbia_retriever.NbiaError), len(exc.failed))
    """)
    assert code == 0, out
    assert "FAILED ['1.2.3.4.5.6.7.8.9']" in out and "RAISED True 1" in out


@pytest.mark.parametrize("case", ["manifest", "destination", "unreachable", "login"])
def test_what_stops_the_run_raises_an_nbia_error(case: str, archive: ArchiveSummary,
                                                 server: ReferenceServer,
                                                 tmp_path: Path) -> None:
    manifest = str(archive.root / "manifest.tcia")
    dest = str(tmp_path / "out")
    extra = f"api_url={server.api_url!r}"
    expected = {"manifest": "ManifestError", "destination": "DestinationError",
                "unreachable": "ServerUnreachableError", "login": "AuthError"}[case]
    if case == "manifest":
        bad = tmp_path / "bad.tcia"
        bad.write_text("downloadServerUrl=x\nListOfSeriesToDownload=\nnot a uid\n")
        manifest = str(bad)
    elif case == "destination":
        (tmp_path / "a-file").write_text("x")
        dest = str(tmp_path / "a-file")
    elif case == "unreachable":
        extra = "api_url='http://127.0.0.1:9/nbia-api/services'"
    else:
        extra += ", user='alice', password='wrong'"
    code, out = python(f"""
        import nbia_retriever
        try:
            nbia_retriever.download({manifest!r}, {dest!r}, {extra}, retries=0,
                                    progress=False)
        except nbia_retriever.NbiaError as exc:
            print("RAISED", type(exc).__name__, isinstance(exc, nbia_retriever.{expected}))
            print("MESSAGE", exc)
    """)
    assert code == 0, out
    assert f"RAISED {expected} True" in out, out
    assert "Traceback" not in out and "wrong" not in out
