"""The IDC index lookup, run as a short-lived child process (``python -P -m
nbia_retriever.idc._lookup``): one JSON request on stdin, one JSON answer on stdout.

One request a line; the child answers each in turn and ends when its stdin closes or
:data:`IDLE` seconds pass without a request (the parent's next lookups, a run's within a
second of its first, reuse it: Python and duckdb start once).

Why a child: duckdb reads the 74 MB ``idc_index.parquet`` in a fraction of a second, but
its engine and buffers take 150-200 MB that a long download would otherwise keep for
hours (``free`` does not give it back to the system). The parent
(:mod:`nbia_retriever.idc.index`) never imports duckdb; it validates every row this
process returns, since the parquet files are input from a folder the user named.

Request::

    {"op": "schema" | "series" | "uuids" | "uids",
     "files": {"idc_index": PATH, "collections_index": PATH,
               "prior_versions_index": PATH, "version_metadata_index": PATH | null},
     "current": {COLUMN: "str" | "int" | "float", ...},  # idc_index columns to return
     "prior": {COLUMN: KIND, ...},                        # prior_versions_index columns
     "keys": [TEXT, ...]}                                 # SeriesInstanceUIDs or uuids

Answer, one JSON value a line, so that neither side holds the whole answer at once (50,000
series are 21 MB of JSON): rows as ``["c" | "p" | "x", VALUE, ...]`` (the requested
columns in order, then the collection's ``collection_name``), then ``{"done": true}``; or
``{"columns": {NAME: [COLUMN, ...]}, "version": INT | null}`` for ``schema``; or
``{"error": ONE_LINE, "file": NAME}``. An answer without its last line (a child killed
midway) is no answer. ``series`` looks keys up as SeriesInstanceUID in ``idc_index``
(rows ``c``), then in ``prior_versions_index`` only those not found there (``p``);
``uuids`` as ``crdc_series_uuid`` likewise, and then the current rows of the series whose
prior versions were found (``x``: the metadata ``prior_versions_index`` does not carry).
``uids`` writes the digests of every SeriesInstanceUID of both to the file its ``out``
names and answers ``{"done": true, "count": N}`` (the parent's :mod:`.uidfilter`).

Every value from the request reaches SQL as a parameter (paths, keys); column names are
checked against a plain identifier pattern before they are quoted into the query.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, TextIO

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_CASTS = {"str": "VARCHAR", "int": "BIGINT", "float": "DOUBLE"}
#: Rows fetched from duckdb and written at a time.
_BATCH = 2048
#: Characters of a text value passed on (descriptions are short; UIDs 64, uuids 36).
_MAX_TEXT = 1024
#: Seconds without a request after which the child ends (module docstring).
IDLE = 1.0
#: The index files, by the names the request and the answers use.
FILES = ("idc_index", "collections_index", "prior_versions_index", "version_metadata_index")


class _Failure(Exception):
    """A one-line reason, naming the index file it concerns."""

    def __init__(self, message: str, file: str = "") -> None:
        super().__init__(message)
        self.file = file


def _columns(spec: dict[str, str], alias: str) -> str:
    parts = []
    for name, kind in spec.items():
        if _IDENTIFIER.fullmatch(name) is None or kind not in _CASTS:
            raise _Failure(f"bad column request {name!r}")
        value = f'TRY_CAST({alias}."{name}" AS {_CASTS[kind]})'
        if kind == "str":  # a hostile file's megabyte "description" stays in the file
            value = f"left({value}, {_MAX_TEXT})"
        parts.append(f'{value} AS "{name}"')
    return ", ".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _schema(con: Any, files: dict[str, str | None]) -> dict[str, Any]:
    columns: dict[str, list[str]] = {}
    for name in FILES:
        path = files.get(name)
        if path is None:
            continue
        try:
            rows = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()
        except Exception as exc:  # duckdb raises many types for a bad file
            raise _Failure(_first_line(exc), name) from None
        columns[name] = [str(row[0]) for row in rows]
    version = None
    path = files.get("version_metadata_index")
    if path is not None and "idc_version" in columns.get("version_metadata_index", ()):
        try:
            row = con.execute("SELECT max(TRY_CAST(idc_version AS BIGINT)) "
                              "FROM read_parquet(?)", [path]).fetchone()
        except Exception as exc:
            raise _Failure(_first_line(exc), "version_metadata_index") from None
        version = row[0] if row else None
    return {"columns": columns, "version": version}


def _emit(cursor: Any, tag: str, out: TextIO) -> int:
    """Write the rows of ``cursor`` as ``[tag, ...]`` lines, a batch at a time."""
    count = 0
    while True:
        rows = cursor.fetchmany(_BATCH)
        if not rows:
            return count
        for row in rows:
            out.write(json.dumps([tag, *row], separators=(",", ":"), default=str))
            out.write("\n")
        count += len(rows)


def _lookup(con: Any, request: dict[str, Any], out: TextIO) -> None:
    files: dict[str, str] = request["files"]
    current: dict[str, str] = request["current"]
    prior: dict[str, str] = request["prior"]
    key = "SeriesInstanceUID" if request["op"] == "series" else "crdc_series_uuid"
    keys = [str(k) for k in request["keys"]]
    stage = "collections_index"
    try:
        con.execute("CREATE TEMP TABLE keys AS SELECT UNNEST(?::VARCHAR[]) AS k", [keys])
        con.execute("CREATE TEMP TABLE col AS SELECT CAST(collection_id AS VARCHAR) AS cid, "
                    "any_value(CAST(collection_name AS VARCHAR)) AS cname "
                    "FROM read_parquet(?) GROUP BY 1", [files["collections_index"]])
        stage = "idc_index"
        con.execute(f"CREATE TEMP TABLE cur AS SELECT {_columns(current, 'i')}, col.cname "
                    f'FROM read_parquet(?) i JOIN keys ON i."{key}" = keys.k '
                    "LEFT JOIN col ON col.cid = CAST(i.collection_id AS VARCHAR)",
                    [files["idc_index"]])
        _emit(con.execute("SELECT * FROM cur"), "c", out)
        stage = "prior_versions_index"
        con.execute(f"CREATE TEMP TABLE pri AS SELECT {_columns(prior, 'p')}, col.cname "
                    f'FROM read_parquet(?) p JOIN keys ON p."{key}" = keys.k '
                    "LEFT JOIN col ON col.cid = CAST(p.collection_id AS VARCHAR) "
                    f'WHERE keys.k NOT IN (SELECT "{key}" FROM cur WHERE "{key}" IS NOT NULL)',
                    [files["prior_versions_index"]])
        found = _emit(con.execute("SELECT * FROM pri"), "p", out)
        if request["op"] == "uuids" and found:
            stage = "idc_index"
            _emit(con.execute(
                f"SELECT {_columns(current, 'i')}, col.cname FROM read_parquet(?) i "
                "JOIN (SELECT DISTINCT SeriesInstanceUID AS u FROM pri) s "
                "ON i.SeriesInstanceUID = s.u "
                "LEFT JOIN col ON col.cid = CAST(i.collection_id AS VARCHAR)",
                [files["idc_index"]]), "x", out)
    except _Failure:
        raise
    except Exception as exc:
        raise _Failure(_first_line(exc), stage) from None


def _uids(con: Any, request: dict[str, Any]) -> dict[str, Any]:
    """The digests (:func:`~nbia_retriever.idc.uidfilter.digest`) of every
    SeriesInstanceUID of ``idc_index`` and ``prior_versions_index``, sorted, unique, as
    little-endian 64-bit words, into the file ``request["out"]`` names: a million UIDs
    never cross the pipe (as JSON they took 9 s to build a filter)."""
    import array  # only for this request

    from .uidfilter import digest  # (the parent's very function)

    files: dict[str, str] = request["files"]
    stage = "idc_index"
    try:
        cursor = con.execute(
            "SELECT DISTINCT CAST(SeriesInstanceUID AS VARCHAR) FROM ("
            "SELECT SeriesInstanceUID FROM read_parquet(?) UNION ALL "
            "SELECT SeriesInstanceUID FROM read_parquet(?)) WHERE SeriesInstanceUID "
            "IS NOT NULL", [files["idc_index"], files["prior_versions_index"]])
        stage = "prior_versions_index"
        found: set[int] = set()
        while rows := cursor.fetchmany(65536):
            found.update(digest(row[0]) for row in rows)
    except Exception as exc:
        raise _Failure(_first_line(exc), stage) from None
    words = array.array("Q", sorted(found))
    if sys.byteorder != "little":
        words.byteswap()
    with open(request["out"], "wb") as handle:
        words.tofile(handle)
    return {"done": True, "count": len(words)}


def main() -> int:
    import select  # only when run as the reader child (the idle timeout on stdin)

    source = sys.stdin.buffer
    while True:
        # Strict request/answer: nothing of a next request waits in stdin's buffer here.
        ready, _, _ = select.select([source], [], [], IDLE)
        if not ready:
            return 0  # idle: the parent starts another child when it asks again
        line = source.readline()
        if not line.strip():
            return 0  # stdin closed
        _answer(line)


def _answer(line: bytes) -> None:
    """Answer one request line on stdout (module docstring)."""
    out = sys.stdout
    try:
        request = json.loads(line)
        import duckdb  # here: a missing duckdb is an answer on stdout, not a crash

        con = duckdb.connect(":memory:")  # afresh: no temp table of the last request
        try:
            if request["op"] == "schema":
                answer: dict[str, Any] = _schema(con, request["files"])
            elif request["op"] == "uids":
                answer = _uids(con, request)
            else:
                _lookup(con, request, out)
                answer = {"done": True}
        finally:
            con.close()
    except _Failure as exc:
        answer = {"error": str(exc), "file": exc.file}
    except ImportError:
        answer = {"error": "duckdb is not installed (pip install 'nbia-retriever[idc]')",
                  "file": ""}
    except (ValueError, KeyError, TypeError) as exc:
        answer = {"error": f"bad request: {_first_line(exc)}", "file": ""}
    out.write(json.dumps(answer, separators=(",", ":"), default=str) + "\n")
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
