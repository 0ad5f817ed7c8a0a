"""Ending everything a rank started, multiprocessing's resource tracker last (Linux).

A rank's process group holds what it started the usual way, but not what left the group:
a daemon in a session of its own (``setsid()``, ``start_new_session=True``), or one that
a double fork orphaned. So on Linux a rank, and the template that forks ranks, make
themselves child subreapers (``prctl(PR_SET_CHILD_SUBREAPER)``, prctl(2)): a process
orphaned below them is re-parented to them instead of to init. While a rank lives, every
process it started is below it in the process tree; when it dies, what it started moves
to its parent: the template, which ends it, or the kernel (spawn, portable), which is no
subreaper, so there the rank must end it first. Whoever ends a rank's processes does it
with :func:`end_processes`:

    a spawned rank, before it exits         its tree, but its watcher and trackers
    a forked rank's template, once idle     what its ranks that ended left to it
    the rank's watcher, when the kernel     the rank's tree, then the rank, then its
      (or template) dies                      group (a thread of the rank on the
                                              portable start, which has no pidfd)
    the rank's watcher, when the rank dies  the rank's group
    the kernel, stopping a rank             SIGTERM: what left the group; SIGKILL: the
                                              rank's tree and group
    the kernel, closing a World             the ranks' groups, trackers given time

A subreaper's adopted children that exit stay zombies until it exits (a rank reaps only
the children it started, as the user's code expects to wait for its own): a World whose
code daemonises many short-lived processes holds their pids until it closes.

One process there is spared: multiprocessing's resource tracker. It removes the named
semaphores and shared memory blocks (``/dev/shm/sem.mp-*``, ``psm_*``) that the rank's
code did not release, once it reads EOF on its pipe, that is once every process holding
the pipe's write end (the rank, its multiprocessing children) has exited: CPython's
``Lib/multiprocessing/resource_tracker.py``, ``main()``, cleans up in the ``finally``
after ``for line in f``, and ignores SIGINT and SIGTERM so that it lives to do so. SIGKILL
to the rank's group, as ranks sent, killed it first and left the segments behind. So
everything else is killed first; the tracker gets a bounded wait to finish, and is killed
only after it.

Read from /proc by hand, not with psutil: ranks depends on cloudpickle alone, and needs
only each process's parent, group and state. Elsewhere (macOS) only the group is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Collection, Iterable

PR_SET_CHILD_SUBREAPER = 36
# Enough for a tracker to unlink what it holds, normally milliseconds. One whose pipe a
# process we could not kill still holds never sees EOF: it is killed after this.
TRACKER_WAIT = 3.0
_ROUNDS_WITHIN = 2.0  # killing what keeps forking gives up after this
_PROC = "/proc"
_LINUX = sys.platform.startswith("linux")


def adopt_orphans() -> None:
    """Become the child subreaper: what is orphaned below this process comes back to it."""
    if _LINUX:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def end_processes(
    below: Iterable[int] = (), groups: Iterable[int] = (), spare: Collection[int] = (),
    tracker_wait: float | None = None, outside_group: int | None = None,
) -> bool:
    """SIGKILL every process below those in ``below`` and in the process ``groups``, then
    those in ``below`` themselves, except this process, those in ``spare`` and resource
    trackers. Nothing below a spared process is touched. The trackers are left to finish
    and exit, or, given ``tracker_wait``, get that many seconds to, and are killed after.

    Those in ``below`` are stopped first, so they start nothing new meanwhile, and are
    killed last, so that what their dying children orphan still comes to them.

    ``outside_group``: end only what left that process group (neither the roots nor its
    members are touched: they get the group's signal).

    Returns whether there was anything to end or spare (where that can be told).
    """
    if not hasattr(os, "killpg"):
        return True  # Windows: the rank's job object ends its tree (_winjob)
    spare = {os.getpid(), *spare}
    groups = [pgid for pgid in groups if _group_exists(pgid)]
    if not (_LINUX and os.path.isdir(_PROC)):
        for pgid in groups:
            _kill_group(pgid)
        return True
    # One that has exited has nothing below it any more: its children went to a subreaper.
    roots = {pid for pid in below if pid in spare or _running(pid)}
    stopped = roots - spare if outside_group is None else set()
    if not roots and not groups:
        return False
    for pid in stopped:
        _signal(pid, signal.SIGSTOP)
    trackers: set[int] = set()
    seen = False
    deadline = time.monotonic() + _ROUNDS_WITHIN
    while time.monotonic() < deadline:
        table = _process_table()
        found = _below(roots, table, spare) | (stopped & table.keys()) | {
            pid for pid, (_, pgid) in table.items() if pgid in groups
        }
        found -= spare
        if outside_group is not None:
            found = {pid for pid in found if table[pid][1] != outside_group}
        seen = seen or bool(found)
        trackers |= {pid for pid in found - trackers if _is_tracker(pid)}
        victims = (found - trackers - roots) or (found & stopped)
        if not victims:
            break
        for pid in victims:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.005)  # SIGKILL is delivered at once; exiting takes a moment
    if tracker_wait is not None:
        _await_exit(trackers, tracker_wait)
    return seen


def _await_exit(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pids = {pid for pid in pids if _running(pid)}
        if not pids or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that has not exited."""
    table = {}
    for name in os.listdir(_PROC):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    return table


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group), or None for a process that is gone or a zombie."""
    # os.open and os.read, not open(): half the time, and this runs for every process.
    try:
        fd = os.open(f"{_PROC}/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 512)  # the fields we need are within the first 100 bytes
        finally:
            os.close(fd)
    except OSError:
        return None
    # The name in parentheses may hold spaces and parentheses itself: split after the last.
    state, ppid, pgid, _ = data[data.rindex(b")") + 2:].split(maxsplit=3)
    return None if state in (b"Z", b"X") else (int(ppid), int(pgid))


def _below(
    roots: Iterable[int], table: dict[int, tuple[int, int]], spare: Collection[int]
) -> set[int]:
    """Every process below ``roots``, but none below (or in) ``spare``."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = [child for root in roots for child in children.get(root, [])]
    while todo:
        pid = todo.pop()
        if pid not in found and pid not in spare:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _is_tracker(pid: int) -> bool:
    """Is this multiprocessing's resource tracker? It runs ``python -c 'from
    multiprocessing.resource_tracker import main;main(fd)'`` (CPython 3.8+)."""
    try:
        with open(f"{_PROC}/{pid}/cmdline", "rb") as file:
            return b"multiprocessing.resource_tracker" in file.read()
    except OSError:
        return False


def _running(pid: int) -> bool:
    return _stat(pid) is not None


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)
