"""The session (``nbia_retriever.session``): the one place that resolves the server and
builds the host policy; front ends open one and hand it to what they drive."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from enginehelpers import write_manifest
from nbia_retriever.api import DEFAULT_API_URL
from nbia_retriever.config import ENV_CONFIG
from nbia_retriever.engine import DownloadOptions, Engine
from nbia_retriever.errors import UntrustedHostError, UsageError
from nbia_retriever.manifest import Manifest, read_manifest
from nbia_retriever.server import ReferenceServer
from nbia_retriever.server.synth import ArchiveSummary
from nbia_retriever.session import open_session, session_for

SRC = Path(__file__).resolve().parent.parent / "src" / "nbia_retriever"


def _calls(name: str) -> dict[str, list[str]]:
    """module (relative to the package) -> the functions in it that call ``name(...)``."""
    found: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for func in [n for n in ast.walk(tree)
                     if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]:
            for node in ast.walk(func):
                if isinstance(node, ast.Call) and (
                        (isinstance(node.func, ast.Name) and node.func.id == name)
                        or (isinstance(node.func, ast.Attribute) and node.func.attr == name)):
                    found.setdefault(str(path.relative_to(SRC)), []).append(func.name)
    return found


def test_only_the_session_builds_a_host_policy() -> None:
    """Outside ``api/`` (the class's package, whose clients default to a policy of their
    own for callers without a session) and the reference server, only the session
    module constructs a HostPolicy."""
    calls = {module: funcs for module, funcs in _calls("HostPolicy").items()
             if not module.startswith(("api/", "server/"))}
    assert calls == {"session.py": ["host_policy"]}


def test_only_the_session_resolves_a_server_url() -> None:
    """The manifest's download URL becomes a server in the session only (``search``
    compares two manifests' servers to merge them: no server is chosen there)."""
    calls = {module: funcs for module, funcs in _calls("api_base_from_download_url").items()
             if not module.startswith("server/")}
    assert calls == {"session.py": ["check_api_url", "resolve_server"],
                     "search.py": ["_server_key"]}


def _manifest(url: str) -> Manifest:
    return Manifest(series_uids=("1.2.3",), headers={"downloadServerUrl": url},
                    source="cart.tcia", duplicates_dropped=0)


def test_the_server_is_the_users_choice_else_the_manifests_else_public_tcia() -> None:
    cart = _manifest("https://nbia.example.org/nbia-download/servlet/DownloadServlet")
    assert open_session(cart).api_url.rstrip("/") == "https://nbia.example.org/nbia-api/services"
    assert open_session(cart).chosen is None  # the manifest's claim is not a choice
    chosen = open_session(cart, api_url="https://mine.example.org/nbia-api/services")
    assert chosen.api_url == chosen.chosen == "https://mine.example.org/nbia-api/services"
    assert open_session(None).api_url == DEFAULT_API_URL
    with pytest.raises(UsageError, match="--api-url"):
        open_session(cart, api_url="ftp://x.example.org/")
    with pytest.raises(UsageError, match=r"cart\.tcia"):
        open_session(_manifest("ftp://nowhere/"))


def test_opening_a_session_reads_nothing_and_its_policy_is_built_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "config.toml"
    config.write_text("trusted_hosts = [")  # broken: read only when the policy is needed
    monkeypatch.setenv(ENV_CONFIG, str(config))
    session = open_session(_manifest("https://nbia.example.org/nbia-download/servlet/x"))
    with pytest.raises(UsageError):
        session.policy  # noqa: B018
    config.write_text('trusted_hosts = ["nbia.example.org"]\n')
    assert session.policy is session.policy
    assert session.check_login("alice") == ("nbia.example.org",)
    other = open_session(_manifest("https://evil.example.org/nbia-download/servlet/x"))
    with pytest.raises(UntrustedHostError, match=r"evil\.example\.org"):
        other.check_login("alice")


def test_an_engine_downloads_through_the_session_it_is_handed(
        tmp_path: Path, synthetic_archive: ArchiveSummary, server: ReferenceServer) -> None:
    public = [s.series_uid for s in synthetic_archive.series if not s.restricted][:2]
    cart = read_manifest(write_manifest(tmp_path / "cart.tcia", public, server.download_url))
    options = DownloadOptions(processes=0)
    session = session_for(cart, options)
    assert session.api_url.rstrip("/") == server.api_url
    engine = Engine(cart, tmp_path / "dest", options, session=session)
    assert engine.session is session and engine.api_url == session.api_url
    report = engine.run()
    assert report.ok and len(report.results) == 2, report.summary()
