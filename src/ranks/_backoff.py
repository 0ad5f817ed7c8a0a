"""When to try again something that failed for a reason that may pass: a doubling back-off.

The warm template can fail for a while and then work again (a low fd limit, an environment
too large to exec, a template killed from outside): each failure pushes the next try out
(``first``, then doubling, up to ``cap``), and a success starts over. The policy is pure:
the caller passes the clock's reading, so that tests drive it with a fake one.

    fail at t=0 -> next try at t>=1; fail again -> t>=1+2; again -> +4 ... at most +cap
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Backoff:
    first: float = 1.0
    cap: float = 30.0
    failures: int = 0  # in a row, since the last success
    _next_try: float = -math.inf

    def allows(self, now: float) -> bool:
        """May the thing be tried at ``now``?"""
        return now >= self._next_try

    def failed(self, now: float) -> float:
        """Count a failure at ``now``; the delay until the next try."""
        delay = min(self.cap, self.first * 2.0 ** min(self.failures, 64))
        self.failures += 1
        self._next_try = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self._next_try = -math.inf
