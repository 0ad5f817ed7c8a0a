"""Launch latency from a live Jupyter kernel: ranks against the launchers people use today.

    python bench/launch.py [--markdown docs/launch.md] [--ns 1,2,4] [--repeat 5]

Every measurement runs in a real ipykernel started with jupyter_client, in which ``import
torch`` ran first (as in a notebook that is about to train). One kernel per launcher, so
one launcher's imports and helper processes never help or hinder another's:

    ranks              ranks.run (default start: forked from the warm template)
    ranks (spawn)      ranks.run with RANKS_START_METHOD=spawn (a fresh interpreter per rank)
    ranks (portable)   ranks.run with RANKS_START_METHOD=portable (Windows' and macOS's start:
                       a fresh interpreter that connects back over loopback)
    notebook_launcher  accelerate.notebook_launcher (forks the kernel; n > 1 goes through
                       torch elastic with start_method="fork", n = 1 calls fn in the kernel)
    start_processes    torch.multiprocessing.start_processes(start_method="spawn")
    mp spawn           one multiprocessing "spawn" Process per rank

Two workloads, the same module-level functions for every launcher (bench/_launch_targets.py):
``trivial`` returns its rank; ``all_reduce`` joins a process group (Gloo on CPU, NCCL when
nvidia-smi lists GPUs), does one all_reduce and destroys the group (ranks: torch_dist=True).

The time of one launch is taken inside the kernel, around the launcher's call alone (no
Jupyter messaging). Each n gets a fresh kernel per launcher: "cold" is its first launch
(trivial workload; for ranks it includes starting the template), "warm" the median and min
of the further launches of that n in the same kernel: up to --repeat of them, fewer (at
least --min-repeat) once a launch takes seconds, to keep the whole run near 3 minutes.
Every launch has a deadline of its own and runs as one cell with a deadline: a kernel that
overruns it is killed with its whole process tree and the launch reported as timed out.
Kernels and their processes are cleaned up on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from _kernel import CellFailed, Kernel, Launcher, detect_backend, gpu_count, kill_processes

BENCH = Path(__file__).resolve().parent
WORKLOADS = ("trivial", "all_reduce")
MARK = "BENCH-RESULT "

# Kernel-side code. {timeout} is each launch's own deadline, in seconds.
COMMON = """
import json, os, sys, time
sys.path.insert(0, {bench!r})
import _launch_targets as _targets
os.environ[_targets.BACKEND_VARIABLE] = {backend!r}
_GPU = {backend!r} == "nccl"
_TIMEOUT = {timeout!r}

def _measure(workload, n):
    fn = getattr(_targets, workload)
    started = time.perf_counter()
    _launch(fn, workload, n)
    seconds = time.perf_counter() - started
    print({mark!r} + json.dumps(seconds))
"""

RANKS = """
os.environ.pop("RANKS_START_METHOD", None)
{start_method}
import ranks

def _launch(fn, workload, n):
    dist = workload == "all_reduce"
    # The trivial workload on CPU ranks everywhere, as for the other launchers: a GPU rank
    # would create a CUDA context that the others never pay for.
    gpus = list(range(n)) if dist and _GPU else []
    results = ranks.run(fn, n=n, gpus=gpus, torch_dist=dist, timeout=_TIMEOUT, output="none")
    assert len(results) == n, results
"""

ACCELERATE = """
from accelerate import notebook_launcher

def _launch(fn, workload, n):
    # No deadline of its own: the cell's deadline (launch.py) covers it.
    notebook_launcher(fn, num_processes=n)
"""

START_PROCESSES = """
import torch.multiprocessing as _tmp

def _launch(fn, workload, n):
    context = _tmp.start_processes(fn, args=(n, _targets.free_port()), nprocs=n,
                                   join=False, start_method="spawn")
    deadline = time.monotonic() + _TIMEOUT
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
                process.join()
            raise TimeoutError(f"start_processes did not finish in {{_TIMEOUT}} s")
"""

MP_SPAWN = """
import multiprocessing as _mp
_spawn = _mp.get_context("spawn")

def _launch(fn, workload, n):
    port = _targets.free_port()
    processes = [_spawn.Process(target=fn, args=(r, n, port)) for r in range(n)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + _TIMEOUT
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    late = [p for p in processes if p.is_alive()]
    for process in late:
        process.kill()
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if late or failed:
        raise RuntimeError(f"{{len(late)}} process(es) timed out; exit codes {{failed}}")
"""


LAUNCHERS = (
    Launcher("ranks", "ranks.run (template)", RANKS.format(start_method="")),
    Launcher("ranks-spawn", "ranks.run (RANKS_START_METHOD=spawn)",
             RANKS.format(start_method='os.environ["RANKS_START_METHOD"] = "spawn"')),
    Launcher("ranks-portable", "ranks.run (RANKS_START_METHOD=portable)",
             RANKS.format(start_method='os.environ["RANKS_START_METHOD"] = "portable"')),
    Launcher("accelerate", "accelerate notebook_launcher", ACCELERATE),
    Launcher("start_processes", "torch start_processes (spawn)", START_PROCESSES),
    Launcher("mp-spawn", "multiprocessing spawn Process", MP_SPAWN),
)


@dataclass
class Timings:
    cold: dict[int, float | str] = field(default_factory=dict)  # n -> seconds or "error"
    warm: dict[tuple[str, int], list[float] | str] = field(default_factory=dict)


def measure(kernel: Kernel, workload: str, n: int, timeout: float) -> float:
    """One launch of ``workload`` on ``n`` ranks in the kernel: its seconds."""
    out = kernel.run(f"_measure({workload!r}, {n})", timeout)
    lines = [line for line in out.splitlines() if line.startswith(MARK)]
    if not lines:
        raise CellFailed(f"no result in the cell's output: {out[-500:]!r}")
    return float(json.loads(lines[-1][len(MARK):]))


@contextlib.contextmanager
def kernel_for(launcher: Launcher, setup: str, workdir: str, log: Path,
               timeout: float) -> Iterator[Kernel]:
    # RANKS_START_METHOD, if set here: each ranks launcher sets its own in the kernel.
    kernel = Kernel(workdir, log=log)
    try:
        kernel.run("import torch", timeout)  # the notebook already uses torch
        kernel.run(setup + launcher.setup, timeout)
        yield kernel
    finally:
        # Not a graceful shutdown: that waits about a second per kernel, fifteen kernels in
        # all, and no launcher here leaves work behind. Its template follows it out; the
        # tree of a kernel that overran a deadline is killed.
        kernel.close()


def bench_launcher(launcher: Launcher, args: argparse.Namespace, setup: str,
                   workdir: str, ns: list[int], backend: str) -> Timings:
    """Per n: a fresh kernel, its first launch (cold), then the warm launches of that n."""
    timings = Timings()
    gpus = gpu_count() if backend == "nccl" else 0
    cell_deadline = args.timeout + 30  # the launch's own deadline, then some
    for n in ns:
        log = Path(workdir, f"kernel-{launcher.key}-{n}.log")
        measuring = "cold"
        try:
            with kernel_for(launcher, setup, workdir, log, cell_deadline) as kernel:
                timings.cold[n] = measure(kernel, "trivial", n, cell_deadline)
                _log(f"{launcher.key}: cold n={n}: {timings.cold[n]:.3f} s")
                for measuring in WORKLOADS:
                    if measuring == "all_reduce" and backend == "nccl" and n > gpus:
                        continue  # NCCL wants a GPU per rank
                    timings.warm[measuring, n] = _repeat(kernel, measuring, n, args,
                                                         cell_deadline, launcher.key)
        except (CellFailed, TimeoutError) as error:
            # The kernel is gone (killed on a timeout) or unusable: the rest of n is not run.
            _log(f"{launcher.key}: {measuring} n={n}: {error}\n  kernel log: {_tail(log)}")
            if measuring == "cold":
                timings.cold.setdefault(n, _short(error))
            else:
                timings.warm[measuring, n] = _short(error)
    return timings


def _repeat(kernel: Kernel, workload: str, n: int, args: argparse.Namespace,
            deadline: float, key: str) -> list[float] | str:
    """At least ``--min-repeat`` launches, up to ``--repeat`` while within the cell budget."""
    seconds: list[float] = []
    spent = 0.0
    while len(seconds) < args.repeat and (len(seconds) < args.min_repeat
                                          or spent < args.budget_per_cell):
        try:
            seconds.append(measure(kernel, workload, n, deadline))
        except CellFailed as error:
            _log(f"{key}: {workload} n={n}: {error}")
            return _short(error)
        spent += seconds[-1]
    _log(f"{key}: {workload} n={n}: median {statistics.median(seconds):.3f} s"
         f" of {len(seconds)}")
    return seconds


def _short(error: BaseException) -> str:
    """For a table cell: the kind of failure (the log above has the details)."""
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"failed ({str(error).partition(':')[0]})"


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(none)"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the report ------------------------------------------------------------------------------


def _cell(value: float | str | None) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else f"{value:.3f}"


def tables(results: dict[str, Timings], ns: list[int]) -> str:
    labels = {launcher.key: launcher.label for launcher in LAUNCHERS}
    lines = ["Cold: the first launch in a fresh kernel (trivial workload), seconds.", "",
             "| launcher | " + " | ".join(f"n={n}" for n in ns) + " |",
             "|---|" + "---:|" * len(ns)]
    for key, timings in results.items():
        lines.append(f"| {labels[key]} | "
                     + " | ".join(_cell(timings.cold.get(n)) for n in ns) + " |")
    has_ratio = "ranks" in results and "accelerate" in results
    if has_ratio:  # the goal: ranks cold within 1.5x of notebook_launcher cold
        cold = [(results["ranks"].cold.get(n), results["accelerate"].cold.get(n)) for n in ns]
        lines.append("| ranks / notebook_launcher | " + " | ".join(
            f"{ours / theirs:.2f}" if isinstance(ours, float) and isinstance(theirs, float)
            and theirs > 0 else "-" for ours, theirs in cold) + " |")
    lines += ["", "Warm: further launches in the same kernel, median (min) in seconds"
              + (", and ranks / notebook_launcher (median)." if has_ratio else "."), ""]
    header = "| workload | n | " + " | ".join(labels[k] for k in results)
    header += " | ranks / notebook_launcher |" if has_ratio else " |"
    lines += [header, "|---|---:|" + "---:|" * (len(results) + has_ratio)]
    for workload in WORKLOADS:
        for n in ns:
            row = []
            medians = {}
            for key, timings in results.items():
                value = timings.warm.get((workload, n))
                if isinstance(value, list) and value:
                    medians[key] = statistics.median(value)
                    row.append(f"{medians[key]:.3f} ({min(value):.3f})")
                else:
                    row.append(_cell(value))
            if all(v == "-" for v in row):
                continue
            if has_ratio:
                ratio = "-"
                if "ranks" in medians and "accelerate" in medians and medians["accelerate"] > 0:
                    ratio = f"{medians['ranks'] / medians['accelerate']:.2f}"
                    if n == 1:
                        ratio += "*"
                row.append(ratio)
            lines.append(f"| {workload} | {n} | " + " | ".join(row) + " |")
    if has_ratio and 1 in ns:
        lines += ["", "\\* notebook_launcher with one process starts no process: it calls the"
                  " function in the kernel itself."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--ns", default="1,2,4", help="rank counts (default 1,2,4)")
    parser.add_argument("--launchers", default=",".join(lc.key for lc in LAUNCHERS),
                        help="which launchers, comma-separated (default: all)")
    parser.add_argument("--repeat", type=int, default=5, help="warm launches per cell (max)")
    parser.add_argument("--min-repeat", type=int, default=2, help="warm launches per cell (min)")
    parser.add_argument("--budget-per-cell", type=float, default=4.0,
                        help="stop repeating past --min-repeat once a cell took this long (s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline of one launch (s)")
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    chosen = args.launchers.split(",")
    unknown = set(chosen) - {lc.key for lc in LAUNCHERS}
    if unknown:
        parser.error(f"unknown launchers {sorted(unknown)}")

    if "accelerate" in chosen and importlib.util.find_spec("accelerate") is None:
        _log("accelerate is not installed: notebook_launcher is left out")
        chosen.remove("accelerate")

    import torch

    backend = detect_backend()
    setup = COMMON.format(bench=str(BENCH), backend=backend, timeout=args.timeout, mark=MARK)
    started = time.monotonic()
    load = os.getloadavg()[0]  # other work on the machine skews every number here
    results: dict[str, Timings] = {}
    with tempfile.TemporaryDirectory(prefix="ranks-bench-") as workdir:
        try:
            for launcher in LAUNCHERS:
                if launcher.key in chosen:
                    results[launcher.key] = bench_launcher(launcher, args, setup, workdir, ns,
                                                           backend)
        finally:
            kill_processes(psutil.Process().children(recursive=True))
    machine = (f"{os.cpu_count()} CPU cores, "
               + (f"{gpu_count()} GPU(s), NCCL" if backend == "nccl" else "no GPU, Gloo"))
    report = (f"torch {torch.__version__}, Python {sys.version.split()[0]}, {machine};"
              f" {time.strftime('%Y-%m-%d')}; load average {load:.1f} at the start;"
              f" bench took {time.monotonic() - started:.0f} s\n\n"
              + tables(results, ns))
    print(report)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)


if __name__ == "__main__":
    main()
