"""Known answers for the query language and the graph renderers, on a fake target graph
handed to `QueryGraph` through the same two callables the engine uses."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from dtbuild.engine.query import (
    Deps,
    Kind,
    Pattern,
    QueryGraph,
    QueryNode,
    QuerySyntaxError,
    ReverseDeps,
    SetOperation,
    UnknownFunctionError,
    evaluate,
    parse,
    render_graph,
)

# label -> (kind, direct deps)
WORLD: dict[str, tuple[str, list[str]]] = {
    # A multi-package graph with source files.
    "//app:image": ("image", ["//app:layer", "//lib:base"]),
    "//app:layered": ("layered_image", ["//app:layer"]),
    "//app:layer": ("files", ["//app:main.sh", "//lib:util"]),
    "//app:main.sh": ("source file", []),
    "//lib:base": ("pure_layer", ["//lib:util"]),
    "//lib:util": ("genrule", ["//lib:util.sh", "//tools:gen"]),
    "//lib:util.sh": ("source file", []),
    "//lib/sub:extra": ("files", ["//lib:util"]),
    "//tools:gen": ("genrule", ["//tools:gen.py"]),
    "//tools:gen.py": ("source file", []),
    # A diamond.
    "//diamond:top": ("genrule", ["//diamond:left", "//diamond:right"]),
    "//diamond:left": ("genrule", ["//diamond:bottom"]),
    "//diamond:right": ("genrule", ["//diamond:bottom"]),
    "//diamond:bottom": ("files", []),
    # A chain.
    "//chain:one": ("genrule", ["//chain:two"]),
    "//chain:two": ("genrule", ["//chain:three"]),
    "//chain:three": ("genrule", ["//chain:four"]),
    "//chain:four": ("files", []),
}


def _package(label: str) -> str:
    return label[2:].split(":")[0]


class FakeEngine:
    """Resolves patterns and loads nodes from a dict, recording which nodes were loaded."""

    def __init__(self, world: dict[str, tuple[str, list[str]]] = WORLD) -> None:
        self.world = world
        self.loaded: list[str] = []

    def resolve_pattern(self, word: str) -> list[str]:
        targets = [label for label, (kind, _) in self.world.items() if kind != "source file"]
        if word.endswith("/..."):
            base = word[2:-4].rstrip("/")
            return [lb for lb in targets if not base or _package(lb) == base or _package(lb).startswith(base + "/")]
        if word.endswith(":all"):
            return [label for label in targets if _package(label) == word[2:-4]]
        if ":" not in word:
            word = f"{word}:{word.rsplit('/', 1)[-1]}"
        if word in self.world:
            return [word]
        raise KeyError(f"no target matches {word!r}")

    def node(self, label: str) -> QueryNode:
        self.loaded.append(label)
        kind, deps = self.world[label]
        return QueryNode(label, kind, tuple(deps))

    def graph(self) -> QueryGraph:
        return QueryGraph(self.resolve_pattern, self.node)


def query(expression: str, world: dict[str, tuple[str, list[str]]] = WORLD) -> list[str]:
    return evaluate(expression, FakeEngine(world).graph())


IMAGE_CLOSURE = ["//app:image", "//app:layer", "//app:main.sh", "//lib:base", "//lib:util", "//lib:util.sh",
                 "//tools:gen", "//tools:gen.py"]


# --- patterns and ordering ----------------------------------------------------------------


def test_patterns_resolve_through_the_engine_and_results_are_sorted_by_label() -> None:
    assert query("//lib/...") == ["//lib/sub:extra", "//lib:base", "//lib:util"]  # '/' sorts before ':'
    assert query("//app:all") == ["//app:image", "//app:layer", "//app:layered"]
    assert query("//tools:gen.py") == ["//tools:gen.py"]


def test_a_pattern_alone_loads_no_node() -> None:
    engine = FakeEngine()
    assert evaluate("//lib/... + //chain:one", engine.graph()) == [
        "//chain:one", "//lib/sub:extra", "//lib:base", "//lib:util"]
    assert engine.loaded == []


def test_errors_from_the_engine_propagate() -> None:
    with pytest.raises(KeyError, match="//nope:x"):
        query("deps(//nope:x)")
    broken = {"//a:a": ("genrule", ["//a:missing"])}
    with pytest.raises(KeyError, match="//a:missing"):
        query("deps(//a:a)", broken)


# --- deps -----------------------------------------------------------------------------------


def test_deps_is_the_transitive_closure_including_source_files() -> None:
    assert query("deps(//app:image)") == IMAGE_CLOSURE
    assert query("deps(//diamond:top)") == ["//diamond:bottom", "//diamond:left", "//diamond:right",
                                            "//diamond:top"]


@pytest.mark.parametrize(("depth", "expected"), [
    (0, ["//app:image"]),
    (1, ["//app:image", "//app:layer", "//lib:base"]),
    (2, ["//app:image", "//app:layer", "//app:main.sh", "//lib:base", "//lib:util"]),
    (3, ["//app:image", "//app:layer", "//app:main.sh", "//lib:base", "//lib:util", "//lib:util.sh",
         "//tools:gen"]),
    (99, IMAGE_CLOSURE),
])
def test_deps_depth_counts_edges_from_the_roots(depth: int, expected: list[str]) -> None:
    assert query(f"deps(//app:image, {depth})") == expected


def test_deps_with_a_depth_loads_only_what_it_needs() -> None:
    engine = FakeEngine()
    evaluate("deps(//chain:one, 0)", engine.graph())
    assert engine.loaded == []
    engine = FakeEngine()
    assert evaluate("deps(//chain:one, 2)", engine.graph()) == ["//chain:one", "//chain:three", "//chain:two"]
    assert engine.loaded == ["//chain:one", "//chain:two"]


def test_each_node_is_loaded_once_per_graph() -> None:
    engine = FakeEngine()
    graph = engine.graph()
    evaluate("deps(//app:image) + deps(//app:layered)", graph)
    evaluate("kind(genrule, deps(//app:image))", graph)
    assert sorted(engine.loaded) == sorted([*IMAGE_CLOSURE, "//app:layered"])


def test_a_cycle_does_not_hang_the_closure() -> None:
    cycle = {"//c:a": ("genrule", ["//c:b"]), "//c:b": ("genrule", ["//c:a"])}
    assert query("deps(//c:a)", cycle) == ["//c:a", "//c:b"]
    assert query("rdeps(//c:a, //c:b, 1)", cycle) == ["//c:a", "//c:b"]


# --- rdeps ----------------------------------------------------------------------------------


def test_rdeps_within_the_whole_workspace() -> None:
    assert query("rdeps(//..., //lib:util)") == [
        "//app:image", "//app:layer", "//app:layered", "//lib/sub:extra", "//lib:base", "//lib:util"]


def test_rdeps_is_limited_to_the_universe_closure() -> None:
    assert query("rdeps(//app:image, //lib:util)") == ["//app:image", "//app:layer", "//lib:base", "//lib:util"]
    # Not in deps(//diamond:top) at all: nothing.
    assert query("rdeps(//diamond:top, //lib:util)") == []


@pytest.mark.parametrize(("depth", "expected"), [
    (0, ["//lib:util"]),
    (1, ["//app:layer", "//lib/sub:extra", "//lib:base", "//lib:util"]),
    (2, ["//app:image", "//app:layer", "//app:layered", "//lib/sub:extra", "//lib:base", "//lib:util"]),
])
def test_rdeps_depth(depth: int, expected: list[str]) -> None:
    assert query(f"rdeps(//..., //lib:util, {depth})") == expected


def test_rdeps_of_a_source_file() -> None:
    assert query("rdeps(//..., //tools:gen.py, 1)") == ["//tools:gen", "//tools:gen.py"]


# --- kind -----------------------------------------------------------------------------------


def test_kind_matches_the_rule_name_with_or_without_bazels_rule_suffix() -> None:
    assert query("kind(genrule, deps(//app:image))") == ["//lib:util", "//tools:gen"]
    assert query('kind("genrule rule", deps(//app:image))') == ["//lib:util", "//tools:gen"]
    assert query("kind('^genrule rule$', deps(//app:image))") == ["//lib:util", "//tools:gen"]


def test_kind_source_file_and_rule() -> None:
    assert query('kind("source file", deps(//app:image))') == ["//app:main.sh", "//lib:util.sh", "//tools:gen.py"]
    assert query("kind(rule, deps(//app:image))") == [
        "//app:image", "//app:layer", "//lib:base", "//lib:util", "//tools:gen"]


def test_kind_searches_like_bazel_so_a_substring_matches_unless_anchored() -> None:
    assert query("kind(image, //app:all)") == ["//app:image", "//app:layered"]
    assert query('kind("^image ", //app:all)') == ["//app:image"]
    # "file" is in "source file" and in "files rule".
    assert query("kind(file, deps(//app:image))") == ["//app:layer", "//app:main.sh", "//lib:util.sh",
                                                      "//tools:gen.py"]


# --- somepath and allpaths ------------------------------------------------------------------


def test_somepath_takes_a_shortest_path_breaking_ties_by_label() -> None:
    # Both //app:layer and //lib:base lead to //lib:util; the smaller label wins.
    assert query("somepath(//app:image, //tools:gen.py)") == [
        "//app:image", "//app:layer", "//lib:util", "//tools:gen", "//tools:gen.py"]
    assert query("somepath(//diamond:top, //diamond:bottom)") == [
        "//diamond:bottom", "//diamond:left", "//diamond:top"]


def test_somepath_from_several_starts_to_several_ends_is_the_shortest() -> None:
    assert query("somepath(//chain:one + //chain:three, //chain:four)") == ["//chain:four", "//chain:three"]
    assert query("somepath(//chain:one, //chain:three + //chain:four)") == [
        "//chain:one", "//chain:three", "//chain:two"]


def test_somepath_edge_cases() -> None:
    assert query("somepath(//chain:four, //chain:one)") == []  # edges only go towards dependencies
    assert query("somepath(//chain:two, //chain:two)") == ["//chain:two"]
    assert query("somepath(//chain:one, //chain:four - //chain:four)") == []


def test_allpaths() -> None:
    assert query("allpaths(//diamond:top, //diamond:bottom)") == [
        "//diamond:bottom", "//diamond:left", "//diamond:right", "//diamond:top"]
    assert query("allpaths(//app:image, //lib:util)") == ["//app:image", "//app:layer", "//lib:base", "//lib:util"]
    assert query("allpaths(//chain:two, //chain:four)") == ["//chain:four", "//chain:three", "//chain:two"]
    assert query("allpaths(//chain:four, //chain:one)") == []


# --- set operations, precedence, quoting ----------------------------------------------------


def test_set_operators_share_one_precedence_and_associate_left() -> None:
    assert parse("//a/... - //a/b:x + //c:y") == SetOperation(
        "+", SetOperation("-", Pattern("//a/..."), Pattern("//a/b:x")), Pattern("//c:y"))
    assert parse("a ^ b - c + d") == SetOperation(
        "+", SetOperation("-", SetOperation("^", Pattern("a"), Pattern("b")), Pattern("c")), Pattern("d"))


@pytest.mark.parametrize(("expression", "expected"), [
    # (lib - util) + util, not lib - (util + util)
    ("//lib/... - //lib:util + //lib:util", ["//lib/sub:extra", "//lib:base", "//lib:util"]),
    ("//lib/... - (//lib:util + //lib:util)", ["//lib/sub:extra", "//lib:base"]),
    # (lib ^ base) + gen, not lib ^ (base + gen)
    ("//lib/... ^ //lib:base + //tools:gen", ["//lib:base", "//tools:gen"]),
    # (lib - base) ^ base, not lib - (base ^ base)
    ("//lib/... - //lib:base ^ //lib:base", []),
    ("//lib/... - //lib/sub:extra + //tools:gen", ["//lib:base", "//lib:util", "//tools:gen"]),
])
def test_set_operations_evaluate_left_to_right(expression: str, expected: list[str]) -> None:
    assert query(expression) == expected


def test_operator_keywords_mean_the_same_as_the_symbols() -> None:
    assert parse("a union b except c intersect d") == parse("a + b - c ^ d")
    assert query("deps(//app:image) except kind('source file', deps(//app:image)) intersect //lib/...") == [
        "//lib:base", "//lib:util"]


def test_a_hyphen_inside_a_word_is_part_of_it() -> None:
    assert parse("//pkg:a-b - //pkg:c") == SetOperation("-", Pattern("//pkg:a-b"), Pattern("//pkg:c"))
    assert parse("//pkg:a-b -//pkg:c") == SetOperation("-", Pattern("//pkg:a-b"), Pattern("//pkg:c"))


def test_quoted_words() -> None:
    assert query('deps("//chain:three")') == ["//chain:four", "//chain:three"]
    assert query("deps('//chain:three')") == ["//chain:four", "//chain:three"]
    assert parse('"//a:with space"') == Pattern("//a:with space")
    assert parse("'//a:say \"hi\"'") == Pattern('//a:say "hi"')
    # A quoted keyword or function name is a plain word.
    assert parse('"union"') == Pattern("union")
    assert parse('a + "deps"') == SetOperation("+", Pattern("a"), Pattern("deps"))
    with pytest.raises(KeyError, match="union"):
        query('"union"')


def test_function_calls_parse_to_their_nodes() -> None:
    assert parse(" deps( //a:b , 2 ) ") == Deps(Pattern("//a:b"), 2)
    assert parse("rdeps(//..., (//a:b))") == ReverseDeps(Pattern("//..."), Pattern("//a:b"), None)
    assert parse("kind('source file', deps(:x))") == Kind("source file", Deps(Pattern(":x")))
    # A function name without parentheses is a target pattern, as in Bazel.
    assert parse("deps") == Pattern("deps")


# --- syntax errors --------------------------------------------------------------------------


@pytest.mark.parametrize(("expression", "message"), [
    ("deps(//a:b))", """\
        query: unexpected ')' at column 12
          deps(//a:b))
                     ^
        hint: this ')' closes no '('"""),
    ("deps(//a:b", """\
        query: unexpected end of expression at column 11
          deps(//a:b
                    ^
        hint: expected ')' to close the '(' at column 5"""),
    ("//a:b //c:d", """\
        query: unexpected word '//c:d' at column 7
          //a:b //c:d
                ^
        hint: join expressions with an operator: + (union), - (except), ^ (intersect); \
quote a word that contains spaces"""),
    ("//a:b +", """\
        query: unexpected end of expression at column 8
          //a:b +
                 ^
        hint: expected an expression: a target pattern, a function call or '('"""),
    ("deps(//a:b, )", """\
        query: unexpected ')' at column 13
          deps(//a:b, )
                      ^
        hint: expected an expression: a target pattern, a function call or '('"""),
    ("kind('genrule, //a:b)", """\
        query: unterminated quoted word at column 6
          kind('genrule, //a:b)
               ^
        hint: close it with '"""),
    ("//a:b + #c", """\
        query: unexpected character '#' at column 9
          //a:b + #c
                  ^
        hint: quote a word that contains it: "..." or '...'"""),
    ("deps(//a:b, 1, 2)", """\
        query: too many arguments to deps() (it takes 1 or 2) at column 16
          deps(//a:b, 1, 2)
                         ^
        hint: usage: deps(EXPR) or deps(EXPR, DEPTH)"""),
    ("rdeps(//...)", """\
        query: too few arguments to rdeps() (it takes 2 or 3) at column 12
          rdeps(//...)
                     ^
        hint: usage: rdeps(UNIVERSE, EXPR) or rdeps(UNIVERSE, EXPR, DEPTH)"""),
    ("deps(//a:b, two)", """\
        query: bad depth 'two' in deps() at column 13
          deps(//a:b, two)
                      ^
        hint: a depth is a non-negative integer; usage: deps(EXPR) or deps(EXPR, DEPTH)"""),
    ("kind(deps(//a), //a)", """\
        query: the first argument of kind() must be a word (a regular expression), but was an expression \
at column 6
          kind(deps(//a), //a)
               ^
        hint: usage: kind(REGEX, EXPR)"""),
    ("kind('gen[', //a)", """\
        query: invalid regular expression 'gen[' in kind() at column 6
          kind('gen[', //a)
               ^
        hint: unterminated character set"""),
])
def test_syntax_errors_point_at_the_offending_column(expression: str, message: str) -> None:
    with pytest.raises(QuerySyntaxError) as caught:
        parse(expression)
    assert str(caught.value) == textwrap.dedent(message)


def test_a_syntax_error_is_a_value_error_with_its_parts() -> None:
    with pytest.raises(ValueError, match="unexpected") as caught:
        evaluate("deps(//a:b))", FakeEngine().graph())
    error = caught.value
    assert isinstance(error, QuerySyntaxError)
    assert (error.reason, error.position, error.column, error.expression) == (
        "unexpected ')'", 11, 12, "deps(//a:b))")


def test_an_empty_quoted_pattern_is_an_error_at_evaluation() -> None:
    with pytest.raises(QuerySyntaxError, match="empty target pattern at column 6"):
        query('deps("")')


def test_the_caret_stays_under_the_column_when_the_expression_has_tabs() -> None:
    with pytest.raises(QuerySyntaxError) as caught:
        parse("a\t+\t)")
    assert str(caught.value).splitlines()[1:3] == ["  a + )", "      ^"]


@pytest.mark.parametrize(("name", "suggestion"), [
    ("dep", "deps"), ("Deps", "deps"), ("rdep", "rdeps"), ("some_path", "somepath"), ("kinds", "kind"),
])
def test_unknown_function_suggests_the_closest_name(name: str, suggestion: str) -> None:
    with pytest.raises(UnknownFunctionError) as caught:
        parse(f"//x:y + {name}(//a:b)")
    error = caught.value
    assert error.suggestion == suggestion
    assert str(error) == textwrap.dedent(f"""\
        query: unknown function '{name}' at column 9
          //x:y + {name}(//a:b)
                  ^
        hint: did you mean '{suggestion}'?""")
    assert isinstance(error, QuerySyntaxError)


def test_unknown_function_without_a_close_name_lists_the_functions() -> None:
    with pytest.raises(UnknownFunctionError) as caught:
        parse("frobnicate(//a:b)")
    assert caught.value.suggestion is None
    assert caught.value.hint == "the functions are allpaths, deps, kind, rdeps, somepath"


# --- networkx view and rendering ------------------------------------------------------------


def test_to_networkx_is_the_closure_with_kinds() -> None:
    graph = FakeEngine().graph().to_networkx(["//diamond:left", "//chain:three"])
    assert sorted(graph.nodes) == ["//chain:four", "//chain:three", "//diamond:bottom", "//diamond:left"]
    assert sorted(graph.edges) == [("//chain:three", "//chain:four"), ("//diamond:left", "//diamond:bottom")]
    assert graph.nodes["//diamond:bottom"]["kind"] == "files"


def test_render_tree_marks_a_node_shown_before() -> None:
    assert render_graph(FakeEngine().graph(), "//app:image", "tree") == textwrap.dedent("""\
        //app:image
        ├── //app:layer
        │   ├── //app:main.sh
        │   └── //lib:util
        │       ├── //lib:util.sh
        │       └── //tools:gen
        │           └── //tools:gen.py
        └── //lib:base
            └── //lib:util (*)""")
    assert render_graph(FakeEngine().graph(), "//diamond:top", "tree") == textwrap.dedent("""\
        //diamond:top
        ├── //diamond:left
        │   └── //diamond:bottom
        └── //diamond:right
            └── //diamond:bottom (*)""")


def test_render_tree_of_a_cycle_and_of_a_leaf() -> None:
    cycle = {"//c:a": ("genrule", ["//c:b"]), "//c:b": ("genrule", ["//c:a"])}
    assert render_graph(FakeEngine(cycle).graph(), "//c:a", "tree") == "//c:a\n└── //c:b\n    └── //c:a (*)"
    assert render_graph(FakeEngine().graph(), "//chain:four", "tree") == "//chain:four"


def test_render_tree_of_a_deep_chain_does_not_recurse() -> None:
    depth = 3000
    chain = {f"//c:n{i}": ("genrule", [f"//c:n{i + 1}"] if i < depth else []) for i in range(depth + 1)}
    lines = render_graph(FakeEngine(chain).graph(), "//c:n0", "tree").splitlines()
    assert len(lines) == depth + 1
    assert lines[-1] == " " * 4 * (depth - 1) + "└── //c:n3000"


def test_render_dot() -> None:
    assert render_graph(FakeEngine().graph(), "//diamond:top", "dot") == textwrap.dedent("""\
        digraph dtbuild {
          node [shape=box];
          "//diamond:bottom";
          "//diamond:left";
          "//diamond:right";
          "//diamond:top";
          "//diamond:left" -> "//diamond:bottom";
          "//diamond:right" -> "//diamond:bottom";
          "//diamond:top" -> "//diamond:left";
          "//diamond:top" -> "//diamond:right";
        }""")


def test_render_dot_escapes_quotes() -> None:
    world = {'//a:"q"': ("genrule", ["//a:b\\c"]), "//a:b\\c": ("source file", [])}
    assert render_graph(FakeEngine(world).graph(), '//a:"q"', "dot").splitlines()[2:5] == [
        '  "//a:\\"q\\"";', '  "//a:b\\\\c";', '  "//a:\\"q\\"" -> "//a:b\\\\c";']


def test_render_json() -> None:
    text = render_graph(FakeEngine().graph(), "//app:layer", "json")
    assert text == textwrap.dedent("""\
        {
          "nodes": {
            "//app:layer": {
              "deps": [
                "//app:main.sh",
                "//lib:util"
              ],
              "kind": "files"
            },
            "//app:main.sh": {
              "deps": [],
              "kind": "source file"
            },
            "//lib:util": {
              "deps": [
                "//lib:util.sh",
                "//tools:gen"
              ],
              "kind": "genrule"
            },
            "//lib:util.sh": {
              "deps": [],
              "kind": "source file"
            },
            "//tools:gen": {
              "deps": [
                "//tools:gen.py"
              ],
              "kind": "genrule"
            },
            "//tools:gen.py": {
              "deps": [],
              "kind": "source file"
            }
          },
          "root": "//app:layer"
        }""")
    assert json.loads(text)["root"] == "//app:layer"


def test_render_sorts_and_deduplicates_deps() -> None:
    world = {"//a:a": ("genrule", ["//a:z", "//a:m", "//a:z"]), "//a:z": ("files", []), "//a:m": ("files", [])}
    graph = FakeEngine(world).graph()
    assert json.loads(render_graph(graph, "//a:a", "json"))["nodes"]["//a:a"]["deps"] == ["//a:m", "//a:z"]
    assert render_graph(graph, "//a:a", "tree") == "//a:a\n├── //a:m\n└── //a:z"


def test_render_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown graph format 'svg'; the formats are dot, json, tree"):
        render_graph(FakeEngine().graph(), "//chain:one", "svg")


def test_importing_the_module_does_not_import_networkx() -> None:
    code = "import sys, dtbuild.engine.query; print('networkx' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False", "dtbuild.engine.query (or dtbuild.engine) imports networkx eagerly"
