"""Reading apt repositories and resolving Debian dependencies, for ``dtbuild lock``
(:mod:`.deb_lock_command`): deb822 paragraphs, dpkg's version order, relation fields,
the signed ``InRelease`` of a suite (checked with ``gpgv`` against the rule's keyring),
the ``Packages`` indexes it lists (checked against its SHA256 before a byte is parsed),
and the resolver that turns requested names into the locked closure.

Everything read from a repository is hostile until checked: downloads are bounded
(``[network]`` caps and deadlines, the exact size the signed release gives), only the
text gpgv prints as signed is read of an InRelease, a ``Packages`` file whose bytes do
not match the release is refused, decompression is bounded, and package names,
versions, architectures, file names, sizes and digests are checked against Debian's
syntax before they reach a lock.

How the resolver chooses (also in docs/debian.md):

* Depends and Pre-Depends are followed; Recommends, Suggests, Conflicts and Breaks are
  not, and Essential or priority-required packages are not added implicitly.
* For a name, the highest version that satisfies the relation wins, whichever source
  has it (the first source listed on a tie); one version per name.
* ``a | b``: a relation already satisfied by a chosen package is taken as it is;
  otherwise the first alternative whose closure resolves wins (the others are tried in
  order when it does not).
* A virtual name is satisfied first by a real package of that name, then by a chosen
  package that provides it, then by the provider whose name sorts first (its highest
  version). A versioned relation is satisfied only by a ``Provides: name (= version)``.
  Requested names are chosen before any dependency is followed, so listing a provider
  in ``packages`` selects it. Requesting a virtual name is an error listing its
  providers (the lock holds every requested name as a real package).
* Only packages of the locked architecture and ``all`` are candidates; ``:any``,
  ``:native`` and an architecture qualifier are satisfied by them (Multi-Arch is not
  checked: one architecture is resolved at a time).
* Architecture restrictions (``[amd64]``, ``[!i386]``) are honoured; build profiles
  (``<!nocheck>``) belong to source packages and are ignored.
* Choices are not revisited across relations: when a later relation needs a version of
  a name other than the one already chosen, resolution fails and says which chain
  chose it (pin the needed one by listing it, or fix the repository).
"""

from __future__ import annotations

import base64
import bz2
import difflib
import functools
import hashlib
import io
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dtbuild.plugins.interfaces import CommandFailed
from dtbuild.rules.builtin.deb import LockedDeb

#: The uncompressed size a Packages index may have when its release lists no size for it.
MAX_INDEX_SIZE = 1 << 30
#: Compressed forms of a Packages index, most preferred first ("" = uncompressed).
INDEX_COMPRESSIONS = (".xz", ".gz", "")
#: Seconds gpgv may take to check one InRelease.
GPGV_TIMEOUT = 60.0
#: Bounds of the resolver: alternatives tried in all, and alternatives nested.
MAX_TRIALS = 20000
MAX_NESTING = 200
#: Digest algorithms (OpenPGP ids) too weak to sign a release: MD5, SHA-1, RIPEMD-160.
WEAK_DIGESTS = {"1": "MD5", "2": "SHA-1", "3": "RIPEMD-160"}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_ARCH_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_UPSTREAM_RE = re.compile(r"^[0-9][A-Za-z0-9.+~-]*$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9.+~]+$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
#: A field name: printable ASCII but space and colon, not starting with '#' or '-'.
_FIELD_NAME_RE = re.compile(r"[!-\"$-,.-9;-~][!-9;-~]*\Z")
_RELATION_RE = re.compile(
    r"^(?P<name>[^\s:(\[<]+)(?::(?P<arch>[a-z0-9-]+))?\s*"
    r"(?:\(\s*(?P<op><<|<=|>=|>>|=|<|>)\s*(?P<version>[0-9A-Za-z][^\s)]*)\s*\))?\s*"
    r"(?:\[(?P<archs>[^\]]*)\])?\s*"
    r"(?P<profiles>(?:<[^>]*>\s*)*)$")
_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._+~:@=%-]+$")
_SUITE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]*(?:/[A-Za-z0-9][A-Za-z0-9._+~-]*)*$")


class RepositoryError(CommandFailed):
    """A repository, its indexes or the resolution failed: what and where, and a hint."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)


# --------------------------------------------------------------------------- deb822


def parse_deb822(text: str, *, where: str = "the text", fields: frozenset[str] | None = None) -> list[dict[str, str]]:
    """The paragraphs of a deb822 text (a Packages index, a Release, a control file),
    each a dict of its fields in order. A multi-line field's value is kept verbatim:
    its first line's value, then each continuation line as written (leading space
    and ``.`` lines included), joined by newlines, so ``f"{name}: {value}"`` writes the
    field back. Lines starting with ``#`` are comments. With ``fields``, only those
    fields are kept (a large index then costs less memory).

    :raises RepositoryError: for a line that is neither a field, a continuation nor a
        comment, or a field given twice in a paragraph, naming ``where`` and the line.
    """
    return list(_paragraphs(text, where=where, fields=fields))


def _paragraphs(text: str, *, where: str, fields: frozenset[str] | None = None) -> Iterator[dict[str, str]]:
    paragraph: dict[str, str] = {}
    seen: set[str] = set()  # the paragraph's field names, kept or not (a field given twice is an error)
    current: str | None = None  # the field continuation lines belong to (None: one not kept)
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            if paragraph:
                yield paragraph
            paragraph, seen, current = {}, set(), None
            continue
        if line.startswith("#"):
            continue
        if line[0] in " \t":
            if not seen:
                raise RepositoryError(f"{where}:{number}: a continuation line with no field before it: {line[:80]!r}")
            if current is not None:
                paragraph[current] += "\n" + line.rstrip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not _FIELD_NAME_RE.match(name):
            raise RepositoryError(f"{where}:{number}: not a deb822 field ('Name: value'): {line[:80]!r}")
        if name in seen:
            raise RepositoryError(f"{where}:{number}: the field {name} is given twice in one paragraph")
        seen.add(name)
        current = name if fields is None or name in fields else None
        if current is not None:
            paragraph[name] = value.strip()
    if paragraph:
        yield paragraph


# --------------------------------------------------------------------------- versions


@dataclass(frozen=True, slots=True)
class Version:
    """A Debian version, ``[epoch:]upstream[-revision]``."""

    epoch: int
    upstream: str
    revision: str

    def __str__(self) -> str:
        epoch = f"{self.epoch}:" if self.epoch else ""
        return f"{epoch}{self.upstream}" + (f"-{self.revision}" if self.revision else "")


@functools.lru_cache(maxsize=65536)
def parse_version(text: str) -> Version:
    """``text`` as a Debian version (Debian policy 5.6.12: the epoch a number, the
    upstream version starting with a digit and made of alphanumerics and ``.+~-``, the
    revision of alphanumerics and ``.+~``).

    :raises ValueError: saying what is wrong with it.
    """
    if not text or text != text.strip() or len(text) > 256:
        raise ValueError(f"'{text[:80]}' is not a Debian version (empty, too long or with spaces)")
    epoch_text, colon, rest = text.partition(":")
    if not colon:
        epoch_text, rest = "0", text
    if not epoch_text.isdigit() or not epoch_text.isascii():
        raise ValueError(f"'{text}' is not a Debian version: the epoch before ':' must be a number")
    upstream, hyphen, revision = rest.rpartition("-")
    if not hyphen:
        upstream, revision = rest, ""
    elif not _REVISION_RE.match(revision):
        raise ValueError(f"'{text}' is not a Debian version: the revision '{revision}' may hold only "
                         "letters, digits and . + ~")
    if not _UPSTREAM_RE.match(upstream):
        raise ValueError(f"'{text}' is not a Debian version: the upstream version must start with a digit and "
                         "hold only letters, digits and . + ~ -")
    return Version(int(epoch_text), upstream, revision)


def _order(c: str) -> int:
    """dpkg's weight of a non-digit character: ``~`` before the end, the end before
    letters, letters before other characters."""
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's ``verrevcmp``: alternate non-digit runs (compared by :func:`_order`) and
    digit runs (compared as numbers)."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        start_i = i
        while i < len(a) and a[i].isdigit():
            i += 1
        start_j = j
        while j < len(b) and b[j].isdigit():
            j += 1
        na, nb = int(a[start_i:i] or "0"), int(b[start_j:j] or "0")
        if na != nb:
            return -1 if na < nb else 1
    return 0


@functools.lru_cache(maxsize=262144)
def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as the Debian version ``a`` sorts before, the same as, or after ``b``
    (dpkg's algorithm: epochs as numbers, then upstream versions and revisions with
    ``~`` before anything, even the end, so ``1.0~rc1 < 1.0``).

    :raises ValueError: when either is not a Debian version.
    """
    va, vb = parse_version(a), parse_version(b)
    if va.epoch != vb.epoch:
        return -1 if va.epoch < vb.epoch else 1
    return _compare_part(va.upstream, vb.upstream) or _compare_part(va.revision, vb.revision)


_OPERATORS: dict[str, Callable[[int], bool]] = {
    "<<": lambda c: c < 0, "<=": lambda c: c <= 0, "=": lambda c: c == 0,
    ">=": lambda c: c >= 0, ">>": lambda c: c > 0,
}


def version_satisfies(version: str, op: str, wanted: str) -> bool:
    """Whether ``version`` satisfies ``(op wanted)`` (``op`` one of ``<< <= = >= >>``)."""
    return _OPERATORS[op](compare_versions(version, wanted))


# --------------------------------------------------------------------------- relations


@dataclass(frozen=True, slots=True)
class Relation:
    """One alternative of a relation field: ``name[:arch] [(op version)]``."""

    name: str
    arch: str | None = None
    op: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        text = self.name + (f":{self.arch}" if self.arch else "")
        return text + (f" ({self.op} {self.version})" if self.op else "")


def parse_relations(text: str, *, arch: str | None = None, where: str = "a relation field"
                    ) -> list[tuple[Relation, ...]]:
    """A relation field (``Depends: a (>= 1) | b:any, c [amd64]``) as its AND list of
    OR groups. With ``arch``, alternatives restricted to other architectures are
    dropped (and a group left empty with them); without it, restrictions are ignored.
    The obsolete ``<`` and ``>`` mean ``<=`` and ``>=``, as dpkg reads them. Build
    profiles (``<!nocheck>``) are ignored.

    :raises ValueError: for a malformed relation, quoting it and ``where``.
    """
    groups: list[tuple[Relation, ...]] = []
    text = " ".join(text.split())
    if not text:
        return groups
    for group_text in text.split(","):
        alternatives: list[Relation] = []
        group_text = group_text.strip()
        if not group_text:
            raise ValueError(f"{where} has an empty relation (two commas, or one at an end): '{text[:120]}'")
        for alt_text in group_text.split("|"):
            m = _RELATION_RE.match(alt_text.strip())
            if m is None or not _NAME_RE.match(m.group("name")):
                raise ValueError(f"{where} has a malformed relation '{alt_text.strip()[:120]}' (expected "
                                 "'name[:arch] [(op version)] [[arch ...]]', such as 'libc6 (>= 2.36)')")
            op, version = m.group("op"), m.group("version")
            if op is not None:
                op = {"<": "<=", ">": ">="}.get(op, op)
                try:
                    parse_version(version)
                except ValueError as e:
                    raise ValueError(f"{where} has a malformed relation '{alt_text.strip()[:120]}': {e}") from None
            if arch is not None and m.group("archs") is not None and not _arch_restriction_allows(
                    m.group("archs"), arch, where):
                continue
            alternatives.append(Relation(m.group("name"), m.group("arch"), op, version))
        if alternatives:
            groups.append(tuple(alternatives))
    return groups


def _arch_restriction_allows(restriction: str, arch: str, where: str) -> bool:
    names = restriction.split()
    if not names:
        raise ValueError(f"{where} has an empty architecture restriction '[]'")
    negated = [n.startswith("!") for n in names]
    if any(negated) and not all(negated):
        raise ValueError(f"{where} mixes negated and plain architectures in '[{restriction}]'")
    plain = [n.lstrip("!") for n in names]
    return (arch not in plain) if negated[0] else (arch in plain or "any" in plain)


# --------------------------------------------------------------------------- indexes


@dataclass(frozen=True, slots=True)
class Candidate:
    """One package of a Packages index: what the resolver chooses among and what a lock
    entry records. Relation fields are kept as text and parsed when followed."""

    name: str
    version: str
    architecture: str
    filename: str
    sha256: str
    size: int
    base_url: str
    #: The Pre-Depends and Depends fields, joined (both must hold before use).
    depends: str = ""
    provides: str = ""
    #: Which source and index it came from, for messages ("http://h/debian bookworm main").
    origin: str = ""

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.filename}"

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclass(frozen=True, slots=True)
class PackageIndex:
    """The packages of one component of one source for one architecture."""

    origin: str
    packages: tuple[Candidate, ...]


_INDEX_FIELDS = frozenset({"Package", "Version", "Architecture", "Filename", "SHA256", "Size", "Depends",
                           "Pre-Depends", "Provides"})


def check_name(name: str) -> str | None:
    """What is wrong with ``name`` as a Debian package name, or None."""
    if not _NAME_RE.match(name) or len(name) > 200:
        return (f"'{name[:80]}' is not a Debian package name (lower-case letters, digits and + - ., at least two, "
                "starting with a letter or digit)")
    return None


def check_filename(filename: str) -> str | None:
    """What is wrong with ``filename`` (a ``Filename:`` of an index) as a path inside its
    repository, or None: it must be relative, of plain segments, with no ``..``, no
    URL and no character a URL would need to escape."""
    if not filename or len(filename) > 1024:
        return "is empty or too long"
    if "://" in filename or filename.startswith("/") or "\\" in filename:
        return "is an absolute path or a URL, not a path inside the repository"
    for segment in filename.split("/"):
        if segment in ("", ".", ".."):
            return "has an empty, '.' or '..' segment: it would leave the repository's pool"
        if not _PATH_SEGMENT_RE.match(segment) or re.search(r"%(?![0-9A-Fa-f]{2})", segment):
            return "has characters a pool path does not have"
    return None


def parse_packages_index(text: str, *, base_url: str, origin: str, where: str) -> PackageIndex:
    """The packages of a ``Packages`` index's text (already checked against its release).

    :raises RepositoryError: for a paragraph whose name, version, architecture, file
        name, size or SHA256 is missing or malformed, naming the package and ``where``.
    """
    packages: list[Candidate] = []
    for paragraph in _paragraphs(text, where=where, fields=_INDEX_FIELDS):
        name = paragraph.get("Package", "")

        def bad(what: str, name: str = name) -> RepositoryError:
            return RepositoryError(f"{where}: the package '{name[:80]}' {what}",
                                   hint="the repository is broken; tell its maintainers, or use another mirror")

        problem = check_name(name)
        if problem:
            raise bad(f"has a bad name: {problem}")
        try:
            parse_version(paragraph.get("Version", ""))
        except ValueError as e:
            raise bad(f"has a bad Version: {e}") from None
        arch = paragraph.get("Architecture", "")
        if not _ARCH_RE.match(arch):
            raise bad(f"has a bad Architecture '{arch[:40]}'")
        filename = paragraph.get("Filename", "")
        problem = check_filename(filename)
        if problem:
            raise bad(f"has a Filename '{filename[:120]}' that {problem}")
        sha256 = paragraph.get("SHA256", "")
        if not _SHA256_RE.match(sha256):
            raise bad("has no SHA256 (or not 64 lower-case hex digits): dtbuild locks packages by their SHA256")
        size = paragraph.get("Size", "")
        if not size.isdigit() or not size.isascii() or int(size) == 0 or len(size) > 15:
            raise bad(f"has a bad Size '{size[:40]}'")
        depends = ", ".join(paragraph[f] for f in ("Pre-Depends", "Depends") if paragraph.get(f, "").strip())
        packages.append(Candidate(name, paragraph["Version"], arch, filename, sha256, int(size), base_url,
                                  depends=depends, provides=paragraph.get("Provides", ""), origin=origin))
    return PackageIndex(origin, tuple(packages))


# --------------------------------------------------------------------------- sources and releases


@dataclass(frozen=True, slots=True)
class Source:
    """One ``sources`` entry of a deb_packages target: ``URL SUITE COMPONENT...``."""

    url: str
    suite: str
    components: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.url} {self.suite} {' '.join(self.components)}"

    @property
    def inrelease_url(self) -> str:
        return f"{self.url}/dists/{self.suite}/InRelease"


def parse_source(text: str) -> Source:
    """A ``sources`` entry (``"http://deb.debian.org/debian bookworm main"``).

    :raises ValueError: saying what is wrong and what is expected.
    """
    parts = text.split()
    expected = "expected 'URL SUITE COMPONENT [COMPONENT...]', such as 'http://deb.debian.org/debian bookworm main'"
    if len(parts) < 3:
        raise ValueError(f"the source '{text}' is not {expected[9:]}")
    url, suite, components = parts[0].rstrip("/"), parts[1], tuple(parts[2:])
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file") or any(c in url for c in "?#"):
        raise ValueError(f"the source '{text}' has the URL '{url}': an http, https or file URL of the repository "
                         "(with no query), such as http://deb.debian.org/debian, is expected")
    for what, value in [("suite", suite), *(("component", c) for c in components)]:
        if not _SUITE_RE.match(value) or ".." in value.split("/"):
            raise ValueError(f"the source '{text}' has a bad {what} '{value}' ({expected}; a flat repository "
                             "('URL ./') is not supported)")
    return Source(url, suite, components)


@dataclass(frozen=True, slots=True)
class ReleaseFile:
    """One entry of a release's SHA256 list."""

    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Release:
    """The signed text of a suite's InRelease, parsed."""

    fields: Mapping[str, str]
    files: Mapping[str, ReleaseFile]
    #: The sha256 of the InRelease file as downloaded.
    inrelease_sha256: str

    @property
    def date(self) -> str:
        return self.fields.get("Date", "")

    @property
    def by_hash(self) -> bool:
        return self.fields.get("Acquire-By-Hash", "").strip().lower() == "yes"


def parse_release(signed_text: str, *, source: Source, inrelease_sha256: str) -> Release:
    """The fields and SHA256 list of a release's signed text, checked to be the release
    of ``source``'s suite.

    :raises RepositoryError: when it is malformed, has no SHA256 list, or is the
        release of another suite (a mirror answering with an old or other suite's
        signed file).
    """
    where = source.inrelease_url
    paragraphs = parse_deb822(signed_text, where=where)
    if not paragraphs:
        raise RepositoryError(f"{where} has no release fields in its signed text")
    fields = paragraphs[0]
    names = {fields.get("Suite", ""), fields.get("Codename", "")} - {""}
    if source.suite not in names and source.suite.rsplit("/", 1)[0] not in names:
        raise RepositoryError(
            f"{where} is the release of {' / '.join(sorted(names)) or 'an unnamed suite'}, not of {source.suite}",
            hint="the mirror answers with another suite's release: check the suite in 'sources', or use another "
                 "mirror")
    files: dict[str, ReleaseFile] = {}
    for line in fields.get("SHA256", "").split("\n"):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 3 or not _SHA256_RE.match(parts[0]) or not parts[1].isdigit() or len(parts[1]) > 15:
            raise RepositoryError(f"{where}: a malformed SHA256 line in the release: '{line.strip()[:120]}'")
        files[parts[2]] = ReleaseFile(parts[0], int(parts[1]))
    if not files:
        raise RepositoryError(f"{where} lists no SHA256 of its indexes",
                              hint="dtbuild checks every index against the SHA256 of a signed release; a release "
                                   "with only MD5Sum or SHA1 is not accepted")
    return Release(fields, files, inrelease_sha256)


def index_choices(release: Release, component: str, arch: str) -> list[tuple[str, ReleaseFile, ReleaseFile | None]]:
    """The forms of ``component``'s Packages index for ``arch`` the release lists, most
    preferred first: (path, its entry, the uncompressed file's entry when listed)."""
    base = f"{component}/binary-{arch}/Packages"
    plain = release.files.get(base)
    return [(base + ext, release.files[base + ext], plain) for ext in INDEX_COMPRESSIONS if base + ext in release.files]


def decompress_index(data: bytes, path: str, *, limit: int) -> bytes:
    """The bytes of an index file ``path`` (``.xz``, ``.gz``, ``.bz2`` or plain),
    decompressed, at most ``limit`` bytes (never more is decompressed).

    :raises ValueError: when it does not decompress or is larger than ``limit``.
    """
    out = io.BytesIO()
    try:
        if path.endswith(".gz"):
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            pending = data
            while pending and out.tell() <= limit:
                out.write(inflater.decompress(pending, limit + 1 - out.tell()))
                pending = inflater.unconsumed_tail
            complete = inflater.eof
        elif path.endswith((".xz", ".bz2")):
            decompressor: Any = lzma.LZMADecompressor() if path.endswith(".xz") else bz2.BZ2Decompressor()
            out.write(decompressor.decompress(data, max_length=limit + 1))
            while not decompressor.eof and not decompressor.needs_input and out.tell() <= limit:
                out.write(decompressor.decompress(b"", max_length=limit + 1 - out.tell()))
            complete = decompressor.eof
        else:
            out.write(data[:limit + 1])
            complete = True
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as e:
        raise ValueError(f"it does not decompress ({e})") from None
    if out.tell() > limit:
        raise ValueError(f"it is larger than {limit} bytes uncompressed")
    if not complete:
        raise ValueError("it ends before its compressed stream does")
    return out.getvalue()


# --------------------------------------------------------------------------- signatures


def dearmor(keyring: bytes) -> bytes:
    """A keyring in the binary form gpgv reads: an ASCII-armored key block
    (``-----BEGIN PGP PUBLIC KEY BLOCK-----``, as ``.asc`` keys come) decoded, binary
    keyrings unchanged.

    :raises ValueError: for armor that does not decode.
    """
    head = keyring.lstrip()[:64]
    if not head.startswith(b"-----BEGIN PGP"):
        return keyring
    out = bytearray()
    text = keyring.decode("ascii", "replace").replace("\r", "")
    for block in re.findall(r"-----BEGIN PGP PUBLIC KEY BLOCK-----\n(.*?)-----END PGP PUBLIC KEY BLOCK-----",
                            text, re.S):
        _headers, _blank, body = block.partition("\n\n")
        if not _blank:
            body = block
        lines = [ln.strip() for ln in body.split("\n") if ln.strip() and not ln.startswith("=")]
        try:
            out += base64.b64decode("".join(lines), validate=True)
        except ValueError:
            raise ValueError("its ASCII armor does not decode") from None
    if not out:
        raise ValueError("it is ASCII armor holding no public key block")
    return bytes(out)


def gpgv_status(status: str) -> tuple[list[str], list[str]]:
    """(fingerprints of valid signatures, problems) from gpgv's ``--status-fd``
    output. A signature counts only with both its GOODSIG and VALIDSIG lines and a
    strong digest; BADSIG, an expired or revoked key are problems; a signature by a
    key the keyring lacks (NO_PUBKEY) is neither, as apt has it (Debian signs each
    release with several keys)."""
    good_ids: set[str] = set()
    valid: list[str] = []
    problems: list[str] = []
    for line in status.splitlines():
        if not line.startswith("[GNUPG:] "):
            continue
        parts = line[9:].split()
        if not parts:
            continue
        keyword, args = parts[0], parts[1:]
        if keyword == "GOODSIG" and args:
            good_ids.add(args[0].upper())
        elif keyword == "VALIDSIG" and len(args) >= 8:
            fingerprint, digest = args[0].upper(), args[7]
            if digest in WEAK_DIGESTS:
                problems.append(f"a signature by {fingerprint} uses the weak digest {WEAK_DIGESTS[digest]}")
            elif any(fingerprint.endswith(k) for k in good_ids) or (len(args) >= 10 and any(
                    args[9].upper().endswith(k) for k in good_ids)):
                valid.append(fingerprint)
        elif keyword == "BADSIG":
            problems.append(f"a BAD signature by key {args[0] if args else '?'}")
        elif keyword in ("EXPKEYSIG", "REVKEYSIG", "EXPSIG"):
            what = {"EXPKEYSIG": "an expired key", "REVKEYSIG": "a revoked key", "EXPSIG": "an expired signature"}
            problems.append(f"a signature by {what[keyword]} ({args[0] if args else '?'})")
    return valid, problems


def verify_inrelease(inrelease: bytes, keyring: bytes, *, where: str, keyring_name: str) -> str:
    """The signed text of the InRelease ``inrelease``, after ``gpgv`` found at least one
    good signature by a key of ``keyring`` and no bad one. Only the text gpgv writes as
    signed is returned: nothing outside the signature is ever read. ``where`` (the
    URL) and ``keyring_name`` are for messages.

    :raises RepositoryError: when the file is not clearsigned, gpgv is missing, or no
        good signature by the keyring is found.
    """
    if not inrelease.lstrip().startswith(b"-----BEGIN PGP SIGNED MESSAGE-----"):
        raise RepositoryError(
            f"{where} is not signed (it is no OpenPGP clearsigned message)",
            hint=f"only an InRelease signed by a key of {keyring_name} is accepted; check the URL and suite")
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise RepositoryError("gpgv is needed to check the signature of InRelease files, and is not installed",
                              hint="install it (apt-get install gpgv)")
    try:
        binary_keyring = dearmor(keyring)
    except ValueError as e:
        raise RepositoryError(f"the keyring {keyring_name} cannot be read: {e}",
                              hint="give an OpenPGP public keyring (gpg --export KEY > keyring.gpg)") from None
    with tempfile.TemporaryDirectory(prefix="dtbuild-gpgv-") as home:
        os.chmod(home, 0o700)
        keyring_path = os.path.join(home, "keyring.gpg")
        signed_path = os.path.join(home, "InRelease")
        out_path = os.path.join(home, "signed.txt")
        with open(keyring_path, "wb") as f:
            f.write(binary_keyring)
        with open(signed_path, "wb") as f:
            f.write(inrelease)
        try:
            result = subprocess.run(
                [gpgv, "--homedir", home, "--keyring", keyring_path, "--status-fd", "1", "--output", out_path,
                 signed_path],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=GPGV_TIMEOUT, check=False,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
        except subprocess.TimeoutExpired:
            raise RepositoryError(f"gpgv took more than {GPGV_TIMEOUT:.0f} s to check {where}") from None
        status = result.stdout.decode("utf-8", "replace")
        valid, problems = gpgv_status(status)
        if problems or not valid:
            said = " ".join(" ".join(line.removeprefix("gpgv:").split())
                            for line in result.stderr.decode("utf-8", "replace").splitlines())[-400:]
            why = "; ".join(problems) if problems else "no signature by a key of the keyring"
            raise RepositoryError(
                f"the signature of {where} does not verify against {keyring_name}: {why}"
                + (f" (gpgv: {said})" if said else ""),
                hint="only an InRelease signed by a key of the keyring is accepted: check that the keyring is the "
                     "repository's (for Debian: debian-archive-keyring.gpg), or that the mirror is not tampered with")
        try:
            with open(out_path, "rb") as f:
                signed = f.read()
        except FileNotFoundError:
            raise RepositoryError(f"gpgv verified {where} but wrote no signed text") from None
    try:
        return signed.decode("utf-8")
    except UnicodeDecodeError:
        raise RepositoryError(f"the signed text of {where} is not UTF-8") from None


# --------------------------------------------------------------------------- downloading


class NotFound(RepositoryError):
    """The repository has no such file (HTTP 404, or a missing file of a file URL)."""


class RepositoryReader:
    """Reads suites of repositories: each download through the one bounded downloader
    of :mod:`.fetch` (``[network]`` timeouts, deadline per file, a size cap per file),
    tried up to :data:`ATTEMPTS` times while the failure may pass."""

    ATTEMPTS = 3

    def __init__(self, limits: Any, *, progress: Any = None, cancel: Any = None) -> None:
        #: A ``NetworkLimits``.
        self.limits = limits
        #: Where transfers report their bytes (``CommandAPI.progress``), or None.
        self.progress = progress
        self.cancel = cancel

    def get(self, url: str, *, limit: int, too_large: Callable[[], Exception], total: int | None = None) -> bytes:
        """The bytes of ``url``, at most ``limit`` of them.

        :raises NotFound: when it does not exist.
        :raises RepositoryError: when it cannot be read (unreachable, an HTTP error, a
            limit), naming the URL and, for each different failure, what happened.
        """
        from dtbuild.plugins.builtin import fetch
        from dtbuild.plugins.progress import ProgressMeter

        report = self.progress if self.progress is not None else _no_progress
        name = f"download {urllib.parse.unquote(url.rstrip('/').rpartition('/')[2])}"

        def attempt(_n: int) -> bytes:
            if self.cancel is not None and self.cancel.is_set():
                raise RepositoryError("interrupted")
            sink = io.BytesIO()
            with ProgressMeter(report, name, total) as meter:  # too_large()'s error is no OSError: it ends the tries
                fetch.download(url, sink, clock, meter, limit=limit, too_large=too_large)
            return sink.getvalue()

        clock = self.limits.clock()  # one deadline for all the tries of this URL
        try:
            return fetch.download_retrying(url, clock, attempt)
        except fetch.DownloadFailed as e:
            if e.missing:
                raise NotFound(f"{url} does not exist" + (f" (HTTP {e.status})" if e.status else "")) from None
            raise RepositoryError(f"cannot read {e}",
                                  hint="check the source's URL in 'sources' and the network (a [network] "
                                       "setting in dtbuild.toml may need raising for a slow mirror)") from None

    def release(self, source: Source, keyring: bytes, keyring_name: str) -> tuple[Release, str]:
        """The release of ``source``'s suite, from its InRelease verified against
        ``keyring``; and the sha256 of the InRelease file.

        :raises RepositoryError: when it is missing (a suite with only a ``Release`` is
            refused), unreadable, too large, not signed by the keyring, or malformed.
        """
        url = source.inrelease_url
        limit = self.limits.max_document
        try:
            data = self.get(url, limit=limit, too_large=lambda: RepositoryError(
                f"{url} is larger than {limit} bytes ([network] max_document); refusing it"))
        except NotFound as e:
            raise RepositoryError(
                f"{e.message}: only an InRelease signed by a key of {keyring_name} is accepted (a suite with just "
                "a Release, or a Release with a detached Release.gpg, is not)",
                hint="check the URL and the suite in 'sources' (the file is URL/dists/SUITE/InRelease)") from None
        text = verify_inrelease(data, keyring, where=url, keyring_name=keyring_name)
        digest = hashlib.sha256(data).hexdigest()
        return parse_release(text, source=source, inrelease_sha256=digest), digest

    def index(self, source: Source, release: Release, component: str, arch: str) -> PackageIndex:
        """The Packages index of ``component`` for ``arch``, in the first form the
        release lists that the mirror has (xz, gz, plain), checked against the
        release's SHA256 and size before it is decompressed or parsed.

        :raises RepositoryError: when the release lists none, the mirror has none, or
            the bytes do not match the release.
        """
        choices = index_choices(release, component, arch)
        origin = f"{source.url} {source.suite} {component}"
        if not choices:
            listed = sorted({p.split("/binary-", 1)[0] for p in release.files if "/binary-" in p})
            archs = sorted({p.split("/binary-", 1)[1].split("/", 1)[0] for p in release.files if "/binary-" in p})
            raise RepositoryError(
                f"{source.suite}'s InRelease at {source.url} lists no Packages index of {component} for {arch}",
                hint=f"it has the components {', '.join(listed) or 'none'} and the architectures "
                     f"{', '.join(archs) or 'none'}: check 'sources' and 'architectures'")
        missing: list[str] = []
        for path, entry, plain in choices:
            if entry.size > self.limits.max_download:
                raise RepositoryError(f"{source.suite}'s InRelease says {path} has {entry.size} bytes, more than "
                                      "[network] max_download; refusing it")
            urls = [f"{source.url}/dists/{source.suite}/{path}"]
            if release.by_hash:  # a mirror being updated still has the file of this release there
                directory = path.rsplit("/", 1)[0]
                urls.insert(0, f"{source.url}/dists/{source.suite}/{directory}/by-hash/SHA256/{entry.sha256}")
            for url in urls:
                try:
                    data = self.get(url, limit=entry.size, total=entry.size,
                                    too_large=lambda url=url: _mismatch(url, source))  # type: ignore[misc]
                except NotFound as e:
                    missing.append(e.message)
                    continue
                if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                    raise _mismatch(url, source)
                return self._parse_index(data, url, path, plain, source, origin)
        raise RepositoryError(f"the mirror has none of the Packages indexes {source.suite}'s InRelease lists for "
                              f"{component}/binary-{arch}: " + "; ".join(missing),
                              hint="the mirror may be incomplete or being updated: try again, or use another mirror")

    @staticmethod
    def _parse_index(data: bytes, url: str, path: str, plain: ReleaseFile | None, source: Source,
                     origin: str) -> PackageIndex:
        try:
            raw = decompress_index(data, path, limit=plain.size if plain is not None else MAX_INDEX_SIZE)
        except ValueError as e:
            raise RepositoryError(f"{url} is not a readable index: {e}") from None
        if plain is not None and not path.endswith("/Packages") and (
                len(raw) != plain.size or hashlib.sha256(raw).hexdigest() != plain.sha256):
            raise _mismatch(url + " (decompressed)", source)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RepositoryError(f"{url} is not UTF-8 text") from None
        return parse_packages_index(text, base_url=source.url, origin=origin, where=url)


def _mismatch(url: str, source: Source) -> RepositoryError:
    return RepositoryError(f"{url} does not match the SHA256 in {source.suite}'s InRelease: the mirror is "
                           "inconsistent or tampered with",
                           hint="try again later (a mirror being updated), or use another mirror")


def _no_progress(*, description: str, done_bytes: int, total_bytes: int | None) -> None:
    pass


# --------------------------------------------------------------------------- resolving




class _Universe:
    """The candidates of one architecture, by name and by virtual name provided."""

    def __init__(self, indexes: Sequence[PackageIndex], arch: str) -> None:
        self.arch = arch
        by_name: dict[str, list[Candidate]] = {}
        for index in indexes:
            for candidate in index.packages:
                if candidate.architecture in (arch, "all"):
                    by_name.setdefault(candidate.name, []).append(candidate)
        for candidates in by_name.values():
            # Highest version first; equal versions keep index order (the first source wins).
            candidates.sort(key=functools.cmp_to_key(lambda a, b: compare_versions(a.version, b.version)),
                            reverse=True)
        self.by_name = by_name
        self.providers: dict[str, list[tuple[Candidate, str | None]]] = {}
        for name in sorted(by_name):
            for candidate in by_name[name]:
                for relation in self.provides(candidate):
                    self.providers.setdefault(relation.name, []).append((candidate, relation.version))
        self._relations: dict[str, list[tuple[Relation, ...]]] = {}

    def provides(self, candidate: Candidate) -> list[Relation]:
        if not candidate.provides.strip():
            return []
        try:
            groups = parse_relations(candidate.provides, arch=self.arch, where=f"the Provides of {candidate}")
        except ValueError as e:
            raise RepositoryError(f"{candidate.origin}: {e}") from None
        out = []
        for group in groups:
            if len(group) != 1 or group[0].op not in (None, "="):
                text = " | ".join(map(str, group))
                raise RepositoryError(f"{candidate.origin}: the Provides of {candidate} has '{text}': a Provides "
                                      "names packages, with at most an '= version'")
            out.append(group[0])
        return out

    def depends(self, candidate: Candidate) -> list[tuple[Relation, ...]]:
        key = candidate.depends
        if key not in self._relations:
            try:
                self._relations[key] = parse_relations(key, arch=self.arch, where=f"the Depends of {candidate}")
            except ValueError as e:
                raise RepositoryError(f"{candidate.origin}: {e}") from None
        return self._relations[key]

    def names(self) -> list[str]:
        return sorted(set(self.by_name) | set(self.providers))


def _arch_ok(candidate: Candidate, relation: Relation, arch: str) -> bool:
    return relation.arch in (None, "any", "native", arch) or candidate.architecture == "all"


def _version_ok(version: str | None, relation: Relation) -> bool:
    if relation.op is None:
        return True
    return version is not None and version_satisfies(version, relation.op, relation.version or "")


@dataclass
class _State:
    selected: dict[str, Candidate] = field(default_factory=dict)
    #: Why each name was chosen: (the package that needed it, the relation), None when requested.
    reasons: dict[str, tuple[str, str] | None] = field(default_factory=dict)
    edges: dict[str, set[str]] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(dict(self.selected), dict(self.reasons), {k: set(v) for k, v in self.edges.items()})

    def select(self, candidate: Candidate, reason: tuple[str, str] | None) -> None:
        self.selected[candidate.name] = candidate
        self.reasons[candidate.name] = reason
        self.edges.setdefault(candidate.name, set())

    def chain(self, name: str) -> str:
        """``app 1.0 (requested) -> libbar 2.0 -> ...`` down to ``name``."""
        links: list[str] = []
        current: str | None = name
        while current is not None and len(links) < 100:
            reason = self.reasons.get(current)
            links.append(f"{self.selected[current]}" + (" (requested)" if reason is None else ""))
            current = reason[0] if reason else None
        return " -> ".join(reversed(links))


class _Resolver:
    def __init__(self, universe: _Universe) -> None:
        self.universe = universe
        self.trials = 0

    def satisfier(self, relation: Relation, state: _State) -> str | None:
        """The chosen package satisfying ``relation``, or None."""
        arch = self.universe.arch
        chosen = state.selected.get(relation.name)
        if chosen is not None and _arch_ok(chosen, relation, arch) and _version_ok(chosen.version, relation):
            return chosen.name
        for provider, provided in self.universe.providers.get(relation.name, ()):
            if state.selected.get(provider.name) is provider and _version_ok(provided, relation):
                return provider.name
        return None

    def candidate_for(self, relation: Relation, state: _State) -> tuple[Candidate | None, str]:
        """The package to choose for ``relation`` (not yet satisfied), or None and why
        none can be."""
        arch = self.universe.arch
        real = self.universe.by_name.get(relation.name, [])
        chosen = state.selected.get(relation.name)
        if chosen is None:
            for candidate in real:
                if _arch_ok(candidate, relation, arch) and _version_ok(candidate.version, relation):
                    return candidate, ""
        providers = sorted(
            ((p, v) for p, v in self.universe.providers.get(relation.name, ())
             if p.name not in state.selected and _version_ok(v, relation)),
            key=lambda pv: pv[0].name)  # stable: each provider's highest version first
        if providers:
            return providers[0][0], ""
        if chosen is not None:
            return None, f"{chosen} is already chosen, by {state.chain(chosen.name)}"
        if real:
            versions = ", ".join(c.version for c in real[:5]) + (", ..." if len(real) > 5 else "")
            return None, f"the indexes have {relation.name} {versions} only"
        if relation.name in self.universe.providers:
            offered = ", ".join(sorted({f"{p} (provides {relation.name}"
                                        + (f" = {v})" if v else ")")
                                        for p, v in self.universe.providers[relation.name]})[:5])
            return None, f"no provider has a matching version: {offered}"
        return None, f"no package {relation.name} is in the indexes for {arch}"

    def process(self, state: _State, worklist: list[str], depth: int) -> None:
        """Follow the dependencies of the names in ``worklist`` (chosen in ``state``)
        until their closure is chosen.

        :raises RepositoryError: when a relation cannot be satisfied.
        """
        if depth > MAX_NESTING:
            raise RepositoryError(f"the alternatives nest more than {MAX_NESTING} deep; giving up")
        while worklist:
            name = worklist.pop()
            package = state.selected[name]
            for group in self.universe.depends(package):
                satisfied = next((s for s in map(lambda r: self.satisfier(r, state), group) if s), None)
                if satisfied is not None:
                    if satisfied != name:
                        state.edges[name].add(satisfied)
                    continue
                text = " | ".join(map(str, group))
                why: list[str] = []
                if len(group) == 1:
                    candidate, reason = self.candidate_for(group[0], state)
                    if candidate is None:
                        raise self.unsatisfiable(state, name, text, [reason])
                    state.select(candidate, (name, text))
                    state.edges[name].add(candidate.name)
                    worklist.append(candidate.name)
                    continue
                for relation in group:  # the first alternative whose closure resolves
                    candidate, reason = self.candidate_for(relation, state)
                    if candidate is None:
                        why.append(f"{relation}: {reason}")
                        continue
                    self.trials += 1
                    if self.trials > MAX_TRIALS:
                        raise RepositoryError(f"resolving tried more than {MAX_TRIALS} alternatives; giving up",
                                              hint="list the packages you want in 'packages' to narrow the choice")
                    trial = state.copy()
                    trial.select(candidate, (name, text))
                    try:
                        self.process(trial, [candidate.name], depth + 1)
                    except RepositoryError as e:
                        why.append(f"{relation}: {e.message}")
                        continue
                    state.selected, state.reasons, state.edges = trial.selected, trial.reasons, trial.edges
                    state.edges[name].add(candidate.name)
                    break
                else:
                    raise self.unsatisfiable(state, name, text, why)

    def unsatisfiable(self, state: _State, name: str, relation: str, why: list[str]) -> RepositoryError:
        reasons = why[0] if len(why) == 1 else "; ".join(f"({i}) {w}" for i, w in enumerate(why, 1))
        return RepositoryError(f"{state.selected[name]} depends on '{relation}', which cannot be satisfied: {reasons}"
                               f" (chain: {state.chain(name)} -> {relation})")


def resolve(indexes: Sequence[PackageIndex], packages: Iterable[str], arch: str) -> list[LockedDeb]:
    """The closure of the requested ``packages`` for ``arch`` over ``indexes`` (in the
    order of the sources: the first wins a tie), as lock entries sorted by name (see
    the module docstring for how it chooses).

    :raises RepositoryError: for an unknown name (with did-you-mean from the indexes), a
        virtual name with several providers, or a dependency that cannot be satisfied
        (with the chain that led to it).
    """
    universe = _Universe(indexes, arch)
    resolver = _Resolver(universe)
    state = _State()
    requested: list[str] = []
    for name in packages:
        problem = check_name(name)
        if problem:
            raise RepositoryError(f"the requested package {problem}")
        if name in state.selected:
            continue
        real = universe.by_name.get(name)
        if real:
            candidate = real[0]
        else:
            # A lock holds each requested name, so a virtual one cannot stand for its provider.
            providers = sorted({p.name for p, _v in universe.providers.get(name, ())})
            if providers:
                raise RepositoryError(f"the requested package '{name}' is a virtual package, provided by "
                                      f"{', '.join(providers[:10])}" + (", ..." if len(providers) > 10 else ""),
                                      hint="request the one you want by its name")
            close = difflib.get_close_matches(name, universe.names(), n=3)
            raise RepositoryError(
                f"no package '{name}' is in the indexes for {arch}",
                hint=f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
                "check the name (apt-cache search NAME on a machine with these sources) and the sources' "
                "components")
        state.select(candidate, None)
        requested.append(candidate.name)
    resolver.process(state, list(reversed(requested)), 0)
    return [LockedDeb(c.name, c.version, c.architecture, c.url, c.sha256, c.size,
                          tuple(sorted(state.edges[c.name] - {c.name})))
            for c in sorted(state.selected.values(), key=lambda c: c.name)]


__all__ = [
    "Candidate",
    "LockedDeb",
    "NotFound",
    "PackageIndex",
    "Relation",
    "Release",
    "RepositoryError",
    "RepositoryReader",
    "Source",
    "Version",
    "check_filename",
    "check_name",
    "compare_versions",
    "dearmor",
    "decompress_index",
    "gpgv_status",
    "index_choices",
    "parse_deb822",
    "parse_packages_index",
    "parse_relations",
    "parse_release",
    "parse_source",
    "parse_version",
    "resolve",
    "verify_inrelease",
    "version_satisfies",
]
