"""Attribute schemas: each rule declares its attributes as data.

The loader uses them to check and coerce what a BUILD file passed (with did-you-mean
suggestions and messages that name the attribute), and docs/rules.md is generated from
their ``doc`` strings. Values stay plain Python data: strings, ints, bools, lists and
dicts; label-typed attributes hold canonical label strings (``//pkg:name``) after
coercion, and ``source_list`` entries hold either a canonical label or a
package-relative path, resolved to a target or a source file during analysis.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MISSING: Any = object()

#: Resolves a label string written in a BUILD file to its canonical form, or raises
#: ValueError with a message. Supplied by the loader (it knows the current package).
LabelResolver = Callable[[str], str]


class AttrValueError(ValueError):
    """A value does not fit an attribute; the message completes "the 'x' attribute ..."."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Attr:
    type: str
    doc: str
    default: Any = MISSING
    #: For strings: the only values allowed (an enum).
    values: tuple[str, ...] | None = None
    #: For strings: the values come from a plugin registry ("compressors", "executors").
    values_from: str | None = None
    #: ``None`` is accepted (and is the default when no other is given).
    allow_none: bool = False
    #: For label types: the provider classes a dependency must return.
    # builtins.type: inside this class body, `type` is the field above.
    providers: tuple[builtins.type, ...] = ()

    @property
    def mandatory(self) -> bool:
        return self.default is MISSING and not self.allow_none

    def default_value(self) -> Any:
        if self.default is MISSING:
            return None
        # Fresh copies of mutable defaults, so no two targets share one list.
        if isinstance(self.default, list):
            return list(self.default)
        if isinstance(self.default, dict):
            return dict(self.default)
        return self.default

    @property
    def is_dependency(self) -> bool:
        return self.type in ("label", "label_list", "source_list", "source")

    @property
    def accepts_sources(self) -> bool:
        return self.type in ("source_list", "source")

    def describe_type(self) -> str:
        return _TYPE_WORDS[self.type] + (" or None" if self.allow_none else "")

    def coerce(self, value: Any, resolve_label: LabelResolver,
               registry_values: Mapping[str, Sequence[str]] | None = None) -> Any:
        """Check ``value`` against this attribute and return its canonical form."""
        if value is None and (self.allow_none or self.default is None):
            return None
        coerce = _COERCERS[self.type]
        result = coerce(self, value, resolve_label)
        choices = self.values
        if self.values_from is not None and registry_values is not None:
            choices = tuple(sorted(registry_values.get(self.values_from, ())))
        if choices is not None and result not in choices:
            import difflib

            close = difflib.get_close_matches(str(result), choices, n=1, cutoff=0.5)
            raise AttrValueError(
                f"must be one of {', '.join(choices)}, but was {result!r}",
                hint=f"did you mean '{close[0]}'?" if close else None)
        return result


_TYPE_WORDS = {
    "string": "a string",
    "int": "an integer",
    "bool": "a boolean",
    "string_list": "a list of strings",
    "string_dict": "a dict of strings to strings",
    "label": "a label",
    "label_list": "a list of labels",
    "source_list": "a list of source paths or labels",
    "source": "a source path or label",
    "dict": "a dict",
}


def _type_name(value: Any) -> str:
    return {str: "string", int: "int", bool: "bool", list: "list", dict: "dict",
            type(None): "None", tuple: "tuple"}.get(type(value), type(value).__name__)


def _wrong(attr: Attr, value: Any) -> AttrValueError:
    return AttrValueError(f"must be {attr.describe_type()}, but was {_type_name(value)} {value!r}")


def _string(attr: Attr, value: Any, _r: LabelResolver) -> str:
    if not isinstance(value, str):
        raise _wrong(attr, value)
    return value


def _int(attr: Attr, value: Any, _r: LabelResolver) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(attr, value)
    return value


def _bool(attr: Attr, value: Any, _r: LabelResolver) -> bool:
    if not isinstance(value, bool):
        raise _wrong(attr, value)
    return value


def _string_list(attr: Attr, value: Any, _r: LabelResolver) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong(attr, value)
    return list(value)


def _string_dict(attr: Attr, value: Any, _r: LabelResolver) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise _wrong(attr, value)
    return dict(value)


def _label(attr: Attr, value: Any, resolve: LabelResolver) -> str:
    if not isinstance(value, str):
        raise _wrong(attr, value)
    try:
        return resolve(value)
    except ValueError as e:
        raise AttrValueError(f"must be a label, but {e}") from None


def _label_list(attr: Attr, value: Any, resolve: LabelResolver) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong(attr, value)
    out = []
    for item in value:
        try:
            out.append(resolve(item))
        except ValueError as e:
            raise AttrValueError(f"must be a list of labels, but {e}") from None
    return out


def _source_item(item: str, resolve: LabelResolver) -> str:
    if item.startswith(("//", ":", "@")):
        try:
            return resolve(item)
        except ValueError as e:
            raise AttrValueError(f"must hold source paths or labels, but {e}") from None
    if item.startswith("/") or item in ("", ".") or ".." in item.split("/"):
        raise AttrValueError(
            f"must hold paths inside the package, but has {item!r}",
            hint="write paths relative to the BUILD file's directory, without '..'")
    return item.rstrip("/")


def _source_list(attr: Attr, value: Any, resolve: LabelResolver) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong(attr, value)
    return [_source_item(item, resolve) for item in value]


def _source(attr: Attr, value: Any, resolve: LabelResolver) -> str:
    if not isinstance(value, str):
        raise _wrong(attr, value)
    return _source_item(value, resolve)


def _dict(attr: Attr, value: Any, _r: LabelResolver) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _wrong(attr, value)
    return value


_COERCERS: dict[str, Callable[[Attr, Any, LabelResolver], Any]] = {
    "string": _string, "int": _int, "bool": _bool, "string_list": _string_list,
    "string_dict": _string_dict, "label": _label, "label_list": _label_list,
    "source_list": _source_list, "source": _source, "dict": _dict,
}


# --------------------------------------------------------------------------- constructors
# The functions rule authors call: ``attrs.string(doc=..., default=...)``. They are
# named ``integer``, ``boolean`` and ``dictionary`` rather than shadowing builtins.


def string(doc: str, default: Any = MISSING, *, values: Sequence[str] | None = None,
           values_from: str | None = None, allow_none: bool = False) -> Attr:
    return Attr("string", doc, default, tuple(values) if values is not None else None, values_from, allow_none)


def integer(doc: str, default: Any = MISSING, *, allow_none: bool = False) -> Attr:
    return Attr("int", doc, default, allow_none=allow_none)


def boolean(doc: str, default: Any = MISSING) -> Attr:
    return Attr("bool", doc, default)


def string_list(doc: str, default: Any = MISSING) -> Attr:
    return Attr("string_list", doc, default)


def string_dict(doc: str, default: Any = MISSING) -> Attr:
    return Attr("string_dict", doc, default)


def label(doc: str, default: Any = MISSING, *, providers: Sequence[type] = (), allow_none: bool = False) -> Attr:
    return Attr("label", doc, default, allow_none=allow_none, providers=tuple(providers))


def label_list(doc: str, default: Any = MISSING, *, providers: Sequence[type] = ()) -> Attr:
    return Attr("label_list", doc, default, providers=tuple(providers))


def source_list(doc: str, default: Any = MISSING) -> Attr:
    return Attr("source_list", doc, default)


def source(doc: str, default: Any = MISSING) -> Attr:
    return Attr("source", doc, default)


def dictionary(doc: str, default: Any = MISSING) -> Attr:
    return Attr("dict", doc, default)

