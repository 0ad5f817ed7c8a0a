"""Linux's facts (see ``ranks._os``)."""

from __future__ import annotations

import ctypes
import signal
import socket
from collections.abc import Mapping

NAME = "linux"
KILL = signal.SIGKILL
# The warm template passes each rank its fds over a Unix socket (Python 3.9+).
TEMPLATE = hasattr(socket, "send_fds")
SPAWN = True
LOOPBACK_IFNAME: str | None = "lo"  # where Gloo's and NCCL's sockets stay, on one host
DATA_PLANE = True  # big buffers through files in /dev/shm (_dataplane)
RANK_ENVIRONMENT: Mapping[str, str] = {}
MAX_RANKS_WAITED: int | None = None


def c_runtime() -> ctypes.CDLL:
    """The C library whose stdio the rank's native code uses."""
    return ctypes.CDLL(None)


def stream_c_stdout(c_runtime: ctypes.CDLL) -> None:
    """Line-buffered: on a pipe glibc would hold output back until exit."""
    c_stdout = ctypes.c_void_p.in_dll(c_runtime, "stdout")
    c_runtime.setvbuf(c_stdout, None, 1, 0)  # _IOLBF
