"""The public surface is exactly this; anything else lives in private modules."""

import subprocess
import sys

import ranks

PUBLIC = {
    "RankCrashed", "RankFailed", "RankInfo", "RanksError", "RanksTimeout", "World",
    "WorldBroken", "current", "run",
}


def test_public_names_are_pinned() -> None:
    assert set(ranks.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(ranks, name).__module__.startswith("ranks._")
    assert all(issubclass(getattr(ranks, e), ranks.RanksError)
               for e in ("RankCrashed", "RankFailed", "RanksTimeout", "WorldBroken"))


def test_importing_ranks_starts_nothing() -> None:
    """No thread, no process, no signal handler, no torch: importing has no effects."""
    probe = """
import signal, sys, threading, atexit
before = signal.getsignal(signal.SIGINT)
import ranks
import psutil
assert "torch" not in sys.modules, "torch imported"
assert threading.active_count() == 1, threading.enumerate()
assert signal.getsignal(signal.SIGINT) is before
assert not psutil.Process().children(), "a process started"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
