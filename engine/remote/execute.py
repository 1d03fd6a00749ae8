"""Running one command on a REAPI v2 Execution service.

:meth:`RemoteExecution.execute` takes a directory on disk, the *input root*, and a
command to run in one of its subdirectories, and does what a REAPI client does:

1. It walks the input root into ``Directory`` messages (files with ``is_executable``,
   symlinks with their target as written, subdirectories; every list sorted by name, as
   REAPI requires) and asks ``FindMissingBlobs`` which of them and of the files the
   executor's CAS lacks; small blobs go up batched, large ones streamed.
2. It uploads the ``Command`` (arguments, environment sorted by name, ``output_paths``
   relative to the working directory, the platform properties) and the ``Action``
   (input root, timeout, the same platform), then calls ``Execute`` with
   ``skip_cache_lookup=False``, so the service may answer from its own action cache.
3. It follows the operation stream to its end (``WaitExecution`` when the stream ends or
   breaks before the operation is done). A cancelled build cancels the call and the
   operation (``CancelOperation``), and the command's result is that of a killed one.
4. On completion it writes the output files (and output directories, from their
   ``Tree``, or from ``GetTree`` when the service names only the root ``Directory``:
   ``root_directory_digest``) back into the input root at their paths, executable bits
   set, every blob and Directory checked against its digest; stdout and stderr (inline
   or by digest) make the output tail.

A non-zero exit code is a normal result. Anything else that goes wrong (the service
could not run the command: a ``status`` that is not OK; a transport failure; a blob that
does not match its digest; an output path outside the declared ones) is a
:class:`RemoteError`: the engine then runs the command here after one warning.

**The command's view of the input root.** REAPI leaves where the input root sits on the
worker to the worker. ``buildbox-run`` (the bubblewrap runner behind buildbox-casd's
local execution and many buildgrid workers) makes the input root the sandbox's ``/``,
with the host paths it is told to bind (``/usr``, ``/bin``, ...) mounted over it and a
fresh tmpfs on ``/tmp``; the working directory is then ``/`` + its path in the input
root. The command's argv and environment are written by the action for the host paths
of its execroot, so :meth:`execute` rewrites every environment value that is an absolute
path inside the input root (or a ``:``-separated list of them) to the path the command
sees, ``sandbox_root`` + its relative path (``sandbox_root`` is ``/`` by default). Argv
is sent as given: actions put paths in the environment, not in argv.

Nothing here is imported without a remote executor configured: grpc and protobuf load
with this module.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import stat
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import grpc
from dtbuild.engine.remote import (
    Digest,
    Endpoint,
    RemoteError,
)
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from dtbuild.engine.remote._reapi.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from dtbuild.engine.remote.reapi import MAX_TREE_DEPTH, MAX_TREE_ENTRIES, digest_of
from dtbuild.engine.store import hash_file

if TYPE_CHECKING:
    from dtbuild.engine.remote.grpc_transport import GrpcTransport

#: Blobs up to this size go up and down in batches; larger ones are streamed.
SMALL_BLOB = 1 << 20
#: The most bytes one batch request carries (under gRPC's default 4 MiB message limit).
BATCH_BYTES = 3 << 20
#: Lines of stdout and stderr kept for the output tail (as the local executor keeps).
OUTPUT_TAIL_LINES = 40
_TAIL_BYTES = 64 * 1024
#: Exit code reported for a command stopped by cancellation or its timeout (SIGKILL, as
#: the local executor reports a killed process group).
KILLED_EXIT_CODE = -9
#: How often a cancel token is looked at while the operation stream waits.
_CANCEL_POLL = 0.1
#: How many times a broken operation stream is resumed with WaitExecution.
_MAX_RESUMES = 5
#: Seconds the service gets beyond the action's own timeout before the call is given up.
_TIMEOUT_GRACE = 30.0


@dataclass(frozen=True)
class ExecutionResult:
    """What a remote execution produced (its outputs are already in the input root)."""

    exit_code: int
    #: The last lines of stdout then stderr (REAPI keeps them apart).
    output: str
    #: Whether the service answered from its action cache instead of running the command.
    cached: bool = False
    #: The digest of the Action that was executed.
    action_digest: Digest | None = None
    #: Paths (relative to the working directory) the result held and were written.
    outputs: tuple[str, ...] = field(default=())


def _pb_digest(d: Digest) -> Any:
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


def _rpc_error(e: grpc.RpcError, what: str, transport: GrpcTransport) -> RemoteError:
    """The transport's error for ``e``, but for a server without an Execution service."""
    if callable(getattr(e, "code", None)) and e.code() is grpc.StatusCode.UNIMPLEMENTED:
        endpoint = transport.endpoint
        return RemoteError(endpoint.redact(
            f"{endpoint.url} does not run commands ({e.details() or 'UNIMPLEMENTED'}): it is a cache, not an "
            "execution service (buildbox-casd runs them with --buildbox-run=PATH)"))
    return transport.error(e, what)


class _InputTree:
    """The input root as REAPI messages: every Directory by digest, and where each file
    blob is on disk."""

    def __init__(self, root: str) -> None:
        self.directories: dict[Digest, bytes] = {}
        self.files: dict[Digest, str] = {}
        self.root_digest = self._directory(root)

    def _directory(self, path: str) -> Digest:
        message = re_pb2.Directory()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        except OSError as e:
            raise RemoteError(f"cannot read input directory {path}: {e.strerror}") from None
        for entry in entries:
            full = entry.path
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                message.symlinks.add(name=entry.name, target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                message.directories.add(name=entry.name, digest=_pb_digest(self._directory(full)))
            elif stat.S_ISREG(st.st_mode):
                digest = Digest(*hash_file(full))
                self.files.setdefault(digest, full)
                message.files.add(name=entry.name, digest=_pb_digest(digest),
                                  is_executable=bool(st.st_mode & stat.S_IXUSR))
            else:
                raise RemoteError(f"input {full} is neither a file, a directory nor a symlink: "
                                  "REAPI cannot send it")
        data = message.SerializeToString(deterministic=True)
        digest = digest_of(data)
        self.directories[digest] = data
        return digest


def rewrite_env(env: Mapping[str, str], input_root: str, sandbox_root: str) -> dict[str, str]:
    """``env`` with every value that is an absolute path under ``input_root`` (or a
    ``:``-separated list of paths, one of which is) rewritten to where the command sees
    it: ``sandbox_root`` joined with the path relative to the input root."""
    root = os.path.normpath(input_root)

    def one(part: str) -> str:
        if not os.path.isabs(part):
            return part
        norm = os.path.normpath(part)
        if norm == root:
            return sandbox_root
        if norm.startswith(root.rstrip("/") + "/"):
            return os.path.join(sandbox_root, os.path.relpath(norm, root))
        return part

    return {k: ":".join(one(p) for p in v.split(":")) for k, v in env.items()}


def _check_output_path(path: str, declared: Sequence[str]) -> str:
    """``path`` from an ActionResult if it is a declared output (or below a declared
    directory) and stays inside the working directory, else RemoteError."""
    norm = os.path.normpath(path)
    if (not path or os.path.isabs(path) or norm != path or norm.startswith("../") or norm == ".."
            or not any(norm == d or norm.startswith(d.rstrip("/") + "/") for d in declared)):
        raise RemoteError(f"the remote executor returned output {path!r}, which the command did not declare")
    return norm


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise RemoteError(f"the remote executor returned a tree entry named {name!r}")
    return name


class RemoteExecution:
    """Executes commands on the Execution service behind ``transport`` (a
    :class:`GrpcTransport` whose CAS is the one the service reads its inputs from).
    Safe to use from several threads: each call has its own state."""

    @classmethod
    def open(cls, endpoint: Endpoint) -> RemoteExecution:
        """A client for ``endpoint`` over its own :class:`GrpcTransport`."""
        from dtbuild.engine.remote.grpc_transport import GrpcTransport

        return cls(GrpcTransport(endpoint))

    def __init__(self, transport: GrpcTransport, *, sandbox_root: str = "/") -> None:
        self.transport = transport
        self.sandbox_root = sandbox_root
        channel = transport.channel
        self._execution = re_grpc.ExecutionStub(channel)
        from google.longrunning import operations_pb2_grpc

        self._operations = operations_pb2_grpc.OperationsStub(channel)
        self._metadata = transport.metadata

    @property
    def instance_name(self) -> str:
        return self.transport.instance_name

    # ----------------------------------------------------------------------- execute

    def execute(self, input_root: str, working_directory: str, argv: Sequence[str], env: Mapping[str, str],
                output_paths: Sequence[str], platform: Mapping[str, str] | None = None,
                timeout: float | None = None, cancel: Any = None) -> ExecutionResult:
        """Run ``argv`` in ``working_directory`` (relative to ``input_root``) remotely and
        write the ``output_paths`` (relative to the working directory) it produced back
        into the input root. ``cancel`` is a CancelToken (``is_set()``/``wait()``).

        :raises RemoteError: when the service could not run the command or the
            transport failed; a non-zero exit code is a result, not an error.
        """
        input_root = os.path.abspath(input_root)
        wd = os.path.normpath(working_directory) if working_directory not in ("", ".") else ""
        if wd.startswith("..") or os.path.isabs(wd):
            raise RemoteError(f"working directory {working_directory!r} is not inside the input root")
        outputs = sorted({os.path.normpath(p) for p in output_paths})
        props = sorted((platform or {}).items())
        pb_platform = re_pb2.Platform(properties=[re_pb2.Platform.Property(name=str(k), value=str(v))
                                                  for k, v in props])
        sandbox_env = rewrite_env(env, input_root, self.sandbox_root)
        command = re_pb2.Command(
            arguments=list(argv),
            environment_variables=[re_pb2.Command.EnvironmentVariable(name=k, value=v)
                                   for k, v in sorted(sandbox_env.items())],
            output_paths=outputs, working_directory=wd, platform=pb_platform)
        command_bytes = command.SerializeToString(deterministic=True)
        tree = _InputTree(input_root)
        action = re_pb2.Action(command_digest=_pb_digest(digest_of(command_bytes)),
                               input_root_digest=_pb_digest(tree.root_digest), platform=pb_platform)
        if timeout is not None:
            # Whole seconds, rounded up: workers (buildbox-run) drop the fraction, and a
            # command must not be stopped before its time.
            action.timeout.FromSeconds(max(1, math.ceil(timeout)))
        action_bytes = action.SerializeToString(deterministic=True)
        action_digest = digest_of(action_bytes)

        self._upload(tree, {digest_of(command_bytes): command_bytes, action_digest: action_bytes})
        deadline = None if timeout is None else time.monotonic() + timeout + _TIMEOUT_GRACE
        response = self._run(action_digest, cancel, deadline)
        if response is None:  # cancelled, or the service let the deadline pass
            return ExecutionResult(KILLED_EXIT_CODE, "", action_digest=action_digest)
        code = response.status.code
        if code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]:
            tail = self._output_tail(response.result)
            note = f"the command timed out after {timeout:g} seconds" if timeout is not None else "timed out"
            return ExecutionResult(KILLED_EXIT_CODE, "\n".join(x for x in (tail, note) if x),
                                   action_digest=action_digest)
        if code != 0:
            message = response.status.message or response.message or f"status code {code}"
            raise RemoteError(f"the remote executor could not run the command: {message}")
        result = response.result
        written = self._write_outputs(result, os.path.join(input_root, wd), outputs)
        return ExecutionResult(result.exit_code, self._output_tail(result), cached=response.cached_result,
                               action_digest=action_digest, outputs=tuple(written))

    # ----------------------------------------------------------------------- upload

    def _upload(self, tree: _InputTree, extra: Mapping[Digest, bytes]) -> None:
        inline: dict[Digest, bytes] = dict(tree.directories)
        inline.update(extra)
        everything = set(inline) | set(tree.files)
        missing = self.transport.find_missing(everything)
        batch: dict[Digest, bytes] = {}
        batch_size = 0

        def flush() -> None:
            nonlocal batch, batch_size
            if batch:
                self.transport.write_small_blobs(batch)
            batch, batch_size = {}, 0

        for digest in sorted(missing):
            if digest in inline:
                data = inline[digest]
                if digest.size > SMALL_BLOB:
                    self.transport.write_blob(digest, functools.partial(io.BytesIO, data))
                    continue
            elif digest.size > SMALL_BLOB:
                path = tree.files[digest]
                self.transport.write_blob(digest, functools.partial(_open_binary, path))
                continue
            else:
                with open(tree.files[digest], "rb") as f:
                    data = f.read()
                if digest_of(data) != digest:
                    raise RemoteError(f"input {tree.files[digest]} changed while it was being uploaded")
            if batch_size + digest.size > BATCH_BYTES:
                flush()
            batch[digest] = data
            batch_size += digest.size
        flush()

    # ----------------------------------------------------------------------- the operation

    def _run(self, action_digest: Digest, cancel: Any, deadline: float | None) -> Any:
        """The ExecuteResponse of the action, or None when cancelled (or past
        ``deadline``)."""
        request = re_pb2.ExecuteRequest(instance_name=self.instance_name, action_digest=_pb_digest(action_digest),
                                        skip_cache_lookup=False)
        name: str | None = None
        resumes = 0
        call: Any = self._execution.Execute(request, metadata=self._metadata, wait_for_ready=False)
        while True:
            stopped = threading.Event()
            watcher = threading.Thread(target=self._watch, args=(call, cancel, deadline, stopped), daemon=True)
            watcher.start()
            try:
                for op in call:
                    name = op.name or name
                    if op.done:
                        return self._response(op)
            except grpc.RpcError as e:
                if self._gave_up(cancel, deadline):
                    self._cancel_operation(name)
                    return None
                code = e.code() if isinstance(e, grpc.Call) else None
                if name is None or code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                                grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN,
                                                grpc.StatusCode.INTERNAL) or resumes >= _MAX_RESUMES:
                    raise _rpc_error(e, "executing the command", self.transport) from None
            finally:
                stopped.set()
                watcher.join()
            if self._gave_up(cancel, deadline):
                self._cancel_operation(name)
                return None
            # The stream ended (or broke) before the operation was done: resume it.
            if name is None or resumes >= _MAX_RESUMES:
                raise RemoteError("the remote executor ended the Execute stream before the command finished")
            resumes += 1
            if resumes > 1:
                time.sleep(min(2.0, 0.2 * resumes))
            call = self._execution.WaitExecution(re_pb2.WaitExecutionRequest(name=name), metadata=self._metadata,
                                                 wait_for_ready=False)

    @staticmethod
    def _gave_up(cancel: Any, deadline: float | None) -> bool:
        return (cancel is not None and cancel.is_set()) or (deadline is not None and time.monotonic() > deadline)

    def _watch(self, call: Any, cancel: Any, deadline: float | None, stopped: threading.Event) -> None:
        while not stopped.wait(_CANCEL_POLL):
            if self._gave_up(cancel, deadline):
                call.cancel()
                return

    def _cancel_operation(self, name: str | None) -> None:
        if not name:
            return
        from google.longrunning import operations_pb2

        try:
            self._operations.CancelOperation(operations_pb2.CancelOperationRequest(name=name),
                                             metadata=self._metadata, timeout=self.transport.endpoint.timeout)
        except grpc.RpcError:
            pass  # the stream is gone already; a service that cannot cancel runs it out

    @staticmethod
    def _response(op: Any) -> Any:
        if op.WhichOneof("result") == "error":
            raise RemoteError(f"the remote executor could not run the command: {op.error.message or op.error.code}")
        response = re_pb2.ExecuteResponse()
        if not op.response.Unpack(response):
            raise RemoteError(f"the remote executor answered with a {op.response.type_url}, not an ExecuteResponse")
        return response

    # ----------------------------------------------------------------------- outputs

    def _fetch(self, digest_pb: Any) -> bytes:
        digest = Digest(digest_pb.hash, digest_pb.size_bytes)
        if digest.size == 0:
            return b""
        if digest.size <= SMALL_BLOB:
            data = self.transport.read_small_blobs([digest]).get(digest)
            if data is None:
                raise RemoteError(f"the remote executor's CAS has no blob {digest.hash}")
        else:
            chunks: list[bytes] = []
            self.transport.read_blob(digest, chunks.append)
            data = b"".join(chunks)
        if digest_of(data) != digest:
            raise RemoteError(f"the remote executor's CAS sent blob {digest.hash} with other bytes")
        return data

    def _fetch_to(self, digest_pb: Any, dest: str, executable: bool) -> None:
        digest = Digest(digest_pb.hash, digest_pb.size_bytes)
        _replace_path(dest)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        h = hashlib.sha256()
        size = 0
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if executable else 0o644)
        with os.fdopen(fd, "wb") as f:
            if 0 < digest.size <= SMALL_BLOB:
                data = self._fetch(digest_pb)
                f.write(data)
                h.update(data)
                size = len(data)
            elif digest.size > SMALL_BLOB:
                def sink(chunk: bytes) -> None:
                    nonlocal size
                    f.write(chunk)
                    h.update(chunk)
                    size += len(chunk)

                self.transport.read_blob(digest, sink)
        os.chmod(dest, 0o755 if executable else 0o644)
        if Digest(h.hexdigest(), size) != digest:
            os.unlink(dest)
            raise RemoteError(f"the remote executor's CAS sent output {dest} with other bytes than its digest")

    def _write_outputs(self, result: Any, workdir: str, declared: Sequence[str]) -> list[str]:
        written: list[str] = []
        for f in result.output_files:
            rel = _check_output_path(f.path, declared)
            dest = os.path.join(workdir, rel)
            if f.contents and len(f.contents) == f.digest.size_bytes:
                if digest_of(f.contents) != Digest(f.digest.hash, f.digest.size_bytes):
                    raise RemoteError(f"the remote executor sent output {rel} with other bytes than its digest")
                _write_file(dest, f.contents, f.is_executable)
            else:
                self._fetch_to(f.digest, dest, f.is_executable)
            written.append(rel)
        for link in [*result.output_symlinks, *result.output_file_symlinks, *result.output_directory_symlinks]:
            rel = _check_output_path(link.path, declared)
            if rel in written:
                continue
            dest = os.path.join(workdir, rel)
            _replace_path(dest)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.symlink(link.target, dest)
            written.append(rel)
        for d in result.output_directories:
            rel = _check_output_path(d.path, declared)
            tree = re_pb2.Tree()
            tree.ParseFromString(self._tree_bytes(d, rel))
            children = {digest_of(c.SerializeToString(deterministic=True)): c for c in tree.children}
            dest = os.path.join(workdir, rel)
            _replace_path(dest)
            self._write_directory(tree.root, children, dest, 0, [MAX_TREE_ENTRIES])
            written.append(rel)
        return written

    def _tree_bytes(self, output: Any, rel: str) -> bytes:
        """The serialized Tree of OutputDirectory ``output``: its ``tree_digest`` blob or,
        from a server that names only the root Directory (``root_directory_digest``,
        REAPI 2.3+), the tree read with GetTree, the root checked against its digest
        (the children are taken only under the digests of their own bytes)."""
        from dtbuild.engine.remote.reapi import BadRemoteEntry, tree_of_root

        if output.tree_digest.hash or not output.root_directory_digest.hash:
            return self._fetch(output.tree_digest)
        root = Digest(output.root_directory_digest.hash, output.root_directory_digest.size_bytes)
        try:
            return tree_of_root(root, self.transport.get_tree(root))
        except BadRemoteEntry as e:
            raise RemoteError(f"the remote executor's CAS sent an unusable tree for output directory {rel} "
                              f"({e})") from None

    def _write_directory(self, directory: Any, children: Mapping[Digest, Any], dest: str, depth: int,
                         budget: list[int]) -> None:
        """Write ``directory`` at ``dest``. ``budget``: how many more entries the whole
        output may have (a small Tree naming one child twice at every level would expand
        to more files than any disk holds)."""
        if depth > MAX_TREE_DEPTH:
            raise RemoteError("the remote executor returned an output directory nested too deep")
        budget[0] -= len(directory.files) + len(directory.symlinks) + len(directory.directories)
        if budget[0] < 0:
            raise RemoteError(f"the remote executor returned an output directory of more than "
                              f"{MAX_TREE_ENTRIES:,} entries")
        os.makedirs(dest, exist_ok=True)
        for f in directory.files:
            self._fetch_to(f.digest, os.path.join(dest, _check_name(f.name)), f.is_executable)
        for link in directory.symlinks:
            os.symlink(link.target, os.path.join(dest, _check_name(link.name)))
        for sub in directory.directories:
            child = children.get(Digest(sub.digest.hash, sub.digest.size_bytes))
            if child is None:
                # Some services serialize children differently; fall back to the CAS.
                child = re_pb2.Directory()
                child.ParseFromString(self._fetch(sub.digest))
            self._write_directory(child, children, os.path.join(dest, _check_name(sub.name)), depth + 1, budget)

    def _output_tail(self, result: Any) -> str:
        parts: list[bytes] = []
        for raw, digest in ((result.stdout_raw, result.stdout_digest), (result.stderr_raw, result.stderr_digest)):
            if raw:
                parts.append(raw[-_TAIL_BYTES:])
            elif digest.size_bytes:
                try:
                    parts.append(self._fetch(digest)[-_TAIL_BYTES:])
                except RemoteError:
                    parts.append(b"(the command's output could not be fetched from the remote executor)\n")
        lines: list[str] = []
        for part in parts:
            lines.extend(part.decode("utf-8", "replace").splitlines())
        return "\n".join(lines[-OUTPUT_TAIL_LINES:])


def _open_binary(path: str) -> IO[bytes]:
    return open(path, "rb")  # the transport closes it


def _replace_path(dest: str) -> None:
    """Remove whatever is at ``dest`` (a file, a symlink or a directory tree)."""
    if os.path.islink(dest) or os.path.isfile(dest):
        os.unlink(dest)
    elif os.path.isdir(dest):
        import shutil

        shutil.rmtree(dest)


def _write_file(dest: str, data: bytes, executable: bool) -> None:
    _replace_path(dest)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if executable else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(dest, 0o755 if executable else 0o644)


__all__ = ["ExecutionResult", "RemoteError", "RemoteExecution", "rewrite_env"]
