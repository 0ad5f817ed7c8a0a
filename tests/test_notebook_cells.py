"""``%%ranks`` cells see the notebook; magic lines take comments; ``%ranks on`` / ``off``.

All in one real kernel (the module's ``kernel`` fixture), as a notebook would run them:

* a name a cell reads that the rank lacks comes from the notebook: functions, lambdas,
  classes (instances pulled back are the notebook's class), modules, small values; a value
  over the limit fails with an error that names it, its size and ``%ranks push``;
* a name the rank defines stays the rank's; a notebook function runs in the rank's
  namespace (it sees the rank's ``model``); ``World.exec`` reads the caller's globals;
* ``# comment`` ends a magic line as it ends a Python line (``#`` in quotes stays);
* ``%ranks on`` sends every later cell's Python lines to the ranks, while its magic lines
  run in the kernel, until ``%ranks off``.

Each test uses names of its own: they share the kernel's namespace.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel import Kernel
from test_world import fails, run


@pytest.fixture
def magic(kernel: Kernel) -> Iterator[Kernel]:
    """The module's kernel with a World of 2 CPU ranks, started with a commented line."""
    run(kernel, """
        %load_ext ranks
        %ranks start -n 2          # two CPU ranks; --gpus 0,1 for GPUs
    """)
    yield kernel
    kernel.execute("%ranks stop")


# --- comments on magic lines ------------------------------------------------------------


def test_magic_lines_end_at_a_comment_as_python_lines_do(magic: Kernel) -> None:
    run(magic, "%%ranks --rank 1   # rank 1 only; --rank 0 would add rank 0\nnote = 'one'")
    run(magic, "notes = %ranks pull note --rank 1   # --rank 0 would fail: rank 0 has none")
    assert magic.value("notes") == "one"
    quoted = fails(magic, "%ranks pull 'a # b'   # the quoted '#' is part of the name")
    assert "name 'a # b' is not defined on rank" in quoted.error["evalue"]


def test_a_comment_does_not_lend_its_words_to_the_command(kernel: Kernel) -> None:
    run(kernel, "%load_ext ranks")
    # The README's line on a machine without GPUs: `-n 2` sits in the comment, so the
    # command is `start --torch-dist` alone, which needs GPUs.
    cell = fails(kernel, "%ranks start --torch-dist   # one rank per GPU; -n 2 for CPU ranks")
    assert "unrecognized arguments" not in cell.error["evalue"]
    assert "GPU" in cell.error["evalue"], cell.error["evalue"]


# --- %%ranks sees the notebook ------------------------------------------------------------


def test_cell_uses_notebook_functions_lambdas_and_modules(magic: Kernel) -> None:
    run(magic, """
        import math
        import json as codec
        square = lambda v: v * v
        def area(r):
            return math.pi * square(r)   # a helper and a module, both from the notebook
    """)
    cell = run(magic, """
        %%ranks
        print(round(area(ranks.current().rank + 1), 2), codec.dumps([1]))
    """)
    assert "[rank 0] 3.14 [1]" in cell.stdout
    assert "[rank 1] 12.57 [1]" in cell.stdout


def test_instances_pulled_back_are_of_the_notebooks_class(magic: Kernel) -> None:
    run(magic, """
        class Tally:
            def __init__(self):
                self.count = 0
            def add(self):
                self.count += ranks.current().rank + 1   # `ranks` is bound on every rank
                return self
    """)
    run(magic, "%%ranks\ntally = Tally().add().add()")
    run(magic, "tallies = %ranks pull tally")
    assert magic.value("[type(t) is Tally for t in tallies], [t.count for t in tallies]") == (
        [True, True], [2, 4])


def test_ranks_is_bound_on_the_rank_without_the_notebook(magic: Kernel) -> None:
    run(magic, "del ranks")  # the fixture's kernel imported it; a notebook may not have
    try:
        cell = run(magic, "%%ranks\nprint(ranks.current().world_size)")
        assert "[rank 0] 2" in cell.stdout
    finally:
        run(magic, "import ranks")


def test_a_notebook_function_runs_in_the_ranks_namespace(magic: Kernel) -> None:
    run(magic, """
        def describe():
            return f"{weights} on rank {ranks.current().rank}"   # `weights` lives on the ranks
    """)
    cell = run(magic, """
        %%ranks
        weights = [ranks.current().rank] * 2
        print(describe())
    """)
    assert "[rank 1] [1, 1] on rank 1" in cell.stdout


def test_the_ranks_own_names_win(magic: Kernel) -> None:
    run(magic, "threshold = 0.5")
    run(magic, "%%ranks\nseen_first = threshold\nthreshold = 0.9   # the rank's own now")
    run(magic, "threshold = 0.1")
    cell = run(magic, "%%ranks\nprint(seen_first, threshold)")
    assert "[rank 0] 0.5 0.9" in cell.stdout

    # A notebook function follows the notebook's latest definition, unless the rank
    # defined the name itself.
    run(magic, "def version():\n    return 1")
    run(magic, "%%ranks\nfirst = version()")
    run(magic, "def version():\n    return 2")
    run(magic, "%%ranks\nsecond = version()\ndef version():\n    return 'rank'")
    run(magic, "def version():\n    return 3")
    run(magic, "%%ranks\nthird = version()")
    assert magic.value("%ranks pull first --rank 0") == 1
    assert magic.value("%ranks pull second --rank 0") == 2
    assert magic.value("%ranks pull third --rank 0") == "rank"


def test_a_value_over_the_limit_says_what_to_do(magic: Kernel) -> None:
    run(magic, """
        import ranks._namespace
        big = bytes(ranks._namespace.MAX_VALUE_BYTES + 1)
        small = bytes(1000)
    """)
    cell = fails(magic, "%%ranks\nprint(len(small), len(big))")
    message = cell.error["evalue"]
    assert cell.error["ename"] == "NameError", cell.traceback
    assert "name 'big' is not defined on rank" in message
    assert "(bytes, over 1.0 MiB pickled)" in message
    assert "`%ranks push big`" in message and "pass it explicitly" in message
    assert "small" not in message
    run(magic, "%ranks push big")
    pushed = run(magic, "%%ranks\nprint(len(small), len(big))")
    assert f"[rank 1] 1000 {2**20 + 1}" in pushed.stdout
    # An array says its size without being pickled.
    run(magic, "import numpy\nwide = numpy.zeros(2**18 + 1)")
    array = fails(magic, "%%ranks\nprint(wide.shape)")
    assert "(ndarray, 2.0 MiB)" in array.error["evalue"], array.error["evalue"]
    # So does one inside another value, before it is serialised (torch copies a tensor whole).
    run(magic, """
        class Buffer:
            nbytes = 2**30
            def __reduce__(self):
                raise RuntimeError("a buffer over the limit was serialised")
        state = {"weights": Buffer()}
    """)
    nested = fails(magic, "%%ranks\nprint(state)")
    assert "(dict, over 1.0 MiB pickled) is too big" in nested.error["evalue"], nested.traceback


def test_an_unpicklable_value_matters_only_where_the_rank_lacks_it(magic: Kernel) -> None:
    run(magic, "import threading\nguard = threading.Lock()\nlatch = threading.Lock()")
    own = run(magic, "%%ranks\nimport threading\nguard = threading.Lock()\nprint(guard.locked())")
    assert "[rank 0] False" in own.stdout
    cell = fails(magic, "%%ranks\nprint(latch.locked())")
    message = cell.error["evalue"]
    assert "name 'latch' is not defined on rank" in message
    assert "(lock) cannot be sent: TypeError" in message, message
    assert "Create it on the ranks instead" in message


def test_world_exec_reads_the_callers_globals(kernel: Kernel) -> None:
    run(kernel, """
        offset = 7
        def shifted(v):
            return v + offset
        with ranks.World(n=2) as w:
            w.exec("got = shifted(ranks.current().rank)")
            got = w.pull("got")
    """)
    assert kernel.value("got") == [7, 8]


@pytest.mark.timeout(90)
def test_world_exec_in_a_script_reads_the_scripts_globals(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import ranks

        def label(rank):
            return f"{prefix}-{rank}"

        prefix = "r"
        if __name__ == "__main__":
            with ranks.World(n=2) as w:
                w.exec("name = label(ranks.current().rank)")
                print(w.pull("name"))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("['r-0', 'r-1']"), done.stdout


# --- %ranks on / off ------------------------------------------------------------------------


def test_on_runs_every_cell_on_the_ranks_and_its_magics_in_the_kernel(magic: Kernel) -> None:
    run(magic, "where = 'kernel'\n%ranks on   # from the next cell on")
    try:
        cell = run(magic, """
            where = f"rank {ranks.current().rank}"
            print(where)
            wheres = %ranks pull where
            %ranks status
            print("back on the ranks")
            template = '''
            %s, in a string
            '''
            print(template.strip() % where)
        """)
        assert "[rank 0] rank 0" in cell.stdout and "[rank 1] rank 1" in cell.stdout
        assert "[rank 1] back on the ranks" in cell.stdout
        assert "[rank 1] rank 1, in a string" in cell.stdout
    finally:
        run(magic, "%ranks off")
    assert magic.value("where, wheres") == ("kernel", ["rank 0", "rank 1"])
    # A cell magic is left alone in on mode: %%ranks cells keep their options.
    run(magic, "%ranks on")
    try:
        only = run(magic, "%%ranks --rank 1\nprint('only one')")
        assert "[rank 1] only one" in only.stdout and "rank 0" not in only.stdout
    finally:
        run(magic, "%ranks off")
    assert "[rank" not in run(magic, "print('kernel again')").stdout


def test_stop_ends_on_mode(magic: Kernel) -> None:
    run(magic, "%ranks on")
    run(magic, "%ranks stop")
    assert run(magic, "print('in the kernel')").stdout == "in the kernel\n"
    run(magic, "%ranks start -n 2")  # what the fixture stops
