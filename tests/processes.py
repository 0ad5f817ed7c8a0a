"""Which processes belong to this test session: its ranks and templates, wherever they run
(Windows ranks under Wine carry the marker too)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

# Marks every process this session starts (kernels, templates and ranks inherit it), so the
# leak check neither blames nor kills the ranks of another test session on the same machine.
SESSION_VARIABLE = "RANKS_TEST_SESSION"
SESSION = str(os.getpid())
os.environ[SESSION_VARIABLE] = SESSION


def ours(proc: psutil.Process) -> bool:
    """Whether ``proc`` belongs to this test session (it carries the session's marker)."""
    try:
        return proc.environ().get(SESSION_VARIABLE) == SESSION
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False  # gone, or a zombie: it holds nothing


def rank_processes() -> list[psutil.Process]:
    """Ranks (spawned, or forked from a template) and templates whose kernel is gone.

    A template that belongs to a live process (this one, or a kernel) is expected to stay:
    there is one per kernel, for the kernel's lifetime.
    """
    found = []
    for proc in psutil.process_iter(["cmdline", "ppid"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ranks." not in cmdline or not ours(proc):
            continue
        if "ranks._worker" in cmdline:
            found.append(proc)
        elif "ranks._template" in cmdline:
            try:
                parent_cmdline = " ".join(psutil.Process(proc.info["ppid"]).cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                parent_cmdline = ""
            # A fork of a template is a rank; a template re-parented to init is an orphan.
            if "ranks._template" in parent_cmdline or proc.info["ppid"] == 1:
                found.append(proc)
    return found


# What multiprocessing names the segments it creates in /dev/shm: named semaphores (Lock,
# Semaphore, a spawn Pool's queues) and shared_memory.SharedMemory blocks.
MULTIPROCESSING_SHM = ("sem.mp-", "psm_")


def shm_segments() -> set[str]:
    """``/dev/shm`` entries that ranks or multiprocessing name."""
    shm = Path("/dev/shm")
    if not shm.exists():
        return set()
    return {
        p.name for p in shm.iterdir()
        if "ranks" in p.name or p.name.startswith(MULTIPROCESSING_SHM)
    }


def unused_shm(names: set[str]) -> set[str]:
    """Those of ``names`` that still exist and that no process has mapped: left behind,
    not in use by a process still running (another test session's, on a shared machine)."""
    left = {name for name in names if os.path.exists(f"/dev/shm/{name}")}
    if not left:
        return left
    for proc in psutil.process_iter():
        try:
            with open(f"/proc/{proc.pid}/maps") as maps:
                mapped = maps.read()
        except OSError:
            continue
        left = {name for name in left if f"/dev/shm/{name}" not in mapped}
        if not left:
            break
    return left


def wait_for_files(paths: Iterable[Path], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    missing = list(paths)
    while missing:
        assert time.monotonic() < deadline, f"never appeared: {missing}"
        time.sleep(0.02)
        missing = [p for p in missing if not p.exists()]


def gone_within(pids: Iterable[int], seconds: float) -> list[int]:
    """The pids still alive after ``seconds`` (a zombie counts as dead)."""
    deadline = time.monotonic() + seconds
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if is_alive(pid)]
    return alive


def is_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def made_by_another_session(name: str) -> bool:
    """A data folder (``ranks-data-<pid>-...``) that a live process of another test session
    or program on this machine made: not this session's to answer for."""
    parts = name.split("-")
    if parts[:2] != ["ranks", "data"] or len(parts) < 3 or not parts[2].isdigit():
        return False
    try:
        creator = psutil.Process(int(parts[2]))
        return creator.status() != psutil.STATUS_ZOMBIE and not ours(creator)
    except psutil.NoSuchProcess:
        return False
