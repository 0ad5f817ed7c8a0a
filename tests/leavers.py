"""What a rank's code leaves for ranks to clean up (tests/test_descendants.py).

Imported by the ranks: multiprocessing objects that are never closed (kept alive in
``KEEP`` until the rank ends), and daemons that left the rank's process group.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

KEEP: list[object] = []


def leave_open(what: str) -> list[str]:
    """Create multiprocessing objects that name ``/dev/shm`` entries and never release
    them; their names as ``/dev/shm`` lists them."""
    import multiprocessing
    from multiprocessing import shared_memory

    spawn = multiprocessing.get_context("spawn")
    if what == "pool":
        pool = spawn.Pool(1)
        assert pool.map(abs, [-1]) == [1]
        KEEP.append(pool)
        locks = [pool._inqueue._rlock, pool._outqueue._rlock]  # type: ignore[attr-defined]
        return [_semaphore_file(lock) for lock in locks]
    if what in ("lock", "semaphore"):
        lock = spawn.Lock() if what == "lock" else spawn.Semaphore(2)
        KEEP.append(lock)
        return [_semaphore_file(lock)]
    assert what == "shared_memory", what
    block = shared_memory.SharedMemory(create=True, size=4096)
    KEEP.append(block)
    return [block.name.lstrip("/")]


def _semaphore_file(lock: object) -> str:
    return "sem." + lock._semlock.name.lstrip("/")  # type: ignore[attr-defined]


def start_daemons(folder: str) -> list[int]:
    """A ``sleep`` in a session of its own, and one daemonised by a double fork (its parent
    exits, so it is orphaned); their pids, also written to ``folder``/daemons-<rank>."""
    session = subprocess.Popen(["sleep", "600"], start_new_session=True)
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the daemon's side
        os.setsid()
        if os.fork() == 0:
            os.write(write_end, str(os.getpid()).encode())
            os.execvp("sleep", ["sleep", "600"])
        os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        orphan = int(pipe.read())
    pids = [session.pid, orphan]
    rank = os.environ["RANK"]
    Path(folder, f"daemons-{rank}.tmp").write_text(" ".join(map(str, pids)))
    os.replace(Path(folder, f"daemons-{rank}.tmp"), Path(folder, f"daemons-{rank}"))
    return pids


def leave_all(folder: str, then: str) -> list[str]:
    """Every kind of leftover at once, then ``then``: return, raise or hang."""
    names = [name for what in ("pool", "lock", "shared_memory") for name in leave_open(what)]
    start_daemons(folder)
    rank = os.environ["RANK"]
    Path(folder, f"segments-{rank}.tmp").write_text(" ".join(names))
    os.replace(Path(folder, f"segments-{rank}.tmp"), Path(folder, f"segments-{rank}"))
    if then == "raise":
        all_there(folder, "left")
        raise RuntimeError("failed after leaving things open")
    if then == "hang":
        time.sleep(600)
    return names


def all_there(folder: str, step: str) -> None:
    """Wait until every rank has reached ``step``: a rank that fails first has the others
    interrupted, which must not land while they are still creating what they leave
    (between creating a semaphore and registering it, plain Python would leak it too)."""
    import ranks

    Path(folder, f"{step}-{os.environ['RANK']}").touch()
    deadline = time.monotonic() + 60
    while not all(Path(folder, f"{step}-{rank}").exists()
                  for rank in range(ranks.current().world_size)):
        assert time.monotonic() < deadline, f"the other ranks never reached {step}"
        time.sleep(0.01)
