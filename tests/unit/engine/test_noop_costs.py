"""What the no-op build's cheaper paths must keep: the same action keys, and a results
index that loses only its unreadable rows."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from dtbuild.engine.execution import ENGINE_KEY_VERSION, action_key
from dtbuild.engine.state import StateDB
from dtbuild.plugins.canonical import canonical_json
from dtbuild.plugins.interfaces import InputArtifact
from dtbuild.rules.api import ActionDecl
from dtbuild.rules.artifacts import Artifact


def test_an_action_key_is_the_sha256_of_the_canonical_key_document() -> None:
    action = ActionDecl(mnemonic="Genrule", owner="//p:t", inputs={}, description="t",
                        outputs={"out": Artifact("p/t.txt", owner="//p:t")},
                        params={"cmd": "échoé > $OUT", "env": {"B": "2", "A": "1"}}, rule_version="3")
    inputs = {"srcs": [InputArtifact("p/a.txt", "ab" * 32, False, 4, True, None)]}
    doc = {"engine": ENGINE_KEY_VERSION, "mnemonic": "Genrule", "kind_version": "7", "rule_version": "3",
           "params": action.params, "network": action.network, "cacheable": action.cacheable,
           "inputs": {"srcs": [["p/a.txt", "ab" * 32, False, True, None]]}, "outputs": {"out": ["p/t.txt", False]}}
    # The key document's canonical bytes: sorted keys, no spaces, UTF-8 (as json.dumps with
    # those options gives them; canonical_json keeps one encoder for speed).
    expected = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert canonical_json(doc) == expected
    assert action_key(action, "7", inputs) == hashlib.sha256(expected).hexdigest()


@pytest.mark.parametrize("bad", ["", "{", "1,2", "]", "{}]"])
def test_an_unreadable_results_row_is_a_miss_and_the_others_stay(tmp_path: Path, bad: str) -> None:
    db = StateDB(str(tmp_path))
    db.put_results([(f"k{i}", {"outputs": {}, "meta": {"n": i}}, "g1", float(i)) for i in range(3)])
    db.close()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        conn.execute("INSERT INTO results VALUES ('bad', ?, 'g1', 9.0)", (bad,))
    known = StateDB(str(tmp_path)).results()
    assert sorted(known) == ["k0", "k1", "k2"]
    assert [known[f"k{i}"].result["meta"]["n"] for i in range(3)] == [0, 1, 2]
