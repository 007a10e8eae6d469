"""Everything a run can be told, declared once; the defaults are what a user gets without
flags.

:class:`DownloadOptions` is the one declaration of the download options: each field's
type, its default and, in its metadata, the :class:`Flag` that sets it on the command
line. Everything else is derived from it, so that a new option is one field here (and its
line in :class:`DownloadKwargs`) and no front end can drift from another:

* the flags of ``download`` and ``open``, and the connection flags (``--api``,
  ``--api-url``, ``--insecure``, ``--timeout``) of every command that talks to a server
  (:mod:`nbia_retriever.cli.options`);
* the web view's child command line, which is an options value written back as flags
  (:func:`nbia_retriever.cli.options.to_argv`);
* the keyword parameters of :func:`nbia_retriever.download` and ``make_engine``
  (:class:`DownloadKwargs`, which mypy checks; a test holds it equal to the fields).

No click here: the engine is imported where click is not (a notebook, a worker).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, TypedDict

from ..errors import UsageError

if TYPE_CHECKING:
    from ..api import Credentials
    from ..layout import Layout
    from .source import Source

#: Polite ceiling on concurrent series streams to one host (``--max-connections``).
DEFAULT_MAX_CONNECTIONS = 16
API_CHOICES = ("auto", "v1", "v2", "v4")
#: The values of :class:`~nbia_retriever.layout.Layout` (a test holds them equal), spelled
#: out: the flags are built without importing ``layout`` (10 ms of a command's start-up).
LAYOUT_CHOICES = ("descriptive", "classic")
#: The sources a user picks by name (the registry may hold more: tests add theirs).
SOURCE_CHOICES = ("auto", "nbia", "idc")
#: Concurrent series streams to IDC's buckets when ``--max-connections`` is left at its
#: default: object storage is not a 16-connection server.
IDC_MAX_STREAMS = 64
#: ... and where such a run starts: an IDC series is often one request (a mammogram) or
#: a few, so 4 streams at first left a 2,000-series run waiting on round trips while
#: the controller doubled its way up (S3 serves many at once).
IDC_START_STREAMS = 16

#: What a flag takes: a bounded number, one of ``choices``, nothing (a switch), any text,
#: or ``K/N`` (a shard).
FlagKind = Literal["int", "float", "choice", "switch", "text", "shard"]


@dataclass(frozen=True)
class Flag:
    """How one option is spelled on the command line (plain data, read by ``cli.options``)."""

    decls: tuple[str, ...]
    help: str
    kind: FlagKind
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    #: The command's parameter name when it is not the field's (``--insecure``: insecure).
    param: str | None = None
    #: A switch that turns the field off (``--no-md5`` sets ``md5=False``).
    negate: bool = False
    metavar: str | None = None
    show_default: bool = False
    hidden: bool = False
    #: Also a flag of every other command that talks to a server (``list``, ``search``...).
    connection: bool = False
    #: Not a flag of ``open``: the view has its own way to do it (``f`` retries the failed
    #: series) or no use for it (shards are for cluster job arrays).
    download_only: bool = False
    #: The environment variable that sets it when the flag is not given.
    env: str | None = None

    @property
    def name(self) -> str:
        """The command's parameter name (click's, from the longest declaration)."""
        return self.param or max(self.decls, key=len).lstrip("-").replace("-", "_")


def flag(*decls: str, help: str, kind: FlagKind, **how: Any) -> dict[str, Flag]:
    """A field's metadata naming its flag."""
    return {"flag": Flag(decls, help, kind, **how)}


def flag_of(option: Field[Any]) -> Flag | None:
    """The flag that sets a field of :class:`DownloadOptions`; None: Python API only."""
    found = option.metadata.get("flag")
    return found if isinstance(found, Flag) else None


@dataclass
class DownloadOptions:
    """The settings of one run (the CLI's flags, the Python API's keyword arguments).

    ``workers=None`` (the default) lets the scheduler find the number of concurrent
    streams the link needs, between 1 and ``max_connections``; a number pins it.
    ``trusted_hosts`` are hosts the user has chosen besides the known TCIA ones and the
    host of ``api_url``: only those ever see a password or token.
    """

    workers: int | None = field(default=None, metadata=flag(
        "-w", "--workers", kind="int", low=1, high=64,
        help="Pin the number of series downloaded at once (default: found at run "
             "time, up to --max-connections)."))
    max_connections: int = field(default=DEFAULT_MAX_CONNECTIONS, metadata=flag(
        "--max-connections", kind="int", low=1, high=64, show_default=True,
        help="Most concurrent series streams to one server; the number also halves "
             "by itself when the server answers 429/503 and recovers after."))
    #: Worker processes that stream and stage series (None: one per core but one, see
    #: ``engine.procs``); 0 keeps every stream on threads of this process.
    processes: int | None = field(default=None, metadata=flag(
        "--processes", kind="int", low=0, high=64,
        help="Worker processes that stream and unpack series (default: one per core but "
             "one; 0: threads of this process only)."))
    retries: int | None = field(default=None, metadata=flag(  # None: noOfrRetry, else 4
        "--retries", kind="int", low=0, high=100,
        help="Retries per series (default: the manifest's noOfrRetry, else 4)."))
    layout: Layout | str = field(default="descriptive", metadata=flag(  # a Layout after init
        "--layout", kind="choice", choices=LAYOUT_CHOICES, show_default=True,
        help="Folder layout below Collection/Patient."))
    md5: bool = field(default=True, metadata=flag(
        "--no-md5", kind="switch", negate=True, help="Do not ask for or check MD5 hashes."))
    only_failed: bool = field(default=False, metadata=flag(
        "--only-failed", kind="switch", download_only=True,
        help="Retry only the series that failed in an earlier run."))
    shard: tuple[int, int] | None = field(default=None, metadata=flag(  # (k, n), 1-based k
        "--shard", kind="shard", metavar="K/N", download_only=True,
        help="Download only part K of N (cluster job arrays)."))
    backoff_base: float = field(default=2.0, metadata=flag(
        "--backoff", kind="float", low=0, show_default=True, hidden=True,
        help="Base of the exponential retry backoff, seconds."))
    api: str = field(default="auto", metadata=flag(
        "--api", kind="choice", choices=API_CHOICES, show_default=True, connection=True,
        help="API version (auto: v4, v1 if absent, v2 if logged in)."))
    api_url: str | None = field(default=None, metadata=flag(  # None: the manifest's server
        "--api-url", kind="text", metavar="URL", connection=True,
        help="Services root, e.g. https://nbia.example.org/nbia-api/services "
             "(default: from the manifest's downloadServerUrl). A server you name "
             "here may receive your password."))
    verify_tls: bool = field(default=True, metadata=flag(
        "--insecure", kind="switch", negate=True, connection=True,
        help="Do not verify TLS certificates (unsafe)."))
    #: Seconds in which an attempt must move at least a few bytes.
    timeout: float = field(default=60.0, metadata=flag(
        "--timeout", kind="float", low=0, low_open=True, show_default=True, connection=True,
        help="Seconds in which an attempt must receive data; a server sending "
             "under 2 KiB/s on average over any such window is cut off too."))
    credentials: Credentials | None = None
    adaptive: bool = True  # halve concurrency on 429/503, creep back up on success
    trusted_hosts: tuple[str, ...] = ()
    #: Every request through this proxy (``http://``, ``https://``, ``socks5://``,
    #: ``socks5h://``; a password in it is a secret): for the whole process and the
    #: processes it starts (``api.http.use_proxy``). Not a flag of this declaration: the
    #: commands' ``--proxy`` is applied as it is parsed (``cli.options.apply_proxy``), so
    #: it is never written on a child's command line.
    proxy: str | None = None
    #: Where series come from: a name in the source registry (``engine.source.SOURCES``).
    source: str = field(default="auto", metadata=flag(
        "--source", kind="choice", choices=SOURCE_CHOICES, show_default=True,
        help="Where series come from: auto (IDC's public buckets for the series IDC's "
             "index holds, the manifest's NBIA server for the rest), nbia, or idc "
             "(env NBIA_SOURCE).",
        env="NBIA_SOURCE"))
    idc_index: str | None = field(default=None, metadata=flag(
        "--idc-index", kind="text", metavar="DIR",
        help="Folder with IDC's idc_index.parquet, collections_index.parquet and "
             "prior_versions_index.parquet (env NBIA_IDC_INDEX; default: the installed "
             "idc-index-data package)."))  # the env is read where the index is opened
    idc_endpoint: str | None = field(default=None, metadata=flag(
        "--idc-endpoint", kind="text", metavar="URL",
        help="S3 endpoint of IDC's buckets, path-style and anonymous (env "
             "NBIA_IDC_ENDPOINT; default: https://s3.amazonaws.com)."))  # (read at use, too)
    #: A Gen3 credentials file (``api_key``, ``key_id``) for a manifest's CRDC DRS rows;
    #: None: env NBIA_GEN3_AUTH, then GEN3_API_KEY (read where the key is loaded,
    #: ``files.gen3.find_credentials``). A path, never the key: it may go on a SLURM
    #: script's command line.
    auth: str | None = field(default=None, metadata=flag(
        "--auth", kind="text", metavar="FILE",
        help="Gen3 credentials JSON (api_key, key_id) for a manifest's CRDC DRS rows (env "
             "NBIA_GEN3_AUTH, then GEN3_API_KEY); download it from your profile page at "
             "https://nci-crdc.datacommons.io/."))
    #: Replaces ``https://HOST`` of every ``drs://HOST/...`` row (a mirror, a test server):
    #: the user chose it, so it may receive the key.
    gen3_endpoint: str | None = field(default=None, metadata=flag(
        "--gen3-endpoint", kind="text", metavar="URL",
        help="Gen3 server for the manifest's drs:// rows, in place of https://HOST "
             "(default: the host each drs:// URI names)."))
    #: The Go retriever's flag for its data-use agreement; here the same switch as
    #: ``agree_to_license`` (controlled DRS data is gated like a licence that must be
    #: accepted: once, interactively, or by either flag).
    accept_data_policy: bool = field(default=False, metadata=flag(
        "--accept-data-policy", kind="switch",
        help="Accept the data use policy of controlled-access (CRDC/Gen3) data and every "
             "collection's licence for this run (the same as --agree-to-license)."))
    #: Annotation files (``getDCMImage?IncludeAnnotation=true``), into each series folder
    #: under their own names: ``yes``, ``no``, or ``manifest`` (its ``includeAnnotation``,
    #: as the Java CLI does: it has no flag, the manifest decides; a list of UIDs has no
    #: header, so no annotations). True/False from Python become yes/no.
    annotations: str | bool = field(default="manifest", metadata=flag(
        "--annotations", kind="choice", choices=("manifest", "yes", "no"), metavar="WHEN",
        help="Download the series' annotation files too: yes, no, or manifest (default: "
             "the manifest's includeAnnotation, as the Java retriever does)."))
    #: Accept every collection's licence for this run without asking (the Java CLI's
    #: ``--agree-to-license``): what a headless run needs for a licence that is not a plain
    #: CC BY. Issue 24's ``--accept-data-policy`` is meant to be this same switch.
    agree_to_license: bool = field(default=False, metadata=flag(
        "--agree-to-license", kind="switch",
        help="Accept the licence of every collection in the manifest (needed without a "
             "terminal for a licence that is not plain CC BY, e.g. CC BY-NC or TCIA's "
             "restricted licence)."))
    #: Keep only series whose licence name or URL contains this text (any case)...
    license_filter: str | None = field(default=None, metadata=flag(
        "--license", kind="text", metavar="TEXT", param="license_filter",
        help="Keep only series whose licence name or URL contains TEXT (any case), "
             "e.g. 'CC BY 4.0' or 'by-nc'; the others are left out before anything is "
             "downloaded."))
    #: ... and drop those whose licence name or URL contains this one.
    exclude_license: str | None = field(default=None, metadata=flag(
        "--exclude-license", kind="text", metavar="TEXT",
        help="Leave out series whose licence name or URL contains TEXT (any case)."))
    #: Asked (collection, licence name, licence URL) before the first download of a
    #: collection whose licence is not a plain CC BY; True accepts it and remembers it in
    #: the config file. None (a headless run): such series are not downloaded unless
    #: ``agree_to_license``. Not a flag: the CLI's terminal prompt, the view's dialog.
    confirm_license: Callable[[str, str, str], bool] | None = None
    #: Series a ``.s5cmd`` manifest names by version (uid -> ``idc.index.IdcSeries``):
    #: fetched as that version. Filled by the engine from the manifest, not a flag.
    idc_pinned: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 1):
            raise UsageError(f"workers must be a whole number of at least 1, not {self.workers!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise UsageError("max_connections must be a whole number of at least 1, not "
                             f"{self.max_connections!r}")
        if not isinstance(self.timeout, int | float) or not math.isfinite(self.timeout) \
                or self.timeout <= 0:
            raise UsageError(f"timeout must be a positive number of seconds, not {self.timeout!r}")
        if self.processes is not None and (not isinstance(self.processes, int)
                                           or isinstance(self.processes, bool)
                                           or self.processes < 0):
            raise UsageError(f"processes must be 0 or more, not {self.processes!r}")
        if self.processes:
            # not at --help: the worker-process module only when processes are asked for
            from .procs import processes_supported

            why = processes_supported()
            if why is not None:
                raise UsageError(f"worker processes cannot run here ({why}): use processes=0")
        if self.retries is not None and (not isinstance(self.retries, int) or self.retries < 0):
            raise UsageError(f"retries must be 0 or more, not {self.retries!r}")
        if self.api not in API_CHOICES:
            raise UsageError(f"api must be one of {', '.join(API_CHOICES)}, not {self.api!r}")
        from ..layout import Layout  # here: a command's --help need not import it (10 ms)

        try:
            self.layout = Layout(self.layout)
        except ValueError:
            raise UsageError(f"layout must be descriptive or classic, not {self.layout!r}") \
                from None
        if self.shard is not None:
            k, n = self.shard
            if not (n >= 1 and 1 <= k <= n):
                raise UsageError(f"shard must be K/N with 1 <= K <= N, not {k}/{n}")
        self.trusted_hosts = tuple(self.trusted_hosts)
        if not isinstance(self.source, str) or not self.source:
            raise UsageError(f"source must be the name of a source, not {self.source!r}")
        if isinstance(self.annotations, bool):
            self.annotations = "yes" if self.annotations else "no"
        if self.annotations not in ("manifest", "yes", "no"):
            raise UsageError(f"annotations must be yes, no or manifest, not {self.annotations!r}")
        for name in ("license_filter", "exclude_license"):
            text = getattr(self, name)
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise UsageError(f"{name} must be some text of a licence name or URL")
        if self.accept_data_policy:
            self.agree_to_license = True  # one switch (see accept_data_policy)
        for name in ("auth", "gen3_endpoint"):
            text = getattr(self, name)
            if text is not None and (not isinstance(text, str) or not text.strip()):
                raise UsageError(f"{name} must be a {'file' if name == 'auth' else 'URL'}, "
                                 f"not {text!r}")
        if self.gen3_endpoint is not None:
            from ..idc import check_endpoint  # https, or http on loopback; no userinfo

            self.gen3_endpoint = check_endpoint(self.gen3_endpoint, "--gen3-endpoint")
        if self.idc_endpoint is not None:
            from ..idc import check_endpoint  # (pure; the HTTP stack's loopback test)

            self.idc_endpoint = check_endpoint(self.idc_endpoint)

    def wants_annotations(self, manifest_says: bool) -> bool:
        """Whether this run asks for annotation files, given the manifest's word."""
        return self.annotations == "yes" or (self.annotations == "manifest" and manifest_says)

    @property
    def streams_cap(self) -> int:
        """The most streams this run may open at once."""
        if self.workers is not None:
            return self.workers
        if self.source == "idc" and self.max_connections == DEFAULT_MAX_CONNECTIONS:
            return IDC_MAX_STREAMS
        return self.max_connections

    @property
    def streams_start(self) -> int | None:
        """Streams a run that explores starts with; None: the controller's own start."""
        if self.workers is None and self.streams_cap == IDC_MAX_STREAMS and \
                self.source == "idc" and self.max_connections == DEFAULT_MAX_CONNECTIONS:
            return IDC_START_STREAMS
        return None

    def __repr__(self) -> str:  # never show credentials, even by accident
        shown = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("credentials", "proxy")}
        if self.proxy:  # scheme, host and port: never its user or password
            from ..api.http import without_userinfo

            shown["proxy"] = without_userinfo(self.proxy)
        user = self.credentials.username if self.credentials else None
        return f"DownloadOptions(user={user!r}, {shown})"


class DownloadKwargs(TypedDict, total=False):
    """The keyword parameters of :func:`nbia_retriever.download` and ``make_engine``.

    The fields of :class:`DownloadOptions`, name for name and type for type (a test holds
    them equal: a field added there without its line here fails it), so that mypy checks
    every call; the defaults are the dataclass's, never repeated here. Besides them:
    ``user`` and ``password`` (they become ``credentials``), a :class:`~.source.Source`
    object in place of a source name, and ``confirm_host`` (asked before a password goes
    to a host only the manifest names; None: never sent).
    """

    workers: int | None
    max_connections: int
    processes: int | None
    retries: int | None
    layout: Layout | str
    md5: bool
    only_failed: bool
    shard: tuple[int, int] | None
    backoff_base: float
    api: str
    api_url: str | None
    verify_tls: bool
    timeout: float
    credentials: Credentials | None
    adaptive: bool
    trusted_hosts: tuple[str, ...]
    proxy: str | None
    source: str | Source
    idc_index: str | None
    idc_endpoint: str | None
    idc_pinned: Mapping[str, Any] | None
    auth: str | None
    gen3_endpoint: str | None
    accept_data_policy: bool
    annotations: str | bool
    agree_to_license: bool
    license_filter: str | None
    exclude_license: str | None
    confirm_license: Callable[[str, str, str], bool] | None
    user: str | None
    password: str | None
    confirm_host: Callable[[str], bool] | None
