"""macOS's facts, and those of any POSIX system other than Linux (see ``ranks._os``)."""

from __future__ import annotations

import ctypes
import signal
from collections.abc import Mapping

NAME = "macos"
KILL = signal.SIGKILL
TEMPLATE = False  # no pidfd, no watcher: the portable start is the one tested (_start)
SPAWN = True
LOOPBACK_IFNAME: str | None = None
DATA_PLANE = False
RANK_ENVIRONMENT: Mapping[str, str] = {}
MAX_RANKS_WAITED: int | None = None


def c_runtime() -> ctypes.CDLL:
    """The C library whose stdio the rank's native code uses."""
    return ctypes.CDLL(None)


def stream_c_stdout(c_runtime: ctypes.CDLL) -> None:
    """Left as it is: flushed before every reply."""
