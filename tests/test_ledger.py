"""engine.ledger.Ledger is the one writer of series state (issue 22 item 5).

Three things hold it: no other engine module assigns a series' state, removes a series,
bumps the report's tallies or builds a ``state`` event (an AST scan); the counts equal
counting the states after any sequence of transitions (hypothesis); and they stay equal
when threads move series at once.
"""

from __future__ import annotations

import ast
import threading
from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import nbia_retriever
from nbia_retriever.engine.events import Event, EventKind
from nbia_retriever.engine.ledger import Ledger
from nbia_retriever.models import ALL_STATES, SeriesInfo, SeriesState
from nbia_retriever.report import Report, SeriesResult

SRC = Path(nbia_retriever.__file__).parent
ENGINE = SRC / "engine"
LEDGER = ENGINE / "ledger.py"


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        found: list[ast.expr] = []
        for target in node.targets:
            found.extend(target.elts if isinstance(target, ast.Tuple | ast.List) else [target])
        return found
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    return []


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _writes(path: Path) -> list[str]:
    """What ``path`` does that only the ledger may: lines quoted for the failure."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        for target in _targets(node):
            if isinstance(target, ast.Attribute) and target.attr in (
                    "state", "skipped", "adopted", "_counts", "planned", "to_download",
                    "total_bytes"):
                found.append(f"{path.name}:{node.lineno}: assigns .{target.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("pop", "popitem", "clear") and \
                _name(node.func.value) == "results":
            found.append(f"{path.name}:{node.lineno}: results.{node.func.attr}()")
        if isinstance(node, ast.Delete) and any(
                isinstance(t, ast.Subscript) and _name(t.value) == "results"
                for t in node.targets):
            found.append(f"{path.name}:{node.lineno}: del results[...]")
        if isinstance(node, ast.Call) and _name(node.func) == "Event" and node.args and \
                isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "STATE":
            found.append(f"{path.name}:{node.lineno}: builds a state event")
    return found


def test_the_ledger_is_the_only_writer_of_series_state() -> None:
    offenders = [line for path in sorted(ENGINE.glob("*.py")) if path != LEDGER
                 for line in _writes(path)]
    assert offenders == []
    # The scan sees what it looks for: the ledger itself does all of it.
    assert len(_writes(LEDGER)) >= 4


def test_no_state_event_is_built_outside_the_ledger() -> None:
    offenders = [line for path in sorted(SRC.rglob("*.py")) if path != LEDGER
                 for line in _writes(path) if "state event" in line]
    assert offenders == []


def _ledger(n: int) -> tuple[Ledger, dict[str, SeriesResult], list[Event]]:
    results = {f"1.2.{i}": SeriesResult(f"1.2.{i}") for i in range(n)}
    events: list[Event] = []
    report = Report(root=Path("."), results=results)
    return Ledger(results, report, events.append, "nbia"), results, events


def _counted(results: dict[str, SeriesResult]) -> Counter[SeriesState]:
    return Counter(r.state for r in results.values())


def _nonzero(counts: object) -> dict[SeriesState, int]:
    assert isinstance(counts, Counter)
    return {state: n for state, n in counts.items() if n}


_states = st.sampled_from(ALL_STATES)
_tallies = st.sampled_from([None, "skipped", "adopted"])
_index = st.integers(min_value=0, max_value=11)  # 10 series: 10 and 11 are not in the run
_op = st.one_of(
    st.tuples(st.just("move"), _index, _states, _tallies, st.booleans()),
    st.tuples(st.just("many"), st.lists(_index, max_size=6), _states, _tallies,
              st.booleans()),
    st.tuples(st.just("drop"), st.lists(_index, max_size=3), _states, _tallies,
              st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=40))
def test_counts_equal_the_states_after_any_transitions(ops: list[tuple]) -> None:  # type: ignore[type-arg]
    ledger, results, events = _ledger(10)
    tallied: Counter[str] = Counter()
    emitted = 0
    for kind, which, state, tally, emit in ops:
        if kind == "move":
            uid = f"1.2.{which}"
            present = uid in results
            moved = ledger.move(uid, state, tally=tally, emit=emit)
            assert (moved is not None) == present
            if present:
                assert moved is not None and moved.state is state
                tallied[tally] += 1
                emitted += emit
        elif kind == "many":
            uids = [f"1.2.{i}" for i in which]
            moved_uids = ledger.move_many(uids, state, tally=tally, emit=emit)
            assert moved_uids == [u for u in uids if u in results]
            tallied[tally] += len(moved_uids)
            emitted += emit * len(moved_uids)
        else:
            ledger.drop(f"1.2.{i}" for i in which)
        assert _nonzero(ledger.counts()) == dict(_counted(results))
        assert (ledger.report.skipped, ledger.report.adopted) == (
            tallied["skipped"], tallied["adopted"])
    assert len(events) == emitted
    assert all(e.kind is EventKind.STATE and isinstance(e.state, SeriesState)
               for e in events)


def test_concurrent_transitions_keep_the_counts() -> None:
    ledger, results, events = _ledger(64)
    uids = list(results)
    threads, rounds = 8, 200
    start = threading.Barrier(threads)

    def work(k: int) -> None:
        start.wait()
        for r in range(rounds):
            uid = uids[(k * 7 + r) % len(uids)]
            state = ALL_STATES[(k + r) % len(ALL_STATES)]
            ledger.move(uid, state, tally="skipped" if r % 2 else "adopted", emit=False)
            ledger.move_many(uids[k::threads], state, emit=False)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert _nonzero(ledger.counts()) == dict(_counted(results))
    assert sum(ledger.counts().values()) == len(results)
    assert ledger.report.skipped + ledger.report.adopted == threads * rounds
    assert ledger.report.skipped == threads * rounds // 2
    assert events == []


def test_a_state_event_carries_a_series_state() -> None:
    ledger, _, events = _ledger(1)
    ledger.move("1.2.0", SeriesState.ERROR, message="gone", attempt=2)
    (event,) = events
    assert event.state is SeriesState.ERROR
    assert event.as_dict()["state"] == "Error"
    assert Event(EventKind.MESSAGE).as_dict().get("state") is None


def test_planning_counters_follow_plan_drop_and_skip() -> None:
    ledger, results, events = _ledger(4)
    info = SeriesInfo(series_uid="x", file_size=100)
    taken = ledger.plan([("1.2.0", info, 0), ("1.2.1", info, 1), ("9.9", info, 0)], 5,
                        started=True)
    assert taken == ["1.2.0", "1.2.1"]
    assert (ledger.planned, ledger.to_download, ledger.total_bytes) == (5, 2, 200)
    assert [(e.uid, e.state) for e in events] == [("1.2.0", SeriesState.QUEUED),
                                                  ("1.2.1", SeriesState.QUEUED)]
    assert results["1.2.1"].variant == 1 and results["1.2.1"].info is info
    ledger.move("1.2.0", SeriesState.COMPLETE, tally="skipped")  # another run fetched it
    assert (ledger.to_download, ledger.total_bytes, ledger.report.skipped) == (2, 100, 1)
    ledger.drop(["1.2.1", "1.2.2"])
    assert (ledger.to_download, ledger.total_bytes) == (1, 0)
    assert ledger.planned_text(True, 4) == "1 series to download, 1 already complete"
    assert ledger.planned_text(False, 4) == ("1 series to download, 1 already complete "
                                             "(5 of 4 planned so far)")
    assert _nonzero(ledger.counts()) == dict(_counted(results))
