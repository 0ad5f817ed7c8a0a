"""Which rank's failure is the cause, when several fail in one call.

One failure has echoes: a rank that dies closes its sockets, so a peer blocked in a
collective with it raises (Gloo: "Connection closed by peer"); the ranks the kernel then
stops fail with KeyboardInterrupt or end by its signals. Each rank's end is an
:class:`Outcome` that carries two facts, and the cause is chosen by them alone:

* ``at``: when it failed, by ``time.monotonic()``, which is system-wide on one host (a
  rank's Failed says when it raised; a death counts from when the kernel saw it, less
  DEATH_SEEN_LATE);
* ``stopped_by``: the signal the kernel had sent it before then (see ``_escalation``), if
  any: such a failure is the kernel's doing, an echo.

The cause is the earliest failure the kernel did not cause; where it caused them all (an
interrupt, a timeout), the earliest of those. ``_report`` turns the outcomes into the
exception the cell shows, leading with the cause. Pure: unit-tested in
``tests/test_attribution.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ._errors import RankCrashed
from ._escalation import Escalation
from ._protocol import Done, Failed, Ready

# A death is seen late: a dying rank's sockets close at once, so a peer blocked in a
# collective with it raises and reports, often before the kernel has even read the EOF on
# the dead rank's channel (2-10 ms here). A death therefore counts as up to this much
# earlier than seen, so that it, not its echo, is the cause. (A rank that reacts to our
# SIGINT by exiting faster than this is mistaken for a cause too; one killed by the very
# signal we sent never is.)
DEATH_SEEN_LATE = 0.1


@dataclass
class Outcome:
    """How one rank ended one wait: a reply, or the death of the process."""

    rank: int
    reply: Done | Failed | Ready | None = None
    crash: RankCrashed | None = None
    stopped_by: str | None = None  # the last signal we sent it, if we had to stop it
    at: float = 0.0  # when it ended, time.monotonic() (a death: the earliest it may have)

    @property
    def ok(self) -> bool:
        return isinstance(self.reply, (Done, Ready))


def answered(
    rank: int, reply: Done | Failed | Ready, received: float, escalation: Escalation
) -> Outcome:
    """The rank's reply, received at ``received``; a Failed says itself when it failed."""
    at = reply.at if isinstance(reply, Failed) else received
    return Outcome(rank, reply=reply, stopped_by=escalation.stopped_by(rank, at), at=at)


def died(crash: RankCrashed, seen: float, escalation: Escalation) -> Outcome:
    """The rank's death, first seen at ``seen`` (its channel's EOF, else its sentinel)."""
    at = seen - DEATH_SEEN_LATE
    stopped_by = escalation.stopped_by(crash.rank, at)
    sent = escalation.last_signal(crash.rank)
    if sent is not None and crash.signal_name == sent:
        stopped_by = sent  # killed by the signal we sent: ours, however fast
    return Outcome(crash.rank, crash=crash, stopped_by=stopped_by, at=at)


def cause(outcomes: Mapping[int, Outcome]) -> Outcome | None:
    """The failure the cell leads with, or None if every rank succeeded."""
    failed = [o for o in outcomes.values() if not o.ok]
    if not failed:
        return None
    # A rank we stopped is an echo of another failure, unless nothing else failed.
    own = [o for o in failed if o.stopped_by is None] or failed
    return min(own, key=lambda o: (o.at, o.rank))
