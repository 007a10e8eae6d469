"""Hostile review of the IDC source (issue 23): defects found, each an xfail(strict) test
that passes once fixed. Faults come from real inputs over the real CLI."""

from __future__ import annotations

from pathlib import Path

from reliability_helpers import run_cli


def test_a_rejected_idc_endpoint_does_not_echo_its_password(tmp_path: Path) -> None:
    manifest = tmp_path / "m.tcia"
    manifest.write_text("downloadServerUrl=http://127.0.0.1:9/x\nListOfSeriesToDownload=\n"
                        "1.2.3.4\n", encoding="utf-8")
    done = run_cli(["download", str(manifest), "-d", str(tmp_path / "out"), "--quiet",
                    "--source", "idc", "--idc-endpoint", "http://user:s3cr3t@127.0.0.1:9"])
    assert done.returncode == 2, done.stderr
    assert "--idc-endpoint" in done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr
