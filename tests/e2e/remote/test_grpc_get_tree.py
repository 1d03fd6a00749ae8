"""ContentAddressableStorage.GetTree: a whole tree of Directory messages read in one
streamed call, against a real buildbox-casd on loopback (and a small in-process gRPC
server for the answers casd never gives: pages that do not advance, a root that is not
the one asked for). An output directory that a server names only by its root Directory
(REAPI 2.3's ``root_directory_digest``) is written by remote execution and taken from
the remote cache like one named by a Tree; over HTTP, which has no GetTree, such a
result is a miss with a warning."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from dtbuild.engine.execution import build_tree
from dtbuild.engine.remote import (
    Digest,
    Endpoint,
    MissingRemoteBlob,
    RemoteError,
    Transport,
    open_transport,
)
from dtbuild.engine.remote import grpc_transport as grpc_transport_module
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from dtbuild.engine.remote.cache import RemoteCache
from dtbuild.engine.remote.execute import RemoteExecution
from dtbuild.engine.remote.grpc_transport import GrpcTransport
from dtbuild.engine.remote.reapi import action_digest, export_tree
from dtbuild.engine.store import OutputValue, Store
from dtbuild.plugins.interfaces import TreeEntry
from servers_casd import CasdServer, require_buildbox, start_casd

pytestmark = pytest.mark.e2e


@pytest.fixture
def casd(tmp_path: Path) -> Iterator[CasdServer]:
    require_buildbox()
    with start_casd(tmp_path / "casd") as server:
        yield server


def _transport(url: str, role: str = "remote cache") -> GrpcTransport:
    transport = open_transport(Endpoint(url, "--remote-cache", role=role))
    assert isinstance(transport, GrpcTransport)
    return transport


def _digest(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def _pb(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


class _Made:
    """A tree made in a store of its own: its store root, total bytes, the REAPI root
    Directory's digest, and every Directory (serialized) and file blob it holds."""

    def __init__(self, tmp_path: Path, entries: list[TreeEntry] | None = None) -> None:
        self.store = Store(str(tmp_path / "elsewhere"))
        tool = self.store.put_bytes(b"#!/bin/sh\necho hi\n")
        conf = self.store.put_bytes(b"key = value\n")
        entries = entries or [
            TreeEntry("bin/tool", "file", 0o755, tool, 18),
            TreeEntry("etc/app/conf", "file", 0o644, conf, 12),
            # Two directories with the same contents: one Directory message.
            TreeEntry("share/a/conf", "file", 0o644, conf, 12),
            TreeEntry("share/b/conf", "file", 0o644, conf, 12),
            TreeEntry("lnk", "symlink", target="bin/tool"),
        ]
        self.root, self.total = build_tree(self.store, entries)
        tree_data, _, _, self.files = export_tree(self.store, self.root)
        tree = re_pb2.Tree()
        tree.ParseFromString(tree_data)
        root_bytes = tree.root.SerializeToString(deterministic=True)
        self.root_directory = _digest(root_bytes)
        self.directories = [root_bytes, *(c.SerializeToString(deterministic=True) for c in tree.children)]

    def upload(self, transport: GrpcTransport) -> None:
        blobs = {_digest(d): d for d in self.directories}
        blobs.update({f: self.store.read_blob(f.hash) for f in self.files})
        transport.write_small_blobs(blobs)


# --------------------------------------------------------------------------- get_tree


def test_get_tree_returns_every_directory_of_the_tree(casd: CasdServer, tmp_path: Path) -> None:
    made = _Made(tmp_path)
    t = _transport(casd.url)
    made.upload(t)
    got = t.get_tree(made.root_directory)
    assert sorted(got) == sorted(made.directories)
    # root, bin, etc, share and the one leaf (etc/app = share/a = share/b), each once,
    # though casd sends the leaf three times.
    assert len(got) == len(set(got)) == 5
    t.close()


def test_get_tree_follows_small_pages(casd: CasdServer, tmp_path: Path) -> None:
    made = _Made(tmp_path)
    t = _transport(casd.url)
    made.upload(t)
    # casd does page: one directory per answer (a repeated one again), each answer
    # naming the next page.
    request = re_pb2.GetTreeRequest(root_digest=_pb(made.root_directory), page_size=1)
    pages = list(t._stub("cas").GetTree(request, timeout=10))
    assert len(pages) == 7 and all(len(p.directories) == 1 and p.next_page_token for p in pages[:-1])
    assert sorted(t.get_tree(made.root_directory, page_size=1)) == sorted(made.directories)
    t.close()


def test_a_missing_root_is_a_missing_blob(casd: CasdServer) -> None:
    t = _transport(casd.url)
    absent = _digest(b"no such directory")
    with pytest.raises(MissingRemoteBlob, match=f"has no directory {absent.hash}"):
        t.get_tree(absent)
    t.close()


def test_a_tree_over_the_limit_is_refused(casd: CasdServer, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    made = _Made(tmp_path)
    t = _transport(casd.url)
    made.upload(t)
    monkeypatch.setattr(grpc_transport_module, "MAX_TREE_DIRECTORIES", 3)
    with pytest.raises(RemoteError, match="more than 3 directories") as info:
        t.get_tree(made.root_directory)
    assert not isinstance(info.value, MissingRemoteBlob)
    t.close()


# --------------------------------------------------------------------------- a server casd is not


class _FakeCas(re_grpc.ContentAddressableStorageServicer, re_grpc.CapabilitiesServicer):
    """Capabilities, a BatchReadBlobs that has nothing, and a GetTree that answers what
    the test says: ``pages[token]`` is (directories, next token) for one call."""

    def __init__(self) -> None:
        self.pages: dict[str, tuple[list[bytes], str]] = {}
        self.requests: list[re_pb2.GetTreeRequest] = []

    def GetCapabilities(self, request: Any, context: Any) -> re_pb2.ServerCapabilities:
        return re_pb2.ServerCapabilities(cache_capabilities=re_pb2.CacheCapabilities(
            digest_functions=[re_pb2.DigestFunction.SHA256]))

    def BatchReadBlobs(self, request: Any, context: Any) -> re_pb2.BatchReadBlobsResponse:
        answer = re_pb2.BatchReadBlobsResponse()
        for d in request.digests:
            answer.responses.add(digest=d).status.code = grpc.StatusCode.NOT_FOUND.value[0]
        return answer

    def GetTree(self, request: Any, context: Any) -> Iterator[re_pb2.GetTreeResponse]:
        self.requests.append(request)
        directories, token = self.pages[request.page_token]
        response = re_pb2.GetTreeResponse(next_page_token=token)
        for data in directories:
            response.directories.add().ParseFromString(data)
        yield response


@pytest.fixture
def fake_cas() -> Iterator[tuple[_FakeCas, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = _FakeCas()
    re_grpc.add_ContentAddressableStorageServicer_to_server(servicer, server)
    re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"grpc://127.0.0.1:{port}"
    server.stop(grace=None)


def _directory(**files: Digest) -> bytes:
    message = re_pb2.Directory()
    for name, digest in sorted(files.items()):
        message.files.add(name=name, digest=_pb(digest))
    return message.SerializeToString(deterministic=True)


def test_pages_over_several_calls_are_joined(fake_cas: tuple[_FakeCas, str]) -> None:
    servicer, url = fake_cas
    root, child = _directory(a=_digest(b"a")), _directory(b=_digest(b"b"))
    servicer.pages = {"": ([root], "page-2"), "page-2": ([child], "")}
    t = _transport(url)
    assert t.get_tree(_digest(root)) == [root, child]
    assert [r.page_token for r in servicer.requests] == ["", "page-2"]
    t.close()


def test_pages_that_do_not_advance_are_refused(fake_cas: tuple[_FakeCas, str]) -> None:
    servicer, url = fake_cas
    root = _directory(a=_digest(b"a"))
    servicer.pages = {"": ([root], "again"), "again": ([], "again")}
    t = _transport(url)
    with pytest.raises(RemoteError, match="do not advance"):
        t.get_tree(_digest(root))
    assert len(servicer.requests) == 2
    t.close()


# --------------------------------------------------------------------------- remote execution


def _result_naming_root(path: str, root: Digest) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(exit_code=0, output_directories=[
        re_pb2.OutputDirectory(path=path, root_directory_digest=_pb(root))])


def test_execution_writes_an_output_named_by_its_root_directory(casd: CasdServer, tmp_path: Path) -> None:
    made = _Made(tmp_path)
    t = _transport(casd.url, role="remote executor")
    made.upload(t)
    workdir = tmp_path / "work"
    written = RemoteExecution(t)._write_outputs(_result_naming_root("out", made.root_directory), str(workdir),
                                                ["out"])
    assert written == ["out"]
    out = workdir / "out"
    assert (out / "bin" / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE((out / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "etc" / "app" / "conf").stat().st_mode) == 0o644
    assert (out / "share" / "a" / "conf").read_bytes() == (out / "share" / "b" / "conf").read_bytes() \
        == b"key = value\n"
    assert os.readlink(out / "lnk") == "bin/tool"
    t.close()


def test_execution_refuses_a_tree_without_the_root_asked_for(fake_cas: tuple[_FakeCas, str],
                                                            tmp_path: Path) -> None:
    servicer, url = fake_cas
    asked, other = _directory(a=_digest(b"a")), _directory(b=_digest(b"b"))
    servicer.pages = {"": ([other], "")}
    t = _transport(url, role="remote executor")
    with pytest.raises(RemoteError, match=f"unusable tree for output directory out .*{_digest(asked).hash} arrived "
                                          "without that directory"):
        RemoteExecution(t)._write_outputs(_result_naming_root("out", _digest(asked)), str(tmp_path / "w"), ["out"])
    t.close()


def test_execution_refuses_a_child_that_is_not_what_its_parent_names(fake_cas: tuple[_FakeCas, str],
                                                                     tmp_path: Path) -> None:
    servicer, url = fake_cas
    named = _directory(a=_digest(b"a"))
    sent = _directory(a=_digest(b"other bytes"))
    parent = re_pb2.Directory()
    parent.directories.add(name="sub", digest=_pb(_digest(named)))
    root = parent.SerializeToString(deterministic=True)
    servicer.pages = {"": ([root, sent], "")}
    t = _transport(url, role="remote executor")
    with pytest.raises(RemoteError, match=_digest(named).hash):
        RemoteExecution(t)._write_outputs(_result_naming_root("out", _digest(root)), str(tmp_path / "w"), ["out"])
    assert not (tmp_path / "w" / "out" / "sub" / "a").exists()
    t.close()


# --------------------------------------------------------------------------- remote cache


def test_cache_takes_a_result_named_by_its_root_directory(casd: CasdServer, tmp_path: Path) -> None:
    made = _Made(tmp_path)
    t = _transport(casd.url)
    made.upload(t)
    t.put_action_result(action_digest("k1"), _result_naming_root("rootfs", made.root_directory).SerializeToString())
    store = Store(str(tmp_path / "local"))
    warnings: list[str] = []
    cache = RemoteCache(t, store, upload=False, warn=warnings.append)
    result = cache.lookup("k1", {"rootfs"})
    assert warnings == []
    assert result is not None and result.outputs == {"rootfs": OutputValue(made.root, made.total, True)}
    assert store.tree_blobs_present(made.root)
    assert {(e.path, e.mode) for e in store.walk_tree(made.root)} >= {("bin/tool", 0o755),
                                                                       ("etc/app/conf", 0o644)}
    t.close()


class _NoGetTree(Transport):
    """A cache like Bazel's HTTP one: blobs and results, no GetTree."""

    def __init__(self, result: bytes) -> None:
        super().__init__(Endpoint("http://cache.test:1", "--remote-cache"))
        self.result = result

    def get_action_result(self, action: Digest) -> bytes | None:
        return self.result

    def put_action_result(self, action: Digest, result: bytes) -> None:
        raise AssertionError("not uploading")

    def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        return set(digests)

    def read_blob(self, digest: Digest, sink: Callable[[bytes], object]) -> None:
        raise MissingRemoteBlob(f"no blob {digest.hash}")

    def write_blob(self, digest: Digest, open_blob: Callable[[], IO[bytes]]) -> None:
        raise AssertionError("not uploading")


def test_without_get_tree_such_a_result_is_a_miss_with_a_warning(tmp_path: Path) -> None:
    made = _Made(tmp_path)
    transport = _NoGetTree(_result_naming_root("rootfs", made.root_directory).SerializeToString())
    warnings: list[str] = []
    cache = RemoteCache(transport, Store(str(tmp_path / "local")), upload=False, warn=warnings.append)
    assert cache.lookup("k1", {"rootfs"}) is None
    assert len(warnings) == 1 and "only a gRPC remote cache can read" in warnings[0]
    assert cache.usable  # an unusable entry, not an unusable remote
