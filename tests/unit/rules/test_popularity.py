"""The layering algorithms pinned on graphs whose answers are known: nixpkgs'
referencesByPopularity (the examples in closure-graph.py's own comments and tests) and
dockerTools' layer budget (docs/layering.md)."""

from __future__ import annotations

import pytest
from dtbuild.rules.builtin.layered import (
    LayerBudgetError,
    LayerPlan,
    plan_layers,
    popularity_counts,
    popularity_order,
)

# closure-graph.py's worked example:  A - B - C - D - F,  B - E - F,  C - E,  A - G
NIX_EXAMPLE = {"A": ["B", "G"], "B": ["C", "E"], "C": ["D", "E"], "D": ["F"], "E": ["F"]}


def test_the_worked_example_of_closure_graph_py() -> None:
    assert popularity_counts(["A"], NIX_EXAMPLE) == {"A": 1, "B": 2, "C": 3, "D": 4, "E": 5, "F": 9, "G": 2}
    # B and G tie at 2: by name.
    assert popularity_order(["A"], NIX_EXAMPLE) == ["F", "E", "D", "C", "B", "G", "A"]


def test_the_popularity_contest_example() -> None:
    # TestGraphPopularityContest: foo -> bar, baz; bar -> baz; baz -> tux
    graph = {"foo": ["bar", "baz"], "bar": ["baz"], "baz": ["tux"]}
    assert popularity_counts(["foo"], graph) == {"foo": 1, "bar": 2, "baz": 4, "tux": 6}
    assert popularity_order(["foo"], graph) == ["tux", "baz", "bar", "foo"]


def test_equal_popularity_sorts_by_name_most_popular_first() -> None:
    # TestOrderByPopularity's scores: foo 1, bar 1, baz 2, tux 2 -> baz, tux, bar, foo
    graph = {"bar": ["baz"], "foo": ["tux"]}
    assert popularity_counts(["foo", "bar"], graph) == {"foo": 1, "bar": 1, "baz": 2, "tux": 2}
    assert popularity_order(["foo", "bar"], graph) == ["baz", "tux", "bar", "foo"]


def test_labels_order_like_the_fixture_workspace() -> None:
    graph = {"//pkgs:app": ["//pkgs:libssl", "//pkgs:libz"], "//pkgs:libssl": ["//pkgs:libc"],
             "//pkgs:libz": ["//pkgs:libc"], "//pkgs:tool": ["//pkgs:libc"]}
    contents = ["//pkgs:app", "//pkgs:tool"]
    assert popularity_counts(contents, graph) == {"//pkgs:app": 1, "//pkgs:tool": 1, "//pkgs:libssl": 2,
                                                  "//pkgs:libz": 2, "//pkgs:libc": 7}
    assert popularity_order(contents, graph) == ["//pkgs:libc", "//pkgs:libssl", "//pkgs:libz", "//pkgs:app",
                                                 "//pkgs:tool"]


def test_contents_are_children_of_one_root_even_when_one_depends_on_another() -> None:
    # As nixpkgs scores them under the customisation layer that references every content.
    assert popularity_counts(["app", "libc"], {"app": ["libc"]}) == {"app": 1, "libc": 3}
    assert popularity_order(["libc", "app"], {"app": ["libc"]}) == ["libc", "app"]


def test_self_references_and_repeated_edges_count_once() -> None:
    graph = {"a": ["a", "b", "b"], "b": ["b"]}
    assert popularity_counts(["a", "a"], graph) == {"a": 1, "b": 2}


def test_a_long_chain_needs_no_recursion() -> None:
    chain = {f"p{i:05d}": [f"p{i + 1:05d}"] for i in range(1500)}
    order = popularity_order(["p00000"], chain)
    assert order[0] == "p01500" and order[-1] == "p00000"
    assert popularity_counts(["p00000"], chain)["p01500"] == 1501


def test_a_cycle_is_an_error() -> None:
    with pytest.raises(ValueError, match="cycle"):
        popularity_order(["a"], {"a": ["b"], "b": ["c"], "c": ["a"]})


@pytest.mark.parametrize(("max_layers", "base", "packages", "plan"), [
    (2, 0, 5, LayerPlan(singles=0, merged=True)),  # everything in one layer
    (3, 0, 5, LayerPlan(singles=1, merged=True)),
    (100, 0, 5, LayerPlan(singles=5, merged=False)),
    (100, 0, 98, LayerPlan(singles=98, merged=False)),  # maxLayers - 2: all fit
    (100, 0, 99, LayerPlan(singles=98, merged=True)),  # maxLayers - 1: the last one "merged" alone
    (100, 0, 100, LayerPlan(singles=98, merged=True)),
    (4, 2, 5, LayerPlan(singles=0, merged=True)),
    (10, 3, 0, LayerPlan(singles=0, merged=False)),
])
def test_the_budget_is_dockertools(max_layers: int, base: int, packages: int, plan: LayerPlan) -> None:
    assert plan_layers(max_layers, base, packages) == plan
    layers = base + plan.singles + plan.merged + 1
    assert layers <= max_layers


def test_no_room_left_is_dockertools_error() -> None:
    with pytest.raises(LayerBudgetError) as caught:
        plan_layers(3, 2, 5)
    assert str(caught.value) == ("3 layers are used by 'from_image' (2) and the customisation layer (1), but only "
                                 "max_layers = 3 were allowed: at least 1 layer is required to store the contents")
    with pytest.raises(LayerBudgetError, match="greater than 1"):
        plan_layers(1, 0, 1)
