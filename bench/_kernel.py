"""What the benchmarks share: a real Jupyter kernel to drive, and the machine's GPUs.

* :class:`Kernel`: the tests' kernel driver (``tests/kernel.py``: an ipykernel on this
  interpreter, driven through jupyter_client as a notebook drives it, every cell with a
  deadline and each IOPub message with the ``time.time()`` it arrived here), plus one thing
  a benchmark needs: closing it leaves nothing of its process tree behind.
  :meth:`Kernel.run` gives a cell's stdout, :meth:`Kernel.execute` all it sent;
  :class:`CellFailed` says that a cell raised.
* :class:`Launcher`: one of the launchers a benchmark compares, as the cell defining it.
* :func:`gpu_count` and :func:`detect_backend`: read from ``nvidia-smi -L``, so the benchmark's
  own process never initialises CUDA.

Import it from a script in this folder (``python bench/<script>.py`` puts the folder first on
``sys.path``). The driver is loaded from ``tests/kernel.py`` by its path, not imported from a
package: ``tests`` is none, and one driver for both keeps their kernels alike. It (and
jupyter_client with it) is loaded only when a script asks for :class:`Kernel`, :class:`Cell`
or :class:`CellFailed`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil

DRIVER = Path(__file__).resolve().parent.parent / "tests" / "kernel.py"


def _driver() -> ModuleType:
    """tests/kernel.py, loaded once under the name ``ranks_test_kernel``."""
    name = "ranks_test_kernel"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DRIVER)
        assert spec is not None and spec.loader is not None, DRIVER
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look it up
        spec.loader.exec_module(module)
    return sys.modules[name]


def _kernel_class() -> type:
    driver = _driver()

    class Kernel(driver.Kernel):  # type: ignore[name-defined,misc]
        """The tests' driver; closing it also ends what is left of its process tree."""

        def close(self, now: bool = True) -> None:
            """Stop the kernel (``now``: kill it; else its exit handlers close its ranks
            first); whatever of its process tree is left then gets SIGKILL."""
            tree = process_tree(self.pid)
            with contextlib.suppress(Exception):
                super().close(now=now)
            kill_processes(tree)

    return Kernel


def __getattr__(name: str) -> Any:
    """Kernel, Cell and CellFailed, made on first use (PEP 562)."""
    if name == "Kernel":
        globals()[name] = _kernel_class()
    elif name in ("Cell", "CellFailed"):
        globals()[name] = getattr(_driver(), name)
    else:
        raise AttributeError(name)
    return globals()[name]


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
