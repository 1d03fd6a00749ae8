"""``deb_packages``: Debian packages as a package source, pinned by a lock file.

``dtbuild lock //pkg:name`` resolves the packages against signed indexes and writes the
lock (the ``lock`` command of the ``debian`` plugin, which reads :class:`DebSourcesInfo`);
a build never resolves. Analysis reads the lock (``RuleContext.read_source_file``, so an
edited lock analyses the target again) and declares, per locked ``.deb``, a ``FetchUrl``
action (the lock's URL and sha256: the download is checked and cached by its digest, so a
warm cache builds offline) and a ``DebExtract`` action (plugins/builtin/deb_actions.py:
the data tree plus the dpkg database entries ``/var/lib/dpkg/status.d/NAME`` and
``NAME.md5sums``). Each ``.deb`` is one :class:`PackageInfo` whose ``deps`` are its locked
dependencies, so ``layered_image`` gives one layer per package.

A lock that is missing, stale (written for other sources, packages or architectures) or
malformed does not stop analysis (``dtbuild lock`` must analyse the target to write it):
the target then provides a package whose only entry is the output of a ``DebLockProblem``
action, which fails the build with what is wrong and the command to run.

The lock holds the closure of each architecture listed; the target's packages are those
of the first one (one architecture per image: list several only to lock them together),
and of its entries only those the requested packages reach are fetched.
Dependency cycles (Debian has a few, libc6 and libgcc-s1 among them) are broken
deterministically: a depth-first walk from the requested packages, in name order, drops
exactly the edges that lead back to a package still being walked. Every package stays
reachable; a dropped edge only changes which layer comes first.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dtbuild.rules import attrs
from dtbuild.rules.api import RuleContext, rule
from dtbuild.rules.artifacts import Artifact
from dtbuild.rules.providers import DefaultInfo, PackageEntry, PackageInfo, Provider

#: Debian's architecture names (dpkg-architecture -L, the release architectures and the
#: ports most used). ``all`` is a package's architecture, not a machine's.
DEB_ARCHITECTURES = ("amd64", "arm64", "armel", "armhf", "i386", "loong64", "mips64el", "mipsel", "ppc64el",
                     "riscv64", "s390x", "alpha", "hppa", "hurd-amd64", "hurd-i386", "ia64", "m68k", "powerpc",
                     "ppc64", "sh4", "sparc64", "x32")
#: The lock format this rule reads.
LOCK_VERSION = 1
#: The most bytes of a lock file analysis reads.
MAX_LOCK_BYTES = 64 << 20
#: Debian policy 5.6.1: lowercase letters, digits, '+', '-', '.'; at least two
#: characters, starting with a letter or digit.
PACKAGE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9.+~:-]+$")
_URL_SCHEMES = ("http://", "https://", "file://")


@dataclass(frozen=True, slots=True)
class DebSourcesInfo(Provider):
    """What ``dtbuild lock`` needs of a ``deb_packages`` target to write its lock."""

    label: str
    #: ``"URL SUITE COMPONENT [COMPONENT...]"`` as given (validated at analysis).
    sources: tuple[str, ...]
    #: The keyring InRelease signatures are checked against: a source file or the one
    #: file of another target.
    keyring: Artifact
    #: The requested package names, sorted.
    packages: tuple[str, ...]
    #: Debian architectures, as given (the first is the one the target provides).
    architectures: tuple[str, ...]
    #: Workspace-relative path of the lock file.
    lockfile: str
    #: ``"sha256:"`` + sha256 of the canonical JSON of ``{"architectures", "packages",
    #: "sources"}``: a lock written for other inputs is stale.
    inputs_digest: str


def canonical_json(value: Any) -> str:
    """The JSON text digests of rule inputs are taken over (sorted keys, no spaces)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def inputs_digest(sources: Sequence[str], packages: Sequence[str], architectures: Sequence[str]) -> str:
    """The digest a lock records of the inputs it was resolved from."""
    text = canonical_json({"architectures": list(architectures), "packages": sorted(set(packages)),
                           "sources": list(sources)})
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class LockedDeb:
    """One package of the lock, as the build uses it."""

    name: str
    version: str
    architecture: str
    url: str
    sha256: str
    size: int
    depends: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """The lock file's entry (``dtbuild lock`` writes it, :func:`parse_lock` reads it)."""
        return {"name": self.name, "version": self.version, "architecture": self.architecture, "url": self.url,
                "sha256": self.sha256, "size": self.size, "depends": list(self.depends)}


class LockProblem(Exception):
    """The lock cannot be used: the message says why (without the command to run)."""


# --------------------------------------------------------------------------- attributes


def _closest(word: str, choices: Sequence[str]) -> str | None:
    from difflib import get_close_matches

    close = get_close_matches(word, choices, n=1)
    return close[0] if close else None


def _check_sources(ctx: RuleContext) -> tuple[str, ...]:
    sources = ctx.attr.sources
    if not sources:
        ctx.fail("must list at least one source, such as \"http://deb.debian.org/debian bookworm main\"",
                 attr="sources")
    seen: set[str] = set()
    for source in sources:
        parts = source.split()
        if len(parts) < 3:
            ctx.fail(f"must hold sources of the form \"URL SUITE COMPONENT [COMPONENT...]\", but has {source!r}",
                     attr="sources", hint="e.g. \"http://deb.debian.org/debian bookworm main\" (as in a "
                                          "sources.list line, without 'deb' and options)")
        url, suite, components = parts[0], parts[1], parts[2:]
        if not url.startswith(_URL_SCHEMES) or len(url) <= len(url.split("://", 1)[0]) + 3:
            ctx.fail(f"must start each source with an http, https or file URL, but has {source!r}", attr="sources",
                     hint="a source is \"URL SUITE COMPONENT\", as a sources.list line without 'deb'")
        if url.startswith("[") or suite.startswith("["):
            ctx.fail(f"has sources.list options in {source!r}, which deb_packages does not take", attr="sources",
                     hint="architectures go in the 'architectures' attribute; signatures are checked "
                          "against 'keyring'")
        if suite.endswith("/") or suite.startswith("/"):
            ctx.fail(f"has the flat repository {source!r}; deb_packages reads only suites with components",
                     attr="sources")
        if len(set(components)) != len(components):
            ctx.fail(f"lists a component twice in {source!r}", attr="sources")
        key = " ".join(parts)
        if key in seen:
            ctx.fail(f"lists the source {source!r} twice", attr="sources")
        seen.add(key)
    return tuple(sources)


def _check_packages(ctx: RuleContext) -> tuple[str, ...]:
    packages = ctx.attr.packages
    if not packages:
        ctx.fail("must list at least one package", attr="packages")
    seen: set[str] = set()
    for name in packages:
        if not PACKAGE_NAME_RE.match(name):
            lower = name.lower()
            ctx.fail(f"must hold Debian package names (lowercase letters, digits, '+', '-' and '.', at least two "
                     f"characters, starting with a letter or digit), but has {name!r}", attr="packages",
                     hint=f"did you mean {lower!r}?" if PACKAGE_NAME_RE.match(lower) else
                     "write the package's name only, without a version or an architecture")
        if name in seen:
            ctx.fail(f"lists {name!r} twice", attr="packages")
        seen.add(name)
    return tuple(sorted(packages))


def _check_architectures(ctx: RuleContext) -> tuple[str, ...]:
    architectures = ctx.attr.architectures
    if not architectures:
        ctx.fail("must list at least one Debian architecture, such as \"amd64\"", attr="architectures")
    seen: set[str] = set()
    for arch in architectures:
        if arch not in DEB_ARCHITECTURES:
            close = _closest(arch, DEB_ARCHITECTURES)
            hint = f"did you mean {close!r}?" if close else None
            if arch == "all":
                hint = "'all' is the architecture of packages for every machine; they are locked with any of these"
            ctx.fail(f"must hold Debian architectures ({', '.join(DEB_ARCHITECTURES)}), but has {arch!r}",
                     attr="architectures", hint=hint)
        if arch in seen:
            ctx.fail(f"lists {arch!r} twice", attr="architectures")
        seen.add(arch)
    return tuple(architectures)


def _check_lockfile(ctx: RuleContext) -> str:
    name = ctx.attr.lockfile
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or any(c in name for c in "\0\n\r\\"):
        ctx.fail(f"must be a file name relative to the BUILD file's directory, without '.', '..' or empty parts, "
                 f"but was {name!r}", attr="lockfile", hint="e.g. \"debian.lock.json\"")
    return f"{ctx.package}/{name}" if ctx.package else name


def _check_keyring(ctx: RuleContext) -> Artifact:
    files = ctx.files("keyring")
    if len(files) != 1 or files[0].is_tree:
        what = "a directory" if files and files[0].is_tree else f"{len(files)} files"
        ctx.fail(f"must name one keyring file (a source file, or a target with one output file), but "
                 f"names {what}", attr="keyring",
                 hint="use the binary keyring gpg --export writes, such as debian-archive-keyring.gpg")
    return files[0]


# --------------------------------------------------------------------------- the lock


def _field_error(where: str, message: str) -> LockProblem:
    return LockProblem(f"{where} {message}")


def _string(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise _field_error(f"{where}.{key}", f"must be a non-empty string, but is {json.dumps(value)}")
    return value


def parse_lock(data: bytes, info: DebSourcesInfo) -> list[LockedDeb]:
    """The packages the lock pins for the first architecture of ``info``.

    :raises LockProblem: for a lock that is not the lock format, was written for other
        inputs (stale), or names a field wrongly (the message names the field).
    """
    try:
        lock = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LockProblem(f"is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise LockProblem(f"is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if not isinstance(lock, dict):
        raise LockProblem(f"must hold a JSON object, but holds {type(lock).__name__}")
    if lock.get("version") != LOCK_VERSION:
        raise _field_error("version", f"must be {LOCK_VERSION}, but is {json.dumps(lock.get('version'))} (a lock "
                                      "another dtbuild wrote)")
    if lock.get("inputs_digest") != info.inputs_digest:
        raise LockProblem("is stale (sources, packages or architectures changed since it was written)")
    arches = lock.get("architectures")
    if not isinstance(arches, dict):
        raise _field_error("architectures", "must be an object of package lists by architecture")
    first = info.architectures[0]
    entries = arches.get(first)
    if not isinstance(entries, list):
        raise _field_error(f"architectures.{first}", "must be a list of packages")
    locked: dict[str, LockedDeb] = {}
    previous = ""
    for index, entry in enumerate(entries):
        where = f"architectures.{first}[{index}]"
        if not isinstance(entry, dict):
            raise _field_error(where, "must be an object")
        name = _string(entry, "name", where)
        if not PACKAGE_NAME_RE.match(name):
            raise _field_error(f"{where}.name", f"is not a Debian package name: {json.dumps(name)}")
        where = f"architectures.{first}[{index}] ({name})"
        if name <= previous:
            raise _field_error(f"{where}.name", f"must sort after {previous!r}: entries are sorted by name, "
                                                "one per name")
        previous = name
        version = _string(entry, "version", where)
        if not _VERSION_RE.match(version):
            raise _field_error(f"{where}.version", f"is not a Debian version: {json.dumps(version)}")
        arch = _string(entry, "architecture", where)
        if arch not in (first, "all"):
            raise _field_error(f"{where}.architecture", f"must be {first!r} or 'all', but is {json.dumps(arch)}")
        url = _string(entry, "url", where)
        if not url.startswith(_URL_SCHEMES) or any(c.isspace() for c in url):
            raise _field_error(f"{where}.url", f"must be an http, https or file URL, but is {json.dumps(url)}")
        sha256 = _string(entry, "sha256", where)
        if not _SHA256_RE.match(sha256):
            raise _field_error(f"{where}.sha256", f"must be 64 lowercase hex digits, but is {json.dumps(sha256)}")
        size = entry.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _field_error(f"{where}.size", f"must be a byte count, but is {json.dumps(size)}")
        depends = entry.get("depends")
        if not isinstance(depends, list) or not all(isinstance(d, str) for d in depends):
            raise _field_error(f"{where}.depends", "must be a list of package names")
        locked[name] = LockedDeb(name, version, arch, url, sha256, size,
                                 tuple(sorted(set(d for d in depends if d != name))))
    for deb in locked.values():
        for dep in deb.depends:
            if dep not in locked:
                raise _field_error(f"architectures.{first} ({deb.name}).depends",
                                   f"names {dep!r}, which the lock does not hold")
    for name in info.packages:
        if name not in locked:
            raise _field_error(f"architectures.{first}", f"does not hold the requested package {name!r}")
    return [locked[name] for name in sorted(locked)]


def acyclic_deps(roots: Sequence[str], deps: Mapping[str, Sequence[str]]) -> tuple[list[str], dict[str, list[str]]]:
    """The packages reachable from ``roots``, each after its dependencies, and their
    dependencies with cycles broken: a depth-first walk from ``roots`` in the order given,
    each package's dependencies in name order, drops exactly the edges that lead back to
    a package still being walked. Every reachable package stays reachable from a root."""
    order: list[str] = []
    kept: dict[str, list[str]] = {}
    state: dict[str, int] = {}  # 1: being walked, 2: done
    for root in roots:
        if root in state:
            continue
        state[root] = 1
        kept[root] = []
        stack: list[tuple[str, list[str]]] = [(root, sorted(deps.get(root, ()), reverse=True))]
        while stack:
            node, pending = stack[-1]
            if not pending:
                stack.pop()
                state[node] = 2
                order.append(node)
                continue
            child = pending.pop()
            seen = state.get(child)
            if seen == 1:
                continue  # the edge closes a cycle: dropped
            kept[node].append(child)
            if seen is None:
                state[child] = 1
                kept[child] = []
                stack.append((child, sorted(deps.get(child, ()), reverse=True)))
    return order, kept


# --------------------------------------------------------------------------- the rule


def _lock_problem(ctx: RuleContext, info: DebSourcesInfo, message: str) -> list[Provider]:
    problem = ctx.declare_internal("lock-problem", is_tree=True)
    ctx.actions.declare("DebLockProblem", outputs={"out": problem},
                        params={"message": f"{info.lockfile} {message}: run `dtbuild lock {ctx.label}`"},
                        description=f"DebLockProblem {ctx.label}")
    return [info, DefaultInfo(files=(problem,)),
            PackageInfo(label=ctx.label, entries=(PackageEntry("/", problem),))]


def _deb_packages_impl(ctx: RuleContext) -> list[Provider]:
    sources = _check_sources(ctx)
    packages = _check_packages(ctx)
    architectures = _check_architectures(ctx)
    lockfile = _check_lockfile(ctx)
    keyring = _check_keyring(ctx)
    info = DebSourcesInfo(label=ctx.label, sources=sources, keyring=keyring, packages=packages,
                          architectures=architectures, lockfile=lockfile,
                          inputs_digest=inputs_digest(sources, packages, architectures))
    data = ctx.read_source_file(ctx.attr.lockfile, max_bytes=MAX_LOCK_BYTES)
    if data is None:
        return _lock_problem(ctx, info, "is missing")
    try:
        locked = parse_lock(data, info)
    except LockProblem as e:
        text = str(e)
        return _lock_problem(ctx, info, text if text.startswith(("is ", "must ")) else f"is malformed: {text}")

    by_name = {deb.name: deb for deb in locked}
    order, deps = acyclic_deps(packages, {deb.name: deb.depends for deb in locked})
    made: dict[str, PackageInfo] = {}
    trees: list[Artifact] = []
    for name in order:
        deb = by_name[name]
        archive = ctx.declare_internal(f"debs/{name}.deb")
        ctx.actions.declare(
            "FetchUrl", outputs={"out": archive}, network=True,
            params={"urls": [deb.url], "sha256": deb.sha256, "executable": False, "extract": False,
                    # What a wrong download means here: the file is not the one the lock names.
                    "mismatch_hint": f"the repository's file is not the one {info.lockfile} names; if it "
                                     f"changed on purpose, run `dtbuild lock {ctx.label}`"},
            description=f"FetchUrl {ctx.label} {name}_{deb.version.split(':', 1)[-1]}_{deb.architecture}.deb")
        tree = ctx.declare_internal(f"packages/{name}", is_tree=True)
        ctx.actions.declare(
            "DebExtract", inputs={"deb": [archive]}, outputs={"tree": tree},
            params={"name": name, "version": deb.version, "architecture": deb.architecture},
            description=f"DebExtract {ctx.label} {name}")
        trees.append(tree)
        made[name] = PackageInfo(label=f"{ctx.label}/{name}", entries=(PackageEntry("/", tree),),
                                 deps=tuple(made[dep] for dep in deps[name]), version=deb.version)
    root = PackageInfo(label=ctx.label, entries=(), deps=tuple(made[name] for name in packages))
    return [info, DefaultInfo(files=tuple(sorted(trees))), root]


deb_packages = rule(
    "deb_packages", _deb_packages_impl, version="1",
    doc="Debian packages from apt repositories, pinned by a lock file: `dtbuild lock` resolves `packages` "
        "and their dependencies (Depends and Pre-Depends) against the sources' signed indexes and writes "
        "`lockfile`; a build fetches each locked `.deb` by its sha256 (cached: a warm cache builds offline) "
        "and never resolves. Each `.deb` is a package of its own with its dependencies, so "
        "`layered_image(contents = [\":NAME\"])` gives one layer per package; each carries its dpkg "
        "database entry (`/var/lib/dpkg/status.d/PACKAGE` and `PACKAGE.md5sums`, as distroless writes "
        "them). Maintainer scripts are not run. A missing or stale lock fails the build with the command "
        "to run. See docs/debian.md.",
    attrs={
        "sources": attrs.string_list(doc="Repositories, each \"URL SUITE COMPONENT [COMPONENT...]\" (a "
                                         "sources.list line without `deb`), such as "
                                         "\"http://deb.debian.org/debian bookworm main\". Where several hold a "
                                         "package, the highest version wins."),
        "keyring": attrs.source(doc="The OpenPGP keyring (binary, as `gpg --export` writes it) the sources' "
                                    "InRelease signatures must verify against: a source file or a target "
                                    "with one output file."),
        "packages": attrs.string_list(doc="Names of the packages to install; their dependencies come too. "
                                          "Essential and required packages are not added implicitly."),
        "architectures": attrs.string_list(doc="Debian architectures to lock. The target provides the "
                                               "packages of the first; list more only to lock them together.",
                                           default=["amd64"]),
        "lockfile": attrs.string(doc="The lock file `dtbuild lock` writes, relative to the BUILD file's "
                                     "directory. Check it in.", default="debian.lock.json"),
    })
