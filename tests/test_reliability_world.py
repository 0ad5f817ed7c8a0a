"""Reliability of a World and of the errors it reports, under abuse (issue 12, items 2, 5,
6 and 9): one World used from several threads, exceptions that cannot be printed or that
unpickle to something else, a rank whose template was killed, an interrupt while ranks
start.

The thread tests run in this process (threads of the caller are what they are about); the
rest run in a real kernel, where the user sees the cell's output and error.
"""

from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fails
from kernel import Kernel

import ranks
from ranks._start import start_method

# --- item 2: one World used from two threads ----------------------------------------------


def tagged(thread: int, call: int) -> tuple[int, int, int]:
    """What a rank answers: who asked, and which rank it is."""
    return thread, call, my_rank()


def my_rank() -> int:
    return ranks.current().rank


def sleep_then(seconds: float, marker: str, value: int) -> int:
    Path(marker).touch()
    time.sleep(seconds)
    return value


@pytest.mark.timeout(120)
def test_item2_one_world_used_from_two_threads_is_never_corrupted() -> None:
    calls_per_thread = 20
    errors: list[BaseException] = []
    with ranks.World(n=2) as world:

        def use(thread: int) -> None:
            try:
                for call in range(calls_per_thread):
                    kind = call % 5
                    if kind == 0:
                        got = world.run(tagged, args=(thread, call))
                        assert got == [(thread, call, 0), (thread, call, 1)], got
                    elif kind == 1:
                        world.push(**{f"v{thread}": call})
                    elif kind == 2:
                        assert world.pull(f"v{thread}") == [call - 1] * 2
                    elif kind == 3:
                        world.exec(f"v{thread} = {call} * 10")
                    else:
                        assert world.pull(f"v{thread}", rank=1) == (call - 1) * 10
                        assert [s.state for s in world.status()] == ["idle", "idle"]
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=use, args=(t,)) for t in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not errors, errors
        assert world.broken is None
        assert world.run(tagged, args=(9, 9)) == [(9, 9, 0), (9, 9, 1)]


@pytest.mark.timeout(60)
def test_item2_a_waiting_call_counts_its_wait_in_its_timeout(tmp_path: Path) -> None:
    marker = str(tmp_path / "running")
    first: dict[str, Any] = {}
    with ranks.World(n=1) as world:
        runner = threading.Thread(
            target=lambda: first.update(value=world.run(sleep_then, args=(3.0, marker, 1))))
        runner.start()
        deadline = time.monotonic() + 30
        while not os.path.exists(marker):
            assert time.monotonic() < deadline and runner.is_alive()
            time.sleep(0.01)
        asked = time.monotonic()
        with pytest.raises(ranks.RanksTimeout, match="another thread") as caught:
            world.run(tagged, args=(0, 0), timeout=0.5)
        assert time.monotonic() - asked < 2.0
        assert caught.value.stacks == {}  # nothing was sent: no rank was stopped
        runner.join(30)
        assert first["value"] == [1]
        assert world.broken is None
        assert world.run(tagged, args=(1, 1)) == [(1, 1, 0)]


@pytest.mark.timeout(60)
def test_item2_close_from_another_thread_waits_for_the_running_call(tmp_path: Path) -> None:
    marker = str(tmp_path / "running")
    first: dict[str, Any] = {}
    world = ranks.World(n=2)

    def call() -> None:
        try:
            first["value"] = world.run(sleep_then, args=(1.0, marker, 5))
        except BaseException as error:
            first["error"] = error

    runner = threading.Thread(target=call)
    runner.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(marker):
        assert time.monotonic() < deadline and runner.is_alive()
        time.sleep(0.01)
    world.close()
    assert world.closed
    runner.join(30)
    assert first == {"value": [5, 5]}
    with pytest.raises(ranks.RanksError, match="closed"):
        world.run(tagged, args=(0, 0))
    world.close()  # twice is fine


@pytest.mark.timeout(90)
def test_item2_interrupt_ends_a_call_waiting_for_another_threads_call(
    fresh_kernel: Kernel,
) -> None:
    """A cell waits for a monitoring thread's call: the interrupt ends the cell's wait, and
    nothing of the thread's call nor of the World."""
    k = fresh_kernel
    running = Path(k.workdir) / "running"  # type: ignore[attr-defined]
    k.ok(textwrap.dedent("""
        import threading, time, ranks
        from pathlib import Path
        w = ranks.World(n=2)
        def slow():
            Path("running").touch()
            time.sleep(3)
            return ranks.current().rank
        background = {}
        thread = threading.Thread(target=lambda: background.update(value=w.run(slow)))
        thread.start()
    """))
    cell, seconds = k.interrupt_once("w.run(time.time)", [running], wait=30, settle=0.3,
                                     timeout=60)
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.traceback
    assert seconds < 2.0, seconds
    assert not any(ours in cell.traceback for ours in OUR_MACHINERY), cell.traceback
    assert k.value("thread.join(30); background") == {"value": [0, 1]}
    assert k.value("w.broken is None, len(w.run(time.time))") == (True, 2)
    k.ok("w.close()")


# --- items 5 and 6: exceptions that cannot be printed, pickled or unpickled --------------

EXCEPTIONS = """
import threading

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")
    def __repr__(self):
        raise RuntimeError("no repr either")

class Shapeshifter(Exception):
    def __reduce__(self):
        return (type(None), ())  # unpickles to None, not to an exception

class Unpicklable(Exception):
    def __init__(self, text):
        super().__init__(text)
        self.lock = threading.Lock()

class UnprintableUnpicklable(Unpicklable):
    def __str__(self):
        raise RuntimeError("no str for you")

def my_rank():
    return ranks.current().rank

def raise_on_rank_1(cls, *args):
    if my_rank() == 1:
        raise cls(*args)
    return my_rank()
"""

OUR_MACHINERY = ("_worker.py", "_rank_call.py", "_supervisor.py", "_template.py", "_spawn.py",
                 "_portable.py", "_report.py")


@pytest.fixture(scope="module")
def defined(kernel: Kernel) -> Kernel:
    kernel.ok(EXCEPTIONS)
    return kernel


@pytest.fixture
def exceptions(defined: Kernel) -> Iterator[Kernel]:
    """The kernel with the exceptions above and a World ``w`` of 2 ranks of the test's own."""
    defined.ok("w = ranks.World(n=2)")
    yield defined
    defined.ok("w.close()")


def _world_still_works(kernel: Kernel) -> None:
    assert kernel.value("w.run(my_rank)") == [0, 1]
    assert kernel.value("w.broken is None") is True


@pytest.mark.timeout(90)
def test_item5_exception_whose_str_raises_keeps_the_rank(exceptions: Kernel) -> None:
    exceptions.ok("""
try:
    w.run(raise_on_rank_1, args=(Unprintable, 'kept'))
except Unprintable as error:
    caught = (type(error).__name__, error.__cause__.text, error.__notes__)
""")
    name, rank_traceback, notes = exceptions.value("caught")
    assert name == "Unprintable"  # its own type, whatever its __str__ does
    assert "raise cls(*args)" in rank_traceback, rank_traceback  # as the rank formatted it
    assert "Unprintable: <exception str() failed>" in rank_traceback, rank_traceback
    assert any("on rank 1" in note for note in notes), notes
    _world_still_works(exceptions)
    # Not caught, the cell shows what IPython shows for the same exception raised in the
    # kernel itself (the error of its __str__), and nothing of ranks.
    alone = exceptions.execute("raise Unprintable('kept')")
    cell = fails(exceptions, "w.run(raise_on_rank_1, args=(Unprintable, 'kept'))")
    assert cell.error["ename"] == alone.error["ename"], (cell.traceback, alone.traceback)
    assert "RankCrashed" not in cell.traceback, cell.traceback
    assert not any(ours in cell.traceback + cell.stderr for ours in OUR_MACHINERY), (
        cell.traceback, cell.stderr)
    _world_still_works(exceptions)


@pytest.mark.timeout(90)
def test_item5_unprintable_exception_that_cannot_be_pickled_either(exceptions: Kernel) -> None:
    cell = fails(exceptions, "w.run(raise_on_rank_1, args=(UnprintableUnpicklable, 'x'))")
    assert cell.error["ename"] == "RankFailed", cell.traceback
    assert "rank 1 raised UnprintableUnpicklable: <exception str() failed>" in cell.traceback
    _world_still_works(exceptions)


@pytest.mark.timeout(90)
def test_item6_exception_that_unpickles_to_a_non_exception(exceptions: Kernel) -> None:
    cell = fails(exceptions, "w.run(raise_on_rank_1, args=(Shapeshifter, 'odd'))")
    assert cell.error["ename"] == "RankFailed", cell.traceback
    assert "rank 1 raised Shapeshifter: odd" in cell.traceback, cell.traceback
    assert "raise cls(*args)" in cell.traceback, cell.traceback  # the rank's traceback text
    assert "AttributeError" not in cell.traceback, cell.traceback
    _world_still_works(exceptions)


@pytest.mark.timeout(90)
def test_item6_exception_that_cannot_be_pickled_is_rank_failed(exceptions: Kernel) -> None:
    cell = fails(exceptions, "w.run(raise_on_rank_1, args=(Unpicklable, 'locked'))")
    assert cell.error["ename"] == "RankFailed", cell.traceback
    assert "rank 1 raised Unpicklable: locked" in cell.traceback, cell.traceback
    _world_still_works(exceptions)


# --- item 9: misleading messages -----------------------------------------------------------


def kill_my_template() -> None:
    os.kill(os.getppid(), signal.SIGKILL)  # a forked rank's parent is the template
    time.sleep(30)


@pytest.mark.timeout(60)
@pytest.mark.skipif(start_method() != "template", reason="only forked ranks have a template")
def test_item9_rank_whose_template_was_killed_says_so() -> None:
    # The first call spawns its ranks while the template starts (their parent: this
    # process, which kill_my_template must not kill): call until they fork.
    deadline = time.monotonic() + 60
    while ranks.run(os.getppid, n=1) == [os.getpid()]:
        assert time.monotonic() < deadline, "no call forked from a template within 60 s"
        time.sleep(0.2)
    with pytest.raises(ranks.RankCrashed) as caught:
        ranks.run(kill_my_template, n=2)
    message = str(caught.value)
    assert "ended with the ranks template it was forked from" in message, message
    assert "RANKS_START_METHOD=spawn" in message, message  # what to do if it repeats
    assert "OOM" not in message and "SIGKILL" not in message, message
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    assert "ended with its template" in notes, notes  # the other rank, summarised
    assert ranks.run(my_rank, n=2) == [0, 1]  # a new template serves the next call


@pytest.mark.timeout(120)
def test_item9_interrupt_while_ranks_start_shows_no_rank_traceback(fresh_kernel: Kernel) -> None:
    """Interrupts at several moments of a World's start: each cell ends in KeyboardInterrupt
    (or, interrupted too late, in a running World), with nothing of ranks' own start-up
    code in its output or its traceback."""
    k = fresh_kernel
    # The template (if any) is warm before the first interrupt.
    k.ok("import ranks\ndef my_rank():\n    return ranks.current().rank\n"
         "ranks.run(my_rank, n=1)\nw = None")
    interrupted = 0
    # Not at 0: an interrupt in the instant ipykernel itself starts the cell can cost the
    # cell its reply (ipykernel's machinery, not ours, is running then).
    for delay in (0.01, 0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.3):
        msg_id = k.start("w = ranks.World(n=2)")

        def interrupt_later(delay: float = delay) -> None:
            time.sleep(delay)  # counted from when the kernel starts to run the cell
            k.interrupt()

        cell = k.collect(msg_id, timeout=60, on_start=interrupt_later)
        shown = cell.stdout + cell.stderr + cell.traceback
        assert "Traceback" not in cell.stdout + cell.stderr, (delay, shown)
        assert not any(ours in shown for ours in OUR_MACHINERY), (delay, shown)
        if cell.error is None:  # too late: the World had started
            k.ok("if w is not None:\n    w.close()\nw = None")
        else:
            assert cell.error["ename"] == "KeyboardInterrupt", (delay, shown)
            interrupted += 1
    assert interrupted > 0
    assert k.value("ranks.run(my_rank, n=2)") == [0, 1]
