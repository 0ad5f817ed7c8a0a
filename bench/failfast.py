"""Fail-fast: how long a rank's exception takes to reach the notebook while its peer is
blocked in a collective. ranks.run against accelerate's notebook_launcher.

    python bench/failfast.py [--repeat 3] [--cap 120] [--launchers ranks,accelerate]
                             [--driver kernel|script]

Two ranks join a process group (NCCL on GPUs 0 and 1 when nvidia-smi lists two, else
Gloo on the CPU; --n ranks, 2 by default) and do one all_reduce. Then the last rank writes
``time.time()`` to a file and raises, while the others wait in a second all_reduce that it
never joins. The figure is
the time from that ``time.time()`` to the moment the launcher's exception reaches the
caller's ``except`` in the kernel (also ``time.time()``: one host, one clock).

Both launchers are driven the way a notebook drives them: from a real ipykernel started
with jupyter_client, with ``import torch`` done first, the function defined in a cell, one
fresh kernel per launcher. ``ranks.run(work, n=2, torch_dist=True)`` (the function finds
the group made); ``notebook_launcher(work, num_processes=2)`` forks the kernel through
torch elastic and ``work`` creates the group itself from elastic's variables. Where
jupyter_client is not installed (``--driver script``, the default there) the same cells run
as one plain Python script per launcher: notebook_launcher only treats Colab and Kaggle
specially, so a script takes the path a Jupyter kernel takes.

Every measurement has its own deadline, --cap seconds: a launch that has not ended by then
(plus start-up slack) gets its kernel or script killed with its whole process tree, and is
reported as ">cap"; that launcher's remaining repeats are skipped. Prints a table and the
ratio notebook_launcher / ranks.run of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _kernel import Kernel, Launcher, detect_backend, kill_processes, process_tree

SRC = str(Path(__file__).resolve().parent.parent / "src")
MARK = "FAILFAST-RESULT "
START_SLACK = 60.0  # a cell's deadline is --cap plus this: imports and joining the group

# The notebook's cells. The function is defined in the notebook, as a user would.
SETUP = """
import json, os, socket, sys, time
sys.path.insert(0, {src!r})
import torch
BACKEND = {backend!r}
N = {n!r}  # ranks; the last one fails

def work(raised, backend):
    import os, time
    import torch
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend)  # notebook_launcher: elastic's env:// variables
    rank = dist.get_rank()
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    total = torch.ones(1, device=device)
    dist.all_reduce(total)  # the group is up and connected
    if device.type == "cuda":
        torch.cuda.synchronize()
    if rank == dist.get_world_size() - 1:
        time.sleep(0.5)  # by now the other ranks wait in the all_reduce below
        with open(raised, "w") as out:
            out.write(repr(time.time()))
        raise RuntimeError("the last rank failed while the others wait in all_reduce")
    dist.all_reduce(total)  # the last rank never joins
    if device.type == "cuda":
        torch.cuda.synchronize()  # NCCL is asynchronous: block here as Gloo does
    return total.item()

def measure(launch, raised):
    try:
        launch(raised)
    except BaseException as error:
        arrived, kind = time.time(), type(error).__name__
    else:
        arrived, kind = None, "returned"
    print({mark!r} + json.dumps({{"arrived": arrived, "kind": kind}}), flush=True)
"""

RANKS = """
import ranks

def launch(raised):
    placement = {{"gpus": list(range(N))}} if BACKEND == "nccl" else {{"n": N}}
    ranks.run(work, args=(raised, BACKEND), torch_dist=True, timeout={cap!r}, output="none",
              **placement)
"""

ACCELERATE = """
from accelerate import notebook_launcher

def launch(raised):
    with socket.socket() as probe:  # the default port 29500 may be taken on a shared host
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    notebook_launcher(work, args=(raised, BACKEND), num_processes=N, use_port=str(port))
"""


LAUNCHERS = (
    Launcher("ranks", "ranks.run", RANKS),
    Launcher("accelerate", "accelerate notebook_launcher", ACCELERATE),
)


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    kinds: set[str] = field(default_factory=set)
    over_cap: bool = False
    failed: str | None = None


class Script:
    """The same cells as one plain Python process, fed one cell at a time on stdin."""

    def __init__(self, cwd: str, log: Path) -> None:
        self._log = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", _SCRIPT_LOOP], cwd=cwd, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, start_new_session=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put("")  # EOF

    def run(self, code: str, timeout: float) -> str:
        """Run one cell; what it printed. TimeoutError past the deadline."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        out = []
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the cell did not end in {timeout:g} s") from None
            if not line:
                raise RuntimeError(f"the script exited ({self.process.wait()})")
            if line.startswith(_CELL_END):
                error = json.loads(line[len(_CELL_END):])
                if error:
                    raise RuntimeError(error)
                return "".join(out)
            out.append(line)

    def close(self) -> None:
        kill_processes(process_tree(self.pid), grace=0)
        self._reader.join(5)
        self._log.close()


_CELL_END = "FAILFAST-CELL-END "
# The script's loop: one JSON-encoded cell per line on stdin, run in __main__.
_SCRIPT_LOOP = f"""
import json, sys, traceback
for _line in sys.stdin:
    try:
        exec(compile(json.loads(_line), "<cell>", "exec"), globals())
        _error = None
    except BaseException as _e:
        traceback.print_exc()
        _error = repr(_e)
    print({_CELL_END!r} + json.dumps(_error), flush=True)
"""


def bench(launcher: Launcher, backend: str, repeat: int, cap: float, workdir: Path,
          driver: str, n: int) -> Result:
    result = Result()
    log = workdir / f"{driver}-{launcher.key}.log"
    # Kernel: the kernel's own chatter, and the ranks' crash output, go to the log.
    kernel = Kernel(str(workdir), log=log) if driver == "kernel" else Script(str(workdir), log)
    try:
        kernel.run(SETUP.format(src=SRC, backend=backend, mark=MARK, n=n), START_SLACK)
        kernel.run(launcher.setup.format(cap=cap), START_SLACK)
        for attempt in range(repeat):
            raised = workdir / f"raised-{launcher.key}-{attempt}"
            try:
                out = kernel.run(f"measure(launch, {str(raised)!r})", cap + START_SLACK)
            except TimeoutError:
                result.over_cap = True
                _log(f"{launcher.key}: no error within {cap + START_SLACK:g} s; {driver} killed")
                break
            line = [x for x in out.splitlines() if x.startswith(MARK)][-1]
            reply = json.loads(line[len(MARK):])
            result.kinds.add(reply["kind"])
            if reply["arrived"] is None or not raised.exists():
                result.failed = f"{reply['kind']} (the last rank never raised)"
                break
            seconds = reply["arrived"] - float(raised.read_text())
            if seconds > cap:
                result.over_cap = True
                break
            result.seconds.append(seconds)
            _log(f"{launcher.key}: {reply['kind']} after {seconds:.3f} s")
    except (RuntimeError, TimeoutError) as error:
        result.failed = str(error)[:200]
        _log(f"{launcher.key}: {error}\n  kernel log: {log}")
    finally:
        kernel.close()
    return result


def table(results: dict[str, Result], backend: str, cap: float, driver: str, n: int) -> str:
    cores = os.cpu_count()
    where = f"NCCL, {n} GPUs" if backend == "nccl" else f"Gloo, {n} CPU ranks, {cores} cores"
    labels = {launcher.key: launcher.label for launcher in LAUNCHERS}
    caller = "a Jupyter kernel" if driver == "kernel" else "a plain script"
    lines = [
        f"Fail-fast from {caller}: rank {n - 1} raises while the others wait in all_reduce"
        f" ({where})",
        "",
        "| launcher | error in the caller | raise -> error, median (s) | all runs (s) |",
        "| --- | --- | ---: | --- |",
    ]
    medians = {}
    for key, result in results.items():
        runs = ", ".join(f"{s:.3f}" for s in result.seconds)
        if result.over_cap:
            runs = (runs + ", " if runs else "") + f">{cap:g}"
        if result.seconds and not result.over_cap:
            medians[key] = statistics.median(result.seconds)
            median = f"{medians[key]:.3f}"
        else:
            median = f">{cap:g}" if result.over_cap else "failed"
        kinds = ", ".join(sorted(result.kinds)) or (result.failed or "-")
        lines.append(f"| {labels[key]} | {kinds} | {median} | {runs or '-'} |")
    if "ranks" in results and "accelerate" in results:
        ours, theirs = medians.get("ranks"), medians.get("accelerate")
        if ours and theirs:
            digits = 1 if theirs >= ours else 2
            lines += ["", f"ratio notebook_launcher / ranks.run: {theirs / ours:.{digits}f}x"]
        elif ours and results["accelerate"].over_cap:
            lines += ["", f"ratio notebook_launcher / ranks.run: >{cap / ours:.1f}x"]
    return "\n".join(lines)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="measurements per launcher")
    parser.add_argument("--cap", type=float, default=120.0,
                        help="seconds one measurement may take before it counts as '>cap'")
    parser.add_argument("--launchers", default="ranks,accelerate")
    parser.add_argument("--n", type=int, default=2, help="ranks (the last one fails)")
    parser.add_argument("--driver", choices=("kernel", "script"), default=_default_driver(),
                        help="run the launches in a real ipykernel (default where"
                             " jupyter_client is installed) or in a plain script")
    options = parser.parse_args()
    backend = detect_backend(gpus_needed=2)
    chosen = [lc for lc in LAUNCHERS if lc.key in options.launchers.split(",")]
    results = {}
    with tempfile.TemporaryDirectory(prefix="failfast-") as workdir:
        for launcher in chosen:
            results[launcher.key] = bench(launcher, backend, options.repeat, options.cap,
                                          Path(workdir), options.driver, options.n)
    print(table(results, backend, options.cap, options.driver, options.n))


def _default_driver() -> str:
    import importlib.util

    return "kernel" if importlib.util.find_spec("jupyter_client") else "script"


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")
