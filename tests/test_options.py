"""One declaration of the download options (:class:`DownloadOptions`), and what is derived
from it: the flags of ``download`` and ``open`` (and the connection flags of every
command that talks to a server), the web view's child command line, and the Python
API's typed keyword parameters, which mypy checks.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import Field, fields
from pathlib import Path
from typing import Any

import click
import pytest

import nbia_retriever
from nbia_retriever.api import Credentials
from nbia_retriever.cli import main
from nbia_retriever.cli.options import Command, flagged, options_from_params, to_argv
from nbia_retriever.engine import run as engine_run
from nbia_retriever.engine.options import DownloadKwargs, DownloadOptions, Flag
from nbia_retriever.engine.source import Source

#: What each command declares itself, besides the download options (``--proxy`` is set
#: for the process as it is parsed, never a parameter: see ``cli.options.apply_proxy``).
OWN = {
    "download": {"manifest", "dest", "error_report", "quiet", "as_json", "user", "proxy"},
    "open": {"manifest", "dest", "user", "web", "host", "port", "public_url", "proxy"},
}


def command(name: str) -> click.Command:
    found = main.get_command(click.Context(main), name)
    assert found is not None, name
    return found


def params(name: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in command(name).params if p.name}


def described(param: click.Parameter) -> dict[str, Any]:
    """What a user sees of a flag: names, default, help, type, visibility."""
    assert isinstance(param, click.Option)
    return {"opts": param.opts, "secondary": param.secondary_opts, "default": param.default,
            "help": param.help, "type": param.type.to_info_dict(), "hidden": param.hidden,
            "show_default": param.show_default, "is_flag": param.is_flag,
            "metavar": param.metavar}


def parse(name: str, argv: list[str]) -> tuple[DownloadOptions, dict[str, Any]]:
    """The options ``name`` makes of ``argv`` (and its other parameters)."""
    ctx = command(name).make_context(name, [*argv, "m.tcia"])
    rest = dict(ctx.params)
    return DownloadOptions(**options_from_params(rest)), rest


def non_default(option: Field[Any], how: Flag) -> Any:
    """A value other than the default that the flag can say (found from the declaration,
    so a new field is covered without touching this test)."""
    if how.kind == "switch":
        return not option.default
    if how.kind == "choice":
        return next(c for c in how.choices if c != option.default)
    if how.kind == "shard":
        return (2, 3)
    if how.kind == "text":
        return "http://127.0.0.1:9/nbia-api/services"
    base = int(how.low or 0) + 1
    value = base if base != option.default else base + 1
    return value + 0.25 if how.kind == "float" else value


def changed(command_name: Command) -> DownloadOptions:
    """Every option that ``command_name`` has a flag for set to a value not its default."""
    values = {o.name: non_default(o, h) for connection in (False, True)
              for o, h in flagged(connection=connection, command=command_name)}
    return DownloadOptions(**values)


# -- the flags ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["download", "open"])
def test_the_flags_are_the_declared_fields(name: Command) -> None:
    """Nothing but the declaration makes a download flag: every parameter of the command
    is either its own (manifest, destination, output) or a flagged field, shown exactly as
    the field declares it."""
    found = params(name)
    declared = {h.name: (o, h) for connection in (False, True)
                for o, h in flagged(connection=connection, command=name)}
    assert set(found) == OWN[name] | set(declared)
    for param_name, (option, how) in declared.items():
        seen = described(found[param_name])
        assert seen["opts"] == list(how.decls) and seen["help"] == how.help
        assert seen["hidden"] == how.hidden
        if how.kind == "switch":
            assert seen["is_flag"] and option.default is how.negate
        else:
            assert seen["default"] in (option.default, getattr(option.default, "value", None))


def test_download_and_open_share_flags_and_defaults() -> None:
    """``open`` has every download flag but the download-only ones, the same in every
    respect; its workers adapt like ``download``'s (it used to run 4)."""
    download, opened = params("download"), params("open")
    shared = set(download) & set(opened) - {"manifest", "dest"}
    only_download = {h.name for o, h in flagged(connection=False) if h.download_only}
    assert only_download == {"only_failed", "shard"}
    assert set(download) - set(opened) == only_download | {"error_report", "quiet", "as_json"}
    assert {"workers", "max_connections", "timeout", "api", "insecure", "user"} <= shared
    for param_name in shared:
        assert described(download[param_name]) == described(opened[param_name]), param_name
    assert parse("open", [])[0] == parse("download", [])[0] == DownloadOptions()
    assert parse("open", [])[0].workers is None


def test_the_connection_flags_are_the_same_on_every_command() -> None:
    """``--timeout`` (and ``--api``, ``--insecure``) is declared once: every command that
    talks to a server shows the same flag."""
    download = params("download")
    for name in ("list", "verify", "collections", "search", "open"):
        other = params(name)
        for param_name in ("api", "api_url", "user", "insecure", "timeout"):
            mine, theirs = described(download[param_name]), described(other[param_name])
            if name in ("collections", "search") and param_name == "api_url":
                mine.pop("help"), theirs.pop("help")  # names the default server instead
            assert mine == theirs, (name, param_name)


def test_the_layout_choices_are_the_layouts() -> None:
    from nbia_retriever.engine.options import LAYOUT_CHOICES
    from nbia_retriever.layout import Layout

    assert tuple(kind.value for kind in Layout) == LAYOUT_CHOICES
    assert DownloadOptions().layout is Layout.DESCRIPTIVE


def test_a_bad_shard_names_the_flag() -> None:
    for value, why in (("x", "use K/N"), ("4/3", "K must be between 1 and N")):
        with pytest.raises(click.BadParameter) as caught:
            parse("download", ["--shard", value])
        assert why in caught.value.format_message() and "--shard" in caught.value.format_message()


# -- options -> argv -> options -----------------------------------------------------------


@pytest.mark.parametrize("name", ["download", "open"])
def test_options_written_as_flags_parse_back_to_the_same_options(name: Command) -> None:
    options = changed(name)
    argv = to_argv(options, name)
    assert parse(name, argv)[0] == options
    assert to_argv(DownloadOptions(), name) == []  # defaults: no flags
    if name == "open":
        with pytest.raises(ValueError, match="shard"):
            to_argv(DownloadOptions(shard=(1, 2)), "open")


def test_the_web_child_runs_open_with_the_same_options(tmp_path: Path) -> None:
    pytest.importorskip("textual_serve")
    from nbia_retriever.tui.web import child_argv

    options = changed("open")
    options.credentials = Credentials("bob", "pw-never-on-argv")
    argv = child_argv(str(tmp_path / "m.tcia"), dest="out dir", options=options, user="bob")
    assert argv[1:5] == ["-P", "-m", "nbia_retriever.cli", "open"]
    assert not any("pw-never" in word for word in argv)
    assert argv[-2:] == ["--", str(tmp_path / "m.tcia")]
    ctx = command("open").make_context("open", argv[5:])
    rest = dict(ctx.params)
    parsed = DownloadOptions(**options_from_params(rest))
    options.credentials = None  # the child finds or asks the password itself
    assert parsed == options
    assert rest["user"] == "bob" and rest["dest"] == os.path.abspath("out dir")
    default = child_argv("m.tcia", dest=".", options=DownloadOptions(), user=None)
    assert "--workers" not in default  # the view adapts, as download does


# -- the Python API -----------------------------------------------------------------------


def test_the_keyword_parameters_are_the_fields() -> None:
    """:class:`DownloadKwargs` (what mypy checks a call against) has every field of
    :class:`DownloadOptions`, type for type; its defaults are the dataclass's alone."""
    from nbia_retriever.layout import Layout

    names = {"Credentials": Credentials, "Source": Source, "Callable": Callable,
             "Layout": Layout}
    field_types = typing.get_type_hints(DownloadOptions, localns=names)
    kwarg_types = typing.get_type_hints(DownloadKwargs, localns=names)
    assert not DownloadKwargs.__required_keys__
    assert set(kwarg_types) == {f.name for f in fields(DownloadOptions)} | {
        "user", "password", "confirm_host"}
    for option in fields(DownloadOptions):
        expected = field_types[option.name]
        if option.name == "source":  # a name, or a Source object in its place
            expected = expected | Source
        assert kwarg_types[option.name] == expected, option.name


@pytest.mark.parametrize("function", [nbia_retriever.download, nbia_retriever.make_engine,
                                      engine_run.make_engine])
def test_the_api_signature_is_typed(function: Callable[..., Any]) -> None:
    signature = inspect.signature(function)
    *named, options = signature.parameters.values()
    assert [p.name for p in named][:2] == ["manifest", "dest"]
    assert all(p.kind is not p.VAR_KEYWORD for p in named)
    assert options.kind is options.VAR_KEYWORD
    assert options.annotation == "Unpack[DownloadKwargs]"
    assert signature.return_annotation in ("Report", "Engine")


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="needs mypy")
def test_mypy_checks_a_call(tmp_path: Path) -> None:
    """A wrong type or a misspelt name is a mypy error; a good call is not."""
    snippet = tmp_path / "call.py"
    snippet.write_text(
        "from nbia_retriever import download, make_engine\n"
        "download('m.tcia', workers='x')\n"  # 2
        "download('m.tcia', 'dest', worker=3)\n"  # 3
        "make_engine('m.tcia', timeout='60')\n"  # 4
        "report = download(['1.2'], 'dest', workers=4, timeout=30.0, layout='classic',\n"
        "                  user='a', password='b', progress=False, shard=(1, 2))\n"
        "reveal_type(report)\n")  # 7
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
                           str(snippet)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    lines = done.stdout.splitlines()
    errors = {int(line.split(":")[1]) for line in lines if ": error:" in line}
    assert errors == {2, 3, 4}, done.stdout
    assert any('"workers"' in line and '"int | None"' in line for line in lines)
    assert any('"worker"' in line for line in lines)
    assert any("Revealed type is \"nbia_retriever.report.Report\"" in line for line in lines)
