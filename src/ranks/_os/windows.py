"""Windows' facts (see ``ranks._os``).

Windows only: importing it elsewhere fails at the assert below (which also tells mypy to
skip the rest on other systems).
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Mapping

assert sys.platform == "win32"

NAME = "windows"
# No SIGKILL: SIGTERM's stand-in (TerminateProcess, and the rank's job object) ends a
# process just as hard.
KILL = signal.SIGTERM
TEMPLATE = False
SPAWN = False  # no fds to give a spawned rank: the portable start only
LOOPBACK_IFNAME: str | None = None
DATA_PLANE = False  # a mapped file cannot be unlinked here (_dataplane)
# torch's Windows builds have no libuv, yet their TCPStore asks for it by default: code
# that calls init_process_group() itself (env://) fails without this
# (pytorch/pytorch#139990).
RANK_ENVIRONMENT: Mapping[str, str] = {"USE_LIBUV": "0"}
# Each rank is four objects to wait on, and before 3.13 multiprocessing's wait() hands
# them to one WaitForMultipleObjects call, which takes at most 63.
MAX_RANKS_WAITED: int | None = 15 if sys.version_info < (3, 13) else None


def c_runtime() -> ctypes.CDLL:
    """The C runtime whose stdio the rank's native code uses (the Universal CRT)."""
    return ctypes.CDLL("ucrtbase")


def stream_c_stdout(c_runtime: ctypes.CDLL) -> None:
    """Unbuffered: this C runtime has no line buffering (_IOLBF means full buffering
    there); native code writes there seldom."""
    c_runtime.__acrt_iob_func.restype = ctypes.c_void_p
    c_stdout = ctypes.c_void_p(c_runtime.__acrt_iob_func(1))
    c_runtime.setvbuf(c_stdout, None, 4, 0)  # _IONBF
