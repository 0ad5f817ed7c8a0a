"""Failure paths: the crash table (WHERE a rank fails x HOW), and bad input refused early.

Each crash case checks the exact type the caller gets, its fields, that it arrived well
inside the escalation budget (SIGINT 1 s + SIGTERM 1 s + SIGKILL 5 s), and, through the
autouse leak check, that no rank process is left. The table runs in-process (``ranks.run``
called from pytest: the same code path as in a notebook); a representative subset runs
again in a real kernel. ``crashes.py`` holds the failing code the ranks import.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import crashes
import psutil
import pytest
from kernel import Kernel
from processes import gone_within

import ranks
from ranks._placement import plan_ranks, visible_gpus

TESTS = str(Path(__file__).resolve().parent)
# Every test here runs once per start method (conftest.py): a rank fails the same way
# whichever way it was started.
START_METHODS = ("template", "spawn", "portable")
# A failure must reach the caller this fast: a peer blocked in Gloo needs the 1 s SIGINT
# grace before SIGTERM; the rest is slack for a loaded 2-core CI machine. The escalation
# budget, for comparison, is 7 s.
ARRIVES_WITHIN = 3.0



def _marks(where: str) -> list[pytest.MarkDecorator]:
    """The collective row fails inside a Gloo all_reduce: it needs torch."""
    return [pytest.mark.torch] if where == "collective" else []


CASES = [
    pytest.param(where, how, id=f"{where}-{how}", marks=_marks(where))
    for where, how in [*((w, h) for w in crashes.WHERES for h in crashes.HOWS),
                       ("kernel", "raise")]
]


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check(facts: dict[str, Any], where: str, how: str) -> None:
    """What the caller must have got when rank 1 failed ``how`` at ``where``."""
    if where == "kernel":
        assert facts["type"] == _name(crashes.Boom), facts
        assert any("while unpickling the result of rank 0 in the kernel" in note
                   for note in facts["notes"]), facts
        assert facts["since_start"] < 10, facts
        return
    if how == "hang":
        timeout = crashes.case(where, how)[2]["timeout"]
        assert facts["type"] == _name(ranks.RanksTimeout), facts
        assert sorted(facts["stacks"]) == [0, 1], facts
        # Where each rank was stuck: rank 1 in fail(), rank 0 waiting for it.
        assert "crashes.py" in facts["stacks"][1] and "in fail" in facts["stacks"][1], facts
        waiting_in = "all_reduce" if where == "collective" else "in wait"
        assert waiting_in in facts["stacks"][0], facts
        assert timeout <= facts["since_start"] < timeout + ARRIVES_WITHIN, facts
        return
    assert facts["failing_pid"] is not None, facts
    assert facts["since_fired"] < ARRIVES_WITHIN, facts
    notes = "\n".join(facts["notes"])
    assert "rank 0:" in notes, facts  # the stopped peer is summarised, not the cause
    if how == "raise":
        assert facts["type"] == _name(crashes.Boom), facts
        assert facts["message"] == "boom on rank 1", facts
        assert f"on rank 1 (pid {facts['failing_pid']}, cpu)" in notes, facts
        assert 'raise Boom(f"boom on rank' in facts["cause"], facts  # the rank's source line
        return
    assert facts["type"] == _name(ranks.RankCrashed), facts
    assert facts["rank"] == 1 and facts["pid"] == facts["failing_pid"], facts
    last_lines = "\n".join(facts["last_lines"])
    assert f"rank 1 is about to {how}" in last_lines, facts
    if how in crashes.EXIT_CODES:
        assert facts["exitcode"] == crashes.EXIT_CODES[how], facts
        assert facts["signal_name"] is None, facts
    elif facts["platform"] == "win32":  # no signals: NTSTATUS codes, TerminateProcess's
        if how == "segfault":
            assert facts["exitcode"] == 0xC0000005, facts
            assert "crashed with 0xc0000005, an access violation" in facts["message"], facts
            assert "Windows fatal exception: access violation" in last_lines, facts
        else:
            assert facts["exitcode"] == 9, facts
        assert facts["signal_name"] is None, facts
    elif how == "segfault":
        assert facts["exitcode"] == -signal.SIGSEGV and facts["signal_name"] == "SIGSEGV", facts
        assert "Segmentation fault" in last_lines, facts  # the rank's fault handler
    else:
        assert facts["exitcode"] == -signal.SIGKILL and facts["signal_name"] == "SIGKILL", facts
    # ranks.run's World is its own: the user has none to restart, so nothing says so.
    assert "World is broken" not in notes, facts


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "how"), CASES)
def test_crash_table(where: str, how: str, tmp_path: Path) -> None:
    fn, args, options = crashes.case(where, how)
    started = time.time()
    with pytest.raises(BaseException) as caught:  # its exact type is checked below
        ranks.run(fn, args, n=2, env={"CRASH_DIR": str(tmp_path)}, **options)
    arrived = time.time()
    check(crashes.facts(caught.value, started, arrived, str(tmp_path)), where, how)


# The subset that runs in a real kernel: one of each HOW, each WHERE at least once.
KERNEL_CASES = [
    pytest.param(where, how, id=f"{where}-{how}", marks=_marks(where))
    for where, how in [
        ("run", "raise"), ("collective", "raise"), ("load", "sys.exit"), ("run", "os._exit"),
        ("dump", "segfault"), ("run", "sigkill"), ("run", "hang"), ("kernel", "raise"),
    ]
]


@pytest.fixture(scope="module")
def crash_kernel(kernel: Kernel) -> Kernel:
    kernel.ok(f"import sys, time\nsys.path.insert(0, {TESTS!r})\nimport crashes")
    return kernel


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("where", "how"), KERNEL_CASES)
def test_crash_table_in_kernel(crash_kernel: Kernel, where: str, how: str,
                               tmp_path: Path) -> None:
    crash_kernel.ok(f"""
fn, args, options = crashes.case({where!r}, {how!r})
started = time.time()
try:
    ranks.run(fn, args, n=2, env={{"CRASH_DIR": {str(tmp_path)!r}}}, **options)
except BaseException as error:
    facts = crashes.facts(error, started, time.time(), {str(tmp_path)!r})
else:
    facts = None
""")
    facts = crash_kernel.value("facts")
    assert facts is not None, "ranks.run returned"
    check(facts, where, how)


@pytest.mark.timeout(60)
def test_notebook_traceback_shows_the_cell(crash_kernel: Kernel) -> None:
    """Uncaught in a cell: the user's type, the rank's traceback with the notebook's own
    lines, and the note naming rank, pid and device."""
    crash_kernel.ok("""
import os
def train(step):
    if os.environ["RANK"] == "1":
        raise KeyError(f"no batch {step} on this rank")  # the line the user must see
    return step
""")
    cell = crash_kernel.execute("ranks.run(train, args=(7,), n=2)")
    assert cell.error is not None and cell.error["ename"] == "KeyError", cell.traceback
    text = cell.traceback
    assert 'raise KeyError(f"no batch {step} on this rank")  # the line the user must see' in text
    assert "in train" in text
    assert "ranks: raised on rank 1 (pid " in text and ", cpu)" in text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owner", ["failing", "waiting"])
@pytest.mark.parametrize("how", ["raise", "os._exit"])
def test_children_of_ranks_die_too(owner: str, how: str, tmp_path: Path) -> None:
    """A process a rank started (a DataLoader worker, a `sleep`) dies with the call."""
    def work(folder: str, owner_rank: int, how: str) -> None:
        import os
        import subprocess
        import time
        from pathlib import Path

        rank = int(os.environ["RANK"])
        child = Path(folder, "child")
        if rank == owner_rank:
            sleeper = subprocess.Popen(["sleep", "600"])
            Path(folder, "child.tmp").write_text(str(sleeper.pid))
            Path(folder, "child.tmp").rename(child)
        while not child.exists():
            time.sleep(0.01)
        if rank == 1:
            if how == "raise":
                raise RuntimeError("failing with a child around")
            os._exit(4)
        time.sleep(60)

    owner_rank = 1 if owner == "failing" else 0
    expected = RuntimeError if how == "raise" else ranks.RankCrashed
    with pytest.raises(expected):
        ranks.run(work, (str(tmp_path), owner_rank, how), n=2)
    child = int((tmp_path / "child").read_text())
    assert not gone_within([child], 2.0), f"the rank's child {child} outlived the call"


# --- bad input: refused before any process starts --------------------------------------


LOCK = threading.Lock()


def _by_value_function_using_lock() -> Any:
    """A notebook-style function (module ``__main__``, so cloudpickle sends it by value)
    that uses a global lock: the lock would have to travel with it."""
    namespace: dict[str, Any] = {"__name__": "__main__", "LOCK": threading.Lock()}
    exec("def work():\n    with LOCK:\n        return 1\n", namespace)
    return namespace["work"]


BAD_CALLS = {
    "n=0": (dict(fn=abs, n=0), ValueError, ["n must be at least 1", "n=0"]),
    "n=-3": (dict(fn=abs, n=-3), ValueError, ["n must be at least 1"]),
    "n=str": (dict(fn=abs, n="2"), TypeError, ["n must be an int"]),
    "unknown-gpu": (dict(fn=abs, gpus=[len(visible_gpus())]), ValueError,
                    ["no GPU", "visible GPUs"]),
    "repeated-gpu": (dict(fn=abs, gpus=[0, 0]), ValueError, ["repeats [0]", "its own GPU"]),
    "not-callable": (dict(fn=42, n=2), TypeError, ["fn must be callable", "int"]),
    "args-unpicklable": (dict(fn=abs, args=(LOCK,), n=2), TypeError,
                         ["args[0]", "lock", "inside the function"]),
    "kwargs-unpicklable": (dict(fn=abs, kwargs={"x": LOCK}, n=2), TypeError,
                           ["kwargs['x']", "lock"]),
    "global-unpicklable": (dict(fn=_by_value_function_using_lock(), n=2), TypeError,
                           ["global 'LOCK' used by work", "lock"]),
    "timeout": (dict(fn=abs, n=2, timeout=-1), ValueError, ["timeout must be a positive"]),
    "output": (dict(fn=abs, n=2, output="rank1"), ValueError, ["output must be"]),
    "env": (dict(fn=abs, n=2, env={"RANK": "3"}), ValueError, ["may not set RANK"]),
}
if not visible_gpus():
    BAD_CALLS["no-n-no-gpu"] = (dict(fn=abs), ValueError, ["no GPU is visible", "n="])


@pytest.mark.timeout(10)
@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_refused_before_any_process(name: str) -> None:
    call, expected, words = BAD_CALLS[name]
    me = psutil.Process()
    children_before = len(me.children(recursive=True))
    cpu_before = me.cpu_times()
    started = time.monotonic()
    with pytest.raises(expected) as caught:
        ranks.run(**call)
    elapsed = time.monotonic() - started
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    # No rank was started: none is running, and none came and went (a reaped child adds
    # its CPU time to ours; a Python start-up costs tens of milliseconds of it).
    cpu_after = me.cpu_times()
    assert len(me.children(recursive=True)) == children_before
    assert (cpu_after.children_user, cpu_after.children_system) == (
        cpu_before.children_user, cpu_before.children_system)
    assert elapsed < 1.0, elapsed


PLANS = {
    "more-ranks-than-gpus": ((3, None, ["0", "1"]), ["n=3 ranks but only 2 GPU(s)", "gpus=[]"]),
    "unknown-gpu": ((None, [2], ["0", "1"]), ["no GPU [2] here", "visible GPUs: 0..1"]),
    "negative-gpu": ((None, [-1], ["0", "1"]), ["no GPU [-1] here"]),
    "repeated-gpu": ((None, [1, 1], ["0", "1", "2"]), ["repeats [1]"]),
    "n-and-gpus-disagree": ((3, [0, 1], ["0", "1"]), ["n=3 does not match", "only one"]),
    "nothing-visible": ((None, None, []), ["no GPU is visible", "n="]),
    "gpu-not-int": ((None, [0.0], ["0"]), ["gpus must hold ints"]),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_plan_ranks_refuses(name: str) -> None:
    (n, gpus, visible), words = PLANS[name]
    with pytest.raises((ValueError, TypeError)) as caught:
        plan_ranks(n, gpus, visible)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))


def test_plan_ranks_accepts() -> None:
    """The refusals above are not all the planner does: good requests get placed."""
    specs = plan_ranks(None, [3, 1], ["0", "1", "2", "3"])
    assert [(s.rank, s.world_size, s.gpu) for s in specs] == [(0, 2, 3), (1, 2, 1)]
    assert [s.gpu for s in plan_ranks(None, None, ["0", "1"])] == [0, 1]
    assert [s.gpu for s in plan_ranks(2, [], ["0"])] == [None, None]


@pytest.mark.timeout(60)
def test_bad_input_refused_in_kernel(kernel: Kernel) -> None:
    """The notebook shape of it: a cell's global lock captured by the function."""
    kernel.ok("import psutil, threading\nlock = threading.Lock()\n"
              "def work():\n    with lock:\n        return 1\n"
              "children = len(psutil.Process().children(recursive=True))")
    cell = kernel.execute("ranks.run(work, n=2)")
    assert cell.error is not None and cell.error["ename"] == "TypeError", cell.traceback
    assert "global 'lock' used by work" in cell.error["evalue"], cell.error["evalue"]
    assert kernel.value("len(psutil.Process().children(recursive=True)) == children") is True
    cell = kernel.execute("ranks.run(work, n=2, gpus=[0, 0])")
    assert cell.error is not None and cell.error["ename"] == "ValueError", cell.traceback


def test_crash_helpers_fail_for_real(tmp_path: Path) -> None:
    """The table's failing code really fails when run by hand (so a pass is not vacuous)."""
    os.environ["CRASH_DIR"], os.environ["RANK"] = str(tmp_path), "1"
    try:
        with pytest.raises(crashes.Boom):
            crashes.fail_on_rank("raise")
        with pytest.raises(SystemExit):
            crashes.fail("sys.exit")
    finally:
        del os.environ["CRASH_DIR"], os.environ["RANK"]
