"""A real Jupyter kernel, driven through jupyter_client: for the tests and the benchmarks.

``Kernel.execute`` runs one cell and returns everything the cell showed: the stdout and
stderr stream text, the error (name, value, traceback) and the displayed result, plus the
raw IOPub messages for tests that look at message order or parent headers (each with
``msg["arrived"]``, the ``time.time()`` at which this process received it). For a cell that
the test acts on while it runs: ``Kernel.start`` sends it, ``Kernel.collect`` gathers the
same later; ``Kernel.interrupt_once`` interrupts a cell once its ranks are in. For a cell
that asks for input (pdb on a rank): ``Kernel.converse`` answers each input_request on the
stdin channel with the next of a scripted list of lines and records the prompts.

The one driver of the project: ``bench/_kernel.py`` loads this file by its path (benchmarks
run as ``python bench/x.py``, where ``tests`` is no package to import from), so a fix here
serves both.
"""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Kernels started by the fixtures: the leak check knows these are expected to live.
KERNEL_PIDS: set[int] = set()
# Kernels that exited normally on shutdown: the leak check knows nothing of theirs may
# remain on disk (a killed kernel's files wait for the next ranks start).
EXITED_NORMALLY: set[int] = set()

# RANKS_TEST_KERNEL=windows: the fixtures' kernels run on Windows CPython under Wine, as
# scripts/windows-python.sh prepares it in .windows/ (see tests/test_windows.py).
WINDOWS_KERNEL = os.environ.get("RANKS_TEST_KERNEL", "") == "windows"
WINDOWS_ROOT = Path(__file__).resolve().parent.parent / ".windows"
WINDOWS_PYTHON = WINDOWS_ROOT / "python" / "python.exe"
# KMP_AFFINITY: torch's OpenMP would ask for the NUMA layout through a call Wine 8 lacks.
WINDOWS_ENV = {"WINEPREFIX": str(WINDOWS_ROOT / "prefix"), "WINEDEBUG": "-all",
               "KMP_AFFINITY": "disabled"}


def windows_kernel_argv() -> list[str]:
    """ipykernel on the Windows CPython under Wine (the connection file's Unix path reads
    as a path on Wine's Z: drive, which is the kernel's current drive)."""
    return ["wine", str(WINDOWS_PYTHON), "-m", "ipykernel_launcher", "-f", "{connection_file}"]


def host_path(path: str) -> str:
    """A path the kernel gave, as this process reads it (a Windows kernel's, via winepath)."""
    if not WINDOWS_KERNEL:
        return path
    found = subprocess.run(["winepath", "-u", path], env={**os.environ, **WINDOWS_ENV},
                           capture_output=True, text=True, check=True)
    return found.stdout.strip()


def default_kernel(cwd: str, env: dict[str, str] | None = None) -> Kernel:
    """The fixtures' kernel: on this interpreter, or on Windows (RANKS_TEST_KERNEL)."""
    if WINDOWS_KERNEL:
        return Kernel(cwd, {**WINDOWS_ENV, **(env or {})}, windows_kernel_argv())
    return Kernel(cwd, env)


class CellFailed(AssertionError):
    """The cell raised: its name, value and the kernel's traceback."""


@dataclass
class Cell:
    msg_id: str
    stdout: str = ""
    stderr: str = ""
    error: dict[str, Any] | None = None
    result: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    prompts: list[str] = field(default_factory=list)  # of the input requests, in order
    started: float = 0.0  # time.time() just before the cell was sent

    def lines(self, name: str) -> list[tuple[float, str]]:
        """The lines of the stream ``name`` (stdout, stderr), each with its arrival."""
        out = []
        for msg in self.messages:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == name:
                out += [(msg["arrived"], line) for line in msg["content"]["text"].splitlines()]
        return out

    @property
    def ended(self) -> float:
        """When the last message (the kernel going idle) arrived, by time.time()."""
        return float(self.messages[-1]["arrived"])

    @property
    def traceback(self) -> str:
        if self.error is None:
            return ""
        return _ANSI.sub("", "\n".join(self.error["traceback"]))

    def check(self) -> Cell:
        """Fail with the kernel's traceback if the cell raised."""
        if self.error is not None:
            raise CellFailed(f"cell raised {self.error['ename']}: {self.error['evalue']}\n"
                             f"{self.traceback}\nstdout:\n{self.stdout}\n"
                             f"stderr:\n{self.stderr}")
        return self


class Kernel:
    def __init__(
        self, cwd: str, env: dict[str, str] | None = None, argv: list[str] | None = None,
        log: Path | None = None,
    ) -> None:
        """``env``: set over this process's environment. ``argv``: the kernel's command line
        (``{connection_file}`` in it), by default ipykernel on this interpreter (the one with
        ranks installed). ``log``: a file for the kernel's own output (its start-up
        warnings, a crash), else it goes where this process's output goes."""
        self.manager = KernelManager(kernel_name="python3")
        kernel_env = dict(os.environ)
        kernel_env.update(env or {})
        if argv is None:
            self.manager.kernel_spec.argv[0] = sys.executable
        else:
            self.manager.kernel_spec.argv[:] = argv
        self._output_drain: threading.Thread | None = None
        if argv is None and log is not None:
            with open(log, "ab") as out:
                self.manager.start_kernel(cwd=cwd, env=kernel_env, stdout=out,
                                          stderr=subprocess.STDOUT)
        elif argv is None:
            self.manager.start_kernel(cwd=cwd, env=kernel_env)
        else:
            # Wine cannot give a Windows program a regular file or /dev/null as its stdout
            # (pytest's capture): "init_sys_streams: Invalid handle". A pipe it can.
            self.manager.start_kernel(cwd=cwd, env=kernel_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT)
            process = self.manager.provisioner.process  # type: ignore[union-attr]
            self._output_drain = threading.Thread(
                target=_drain, args=(process.stdout, log or Path(cwd) / "kernel-output.log"),
                daemon=True, name="kernel-output")
            self._output_drain.start()
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)
        KERNEL_PIDS.add(self.pid)

    @property
    def pid(self) -> int:
        provisioner = self.manager.provisioner
        assert provisioner is not None
        return int(provisioner.process.pid)  # type: ignore[attr-defined]

    def execute(self, code: str, timeout: float = 60.0,
                on_start: Callable[[], None] | None = None) -> Cell:
        """Run ``code`` (dedented) as one cell: everything it showed (see :meth:`collect`)."""
        sent, started = time.time(), time.monotonic()
        try:
            cell = self.collect(self.start(textwrap.dedent(code)), timeout, on_start)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\nthe cell:\n{code}") from None
        cell.seconds = time.monotonic() - started
        cell.started = sent
        return cell

    def start(self, code: str, allow_stdin: bool = False) -> str:
        """Send ``code`` as a cell and return at once: its msg_id, for :meth:`collect`.
        Without ``allow_stdin`` the kernel tells the cell that nothing can answer input(),
        as nbclient does."""
        return str(self.client.execute(code, store_history=True, allow_stdin=allow_stdin))

    def converse(self, code: str, lines: list[str | None], timeout: float = 60.0) -> Cell:
        """Run ``code``, answering its input requests with ``lines`` in order (``None``:
        interrupt the kernel instead, the stop button); the prompts are in ``Cell.prompts``.
        Requests beyond ``lines`` are recorded and left unanswered."""
        started = time.monotonic()
        cell = self.collect(self.start(code, allow_stdin=True), timeout, lines=list(lines))
        cell.seconds = time.monotonic() - started
        return cell

    def collect(self, msg_id: str, timeout: float,
                on_start: Callable[[], None] | None = None,
                lines: list[str | None] | None = None) -> Cell:
        """Everything the cell ``msg_id`` showed from now until the kernel is idle (and has
        replied); TimeoutError after ``timeout`` seconds. ``on_start`` is called when the
        kernel starts to run the cell (its ``execute_input``): its SIGINT handler is in
        place by then, so an interrupt sent from then on reaches the cell. ``lines``: see
        :meth:`converse`."""
        cell = Cell(msg_id)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell {msg_id} did not finish in {timeout} s;"
                                   f" stdout so far:\n{cell.stdout}\nstderr:\n{cell.stderr}"
                                   f"\nprompts: {cell.prompts}")
            if lines is not None:
                self._answer_input(cell, lines)
            try:
                msg = self.client.get_iopub_msg(
                    timeout=remaining if lines is None else min(remaining, 0.05))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            msg["arrived"] = time.time()  # in this process: for tests of output latency
            cell.messages.append(msg)
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    cell.stdout += content["text"]
                else:
                    cell.stderr += content["text"]
            elif kind == "error":
                cell.error = content
            elif kind == "execute_result":
                cell.result = content["data"].get("text/plain")
            elif kind == "execute_input" and on_start is not None:
                on_start()
            elif kind == "status" and content["execution_state"] == "idle":
                break
        # Drain the shell reply so the next execute starts clean.
        self.client.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        return cell

    def _answer_input(self, cell: Cell, lines: list[str | None]) -> None:
        try:
            request = self.client.get_stdin_msg(timeout=0.05)
        except queue.Empty:
            return
        if request["parent_header"].get("msg_id") != cell.msg_id:
            return
        cell.prompts.append(request["content"]["prompt"])
        if not lines:
            return
        line = lines.pop(0)
        if line is None:
            self.interrupt()
        else:
            self.client.input(line)

    def ok(self, code: str, timeout: float = 60.0) -> Cell:
        """Run ``code`` as one cell; CellFailed, with the kernel's traceback, if it raised."""
        return self.execute(code, timeout).check()

    def run(self, code: str, timeout: float = 60.0) -> str:
        """Run ``code`` as one cell; its stdout (CellFailed if it raised)."""
        return self.ok(code, timeout).stdout

    def value(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate an expression in the kernel; it comes back through repr/literal_eval."""
        import ast

        cell = self.ok(expression, timeout)
        assert cell.result is not None, f"{expression!r} displayed nothing"
        return ast.literal_eval(cell.result)

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def interrupt_once(self, code: str, started: list[Path], *, wait: float,
                       settle: float = 0.0, timeout: float) -> tuple[Cell, float]:
        """Run ``code`` and interrupt the kernel once the files ``started`` exist (up to
        ``wait`` seconds, then ``settle`` more); the cell, and the seconds from the interrupt
        to the end of the cell. The cell as a whole has ``timeout`` seconds."""
        done: dict[str, Any] = {}

        def execute() -> None:
            try:
                done["cell"] = self.execute(code, timeout=timeout)
            except BaseException as error:
                done["error"] = error
            done["at"] = time.monotonic()

        runner = threading.Thread(target=execute, name="cell-runner")
        runner.start()
        try:
            deadline = time.monotonic() + wait
            while not all(p.exists() for p in started):
                assert time.monotonic() < deadline, f"never appeared: {started}"
                assert runner.is_alive(), f"the cell ended before the ranks were in: {done}"
                time.sleep(0.02)
            time.sleep(settle)
        finally:
            interrupted = time.monotonic()
            self.interrupt()  # also when the ranks never got in: the cell must end
            runner.join(timeout + 10)
        assert "error" not in done, done["error"]
        cell = done["cell"]
        assert isinstance(cell, Cell)
        return cell, done["at"] - interrupted

    def close(self, now: bool = False) -> None:
        """Shut the kernel down if it still runs (killed if that fails); safe to call again.

        ``now``: kill it at once, without the graceful shutdown in which its exit handlers
        close the ranks it holds (they follow it out by themselves)."""
        # Read before shutting down: the provisioner forgets its process then (and has
        # already forgotten it when the test shut the kernel down itself).
        process = getattr(self.manager.provisioner, "process", None)
        if process is None:
            return
        if process.poll() is None and now:
            self.client.stop_channels()
            self.manager.shutdown_kernel(now=True)
        elif process.poll() is None:
            try:
                self.shutdown()
            except Exception:
                os.kill(process.pid, 9)
        else:
            self.client.stop_channels()  # a killed kernel's: their threads would linger
        KERNEL_PIDS.discard(process.pid)

    def shutdown(self) -> None:
        pid = self.pid
        process = self.manager.provisioner.process  # type: ignore[union-attr]
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)
        KERNEL_PIDS.discard(pid)
        if process.poll() == 0:
            EXITED_NORMALLY.add(pid)
        if self._output_drain is not None:
            self._output_drain.join(10)


def _drain(pipe: Any, log: Path) -> None:
    """Copy a kernel's output pipe to a log file until the kernel and its children close it."""
    with pipe, open(log, "ab") as out:
        while chunk := pipe.read1(1 << 16):
            out.write(chunk)
            out.flush()
