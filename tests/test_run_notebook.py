"""``ranks.run`` and ``ranks.World`` driven from a real Jupyter kernel, as a notebook uses them.

Every test executes cells in one ipykernel (the module-scoped ``kernel`` fixture), so code
defined "in the notebook" really lives in the kernel's ``__main__`` and travels the way it
would for a user: lambdas, closures, notebook classes, star imports, local modules. Ranks
are CPU ranks (the CI machine has no GPU); calls that need torch on the ranks cost an import
of torch per rank, so they are kept few.
"""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from helpers import cell
from kernel import Kernel

# Every test here runs once per start method (conftest.py): what a notebook sends travels
# the same way whichever way the ranks were started.
START_METHODS = ("template", "spawn", "portable")


# Defined in the kernel once per module. The warm template (one long-lived process per
# kernel that ranks are forked from) is meant to outlive calls; the ranks, its children,
# and anything else the kernel started are not.
HELPERS = """
    import os, psutil, ranks

    def leftover_processes():
        me = psutil.Process()
        left = []
        for p in me.children(recursive=True):
            try:
                if p.ppid() == me.pid and "ranks._template" in " ".join(p.cmdline()):
                    continue
            except psutil.NoSuchProcess:
                continue
            left.append(p.pid)
        return left
"""


@pytest.fixture(scope="module")
def nb(kernel: Kernel) -> Kernel:
    """The module's kernel with the helpers above defined in it."""
    cell(kernel, HELPERS)
    return kernel


# --- code defined in the notebook travels -----------------------------------------------


@pytest.mark.timeout(30)
def test_lambda_and_closure_over_notebook_globals(nb: Kernel) -> None:
    cell(nb, """
        scale = 3

        def make_adder(k):
            def add(x):
                return x * scale + k
            return add

        add_ten = make_adder(10)
        by_lambda = ranks.run(lambda a, b=0: a + b, args=(1,), kwargs={"b": 2}, n=2)
        by_closure = ranks.run(add_ten, args=(5,), n=2)
        scale = 4  # a global's value is taken when the call is made
        after_rebind = ranks.run(add_ten, args=(5,), n=2)
    """)
    assert nb.value("by_lambda, by_closure, after_rebind") == ([3, 3], [25, 25], [30, 30])


@pytest.mark.timeout(30)
def test_notebook_class_comes_back_as_the_kernels_class(nb: Kernel) -> None:
    cell(nb, """
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

            def norm2(self):
                return self.x ** 2 + self.y ** 2

        def shifted(base):
            rank = ranks.current().rank
            return Point(base.x + rank, base.norm2())

        points = ranks.run(shifted, args=(Point(1, 2),), n=2)
    """)
    assert nb.value(
        "[type(p) is Point for p in points], [isinstance(p, Point) for p in points],"
        " [(p.x, p.y) for p in points], points[1].norm2()"
    ) == ([True, True], [True, True], [(1, 5), (2, 5)], 29)


@pytest.mark.timeout(30)
def test_names_from_a_star_import(nb: Kernel) -> None:
    cell(nb, """
        from math import *

        def hypotenuse(a, b):
            return sqrt(a * a + b * b) + floor(pi)

        star_results = ranks.run(hypotenuse, args=(3, 4), n=2)
    """)
    assert nb.value("star_results") == [8.0, 8.0]


@pytest.mark.timeout(30)
def test_local_module_in_the_working_directory(nb: Kernel) -> None:
    workdir = Path(nb.workdir)  # type: ignore[attr-defined]
    (workdir / "nb_helpers.py").write_text(textwrap.dedent("""
        import os

        __all__ = ["triple"]

        def triple(x):
            return 3 * x

        def where():
            return os.path.abspath(__file__), os.getpid()
    """))
    cell(nb, """
        import os
        import nb_helpers
        from nb_helpers import *

        def use_helpers(x):
            return triple(x), nb_helpers.where()

        helper_results = ranks.run(use_helpers, args=(7,), n=2)
    """)
    # The rank imported the module itself (by reference, from the kernel's folder): its
    # __file__ is the kernel's and where() ran in the rank's process, not the kernel's.
    assert nb.value(
        "[(t, f == nb_helpers.__file__, pid != os.getpid())"
        " for t, (f, pid) in helper_results]"
    ) == [(21, True, True), (21, True, True)]


@pytest.mark.timeout(60)
def test_local_module_edited_and_reloaded_runs_the_new_code(nb: Kernel) -> None:
    # The edit-reload loop of notebook work: ranks must not keep running the old version
    # (a warm process that imported the module once would).
    module = Path(nb.workdir) / "nb_edited.py"  # type: ignore[attr-defined]
    module.write_text("VERSION = 1\n\ndef version():\n    return VERSION\n")
    cell(nb, """
        import importlib
        import nb_edited

        before_edit = ranks.run(nb_edited.version, n=2)
    """)
    module.write_text("VERSION = 22\n\ndef version():\n    return VERSION\n")
    cell(nb, """
        importlib.reload(nb_edited)
        after_edit = ranks.run(nb_edited.version, n=2)
    """)
    assert nb.value("before_edit, after_edit") == ([1, 1], [22, 22])


@pytest.mark.timeout(30)
def test_ranks_get_the_kernels_sys_path_and_working_directory(
    nb: Kernel, tmp_path_factory: pytest.TempPathFactory
) -> None:
    extra = tmp_path_factory.mktemp("extra_path")
    (extra / "far_module.py").write_text(
        "import os\n\ndef where():\n    return os.path.abspath(__file__)\n"
    )
    subdir = Path(nb.workdir) / "subdir"  # type: ignore[attr-defined]
    subdir.mkdir()
    (subdir / "data.txt").write_text("relative file\n")
    cell(nb, f"""
        import os, sys
        sys.path.append({str(extra)!r})
        import far_module

        def where_am_i():
            with open("data.txt") as f:  # relative to the working directory
                data = f.read().strip()
            return far_module.where(), os.getcwd(), sys.path, data

        kernel_cwd = os.getcwd()
        os.chdir("subdir")
        try:
            placement = ranks.run(where_am_i, n=2)
            cwd_in_call = os.getcwd()
        finally:
            os.chdir(kernel_cwd)
    """)
    # Paths as the kernel spells them (on Windows: Z:\\tmp\\... for /tmp/...).
    assert nb.value(
        "[(w == os.path.abspath(far_module.__file__), cwd == cwd_in_call,"
        f" {str(extra)!r} in path, data) for w, cwd, path, data in placement]"
    ) == [(True, True, True, "relative file")] * 2


# --- results --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_results_in_rank_order_when_ranks_finish_in_reverse(nb: Kernel) -> None:
    cell(nb, """
        import time

        def finish_late_on_low_ranks():
            rank = ranks.current().rank
            time.sleep(0.4 * (2 - rank))
            return rank, time.monotonic()

        finished = ranks.run(finish_late_on_low_ranks, n=3)
    """)
    ranks_seen, ends = nb.value(
        "[r for r, _ in finished], [t for _, t in finished]"
    )
    assert ranks_seen == [0, 1, 2]
    assert ends[0] > ends[1] > ends[2], "the ranks did not finish in reverse order"


# --- the environment of a rank, and nothing left in the kernel ------------------------------


@pytest.mark.timeout(60)
def test_torchrun_environment_and_nothing_leaks_into_the_kernel(nb: Kernel) -> None:
    cell(nb, """
        import importlib.util, os, psutil
        torch = None
        if importlib.util.find_spec("torch") is not None:  # not in the Windows kernel
            import torch, torch.distributed

        environ_before = dict(os.environ)

        def rank_environment():
            import os, ranks
            info = ranks.current()
            names = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                     "MASTER_PORT", "FOO"]
            return ({k: os.environ.get(k) for k in names}, info.rank, info.world_size,
                    info.local_rank, info.device, os.getpid())

        env_results = ranks.run(rank_environment, n=2, env={"FOO": "bar"})
    """)
    envs = nb.value("[r[0] for r in env_results]")
    assert nb.value("[r[1:4] for r in env_results]") == [(0, 2, 0), (1, 2, 1)]
    assert nb.value("[str(r[4]) == 'cpu' for r in env_results]") == [True, True]
    for rank, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["FOO"] == "bar"
        assert ipaddress.ip_address(env["MASTER_ADDR"]).is_loopback, env["MASTER_ADDR"]
        assert 0 < int(env["MASTER_PORT"]) < 65536
    assert envs[0]["MASTER_PORT"] == envs[1]["MASTER_PORT"], "the ranks must meet on one port"

    leaks = nb.value("""(
        dict(os.environ) == environ_before,
        [k for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "FOO") if k in os.environ],
        torch is not None and torch.distributed.is_initialized(),
        torch is not None and torch.cuda.is_initialized(),
        leftover_processes(),
        [psutil.pid_exists(r[5]) for r in env_results],
    )""")
    assert leaks == (True, [], False, False, [], [False, False])


@pytest.mark.timeout(30)
def test_each_call_gets_a_free_port_of_its_own(nb: Kernel) -> None:
    ports = nb.value(
        "[ranks.run(lambda: __import__('os').environ['MASTER_PORT'], n=1)[0] for _ in range(3)]"
    )
    # A fresh free port per call (a fixed one would collide with a call still tearing down);
    # the OS may hand the same one out twice, so only ask that they are not all equal.
    assert len(set(ports)) >= 2, ports


# --- torch.distributed ------------------------------------------------------------------------

WATCH_DESTROY = """
    import torch, torch.distributed

    def watch_destroy(folder):
        # Record, in a file per rank, that destroy_process_group ran and what it found.
        import os
        import torch.distributed as dist
        original = dist.destroy_process_group

        def destroy(*args, **kwargs):
            rank, before = dist.get_rank(), dist.is_initialized()
            result = original(*args, **kwargs)
            with open(os.path.join(folder, f"destroyed-{rank}"), "w") as f:
                f.write(f"{before} {dist.is_initialized()}")
            return result

        dist.destroy_process_group = destroy
"""


def destroyed_markers(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.torch
@pytest.mark.timeout(60)
def test_torch_dist_all_reduce_on_gloo(nb: Kernel, tmp_path: Path) -> None:
    cell(nb, WATCH_DESTROY + f"""
    def all_reduce_sum():
        import torch, torch.distributed as dist
        watch_destroy({str(tmp_path)!r})
        t = torch.tensor([float(ranks.current().rank + 1)])
        dist.all_reduce(t)
        return {{"sum": t, "backend": dist.get_backend(), "world": dist.get_world_size()}}

    reduced = ranks.run(all_reduce_sum, n=2, torch_dist=True)
    """)
    assert nb.value(
        "[(type(r['sum']) is torch.Tensor, r['sum'].tolist(), r['backend'], r['world'])"
        " for r in reduced]"
    ) == [(True, [3.0], "gloo", 2)] * 2
    # The group ranks created is destroyed by ranks when the call ends.
    assert destroyed_markers(tmp_path) == {"destroyed-0": "True False", "destroyed-1": "True False"}


@pytest.mark.torch
@pytest.mark.timeout(60)
def test_tutorial_code_that_initialises_the_group_itself(nb: Kernel, tmp_path: Path) -> None:
    cell(nb, WATCH_DESTROY + f"""
    def tutorial():
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")  # env:// from torchrun's variables; never destroyed
        watch_destroy({str(tmp_path)!r})
        t = torch.ones(2) * (dist.get_rank() + 1)
        dist.all_reduce(t)
        return dist.get_rank(), dist.get_world_size(), t.tolist()

    tutorial_results = ranks.run(tutorial, n=2)
    """)
    assert nb.value("tutorial_results") == [(0, 2, [3.0, 3.0]), (1, 2, [3.0, 3.0])]
    # fn left its group open: ranks destroyed it before the rank exited.
    assert destroyed_markers(tmp_path) == {"destroyed-0": "True False", "destroyed-1": "True False"}
    assert nb.value("torch.distributed.is_initialized()") is False


@pytest.mark.torch
@pytest.mark.timeout(90)
def test_ddp_training_keeps_replicas_identical(nb: Kernel) -> None:
    cell(nb, """
        import torch

        def make_data():
            g = torch.Generator().manual_seed(1234)
            x = torch.randn(64, 4, generator=g)
            w = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
            return x, x @ w + 0.1 * torch.randn(64, 1, generator=g)

        def train_ddp(steps):
            import torch
            from torch.nn.parallel import DistributedDataParallel as DDP
            info = ranks.current()
            # Replicas start apart: equal weights at the end need DDP's broadcast and all-reduce.
            torch.manual_seed(100 + info.rank)
            model = torch.nn.Linear(4, 1)
            ddp = DDP(model)
            initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
            x, y = make_data()
            shard = slice(32 * info.rank, 32 * (info.rank + 1))
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.mse_loss(ddp(x[shard]), y[shard]).backward()
                opt.step()
            return initial, model.state_dict()

        trained = ranks.run(train_ddp, args=(5,), n=2, torch_dist=True)

        # The same five steps in the kernel on the whole batch: DDP averages the shards'
        # gradients, which for equal shards is the full-batch gradient.
        torch.manual_seed(100)
        reference = torch.nn.Linear(4, 1)
        x, y = make_data()
        opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.mse_loss(reference(x), y).backward()
            opt.step()
    """, timeout=80)
    checks = nb.value("""{
        k: (
            all(isinstance(t[i][k], torch.Tensor) for t in trained for i in (0, 1)),
            torch.equal(trained[0][0][k], trained[1][0][k]),
            torch.equal(trained[0][1][k], trained[1][1][k]),
            torch.equal(trained[0][1][k], trained[0][0][k]),
            torch.allclose(trained[0][1][k], reference.state_dict()[k], atol=1e-6),
        )
        for k in ("weight", "bias")
    }""")
    # tensors | same start (broadcast) | same end | moved | matches single-process training
    assert checks == {k: (True, True, True, False, True) for k in ("weight", "bias")}


# --- errors -----------------------------------------------------------------------------------


BOOM = """
    import os, time, psutil

    def boom():
        if ranks.current().rank == 1:
            raise ValueError(f"boom from cell {os.getpid()}")
        time.sleep(60)  # rank 0 must be stopped, not waited for
        return "rank 0 finished"
"""


@pytest.mark.timeout(60)
def test_exception_on_rank_1_is_reraised_with_its_traceback(nb: Kernel) -> None:
    cell(nb, BOOM + """
    try:
        ranks.run(boom, n=2)
    except ValueError as error:
        caught = error
    """, timeout=30)
    name, message, notes, cause_type, rank_tb = nb.value(
        "type(caught).__name__, str(caught), caught.__notes__,"
        " type(caught.__cause__).__name__, caught.__cause__.text"
    )
    assert name == "ValueError"
    assert message.startswith("boom from cell ")
    pid = int(message.rsplit(" ", 1)[1])
    assert any(f"rank 1 (pid {pid}" in note for note in notes), notes
    assert cause_type == "RankTraceback"
    # The notebook's own line, as the rank formatted it (the cell is not a file on disk).
    assert "in boom" in rank_tb
    assert 'raise ValueError(f"boom from cell {os.getpid()}")' in rank_tb


@pytest.mark.timeout(60)
def test_exception_shown_in_the_cell_and_other_ranks_stopped(nb: Kernel) -> None:
    failed = nb.execute(textwrap.dedent(BOOM + """
    ranks.run(boom, n=2)
    """), timeout=30)
    assert failed.error is not None, failed.stdout
    assert failed.error["ename"] == "ValueError"
    assert failed.error["evalue"].startswith("boom from cell ")
    assert 'raise ValueError(f"boom from cell {os.getpid()}")' in failed.traceback
    assert ", in boom" in failed.traceback  # the rank's frame, from RankTraceback
    assert "raised on rank 1 (pid " in failed.traceback
    # Rank 0 sleeps for a minute: the call ends because it was stopped, not because it ended.
    assert failed.seconds < 15, failed.seconds
    assert nb.value("leftover_processes()") == []


# --- output -----------------------------------------------------------------------------------

CHATTY = """
    def chatty():
        import sys
        rank = ranks.current().rank
        print(f"hello from {rank}")
        print(f"warning from {rank}", file=sys.stderr)
        return rank
"""


@pytest.mark.timeout(30)
def test_output_of_every_rank_labelled_in_the_cell(nb: Kernel) -> None:
    shown = cell(nb, CHATTY + "    ranks.run(chatty, n=2)\n")
    assert shown.result == "[0, 1]"
    assert "[rank 0] hello from 0" in shown.stdout.splitlines()
    assert "[rank 1] hello from 1" in shown.stdout.splitlines()
    assert "[rank 0] warning from 0" in shown.stderr.splitlines()
    assert "[rank 1] warning from 1" in shown.stderr.splitlines()


@pytest.mark.timeout(30)
def test_output_rank0_and_none(nb: Kernel) -> None:
    cell(nb, CHATTY)
    only0 = cell(nb, "ranks.run(chatty, n=2, output='rank0')")
    assert only0.result == "[0, 1]"
    assert "[rank 0] hello from 0" in only0.stdout.splitlines()
    assert "[rank 0] warning from 0" in only0.stderr.splitlines()
    assert "rank 1" not in only0.stdout + only0.stderr

    silent = cell(nb, "ranks.run(chatty, n=2, output='none')")
    assert silent.result == "[0, 1]"
    assert "hello" not in silent.stdout and "warning" not in silent.stderr

    picked = cell(nb, "ranks.run(chatty, n=2, output=[1])")
    assert "[rank 1] hello from 1" in picked.stdout.splitlines()
    assert "rank 0" not in picked.stdout + picked.stderr


# --- ranks.World ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_world_keeps_state_across_calls_and_closes_clean(nb: Kernel) -> None:
    cell(nb, """
        import os, psutil

        def bump():
            import __main__
            __main__.counter = getattr(__main__, "counter", 0) + 1
            return __main__.counter

        def doubled_rank_value():
            return world_value * 2  # defined on the ranks only, by exec

        world = ranks.World(n=2)
        world.push(base=10)
        world.exec("import os\\nworld_value = base + int(os.environ['RANK'])")
        pulled = world.pull("world_value")
        pulled_one = world.pull("world_value", rank=1)
        first_pids = world.run(os.getpid)
        bumps = [world.run(bump), world.run(bump)]
        counters = world.pull("counter")
        doubled = world.run(doubled_rank_value)
        second_pids = world.run(os.getpid)
        world.close()
        world.close()  # closing twice is safe
    """)
    assert nb.value("pulled, pulled_one, bumps, counters, doubled") == (
        [10, 11], 11, [[1, 1], [2, 2]], [2, 2], [20, 22]
    )
    assert nb.value(
        "first_pids == second_pids, len(set(first_pids)), os.getpid() in first_pids,"
        " world.closed, [psutil.pid_exists(p) for p in first_pids],"
        " leftover_processes()"
    ) == (True, 2, False, True, [False, False], [])
    after = nb.execute("world.run(os.getpid)")
    assert after.error is not None and after.error["ename"] == "RanksError"
    assert "closed" in after.error["evalue"]


@pytest.mark.timeout(30)
def test_world_as_context_manager(nb: Kernel) -> None:
    cell(nb, """
        import os, psutil

        with ranks.World(n=2) as ctx_world:
            ctx_pids = ctx_world.run(os.getpid)
    """)
    assert nb.value(
        "ctx_world.closed, [psutil.pid_exists(p) for p in ctx_pids],"
        " leftover_processes()"
    ) == (True, [False, False], [])
