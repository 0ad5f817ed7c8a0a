"""GPU facts for the GPU tests, read from outside: nvidia-smi, never CUDA in the test process.

The test process must not create a CUDA context itself (it would show up in the very
process listing the tests read, and the point of the tests is who holds GPU memory), so:

* :func:`gpu_count` asks a child interpreter (``torch.cuda.device_count()``), and only
  when ``nvidia-smi`` exists, so a machine without GPUs answers 0 at once;
* :func:`gpus` and :func:`compute_apps` parse ``nvidia-smi --query-*`` output;
* :class:`Sampler` polls :func:`compute_apps` in a thread while a cell runs in the kernel,
  to see the ranks' memory during the call;
* :func:`check_ranks_gone` asserts, once a test's ranks should be gone, that none of them
  (and nothing else under the kernel) holds GPU memory and that the kernel holds what it
  held before.

:data:`MEASUREMENTS` collects the figures the tests measured; ``conftest.py`` beside this file
prints them at the end of the session and writes them as JSON (to ``$RANKS_GPU_REPORT``, or
``$OUT/gpu_measurements.json`` where ``$OUT`` is set), whatever pytest's capture mode.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

MEASUREMENTS: dict[str, Any] = {}


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str  # as nvidia-smi writes it: "GPU-xxxxxxxx-..."
    name: str
    memory_used_mib: int


@dataclass(frozen=True)
class ComputeApp:
    pid: int
    used_mib: int
    gpu_uuid: str


def normal_uuid(uuid: str) -> str:
    """nvidia-smi writes "GPU-<uuid>", torch's device properties just "<uuid>"."""
    uuid = uuid.strip().lower()
    return uuid if uuid.startswith(("gpu-", "mig-")) else f"gpu-{uuid}"


@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """CUDA devices this Python sees (0 without nvidia-smi or torch), asked in a child."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        answer = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        return int(answer.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def _query(what: str, fields: str) -> list[list[str]]:
    smi = shutil.which("nvidia-smi")
    assert smi is not None, "nvidia-smi is not on PATH"
    out = subprocess.run(
        [smi, f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [[cell.strip() for cell in line.split(",")] for line in out.splitlines() if line.strip()]


def gpus() -> list[Gpu]:
    return [
        Gpu(int(index), uuid, name, _mib(used))
        for index, uuid, name, used in _query("gpu", "index,uuid,name,memory.used")
    ]


def compute_apps() -> list[ComputeApp]:
    apps = []
    for row in _query("compute-apps", "pid,used_memory,gpu_uuid"):
        try:
            apps.append(ComputeApp(int(row[0]), _mib(row[1]), row[2]))
        except (ValueError, IndexError):
            continue  # "[N/A]" or a row of a process that is going away
    return apps


def _mib(text: str) -> int:
    try:
        return int(float(text))
    except ValueError:
        return -1  # "[N/A]": nvidia-smi could not tell (seen inside some containers)


def by_pid(apps: list[ComputeApp], index_of: dict[str, int]) -> dict[int, dict[int, int]]:
    """{pid: {gpu index: MiB}} from a compute-apps listing."""
    table: dict[int, dict[int, int]] = {}
    for app in apps:
        gpu = index_of.get(normal_uuid(app.gpu_uuid), -1)
        table.setdefault(app.pid, {})[gpu] = app.used_mib
    return table


class Sampler:
    """Polls nvidia-smi's compute apps in a thread; keeps each (pid, GPU)'s peak MiB."""

    def __init__(self, index_of: dict[str, int], period: float = 0.2) -> None:
        self._index_of = index_of
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self.peaks: dict[int, dict[int, int]] = {}
        self.samples = 0
        self.errors: list[str] = []

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                table = by_pid(compute_apps(), self._index_of)
            except Exception as error:  # a failed poll must not end the sampling
                self.errors.append(f"{type(error).__name__}: {error}")
                table = {}
            self.samples += 1
            for pid, per_gpu in table.items():
                peaks = self.peaks.setdefault(pid, {})
                for gpu, mib in per_gpu.items():
                    peaks[gpu] = max(peaks.get(gpu, mib), mib)
            self._stop.wait(self._period)


def wait_until_gone(
    pids: set[int], index_of: dict[str, int], timeout: float = 20.0
) -> dict[int, dict[int, int]]:
    """Poll until none of ``pids`` holds GPU memory (or time runs out); the last listing."""
    deadline = time.monotonic() + timeout
    while True:
        table = by_pid(compute_apps(), index_of)
        if not pids & table.keys() or time.monotonic() > deadline:
            return table
        time.sleep(0.25)


def listing() -> dict[int, dict[int, int]]:
    """{pid: {GPU index: MiB}} of every process nvidia-smi lists now."""
    index_of = {normal_uuid(g.uuid): g.index for g in gpus()}
    return by_pid(compute_apps(), index_of)


KERNEL_SLACK_MIB = 32  # how far nvidia-smi's figure for the kernel's own context may move


def check_ranks_gone(
    rank_pids: set[int], kernel_pid: int, kernel_before: dict[int, int] | None,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Once a test's ranks should be gone: none of ``rank_pids`` is alive or holds GPU
    memory, no other process under the kernel does, and the kernel holds what it held
    before (``kernel_before``, its ``{GPU index: MiB}``; None where nvidia-smi did not list
    it), on no other GPU. Waits for nvidia-smi to let go of the ranks (``timeout``), asserts,
    and returns what it saw (MiB per GPU index) for the measurements report."""
    import psutil

    index_of = {normal_uuid(g.uuid): g.index for g in gpus()}
    table = wait_until_gone(rank_pids, index_of, timeout)
    try:
        tree = {p.pid for p in psutil.Process(kernel_pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        tree = set()
    seen = {
        "ranks": {pid: per for pid, per in table.items() if pid in rank_pids},
        "kernel": table.get(kernel_pid),
        "kernel_before": kernel_before,
        "under_kernel": {pid: per for pid, per in table.items() if pid in tree - rank_pids},
        "others": {pid: per for pid, per in table.items()
                   if pid not in rank_pids | tree | {kernel_pid}},
    }
    alive = sorted(pid for pid in rank_pids if _alive(pid))
    assert not alive, f"rank processes still alive: {alive} ({seen})"
    assert not seen["ranks"], f"rank pids still listed by nvidia-smi: {seen}"
    assert not seen["under_kernel"], f"processes under the kernel hold GPU memory: {seen}"
    if kernel_before is not None:
        kernel_now = seen["kernel"] or {}
        assert set(kernel_now) == set(kernel_before), (
            f"the kernel held memory on GPUs {sorted(kernel_before)}, now {sorted(kernel_now)}:"
            f" {seen}")
        for gpu, mib in kernel_now.items():
            assert mib <= kernel_before[gpu] + KERNEL_SLACK_MIB, (
                f"the kernel holds {mib} MiB on GPU {gpu}, {kernel_before[gpu]} MiB before: {seen}")
    return seen


def _alive(pid: int) -> bool:
    import psutil

    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
