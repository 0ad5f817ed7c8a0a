"""Ways to make a rank fail, for the crash table in ``test_failures.py``.

    WHERE  load        unpickling the call's argument on the rank
           run         running fn
           collective  in fn while the peer waits in a Gloo all_reduce (torch_dist=True)
           dump        pickling fn's result on the rank
           kernel      unpickling the result in the kernel (only "raise" makes sense there)
      x
    HOW    raise | sys.exit | os._exit | segfault | sigkill | hang

Rank 1 fails; rank 0 meanwhile waits (sleeps, or sits in the collective) and must be
stopped by ranks. Just before it fails, rank 1 writes its pid and ``time.time()`` into
``$CRASH_DIR``, so a test can name the process and time how long the error took to reach
the caller. :func:`facts` turns the exception the caller got into plain data, the same in
pytest and in a kernel (where it comes back through ``repr``).

The ranks import this module by name (it is on the caller's ``sys.path``, which ranks
inherit), so it imports nothing but the standard library at the top.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FAILING_RANK = 1
WHERES = ("load", "run", "collective", "dump")
HOWS = ("raise", "sys.exit", "os._exit", "segfault", "sigkill", "hang")
EXIT_CODES = {"sys.exit": 3, "os._exit": 4}
WAIT = 60.0  # how long a rank "hangs": far past every deadline of the tests


class Boom(Exception):
    """The user's own exception type: the caller must get exactly this type back."""


def _failing() -> bool:
    return os.environ.get("RANK") == str(FAILING_RANK)


def fail(how: str) -> None:
    """Fail the way ``how`` says, after recording who and when in ``$CRASH_DIR``."""
    folder = Path(os.environ["CRASH_DIR"])
    print(f"rank {os.environ['RANK']} is about to {how}", flush=True)
    (folder / "pid").write_text(str(os.getpid()))
    (folder / "fired").write_text(repr(time.time()))
    if how == "raise":
        raise Boom(f"boom on rank {os.environ['RANK']}")
    if how in EXIT_CODES:
        (sys.exit if how == "sys.exit" else os._exit)(EXIT_CODES[how])
    if how == "segfault":
        if sys.platform == "win32":
            # ctypes turns an access violation into OSError there; this one is real.
            faulthandler._read_null()
        ctypes.string_at(0)
    if how == "sigkill":
        # Sent by another process, as the OOM killer or a user's `kill -9` would. Windows:
        # TerminateProcess (os.kill with any number but Ctrl events) with exit code 9.
        kill = (["kill", "-KILL", str(os.getpid())] if os.name == "posix" else
                [sys.executable, "-c", f"import os; os.kill({os.getpid()}, 9)"])
        subprocess.run(kill, check=False)
    time.sleep(WAIT)  # "hang"; and what a SIGKILLed rank never gets to finish
    raise AssertionError(f"rank survived {how!r}")


def wait(*args: Any) -> None:
    """What rank 0 does while rank 1 fails: wait to be stopped."""
    time.sleep(WAIT)


# --- load: fails while the rank unpickles the argument -------------------------------------


class FailOnLoad:
    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        return (_load, (self.how,))


def _load(how: str) -> None:
    if _failing():
        fail(how)


# --- run: fails in fn ----------------------------------------------------------------------


def fail_on_rank(how: str) -> None:
    if _failing():
        fail(how)
    wait()


# --- collective: fails while the peer waits in all_reduce ----------------------------------


def fail_in_collective(how: str) -> float:
    import torch
    import torch.distributed as dist

    dist.barrier()  # both ranks are here; rank 0 goes on into the all_reduce
    if _failing():
        time.sleep(0.2)  # let rank 0 block in the all_reduce first
        fail(how)
    total = torch.ones(1)
    dist.all_reduce(total)  # rank 1 never joins
    return float(total.item())


# --- dump: fails while the rank pickles the result -----------------------------------------


class FailOnDump:
    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self) -> tuple[Any, ...]:
        fail(self.how)
        return (FailOnDump, (self.how,))


def return_failing(how: str) -> FailOnDump | None:
    if _failing():
        return FailOnDump(how)
    wait()
    return None


# --- kernel: the result cannot be rebuilt in the kernel ------------------------------------


class RanksOnly:
    """Rebuilds on a rank (RANK is set there) and raises when rebuilt anywhere else."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, ())


def _rebuild() -> RanksOnly:
    if os.environ.get("RANK") is None:
        raise Boom("a RanksOnly result cannot be rebuilt outside a rank")
    return RanksOnly()


def return_ranks_only() -> RanksOnly:
    return RanksOnly()


# --- the table -----------------------------------------------------------------------------


def case(where: str, how: str) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """``(fn, args, options)`` for ``ranks.run`` that fail ``how`` at ``where``."""
    options: dict[str, Any] = {}
    if how == "hang":
        # start-up counts into timeout: importing torch and joining the group take seconds
        options["timeout"] = 8.0 if where == "collective" else 2.0
    if where == "load":
        return wait, (FailOnLoad(how),), options
    if where == "run":
        return fail_on_rank, (how,), options
    if where == "collective":
        return fail_in_collective, (how,), {**options, "torch_dist": True}
    if where == "dump":
        return return_failing, (how,), options
    if where == "kernel":
        assert how == "raise", how
        return return_ranks_only, (), options
    raise ValueError(where)


def facts(error: BaseException, started: float, arrived: float, folder: str) -> dict[str, Any]:
    """The exception as plain data, with timings: ``since_fired`` is from rank 1's failure
    to the caller's ``except``, ``since_start`` from the call to it."""
    fired_file, pid_file = Path(folder, "fired"), Path(folder, "pid")
    fired = float(fired_file.read_text()) if fired_file.exists() else None
    cause = error.__cause__
    return {
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "message": str(error),
        "rank": getattr(error, "rank", None),
        "pid": getattr(error, "pid", None),
        "exitcode": getattr(error, "exitcode", None),
        "signal_name": getattr(error, "signal_name", None),
        "last_lines": list(getattr(error, "last_lines", ())),
        "stacks": dict(getattr(error, "stacks", {})),
        "notes": list(getattr(error, "__notes__", [])),
        "cause": getattr(cause, "text", None),
        "failing_pid": int(pid_file.read_text()) if pid_file.exists() else None,
        "since_fired": None if fired is None else arrived - fired,
        "since_start": arrived - started,
        "platform": sys.platform,  # the kernel's
    }
