"""The workspace state database and the scheduler's graph algorithms (with fakes)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from dtbuild.engine.errors import CycleError
from dtbuild.engine.execution import ActionOutcome, ActionRunner, PluginItems
from dtbuild.engine.sources import SourceDigests
from dtbuild.engine.state import StateDB
from dtbuild.engine.store import Store
from dtbuild.rules.api import ActionDecl
from dtbuild.rules.artifacts import Artifact


def test_results_survive_a_reopen_and_only_changed_rows_are_written(tmp_path: Path) -> None:
    db = StateDB(str(tmp_path))
    db.put_results([("k1", {"outputs": {}, "meta": {}}, "g1", 5.0), ("k2", {"outputs": {}, "meta": {}}, "g1", 6.0)])
    db.put_inputs([("//a:b X out", {"key": "k1", "inputs": {}})])
    db.put_durations([("//a:b X out", 2.5)])
    db.close()
    again = StateDB(str(tmp_path))
    known = again.results()
    assert sorted(known) == ["k1", "k2"] and known["k1"].generation == "g1" and known["k2"].used == 6.0
    assert again.input_keys() == {"//a:b X out": "k1"}
    assert again.input_record("//a:b X out") == {"key": "k1", "inputs": {}}
    assert again.durations() == {"//a:b X out": 2.5}
    again.put_results([("k1", {"outputs": {}, "meta": {"x": 1}}, "g2", 7.0)])
    assert again.results()["k1"].generation == "g2" and again.results()["k2"].generation == "g1"


def test_a_database_made_under_another_users_key_is_foreign(tmp_path: Path) -> None:
    """A workspace copied with its state directory: rows someone else wrote are never
    read (forged results could name blobs for keys anyone can compute)."""
    mine, theirs = b"m" * 32, b"t" * 32
    db = StateDB(str(tmp_path), theirs)
    db.put_results([("k1", {"outputs": {}, "meta": {}}, "g1", 5.0)])
    db.close()
    assert StateDB(str(tmp_path), mine).results() == {}  # made again, empty
    db = StateDB(str(tmp_path), mine)
    db.put_results([("k2", {"outputs": {}, "meta": {}}, "g1", 5.0)])
    db.close()
    assert sorted(StateDB(str(tmp_path), mine).results()) == ["k2"]


@pytest.mark.parametrize("content", [b"", b"not a database at all" * 100, b"SQLite format 3\0" + b"\xff" * 4096])
def test_a_damaged_database_is_an_empty_one(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "state.db").write_bytes(content)
    db = StateDB(str(tmp_path))
    assert db.results() == {}
    db.put_durations([("a", 1.0)])
    assert db.durations() == {"a": 1.0}


def test_a_database_of_another_program_is_replaced(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "state.db") as other:
        other.execute("CREATE TABLE results (x)")
    other.close()
    db = StateDB(str(tmp_path))
    assert db.results() == {}
    db.put_results([("k", {"outputs": {}, "meta": {}}, "g", 1.0)])
    assert list(db.results()) == ["k"]


def _action(name: str, inputs: list[str], output: str) -> ActionDecl:
    return ActionDecl("Fake", f"//p:{name}", {"in": tuple(Artifact(p, owner="//p:x") for p in inputs)},
                      {"out": Artifact(output, owner=f"//p:{name}")}, {}, name)


def _runner(tmp_path: Path, durations: dict[str, float] | None = None) -> ActionRunner:
    return ActionRunner(root=str(tmp_path), store=Store(str(tmp_path / "cache")),
                        sources=SourceDigests(str(tmp_path), str(tmp_path / "state")),
                        plugins=PluginItems({}, {}, {}, hook=None), jobs=1, keep_going=False,
                        cancel=threading.Event(), locations={}, durations=lambda: durations or {})


def test_a_cycle_between_actions_is_named_action_by_action(tmp_path: Path) -> None:
    a = _action("a", ["out/b"], "out/a")
    b = _action("b", ["out/a"], "out/b")
    runner = _runner(tmp_path)
    with pytest.raises(CycleError) as raised:
        runner.run([a, b], {"out/a": a, "out/b": b})
    assert "Fake of //p:a -> Fake of //p:b -> Fake of //p:a" in str(raised.value) or \
        "Fake of //p:b -> Fake of //p:a -> Fake of //p:b" in str(raised.value)


def test_priorities_are_the_longest_remaining_path_by_last_duration(tmp_path: Path) -> None:
    # quick1 -> quick2 -> quick3 (1 s each, unknown) and slow1 -> slow2 (5 s each, measured)
    quick = [_action("quick1", [], "q1"), _action("quick2", ["q1"], "q2"), _action("quick3", ["q2"], "q3")]
    slow = [_action("slow1", [], "s1"), _action("slow2", ["s1"], "s2")]
    actions = quick + slow
    runner = _runner(tmp_path, {"//p:slow1 Fake s1": 5.0, "//p:slow2 Fake s2": 5.0})
    dependents = [[1], [2], [], [4], []]
    priority = runner._priorities(actions, dependents, list(range(5)))
    assert priority == {0: 3.0, 1: 2.0, 2: 1.0, 3: 10.0, 4: 5.0}


def test_the_critical_path_follows_the_executed_actions_that_took_longest() -> None:
    actions = [_action("a", [], "a"), _action("b", ["a"], "b"), _action("c", [], "c"), _action("d", ["b", "c"], "d")]
    deps = [set(), {0}, set(), {1, 2}]
    finished = [(0, ActionOutcome(actions[0], "executed", seconds=2.0)),
                (2, ActionOutcome(actions[2], "executed", seconds=3.0)),
                (1, ActionOutcome(actions[1], "cached", seconds=0.1)),
                (3, ActionOutcome(actions[3], "executed", seconds=1.0))]
    path = ActionRunner._critical_path(actions, deps, finished)
    assert [(s.label, s.seconds) for s in path] == [("//p:c", 3.0), ("//p:d", 1.0)]
