"""Identical lines of several ranks shown once, labelled with all of them, in a real kernel
and in a plain script; the rank logs keep every line; ``RANKS_GROUP_OUTPUT=0`` turns it off.

The suite turns grouping off for every other test (conftest.py): whether lines meet in the
window depends on timing. Here the ranks print at one agreed moment (``time.time()`` is
the same clock on every rank of one machine), well inside the window of each other; on a
loaded machine one rank may still miss it, so the kernel and script tests check that the
line is shown once per group of ranks that met, with every rank accounted for. The exact
labels and the order rules are checked on the router itself, where timing plays no part.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kernel import Kernel

from ranks._output import OutputRouter, TerminalSink

PRINTS = """
    import os, time, ranks

    def in_step(at):
        import sys, time
        rank = ranks.current().rank
        time.sleep(max(0.0, at - time.time()))
        print("epoch 3 done")
        print(f"loss of rank {rank}")
        if rank % 2 == 0:
            print("even ranks only")
        print("warned", file=sys.stderr)
        if rank == 0:
            print("rank 0 alone, before a pause")
            sys.stdout.flush()
            time.sleep(2)
        return rank
"""


LABEL = re.compile(r"^\[ranks? ([0-9, -]+)\] (.*)$")


def ranks_of(label: str) -> list[int]:
    """``0-3, 6`` -> [0, 1, 2, 3, 6]."""
    found = []
    for part in label.split(", "):
        first, _, last = part.partition("-")
        found += range(int(first), int(last or first) + 1)
    return found


def grouped(lines: list[str], text: str) -> list[list[int]]:
    """The rank lists of the lines that show ``text``, in order."""
    return [ranks_of(m.group(1)) for m in map(LABEL.match, lines) if m and m.group(2) == text]


def shown_once_per_rank(lines: list[str], text: str, expected: list[int]) -> None:
    groups = grouped(lines, text)
    assert sorted(r for group in groups for r in group) == expected, lines
    assert any(len(group) > 1 for group in groups), lines  # met within the window


def test_router_labels_groups_and_keeps_each_ranks_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANKS_GROUP_OUTPUT", "1")
    router = OutputRouter(str(tmp_path), TerminalSink)
    router.begin_call(lambda rank: True)
    for rank in range(8):
        own = f"loss of rank {rank}\n" if rank != 5 else ""
        even = "even ranks only\n" if rank % 2 == 0 else ""
        router.feed(rank, "stdout", f"{own}epoch 3 done\n{even}".encode())
    router.feed(3, "stdout", b"a\nb\n")
    router.feed(4, "stdout", b"b\na\n")  # the same lines in another order: each its own
    router.end_call()
    router.close()
    out = capsys.readouterr().out.splitlines()
    assert out.count("[ranks 0-7] epoch 3 done") == 1, out
    assert "[ranks 0, 2, 4, 6] even ranks only" in out, out
    assert out.index("[rank 4] loss of rank 4") < out.index("[ranks 0-7] epoch 3 done")
    assert out.index("[ranks 0-7] epoch 3 done") < out.index("[ranks 0, 2, 4, 6] even ranks only")
    assert [line for line in out if line.endswith(("] a", "] b"))] in (
        ["[rank 3] a", "[ranks 3-4] b", "[rank 4] a"],
        ["[rank 4] b", "[ranks 3-4] a", "[rank 3] b"])
    for rank in (3, 4):  # each rank's own order holds
        mine = [line for line in out if line.endswith(("] a", "] b"))
                and str(rank) in line.split("]")[0]]
        assert [line[-1] for line in mine] == (["a", "b"] if rank == 3 else ["b", "a"])
    assert Path(router.log_path(7)).read_text() == "loss of rank 7\nepoch 3 done\n"


@pytest.mark.timeout(90)
def test_identical_lines_of_four_ranks_are_shown_once(kernel: Kernel) -> None:
    kernel.ok(textwrap.dedent(PRINTS))
    shown = kernel.ok(textwrap.dedent("""
        os.environ["RANKS_GROUP_OUTPUT"] = "1"
        try:
            with ranks.World(n=4) as w:
                w.run(in_step, (time.time() + 3,))
                logs = [open(w.log_path(r)).read() for r in range(4)]
        finally:
            os.environ["RANKS_GROUP_OUTPUT"] = "0"
    """), timeout=60)
    out, err = shown.stdout.splitlines(), shown.stderr.splitlines()
    shown_once_per_rank(out, "epoch 3 done", [0, 1, 2, 3])
    assert grouped(out, "even ranks only") in ([[0, 2]], [[0], [2]], [[2], [0]]), out
    for rank in range(4):  # lines that differ keep their own labels
        assert f"[rank {rank}] loss of rank {rank}" in out, out
    shown_once_per_rank(err, "warned", [0, 1, 2, 3])  # per stream
    # A line no other rank prints is held for the window only, not until the call ends.
    arrived = {}
    for msg in shown.messages:
        if msg["msg_type"] == "stream" and "rank 0 alone" in msg["content"]["text"]:
            arrived["alone"] = msg["arrived"]
    assert shown.messages[-1]["arrived"] - arrived["alone"] > 1.5
    logs = kernel.value("logs")
    for rank in range(4):  # the logs keep every rank's every line
        assert logs[rank].count("epoch 3 done\n") == 1
        assert logs[rank].count("warned\n") == 1
        assert logs[rank].count("even ranks only\n") == (rank % 2 == 0)


@pytest.mark.timeout(90)
def test_switched_off_every_rank_keeps_its_own_line(kernel: Kernel) -> None:
    kernel.ok(textwrap.dedent(PRINTS))
    shown = kernel.ok(textwrap.dedent("""
        os.environ["RANKS_GROUP_OUTPUT"] = "0"
        ranks.run(in_step, (time.time() + 3,), n=4)
    """), timeout=60)
    out = shown.stdout.splitlines()
    assert sorted(line for line in out if "epoch 3 done" in line) == [
        f"[rank {rank}] epoch 3 done" for rank in range(4)]
    assert not [line for line in out if line.startswith("[ranks ")], out


SCRIPT = PRINTS + """
    def bar():
        import time
        from tqdm import tqdm
        for _ in tqdm(range(50), mininterval=0):
            time.sleep(0.005)

    if __name__ == "__main__":
        ranks.run(in_step, (time.time() + 3,), n=4)
        ranks.run(bar, n=2)
"""


@pytest.mark.timeout(60)
def test_plain_script_groups_lines_in_the_terminal(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "RANKS_GROUP_OUTPUT": "1"}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=50, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    out, err = done.stdout.splitlines(), done.stderr.splitlines()
    shown_once_per_rank(out, "epoch 3 done", [0, 1, 2, 3])
    assert "[rank 3] loss of rank 3" in out
    # Progress bars are each rank's own, as before.
    for rank in (0, 1):
        bar = [line for line in err if line.startswith(f"[rank {rank}] ") and "50/50" in line]
        assert bar, err
