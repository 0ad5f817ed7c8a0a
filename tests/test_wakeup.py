"""The interrupt wake-up (``ranks._wakeup``): a SIGINT during a wait becomes a byte the wait
takes, never a KeyboardInterrupt in the middle of it; one after the wait's last look is
still raised."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from multiprocessing.connection import wait

import pytest

from ranks._wakeup import InterruptWakeup


@pytest.fixture
def wakeup() -> Iterator[InterruptWakeup]:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT has a handler other than Python's default here")
    w = InterruptWakeup()
    yield w
    w.close()
    w.close()  # closing twice is safe


@pytest.mark.timeout(10)
def test_an_interrupt_while_catching_wakes_the_wait_instead_of_raising(
    wakeup: InterruptWakeup,
) -> None:
    with wakeup.catching():
        os.kill(os.getpid(), signal.SIGINT)
        assert wait([wakeup.waitable], 5.0) == [wakeup.waitable]
        assert wakeup.take() == 1
        assert wakeup.take() == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.timeout(10)
def test_an_interrupt_after_the_last_look_is_raised_on_the_way_out(
    wakeup: InterruptWakeup,
) -> None:
    with pytest.raises(KeyboardInterrupt), wakeup.catching():
        os.kill(os.getpid(), signal.SIGINT)
        wait([wakeup.waitable], 5.0)
    assert wakeup.take() == 0


@pytest.mark.timeout(10)
def test_outside_the_main_thread_nothing_is_installed(wakeup: InterruptWakeup) -> None:
    seen: list[object] = []

    def other() -> None:
        with wakeup.catching():
            seen.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
