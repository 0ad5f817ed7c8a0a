"""Small helpers the test modules share: cells that must pass or fail, waiting for a
condition with a deadline, a fake clock for the pure policies, and the environment a
World of the local backend gives its ranks.

The kernel driver itself is ``kernel.py``; processes (which belong to this session,
whether one is gone, files a process writes) are ``processes.py``'s.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Mapping

from kernel import Cell, Kernel

from ranks._backends import Rendezvous
from ranks._backends.local import LOOPBACK, free_port
from ranks._placement import RankSpec
from ranks._world import _rank_environments


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


class FakeClock:
    """A ``time.monotonic`` stand-in that moves only when the test says."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def local_environments(
    specs: list[RankSpec], extra: Mapping[str, str]
) -> dict[int, dict[str, str]]:
    """Each rank's environment, as a World of the local backend gives it (no process
    starts)."""
    meet = Rendezvous(LOOPBACK, free_port(), "unused-store", None)
    return _rank_environments(specs, extra, meet, free_port)
