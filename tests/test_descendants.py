"""What a rank leaves behind ends with it: multiprocessing's /dev/shm segments, daemons.

Item 3: a rank that uses a spawn ``Pool``, a ``multiprocessing`` Lock or Semaphore, or a
``SharedMemory`` block and never releases it leaves no ``sem.mp-*`` / ``psm_*`` entry in
``/dev/shm`` once the call is over, as the same code in a plain script leaves none
(multiprocessing's resource tracker removes them, if it is not killed first).

Item 8: a daemon a rank starts in a session of its own (``start_new_session=True``, a
double fork) no longer outlives the rank, whichever way the rank ends.

The in-process tests run under whichever start ``RANKS_START_METHOD`` picks; the killed
kernel test runs each start. ``leavers.py`` holds what the ranks run.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import leavers
import pytest
from kernel import Kernel
from processes import (
    MULTIPROCESSING_SHM,
    gone_within,
    is_alive,
    shm_segments,
    unused_shm,
    wait_for_files,
)

import ranks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="process trees and /dev/shm as Linux has them")

TESTS = str(Path(__file__).resolve().parent)
DAEMONS_END_WITHIN = 3.0


def _left_since(before: set[str]) -> set[str]:
    new = {name for name in shm_segments() - before if name.startswith(MULTIPROCESSING_SHM)}
    return unused_shm(new)


def _still_alive_after(pids: Iterable[int], seconds: float) -> list[int]:
    alive = gone_within(pids, seconds)
    for pid in alive:  # not left running for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return alive


def _daemon_pids(folder: Path, n: int) -> list[int]:
    files = [folder / f"daemons-{rank}" for rank in range(n)]
    return [int(pid) for file in files for pid in file.read_text().split()]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("what", ["pool", "lock", "semaphore", "shared_memory"])
@pytest.mark.parametrize("ending", ["returns", "raises", "world_close"])
def test_multiprocessing_segments_are_removed_after_the_call(
    tmp_path: Path, what: str, ending: str
) -> None:
    """Item 3: nothing of multiprocessing's stays in /dev/shm once the call (or the World)
    is over, though the rank never released it."""
    before = shm_segments()
    if ending == "returns":
        names = ranks.run(leavers.leave_open, args=(what,), n=2, timeout=60)
    elif ending == "raises":
        with pytest.raises(RuntimeError, match="things open"):
            ranks.run(_leave_open_then_raise, args=(what, str(tmp_path)), n=2, timeout=60)
        names = []
    else:
        world = ranks.World(n=2)
        try:
            names = world.run(leavers.leave_open, args=(what,), timeout=60)
            assert {n for rank in names for n in rank} <= shm_segments()  # there while it ran
        finally:
            world.close()
    assert _left_since(before) == set()
    for name in (n for rank in names for n in rank):
        assert not os.path.exists(f"/dev/shm/{name}"), name


def _leave_open_then_raise(what: str, folder: str) -> None:
    leavers.leave_open(what)
    leavers.all_there(folder, "left")
    raise RuntimeError("failed after leaving things open")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "ending", ["returns", "raises", "world_close", "timeout", "timeout_ignoring_sigint"])
def test_daemons_that_left_the_process_group_end_with_the_rank(
    tmp_path: Path, ending: str
) -> None:
    """Item 8: a ``sleep`` in a session of its own and a double-forked daemon are gone
    within seconds of the call's end: after it returns, raises, times out (also when the
    rank ignores SIGINT, so that escalation has to end it with signals), or its World
    closes."""
    folder = str(tmp_path)
    if ending == "returns":
        ranks.run(leavers.start_daemons, args=(folder,), n=2, timeout=60)
    elif ending == "raises":
        with pytest.raises(RuntimeError, match="things open"):
            ranks.run(leavers.leave_all, args=(folder, "raise"), n=2, timeout=60)
    elif ending.startswith("timeout"):
        ignore = ending == "timeout_ignoring_sigint"
        with pytest.raises(ranks.RanksTimeout):
            ranks.run(_daemons_then_hang, args=(folder, ignore), n=2, timeout=8)
    else:
        with ranks.World(n=2) as world:
            world.run(leavers.start_daemons, args=(folder,), timeout=60)
            assert all(is_alive(pid) for pid in _daemon_pids(tmp_path, 2))
    pids = _daemon_pids(tmp_path, 2)
    assert _still_alive_after(pids, DAEMONS_END_WITHIN) == []


def _daemons_then_hang(folder: str, ignore_interrupt: bool) -> None:
    if ignore_interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    leavers.start_daemons(folder)
    time.sleep(600)


@pytest.mark.timeout(120)
@pytest.mark.kills_kernel
@pytest.mark.parametrize("start_method", ["template", "spawn", "portable"])
def test_killed_kernel_leaves_no_segments_and_no_daemons(
    fresh_kernel: Kernel, start_method: str
) -> None:
    """Items 3 and 8 after SIGKILL to the kernel mid-call: the ranks' multiprocessing
    segments are removed (the resource tracker is not killed before it has cleaned up) and
    their daemons are ended."""
    k, folder = fresh_kernel, Path(fresh_kernel.workdir)  # type: ignore[attr-defined]
    before = shm_segments()
    k.ok(f"import os, sys, ranks\nos.environ['RANKS_START_METHOD'] = {start_method!r}\n"
         f"sys.path.insert(0, {TESTS!r})\nimport leavers")
    k.client.execute(f"ranks.run(leavers.leave_all, args=({str(folder)!r}, 'hang'), n=2)")
    wait_for_files([folder / f"segments-{rank}" for rank in (0, 1)], 60)
    names = [n for rank in (0, 1) for n in (folder / f"segments-{rank}").read_text().split()]
    assert set(names) <= shm_segments()
    daemons = _daemon_pids(folder, 2)
    os.kill(k.pid, signal.SIGKILL)
    assert _still_alive_after(daemons, DAEMONS_END_WITHIN) == []
    deadline = time.monotonic() + 5.0
    while _left_since(before) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _left_since(before) == set()
