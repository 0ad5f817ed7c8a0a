"""Live stacks: ``World.stacks()``, ``%ranks stacks``, and the stacks an interrupt that had
to force ranks shows.

The collapsing is a pure function of faulthandler dumps, tested on dumps as ranks write
them (and on one this process writes, so a change of faulthandler's format shows here).
The rest runs in a real kernel with real ranks: a rank blocked in a Gloo all_reduce seen
from a cell while the call runs in a thread of the kernel, four ranks in one function
shown once, idle ranks, and an interrupted call whose ranks sat in a collective.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest
from helpers import cell
from kernel import Cell, Kernel

import ranks
from ranks._stacks import (
    ENDED,
    IDLE,
    NO_ANSWER,
    Stacks,
    ThreadStack,
    hang_note,
    parse_dump,
    rank_label,
    rank_text,
)

# --- the pure part: parsing and collapsing -----------------------------------------------

WORKER = "/venv/lib/python3.11/site-packages/ranks/_worker.py"
CALL = "/venv/lib/python3.11/site-packages/ranks/_rank_call.py"
# A rank's dump between calls: the main thread waits for a command, the control thread
# reads the channel; neither is the user's.
IDLE_DUMP = f"""\
Thread 0x00007f0000000002 (most recent call first):
  File "/usr/lib/python3.11/multiprocessing/connection.py", line 930 in wait
  File "{WORKER}", line 281 in _read_commands
  File "/usr/lib/python3.11/threading.py", line 982 in run

Current thread 0x00007f0000000001 (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 327 in wait
  File "/usr/lib/python3.11/queue.py", line 171 in get
  File "{WORKER}", line 331 in _serve
  File "{WORKER}", line 127 in main
  File "<string>", line 1 in <module>
"""


def busy_dump(line: int, thread_id: str = "1", extra: str = "") -> str:
    """A rank's dump during a call: its main thread in the user's ``step`` at ``line``."""
    return f"""\
{extra}Current thread 0x00007f000000000{thread_id} (most recent call first):
  File "/tmp/ipykernel_7/1.py", line {line} in step
  File "{CALL}", line 88 in execute
  File "{WORKER}", line 333 in _serve
  File "{WORKER}", line 127 in main
  File "<string>", line 1 in <module>
"""


LOADER = """\
Thread 0x00007f00000000aa (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 331 in wait
  File "/tmp/ipykernel_7/1.py", line 9 in loader

"""


def test_rank_label_is_a_range_where_contiguous_else_a_list() -> None:
    assert rank_label([7]) == "rank 7"
    assert rank_label(range(7)) == "ranks 0-6"
    assert rank_label([5, 0, 2]) == "ranks 0, 2, 5"
    assert rank_label([6, 3, 0, 1, 2]) == "ranks 0-3, 6"
    assert rank_label([1, 0, 1]) == "ranks 0-1"


def test_a_rank_between_calls_is_idle_and_its_machinery_is_dropped() -> None:
    assert parse_dump(IDLE_DUMP) == (ThreadStack(main=True, summary=IDLE),)


def test_a_rank_in_a_call_shows_the_users_frames_and_threads_main_first() -> None:
    threads = parse_dump(busy_dump(4, extra=LOADER))
    assert threads == (
        ThreadStack(main=True, frames=('File "/tmp/ipykernel_7/1.py", line 4 in step',)),
        ThreadStack(main=False, frames=(
            'File "/usr/lib/python3.11/threading.py", line 331 in wait',
            'File "/tmp/ipykernel_7/1.py", line 9 in loader',
        )),
    )


def test_windows_paths_of_ranks_own_frames_are_dropped_too() -> None:
    dump = IDLE_DUMP.replace(WORKER, r"C:\venv\Lib\site-packages\ranks\_worker.py")
    assert parse_dump(dump) == (ThreadStack(main=True, summary=IDLE),)


def test_a_rank_that_wrote_nothing_says_so() -> None:
    assert parse_dump("") == (ThreadStack(main=True, summary=NO_ANSWER),)


def test_identical_stacks_are_shown_once_with_the_ranks_that_share_them() -> None:
    by_rank = {rank: parse_dump(busy_dump(4, str(rank % 10))) for rank in range(7)}
    by_rank[7] = parse_dump(busy_dump(5))
    text = str(Stacks(by_rank))
    assert text == textwrap.dedent("""\
        ranks 0-6, main thread (most recent call first):
          File "/tmp/ipykernel_7/1.py", line 4 in step
        rank 7, main thread (most recent call first):
          File "/tmp/ipykernel_7/1.py", line 5 in step""")
    assert repr(Stacks(by_rank)) == text  # what a cell shows


def test_threads_collapse_on_their_own_and_count_per_rank() -> None:
    """Ranks whose main threads differ still share their other threads' stacks; a rank
    with two identical threads counts them."""
    by_rank = {
        0: parse_dump(busy_dump(4, extra=LOADER + LOADER)),
        1: parse_dump(busy_dump(5, extra=LOADER + LOADER)),
        2: parse_dump(IDLE_DUMP),
    }
    headings = [line for line in str(Stacks(by_rank)).splitlines() if line[0] != " "]
    assert headings == [
        "rank 0, main thread (most recent call first):",
        "rank 1, main thread (most recent call first):",
        f"rank 2, main thread: {IDLE}",
        "ranks 0-1, 2 threads each (most recent call first):",
    ]


def test_a_rank_that_ended_or_did_not_answer_says_so_without_threads() -> None:
    by_rank = {0: parse_dump(IDLE_DUMP), 1: parse_dump(""), 2: parse_dump(""),
               3: (ThreadStack(main=True, summary=ENDED),)}
    assert str(Stacks(by_rank)).splitlines() == [
        f"rank 0, main thread: {IDLE}", f"ranks 1-2: {NO_ANSWER}", f"rank 3: {ENDED}",
    ]
    # One rank's text, as RanksTimeout shows it under the rank's name.
    assert rank_text(parse_dump("")) == NO_ANSWER
    assert rank_text(parse_dump(busy_dump(4))) == (
        'main thread (most recent call first):\n  File "/tmp/ipykernel_7/1.py", line 4 in step')


def test_a_timeout_shows_ranks_in_the_same_place_once() -> None:
    error = ranks.RanksTimeout(5, {0: "at a", 1: "at a", 2: "at b", 3: "at a", 4: ""})
    assert str(error).split(":", 1)[1] == textwrap.dedent("""
        --- ranks 0-1, 3 ---
        at a
        --- rank 2 ---
        at b
        --- rank 4 ---
        (no stack: the rank did not answer)""")


def test_the_note_of_a_forced_interrupt_names_the_ranks() -> None:
    one = hang_note({3: parse_dump(busy_dump(4))})
    assert one.startswith("ranks: where rank 3 was when it had to be forced to stop (")
    assert one.endswith('interrupt):\nrank 3, main thread (most recent call first):\n'
                        '  File "/tmp/ipykernel_7/1.py", line 4 in step')
    both = hang_note({0: parse_dump(busy_dump(4)), 1: parse_dump(busy_dump(4))})
    assert both.startswith("ranks: where ranks 0-1 were when they had to be forced"), both


def test_a_real_faulthandler_dump_parses(tmp_path: Path) -> None:
    """faulthandler's own format (headers, blank lines between threads) as this Python
    writes it: a thread parked in ``parked_here`` comes out with that frame."""
    release = threading.Event()
    parked = threading.Event()

    def parked_here() -> None:
        parked.set()
        release.wait(30)

    thread = threading.Thread(target=parked_here, name="parked")
    thread.start()
    try:
        parked.wait(10)
        running = threading.active_count()
        with open(tmp_path / "dump.txt", "w") as dump:
            faulthandler.dump_traceback(file=dump, all_threads=True)
    finally:
        release.set()
        thread.join(10)
    threads = parse_dump((tmp_path / "dump.txt").read_text())
    assert len(threads) == running, threads  # one each, none lost to the block splitting
    assert not any(t.main or t.summary for t in threads)  # no rank's main() in this process
    parked_frames = [t.frames for t in threads if any("in parked_here" in f for f in t.frames)]
    assert len(parked_frames) == 1, threads
    assert all(frame.startswith('File "') for frame in parked_frames[0]), threads


# --- ranks.run called here (the same path as from a kernel's cell) ----------------------


@pytest.mark.timeout(60)
def test_a_second_interrupt_kills_at_once_and_still_says_where_ranks_were(
    tmp_path: Path,
) -> None:
    """Stop pressed twice skips to SIGKILL; the ranks' stacks are taken just before."""
    def deaf(folder: str) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        open(os.path.join(folder, f"deaf-{os.environ['RANK']}"), "w").close()
        time.sleep(600)

    def interrupt_twice() -> None:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"deaf-{rank}").exists() for rank in range(2)):
            if time.monotonic() > deadline:
                break  # the call is not in its ranks' code: let its own error show
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    interrupter = threading.Thread(target=interrupt_twice)
    interrupter.start()
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            ranks.run(deaf, (str(tmp_path),), n=2)
    finally:
        interrupter.join(40)
    notes = "\n".join(getattr(caught.value, "__notes__", []))
    note = notes.split("ranks: where ranks 0-1 were when they had to be forced")[1]
    where = note.split("the interrupt):\n")[1].splitlines()
    assert where[0] == "ranks 0-1, main thread (most recent call first):", notes
    assert where[1].endswith("in deaf"), notes


# --- in a real kernel ---------------------------------------------------------------------

# Rank 0 (and every rank below ``waiters``) enters a Gloo all_reduce; the others wait for
# the file ``release`` before they join it. Each says it got there with a file.
COLLECTIVE = """
import os, threading, time
import ranks

def reduce_when_released(release, waiters):
    import torch, torch.distributed as dist
    rank = ranks.current().rank
    if rank >= waiters:
        open(f"waiting-{rank}", "w").close()
        while not os.path.exists(release):
            time.sleep(0.05)
    else:
        open(f"reducing-{rank}", "w").close()
    tensor = torch.ones(2)
    dist.all_reduce(tensor)
    return tensor.tolist()

def wait_for(*names, seconds=60):
    deadline = time.monotonic() + seconds
    while not all(os.path.exists(name) for name in names):
        assert time.monotonic() < deadline, names
        time.sleep(0.05)
    time.sleep(0.3)  # from the file to the call it precedes
"""


def run(kernel: Kernel, code: str, timeout: float = 90.0) -> Cell:
    """:func:`helpers.cell`, with the longer deadline of a cell that waits for a hang."""
    return cell(kernel, code, timeout)


@pytest.fixture(scope="module")
def nb(kernel: Kernel) -> Kernel:
    run(kernel, COLLECTIVE + "\n%load_ext ranks")
    return kernel


@pytest.mark.timeout(120)
def test_stacks_magic_shows_a_rank_blocked_in_a_gloo_collective(nb: Kernel) -> None:
    """The call runs in a thread of the kernel; the next cell's ``%ranks stacks`` shows
    rank 0 inside all_reduce and rank 1 in the cell's loop, without stopping either: once
    released, the call finishes with its result."""
    run(nb, "%ranks start -n 2 --torch-dist\n%ranks push reduce_when_released")
    try:
        run(nb, """
            for name in ("release", "reducing-0", "waiting-1"):
                if os.path.exists(name):
                    os.remove(name)
            outcome = []
            def cell_in_a_thread():
                try:
                    get_ipython().run_cell_magic(
                        "ranks", "", "result = reduce_when_released('release', 1)")
                    outcome.append("done")
                except BaseException as error:
                    outcome.append(repr(error))
            caller = threading.Thread(target=cell_in_a_thread)
            caller.start()
            wait_for("reducing-0", "waiting-1")
            deadline = time.monotonic() + 20  # a loaded machine: from the file to all_reduce
            while "all_reduce" not in str(get_ipython().run_line_magic("ranks", "stacks")):
                assert time.monotonic() < deadline
        """)
        shown = run(nb, "%ranks stacks").result
        assert shown is not None
        rank0, rank1 = shown.split("rank 1, main thread (most recent call first):\n")
        assert rank0.startswith("rank 0, main thread (most recent call first):\n"), shown
        assert "distributed_c10d.py" in rank0 and "in all_reduce" in rank0, shown
        assert "in reduce_when_released" in rank0, shown
        assert "in reduce_when_released" in rank1 and "all_reduce" not in rank1, shown
        assert "_worker.py" not in shown and "_read_commands" not in shown, shown
        assert "_rank_call.py" not in shown, shown
        assert nb.value("open('release', 'w').close(); caller.join(60); outcome") == ["done"]
        run(nb, "%%ranks\nassert result == [2.0, 2.0], result")
        # Between calls: the ranks wait for the next one.
        idle = run(nb, "%ranks stacks").result
        assert idle == "ranks 0-1, main thread: idle (waiting for the next call)", idle
    finally:
        run(nb, "%ranks stop")


@pytest.mark.timeout(60)
def test_stacks_without_ranks_says_what_to_do(nb: Kernel) -> None:
    for code, says in [("%ranks stacks", "no ranks are running: `%ranks start"),
                       ("w = ranks.World(n=1)\nw.close()\nw.stacks()",
                        "this World is closed; start a new one")]:
        cell = nb.execute(code)
        assert cell.error is not None and cell.error["ename"] == "RanksError", cell.traceback
        assert cell.error["evalue"].startswith(says), cell.error["evalue"]
    cell = nb.execute("%ranks start -n 1\n%ranks stacks now")
    assert cell.error is not None and "takes no arguments" in cell.error["evalue"]
    run(nb, "%ranks stop")


@pytest.mark.timeout(120)
def test_world_stacks_from_a_monitoring_thread_collapses_identical_ones(nb: Kernel) -> None:
    """World.stacks() from another thread while the call runs in the cell: four ranks
    waiting in the same line are one stack, "ranks 0-3"."""
    cell = run(nb, """
        for name in ["release"] + [f"waiting-{rank}" for rank in range(4)]:
            if os.path.exists(name):
                os.remove(name)
        with ranks.World(n=4, torch_dist=True) as w4:
            taken = []
            def monitor():
                try:
                    wait_for(*(f"waiting-{rank}" for rank in range(4)))
                    taken.append(str(w4.stacks()))
                finally:
                    open("release", "w").close()
            watcher = threading.Thread(target=monitor)
            watcher.start()
            results = w4.run(reduce_when_released, ("release", 0))
            watcher.join(30)
        print(taken[0])
        print(results)
    """)
    text, results = cell.stdout.rstrip("\n").rsplit("\n", 1)
    assert results == "[[4.0, 4.0], [4.0, 4.0], [4.0, 4.0], [4.0, 4.0]]"
    headings = [line for line in text.splitlines() if not line.startswith(" ")]
    assert headings == ["ranks 0-3, main thread (most recent call first):"], text
    assert "in reduce_when_released" in text, text


@pytest.mark.timeout(120)
def test_an_interrupt_that_had_to_force_ranks_shows_where_they_hung(
    fresh_kernel: Kernel,
) -> None:
    """Ranks 0 and 1 sit in all_reduce waiting for rank 2, which takes the interrupt:
    they never see it (Gloo waits in C) and are terminated. The KeyboardInterrupt says so
    with their stack, once for both; rank 2, which stopped, is not in it."""
    k, folder = fresh_kernel, Path(fresh_kernel.workdir)  # type: ignore[attr-defined]
    run(k, COLLECTIVE)
    cell, seconds = k.interrupt_once(
        "ranks.run(reduce_when_released, ('never', 2), n=3, torch_dist=True)",
        [folder / "reducing-0", folder / "reducing-1", folder / "waiting-2"],
        wait=60, settle=1.0, timeout=90,
    )
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.traceback
    assert seconds < 6.0, f"the cell took {seconds:.1f} s to end after the interrupt"
    note = cell.traceback.split("ranks: where ranks 0-1 were when they had to be forced")[1]
    where = note.split("the interrupt):\n")[1].splitlines()
    assert where[0] == "ranks 0-1, main thread (most recent call first):", note
    assert "in all_reduce" in where[1], note
    assert "rank 2" not in note, note


@pytest.mark.timeout(120)
def test_an_interrupted_cell_whose_ranks_ignore_it_shows_where_they_were(
    fresh_kernel: Kernel,
) -> None:
    """The same for a %%ranks cell: both ranks ignore SIGINT in the same line of the cell."""
    k = fresh_kernel
    run(k, "%load_ext ranks\n%ranks start -n 2")
    msg_id = k.start(textwrap.dedent("""\
        %%ranks
        import signal, time
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("deaf", flush=True)
        time.sleep(600)
    """))
    printed = ""
    while printed.count("deaf") < 2:  # both ranks are in the cell, past the signal() call
        msg = k.client.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            printed += msg["content"]["text"]
    k.interrupt()
    cell = k.collect(msg_id, timeout=30)
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.traceback
    note = cell.traceback.split("ranks: where ranks 0-1 were when they had to be forced")[1]
    where = note.split("the interrupt):\n")[1].splitlines()
    assert where[0] == "ranks 0-1, main thread (most recent call first):", note
    assert "<ranks-cell-" in where[1] and "line 4 in <module>" in where[1], note
    run(k, "%ranks stop")
