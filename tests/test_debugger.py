"""pdb on the ranks, in the calling cell, driven through a real kernel's stdin channel.

``breakpoint()`` on a rank makes the kernel send an input_request whose prompt names the
rank; the test answers as a user typing in the cell's input box would
(``Kernel.converse``), and checks what the cell showed. Also: two ranks at breakpoints
served one at a time, the stop button during a session, post-mortem with ``%ranks debug``
and ``World.debug``, a client that cannot answer (``allow_stdin=False``, as nbclient), a
script without a terminal (it goes on, saying so), and one in a terminal (a pseudo-terminal
here, with the lines typed ahead).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kernel import Cell, Kernel

PROMPT = "[rank {}] (Pdb) "

WORK = """
    import os, ranks
    def work():
        x = 40 + ranks.current().rank
        if ranks.current().rank in stops:
            breakpoint()
        y = x + 1
        print("y is", y)
        return y
"""


def converse(kernel: Kernel, code: str, lines: list[str | None], timeout: float = 60) -> Cell:
    return kernel.converse(textwrap.dedent(code), lines, timeout)


def shown_lines(cell: Cell) -> list[str]:
    return cell.stdout.splitlines()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["template", "portable"])
def test_breakpoint_on_rank_1_is_driven_from_the_cell(kernel: Kernel, start_method: str) -> None:
    cell = converse(kernel, WORK + f"""
    stops = {{1}}
    os.environ["RANKS_START_METHOD"] = {start_method!r}
    try:
        result = ranks.run(work, n=2)
    finally:
        del os.environ["RANKS_START_METHOD"]
    result
    """, ["p x", "n", "p y", "c"])
    assert cell.error is None, cell.traceback
    assert cell.result == "[41, 42]"
    assert cell.prompts == [PROMPT.format(1)] * 4
    out = shown_lines(cell)
    # pdb's own output is the rank's: labelled, in order, the listing before each prompt.
    rank1 = [line for line in out if line.startswith("[rank 1] ")]
    assert rank1[1] == "[rank 1] -> y = x + 1", rank1
    assert rank1[2:] == [
        "[rank 1] 41",  # p x
        rank1[3],  # n: where it stopped
        '[rank 1] -> print("y is", y)',
        "[rank 1] 42",  # p y
        "[rank 1] y is 42",  # c
    ], rank1
    assert "[rank 0] y is 41" in out  # the other rank ran on
    assert "(Pdb)" not in cell.stdout + cell.stderr  # the prompt is the input box's alone


@pytest.mark.timeout(90)
def test_two_ranks_at_breakpoints_are_served_one_at_a_time(kernel: Kernel) -> None:
    cell = converse(kernel, WORK + """
    stops = {0, 1}
    ranks.run(work, n=2)
    """, ["p x", "n", "c", "p x", "c"])
    assert cell.error is None, cell.traceback
    assert cell.result == "[41, 42]"
    first = int(cell.prompts[0][len("[rank "):][0])
    second = 1 - first
    # The first rank's session (p x, n, c) runs to its end before the other rank is asked.
    assert cell.prompts == [PROMPT.format(first)] * 3 + [PROMPT.format(second)] * 2
    out = shown_lines(cell)
    assert f"[rank {first}] {40 + first}" in out
    assert f"[rank {second}] {40 + second}" in out
    assert out.index(f"[rank {first}] y is {41 + first}") < out.index(
        f"[rank {second}] {40 + second}")


@pytest.mark.timeout(120)
def test_a_peer_waits_in_its_gloo_collective_while_a_rank_is_in_pdb(kernel: Kernel) -> None:
    cell = converse(kernel, """
    import time, ranks
    def reduce():
        import torch
        import torch.distributed as dist
        rank = ranks.current().rank
        value = torch.tensor([rank + 1.0])
        if rank == 1:
            breakpoint()
        started = time.monotonic()
        dist.all_reduce(value)
        return value.item(), time.monotonic() - started
    ranks.run(reduce, n=2, torch_dist=True)
    """, ["p value", "!import time; time.sleep(3)", "c"], timeout=90)
    assert cell.error is None, cell.traceback
    assert cell.prompts == [PROMPT.format(1)] * 3
    assert "[rank 1] tensor([2.])" in shown_lines(cell)
    (sum0, waited0), (sum1, _) = eval(cell.result or "")
    assert sum0 == sum1 == 3.0
    assert waited0 > 2.5  # rank 0 sat in all_reduce throughout, and was not stopped


@pytest.mark.timeout(90)
def test_pdb_set_trace_in_a_ranks_cell_and_quit(kernel: Kernel) -> None:
    kernel.ok("%load_ext ranks")
    kernel.ok("%ranks start -n 2")
    try:
        cell = converse(kernel, """
        %%ranks --rank 1
        import pdb
        z = 7
        pdb.set_trace()
        z = 8
        """, ["p z * 6", "q"])
        assert cell.prompts == [PROMPT.format(1)] * 2
        assert "[rank 1] 42" in shown_lines(cell)
        # q raises BdbQuit on the rank and then in the kernel, where IPython ends the cell
        # quietly, as after q in pdb in the kernel itself.
        assert cell.error is None and "BdbQuit" not in cell.stderr, cell.traceback
        assert kernel.value("%ranks pull z --rank 1") == 7  # q stopped it before z = 8
    finally:
        kernel.ok("%ranks stop")


@pytest.mark.timeout(90)
def test_stop_button_during_a_pdb_session_interrupts_the_call(kernel: Kernel) -> None:
    cell = converse(kernel, WORK + """
    import time
    def wait_for_peer():
        if ranks.current().rank == 0:
            time.sleep(60)  # stands for a collective that waits on rank 1
        else:
            work()
    stops = {1}
    ranks.run(wait_for_peer, n=2)
    """, ["p x", None], timeout=60)
    assert cell.prompts == [PROMPT.format(1)] * 2
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.traceback
    assert cell.seconds < 30, cell.seconds


@pytest.mark.timeout(60)
def test_a_call_in_pdb_still_times_out(kernel: Kernel) -> None:
    cell = converse(kernel, WORK + """
    stops = {1}
    ranks.run(work, n=2, timeout=5)
    """, ["p x"], timeout=40)
    # Answered once, then nobody types: the timeout ends the wait for the next line.
    assert cell.error is not None and cell.error["ename"] == "RanksTimeout", cell.traceback
    assert cell.seconds < 25, cell.seconds


@pytest.mark.timeout(90)
def test_breakpoint_without_stdin_continues_with_a_note(kernel: Kernel) -> None:
    shown = kernel.execute(textwrap.dedent(WORK + """
    stops = {0, 1}
    def twice():
        work()
        return work()
    ranks.run(twice, n=2)
    """), timeout=60)  # allow_stdin=False: as nbclient runs a notebook
    assert shown.error is None, shown.traceback
    assert shown.result == "[41, 42]"
    notes = [line for line in shown.stderr.splitlines() if "nothing can answer" in line]
    assert len(notes) == 1, shown.stderr  # said once per call, not at every breakpoint
    assert notes[0].startswith(("[rank 0] ranks: pdb stopped here", "[rank 1] ranks: pdb"))
    assert "continuing as after `c`" in notes[0]


@pytest.mark.timeout(60)
def test_pythonbreakpoint_0_turns_breakpoints_off_on_the_ranks(kernel: Kernel) -> None:
    cell = converse(kernel, WORK + """
    stops = {0, 1}
    ranks.run(work, n=2, env={"PYTHONBREAKPOINT": "0"})
    """, [], timeout=40)
    assert cell.error is None, cell.traceback
    assert cell.result == "[41, 42]" and cell.prompts == []


@pytest.mark.timeout(60)
def test_script_without_a_terminal_continues_with_a_note(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(WORK + """
    stops = {1}
    if __name__ == "__main__":
        print("result", ranks.run(work, n=2))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          stdin=subprocess.PIPE, timeout=50, cwd=tmp_path, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "result [41, 42]"
    assert "[rank 1] ranks: pdb stopped here, but nothing can answer it" in done.stderr


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform == "win32", reason="a pseudo-terminal is POSIX")
def test_script_in_a_terminal_reads_pdb_lines_there(tmp_path: Path) -> None:
    import pty

    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(WORK + """
    stops = {1}
    if __name__ == "__main__":
        print("result", ranks.run(work, n=2))
    """))
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"p x * 2\nc\n")  # typed ahead: the terminal keeps the lines
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              stdin=terminal, timeout=50, cwd=tmp_path, env=os.environ)
    finally:
        os.close(controller)
        os.close(terminal)
    assert done.returncode == 0, done.stderr
    out = done.stdout.splitlines()
    assert out[-1].endswith("result [41, 42]"), out  # after the last prompt, on its line
    assert "[rank 1] 82" in done.stdout.replace(PROMPT.format(1), "\n").splitlines()
    assert done.stdout.count(PROMPT.format(1)) == 2
    assert "nothing can answer" not in done.stderr


FAILING = """
    def failing(scale):
        rank = ranks.current().rank
        total = 10 * scale + rank
        if rank == 1:
            raise ValueError(f"bad total {total}")
        return total
"""


@pytest.mark.timeout(120)
def test_post_mortem_with_ranks_debug_and_world_debug(kernel: Kernel) -> None:
    kernel.ok("%load_ext ranks")
    kernel.ok("%ranks start -n 2")
    try:
        kernel.ok("import ranks\n" + textwrap.dedent(FAILING))
        failed = kernel.execute("_world = __import__('ranks._magic')._magic._magics.world\n"
                                "_world.run(failing, (3,))")
        assert failed.error is not None and failed.error["ename"] == "ValueError"

        cell = converse(kernel, "%ranks debug", ["p total", "p scale", "q"])
        assert cell.error is None, cell.traceback
        assert cell.prompts == [PROMPT.format(1)] * 3
        out = shown_lines(cell)
        assert any(line.startswith("[rank 1] > ") and "failing()" in line for line in out), out
        assert "[rank 1] 31" in out and "[rank 1] 3" in out

        # World.debug: the same; a rank picked by hand.
        cell = converse(kernel, "_world.debug()", ["p total", "c"])
        assert cell.error is None, cell.traceback
        assert "[rank 1] 31" in shown_lines(cell)
        cell = converse(kernel, "%ranks debug --rank 0", [])
        assert cell.error is not None and cell.error["ename"] == "RuntimeError"
        assert "rank 0 has no failure to debug" in cell.error["evalue"]
        # Still there after a failed debug(), a failed pull (not the user's code) and a
        # call that went well.
        assert kernel.execute("%ranks pull not_there --rank 0").error is not None
        kernel.ok("_world.run(len, ('ok',))")
        cell = converse(kernel, "%ranks debug", ["p total", "q"])
        assert cell.prompts == [PROMPT.format(1)] * 2 and "[rank 1] 31" in shown_lines(cell)

        # A %%ranks cell that raised: its own frame, on the rank it raised on.
        failed = kernel.execute("%%ranks --rank 0\nlimit = 5\nassert limit > 9, 'too low'")
        assert failed.error is not None and failed.error["ename"] == "AssertionError"
        cell = converse(kernel, "%ranks debug", ["p limit", "q"])
        assert cell.prompts == [PROMPT.format(0)] * 2
        assert "[rank 0] 5" in shown_lines(cell), cell.stdout
    finally:
        kernel.ok("%ranks stop")


def test_world_debug_before_any_failure_says_so(kernel: Kernel) -> None:
    cell = kernel.execute("with ranks.World(n=1) as w:\n    w.debug()")
    assert cell.error is not None and cell.error["ename"] == "RanksError"
    assert "nothing to debug" in cell.error["evalue"]
