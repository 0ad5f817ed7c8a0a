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


def spawn_rank(
    spec: RankSpec, env: Mapping[str, str], cwd: str, stacks_path: str
) -> RankProcess:
    opened: list[int] = []
    parent_sock, child_sock = socket.socketpair()
    try:
        out_read, out_write = os.pipe()
        opened += [out_read, out_write]
        err_read, err_write = os.pipe()
        opened += [err_read, err_write]
        boot = _BOOT.format(parent=PACKAGE_PARENT)
        argv = [sys.executable, "-c", boot, str(child_sock.fileno()), str(os.getpid()), stacks_path]
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out_write,
            stderr=err_write,
            pass_fds=(child_sock.fileno(),),
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    except BaseException:
        parent_sock.close()
        for fd in opened:
            close_quietly(fd)
        raise
    finally:
        child_sock.close()
    close_quietly(out_write)
    close_quietly(err_write)
    for fd in (out_read, err_read):
        os.set_blocking(fd, False)
    try:
        sentinel = _process_sentinel(popen)
    except BaseException:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait()
        parent_sock.close()
        close_quietly(out_read)
        close_quietly(err_read)
        raise
    return RankProcess(
        spec=spec,
        pid=popen.pid,
        conn=Connection(parent_sock.detach()),
        sentinel=sentinel,
        output={out_read: "stdout", err_read: "stderr"},
        stacks_path=stacks_path,
        collect_status=popen.wait,
    )


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
