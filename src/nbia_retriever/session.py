"""Who a run talks to, decided once: the server, the one host policy, the credentials,
the clients, the source.

Every front end (the CLI commands, the view and its web form, the Python API) opens one
:class:`Session` and hands it to what it drives (an
:class:`~nbia_retriever.engine.Engine`, a search, a verification). So the questions "which
server?", "may this host see the password?" and "with which timeout and TLS setting?" are
answered here and nowhere else: nothing outside this module resolves a server URL or
builds a :class:`~nbia_retriever.api.HostPolicy` (``tests/test_session.py`` scans ``src/``
for it).

The server: ``--api-url`` (the user's choice), else the manifest's ``downloadServerUrl``
(the manifest's claim, which is not a choice: no password goes there unless the user's
config trusts it or the user says yes when asked), else public TCIA.

Opening a session does no I/O: the user's config file is read when the policy is first
needed (a client, a login check), so a run that never logs in never reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import NbiaError, UsageError
from .manifest import Manifest, api_base_from_download_url, ascii_url

if TYPE_CHECKING:
    from .api import Credentials, HostPolicy, NbiaClient
    from .engine.options import DownloadOptions
    from .engine.source import Source

__all__ = ["Session", "check_api_url", "host_policy", "open_session", "resolve_server",
           "session_for"]


def check_api_url(api_url: str | None) -> None:
    """A malformed ``--api-url`` (``ftp://``, no host, bad port) is a :class:`UsageError`
    naming the option, raised before anything else happens."""
    if not api_url:
        return
    try:
        api_base_from_download_url(api_url)
    except NbiaError as exc:
        raise UsageError(str(exc).replace("download server URL", "--api-url")) from None


def resolve_server(manifest: Manifest | None, api_url: str | None) -> str:
    """The services root a run talks to: ``--api-url``, else the manifest's server, else
    public TCIA. A malformed URL is a :class:`UsageError` naming where it came from."""
    if api_url:
        check_api_url(api_url)
        return ascii_url(api_url)  # shown in messages: a lookalike host as the xn-- it is
    if manifest is not None and manifest.download_server_url:
        try:
            return api_base_from_download_url(manifest.download_server_url)
        except NbiaError as exc:
            raise UsageError(f"{manifest.source or 'the manifest'}: {exc}") from None
    from .api import DEFAULT_API_URL  # the HTTP stack only once a server is resolved

    return DEFAULT_API_URL


def host_policy(*, chosen: str | None = None, trusted_hosts: Iterable[str] = (),
                confirm: Callable[[str], bool] | None = None) -> HostPolicy:
    """The one place a :class:`~nbia_retriever.api.HostPolicy` is built: the URL the
    user chose, the hosts they trust (``trusted_hosts`` and their config file's), and
    who to ask about any other host (None: nobody, the answer is no)."""
    from .api import HostPolicy  # the HTTP stack (35 ms) only once it is used
    from .config import load_user_config

    config = load_user_config()
    return HostPolicy(chosen=[chosen] if chosen else [],
                      trusted_hosts=(*trusted_hosts, *config.trusted_hosts),
                      confirm=confirm, config_path=config.path)


@dataclass
class Session:
    """The answers of one front end: the server (``api_url``), what the user chose
    (``chosen``), the credentials, the client settings; :attr:`policy` and
    :meth:`open_client` derive from them. ``client``: a caller's own client, which
    :meth:`open_client` hands out instead of a new one."""

    api_url: str
    chosen: str | None = None
    credentials: Credentials | None = None
    version: str = "auto"
    timeout: float = 60.0
    verify: bool = True
    backoff_base: float = 1.0
    trusted_hosts: tuple[str, ...] = ()
    confirm: Callable[[str], bool] | None = None
    client: NbiaClient | None = None
    _policy: HostPolicy | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def policy(self) -> HostPolicy:
        """The host policy of every client of this session (built once, on first use:
        it reads the user's config file, and remembers the hosts the user confirmed)."""
        with self._lock:
            if self._policy is None:
                self._policy = host_policy(chosen=self.chosen, trusted_hosts=self.trusted_hosts,
                                           confirm=self.confirm)
            return self._policy

    @property
    def host(self) -> str:
        """The server's host as passwords are filed under it (keyring entries, prompts):
        its ASCII (xn--) form, IPv6 in brackets."""
        from .api import Origin  # the HTTP stack only once it is used

        return Origin.of(self.api_url).label

    def check_login(self, user: str) -> tuple[str, ...]:
        """Raise :class:`~nbia_retriever.errors.UntrustedHostError` unless ``user``'s
        password may go to this server's login (asking, if the session can ask), before
        any password is asked for; the hosts trusted now."""
        from .api import token_url_for  # the HTTP stack only once it is used

        self.policy.check(token_url_for(self.api_url), user)
        return self.policy.trusted_hosts

    def open_client(self) -> NbiaClient:
        """A client of this server (the caller's own when the session was given one);
        the caller closes it."""
        if self.client is not None:
            return self.client
        from .api import NbiaClient  # the HTTP stack only once it is used

        return NbiaClient(self.api_url, version=self.version, credentials=self.credentials,
                          timeout=self.timeout, verify=self.verify,
                          backoff_base=self.backoff_base, policy=self.policy)

    def source(self, options: DownloadOptions) -> Source:
        """The source ``options.source`` names, built by its registry entry."""
        from .engine.source import make_source  # the engine only when a run is built

        return make_source(options.source, self, options)


def open_session(manifest: Manifest | None = None, *, api_url: str | None = None,
                 credentials: Credentials | None = None, version: str = "auto",
                 timeout: float = 60.0, verify: bool = True, backoff_base: float = 1.0,
                 trusted_hosts: Iterable[str] = (),
                 confirm: Callable[[str], bool] | None = None,
                 client: NbiaClient | None = None) -> Session:
    """Resolve the server of ``manifest`` (``api_url`` first) and open a session on it;
    a malformed URL is a :class:`UsageError`. No I/O."""
    return Session(api_url=resolve_server(manifest, api_url), chosen=api_url or None,
                   credentials=credentials, version=version, timeout=timeout, verify=verify,
                   backoff_base=backoff_base, trusted_hosts=tuple(trusted_hosts),
                   confirm=confirm, client=client)


def session_for(manifest: Manifest | None, options: DownloadOptions, *,
                confirm: Callable[[str], bool] | None = None,
                client: NbiaClient | None = None) -> Session:
    """The session a download run's options describe."""
    return open_session(manifest, api_url=options.api_url, credentials=options.credentials,
                        version=options.api, timeout=options.timeout,
                        verify=options.verify_tls,
                        backoff_base=min(options.backoff_base, 1.0),
                        trusted_hosts=options.trusted_hosts, confirm=confirm, client=client)
