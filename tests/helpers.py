"""Small helpers the test modules share: cells that must pass or fail, waiting with a
deadline, whether a process is gone, and a fake clock for the pure policies.

The kernel driver itself is ``kernel.py``; which processes belong to this session,
``processes.py``.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
from kernel import Cell, Kernel


def cell(kernel: Kernel, code: str, timeout: float = 60.0) -> Cell:
    """Run ``code`` (dedented, blank lines around it dropped, so that a cell magic stays on
    the first line) as one cell; fail with the kernel's traceback if it raised."""
    return kernel.ok(textwrap.dedent(code).strip("\n"), timeout)


def fails(kernel: Kernel, code: str, timeout: float = 60.0) -> Cell:
    """Run ``code`` as :func:`cell` does, as a cell that must raise."""
    shown = kernel.execute(textwrap.dedent(code).strip("\n"), timeout)
    assert shown.error is not None, f"expected an error from:\n{code}\nstdout:\n{shown.stdout}"
    return shown


def wait_for(condition: Callable[[], object], seconds: float) -> bool:
    """Whether ``condition()`` came true within ``seconds`` (looked at every 50 ms)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_for_files(paths: Iterable[Path], seconds: float) -> None:
    """Fail unless every one of ``paths`` exists within ``seconds``."""
    deadline = time.monotonic() + seconds
    missing = list(paths)
    while missing:
        assert time.monotonic() < deadline, f"never appeared: {missing}"
        time.sleep(0.02)
        missing = [p for p in missing if not p.exists()]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for its reaper counts as gone: it runs nothing, holds
    nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def alive_after(pids: Iterable[int], seconds: float) -> list[int]:
    """Those of ``pids`` still running after up to ``seconds`` (none: returns at once)."""
    deadline = time.monotonic() + seconds
    alive = [pid for pid in pids if not gone(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if not gone(pid)]
    return alive


class FakeClock:
    """A ``time.monotonic`` stand-in that moves only when the test says."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
