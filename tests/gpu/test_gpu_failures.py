"""Failures in NCCL, on two GPUs, from a kernel that touched CUDA first.

Rank 0 waits in an NCCL ``all_reduce`` that rank 1 never joins: NCCL is asynchronous, so
rank 0 is blocked in CUDA (``total.item()`` waits for the collective's kernel), where SIGINT
cannot reach Python. Meanwhile rank 1

    raise      raises ValueError               the cell gets the ValueError
    sigkill    SIGKILLs itself                 the cell gets RankCrashed (SIGKILL)
    sleep      sleeps; the kernel is           the cell ends with KeyboardInterrupt
               interrupted (jupyter_client)

and each must reach the cell fast: within 2 s of rank 1's failure (it writes
``time.time()`` to a file just before), or within 5 s of the interrupt. Incumbents wait out
NCCL's timeout here (measured: 36.9 s with Accelerate). After each case neither GPU holds
anything of the ranks (nvidia-smi), the kernel holds only its own context, and the kernel's
next call works (a fresh NCCL all-reduce). The figures go into the measurements report
(``conftest.py``), under ``nccl_failures``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gpu_measure
import pytest
from kernel import Kernel

GPUS = gpu_measure.gpu_count()
TESTS = str(Path(__file__).resolve().parent.parent)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs, {GPUS} visible"),
]

FAILURE_WITHIN = 2.0  # seconds from rank 1's failure to the exception in the cell
INTERRUPT_WITHIN = 5.0  # seconds from the kernel's interrupt to the end of the cell
INTERRUPT_AFTER = 1.0  # seconds the test waits, once both ranks are in, before interrupting

SETUP = f"""
import os
import signal
import sys
import time

import torch

import ranks

probe = torch.ones(1, device="cuda")  # the kernel's own CUDA context, on GPU 0
torch.cuda.synchronize()
sys.path.insert(0, {TESTS!r})
import crashes  # crashes.facts: the exception the cell got, as plain data


def fail_in_nccl(folder, how):
    import os
    import signal
    import time
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import ranks

    me = ranks.current()
    Path(folder, f"pid-{{me.rank}}").write_text(str(os.getpid()))
    total = torch.ones(1, device=me.device)
    dist.barrier()  # both ranks are here; rank 0 goes on into the all_reduce
    if me.rank == 1:
        time.sleep(1.0)  # rank 0 sits in the all_reduce by now
        Path(folder, "pid").write_text(str(os.getpid()))
        Path(folder, "started-1").write_text("")
        if how == "sleep":
            time.sleep(600)  # until the kernel is interrupted
        Path(folder, "fired").write_text(repr(time.time()))
        if how == "raise":
            raise ValueError("rank 1 gives up")
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
    Path(folder, "started-0").write_text("")
    dist.all_reduce(total)  # rank 1 never joins
    return total.item()  # NCCL is asynchronous: this is where rank 0 blocks


def nccl_sum():
    import torch
    import torch.distributed as dist

    import ranks

    me = ranks.current()
    total = torch.tensor([float(me.rank + 1)], device=me.device)
    dist.all_reduce(total)
    return total.item()
"""

CALL = """
started = time.time()
try:
    ranks.run(fail_in_nccl, args=({folder!r}, {how!r}), torch_dist=True, timeout=120)
except BaseException as error:
    facts = crashes.facts(error, started, time.time(), {folder!r})
else:
    facts = None
"""

NEXT_CALL = "ranks.run(nccl_sum, torch_dist=True, timeout=120)"


def _setup(kernel: Kernel) -> tuple[int, dict[int, int] | None]:
    """Touch CUDA in the kernel and define the ranks' code; its pid and GPU memory then."""
    kernel.ok(SETUP, timeout=180)
    pid = kernel.value("os.getpid()")
    return pid, gpu_measure.listing().get(pid)


def _rank_pids(folder: Path) -> set[int]:
    return {int((folder / f"pid-{rank}").read_text()) for rank in range(GPUS)}


def _after(kernel: Kernel, folder: Path, kernel_pid: int,
           kernel_before: dict[int, int] | None) -> dict[str, Any]:
    """Nothing of the ranks is left on the GPUs, and the kernel's next call works."""
    seen = gpu_measure.check_ranks_gone(_rank_pids(folder), kernel_pid, kernel_before)
    assert kernel.value(NEXT_CALL, timeout=150) == [GPUS * (GPUS + 1) / 2] * GPUS
    return seen


def _record(case: str, figures: dict[str, Any]) -> None:
    gpu_measure.MEASUREMENTS.setdefault("nccl_failures", {})[case] = figures


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_failure_while_peer_waits_in_nccl(kernel: Kernel, how: str, tmp_path: Path) -> None:
    kernel_pid, kernel_before = _setup(kernel)
    kernel.ok(CALL.format(folder=str(tmp_path), how=how), timeout=150)
    facts = kernel.value("facts")
    assert facts is not None, "ranks.run returned"
    figures = {"since_fired_s": facts["since_fired"], "since_start_s": facts["since_start"]}
    _record(how, figures)
    notes = "\n".join(facts["notes"])
    if how == "raise":
        assert facts["type"] == "builtins.ValueError", facts
        assert facts["message"] == "rank 1 gives up", facts
        assert f"raised on rank 1 (pid {facts['failing_pid']}, cuda:1 (GPU 1))" in notes, facts
        assert 'raise ValueError("rank 1 gives up")' in facts["cause"], facts
    else:
        assert facts["type"] == "ranks._errors.RankCrashed", facts
        assert facts["rank"] == 1 and facts["pid"] == facts["failing_pid"], facts
        assert facts["signal_name"] == "SIGKILL" and facts["exitcode"] == -9, facts
    assert "rank 0:" in notes, facts  # the peer stopped in the all_reduce: an echo, noted
    assert facts["since_fired"] < FAILURE_WITHIN, (
        f"the failure took {facts['since_fired']:.2f} s to reach the cell: {facts}")
    figures["after"] = _after(kernel, tmp_path, kernel_pid, kernel_before)


@pytest.mark.timeout(300)
def test_interrupt_while_rank_waits_in_nccl(fresh_kernel: Kernel, tmp_path: Path) -> None:
    folder = tmp_path / "case"  # the ranks' marker files, apart from the kernel's own
    folder.mkdir()
    kernel_pid, kernel_before = _setup(fresh_kernel)
    fresh_kernel.ok("handler_before = signal.getsignal(signal.SIGINT)")
    cell, seconds = fresh_kernel.interrupt_once(
        f"ranks.run(fail_in_nccl, args=({str(folder)!r}, 'sleep'), torch_dist=True)",
        [folder / "started-0", folder / "started-1"],
        wait=120,  # start-up: a fresh kernel's template, NCCL
        settle=INTERRUPT_AFTER,  # rank 0 is blocked in CUDA, rank 1 in time.sleep
        timeout=150,
    )
    figures: dict[str, Any] = {"since_interrupt_s": seconds,
                               "traceback_tail": cell.traceback[-1500:]}
    _record("interrupt", figures)
    assert cell.error is not None and cell.error["ename"] == "KeyboardInterrupt", (
        cell.traceback or cell)
    assert seconds < INTERRUPT_WITHIN, f"the cell took {seconds:.2f} s to end after the interrupt"
    assert not (folder / "fired").exists()  # rank 1 was still asleep: the interrupt ended it
    assert fresh_kernel.value("signal.getsignal(signal.SIGINT) is handler_before") is True
    figures["after"] = _after(fresh_kernel, folder, kernel_pid, kernel_before)
