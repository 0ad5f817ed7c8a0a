"""A real Jupyter kernel for tests, driven through jupyter_client.

``Kernel.execute`` runs one cell and returns everything the cell showed: the stdout and
stderr stream text, the error (name, value, traceback) and the displayed result, plus the
raw IOPub messages for tests that look at message order or parent headers (each with
``msg["arrived"]``, the ``time.time()`` at which this process received it).
"""

from __future__ import annotations

import os
import queue
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from jupyter_client.manager import KernelManager

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Kernels started by the fixtures: the leak check knows these are expected to live.
KERNEL_PIDS: set[int] = set()


@dataclass
class Cell:
    msg_id: str
    stdout: str = ""
    stderr: str = ""
    error: dict[str, Any] | None = None
    result: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def traceback(self) -> str:
        if self.error is None:
            return ""
        return _ANSI.sub("", "\n".join(self.error["traceback"]))

    def check(self) -> Cell:
        """Fail with the kernel's traceback if the cell raised."""
        if self.error is not None:
            raise AssertionError(f"cell raised:\n{self.traceback}\nstdout:\n{self.stdout}\n"
                                 f"stderr:\n{self.stderr}")
        return self


class Kernel:
    def __init__(self, cwd: str, env: dict[str, str] | None = None) -> None:
        self.manager = KernelManager(kernel_name="python3")
        kernel_env = dict(os.environ)
        kernel_env.update(env or {})
        # The kernel must run this interpreter (the one with ranks installed).
        self.manager.kernel_spec.argv[0] = sys.executable
        self.manager.start_kernel(cwd=cwd, env=kernel_env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)
        KERNEL_PIDS.add(self.pid)

    @property
    def pid(self) -> int:
        provisioner = self.manager.provisioner
        assert provisioner is not None
        return int(provisioner.process.pid)  # type: ignore[attr-defined]

    def execute(self, code: str, timeout: float = 60.0) -> Cell:
        started = time.monotonic()
        msg_id = self.client.execute(code, store_history=True)
        cell = Cell(msg_id)
        deadline = started + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"cell did not finish in {timeout} s:\n{code}\n"
                                   f"stdout so far:\n{cell.stdout}\nstderr:\n{cell.stderr}")
            try:
                msg = self.client.get_iopub_msg(timeout=remaining)
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
            elif kind == "status" and content["execution_state"] == "idle":
                break
        # Drain the shell reply so the next execute starts clean.
        self.client.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        cell.seconds = time.monotonic() - started
        return cell

    def ok(self, code: str, timeout: float = 60.0) -> Cell:
        return self.execute(code, timeout).check()

    def value(self, expression: str, timeout: float = 60.0) -> Any:
        """Evaluate an expression in the kernel; it comes back through repr/literal_eval."""
        import ast

        cell = self.ok(expression, timeout)
        assert cell.result is not None, f"{expression!r} displayed nothing"
        return ast.literal_eval(cell.result)

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def shutdown(self) -> None:
        pid = self.pid
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)
        KERNEL_PIDS.discard(pid)
