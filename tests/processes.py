"""Which processes belong to this test session: its ranks and templates, wherever they run
(Windows ranks under Wine carry the marker too)."""

from __future__ import annotations

import os

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
