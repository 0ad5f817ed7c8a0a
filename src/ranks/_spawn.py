"""Starting one rank as a fresh interpreter, and the kernel-side handle that owns it.

The supervisor holds a :class:`RankProcess` and does not care how the process came to be.
``_start.launch_ranks`` decides: forked from the warm template, or, where that is not
possible, :func:`spawn_rank` here: ``subprocess`` starting ``sys.executable`` (spawn
semantics, safe after the kernel initialised CUDA, never a fork of the kernel), or on
Windows ``_portable``'s start, whose handle is a subclass. All end up with the same
interface.

Each rank gets, and only it holds the other end of:

* a socket pair for its control channel (framed messages, see ``_protocol``);
* two pipes as its fds 1 and 2, read by the kernel's output router;
* a new session and process group, so the kernel can signal the rank's whole tree and so
  an interrupt of the kernel's own process group does not reach the ranks unasked.

The handle owns all of these and :meth:`RankProcess.release` closes them; closing twice is
safe. A start that fails half-way closes what it opened before it re-raises.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import _protocol
from ._descendants import end_processes
from ._os import current
from ._placement import RankSpec

if TYPE_CHECKING:
    from ._start import Request

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# Appending (not prepending) our parent folder lets an installed `ranks` win as usual while
# still finding this one when the kernel imported it from a source checkout.
BOOT = (
    "import sys; sys.path.append({parent!r}); "
    "from ranks._worker import main; main(sys.argv[1:])"
)


KILL = current.KILL  # SIGKILL, or on Windows SIGTERM's stand-in, which ends as hard


class OutputPipe:
    """One of a rank's output streams as the kernel reads it: a pipe, read without blocking.

    The supervisor waits on :attr:`waitable` and calls :meth:`read`; ``_portable`` has a
    stream of the same shape for systems that cannot wait on pipes.
    """

    def __init__(self, fd: int, name: str) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.name = name  # "stdout" | "stderr"

    @property
    def waitable(self) -> object:
        return self.fd

    def read(self, size: int) -> bytes | None:
        """Up to ``size`` bytes; None when nothing is there yet; b"" at end of stream."""
        try:
            return os.read(self.fd, size)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def close(self) -> None:
        close_quietly(self.fd)


class OutputStream(Protocol):
    name: str

    @property
    def waitable(self) -> object: ...

    def read(self, size: int) -> bytes | None: ...

    def close(self) -> None: ...


@dataclass
class RankProcess:
    """The kernel's handle on one rank process and everything it opened for it.

    Stopping a rank goes through :meth:`interrupt`, :meth:`request_stacks` and
    :meth:`signal_tree`: here POSIX signals, in ``_portable`` what stands in for them.
    """

    spec: RankSpec
    pid: int
    conn: Connection
    sentinel: int  # readable once the process has ended
    output: list[OutputStream]
    stacks_path: str
    collect_status: Callable[[], int]  # after the sentinel fired: the Popen-style returncode
    returncode: int | None = None
    answers: int = 0  # replies (Ready, Done, Failed) received so far
    calls: int = 0  # calls sent so far
    _closed: bool = field(default=False, repr=False)
    # World.stacks() may ask for a dump (a message, on the portable start) from another
    # thread while the calling thread sends a call: one frame must not cut into another.
    _send_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def alive(self) -> bool:
        return self.returncode is None

    def reap(self) -> int:
        """Collect the exit status after the sentinel fired."""
        if self.returncode is None:
            self.returncode = self.collect_status()
        return self.returncode

    def ended(self) -> bool:
        """Has the process ended (without blocking)? Reaps it if so."""
        if self._closed:
            return True  # released: the World is closed, its sentinel fd may be reused
        if self.returncode is None and _readable(self.sentinel):
            self.reap()
        return self.returncode is not None

    def send(self, message: _protocol.Message) -> None:
        """Send one message on the control channel, from any thread; OSError if it is gone."""
        with self._send_lock:
            _protocol.send(self.conn, message)

    def signal_tree(self, signum: int) -> None:
        """Signal the rank's whole process group (its children too); gone is fine.

        What left the group below the rank (a daemon in a session of its own) is killed
        too, while the rank lives: once it is gone, that is no longer below it. KILL spares
        multiprocessing's resource tracker, which cleans up once the rest is gone. See
        ``_descendants``.
        """
        below = [] if self.ended() else [self.pid]
        if signum == KILL:
            end_processes(below=below, groups=[self.pid])
            return
        end_processes(below=below, outside_group=self.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def interrupt(self) -> None:
        """KeyboardInterrupt in the rank's main thread (SIGINT, for the rank alone)."""
        self._signal_rank(signal.SIGINT)

    def request_stacks(self) -> None:
        """Have the rank write every thread's stack to ``stacks_path`` (emptied first)."""
        open(self.stacks_path, "w").close()
        self._signal_rank(signal.SIGUSR1)

    def output_behind(self) -> bool:
        """Is output that the rank wrote before its last reply still on its way? Never on
        pipes the kernel reads itself: the rank flushes them before it replies."""
        return False

    def output_before_call(self) -> list[OutputStream]:
        """The streams whose output from before the rank took its last call the kernel has
        not read yet (reads of them stop at the call's start until :meth:`output_lost` or
        the start is read). None with pipes the kernel reads itself: whatever is unread
        when the call is sent was written before it, and is read as the call's."""
        return []

    def output_lost(self) -> None:
        """Stop waiting for what :meth:`output_behind` and :meth:`output_before_call` wait
        for: it did not come in time, and later calls must not wait for it again."""

    def _signal_rank(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def release(self) -> None:
        """Close everything this handle owns. The process must have been reaped or killed."""
        if self._closed:
            return
        self._closed = True
        self.conn.close()
        close_quietly(self.sentinel)
        for stream in self.output:
            stream.close()


class RankEnds:
    """What a new rank starts with: a control socket pair and pipes for its fds 1 and 2.

    Used as ``with RankEnds() as ends:`` around starting the rank: on leaving, the kernel
    closes the child's ends (the rank holds its own copies by then); if starting failed,
    the kernel's ends too. :meth:`handle` passes the kernel's ends to the RankProcess that
    owns them from then on.
    """

    def __init__(self) -> None:
        self.parent_sock, self.child_sock = socket.socketpair()
        self._fds: list[int] = []
        try:
            self.out_read, self.out_write = self._pipe()
            self.err_read, self.err_write = self._pipe()
        except BaseException:
            self._close_all()
            raise

    @property
    def child_fds(self) -> tuple[int, int, int]:
        """The control socket, stdout and stderr as the rank must receive them."""
        return self.child_sock.fileno(), self.out_write, self.err_write

    def handle(
        self, spec: RankSpec, pid: int, sentinel: int, stacks_path: str,
        collect_status: Callable[[], int],
    ) -> RankProcess:
        process = RankProcess(
            spec=spec, pid=pid, conn=Connection(self.parent_sock.detach()), sentinel=sentinel,
            output=[OutputPipe(self.out_read, "stdout"), OutputPipe(self.err_read, "stderr")],
            stacks_path=stacks_path, collect_status=collect_status,
        )
        self._fds = [self.out_write, self.err_write]  # the rest belongs to the handle now
        return process

    def __enter__(self) -> RankEnds:
        return self

    def __exit__(self, kind: object, error: object, tb: object) -> None:
        if kind is None:
            self.child_sock.close()
            for fd in (self.out_write, self.err_write):
                close_quietly(fd)
        else:
            self._close_all()

    def _pipe(self) -> tuple[int, int]:
        read_end, write_end = os.pipe()
        self._fds += [read_end, write_end]
        return read_end, write_end

    def _close_all(self) -> None:
        self.parent_sock.close()
        self.child_sock.close()
        for fd in self._fds:
            close_quietly(fd)


@contextlib.contextmanager
def interrupt_held() -> Iterator[list[int]]:
    """Hold back an interrupt of the main thread while a child process is created.

    ``subprocess.Popen`` stores the child's pid only after fork_exec has returned, and a
    KeyboardInterrupt that the signal handler raises at that moment loses it: nobody can
    wait for that child, which stays a zombie of the kernel for good. Inside this block a
    SIGINT is only noted in the list it yields; the caller raises KeyboardInterrupt once
    it holds the Popen and can end the child.
    """
    held: list[int] = []
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield held  # not Python's default handler (a ranks wait's, the user's): left alone
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


def spawn_rank(
    spec: RankSpec, env: Mapping[str, str], cwd: str, stacks_path: str
) -> RankProcess:
    with RankEnds() as ends:
        control_fd, out_write, err_write = ends.child_fds
        boot = BOOT.format(parent=PACKAGE_PARENT)
        argv = [sys.executable, "-c", boot, str(control_fd), str(os.getpid()), stacks_path]
        with interrupt_held() as interrupted:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                pass_fds=(control_fd,),
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )
        try:
            if interrupted:
                raise KeyboardInterrupt
            sentinel = process_sentinel(popen)
        except BaseException:
            # The rank may be gone already (nothing left in its group): the error that
            # brought us here is the one to raise, not ESRCH.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, KILL)
            popen.wait()
            raise
        return ends.handle(spec, popen.pid, sentinel, stacks_path, popen.wait)


def process_sentinel(popen: subprocess.Popen[bytes], pidfd: bool = True) -> int:
    """An fd that becomes readable when the process ends, to wait on with the pipes: a
    pidfd where Linux has them (unless ``pidfd`` is False), else a pipe that a thread
    closes once ``popen.wait()`` returns (macOS)."""
    if pidfd and hasattr(os, "pidfd_open"):
        try:
            return os.pidfd_open(popen.pid)
        except OSError:
            pass  # old kernel or a sandbox without pidfd: fall back below
    read_end, write_end = os.pipe()

    def wait_then_close() -> None:
        popen.wait()
        os.close(write_end)

    threading.Thread(target=wait_then_close, daemon=True, name=f"ranks-wait-{popen.pid}").start()
    return read_end


def _readable(fd: int) -> bool:
    return bool(ready_among([fd], 0))


def ready_among(sources: Sequence[object], timeout: float | None) -> list[object]:
    """Those of ``sources`` (fds, or objects with ``fileno()``) readable within ``timeout``:
    ``multiprocessing.connection.wait``, without its cost per call.

    wait() builds a selector and registers every source on each call; a warm World call
    waits about ten times (on 2 ranks: their control channels, output pipes and sentinels),
    and that was a good part of the kernel's own time per call. A bare poll() does the same
    (and, unlike select(), takes fds above 1023). Windows has no poll(): wait() there.
    """
    if not hasattr(select, "poll"):
        return list(wait(sources, timeout))  # type: ignore[arg-type]
    poller = select.poll()
    by_fd: dict[int, object] = {}
    for source in sources:
        fd = source if isinstance(source, int) else source.fileno()  # type: ignore[attr-defined]
        by_fd[fd] = source
        poller.register(fd, select.POLLIN)
    # poll() takes milliseconds: round up, so that a deadline is not woken for too early.
    events = poller.poll(None if timeout is None else math.ceil(max(0.0, timeout) * 1000))
    return [by_fd[fd] for fd, _ in events]


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def launch(
    requests: Sequence[Request], deadline: float | None, launched: Callable[[RankProcess], None],
) -> None:
    """The spawn start: each rank a fresh interpreter, started one after the other (each
    takes milliseconds to create; they boot side by side)."""
    for spec, env, cwd, stacks_path in requests:
        launched(spawn_rank(spec, env, cwd, stacks_path))
