"""First-failure attribution (``ranks._attribution``, ``ranks._report.build_error``) on a
fake clock: which rank's failure the cell leads with when several fail in one call.

The end-to-end cases (a real death and its Gloo echo) are in test_failures.py and
test_world.py; these pin the rules: earliest first, a death counts DEATH_SEEN_LATE
earlier than seen, and what the kernel caused by its own signals is an echo.
"""

from __future__ import annotations

import signal

from helpers import FakeClock

from ranks._attribution import DEATH_SEEN_LATE, answered, cause, died
from ranks._errors import RankCrashed, RankFailed
from ranks._escalation import FAILURE_INTERRUPT_GRACE, Escalation
from ranks._protocol import Done, Failed
from ranks._report import build_error, raising_rank

PIDS = {0: 1000, 1: 1001, 2: 1002}
DEVICES = dict.fromkeys(PIDS, "cpu")


def _escalation() -> tuple[Escalation, FakeClock]:
    clock = FakeClock(50.0)
    escalation = Escalation(clock)
    escalation.begin(starting=False)
    return escalation, clock


def _failed(at: float, type_name: str = "ValueError", message: str = "bad") -> Failed:
    return Failed(1, None, type_name, message, f"Traceback...\n{type_name}: {message}\n",
                  "running the function", at)


def _crash(rank: int, exitcode: int) -> RankCrashed:
    return RankCrashed(rank, PIDS[rank], exitcode)


def test_a_death_seen_after_its_peers_echo_is_still_the_cause() -> None:
    escalation, _ = _escalation()
    # Rank 1 dies; rank 0, in a collective with it, raises 30 ms later and reports first;
    # the kernel reads rank 1's EOF only 50 ms after it died.
    echo = answered(0, _failed(10.03, "RuntimeError", "Connection closed by peer"), 10.031,
                    escalation)
    death = died(_crash(1, -signal.SIGSEGV), 10.05, escalation)
    assert death.at == 10.05 - DEATH_SEEN_LATE
    outcomes = {0: echo, 1: death}
    assert cause(outcomes) is death
    error = build_error(outcomes, PIDS, DEVICES)
    assert isinstance(error, RankCrashed) and error.rank == 1
    assert "rank 0: RuntimeError: Connection closed by peer" in error.__notes__[-1]
    assert raising_rank(outcomes) is None  # a death: no rank's exception to debug


def test_the_earliest_own_failure_leads_and_the_others_are_summarised() -> None:
    escalation, _ = _escalation()
    outcomes = {
        2: answered(2, _failed(5.0, "KeyError", "'x'"), 5.2, escalation),
        0: answered(0, _failed(5.1), 5.2, escalation),
        1: answered(1, Done(1, b""), 5.2, escalation),
    }
    assert cause(outcomes) is outcomes[2]
    error = build_error(outcomes, PIDS, DEVICES)
    assert isinstance(error, RankFailed)
    assert "raised on rank 2 (pid 1002, cpu)" in error.__notes__[0]
    assert error.__notes__[-1] == "ranks: other ranks:\n  rank 0: ValueError: bad"
    assert raising_rank(outcomes) == 2


def test_ties_go_to_the_lowest_rank() -> None:
    escalation, _ = _escalation()
    outcomes = {r: answered(r, _failed(7.0), 7.0, escalation) for r in (2, 1)}
    assert cause(outcomes) is outcomes[1]


def test_a_rank_interrupted_because_of_a_peer_is_an_echo_even_if_it_reports_first() -> None:
    escalation, clock = _escalation()
    # Rank 0 raised at 20.0 but its reply is read late; the kernel stopped rank 1 at 20.01
    # (after another failure), and rank 1's KeyboardInterrupt is stamped 20.02.
    clock.now = 20.01
    escalation.escalate([1], interrupt_grace=FAILURE_INTERRUPT_GRACE)
    interrupted = answered(1, _failed(20.02, "KeyboardInterrupt", ""), 20.03, escalation)
    assert interrupted.stopped_by == "SIGINT"
    own = answered(0, _failed(20.0), 20.04, escalation)
    outcomes = {1: interrupted, 0: own}
    assert cause(outcomes) is own
    error = build_error(outcomes, PIDS, DEVICES)
    assert error is not None
    assert "rank 1: KeyboardInterrupt after ranks sent it SIGINT" in error.__notes__[-1]


def test_a_failure_before_our_signal_is_the_ranks_own() -> None:
    escalation, clock = _escalation()
    clock.now = 30.0
    escalation.escalate([1])
    outcome = answered(1, _failed(29.99), 30.05, escalation)
    assert outcome.stopped_by is None


def test_a_rank_killed_by_the_very_signal_we_sent_is_ours_however_fast() -> None:
    escalation, clock = _escalation()
    clock.now = 40.0
    escalation.escalate([1], first_step=1)  # SIGTERM (a rank still starting, say)
    # Seen 10 ms later: counted as 90 ms before the signal was sent, yet it was our SIGTERM.
    death = died(_crash(1, -signal.SIGTERM), 40.01, escalation)
    assert death.at < 40.0
    assert death.stopped_by == "SIGTERM"
    # A rank that died of something else that fast is its own cause.
    other = died(_crash(1, -signal.SIGSEGV), 40.01, escalation)
    assert other.stopped_by is None


def test_when_the_kernel_caused_every_failure_the_earliest_leads() -> None:
    escalation, clock = _escalation()
    clock.now = 60.0
    escalation.escalate([0, 1])  # an interrupt of the kernel
    outcomes = {
        0: answered(0, _failed(60.3, "KeyboardInterrupt", ""), 60.3, escalation),
        1: answered(1, _failed(60.2, "KeyboardInterrupt", ""), 60.3, escalation),
    }
    assert cause(outcomes) is outcomes[1]


def test_every_rank_done_is_no_error() -> None:
    escalation, _ = _escalation()
    outcomes = {r: answered(r, Done(1, b""), 1.0, escalation) for r in (0, 1)}
    assert cause(outcomes) is None
    assert build_error(outcomes, PIDS, DEVICES) is None
    assert raising_rank(outcomes) is None
