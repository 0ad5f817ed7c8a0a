"""Starting one rank as a fresh interpreter, and the kernel-side handle that owns it.

The supervisor holds a :class:`RankProcess` and does not care how the process came to be.
``_template.launch_ranks`` decides: forked from the warm template, or, where that is not
possible, :func:`spawn_rank` here: ``subprocess`` starting ``sys.executable`` (spawn
semantics, safe after the kernel initialised CUDA, never a fork of the kernel). Both end
up with the same handle.

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
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

from ._placement import RankSpec

PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
# Appending (not prepending) our parent folder lets an installed `ranks` win as usual while
# still finding this one when the kernel imported it from a source checkout.
_BOOT = (
    "import sys; sys.path.append({parent!r}); "
    "from ranks._worker import main; main(sys.argv[1:])"
)


@dataclass
class RankProcess:
    """The kernel's handle on one rank process and everything it opened for it."""

    spec: RankSpec
    pid: int
    conn: Connection
    sentinel: int  # readable once the process has ended
    output: dict[int, str]  # read end fd -> "stdout" | "stderr"
    stacks_path: str
    collect_status: Callable[[], int]  # after the sentinel fired: the Popen-style returncode
    returncode: int | None = None
    _closed: bool = field(default=False, repr=False)

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

    def signal_group(self, signum: int) -> None:
        """Signal the rank's whole process group (its children too); gone is fine."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def signal_rank(self, signum: int) -> None:
        """Signal the rank process alone (an interrupt is for its main thread)."""
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def release(self) -> None:
        """Close every fd this handle owns. The process must have been reaped or killed."""
        if self._closed:
            return
        self._closed = True
        self.conn.close()
        for fd in [self.sentinel, *self.output]:
            close_quietly(fd)


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
        for fd in (self.out_read, self.err_read):
            os.set_blocking(fd, False)
        process = RankProcess(
            spec=spec, pid=pid, conn=Connection(self.parent_sock.detach()), sentinel=sentinel,
            output={self.out_read: "stdout", self.err_read: "stderr"},
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


def spawn_rank(
    spec: RankSpec, env: Mapping[str, str], cwd: str, stacks_path: str
) -> RankProcess:
    with RankEnds() as ends:
        control_fd, out_write, err_write = ends.child_fds
        boot = _BOOT.format(parent=PACKAGE_PARENT)
        argv = [sys.executable, "-c", boot, str(control_fd), str(os.getpid()), stacks_path]
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
            sentinel = _process_sentinel(popen)
        except BaseException:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        return ends.handle(spec, popen.pid, sentinel, stacks_path, popen.wait)


def _process_sentinel(popen: subprocess.Popen[bytes]) -> int:
    """An fd that becomes readable when the process ends, to wait on with the pipes."""
    if hasattr(os, "pidfd_open"):
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
    return bool(wait([fd], 0))  # not select(): it fails for fds above 1023


def close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
