"""Stopping ranks, as a policy: which signal each rank gets next, and when.

Each step comes after a grace, and only to a rank that is still running::

    SIGINT to the rank --grace--> SIGTERM to its tree --TERMINATE_GRACE--> SIGKILL to its
    tree --KILL_GRACE--> given up (the kernel stops waiting for it)

The grace after SIGINT depends on why the rank is stopped and on what it said:

* INTERRUPT_GRACE on an interrupt of the kernel or a ``timeout``; FAILURE_INTERRUPT_GRACE
  when a peer's failure is why (speed matters most then: the cell waits for it);
* a rank that took the SIGINT in the user's code (``Interrupted``) gets RESPOND_GRACE to run
  its ``finally`` blocks and answer; one that took it in ranks' own code, INTERRUPT_GRACE.

A wait may begin past SIGINT (a rank still starting runs none of the user's code), and a
later reason may skip ahead (a second interrupt: SIGKILL) but never back.

This module sends nothing and reads the time only from the clock it is given: the
supervisor asks it what to send (:class:`Send`) and when to look again, sends it (a
signal, or on the portable start a message), and tells it what the ranks did. That keeps
the deadlines unit-testable on a fake clock (``tests/test_escalation.py``).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ._spawn import KILL

log = logging.getLogger("ranks")

# Seconds a rank gets at each step of being stopped. After SIGINT, a rank whose Python
# code runs the handler says so at once (Interrupted); one that does not is blocked in C
# code, almost always a collective that will never return, and gets SIGTERM after
# INTERRUPT_GRACE, or after FAILURE_INTERRUPT_GRACE when a peer's failure is why it is
# stopped. A rank that took the interrupt gets RESPOND_GRACE to run its `finally` blocks
# and answer.
INTERRUPT_GRACE = 1.0
FAILURE_INTERRUPT_GRACE = 0.2
RESPOND_GRACE = 5.0
TERMINATE_GRACE = 1.0
KILL_GRACE = 5.0

INTERRUPT, TERMINATE, FORCE = 0, 1, 2  # the steps, by index into STEPS
STEPS: tuple[tuple[signal.Signals, float], ...] = (
    (signal.SIGINT, INTERRUPT_GRACE),
    (signal.SIGTERM, TERMINATE_GRACE),
    (KILL, KILL_GRACE),
)


@dataclass(frozen=True)
class Send:
    """Send ``signum`` to ``rank``: SIGINT to the rank alone, the others to its whole tree."""

    rank: int
    step: int
    signum: signal.Signals


class Escalation:
    """Where each rank being stopped is, for one wait at a time; see the module docstring."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._next: dict[int, tuple[int, float]] = {}  # rank -> (next step, when it is due)
        self._signalled: dict[int, tuple[str, float]] = {}  # rank -> (last signal, first sent)
        self._first_step = INTERRUPT

    def begin(self, starting: bool) -> None:
        """A new wait: nothing sent yet. Ranks still ``starting`` skip SIGINT."""
        self._next.clear()
        self._signalled.clear()
        self._first_step = TERMINATE if starting else INTERRUPT

    def end(self) -> None:
        """The wait is over: whoever is still being stopped is no longer waited for."""
        self._next.clear()

    def escalate(
        self, ranks: Iterable[int], first_step: int = INTERRUPT,
        interrupt_grace: float = INTERRUPT_GRACE,
    ) -> list[Send]:
        """Start (or speed up) stopping these ranks at ``first_step``; what to send now.

        A rank already past ``first_step`` is left where it is.
        """
        now = self._clock()
        first_step = max(first_step, self._first_step)
        sends = []
        for rank in ranks:
            if rank in self._next and self._next[rank][0] > first_step:
                continue
            sends.append(self._send(rank, first_step, now))
            if first_step == INTERRUPT:
                self._next[rank] = (INTERRUPT + 1, now + interrupt_grace)
        return sends

    def responding(self, rank: int, in_user_code: bool) -> None:
        """The rank took our SIGINT: give it time to run the user's cleanup and answer.

        Taken outside the user's code (the rank is formatting an error, idle), ranks' own
        code answers by itself: the usual grace is enough.
        """
        step, _ = self._next.get(rank, (INTERRUPT, 0.0))
        if step == INTERRUPT + 1:  # SIGINT was the last step sent
            grace = RESPOND_GRACE if in_user_code else INTERRUPT_GRACE
            self._next[rank] = (step, self._clock() + grace)

    def due_to_be_forced(self, pending: Iterable[int]) -> list[int]:
        """Those of ``pending`` whose SIGTERM or SIGKILL is due now."""
        now = self._clock()
        return [rank for rank in pending if rank in self._next
                and INTERRUPT < self._next[rank][0] < len(STEPS) and now >= self._next[rank][1]]

    def advance(self, pending: set[int]) -> tuple[list[Send], list[int]]:
        """The steps due now for ``pending`` ranks, and the ranks given up on.

        A rank that survived SIGKILL for KILL_GRACE (a process stuck in the GPU driver can)
        is given up on, so the kernel is not held hostage. Ranks not ``pending`` (they
        answered or ended) are forgotten.
        """
        now = self._clock()
        sends, given_up = [], []
        for rank, (step, when) in list(self._next.items()):
            if rank not in pending:
                del self._next[rank]
            elif now >= when:
                if step < len(STEPS):
                    log.info("rank %d still running %.1f s after %s; escalating",
                             rank, STEPS[step - 1][1], STEPS[step - 1][0].name)
                    sends.append(self._send(rank, step, now))
                else:
                    log.warning("rank %d survived SIGKILL for %.0f s; giving up on it",
                                rank, KILL_GRACE)
                    del self._next[rank]
                    given_up.append(rank)
        return sends, given_up

    def settled(self, rank: int) -> None:
        """The rank answered or ended: nothing more is sent to it."""
        self._next.pop(rank, None)

    def wake_times(self) -> list[float]:
        """When a step falls due: the wait must look again by then."""
        return [when for _, when in self._next.values()]

    def __contains__(self, rank: object) -> bool:
        """Whether the rank is being stopped."""
        return rank in self._next

    def last_signal(self, rank: int) -> str | None:
        """The name of the last signal sent to the rank in this wait."""
        signalled = self._signalled.get(rank)
        return signalled[0] if signalled is not None else None

    def stopped_by(self, rank: int, at: float) -> str | None:
        """The signal sent before the rank failed at ``at``: its failure is our doing."""
        signalled = self._signalled.get(rank)
        return signalled[0] if signalled is not None and signalled[1] <= at else None

    def _send(self, rank: int, step: int, now: float) -> Send:
        signum, grace = STEPS[step]
        first = self._signalled.get(rank, (signum.name, now))[1]
        self._signalled[rank] = (signum.name, first)
        self._next[rank] = (step + 1, now + grace)
        return Send(rank, step, signum)
