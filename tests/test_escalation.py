"""The escalation policy (``ranks._escalation``) on a fake clock: which signal each rank gets
and when, for a peer's failure, an interrupt, a timeout and a rank still starting.

The supervisor's end-to-end behaviour (real ranks stopped by real signals) is in
test_failures.py and test_supervision_kernel.py; these pin the deadlines themselves.
"""

from __future__ import annotations

import signal

from helpers import FakeClock

from ranks._escalation import (
    FAILURE_INTERRUPT_GRACE,
    FORCE,
    INTERRUPT_GRACE,
    KILL,
    KILL_GRACE,
    RESPOND_GRACE,
    TERMINATE,
    TERMINATE_GRACE,
    Escalation,
    Send,
)


def _policy(starting: bool = False) -> tuple[Escalation, FakeClock]:
    clock = FakeClock()
    escalation = Escalation(clock)
    escalation.begin(starting=starting)
    return escalation, clock


def _signals(sends: list[Send]) -> list[tuple[int, signal.Signals]]:
    return [(send.rank, send.signum) for send in sends]


def test_a_rank_that_ignores_everything_gets_sigint_sigterm_sigkill_then_is_given_up() -> None:
    escalation, clock = _policy()
    pending = {0}
    assert _signals(escalation.escalate(pending)) == [(0, signal.SIGINT)]
    assert escalation.wake_times() == [clock.now + INTERRUPT_GRACE]

    clock.advance(INTERRUPT_GRACE - 0.01)
    assert escalation.advance(pending) == ([], [])
    clock.advance(0.01)
    assert escalation.due_to_be_forced(pending) == [0]
    assert _signals(escalation.advance(pending)[0]) == [(0, signal.SIGTERM)]
    assert escalation.wake_times() == [clock.now + TERMINATE_GRACE]

    clock.advance(TERMINATE_GRACE)
    assert _signals(escalation.advance(pending)[0]) == [(0, KILL)]

    clock.advance(KILL_GRACE - 0.01)
    assert escalation.advance(pending) == ([], [])
    clock.advance(0.01)
    assert escalation.due_to_be_forced(pending) == []  # nothing left to send, only to give up
    assert escalation.advance(pending) == ([], [0])
    assert 0 not in escalation
    assert escalation.wake_times() == []


def test_a_peer_failure_forces_the_others_sooner_than_an_interrupt() -> None:
    escalation, clock = _policy()
    escalation.escalate([1, 2], interrupt_grace=FAILURE_INTERRUPT_GRACE)
    assert escalation.wake_times() == [clock.now + FAILURE_INTERRUPT_GRACE] * 2
    clock.advance(FAILURE_INTERRUPT_GRACE)
    sends, _ = escalation.advance({1, 2})
    assert sorted(_signals(sends)) == [(1, signal.SIGTERM), (2, signal.SIGTERM)]


def test_an_acknowledged_interrupt_in_user_code_gets_time_for_its_finally_blocks() -> None:
    escalation, clock = _policy()
    escalation.escalate([0, 1])
    clock.advance(0.1)
    escalation.responding(0, in_user_code=True)
    escalation.responding(1, in_user_code=False)
    assert sorted(escalation.wake_times()) == [clock.now + INTERRUPT_GRACE,
                                               clock.now + RESPOND_GRACE]
    clock.advance(INTERRUPT_GRACE)
    sends, _ = escalation.advance({0, 1})
    assert _signals(sends) == [(1, signal.SIGTERM)]  # outside user code: the usual grace
    clock.advance(RESPOND_GRACE - INTERRUPT_GRACE)
    sends, _ = escalation.advance({0, 1})
    assert _signals(sends) == [(0, signal.SIGTERM), (1, KILL)]


def test_an_acknowledgement_after_sigterm_buys_no_time() -> None:
    escalation, clock = _policy()
    escalation.escalate([0])
    clock.advance(INTERRUPT_GRACE)
    escalation.advance({0})  # SIGTERM
    escalation.responding(0, in_user_code=True)
    assert escalation.wake_times() == [clock.now + TERMINATE_GRACE]


def test_a_rank_that_answers_is_sent_nothing_more() -> None:
    escalation, clock = _policy()
    escalation.escalate([0, 1])
    escalation.settled(0)
    clock.advance(INTERRUPT_GRACE)
    sends, _ = escalation.advance({0, 1})
    assert _signals(sends) == [(1, signal.SIGTERM)]
    # One that left the pending set without a word (its death was recorded) is forgotten.
    clock.advance(TERMINATE_GRACE)
    assert escalation.advance(set()) == ([], [])
    assert 1 not in escalation


def test_a_second_interrupt_skips_to_sigkill_and_never_goes_back() -> None:
    escalation, clock = _policy()
    escalation.escalate([0])
    assert _signals(escalation.escalate([0], first_step=FORCE)) == [(0, KILL)]
    assert escalation.wake_times() == [clock.now + KILL_GRACE]
    assert escalation.escalate([0]) == []  # a later SIGINT-level reason is too late
    assert escalation.escalate([0], first_step=TERMINATE) == []


def test_a_timeout_after_a_peer_failure_does_not_restart_the_interrupt() -> None:
    escalation, clock = _policy()
    escalation.escalate([0], interrupt_grace=FAILURE_INTERRUPT_GRACE)
    clock.advance(0.1)
    assert escalation.escalate([0]) == []
    assert escalation.wake_times() == [clock.now - 0.1 + FAILURE_INTERRUPT_GRACE]


def test_ranks_still_starting_skip_sigint() -> None:
    escalation, clock = _policy(starting=True)
    assert _signals(escalation.escalate([0, 1])) == [(0, signal.SIGTERM), (1, signal.SIGTERM)]
    assert escalation.wake_times() == [clock.now + TERMINATE_GRACE] * 2


def test_stopped_by_names_the_signal_sent_before_the_failure() -> None:
    escalation, clock = _policy()
    assert escalation.stopped_by(0, clock.now) is None
    sent_at = clock.now
    escalation.escalate([0])
    assert escalation.stopped_by(0, sent_at - 0.001) is None  # failed before we sent: its own
    assert escalation.stopped_by(0, sent_at) == "SIGINT"
    clock.advance(INTERRUPT_GRACE)
    escalation.advance({0})
    # The last signal's name, counted from the first one sent.
    assert escalation.stopped_by(0, sent_at + 0.01) == "SIGTERM"
    assert escalation.last_signal(0) == "SIGTERM"


def test_a_new_wait_forgets_what_the_last_one_sent() -> None:
    escalation, clock = _policy()
    escalation.escalate([0])
    escalation.end()
    assert escalation.wake_times() == []
    escalation.begin(starting=False)
    assert escalation.stopped_by(0, clock.now) is None
    assert _signals(escalation.escalate([0])) == [(0, signal.SIGINT)]
