"""Supervision from a real kernel: interrupts, a killed kernel, many calls, what is exposed.

Each test drives an ipykernel through jupyter_client, as a notebook would: the interrupt is
jupyter_client's (SIGINT to the kernel), the kernel is killed with SIGKILL from outside, and
what the kernel process holds (processes, threads, fds, listening sockets) is measured
inside it or through psutil.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from kernel import Kernel
from processes import gone_within, wait_for_files

# The ranks' code for the interrupt tests: each rank writes its pid, says it started, and
# sleeps; what ran of its cleanup is left as marker files in the kernel's folder.
SLEEPER = """
def work(ignore_interrupt):
    import os, signal, time
    rank = os.environ["RANK"]
    open(f"pid-{rank}", "w").write(str(os.getpid()))
    if ignore_interrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("working", flush=True)
    try:
        open(f"started-{rank}", "w").close()
        time.sleep(600)
    except KeyboardInterrupt:
        open(f"interrupted-{rank}", "w").close()
        raise
    finally:
        open(f"finally-{rank}", "w").close()
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("ignore_interrupt", [False, True], ids=["cooperative", "ignores-sigint"])
def test_interrupt_stops_ranks(fresh_kernel: Kernel, ignore_interrupt: bool) -> None:
    """Interrupting the kernel ends the cell with KeyboardInterrupt within seconds: a rank
    that cooperates runs its ``except KeyboardInterrupt`` and ``finally``; one that ignores
    SIGINT is terminated by escalation. No rank survives, and the kernel carries on."""
    k, folder = fresh_kernel, Path(fresh_kernel.workdir)  # type: ignore[attr-defined]
    k.ok("import signal, ranks\nhandler_before = signal.getsignal(signal.SIGINT)\n" + SLEEPER)
    cell, seconds = k.interrupt_once(
        f"ranks.run(work, args=({ignore_interrupt},), n=2)",
        [folder / "started-0", folder / "started-1"], wait=30, timeout=60,
    )
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", cell.traceback
    assert seconds < 5.0, f"the cell took {seconds:.1f} s to end after the interrupt"
    assert "[rank 0] working" in cell.stdout and "[rank 1] working" in cell.stdout
    pids = [int((folder / f"pid-{rank}").read_text()) for rank in (0, 1)]
    assert gone_within(pids, 2.0) == []
    for rank in (0, 1):
        ran = {name for name in ("interrupted", "finally") if (folder / f"{name}-{rank}").exists()}
        # SIG_IGN: nothing ran (SIGTERM ended it); otherwise the rank's own cleanup ran.
        assert ran == (set() if ignore_interrupt else {"interrupted", "finally"}), (rank, ran)
    if ignore_interrupt:
        assert "did not stop in time and were killed" in cell.traceback, cell.traceback
    # The kernel is fine: its SIGINT handler is its own again, and ranks run again.
    assert k.value("signal.getsignal(signal.SIGINT) is handler_before") is True
    assert k.value("ranks.run(abs, args=(-3,), n=2)") == [3, 3]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["template", "spawn", "portable"])
@pytest.mark.kills_kernel
def test_killed_kernel_takes_its_ranks_along(fresh_kernel: Kernel, start_method: str) -> None:
    """SIGKILL to the kernel mid-call: every rank, and every process a rank started, dies
    within about a second (parent-death signals, the ranks' channel EOF, each rank's
    watcher), whether the ranks were forked from the template or spawned."""
    k, folder = fresh_kernel, Path(fresh_kernel.workdir)  # type: ignore[attr-defined]
    k.ok(f"import os, ranks\nos.environ['RANKS_START_METHOD'] = {start_method!r}")
    k.ok("""
def work():
    import os, subprocess, time
    rank = os.environ["RANK"]
    child = subprocess.Popen(["sleep", "600"])
    open(f"pids-{rank}.tmp", "w").write(f"{os.getpid()} {child.pid}")
    os.rename(f"pids-{rank}.tmp", f"pids-{rank}")
    time.sleep(600)
""")
    k.client.execute("ranks.run(work, n=2)")  # never finishes: the kernel dies under it
    wait_for_files([folder / "pids-0", folder / "pids-1"], 30)
    pids = [int(pid) for rank in (0, 1) for pid in (folder / f"pids-{rank}").read_text().split()]
    descendants = [p.pid for p in psutil.Process(k.pid).children(recursive=True)]
    assert set(pids) <= set(descendants), (pids, descendants)  # the template is in there too
    os.kill(k.pid, signal.SIGKILL)
    assert gone_within(descendants, 2.5) == [], "outlived the kernel"


@pytest.mark.timeout(120)
def test_many_calls_leave_nothing_behind(kernel: Kernel) -> None:
    """100 calls in one kernel, two thirds of them failing (a raise, a rank's os._exit): the
    kernel has the same processes, threads and fds after as before."""
    kernel.ok("""
import collections, os, psutil, threading, ranks

def ok():
    return 1

def bad():
    raise ValueError("bad")

def die():
    if os.environ["RANK"] == "1":
        os._exit(3)
    import time
    time.sleep(60)

def sample():
    me = psutil.Process()
    return (sorted(p.pid for p in me.children(recursive=True)), me.num_threads(),
            me.num_fds(), threading.active_count())

ranks.run(ok, n=2)  # warm up what lives as long as the kernel (the template)
before = sample()
seen = collections.Counter()
for i in range(100):
    try:
        ranks.run([ok, bad, die][i % 3], n=2, output="none")
        seen["ok"] += 1
    except Exception as error:
        seen[type(error).__name__] += 1
after = sample()
""", timeout=110)
    assert kernel.value("dict(seen)") == {"ok": 34, "ValueError": 33, "RankCrashed": 33}
    before, after = kernel.value("before"), kernel.value("after")
    assert after == before, f"(children, threads, fds, Python threads) {before} -> {after}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["template", "portable"])
def test_nothing_listens_and_only_the_rank_holds_its_channel(
    kernel: Kernel, start_method: str
) -> None:
    """During a call the kernel (and its template) listens on nothing; a rank's sockets are
    its control channel and the pair its SIGINT handler reports through, none inheritable
    by its children; torchrun's MASTER_ADDR is loopback and does not leak into the kernel.

    The control channel is a Unix socket pair, or with the portable start a loopback TCP
    connection, whose listening socket the kernel closed once the rank connected.
    """
    kernel.ok(f"import os\nos.environ['RANKS_START_METHOD'] = {start_method!r}")
    kernel.ok("""
import os, psutil, ranks

def listening(pid):
    # What the kernel and its template listen on (ranks are looked at from inside).
    kernel = psutil.Process(pid)
    procs = [kernel, *(c for c in kernel.children()
                       if "ranks._worker" not in " ".join(c.cmdline()))]
    return {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections("inet")
            if c.status == psutil.CONN_LISTEN}

def inspect(kernel_pid):
    import os, stat
    sockets = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                sockets.append((fd, os.get_inheritable(fd)))
        except OSError:
            pass  # the fd of the listing itself
    me = psutil.Process()
    return {
        "kernel_listening": listening(kernel_pid),
        "sockets": sockets,
        "inet": [(c.status, c.raddr.ip) for c in me.net_connections("inet")],
        "unix": len(me.net_connections("unix")),
        "master_addr": os.environ["MASTER_ADDR"],
    }

before = listening(os.getpid())
seen = ranks.run(inspect, args=(os.getpid(),), n=2)
checks = {
    "kernel_listening_unchanged": all(s["kernel_listening"] == before for s in seen),
    "one_socket_each": [len(s["sockets"]) for s in seen],
    "inheritable": [inh for s in seen for _, inh in s["sockets"]],
    "inet": [s["inet"] for s in seen],
    "unix": [s["unix"] for s in seen],
    "master_addr": sorted({s["master_addr"] for s in seen}),
    "leaked": "MASTER_ADDR" in os.environ or "RANK" in os.environ,
}
del os.environ["RANKS_START_METHOD"]
""")
    checks = kernel.value("checks")
    loopback = [("ESTABLISHED", "127.0.0.1")]
    assert checks == {
        "kernel_listening_unchanged": True,
        "one_socket_each": [3, 3],
        "inheritable": [False] * 6,
        "inet": [loopback, loopback] if start_method == "portable" else [[], []],
        "unix": [2, 2] if start_method == "portable" else [3, 3],
        "master_addr": ["127.0.0.1"],
        "leaked": False,
    }, checks


@pytest.mark.timeout(60)
def test_torch_dist_listens_on_loopback_only(kernel: Kernel) -> None:
    """With torch_dist=True the ranks' own Gloo sockets bind to loopback, never all
    interfaces, and the kernel still listens on nothing new."""
    kernel.ok("""
def gloo_sockets(kernel_pid):
    import psutil, torch, torch.distributed as dist
    total = torch.ones(1)
    dist.all_reduce(total)  # the pairs are connected now
    me = psutil.Process()
    return {
        "listening": sorted({c.laddr.ip for c in me.net_connections("inet")
                             if c.status == psutil.CONN_LISTEN}),
        "peers": sorted({c.raddr.ip for c in me.net_connections("inet") if c.raddr}),
        "kernel_listening": listening(kernel_pid),
        "sum": total.item(),
    }

before = listening(os.getpid())
gloo = ranks.run(gloo_sockets, args=(os.getpid(),), n=2, torch_dist=True)
gloo_checks = {
    "sum": [g["sum"] for g in gloo],
    "listening_off_loopback": [ip for g in gloo for ip in g["listening"]
                               if ip not in ("127.0.0.1", "::1")],
    "peers_off_loopback": [ip for g in gloo for ip in g["peers"]
                           if ip not in ("127.0.0.1", "::1")],
    "kernel_listening_unchanged": all(g["kernel_listening"] == before for g in gloo),
}
""")
    assert kernel.value("gloo_checks") == {
        "sum": [2.0, 2.0],
        "listening_off_loopback": [],
        "peers_off_loopback": [],
        "kernel_listening_unchanged": True,
    }
