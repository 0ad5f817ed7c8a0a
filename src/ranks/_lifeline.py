"""How a process that ranks starts (the template, a rank) notices that its parent died.

The parent is the kernel (for the template and spawned ranks) or the template (for forked
ranks). Its death must take the child down, or the child would live on holding a GPU.

* A pidfd on the parent, where Linux has them (5.3+): it turns readable when the parent
  exits, and the child waits on it with everything else it waits on.
* Otherwise the parent-death signal (prctl PR_SET_PDEATHSIG, SIGKILL). It is the second
  choice: Linux sends it when the *thread* that started the child exits (prctl(2)), so a
  World started from a short-lived thread of the kernel (a pool, a callback) would lose its
  ranks, or the template, when that thread ends.

Not for the ranks' children: a rank's watcher process (``_worker``) takes care of those.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def watch_parent(parent_pid: int) -> int | None:
    """A pidfd on ``parent_pid``, or None after falling back to the parent-death signal.

    Exits at once if the parent is already gone: then this process was re-parented, and
    the pid may even name another process by now.
    """
    try:
        pidfd: int | None = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or a sandbox that refuses it
        pidfd = None
    if pidfd is None and sys.platform.startswith("linux"):
        die_with_parent(signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    return pidfd


def die_with_parent(signum: int) -> None:
    """Have Linux send ``signum`` to this process when its parent (thread) exits."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
