"""The query language of ``dtbuild query`` and the renderers of ``dtbuild graph``.

A subset of Bazel's query language, self-contained: the engine hands in the target graph
as two callables (see `QueryGraph`) and turns `QuerySyntaxError` into its own errors.

Grammar (all set operators share one precedence and associate to the left, as in Bazel,
so ``a - b + c`` is ``(a - b) + c``)::

    expr := WORD                              a target pattern: //pkg:name, //pkg, //pkg/..., //pkg:all, :name
          | deps(expr [, DEPTH])              expr and what it depends on, transitively (DEPTH 0 = expr)
          | rdeps(universe, expr [, DEPTH])   what depends on expr, within deps(universe)
          | kind(REGEX, expr)                 the nodes of expr whose kind matches REGEX
          | somepath(from, to)                the nodes of one shortest path from some node of `from` to `to`
          | allpaths(from, to)                the nodes of every path from some node of `from` to `to`
          | expr (+ | union | - | except | ^ | intersect) expr
          | ( expr )

Words are unquoted (letters, digits and ``*/@.-_:$~[]``, not starting with ``-`` or ``*``)
or quoted with ``'...'`` or ``"..."`` (no escapes); a quoted word is never an operator
or a function name, so ``"union"`` is a target pattern.

``kind`` matches like Bazel's: ``re.search`` against the node's kind as Bazel spells it,
``"<rule> rule"`` for targets and ``"source file"`` for files. So ``kind(genrule, x)`` and
``kind("genrule rule", x)`` both select genrules, ``kind(rule, x)`` selects every target,
``kind(file, x)`` every source file, and ``kind(image, x)`` also matches ``layered_image``
(anchor it, ``kind("^image ", x)``, to mean only ``image``).

Results are sets of labels; `evaluate` returns them sorted by label string, so the
output is deterministic and independent of how the graph was discovered.

The graph grows lazily: a pattern is resolved once, and a node is loaded only when its
dependencies are needed (``deps(x, 1)`` loads ``x`` and nothing else). networkx is
imported only by the functions that use it, because the CLI's start-up time matters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import networkx

__all__ = [
    "FUNCTIONS",
    "GRAPH_FORMATS",
    "AllPaths",
    "Deps",
    "Expression",
    "Kind",
    "Pattern",
    "QueryGraph",
    "QueryNode",
    "QuerySyntaxError",
    "ReverseDeps",
    "SetOperation",
    "SomePath",
    "UnknownFunctionError",
    "bazel_kind",
    "evaluate",
    "parse",
    "render_graph",
]

#: The function names the language knows, sorted.
FUNCTIONS = ("allpaths", "deps", "kind", "rdeps", "somepath")

#: The formats `render_graph` accepts.
GRAPH_FORMATS = ("dot", "json", "tree")


# --- errors -----------------------------------------------------------------------------


class QuerySyntaxError(ValueError):
    """A malformed query expression.

    ``str(error)`` is ``query: <reason> at column <column>``, then the expression and a
    caret under the offending character, then ``hint: ...`` when there is a hint.
    """

    def __init__(self, reason: str, expression: str, position: int, hint: str | None = None) -> None:
        self.reason = reason
        self.expression = expression
        #: 0-based offset of the offending character (len(expression) at the end of input).
        self.position = position
        self.hint = hint
        super().__init__(self._render())

    @property
    def column(self) -> int:
        """1-based column of the offending character."""
        return self.position + 1

    def _render(self) -> str:
        # Tabs and newlines would move the caret: show each as one space.
        shown = re.sub(r"\s", " ", self.expression)
        lines = [f"query: {self.reason} at column {self.column}", f"  {shown}", "  " + " " * self.position + "^"]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


class UnknownFunctionError(QuerySyntaxError):
    """A call of a function the language does not have, with a did-you-mean hint."""

    def __init__(self, name: str, expression: str, position: int) -> None:
        import difflib

        self.name = name
        by_lowercase = {function.lower(): function for function in FUNCTIONS}
        close = difflib.get_close_matches(name.lower(), list(by_lowercase), n=1, cutoff=0.6)
        #: The closest function name, or None when none is close.
        self.suggestion = by_lowercase[close[0]] if close else None
        hint = (f"did you mean '{self.suggestion}'?" if self.suggestion
                else f"the functions are {', '.join(FUNCTIONS)}")
        super().__init__(f"unknown function '{name}'", expression, position, hint)


# --- the graph --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueryNode:
    """One node of the target graph, as the engine describes it."""

    label: str  #: canonical "//pkg:name"
    kind: str  #: the rule name ("genrule"), or "source file"
    deps: tuple[str, ...]  #: canonical labels of the direct dependencies (targets and source files)


def bazel_kind(kind: str) -> str:
    """The kind as Bazel spells it, which ``kind()`` matches against: rule names get a
    ``" rule"`` suffix; kinds that already have a space ("source file") are kept."""
    return kind if " " in kind else f"{kind} rule"


class QueryGraph:
    """The target graph, discovered lazily through two callables from the engine.

    ``resolve_pattern(word)`` expands a target pattern word (``//a/...``, ``//a:all``,
    ``//a:b``, ``//a``) to canonical labels; ``node(label)`` loads one node. Errors they
    raise for unknown packages or labels propagate unchanged. Each answer is cached.
    """

    def __init__(self, resolve_pattern: Callable[[str], Sequence[str]], node: Callable[[str], QueryNode]) -> None:
        self._resolve_pattern = resolve_pattern
        self._load_node = node
        self._patterns: dict[str, tuple[str, ...]] = {}
        self._nodes: dict[str, QueryNode] = {}

    def to_networkx(self, roots: Iterable[str]) -> networkx.DiGraph:
        """The transitive closure of ``roots``: edges go from a target to its dependency,
        and each node has a ``kind`` attribute. Nodes and edges are added in sorted order."""
        import networkx as nx

        closure = sorted(self._reachable(roots))
        graph: networkx.DiGraph[str] = nx.DiGraph()
        for label in closure:
            graph.add_node(label, kind=self._node(label).kind)
        for label in closure:
            for dep in self._direct_deps(label):
                graph.add_edge(label, dep)
        return graph

    def _resolve(self, word: str) -> tuple[str, ...]:
        if word not in self._patterns:
            self._patterns[word] = tuple(self._resolve_pattern(word))
        return self._patterns[word]

    def _node(self, label: str) -> QueryNode:
        if label not in self._nodes:
            self._nodes[label] = self._load_node(label)
        return self._nodes[label]

    def _direct_deps(self, label: str) -> list[str]:
        return sorted(set(self._node(label).deps))

    def _reachable(self, roots: Iterable[str], max_depth: int | None = None) -> set[str]:
        """``roots`` and the nodes at most ``max_depth`` edges below them (no limit when None).
        Loads only the nodes whose dependencies are needed, so depth 0 loads nothing."""
        seen = set(roots)
        frontier = sorted(seen)
        depth = 0
        while frontier and (max_depth is None or depth < max_depth):
            below: list[str] = []
            for label in frontier:
                for dep in self._direct_deps(label):
                    if dep not in seen:
                        seen.add(dep)
                        below.append(dep)
            frontier = below
            depth += 1
        return seen


# --- the syntax tree --------------------------------------------------------------------
# ``position`` is the offset where the expression starts; it is left out of comparisons
# so that trees parsed from differently spaced text are equal.


@dataclass(frozen=True, slots=True)
class Pattern:
    """A target pattern word."""

    word: str
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Deps:
    """``deps(target[, depth])``."""

    target: Expression
    depth: int | None = None
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ReverseDeps:
    """``rdeps(universe, target[, depth])``."""

    universe: Expression
    target: Expression
    depth: int | None = None
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Kind:
    """``kind(pattern, target)``; ``pattern`` is a regular expression."""

    pattern: str
    target: Expression
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SomePath:
    """``somepath(start, end)``."""

    start: Expression
    end: Expression
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class AllPaths:
    """``allpaths(start, end)``."""

    start: Expression
    end: Expression
    position: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class SetOperation:
    """``left OP right``; ``operator`` is ``+`` (union), ``-`` (except) or ``^`` (intersect)."""

    operator: str
    left: Expression
    right: Expression
    position: int = field(default=0, compare=False)


Expression = Pattern | Deps | ReverseDeps | Kind | SomePath | AllPaths | SetOperation


# --- tokenizer --------------------------------------------------------------------------

_WORD = "word"
_END = "end of expression"
_SET_OPERATORS = {"+": "+", "-": "-", "^": "^", "union": "+", "except": "-", "intersect": "^"}
_PUNCTUATION = {"(", ")", ",", "+", "-", "^"}
# Bazel's unquoted word alphabet; a word may not start with '-' (that is the operator) or '*'.
_UNQUOTED_WORD = re.compile(r"[A-Za-z0-9/@._:$~\[\]][A-Za-z0-9*/@._:$~\[\]-]*")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEPTH = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # _WORD, _END, or the punctuation itself; keyword operators become their symbol
    text: str
    position: int
    quoted: bool = False

    def describe(self) -> str:
        if self.kind == _END:
            return "end of expression"
        if self.kind == _WORD:
            return f"word {self.text!r}" if not self.quoted else f"quoted word {self.text!r}"
        return f"'{self.text}'"


def _tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(expression):
        char = expression[position]
        if char.isspace():
            position += 1
        elif char in _PUNCTUATION:
            tokens.append(_Token(char, char, position))
            position += 1
        elif char in "'\"":
            closing = expression.find(char, position + 1)
            if closing < 0:
                raise QuerySyntaxError("unterminated quoted word", expression, position,
                                       f"close it with {char}")
            tokens.append(_Token(_WORD, expression[position + 1:closing], position, quoted=True))
            position = closing + 1
        elif match := _UNQUOTED_WORD.match(expression, position):
            word = match.group()
            kind = _SET_OPERATORS.get(word, _WORD)
            tokens.append(_Token(kind, word, position))
            position = match.end()
        else:
            raise QuerySyntaxError(f"unexpected character {char!r}", expression, position,
                                   "quote a word that contains it: \"...\" or '...'")
    tokens.append(_Token(_END, "", len(expression)))
    return tokens


# --- parser -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Signature:
    usage: str
    min_arguments: int
    max_arguments: int


_SIGNATURES = {
    "allpaths": _Signature("allpaths(FROM, TO)", 2, 2),
    "deps": _Signature("deps(EXPR) or deps(EXPR, DEPTH)", 1, 2),
    "kind": _Signature("kind(REGEX, EXPR)", 2, 2),
    "rdeps": _Signature("rdeps(UNIVERSE, EXPR) or rdeps(UNIVERSE, EXPR, DEPTH)", 2, 3),
    "somepath": _Signature("somepath(FROM, TO)", 2, 2),
}
assert tuple(sorted(_SIGNATURES)) == FUNCTIONS


def parse(expression: str) -> Expression:
    """The syntax tree of ``expression``; raises `QuerySyntaxError` (or its subclass
    `UnknownFunctionError`) pointing at the first problem."""
    return _Parser(expression).parse()


class _Parser:
    """Recursive descent over the token list; one token of lookahead."""

    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = _tokenize(expression)
        self.index = 0

    def parse(self) -> Expression:
        tree = self._expression()
        token = self._peek()
        if token.kind == ")":
            raise self._error(f"unexpected {token.describe()}", token, "this ')' closes no '('")
        if token.kind != _END:
            raise self._error(f"unexpected {token.describe()}", token,
                              "join expressions with an operator: + (union), - (except), ^ (intersect); "
                              "quote a word that contains spaces")
        return tree

    def _peek(self) -> _Token:
        return self.tokens[self.index]

    def _advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != _END:
            self.index += 1
        return token

    def _error(self, reason: str, token: _Token, hint: str | None = None) -> QuerySyntaxError:
        return QuerySyntaxError(reason, self.expression, token.position, hint)

    def _expression(self) -> Expression:
        tree = self._primary()
        while self._peek().kind in ("+", "-", "^"):
            operator = self._advance().kind
            tree = SetOperation(operator, tree, self._primary(), position=tree.position)
        return tree

    def _primary(self) -> Expression:
        token = self._advance()
        if token.kind == "(":
            inner = self._expression()
            self._close(token)
            return inner
        if token.kind == _WORD:
            if not token.quoted and _IDENTIFIER.fullmatch(token.text) and self._peek().kind == "(":
                return self._call(token)
            return Pattern(token.text, position=token.position)
        raise self._error(f"unexpected {token.describe()}", token,
                          "expected an expression: a target pattern, a function call or '('")

    def _close(self, opening: _Token) -> _Token:
        token = self._advance()
        if token.kind != ")":
            raise self._error(f"unexpected {token.describe()}", token,
                              f"expected ')' to close the '(' at column {opening.position + 1}")
        return token

    def _call(self, name: _Token) -> Expression:
        signature = _SIGNATURES.get(name.text)
        if signature is None:
            raise UnknownFunctionError(name.text, self.expression, name.position)
        opening = self._advance()
        arguments = [self._expression()]
        while self._peek().kind == ",":
            self._advance()
            arguments.append(self._expression())
        closing = self._close(opening)
        given = len(arguments)
        if not signature.min_arguments <= given <= signature.max_arguments:
            where = arguments[signature.max_arguments].position if given > signature.max_arguments else closing.position
            accepted = (str(signature.min_arguments) if signature.min_arguments == signature.max_arguments
                        else f"{signature.min_arguments} or {signature.max_arguments}")
            amount = "many" if given > signature.max_arguments else "few"
            raise QuerySyntaxError(f"too {amount} arguments to {name.text}() (it takes {accepted})",
                                   self.expression, where, f"usage: {signature.usage}")
        at = name.position
        match name.text:
            case "deps":
                depth = self._depth(name.text, arguments[1]) if given == 2 else None
                return Deps(arguments[0], depth, position=at)
            case "rdeps":
                depth = self._depth(name.text, arguments[2]) if given == 3 else None
                return ReverseDeps(arguments[0], arguments[1], depth, position=at)
            case "kind":
                return Kind(self._regex(arguments[0]), arguments[1], position=at)
            case "somepath":
                return SomePath(arguments[0], arguments[1], position=at)
            case _:
                return AllPaths(arguments[0], arguments[1], position=at)

    def _depth(self, function: str, argument: Expression) -> int:
        if isinstance(argument, Pattern) and _DEPTH.fullmatch(argument.word):
            return int(argument.word)
        shown = repr(argument.word) if isinstance(argument, Pattern) else "expression"
        raise QuerySyntaxError(f"bad depth {shown} in {function}()", self.expression, argument.position,
                               f"a depth is a non-negative integer; usage: {_SIGNATURES[function].usage}")

    def _regex(self, argument: Expression) -> str:
        if not isinstance(argument, Pattern):
            raise QuerySyntaxError("the first argument of kind() must be a word (a regular expression), "
                                   "but was an expression", self.expression, argument.position,
                                   f"usage: {_SIGNATURES['kind'].usage}")
        try:
            re.compile(argument.word)
        except re.error as error:
            raise QuerySyntaxError(f"invalid regular expression {argument.word!r} in kind()",
                                   self.expression, argument.position, error.msg) from None
        return argument.word


# --- evaluator --------------------------------------------------------------------------


def evaluate(expression: str, graph: QueryGraph) -> list[str]:
    """The labels ``expression`` denotes, sorted by label string (plain `str` order; Bazel's
    ``--order_output=no`` leaves the order unspecified, we make it deterministic)."""
    return sorted(_Evaluator(graph, expression).evaluate(parse(expression)))


class _Evaluator:
    def __init__(self, graph: QueryGraph, expression: str) -> None:
        self.graph = graph
        self.expression = expression

    def evaluate(self, tree: Expression) -> set[str]:
        match tree:
            case Pattern(word=word):
                if not word:
                    raise QuerySyntaxError("empty target pattern", self.expression, tree.position)
                return set(self.graph._resolve(word))
            case SetOperation(operator=operator, left=left, right=right):
                left_labels, right_labels = self.evaluate(left), self.evaluate(right)
                if operator == "+":
                    return left_labels | right_labels
                if operator == "-":
                    return left_labels - right_labels
                return left_labels & right_labels
            case Deps(target=target, depth=depth):
                return self.graph._reachable(self.evaluate(target), depth)
            case ReverseDeps(universe=universe, target=target, depth=depth):
                return self._reverse_deps(self.evaluate(universe), self.evaluate(target), depth)
            case Kind(pattern=pattern, target=target):
                matcher = re.compile(pattern)
                return {label for label in self.evaluate(target)
                        if matcher.search(bazel_kind(self.graph._node(label).kind))}
            case SomePath(start=start, end=end):
                return self._some_path(self.evaluate(start), self.evaluate(end))
            case AllPaths(start=start, end=end):
                # Every node of deps(start) reaches from start, so the nodes on a path to
                # `end` are exactly those that reach `end`: the reverse deps within deps(start).
                return self._reverse_deps(self.evaluate(start), self.evaluate(end), None)
        raise TypeError(f"not a query expression: {tree!r}")  # pragma: no cover

    def _reverse_deps(self, universe: set[str], targets: set[str], depth: int | None) -> set[str]:
        import networkx as nx

        graph = self.graph.to_networkx(universe)
        sources = sorted(label for label in targets if label in graph)
        if not sources:
            return set()
        found: set[str] = set()
        for distance, layer in enumerate(nx.bfs_layers(graph.reverse(copy=False), sources)):
            if depth is not None and distance > depth:
                break
            found.update(layer)
        return found

    def _some_path(self, starts: set[str], ends: set[str]) -> set[str]:
        """One shortest path, chosen deterministically: breadth-first from all of ``starts``,
        the first layer that holds an end gives the smallest such end label, then each step
        back takes the smallest label of the previous layer with an edge to it."""
        import networkx as nx

        if not starts or not ends:
            return set()
        graph = self.graph.to_networkx(starts)
        layers: list[list[str]] = []
        for layer in nx.bfs_layers(graph, sorted(starts)):
            layers.append(layer)
            reached = [label for label in layer if label in ends]
            if reached:
                break
        else:
            return set()
        path = [min(reached)]
        for previous in reversed(layers[:-1]):
            in_previous = set(previous)
            path.append(min(label for label in graph.predecessors(path[-1]) if label in in_previous))
        return set(path)


# --- rendering --------------------------------------------------------------------------


def render_graph(graph: QueryGraph, root: str, fmt: str) -> str:
    """The dependency graph below the canonical label ``root``, without a trailing newline.

    - ``tree``: the root, then its dependencies indented (sorted, drawn like ``cargo tree``);
      a node already shown is shown again with `` (*)`` and not expanded again.
    - ``dot``: a Graphviz digraph, every node and then every edge, each sorted.
    - ``json``: ``{"root": label, "nodes": {label: {"kind": ..., "deps": [...]}}}``,
      deps sorted, keys sorted, indented by 2.
    """
    if fmt == "tree":
        return _render_tree(graph, root)
    if fmt == "dot":
        return _render_dot(graph, root)
    if fmt == "json":
        return _render_json(graph, root)
    raise ValueError(f"unknown graph format {fmt!r}; the formats are {', '.join(GRAPH_FORMATS)}")


def _render_tree(graph: QueryGraph, root: str) -> str:
    lines = [root]
    shown = {root}
    # An explicit stack (children, next child index, indentation) so deep chains cannot
    # exhaust Python's recursion limit.
    stack: list[tuple[list[str], int, str]] = [(graph._direct_deps(root), 0, "")]
    while stack:
        children, index, indent = stack[-1]
        if index == len(children):
            stack.pop()
            continue
        stack[-1] = (children, index + 1, indent)
        child = children[index]
        is_last = index == len(children) - 1
        branch, continuation = ("└── ", "    ") if is_last else ("├── ", "│   ")
        if child in shown:
            lines.append(f"{indent}{branch}{child} (*)")
            continue
        shown.add(child)
        lines.append(f"{indent}{branch}{child}")
        grandchildren = graph._direct_deps(child)
        if grandchildren:
            stack.append((grandchildren, 0, indent + continuation))
    return "\n".join(lines)


def _dot_quote(label: str) -> str:
    return '"' + label.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _render_dot(graph: QueryGraph, root: str) -> str:
    closure = sorted(graph._reachable([root]))
    lines = ["digraph dtbuild {", "  node [shape=box];"]
    lines += [f"  {_dot_quote(label)};" for label in closure]
    lines += [f"  {_dot_quote(label)} -> {_dot_quote(dep)};" for label in closure for dep in graph._direct_deps(label)]
    lines.append("}")
    return "\n".join(lines)


def _render_json(graph: QueryGraph, root: str) -> str:
    nodes = {label: {"kind": graph._node(label).kind, "deps": graph._direct_deps(label)}
             for label in graph._reachable([root])}
    return json.dumps({"root": root, "nodes": nodes}, indent=2, sort_keys=True, ensure_ascii=False)
