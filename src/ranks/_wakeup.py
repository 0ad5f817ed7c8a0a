"""An interrupt of the kernel, turned into a wake-up of the supervisor's wait.

Raised as KeyboardInterrupt, an interrupt could land anywhere in the wait: between reading
a rank's output and showing it, or in the middle of a reply, and lose either. While
:meth:`InterruptWakeup.catching` is active, the SIGINT handler (installed only over
Python's default one, in the main thread, and put back after) just writes a byte to a
socket pair; the wait has the read end among what it waits on and takes the interrupt
like any other event (:meth:`InterruptWakeup.take`).

A socket pair, not a pipe: Windows waits on sockets only.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator


class InterruptWakeup:
    """A socket pair that interrupts are written to; ``close()`` is safe twice."""

    def __init__(self) -> None:
        self._read_end, self._write_end = socket.socketpair()
        for end in (self._read_end, self._write_end):
            end.setblocking(False)

    @property
    def waitable(self) -> socket.socket:
        """Readable once an interrupt came: for ``multiprocessing.connection.wait``."""
        return self._read_end

    def take(self) -> int:
        """How many interrupts came since the last look (without waiting)."""
        with contextlib.suppress(BlockingIOError):
            return len(self._read_end.recv(64))
        return 0

    @contextlib.contextmanager
    def catching(self) -> Iterator[None]:
        """While the block runs, an interrupt is a byte on the pipe, not an exception.

        One that comes after the block's last look is the user's all the same: raised as
        KeyboardInterrupt on the way out (unless the block is raising already).
        """
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            yield
            return
        write_end = self._write_end

        def note_interrupt(signum: int, frame: object) -> None:
            with contextlib.suppress(OSError):
                write_end.send(b"!")

        previous = signal.signal(signal.SIGINT, note_interrupt)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            if self.take() and sys.exc_info()[0] is None:
                raise KeyboardInterrupt

    def close(self) -> None:
        self._read_end.close()
        self._write_end.close()
