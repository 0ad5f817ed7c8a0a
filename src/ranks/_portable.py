"""Starting a rank with only what every system has: how ranks start on Windows and macOS.

The default start on Linux (``_template``, ``_spawn``) gives a rank its control socket and
output pipes as inherited fds, stops it with POSIX signals, and follows it with a pidfd and
a watcher process. Windows passes no fds, signals no single process, and
``multiprocessing.connection.wait`` cannot wait on its pipes. Here:

* **Control channel.** The kernel listens on a loopback port of its own, one per rank, and
  writes the port and a random token to the rank's stdin. The rank connects back and sends
  the token first; a connection that does not bring it is dropped.
* **Output.** The rank's stdout and stderr are pipes, each copied by a kernel thread into a
  socket pair the supervisor waits on. The copy may fall behind the rank's messages, so
  the rank writes markers (made from the token) into both pipes: before each reply, and
  when it takes a call. The kernel strips and counts them; it holds a reply until the
  output before its marker is read (:meth:`PortableRank.output_behind`), and shows output
  in a call's cell only from the call's marker on (:meth:`PortableRank.output_before_call`).
* **Interrupt and stack dump.** Messages on the control channel: the rank's control thread
  raises SIGINT in its main thread, or writes every thread's stack with faulthandler.
* **Process tree.** POSIX: a session of its own, signalled as a group. Windows: a job
  object per rank (``_winjob``), which ends the rank with every process it started, and
  which Windows kills when the kernel dies and its handle to the job closes.
* **The kernel's death.** The rank's channel reaches end of file and its control thread
  ends the tree (on Windows the job does it as well). The process sentinel is a thread
  waiting on the process (a process handle on Windows); no watcher process is forked.

macOS takes this start too, although spawn would work there: it is the one that runs in the
test suite, where ``RANKS_START_METHOD=portable`` takes it on Linux, and on Windows CPython
under Wine (tests/kernel.py, scripts/windows-python.sh).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import IO, TYPE_CHECKING, Any

from . import _protocol
from ._placement import RankSpec
from ._spawn import (
    BOOT,
    KILL,
    PACKAGE_PARENT,
    OutputStream,
    RankProcess,
    interrupt_held,
    process_sentinel,
)

if TYPE_CHECKING:
    from ._start import Request

WINDOWS = sys.platform == "win32"
TOKEN_WAIT = 5.0  # seconds a connection gets to present the token once accepted
_RELAY_CHUNK = 1 << 16
_ACCEPT_POLL = 0.05  # how often a start that waits for its rank checks that it still runs


# A marker's last byte; never NUL, its first: a whole marker must not end like the start
# of another (see RelayedOutput.read, which holds back what may be one's start).
REPLY_MARK = b"\1"
CALL_MARK = b"\2"


def output_mark(token: str, kind: bytes) -> bytes:
    """What a rank writes to fds 1 and 2 before each reply (``REPLY_MARK``) and when it
    takes a call (``CALL_MARK``): signs for the kernel of where the relayed output stands.
    The token's half makes them unguessable to user code."""
    return b"\0ranks:" + token[:16].encode() + kind


class RelayedOutput:
    """A rank's output pipe, copied by a thread into a socket the supervisor waits on.

    The copy is verbatim; :meth:`read`, in the supervisor's thread, takes the markers out
    and counts them, so a marker is seen exactly when the output before it has been read.
    While :attr:`hold_at_call` is set, a read ends at a call marker: what comes before it
    was written between calls (for the logs only), what comes after belongs to the call
    (``Supervisor._await_call_starts``, which sets it and then reads the rest as the call's).
    """

    def __init__(self, pipe: IO[bytes], name: str, token: str) -> None:
        self.name = name
        self.replies = 0  # reply markers read so far
        self.calls = 0  # call markers read so far
        self.hold_at_call = False
        self._reply_mark = output_mark(token, REPLY_MARK)
        self._call_mark = output_mark(token, CALL_MARK)
        self._pending = b""  # received, not yet returned: what follows a call marker
        self._held = b""  # the end of the last receive, which may be the start of a marker
        self._ours, theirs = socket.socketpair()
        self._ours.setblocking(False)
        self._thread = threading.Thread(
            target=_relay, args=(pipe, theirs), daemon=True, name=f"ranks-relay-{name}")
        self._thread.start()

    @property
    def waitable(self) -> object:
        return self._ours

    def read(self, size: int) -> bytes | None:
        if not self._pending:
            try:
                chunk = self._ours.recv(size)
            except BlockingIOError:
                return None
            except OSError:
                chunk = b""
            if not chunk:  # end of stream: what was held back first, then b""
                held, self._held = self._held, b""
                return held
            data = self._held + chunk
            # A marker may be cut in two by the receive: hold back what may be its start.
            # (The two markers differ only in their last byte.)
            cut = len(data) - _partial_mark(data, self._reply_mark)
            self._pending, self._held = data[:cut], data[cut:]
        if self.hold_at_call:
            data, call_mark, self._pending = self._pending.partition(self._call_mark)
            if call_mark:
                self.calls += 1
                self.hold_at_call = False  # the rest is the call's: read as usual
        else:
            data, self._pending = self._pending, b""
            self.calls += data.count(self._call_mark)
            data = data.replace(self._call_mark, b"")
        self.replies += data.count(self._reply_mark)
        return data.replace(self._reply_mark, b"") or None  # None: only markers so far

    def assume_marks(self, replies: int, calls: int) -> None:
        """Markers that did not come in time count as read: the rank could not write them
        (user code closed or redirected its fd), and must not cost every later call a wait."""
        self.replies = max(self.replies, replies)
        self.calls = max(self.calls, calls)

    def close(self) -> None:
        self._ours.close()

    def settle(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the relay to reach the end of the pipe: after the
        rank died, what it wrote last is still in the pipe for a moment."""
        self._thread.join(timeout)


def _relay(pipe: IO[bytes], sock: socket.socket) -> None:
    # OSError: the kernel let go of the socket. ValueError: of the pipe, maybe before this
    # thread ran (an interrupt while the rank started: kill() closes the pipes).
    with sock, contextlib.suppress(OSError, ValueError), pipe:
        while chunk := os.read(pipe.fileno(), _RELAY_CHUNK):
            sock.sendall(chunk)


def _partial_mark(data: bytes, mark: bytes) -> int:
    """The length of the longest end of ``data`` that is a beginning of ``mark``."""
    for length in range(min(len(mark) - 1, len(data)), 0, -1):
        if data.endswith(mark[:length]):
            return length
    return 0


@dataclass
class PortableRank(RankProcess):
    """A rank started by :class:`PortableStart`: messages stand in for signals."""

    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    job: Any = field(default=None, repr=False)  # Windows: the rank's _winjob.Job

    def interrupt(self) -> None:
        self._tell(_protocol.Interrupt())

    def request_stacks(self) -> None:
        open(self.stacks_path, "w").close()
        self._tell(_protocol.DumpStacks())

    def signal_tree(self, signum: int) -> None:
        if self.job is not None:
            self.job.kill()  # Windows has no gentler way to end a tree
        else:
            super().signal_tree(signum)

    def output_behind(self) -> bool:
        return any(stream.replies < self.answers for stream in self._relayed())

    def output_before_call(self) -> list[OutputStream]:
        behind = [stream for stream in self._relayed() if stream.calls < self.calls]
        for stream in behind:
            stream.hold_at_call = True
        return list(behind)

    def output_lost(self) -> None:
        for stream in self._relayed():
            stream.hold_at_call = False
            stream.assume_marks(self.answers, self.calls)

    def _relayed(self) -> list[RelayedOutput]:
        return [stream for stream in self.output if isinstance(stream, RelayedOutput)]

    def reap(self) -> int:
        if self.returncode is None:
            for stream in self._relayed():
                stream.settle(0.2)
        return super().reap()

    def release(self) -> None:
        if self._closed:
            return
        if WINDOWS:
            self.sentinel = -1  # the process handle, which Popen owns and closes
        super().release()
        if self.job is not None:
            self.job.close()  # kills whatever of the tree is left

    def _tell(self, message: _protocol.Message) -> None:
        if self.returncode is None:
            with contextlib.suppress(OSError):
                self.send(message)


class PortableStart:
    """A rank process started and not yet connected back; :meth:`connect` finishes it.

    Two steps, so that several ranks boot at once while the kernel waits for the first.
    """

    def __init__(
        self, spec: RankSpec, env: Mapping[str, str], cwd: str, stacks_path: str
    ) -> None:
        self.spec = spec
        self._stacks_path = stacks_path
        self._token = secrets.token_hex(16)
        self._job: Any = None
        self._output: list[OutputStream] = []
        self._listener = _loopback_listener()
        executable, env = _interpreter(env)
        try:
            boot = BOOT.format(parent=PACKAGE_PARENT)
            with interrupt_held() as interrupted:
                self._popen = subprocess.Popen(
                    [executable, "-c", boot, "portable", str(os.getpid()), stacks_path],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=env, cwd=cwd, **_own_process_tree(),
                )
        except BaseException:
            self._listener.close()
            raise
        try:
            if interrupted:
                raise KeyboardInterrupt
            self._started()
        except BaseException:
            self.kill()
            raise

    def _started(self) -> None:
        """Put the new process in its job, hand it the port and token, relay its output."""
        if sys.platform == "win32":  # spelled out: mypy skips it elsewhere, as it must
            from ._winjob import Job

            self._job = Job.for_process(self._popen)
        assert self._popen.stdin is not None
        assert self._popen.stdout is not None and self._popen.stderr is not None
        with contextlib.suppress(OSError):  # died at once: connect() finds out
            port = self._listener.getsockname()[1]
            self._popen.stdin.write(f"{port} {self._token}\n".encode())
        with contextlib.suppress(OSError):
            self._popen.stdin.close()
        for pipe, name in ((self._popen.stdout, "stdout"), (self._popen.stderr, "stderr")):
            self._output.append(RelayedOutput(pipe, name, self._token))

    def connect(self, deadline: float | None) -> PortableRank:
        """Wait for the rank to connect back. TimeoutError once ``deadline`` passes; a rank
        that died first comes back with its channel at end of file, like any dead rank."""
        try:
            conn = self._accept(deadline)
        except BaseException:
            self.kill()
            raise
        finally:
            self._listener.close()
        popen = self._popen
        # Windows: the process handle, which wait() takes as it is.
        sentinel = (int(popen._handle) if WINDOWS  # type: ignore[attr-defined]
                    else process_sentinel(popen, pidfd=False))
        return PortableRank(
            spec=self.spec, pid=popen.pid, conn=conn, sentinel=sentinel, output=self._output,
            stacks_path=self._stacks_path, collect_status=popen.wait, popen=popen,
            job=self._job,
        )

    def kill(self) -> None:
        """End a rank that will not be connected (a launch that failed or ran out of time)."""
        self._listener.close()
        if self._job is not None:
            self._job.close()
        elif WINDOWS:
            self._popen.kill()  # not in a job: creating it failed
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._popen.pid, KILL)
        self._popen.wait()
        for stream in self._output:
            stream.close()
        # The pipes no relay took over (a relay closes its own).
        pipes = [self._popen.stdin, self._popen.stdout, self._popen.stderr]
        for pipe in [pipes[0], *pipes[1 + len(self._output):]]:
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def _accept(self, deadline: float | None) -> Connection:
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"rank {self.spec.rank} did not connect back in time")
            if self._popen.poll() is not None:
                return _dead_connection()
            wait = _ACCEPT_POLL if deadline is None else min(_ACCEPT_POLL, deadline - now)
            self._listener.settimeout(max(wait, 0.001))
            try:
                peer, _ = self._listener.accept()
            except TimeoutError:
                continue
            if _presents_token(peer, self._token, deadline):
                peer.setblocking(True)
                return Connection(peer.detach())
            peer.close()  # not our rank: someone else on this machine


def _loopback_listener() -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if sys.platform == "win32":
            # Without it another program could bind the same port and take the connection.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
    except BaseException:
        listener.close()
        raise
    return listener


def _presents_token(peer: socket.socket, token: str, deadline: float | None) -> bool:
    expected = token.encode() + b"\n"
    received = b""
    wait = TOKEN_WAIT if deadline is None else min(TOKEN_WAIT, deadline - time.monotonic())
    peer.settimeout(max(wait, 0.001))
    with contextlib.suppress(OSError):
        while len(received) < len(expected) and b"\n" not in received:
            chunk = peer.recv(len(expected) - len(received))
            if not chunk:
                break
            received += chunk
    return hmac.compare_digest(received, expected)


def _dead_connection() -> Connection:
    """A channel already at end of file, for a rank that died before connecting."""
    ours, theirs = socket.socketpair()
    theirs.close()
    return Connection(ours.detach())


def _interpreter(env: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The interpreter a rank runs, and its environment.

    In a venv on Windows, python.exe only starts the base interpreter as its child, which
    could start before the rank's job exists and escape it: start the base interpreter,
    told it is the venv's, as multiprocessing does (bpo-35797).
    """
    executable, env = sys.executable, dict(env)
    base = getattr(sys, "_base_executable", executable)
    if WINDOWS and os.path.normcase(base) != os.path.normcase(executable):
        env["__PYVENV_LAUNCHER__"] = executable
        executable = base
    return executable, env


def _own_process_tree() -> dict[str, Any]:
    """Popen arguments that keep the rank's tree apart from the kernel's."""
    if WINDOWS:
        # Its own console process group: a Ctrl+C meant for the kernel does not reach it.
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}  # type: ignore[attr-defined]
    return {"start_new_session": True}


def connect_back() -> tuple[Connection, str]:
    """The rank's side of the handshake: read the port and token, connect, send the token."""
    line = sys.stdin.buffer.readline().split()
    port, token = int(line[0]), line[1].decode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(token.encode() + b"\n")
    return Connection(sock.detach()), token


def launch(
    requests: Sequence[Request], deadline: float | None, launched: Callable[[RankProcess], None],
) -> None:
    """Start every rank, then take their connections: they boot side by side."""
    starts: list[PortableStart] = []
    try:
        for spec, env, cwd, stacks_path in requests:
            starts.append(PortableStart(spec, env, cwd, stacks_path))
    except BaseException:
        for start in starts:
            start.kill()
        raise
    for index, start in enumerate(starts):
        try:
            # connect() ends its own rank when it fails; the caller those it was given.
            launched(start.connect(deadline))
        except BaseException:
            for later in starts[index + 1:]:
                later.kill()
            raise
