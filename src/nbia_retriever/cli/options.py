"""The download options as click flags, and back, derived from their one declaration.

Every flag here is built from a field of
:class:`~nbia_retriever.engine.options.DownloadOptions` (its :class:`Flag` metadata: names,
help, bounds; its default): ``download`` and ``open`` carry the same flags with the same
defaults, every command that talks to a server the same connection flags, and the web
view's child command line is an options value written back as those flags
(:func:`to_argv`), which parse to the same value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import MISSING, Field, fields
from typing import Any, Literal, TypeVar

import click

from ..engine.options import DownloadOptions, Flag, flag_of

F = TypeVar("F", bound=Callable[..., Any])

#: The commands that take the download options (``open`` lacks the ``download_only`` ones).
Command = Literal["download", "open"]

USER_HELP = ("Log in for limited-access collections (password: NBIA_PASSWORD, keyring, or "
             "prompt). Sent only to TCIA hosts, --api-url, or a trusted_hosts entry of your "
             "config file.")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """``--shard K/N`` as ``(k, n)`` (1 <= k <= n); a click usage error otherwise."""
    if not value:
        return None
    try:
        k_text, n_text = value.split("/", 1)
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise click.BadParameter("use K/N, e.g. 3/10") from None
    if not (n >= 1 and 1 <= k <= n):
        raise click.BadParameter("K must be between 1 and N")
    return k, n


class ShardType(click.ParamType):  # type: ignore[type-arg]  # generic in click 8.2+ only
    """``K/N`` on the command line, ``(k, n)`` in :class:`DownloadOptions`."""

    name = "K/N"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            return parse_shard(value)
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


def flagged(*, connection: bool, command: Command = "download",
            ) -> Iterator[tuple[Field[Any], Flag]]:
    """The fields with a flag (in declaration order): the connection ones, or the others
    that ``command`` takes."""
    for option in fields(DownloadOptions):
        how = flag_of(option)
        if how is None or how.connection != connection:
            continue
        if how.download_only and command != "download":
            continue
        yield option, how


def default_of(option: Field[Any], how: Flag) -> Any:
    """The flag's default: the field's, as the command line spells it."""
    assert option.default is not MISSING, f"{option.name}: a flag needs a default"
    if how.kind == "switch":
        assert option.default is how.negate, f"{option.name}: a switch sets what is not default"
        return False
    return option.default


def click_option(option: Field[Any], how: Flag) -> Callable[[F], F]:
    """The click option of one field."""
    kinds: dict[str, Any] = {
        "int": lambda: click.IntRange(None if how.low is None else int(how.low),
                                      None if how.high is None else int(how.high)),
        "float": lambda: click.FloatRange(how.low, how.high, min_open=how.low_open),
        "choice": lambda: click.Choice(how.choices),
        "shard": ShardType,
        "text": lambda: None,
    }
    default = default_of(option, how)
    extra: dict[str, Any] = ({"is_flag": True} if how.kind == "switch"
                             else {"type": kinds[how.kind](), "default": default})
    if how.show_default:
        extra["show_default"] = True
    if how.env:
        extra["envvar"] = how.env
    return click.option(*how.decls, how.name, help=how.help, hidden=how.hidden,
                        metavar=how.metavar, **extra)


def _apply(func: F, decorators: list[Callable[[F], F]]) -> F:
    for decorator in reversed(decorators):  # the first declared is listed first in --help
        func = decorator(func)
    return func


def download_flags(command: Command) -> Callable[[F], F]:
    """The flags of ``command`` that set how it downloads (``--workers``, ``--layout``...)."""
    def decorate(func: F) -> F:
        return _apply(func, [click_option(o, h) for o, h in flagged(connection=False,
                                                                    command=command)])
    return decorate


PROXY_HELP = ("Send every request through this proxy: http://, https://, socks5:// or "
              "socks5h://[USER:PASSWORD@]HOST:PORT (env NBIA_PROXY; else the config file's "
              "proxy; else HTTPS_PROXY/HTTP_PROXY). Its password is never shown; with one, "
              "prefer NBIA_PROXY: other users of the machine can read a command line.")


def apply_proxy(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    """``--proxy`` (or ``NBIA_PROXY``, else the config file's ``proxy``), set for this
    process and its children (:func:`~nbia_retriever.api.http.use_proxy`) as soon as it
    is parsed: every command that talks to a server, and the child processes it starts,
    use it without the command passing it on; a bad URL is exit 2, naming it without
    its password."""
    if ctx.resilient_parsing:  # shell completion: nothing is run
        return
    # (not cli.common's fail(): common imports this module; the same one line, exit 2)
    from ..errors import EXIT_USAGE, UsageError
    from ..untrusted import plain

    if not value:
        from ..config import load_user_config  # only without --proxy/NBIA_PROXY

        # A config file that cannot be read is reported by what reads it for its trusted
        # hosts (commands that log in); a local ``verify`` has no use for it.
        with contextlib.suppress(UsageError):
            value = load_user_config().proxy
    try:
        if value:
            from ..api.http import use_proxy  # only when a proxy is asked for

            use_proxy(value)
    except UsageError as exc:
        click.echo(f"nbia-retriever: error: --proxy: {plain(str(exc))}", err=True)
        ctx.exit(EXIT_USAGE)


def connection_flags(func: F) -> F:
    """``--api``, ``--api-url``, ``--user``, ``--insecure``, ``--timeout``, ``--proxy``:
    every command that talks to a server."""
    options: list[Callable[[F], F]] = [click_option(o, h) for o, h in flagged(connection=True)]
    # Not a field (it becomes ``credentials`` once the password is found): after --api-url.
    user = click.option("--user", metavar="NAME", help=USER_HELP)
    # Not a flagged field: it is set for the process (and its children, through the
    # environment) when parsed, so that it is never written on a child's command line
    # (to_argv) and no command needs a parameter for it.
    proxy = click.option("--proxy", metavar="URL", help=PROXY_HELP, envvar="NBIA_PROXY",
                         expose_value=False, callback=apply_proxy)
    at = next(i for i, (o, _) in enumerate(flagged(connection=True)) if o.name == "api_url")
    return _apply(func, [*options[:at + 1], user, *options[at + 1:], proxy])


def options_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """Take every flag's value out of a command's ``params``: the matching
    :class:`DownloadOptions` keyword arguments (``--no-md5`` becomes ``md5=False``)."""
    values: dict[str, Any] = {}
    for option in fields(DownloadOptions):
        how = flag_of(option)
        if how is not None and how.name in params:
            value = params.pop(how.name)
            values[option.name] = not value if how.negate else value
    return values


def to_argv(options: DownloadOptions, command: Command = "open") -> list[str]:
    """The flags that make ``command`` parse back to ``options`` (those that differ from
    the defaults; fields without a flag, credentials among them, are never written)."""
    argv: list[str] = []
    for connection in (False, True):
        for option, how in flagged(connection=connection, command="download"):
            value = getattr(options, option.name)
            if value == option.default:
                continue
            if how.download_only and command != "download":
                raise ValueError(f"{option.name}: not an option of {command}")
            name = max(how.decls, key=len)
            if how.kind == "switch":
                argv.append(name)
            elif how.kind == "shard":
                argv += [name, "/".join(map(str, value))]
            else:
                argv += [name, str(value)]
    return argv
