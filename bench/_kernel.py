"""What the benchmarks share: a real Jupyter kernel to drive, and the machine's GPUs.

* :class:`Kernel`: an ipykernel running this interpreter, driven through jupyter_client as a
  notebook drives it. Every cell has a deadline; :meth:`Kernel.execute` returns what the cell
  sent (each IOPub message with the ``time.time()`` it arrived here), :meth:`Kernel.run` its
  stdout. Closing the kernel leaves nothing of its process tree behind.
* :class:`Launcher`: one of the launchers a benchmark compares, as the cell defining it.
* :func:`gpu_count` and :func:`detect_backend`: read from ``nvidia-smi -L``, so the benchmark's
  own process never initialises CUDA.

Import it from a script in this folder (``python bench/<script>.py`` puts the folder first on
``sys.path``). jupyter_client is imported only when a kernel is started.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil


class CellFailed(RuntimeError):
    """The cell raised (``str()``: "Name: value"; the kernel's traceback is the cause)."""


@dataclass
class Cell:
    """What one cell sent: each IOPub message with the ``time.time()`` it arrived here."""

    started: float  # time.time() just before the cell was sent
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    error: dict[str, Any] | None = None  # the error message's content, if the cell raised
    result: str | None = None  # the displayed result, as text

    def lines(self, name: str) -> list[tuple[float, str]]:
        """The lines of the stream ``name`` (stdout, stderr), each with its arrival."""
        out = []
        for arrived, msg in self.messages:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == name:
                out += [(arrived, line) for line in msg["content"]["text"].splitlines()]
        return out

    @property
    def stdout(self) -> str:
        return "".join(msg["content"]["text"] for _, msg in self.messages
                       if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout")

    @property
    def ended(self) -> float:
        """When the last message (the kernel going idle) arrived."""
        return self.messages[-1][0]

    def check(self) -> Cell:
        """This cell; CellFailed if it raised."""
        if self.error is not None:
            shown = RuntimeError("the kernel's traceback:\n" + "\n".join(self.error["traceback"]))
            raise CellFailed(f"{self.error['ename']}: {self.error['evalue']}") from shown
        return self


class Kernel:
    """One ipykernel with this interpreter (the one with ranks); every cell has a deadline.

    ``log``: a file for the kernel's own output (its start-up warnings, a crash), else it goes
    where this process's output goes. ``env``: the kernel's environment (default: this one's).
    """

    def __init__(self, cwd: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        from jupyter_client.manager import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        self.manager.kernel_spec.argv[0] = sys.executable
        env = dict(os.environ) if env is None else env
        if log is None:
            self.manager.start_kernel(cwd=cwd, env=env)
        else:
            with open(log, "wb") as out:
                self.manager.start_kernel(cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        self.pid = int(self.manager.provisioner.process.pid)  # type: ignore[union-attr]

    def execute(self, code: str, timeout: float) -> Cell:
        """Run ``code`` (dedented) as one cell, until the kernel is idle and has replied.

        TimeoutError past ``timeout`` seconds; what the cell raised is in ``Cell.error``.
        """
        cell = Cell(time.time())
        msg_id = self.client.execute(textwrap.dedent(code), store_history=False)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"the cell did not end in {timeout:g} s") from None
            arrived = time.time()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            cell.messages.append((arrived, msg))
            kind, content = msg["msg_type"], msg["content"]
            if kind == "error":
                cell.error = content
            elif kind == "execute_result":
                cell.result = content["data"].get("text/plain")
            elif kind == "status" and content["execution_state"] == "idle":
                break
        with contextlib.suppress(queue.Empty):  # the reply, so the next cell starts clean
            self.client.get_shell_msg(timeout=5)
        return cell

    def run(self, code: str, timeout: float) -> str:
        """Run one cell; its stdout. CellFailed if it raised, TimeoutError past the deadline."""
        return self.execute(code, timeout).check().stdout

    def close(self, now: bool = True) -> None:
        """Stop the kernel; whatever of its process tree is left then gets SIGKILL.

        ``now=False`` asks it to shut down first, so that its exit handlers run (they close
        the ranks it holds); ``now=True`` (the default) kills it at once.
        """
        tree = process_tree(self.pid)
        with contextlib.suppress(Exception):
            self.client.stop_channels()
        with contextlib.suppress(Exception):
            self.manager.shutdown_kernel(now=now)
        kill_processes(tree)


@dataclass(frozen=True)
class Launcher:
    """A launcher a benchmark compares: its --launchers key, its label in the table, and the
    cell that defines it in the kernel."""

    key: str
    label: str
    setup: str


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants (none if it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_processes(processes: list[psutil.Process], grace: float = 2.0) -> None:
    """Give ``processes`` ``grace`` seconds to end on their own (a kernel's ranks and template
    follow it out), then SIGKILL the rest."""
    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running():
                alive.append(proc)
    if alive and grace > 0:
        _, alive = psutil.wait_procs(alive, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=5)


def gpu_count() -> int:
    """The GPUs ``nvidia-smi -L`` lists: 0 without nvidia-smi or when it fails. No CUDA here."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True,
                                timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def detect_backend(gpus_needed: int = 1) -> str:
    """nccl when nvidia-smi lists at least ``gpus_needed`` GPUs, else gloo."""
    return "nccl" if gpu_count() >= gpus_needed else "gloo"
