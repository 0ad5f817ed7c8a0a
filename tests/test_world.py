"""Persistent ranks: ``ranks.World`` and the ``%ranks`` / ``%%ranks`` magics, in a real kernel.

What a notebook user relies on, each checked through ipykernel as a notebook would run it:

* state lives on the ranks between cells (and calls), each rank its own namespace;
* ``torch_dist=True`` makes the process group once: later calls reuse it;
* an exception on some ranks is shown in that cell, rank by rank, and the World stays usable;
* a rank that dies breaks the World: it says so, and every later call says so at once;
* an interrupt stops the ranks' code and keeps their state when they answer SIGINT, and
  kills them (World broken) within seconds when they do not; the kernel carries on;
* closing (explicit, garbage collection, kernel shutdown or restart) leaves no process.

Most tests share one kernel (the module's ``kernel`` fixture); the extension holds one World
per kernel, so each test stops what it started (the autouse leak check would see it
otherwise). Interrupts and kernel shutdowns get a kernel of their own (``fresh_kernel``).
"""

from __future__ import annotations

import ast
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import cell as run  # `cell` names what a test's cell showed
from helpers import fails
from kernel import KERNEL_PIDS, WINDOWS_KERNEL, Cell, Kernel
from processes import rank_processes

# Every test here runs with the default start and the portable one (conftest.py), which
# stands in for Windows' and macOS's: spawn ranks behave as forked ones between calls.
START_METHODS = ("template", "portable")

# A rank that answers SIGINT must be back within this many seconds of the interrupt; one
# that ignores it is killed after the 1 s SIGINT grace plus the 1 s SIGTERM grace. Both
# budgets leave slack for a loaded 2-core CI machine.
RESPONSIVE_WITHIN = 1.5
UNRESPONSIVE_WITHIN = 4.5
# A broken World must refuse at once, not after any wait of its own.
REFUSES_WITHIN = 0.5

HELPERS = """
    import gc, os, signal, time, weakref
    import psutil, ranks
    %load_ext ranks

    def gone(pids):
        \"\"\"Each pid ended (a zombie counts as ended: it holds no resources).\"\"\"
        def ended(pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True
        return [ended(pid) for pid in pids]

    def rank_pids():
        \"\"\"The pids of the extension's World, read from `%ranks status`.\"\"\"
        return [row.pid for row in get_ipython().run_line_magic("ranks", "status").rows]
"""


def interrupted(kernel: Kernel, code: str, wait_for: str, within: float) -> Cell:
    """Start ``code``, interrupt the kernel once ``wait_for`` was printed; the cell, which
    must end with KeyboardInterrupt within ``within`` seconds of the interrupt."""
    msg_id = kernel.start(textwrap.dedent(code).strip("\n"))
    seen = ""
    deadline = time.monotonic() + 30
    while wait_for not in seen:  # the ranks are in the user's code, not still starting it
        assert time.monotonic() < deadline, f"{wait_for!r} never printed; got {seen!r}"
        msg = kernel.client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            seen += msg["content"]["text"]
    time.sleep(0.5)
    sent = time.monotonic()
    kernel.interrupt()
    cell = kernel.collect(msg_id, timeout=30)
    took = time.monotonic() - sent
    cell.stdout = seen + cell.stdout
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.traceback
    assert took < within, took
    return cell


@pytest.fixture(scope="module")
def nb(kernel: Kernel) -> Kernel:
    """The module's kernel with the extension loaded and the helpers above defined."""
    run(kernel, HELPERS)
    return kernel


@pytest.fixture
def magic(nb: Kernel) -> Iterator[Kernel]:
    """The module's kernel with a World of 2 CPU ranks started by ``%ranks start``."""
    run(nb, "%ranks start -n 2")
    yield nb
    nb.execute("%ranks stop")


# --- ranks.World from Python --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_world_state_lives_across_cells_in_each_ranks_namespace(nb: Kernel) -> None:
    run(nb, """
        def tag(prefix, *, sep):
            import __main__
            __main__.tag = f"{prefix}{sep}{os.environ['RANK']}"
            return __main__.tag

        w = ranks.World(n=2)
        tags = w.run(tag, args=("r",), kwargs={"sep": "-"})
    """)
    run(nb, "w.push(a=1, b=[2, 3], c={'k': 'v'})")
    run(nb, "w.exec('import ranks\\ntotal = a + sum(b) + 10 * ranks.current().rank')")
    run(nb, "w.exec('only_one = True', ranks=[1])")
    assert nb.value("tags, w.pull('tag'), w.pull('total'), w.pull('c', rank=0)") == (
        ["r-0", "r-1"], ["r-0", "r-1"], [6, 16], {"k": "v"}
    )
    on_rank = "w.run(lambda: 'only_one' in vars(__import__('__main__')))"
    assert nb.value(f"w.pull('only_one', rank=1), {on_rank}") == (True, [False, True])
    # A notebook function finds names made on the ranks by exec (its globals lack them).
    assert nb.value("w.run(lambda: total * 2)") == [12, 32]
    missing = fails(nb, "w.pull('only_one')")
    assert missing.error["ename"] == "NameError"
    assert "'only_one' is not defined on rank 0" in missing.error["evalue"]
    assert nb.value("pids = w.run(os.getpid); w.close(); w.close(); w.closed, gone(pids)") == (
        True, [True, True]
    )


@pytest.mark.timeout(60)
def test_context_manager_and_refused_arguments(nb: Kernel) -> None:
    run(nb, """
        refused = {}
        with ranks.World(n=2) as cw:
            cw_pids = cw.run(os.getpid)
            for label, call in {
                "pull rank": lambda: cw.pull("x", rank=2),
                "pull name": lambda: cw.pull(3),
                "exec source": lambda: cw.exec(b"pass"),
                "exec ranks": lambda: cw.exec("pass", ranks=[0, 5]),
                "push": lambda: cw.push(lock=__import__("threading").Lock()),
                "run fn": lambda: cw.run(42),
                "run timeout": lambda: cw.run(print, timeout=-1),
            }.items():
                try:
                    call()
                except Exception as error:
                    refused[label] = type(error).__name__
            still = cw.run(lambda: 1)
    """)
    assert nb.value("refused") == {
        "pull rank": "ValueError", "pull name": "TypeError", "exec source": "TypeError",
        "exec ranks": "ValueError", "push": "TypeError", "run fn": "TypeError",
        "run timeout": "ValueError",
    }
    assert nb.value("still, cw.closed, gone(cw_pids)") == ([1, 1], True, [True, True])
    closed = fails(nb, "cw.run(os.getpid)")
    assert closed.error["ename"] == "RanksError" and "closed" in closed.error["evalue"]


@pytest.mark.torch
@pytest.mark.timeout(90)
def test_torch_dist_group_made_once_and_kept_across_calls(nb: Kernel) -> None:
    run(nb, """
        def all_reduce_rank():
            import torch
            import torch.distributed as dist
            t = torch.tensor([float(dist.get_rank() + 1)])
            dist.all_reduce(t)  # Gloo: 1 + 2 on 2 ranks
            return t.item(), id(dist.group.WORLD), dist.get_backend()

        tw = ranks.World(n=2, torch_dist=True)
        first = tw.run(all_reduce_rank)
    """, timeout=90)
    # Later calls, each from its own cell: the group made at start is used, never re-made.
    run(nb, "second = tw.run(all_reduce_rank)")
    run(nb, "tw.exec('import torch.distributed as dist\\nthird_ok = dist.is_initialized()')")
    run(nb, "third = tw.run(all_reduce_rank)")
    first, second, third = nb.value("first, second, third")
    assert [r[0] for r in first] == [3.0, 3.0] and {r[2] for r in first} == {"gloo"}
    assert first == second == third  # the same group object on each rank, every call
    assert nb.value("tw.pull('third_ok')") == [True, True]
    assert nb.value("pids = [r.pid for r in tw.status()]; tw.close(); gone(pids)") == [True] * 2


@pytest.mark.timeout(60)
def test_exception_on_one_rank_is_shown_and_the_world_stays_usable(nb: Kernel) -> None:
    run(nb, """
        ew = ranks.World(n=2)
        ew.push(kept="before")
        ew_pids = ew.run(os.getpid)

        def fail_on_rank_1():
            import ranks
            if ranks.current().rank == 1:
                raise ValueError("only rank 1 fails")
            return "fine"
    """)
    failed = fails(nb, "ew.run(fail_on_rank_1)")
    assert failed.error["ename"] == "ValueError"
    assert failed.error["evalue"] == "only rank 1 fails"
    assert "raised on rank 1 (pid" in failed.traceback
    assert 'raise ValueError("only rank 1 fails")' in failed.traceback  # the rank's line
    # Every rank fails differently: the first is the error, the others are listed by rank.
    both = fails(nb, "ew.exec('import ranks\\nraise KeyError(ranks.current().rank)')")
    assert both.error["ename"] == "KeyError"
    assert "other ranks:" in both.traceback and "KeyError: " in both.traceback
    assert nb.value("ew.pull('kept'), ew.run(os.getpid) == ew_pids, ew.status()[1].state") == (
        ["before", "before"], True, "idle"
    )
    run(nb, "ew.close()")


@pytest.mark.timeout(60)
def test_peer_failing_while_a_rank_reports_its_own_error_keeps_the_world(nb: Kernel) -> None:
    """Rank 1 raises first and is still formatting its traceback when rank 0 raises too.

    The kernel then sends rank 1 SIGINT (to stop what it takes for an echo of rank 0's
    failure). That interrupt must not land in rank 1's own error report: it used to escape
    there and kill the rank, breaking the World. To hold rank 1 in its report for long
    enough, the failing function's module has a loader whose ``get_source`` (called by the
    traceback formatter through linecache) is slow.
    """
    run(nb, """
        sw = ranks.World(n=2)
        sw.exec('''
        import time, ranks

        class SlowLoader:
            def get_source(self, name):
                time.sleep(0.5)
                return None

        slow = {"__name__": "slow_source", "__loader__": SlowLoader()}
        exec(compile("def fail():\\\\n    raise LookupError('rank 1 first')\\\\n",
                     "/nonexistent/slow_source.py", "exec"), slow)
        kept = "state"
        ''')
        sw_pids = sw.run(os.getpid)
    """)
    cell = fails(nb, """
        sw.exec('''
        if ranks.current().rank == 1:
            slow["fail"]()
        time.sleep(0.1)
        raise ValueError("rank 0 later")
        ''')
    """)
    # The first failure is the cause; the later one is listed as rank 0's own error.
    assert cell.error is not None and cell.error["ename"] == "LookupError", cell.traceback
    assert "rank 0: ValueError: rank 0 later" in cell.traceback
    assert "broken" not in cell.traceback
    assert nb.value("repr(sw), sw.pull('kept'), sw.run(os.getpid) == sw_pids") == (
        "<ranks.World of 2 ranks, running>", ["state", "state"], True
    )
    run(nb, "sw.close()")


@pytest.mark.timeout(60)
def test_dead_rank_breaks_the_world_and_every_later_call_says_so(nb: Kernel) -> None:
    run(nb, """
        dw = ranks.World(n=2)
        dw_pids = dw.run(os.getpid)

        def exit_on_rank_1():
            import ranks
            if ranks.current().rank == 1:
                os._exit(3)
            time.sleep(30)  # rank 0 is stopped at once, not after this
    """)
    crashed = fails(nb, "dw.run(exit_on_rank_1)")
    assert crashed.seconds < 5, crashed.seconds
    assert crashed.error["ename"] == "RankCrashed"
    assert "rank 1 (pid" in crashed.error["evalue"] and "code 3" in crashed.error["evalue"]
    assert "this World is broken" in crashed.traceback
    assert "%ranks restart" in crashed.traceback
    for call in ("dw.run(os.getpid)", "dw.exec('pass')", "dw.push(a=1)", "dw.pull('a')"):
        refused = fails(nb, call)
        assert refused.error["ename"] == "WorldBroken", (call, refused.traceback)
        assert "rank(s) [1] ended" in refused.error["evalue"]
        assert refused.seconds < REFUSES_WITHIN, (call, refused.seconds)
    assert nb.value("repr(dw), [r.state for r in dw.status()], gone(dw_pids)") == (
        "<ranks.World of 2 ranks, broken>", ["dead", "dead"], [True, True]
    )
    run(nb, "dw.close(); dw.close()")


@pytest.mark.timeout(60)
def test_rank_killed_between_calls_breaks_the_world(nb: Kernel) -> None:
    run(nb, """
        kw = ranks.World(n=2)
        kw_pids = kw.run(os.getpid)
        os.kill(kw_pids[1], getattr(signal, "SIGKILL", 9))  # Windows: TerminateProcess
        while not gone(kw_pids[1:])[0]:
            time.sleep(0.05)
    """)
    refused = fails(nb, "kw.run(os.getpid)")
    assert refused.error["ename"] in ("WorldBroken", "RankCrashed"), refused.traceback
    again = fails(nb, "kw.exec('pass')")
    assert again.error["ename"] == "WorldBroken" and "rank(s) [1] ended" in again.error["evalue"]
    assert nb.value("gone(kw_pids)") == [True, True]
    run(nb, "kw.close()")


@pytest.mark.timeout(60)
def test_garbage_collected_world_leaves_no_process(nb: Kernel) -> None:
    run(nb, """
        gw = ranks.World(n=2)
        gw_pids = gw.run(os.getpid)
        gw_ref = weakref.ref(gw)
    """)
    assert nb.value("gone(gw_pids)") == [False, False]
    assert nb.value("del gw; gc.collect(); gw_ref() is None, gone(gw_pids)") == (
        True, [True, True]
    )


# --- the magics -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_cells_keep_state_and_stream_output_live_and_labelled(magic: Kernel) -> None:
    run(magic, """
        %%ranks
        import ranks, time
        me = ranks.current().rank
        counter = 10 * me
    """)
    run(magic, "%%ranks\ncounter += 1")
    cell = run(magic, """
        %%ranks
        print(f"first {counter}", flush=True)
        time.sleep(1.0)
        print(f"second {counter}")
    """)
    assert sorted(cell.stdout.splitlines()) == [
        "[rank 0] first 1", "[rank 0] second 1", "[rank 1] first 11", "[rank 1] second 11",
    ]
    # Live: the first lines reached the notebook a second before the last ones.
    sent = {m["content"]["text"]: m["header"]["date"] for m in cell.messages
            if m["msg_type"] == "stream"}
    first = min(date for text, date in sent.items() if "first" in text)
    second = max(date for text, date in sent.items() if "second" in text)
    assert (second - first).total_seconds() > 0.7, sent


@pytest.mark.timeout(60)
def test_rank_selection_push_and_pull(magic: Kernel) -> None:
    run(magic, """
        alpha, beta, gamma = 1, [2, 3], {"g": 4}
        %ranks push alpha beta gamma
    """)
    only = run(magic, "%%ranks --rank 1\nimport ranks\nmark = alpha + sum(beta) + gamma['g']")
    assert only.stdout == ""
    run(magic, "%%ranks --rank 0 --rank 1\nprint(alpha, beta, gamma)")
    run(magic, """
        pulled = %ranks pull beta
        one = %ranks pull mark --rank 1
    """)
    assert magic.value("pulled, one") == ([[2, 3], [2, 3]], 10)
    missing = fails(magic, "%ranks pull mark")  # set on rank 1 only
    assert missing.error["ename"] == "NameError"
    assert "'mark' is not defined on rank 0" in missing.error["evalue"]
    labelled = run(magic, "%%ranks --rank 0\nprint('zero only')")
    assert labelled.stdout == "[rank 0] zero only\n"


@pytest.mark.timeout(60)
def test_status_table(magic: Kernel) -> None:
    cell = run(magic, "%ranks status")
    assert cell.result is not None
    header, *rows = [line.split() for line in cell.result.splitlines()]
    assert header == ["rank", "pid", "device", "GPU", "memory", "state"]
    pids = magic.value("rank_pids()")
    assert rows == [["0", str(pids[0]), "cpu", "-", "idle"],
                    ["1", str(pids[1]), "cpu", "-", "idle"]]
    run(magic, "%%ranks\nimport os\npid = os.getpid()")
    assert magic.value("%ranks pull pid") == pids
    html = [m["content"]["data"].get("text/html", "") for m in cell.messages
            if m["msg_type"] == "execute_result"]
    assert html and "<th>GPU memory</th>" in html[0] and f"<td>{pids[1]}</td>" in html[0]


@pytest.mark.timeout(60)
def test_exception_on_one_rank_in_a_cell(magic: Kernel) -> None:
    run(magic, "%%ranks\nimport ranks, time\nkept = 'state'")
    cell = fails(magic, """
        %%ranks
        print(f"before on {ranks.current().rank}", flush=True)
        time.sleep(0.3)  # rank 0 prints before rank 1's error stops it, however loaded
        if ranks.current().rank == 1: raise ValueError("bad rank")
    """)
    assert cell.error["ename"] == "ValueError" and cell.error["evalue"] == "bad rank"
    assert "raised on rank 1 (pid" in cell.traceback
    assert 'if ranks.current().rank == 1: raise ValueError("bad rank")' in cell.traceback
    assert "[rank 0] before on 0" in cell.stdout and "[rank 1] before on 1" in cell.stdout
    after = run(magic, "%%ranks\nprint(kept)")
    assert sorted(after.stdout.splitlines()) == ["[rank 0] state", "[rank 1] state"]


@pytest.mark.timeout(60)
def test_timeout_stops_the_cell_and_keeps_the_world(magic: Kernel) -> None:
    run(magic, "%%ranks\nimport time\nkept = 'state'")
    cell = fails(magic, "%%ranks --timeout 1\ntime.sleep(30)")
    assert cell.error["ename"] == "RanksTimeout", cell.traceback
    # Where the ranks were (both in the same line: once): the cell, by the name the ranks
    # compiled it under.
    assert "--- ranks 0-1 ---" in cell.error["evalue"] and "<ranks-cell-" in cell.error["evalue"]
    assert cell.seconds < 1 + RESPONSIVE_WITHIN + 0.5, cell.seconds
    after = run(magic, "%%ranks\nprint(kept)")
    assert sorted(after.stdout.splitlines()) == ["[rank 0] state", "[rank 1] state"]


@pytest.mark.torch
@pytest.mark.timeout(60)
def test_torch_dist_magic_keeps_the_group(nb: Kernel) -> None:
    run(nb, "%ranks start -n 2 --torch-dist", timeout=60)
    try:
        run(nb, """
            %%ranks
            import torch, torch.distributed as dist
            group = id(dist.group.WORLD)
            t = torch.ones(1)
            dist.all_reduce(t)
            print(t.item())
        """)
        cell = run(nb, """
            %%ranks
            t = torch.ones(1) * 2
            dist.all_reduce(t)
            print(t.item(), id(dist.group.WORLD) == group)
        """)
        assert sorted(cell.stdout.splitlines()) == ["[rank 0] 4.0 True", "[rank 1] 4.0 True"]
    finally:
        nb.execute("%ranks stop")


@pytest.mark.timeout(90)
def test_dead_rank_then_restart(nb: Kernel) -> None:
    run(nb, "%ranks start -n 2")
    try:
        run(nb, "%%ranks\nimport os, ranks, time\nx = 1")
        run(nb, "y = 2")
        old = nb.value("rank_pids()")
        crashed = fails(nb, """
            %%ranks
            if ranks.current().rank == 1: os._exit(3)
            time.sleep(30)
        """)
        assert crashed.error["ename"] == "RankCrashed" and crashed.seconds < 5
        assert "this World is broken" in crashed.traceback
        for call in ("%%ranks\nprint(x)", "%ranks push y", "%ranks pull x"):
            refused = fails(nb, call)
            assert refused.error["ename"] == "WorldBroken", (call, refused.traceback)
            assert "%ranks restart" in refused.error["evalue"]
            assert refused.seconds < REFUSES_WITHIN, (call, refused.seconds)
        status = run(nb, "%ranks status").result or ""
        assert [line.split()[-1] for line in status.splitlines()[1:]] == ["dead", "dead"]
        run(nb, "%ranks restart")
        new = nb.value("rank_pids()")
        assert not set(new) & set(old)
        fresh = fails(nb, "%%ranks\nprint(x)")  # a new World: new namespaces
        assert fresh.error["ename"] == "NameError"
        cell = run(nb, "%%ranks\nimport ranks\nprint(ranks.current().rank)")
        assert sorted(cell.stdout.splitlines()) == ["[rank 0] 0", "[rank 1] 1"]
        assert nb.value(f"gone({old})") == [True, True]
    finally:
        nb.execute("%ranks stop")


@pytest.mark.timeout(60)
def test_bad_usage_is_explained(nb: Kernel) -> None:
    def error_of(code: str) -> tuple[str, str]:
        cell = fails(nb, code)
        assert cell.error is not None
        return cell.error["ename"], cell.error["evalue"]

    assert error_of("%ranks status")[1].startswith("no ranks are running: `%ranks start -n 2`")
    assert "no ranks are running" in error_of("%%ranks\npass")[1]
    name, text = error_of("%ranks frobnicate")
    assert name == "RanksError" and "unknown %ranks command 'frobnicate'" in text
    assert "start, push, pull, status, stacks, debug, on, off, restart or stop" in text
    assert error_of("%ranks")[1].startswith(
        "usage: %ranks start|push|pull|status|stacks|debug|on|off|restart|stop")
    name, text = error_of("%ranks start -n two")
    assert name == "RanksError" and "%ranks start: argument -n: invalid int value" in text
    run(nb, "%ranks start -n 2")
    try:
        name, text = error_of("%ranks start -n 2")
        assert name == "RanksError" and "already running" in text and "%ranks stop" in text
        name, text = error_of("%ranks pull never_defined")
        # Either rank may report first: the error names the rank it came from.
        assert name == "NameError"
        assert re.fullmatch(r"name 'never_defined' is not defined on rank [01]", text), text
        name, text = error_of("%ranks push never_defined")
        assert name == "NameError" and "never_defined" in text
        assert "usage: %ranks push NAME" in error_of("%ranks push")[1]
        assert "ranks [5] are not all in 0..1" in error_of("%%ranks --rank 5\npass")[1]
        assert "%%ranks: unrecognized arguments: --frob" in error_of("%%ranks --frob\npass")[1]
        assert "takes no arguments" in error_of("%ranks restart -n 3")[1]
        run(nb, "%%ranks\npass")  # none of it harmed the World
    finally:
        nb.execute("%ranks stop")
    run(nb, "%ranks stop")  # stopping twice is fine


# --- interrupts and the kernel's end (a kernel of the test's own) ---------------------------


def _prepare(kernel: Kernel) -> None:
    run(kernel, HELPERS)
    nothing = fails(kernel, "%ranks restart")
    assert nothing.error is not None and "nothing to restart" in nothing.error["evalue"]
    run(kernel, "%ranks start -n 2")
    run(kernel, "%%ranks\nimport signal, time\nkept = 'state'")


@pytest.mark.timeout(60)
def test_an_interrupt_without_a_signal_stops_the_call(nb: Kernel) -> None:
    """ipykernel on Windows interrupts by _thread.interrupt_main(), which wakes no wait:
    the call still ends with KeyboardInterrupt in about a second, and the World is usable."""
    run(nb, "iw = ranks.World(n=2)")
    try:
        cell = fails(nb, """
            import _thread, threading
            threading.Timer(1.0, _thread.interrupt_main).start()
            iw.exec("import time; time.sleep(30)")
        """)
        assert cell.error["ename"] == "KeyboardInterrupt", cell.traceback
        assert cell.seconds < 1 + RESPONSIVE_WITHIN + 0.5, cell.seconds
        assert nb.value("iw.run(lambda: 1)") == [1, 1]
    finally:
        run(nb, "iw.close()")


@pytest.mark.timeout(90)
def test_interrupt_stops_the_ranks_code_and_keeps_their_state(fresh_kernel: Kernel) -> None:
    _prepare(fresh_kernel)
    pids = fresh_kernel.value("rank_pids()")
    cell = interrupted(fresh_kernel, """
        %%ranks
        print("looping", flush=True)
        while True:
            time.sleep(0.05)
    """, wait_for="looping", within=RESPONSIVE_WITHIN)
    assert "did not stop in time" not in cell.traceback
    after = run(fresh_kernel, "%%ranks\nprint(kept)")
    assert sorted(after.stdout.splitlines()) == ["[rank 0] state", "[rank 1] state"]
    assert fresh_kernel.value("rank_pids()") == pids

    # The same through World.run: the interrupt reaches the function, the World carries on.
    run(fresh_kernel, "w = ranks.World(n=2)\nw.push(kept='run state')\nw_pids = w.run(os.getpid)")
    interrupted(fresh_kernel, """
        def loop():
            print("running", flush=True)
            while True:
                time.sleep(0.05)

        w.run(loop)
    """, wait_for="running", within=RESPONSIVE_WITHIN)
    assert fresh_kernel.value("w.pull('kept'), w.run(os.getpid) == w_pids, 6 * 7") == (
        ["run state", "run state"], True, 42
    )
    run(fresh_kernel, "w.close()\n%ranks stop")


@pytest.mark.timeout(90)
def test_interrupt_kills_ranks_that_ignore_it_and_breaks_the_world(
    fresh_kernel: Kernel,
) -> None:
    _prepare(fresh_kernel)
    pids = fresh_kernel.value("rank_pids()")
    cell = interrupted(fresh_kernel, """
        %%ranks
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("deaf", flush=True)
        while True:
            time.sleep(0.05)
    """, wait_for="deaf", within=UNRESPONSIVE_WITHIN)
    assert "did not stop in time and were killed" in cell.traceback
    assert "this World is broken" in cell.traceback
    assert fresh_kernel.value("gone(rank_pids()), 6 * 7") == ([True, True], 42)
    refused = fails(fresh_kernel, "%%ranks\nprint(kept)")
    assert refused.error is not None and refused.error["ename"] == "WorldBroken"
    run(fresh_kernel, "%ranks restart")
    cell = run(fresh_kernel, "%%ranks\nimport ranks\nprint(ranks.current().rank)")
    assert sorted(cell.stdout.splitlines()) == ["[rank 0] 0", "[rank 1] 1"]
    assert not set(fresh_kernel.value("rank_pids()")) & set(pids)

    # World.run with a function that ignores the interrupt: killed, broken, kernel fine.
    run(fresh_kernel, "w = ranks.World(n=2)\nw_pids = w.run(os.getpid)")
    interrupted(fresh_kernel, """
        def deaf():
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("deaf", flush=True)
            while True:
                time.sleep(0.05)

        w.run(deaf)
    """, wait_for="deaf", within=UNRESPONSIVE_WITHIN)
    assert fresh_kernel.value("repr(w), gone(w_pids)") == (
        "<ranks.World of 2 ranks, broken>", [True, True]
    )
    run(fresh_kernel, "w.close()\n%ranks stop")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("end", ["shutdown", "restart"])
def test_kernel_end_leaves_no_rank_behind(fresh_kernel: Kernel, tmp_path: Path, end: str) -> None:
    """A World of the API and one of the magics, both open when the kernel ends."""
    _prepare(fresh_kernel)
    pid_file = tmp_path / "pids.txt"
    run(fresh_kernel, f"""
        w = ranks.World(n=2)
        open({str(pid_file)!r}, "w").write(repr(w.run(os.getpid) + rank_pids()))
    """)
    pids = ast.literal_eval(pid_file.read_text())
    assert len(set(pids)) == 4
    if WINDOWS_KERNEL:
        assert len(rank_processes()) == 4
    else:
        assert all(psutil.pid_exists(p) for p in pids)
    if end == "shutdown":
        fresh_kernel.shutdown()  # a clean shutdown: the kernel runs its exit handlers
    else:
        # A restart kills the kernel (SIGKILL): no exit handler runs in it.
        fresh_kernel.manager.restart_kernel(now=True)
        KERNEL_PIDS.add(fresh_kernel.pid)
    deadline = time.monotonic() + 10
    if WINDOWS_KERNEL:  # pids of Windows under Wine: look for the processes themselves
        while rank_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert rank_processes() == []
        return
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if _running(p)] == []
    if end == "restart":
        # What the killed kernel left in /dev/shm goes with the next start (the leak check
        # of this test looks).
        run(fresh_kernel, "import ranks\nranks.run(abs, args=(1,), n=1)")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
