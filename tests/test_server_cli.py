"""``serve_command``: the banner, a working server behind it, and clear errors."""

from __future__ import annotations

import socket

import httpx
from click.testing import CliRunner

from nbia_retriever.server import serve_command
from nbia_retriever.server.synth import ArchiveSummary
from reliability_helpers import banner_url, serving


def test_serve_prints_urls_and_serves_with_faults(synthetic_archive: ArchiveSummary):
    with serving([str(synthetic_archive.root), "--port", "0", "--faults", "http503=1",
                  "--seed", "4"]) as lines:
        banner = "\n".join(lines)
        assert f"{len(synthetic_archive.series)} series" in banner
        api = banner_url(lines, "API:")
        manifest_url = banner_url(lines, "Manifest:")
        assert "http503=1" in banner
        with httpx.Client(timeout=10) as http:
            assert http.get(api + "/v1/getCollectionValues").status_code == 200
            uid = http.get(api + "/v1/getSeries").json()[0]["SeriesInstanceUID"]
            assert http.get(api + "/v1/getImage",
                            params={"SeriesInstanceUID": uid}).status_code == 503
            assert "ListOfSeriesToDownload=" in http.get(manifest_url).text


def test_serve_rejects_a_bad_fault_spec(synthetic_archive: ArchiveSummary):
    result = CliRunner().invoke(serve_command, [str(synthetic_archive.root), "--faults",
                                                "reset=2"])
    assert result.exit_code == 2
    assert "between 0 and 1" in result.output
    assert "Traceback" not in result.output


def test_serve_reports_a_busy_port(synthetic_archive: ArchiveSummary):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            serve_command, [str(synthetic_archive.root), "--port", str(port)])
    assert result.exit_code == 1
    assert "cannot listen" in result.output
