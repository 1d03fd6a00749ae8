"""The apt repository reader and the resolver behind `dtbuild lock`: dpkg's version
order (dpkg's own test cases), relation fields, deb822, the resolver's choices, gpgv
verification with throwaway keys, and reading a suite over file:// URLs."""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dtbuild.plugins.builtin import deb_repo
from dtbuild.plugins.builtin.deb_repo import (
    Candidate,
    PackageIndex,
    Relation,
    RepositoryError,
    compare_versions,
    parse_deb822,
    parse_relations,
    resolve,
)
from dtbuild.plugins.builtin.network_limits import NetworkLimits

# --------------------------------------------------------------------------- versions

# (a, b, expected sign of compare(a, b)): from dpkg's lib/dpkg/t/t-version.c and Debian
# policy's own examples.
VERSION_TABLE = [
    ("1.0~rc1", "1.0", -1),
    ("1.0", "1.0", 0),
    ("0:1.0", "1.0", 0),
    ("1.0", "1.0-0", 0),
    ("1.0", "1.0-1", -1),
    ("1.0-1", "1.0-1+b1", -1),
    ("1.0-1", "1.0-2", -1),
    ("1.0-10", "1.0-9", 1),
    ("1:0.1", "2.0", 1),
    ("2:1.0", "1:9.9", 1),
    ("1:1.35.0-4+b3", "1.35.0-5", 1),
    ("1.2.3", "1.2.10", -1),
    ("0001", "1", 0),
    ("1.0a", "1.0", 1),
    ("1.0+", "1.0a", 1),
    ("1~~", "1~~a", -1),
    ("1~~a", "1~", -1),
    ("1~", "1", -1),
    ("1", "1a", -1),
    ("7.6p2-4", "7.6-0", 1),
    ("1.0.3-3", "1.0-1", 1),
    ("1.3", "1.2.2-2", 1),
    ("1.3", "1.2.2", 1),
    ("0-0-0", "0:0-0-0", 0),
    ("2.36-9+deb12u4", "2.36-9+deb12u10", -1),
    ("20230311", "20230311+deb12u1", -1),
]


@pytest.mark.parametrize(("a", "b", "expected"), VERSION_TABLE)
def test_versions_compare_as_dpkg_does(a: str, b: str, expected: int) -> None:
    assert compare_versions(a, b) == expected
    assert compare_versions(b, a) == -expected


def test_the_table_agrees_with_dpkg_itself(require_tool: Callable[[str], str]) -> None:
    dpkg = require_tool("dpkg")
    for a, b, expected in VERSION_TABLE:
        op = {-1: "lt", 0: "eq", 1: "gt"}[expected]
        assert subprocess.run([dpkg, "--compare-versions", a, op, b]).returncode == 0, (a, op, b)


@pytest.mark.parametrize(("text", "says"), [
    ("", "not a Debian version"),
    ("a1.0", "must start with a digit"),
    ("x:1.0", "epoch"),
    ("1.0-b_1", "revision"),
    ("1.0 ", "spaces"),
    ("1.0/2", "must start with a digit and hold only"),
])
def test_bad_versions_are_refused_saying_why(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        deb_repo.parse_version(text)


# --------------------------------------------------------------------------- relations and deb822


def test_relations_parse_alternatives_qualifiers_versions_and_restrictions() -> None:
    text = ("libc6 (>= 2.36), python3:any | python3-minimal (<< 3.12~), foo [amd64], bar [!amd64],\n"
            " baz <!nocheck>, old (> 1)")
    assert parse_relations(text, arch="amd64") == [
        (Relation("libc6", None, ">=", "2.36"),),
        (Relation("python3", "any"), Relation("python3-minimal", None, "<<", "3.12~")),
        (Relation("foo"),),
        (Relation("baz"),),
        (Relation("old", None, ">=", "1"),),  # dpkg reads the obsolete '>' as '>='
    ]
    assert (Relation("bar"),) in parse_relations(text, arch="i386")
    assert (Relation("foo"),) not in parse_relations(text, arch="i386")
    assert parse_relations("") == []


@pytest.mark.parametrize("text", ["libc6 (>= )", "libc6 (~ 1)", "Libc6", "libc6,, zlib1g", "libc6 (>= 1.0 | x"])
def test_malformed_relations_are_errors(text: str) -> None:
    with pytest.raises(ValueError, match="relation"):
        parse_relations(text, where="the Depends of x")


def test_deb822_keeps_multiline_fields_verbatim_and_skips_comments() -> None:
    text = ("# a comment\nPackage: hello\nDescription: greets\n the world\n .\n  twice\nDepends: libc6\n\n\n"
            "Package: other\r\nVersion: 1\n")
    assert parse_deb822(text) == [
        {"Package": "hello", "Description": "greets\n the world\n .\n  twice", "Depends": "libc6"},
        {"Package": "other", "Version": "1"},
    ]
    paragraph = parse_deb822(text)[0]
    assert "\n".join(f"{k}: {v}" for k, v in paragraph.items()).splitlines()[1:5] == [
        "Description: greets", " the world", " .", "  twice"]


@pytest.mark.parametrize(("text", "says"), [
    (" leading continuation", ":1: a continuation line"),
    ("Package: a\nno colon here", ":2: not a deb822 field"),
    ("Package: a\nPackage: b", ":2: the field Package is given twice"),
])
def test_deb822_errors_name_the_line(text: str, says: str) -> None:
    with pytest.raises(RepositoryError, match=says):
        parse_deb822(text, where="Packages")


@pytest.mark.parametrize(("filename", "ok"), [
    ("pool/main/b/busybox/busybox_1.35.0-4+b3_amd64.deb", True),
    ("pool/main/libx/libx%3a1_1_amd64.deb", True),
    ("../../etc/passwd", False),
    ("pool/../../../x.deb", False),
    ("/etc/passwd", False),
    ("http://evil.example/x.deb", False),
    ("pool//x.deb", False),
    ("pool/x y.deb", False),
    ("pool/x.deb?y", False),
])
def test_filenames_leaving_the_repository_are_refused(filename: str, ok: bool) -> None:
    assert (deb_repo.check_filename(filename) is None) == ok


def test_an_index_with_an_escaping_filename_is_refused() -> None:
    text = ("Package: evil\nVersion: 1\nArchitecture: all\nFilename: ../../x.deb\nSize: 3\nSHA256: " + "a" * 64
            + "\n")
    with pytest.raises(RepositoryError, match=r"Packages: the package 'evil' has a Filename '\.\./\.\./x\.deb' "
                                              r"that has an empty, '\.' or '\.\.' segment"):
        deb_repo.parse_packages_index(text, base_url="http://h/debian", origin="o", where="Packages")


# --------------------------------------------------------------------------- the resolver


def _pkg(name: str, version: str = "1.0", arch: str = "amd64", depends: str = "", provides: str = "",
         base: str = "http://h/debian") -> Candidate:
    digest = hashlib.sha256(f"{name} {version} {base}".encode()).hexdigest()
    return Candidate(name, version, arch, f"pool/main/{name}_{version}_{arch}.deb", digest, 100, base,
                     depends=depends, provides=provides, origin=f"{base} bookworm main")


def _index(*packages: Candidate) -> PackageIndex:
    return PackageIndex("test", packages)


def _closure(locked: list[deb_repo.LockedDeb]) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {p.name: (p.version, p.depends) for p in locked}


def test_the_closure_follows_depends_and_pre_depends_with_edges() -> None:
    index = _index(_pkg("app", depends="libfoo (>= 1.0)"), _pkg("libfoo", "1.2", depends="libc6"),
                   _pkg("libc6", "2.36"), _pkg("tool", depends="app"), _pkg("unused"))
    pre = _index(_pkg("starter", "1", depends="libc6, dpkg"), _pkg("dpkg", "1.21", arch="amd64"))
    locked = resolve([index, pre], ["tool", "starter"], "amd64")
    assert _closure(locked) == {
        "app": ("1.0", ("libfoo",)), "dpkg": ("1.21", ()), "libc6": ("2.36", ()), "libfoo": ("1.2", ("libc6",)),
        "starter": ("1", ("dpkg", "libc6")), "tool": ("1.0", ("app",))}
    assert [p.name for p in locked] == sorted(p.name for p in locked)
    assert locked[0].url == "http://h/debian/pool/main/app_1.0_amd64.deb"


def test_version_constraints_choose_the_highest_satisfying_version_across_sources() -> None:
    main = _index(_pkg("lib", "1.0"), _pkg("lib", "2.0"), _pkg("app", depends="lib (<< 2.0)"))
    security = _index(_pkg("lib", "1.0-1+deb12u1", base="http://h/security"))
    assert _closure(resolve([main, security], ["app"], "amd64"))["lib"] == ("1.0-1+deb12u1", ())
    assert resolve([main, security], ["app"], "amd64")[1].url.startswith("http://h/security/")
    # Unconstrained: the highest of all sources; a tie goes to the first source.
    assert _closure(resolve([main, security], ["lib"], "amd64"))["lib"][0] == "2.0"
    twin = _index(_pkg("lib", "2.0", base="http://h/mirror"))
    assert resolve([main, twin], ["lib"], "amd64")[0].url.startswith("http://h/debian/")


def test_alternatives_take_the_first_that_resolves_or_one_already_chosen() -> None:
    index = _index(_pkg("app", depends="missing | broken | good"), _pkg("broken", depends="nowhere"),
                   _pkg("good"), _pkg("other"), _pkg("two", depends="good | other"))
    assert set(_closure(resolve([index], ["app"], "amd64"))) == {"app", "good"}
    # An alternative already chosen (requested here) satisfies the relation.
    assert _closure(resolve([index], ["two", "other"], "amd64"))["two"] == ("1.0", ("other",))


def test_virtual_packages_through_provides() -> None:
    index = _index(_pkg("mailer", depends="mail-transport-agent"),
                   _pkg("postfix", "3.7", provides="mail-transport-agent"),
                   _pkg("exim4", "4.96", provides="mail-transport-agent"),
                   _pkg("needs-api", depends="api (>= 2)"),
                   _pkg("impl-old", "9", provides="api (= 1)"), _pkg("impl-new", "1", provides="api (= 2)"),
                   _pkg("unversioned", provides="api"))
    # Several providers: the one whose name sorts first, unless one is requested.
    assert _closure(resolve([index], ["mailer"], "amd64"))["mailer"] == ("1.0", ("exim4",))
    assert _closure(resolve([index], ["mailer", "postfix"], "amd64"))["mailer"] == ("1.0", ("postfix",))
    # A versioned relation needs a Provides with a matching '= version'.
    assert _closure(resolve([index], ["needs-api"], "amd64"))["needs-api"] == ("1.0", ("impl-new",))
    with pytest.raises(RepositoryError, match="'mail-transport-agent' is a virtual package, provided by exim4, "
                                              "postfix"):
        resolve([index], ["mail-transport-agent"], "amd64")


def test_a_real_package_wins_over_providers() -> None:
    index = _index(_pkg("app", depends="awk"), _pkg("awk", "1"), _pkg("gawk", "5", provides="awk"))
    assert _closure(resolve([index], ["app"], "amd64"))["app"] == ("1.0", ("awk",))


def test_arch_all_and_any_qualifiers_and_other_architectures() -> None:
    index = _index(_pkg("app", depends="python3:any, data, tool:amd64"), _pkg("python3", "3.11"),
                   _pkg("data", "1", arch="all"), _pkg("tool"), _pkg("armonly", arch="arm64"))
    locked = resolve([index], ["app"], "amd64")
    assert {p.name: p.architecture for p in locked} == {"app": "amd64", "data": "all", "python3": "amd64",
                                                        "tool": "amd64"}
    with pytest.raises(RepositoryError, match="no package 'armonly' is in the indexes for amd64"):
        resolve([index], ["armonly"], "amd64")


def test_cycles_are_resolved_with_both_edges() -> None:
    index = _index(_pkg("aa", depends="bb"), _pkg("bb", depends="cc"), _pkg("cc", depends="aa, cc"))
    assert _closure(resolve([index], ["aa"], "amd64")) == {"aa": ("1.0", ("bb",)), "bb": ("1.0", ("cc",)),
                                                           "cc": ("1.0", ("aa",))}


def test_an_unknown_name_gets_did_you_mean() -> None:
    index = _index(_pkg("busybox"), _pkg("bash"))
    with pytest.raises(RepositoryError, match="no package 'busybx' is in the indexes for amd64") as info:
        resolve([index], ["busybx"], "amd64")
    assert info.value.hint == "did you mean 'busybox'?"


def test_an_unsatisfiable_dependency_names_the_chain() -> None:
    index = _index(_pkg("app", depends="libbar"), _pkg("libbar", "2.0", depends="libfoo (>= 3)"),
                   _pkg("libfoo", "1.0"), _pkg("libfoo", "2.0"))
    with pytest.raises(RepositoryError) as info:
        resolve([index], ["app"], "amd64")
    assert info.value.message == (
        "libbar 2.0 depends on 'libfoo (>= 3)', which cannot be satisfied: the indexes have libfoo 2.0, 1.0 only "
        "(chain: app 1.0 (requested) -> libbar 2.0 -> libfoo (>= 3))")


def test_a_version_already_chosen_is_not_revisited_and_the_error_says_who_chose_it() -> None:
    index = _index(_pkg("lib", "2.0"), _pkg("lib", "1.0"), _pkg("old-app", depends="lib (<< 2)"))
    with pytest.raises(RepositoryError, match=r"lib 2.0 is already chosen, by lib 2.0 \(requested\)"):
        resolve([index], ["lib", "old-app"], "amd64")


def test_all_alternatives_failing_lists_each_reason() -> None:
    index = _index(_pkg("app", depends="a1 (>= 2) | b1"), _pkg("a1", "1"))
    with pytest.raises(RepositoryError, match=r"'a1 \(>= 2\) \| b1', which cannot be satisfied: \(1\) a1 \(>= 2\): "
                                              r"the indexes have a1 1 only; \(2\) b1: no package b1 is in the "
                                              r"indexes for amd64"):
        resolve([index], ["app"], "amd64")


def test_essential_packages_are_not_added_implicitly() -> None:
    index = _index(_pkg("hello"), _pkg("base-files"), _pkg("dpkg"))
    assert [p.name for p in resolve([index], ["hello"], "amd64")] == ["hello"]


# --------------------------------------------------------------------------- signatures


class Keys:
    """Two throwaway signing keys in a private GNUPGHOME."""

    def __init__(self, gpg: str, home: str) -> None:
        self.gpg, self.home = gpg, home
        for uid in ("Good Signer <good@example.invalid>", "Other Signer <other@example.invalid>"):
            self.run("--quick-gen-key", uid, "ed25519", "sign", "never")

    def run(self, *args: str, input: bytes | None = None) -> bytes:
        env = {**os.environ, "GNUPGHOME": self.home}
        return subprocess.run([self.gpg, "--batch", "--yes", "--pinentry-mode", "loopback", "--passphrase", "",
                               *args], input=input, env=env, check=True, capture_output=True).stdout

    def keyring(self, who: str, *, armor: bool = False) -> bytes:
        return self.run(*(["--armor"] if armor else []), "--export", f"{who}@example.invalid")

    def clearsign(self, text: str, who: str = "good") -> bytes:
        return self.run("--local-user", f"{who}@example.invalid", "--digest-algo", "SHA256", "--clearsign",
                        input=text.encode())


@pytest.fixture(scope="module")
def _module_keys() -> Iterator[Keys | None]:
    gpg = shutil.which("gpg")
    if gpg is None:
        yield None
        return
    home = tempfile.mkdtemp(prefix="dtg", dir="/tmp")  # short: gpg-agent's socket path has a length limit
    try:
        yield Keys(gpg, home)
    finally:
        if shutil.which("gpgconf"):
            subprocess.run(["gpgconf", "--kill", "all"], env={**os.environ, "GNUPGHOME": home}, check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def keys(require_tool: Callable[[str], str], _module_keys: Keys | None) -> Keys:
    require_tool("gpg")
    require_tool("gpgv")
    assert _module_keys is not None
    return _module_keys


RELEASE = "Origin: Test\nSuite: stable\nCodename: bookworm\nDate: Sat, 10 May 2025 10:00:00 UTC\nSHA256:\n"


def test_a_good_signature_gives_only_the_signed_text(keys: Keys) -> None:
    signed = keys.clearsign(RELEASE)
    text = deb_repo.verify_inrelease(signed, keys.keyring("good"), where="U/InRelease", keyring_name="k.gpg")
    assert text == RELEASE
    # Text after the signature is never read, and an armored keyring works as well.
    appended = signed + b"\nSHA256:\n " + b"0" * 64 + b" 1 main/binary-amd64/Packages\n"
    text = deb_repo.verify_inrelease(appended, keys.keyring("good", armor=True), where="U/InRelease",
                                     keyring_name="k.asc")
    assert text == RELEASE


def test_a_bad_signature_is_refused(keys: Keys) -> None:
    signed = keys.clearsign(RELEASE).replace(b"Origin: Test", b"Origin: Evil")
    with pytest.raises(RepositoryError, match=r"the signature of U/InRelease does not verify against k.gpg: "
                                              r"a BAD signature by key"):
        deb_repo.verify_inrelease(signed, keys.keyring("good"), where="U/InRelease", keyring_name="k.gpg")


def test_a_signature_by_a_key_outside_the_keyring_is_refused(keys: Keys) -> None:
    signed = keys.clearsign(RELEASE, who="other")
    with pytest.raises(RepositoryError, match=r"does not verify against k\.gpg: no signature by a key of the keyring"):
        deb_repo.verify_inrelease(signed, keys.keyring("good"), where="U/InRelease", keyring_name="k.gpg")


def test_an_unsigned_release_is_refused(keys: Keys) -> None:
    with pytest.raises(RepositoryError, match="U/InRelease is not signed") as info:
        deb_repo.verify_inrelease(RELEASE.encode(), keys.keyring("good"), where="U/InRelease", keyring_name="k.gpg")
    assert "only an InRelease signed by a key of k.gpg is accepted" in (info.value.hint or "")


def test_gpgv_status_needs_goodsig_and_validsig_and_refuses_weak_digests() -> None:
    fpr = "4CB50190207B4758A3F73A796ED0E7B82643E131"
    good = f"[GNUPG:] GOODSIG 6ED0E7B82643E131 Someone\n[GNUPG:] VALIDSIG {fpr} 2025-01-01 1 0 4 0 1 8 01 {fpr}\n"
    assert deb_repo.gpgv_status(good) == ([fpr], [])
    assert deb_repo.gpgv_status(good.replace(" 1 8 01", " 1 2 01"))[1] == [
        f"a signature by {fpr} uses the weak digest SHA-1"]
    assert deb_repo.gpgv_status(good.splitlines()[1]) == ([], [])  # VALIDSIG alone
    assert deb_repo.gpgv_status("[GNUPG:] EXPKEYSIG 6ED0E7B82643E131 x\n")[1] == [
        "a signature by an expired key (6ED0E7B82643E131)"]
    nopub = "[GNUPG:] ERRSIG AAAA 1 8 01 0 9\n[GNUPG:] NO_PUBKEY AAAA\n"
    assert deb_repo.gpgv_status(nopub + good) == ([fpr], [])  # another key of the release is not in the keyring


# --------------------------------------------------------------------------- reading a suite


def _write_repo(root: Path, keys: Keys, packages_text: str) -> None:
    binary = root / "dists" / "bookworm" / "main" / "binary-amd64"
    binary.mkdir(parents=True)
    raw = packages_text.encode()
    xz = lzma.compress(raw)
    (binary / "Packages.xz").write_bytes(xz)
    lines = "".join(f" {hashlib.sha256(data).hexdigest()} {len(data)} main/binary-amd64/{name}\n"
                    for name, data in (("Packages", raw), ("Packages.xz", xz)))
    (root / "dists" / "bookworm" / "InRelease").write_bytes(keys.clearsign(RELEASE + lines))


PACKAGES = ("Package: hello\nVersion: 1.0-1\nArchitecture: amd64\nDepends: libc6 (>= 2.36)\n"
            "Filename: pool/main/h/hello/hello_1.0-1_amd64.deb\nSize: 1234\nSHA256: " + "b" * 64 + "\n"
            "Description: greets\n the world\n\n"
            "Package: libc6\nVersion: 2.36-9\nArchitecture: amd64\nFilename: pool/main/g/glibc/libc6_2.36-9_amd64.deb\n"
            "Size: 99\nSHA256: " + "c" * 64 + "\n")


def _read_suite(root: Path, keys: Keys, *, keyring: str = "good") -> tuple[Any, PackageIndex]:
    source = deb_repo.parse_source(f"file://{root} bookworm main")
    reader = deb_repo.RepositoryReader(NetworkLimits())
    release, _digest = reader.release(source, keys.keyring(keyring), "keyring.gpg")
    return release, reader.index(source, release, "main", "amd64")


def test_a_signed_suite_is_read_and_resolved(tmp_path: Path, keys: Keys) -> None:
    _write_repo(tmp_path, keys, PACKAGES)
    release, index = _read_suite(tmp_path, keys)
    assert release.date == "Sat, 10 May 2025 10:00:00 UTC"
    (hello, _libc6) = resolve([index], ["hello"], "amd64")
    assert hello.url == f"file://{tmp_path}/pool/main/h/hello/hello_1.0-1_amd64.deb"
    assert (hello.sha256, hello.size, hello.depends) == ("b" * 64, 1234, ("libc6",))


def test_a_tampered_packages_index_is_refused(tmp_path: Path, keys: Keys) -> None:
    _write_repo(tmp_path, keys, PACKAGES)
    index = tmp_path / "dists/bookworm/main/binary-amd64/Packages.xz"
    index.write_bytes(lzma.compress(PACKAGES.replace("b" * 64, "d" * 64).encode()))
    with pytest.raises(RepositoryError, match=r"/dists/bookworm/main/binary-amd64/Packages\.xz does not match the "
                                              r"SHA256 in bookworm's InRelease: the mirror is inconsistent or "
                                              r"tampered with"):
        _read_suite(tmp_path, keys)


def test_a_wrong_keyring_and_a_missing_inrelease_are_refused(tmp_path: Path, keys: Keys) -> None:
    _write_repo(tmp_path, keys, PACKAGES)
    with pytest.raises(RepositoryError, match=r"does not verify against keyring\.gpg"):
        _read_suite(tmp_path, keys, keyring="other")
    (tmp_path / "dists/bookworm/InRelease").rename(tmp_path / "dists/bookworm/Release")
    with pytest.raises(RepositoryError, match=r"InRelease does not exist: only an InRelease signed by a key of "
                                              r"keyring\.gpg is accepted \(a suite with just a Release"):
        _read_suite(tmp_path, keys)


def test_an_unreachable_source_is_a_clear_error() -> None:
    source = deb_repo.parse_source("http://127.0.0.1:9/debian bookworm main")  # the discard port: refused
    reader = deb_repo.RepositoryReader(NetworkLimits(connect_timeout=2, timeout=2, deadline=5))
    with pytest.raises(RepositoryError, match=r"cannot read http://127\.0\.0\.1:9/debian/dists/bookworm/InRelease"):
        reader.release(source, b"x", "keyring.gpg")


@pytest.mark.parametrize(("text", "says"), [
    ("http://h/debian bookworm", "is not 'URL SUITE COMPONENT"),
    ("ftp://h/debian bookworm main", "an http, https or file URL"),
    ("http://h/debian ../x main", "bad suite"),
    ("http://h/debian ./ main", "bad suite"),
])
def test_bad_sources_are_refused(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        deb_repo.parse_source(text)


def test_decompression_is_bounded() -> None:
    data = lzma.compress(b"x" * 100000)
    assert deb_repo.decompress_index(data, "Packages.xz", limit=100000) == b"x" * 100000
    with pytest.raises(ValueError, match="larger than 1000 bytes"):
        deb_repo.decompress_index(data, "Packages.xz", limit=1000)
    with pytest.raises(ValueError, match="ends before"):
        deb_repo.decompress_index(data[:-20], "Packages.xz", limit=100000)


# --------------------------------------------------------------------------- the lock file


def test_the_lock_is_sorted_json_written_atomically(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from dtbuild.plugins.builtin import deb_lock_command

    index = _index(_pkg("hello", depends="libc6"), _pkg("libc6", "2.36"))
    info = SimpleNamespace(inputs_digest="sha256:" + "1" * 64)
    release = deb_repo.Release({"Date": "Sat, 10 May 2025 10:00:00 UTC"}, {}, "2" * 64)
    source = deb_repo.parse_source("http://h/debian/ bookworm main contrib")
    document = deb_lock_command.lock_document(info, b"keyring", [(source, release)],
                                              {"amd64": resolve([index], ["hello"], "amd64")})
    text = deb_lock_command.lock_text(document)
    path = tmp_path / "debian" / "debian.lock.json"
    deb_lock_command.write_atomically(str(path), text)
    assert path.read_text() == text and text.endswith("}\n") and text.startswith('{\n  "architectures": {\n')
    assert os.listdir(path.parent) == ["debian.lock.json"]
    lock = json.loads(text)
    assert lock["sources"] == [{"url": "http://h/debian", "suite": "bookworm", "components": ["main", "contrib"],
                                "inrelease_sha256": "2" * 64, "date": "Sat, 10 May 2025 10:00:00 UTC"}]
    assert lock["keyring_sha256"] == hashlib.sha256(b"keyring").hexdigest()
    assert [(e["name"], e["depends"]) for e in lock["architectures"]["amd64"]] == [("hello", ["libc6"]),
                                                                                  ("libc6", [])]
    assert deb_lock_command._expired("Tue, 08 Dec 2020 01:33:13 UTC") and not deb_lock_command._expired("")
