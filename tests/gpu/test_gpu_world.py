"""On two GPUs, from a kernel that touched CUDA first: a World with NCCL keeps a DDP model
across cells, driven by the magics as a notebook would; then a one-shot call.

    kernel:   torch.ones(1, device="cuda")                the kernel's own context, GPU 0
    kernel:   %load_ext ranks / %ranks start --torch-dist  one rank per GPU, NCCL group
    %%ranks   model + DDP + optimizer on ranks.current().device
    %%ranks   5 steps, each rank on its own batches        c1 = %ranks pull checksum_now
    %%ranks   5 more steps                                 c2 = %ranks pull checksum_now
    kernel:   %ranks status                                pid, device, GPU memory per rank
    kernel:   %ranks stop                                  nvidia-smi: no rank left

The checksums must be equal on both ranks at each pull (DDP averaged the gradients although
each rank saw other data) and must change between pulls (the model lives on across cells
and trains). Each rank holds memory on its own GPU only, the kernel on GPU 0 only, and after
``%ranks stop`` nothing of the ranks is left on either GPU. The second test does the same
for one ``ranks.run`` call. What ``%ranks status`` and nvidia-smi showed, and how long each
step took, go into the measurements report (``conftest.py``).
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import gpu_measure
import pytest
from kernel import Kernel

GPUS = gpu_measure.gpu_count()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs, {GPUS} visible"),
]

CUDA_FIRST = """
import os
import time
import torch

probe = torch.ones(1, device="cuda")  # the kernel's own CUDA context, on GPU 0
torch.cuda.synchronize()
"""

START = """
%load_ext ranks
started = time.monotonic()
%ranks start --torch-dist
start_seconds = time.monotonic() - started
"""

BUILD = """%%ranks
import os

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import ranks

me = ranks.current()
pid = os.getpid()
device = str(me.device)
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
model = DDP(net.to(me.device), device_ids=[me.local_rank])
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
batches = torch.Generator().manual_seed(100 + me.rank)  # each rank its own data
steps = 0


def checksum():
    return sum(float(p.detach().double().sum()) for p in model.module.parameters())


checksum_now = checksum()
"""

TRAIN = """%%ranks
for _ in range(5):
    x = torch.randn(16, 32, generator=batches).to(me.device)
    y = torch.randn(16, 1, generator=batches).to(me.device)
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()  # DDP all-reduces the gradients over NCCL
    optimizer.step()
    steps += 1
torch.cuda.synchronize()
checksum_now = checksum()
"""

ONE_SHOT = """
def one_step():
    import os

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import ranks

    me = ranks.current()
    model = DDP(torch.nn.Linear(8, 1).to(me.device), device_ids=[me.local_rank])
    model(torch.full((4, 8), float(me.rank + 1), device=me.device)).sum().backward()
    torch.cuda.synchronize()
    return {
        "pid": os.getpid(),
        "device": str(me.device),
        "backend": str(dist.get_backend()),
        "grad": model.module.weight.grad.flatten().tolist(),
    }


started = time.monotonic()
one_shot = ranks.run(one_step, torch_dist=True, timeout=300)
one_shot_seconds = time.monotonic() - started
"""


def _kernel_before(kernel: Kernel) -> tuple[int, dict[int, int] | None]:
    """Touch CUDA in the kernel; its pid and what nvidia-smi lists for it then."""
    kernel.ok(CUDA_FIRST, timeout=180)
    pid = kernel.value("os.getpid()")
    return pid, gpu_measure.listing().get(pid)


def _status_rows(text: str) -> list[dict[str, str]]:
    """``%ranks status`` as its text form shows it: one dict per rank, keyed by column."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    assert header == ["rank", "pid", "device", "GPU memory", "state"], text
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[1:]]
    assert all(len(row) == len(header) for row in rows), text
    return [dict(zip(header, row, strict=True)) for row in rows]


@pytest.mark.timeout(420)
def test_world_keeps_a_ddp_model_across_cells(kernel: Kernel) -> None:
    kernel_pid, kernel_before = _kernel_before(kernel)
    # Filled in as the test goes, so that a failed check still reports what was measured.
    report: dict[str, Any] = {"kernel_pid": kernel_pid, "kernel_mib_before": kernel_before}
    gpu_measure.MEASUREMENTS["world_magics_ddp_across_cells"] = report
    cells = report["cell_seconds"] = {}
    cells["start"] = kernel.ok(START, timeout=300).seconds
    report["start_seconds"] = kernel.value("start_seconds")
    try:
        cells["build"] = kernel.ok(BUILD, timeout=120).seconds
        kernel.ok("c0 = %ranks pull checksum_now\npids = %ranks pull pid\n"
                  "devices = %ranks pull device")
        pids = report["rank_pids"] = kernel.value("pids")
        assert len(pids) == GPUS and len(set(pids)) == GPUS, pids
        assert kernel.value("devices") == [f"cuda:{r}" for r in range(GPUS)]

        cells["train_1"] = kernel.ok(TRAIN, timeout=120).seconds
        kernel.ok("c1 = %ranks pull checksum_now")
        cells["train_2"] = kernel.ok(TRAIN, timeout=120).seconds
        kernel.ok("c2 = %ranks pull checksum_now\nsteps = %ranks pull steps")
        c0, c1, c2 = (kernel.value(name) for name in ("c0", "c1", "c2"))
        report["checksums"] = {"built": c0, "after_5_steps": c1, "after_10_steps": c2}
        assert kernel.value("steps") == [10] * GPUS
        for name, sums in (("c0", c0), ("c1", c1), ("c2", c2)):
            # DDP keeps the replicas identical: every rank applies the same averaged gradient.
            assert all(math.isclose(s, sums[0], rel_tol=1e-9, abs_tol=1e-9) for s in sums), (
                name, sums)
        assert abs(c1[0] - c0[0]) > 1e-6 and abs(c2[0] - c1[0]) > 1e-6, (
            f"the model did not change between cells: {c0}, {c1}, {c2}")

        status = kernel.ok("%ranks status").result
        during = report["mib_while_world_ran"] = gpu_measure.listing()
        report["ranks_status"] = status
        assert status is not None, "%ranks status displayed nothing"
        rows = _status_rows(status)
        assert [int(r["rank"]) for r in rows] == list(range(GPUS)), status
        assert [int(r["pid"]) for r in rows] == pids, (status, pids)
        assert [r["device"] for r in rows] == [f"cuda:{g} (GPU {g})" for g in range(GPUS)], (
            status)
        assert len({r["device"] for r in rows}) == GPUS, status
        assert all(r["state"] == "idle" for r in rows), status
        # Per-process accounting (the kernel was listed): each rank's memory must show.
        if kernel_before is not None:
            assert all(re.fullmatch(r"\d+ MiB", r["GPU memory"]) for r in rows), status
        # nvidia-smi numbers GPUs physically: the kernel's cuda:k is GPU k where it sees all.
        if kernel_before is not None and os.environ.get("CUDA_VISIBLE_DEVICES") is None:
            for rank, pid in enumerate(pids):
                assert set(during.get(pid, {})) == {rank}, (
                    f"rank {rank} (pid {pid}) should hold memory on GPU {rank} only: {during}")
            assert set(during.get(kernel_pid, {})) == {0}, (
                f"the kernel should hold memory on GPU 0 only: {during}")

        cells["stop"] = kernel.ok("%ranks stop").seconds
        report["after_stop"] = gpu_measure.check_ranks_gone(set(pids), kernel_pid, kernel_before)
        gone = kernel.execute("%ranks status")
        assert gone.error is not None and gone.error["ename"] == "RanksError", gone.traceback
        assert "no ranks are running" in gone.error["evalue"], gone.error
    finally:
        kernel.execute("%ranks stop")  # a failed check must not leave the World running


@pytest.mark.timeout(300)
def test_one_shot_leaves_nothing_on_the_gpus(kernel: Kernel) -> None:
    kernel_pid, kernel_before = _kernel_before(kernel)
    cell = kernel.ok(ONE_SHOT, timeout=280)
    results = kernel.value("one_shot")
    assert [r["device"] for r in results] == [f"cuda:{r}" for r in range(GPUS)], results
    assert {r["backend"] for r in results} == {"nccl"}, results
    # Rank r's loss gives weight gradients 4 * (r + 1); DDP averages them.
    assert all(r["grad"] == [4 * (GPUS + 1) / 2] * 8 for r in results), results
    pids = {r["pid"] for r in results}
    after = gpu_measure.check_ranks_gone(pids, kernel_pid, kernel_before)
    gpu_measure.MEASUREMENTS["one_shot_then_nothing_left"] = {
        "rank_pids": sorted(pids),
        "ranks_run_seconds": round(kernel.value("one_shot_seconds"), 2),
        "cell_seconds": round(cell.seconds, 2),
        "after": after,
    }
