"""On real GPUs, from a real kernel that touched CUDA first: DDP on every GPU, with NCCL.

One scenario, run once per module (the ``scenario`` fixture), then checked from several
sides, each its own test:

    kernel: torch.ones(1, device="cuda")            the kernel now holds a context on GPU 0
    kernel: ranks.run(gpu_step, torch_dist=True)     one rank per visible GPU, NCCL
              (meanwhile this process samples nvidia-smi's compute apps)
    kernel: summarise the results                    CUDA tensors came back as CPU tensors
    here:   wait until no rank pid holds GPU memory  (or time runs out) and list who holds what

Nothing here initialises CUDA in the pytest process: GPUs are counted by a child interpreter
and memory is read with nvidia-smi, so the listings show only the kernel and the ranks.
Skipped where no CUDA GPU is visible; the checks about two GPUs need two. The figures
measured (MiB per GPU for the kernel before, during and after the call, and the ranks' peak
during it) are printed at the end of the session by ``conftest.py`` and written as JSON.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import gpu_measure
import psutil
import pytest
from gpu_measure import normal_uuid
from kernel import Kernel

GPUS = gpu_measure.gpu_count()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),  # the scenario starts torch and NCCL on every GPU: tens of seconds
    pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU (no nvidia-smi, or torch sees none)"),
]
needs_two = pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs, {GPUS} visible")

HOLD_SECONDS = 2.0  # how long the ranks wait, GPU memory held, so the sampler sees them

CUDA_FIRST = """
import os
import time
import torch

probe = torch.ones(1, device="cuda")  # the kernel's own CUDA context, on GPU 0
torch.cuda.synchronize()
"""

RUN_STEP = f"""
def gpu_step():
    import os
    import time

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    me = ranks.current()
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 1).to(me.device), device_ids=[index])
    x = torch.full((8, 4), float(me.rank + 1), device=me.device)
    model(x).sum().backward()  # DDP averages the gradient over the ranks: NCCL all-reduce
    total = torch.tensor([float(me.rank + 1)], device=me.device)
    dist.all_reduce(total)
    torch.cuda.synchronize()
    dist.barrier()
    time.sleep({HOLD_SECONDS})  # memory held while the test samples nvidia-smi
    return {{
        "rank": me.rank,
        "pid": os.getpid(),
        "gpu": me.gpu,
        "device": str(me.device),
        "current_device": index,
        "uuid": str(props.uuid),
        "name": props.name,
        "backend": str(dist.get_backend()),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "weight_grad": model.module.weight.grad,  # CUDA tensors: must arrive as CPU tensors
        "bias_grad": model.module.bias.grad,
        "all_reduce": total,
    }}

started = time.monotonic()
gpu_results = ranks.run(gpu_step, torch_dist=True, timeout=300)
call_seconds = time.monotonic() - started
"""

# Evaluated in the kernel; comes back through repr and literal_eval.
SUMMARY = """[
    {
        **{k: v for k, v in r.items() if not isinstance(v, torch.Tensor)},
        **{k + "_device": str(v.device) for k, v in r.items() if isinstance(v, torch.Tensor)},
        **{k: v.flatten().tolist() for k, v in r.items() if isinstance(v, torch.Tensor)},
    }
    for r in gpu_results
]"""

KERNEL_FACTS = """{
    "pid": os.getpid(),
    "call_seconds": call_seconds,
    "cuda_initialized": torch.cuda.is_initialized(),
    "current_device": torch.cuda.current_device(),
    "device_count": torch.cuda.device_count(),
    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
}"""


RANK_FACTS = (
    "rank",
    "pid",
    "gpu",
    "device",
    "current_device",
    "uuid",
    "cuda_visible_devices",
    "backend",
)


@dataclass(frozen=True)
class Scenario:
    gpus: list[gpu_measure.Gpu]
    kernel: dict[str, Any]  # KERNEL_FACTS
    ranks: list[dict[str, Any]]  # SUMMARY, in rank order
    before: dict[int, dict[int, int]]  # {pid: {gpu index: MiB}} before the call
    during: dict[int, dict[int, int]]  # peak MiB while the call ran
    after: dict[int, dict[int, int]]  # once the ranks are gone (or time ran out)
    samples: int

    @property
    def rank_pids(self) -> set[int]:
        return {r["pid"] for r in self.ranks}


@pytest.fixture(scope="module")
def scenario(kernel: Kernel) -> Scenario:
    listing = gpu_measure.gpus()
    index_of = {normal_uuid(g.uuid): g.index for g in listing}
    kernel.ok(CUDA_FIRST, timeout=180)
    before = gpu_measure.by_pid(gpu_measure.compute_apps(), index_of)
    with gpu_measure.Sampler(index_of) as sampler:
        cell = kernel.ok(RUN_STEP, timeout=420)
    ranks_seen = kernel.value(SUMMARY)
    facts = kernel.value(KERNEL_FACTS)
    rank_pids = {r["pid"] for r in ranks_seen}
    after = gpu_measure.wait_until_gone(rank_pids, index_of)
    done = Scenario(listing, facts, ranks_seen, before, sampler.peaks, after, sampler.samples)
    _record(done, cell.seconds, sampler.errors)
    return done


def _record(s: Scenario, cell_seconds: float, sampler_errors: list[str]) -> None:
    rank_of = {r["pid"]: r["rank"] for r in s.ranks}
    index_of = {normal_uuid(g.uuid): g.index for g in s.gpus}

    def named(table: dict[int, dict[int, int]]) -> dict[str, dict[str, int]]:
        out = {}
        for pid, per_gpu in sorted(table.items()):
            who = (
                "kernel"
                if pid == s.kernel["pid"]
                else f"rank {rank_of[pid]}"
                if pid in rank_of
                else f"other pid {pid}"
            )
            out[who] = {f"GPU {g}": mib for g, mib in sorted(per_gpu.items())}
        return out

    gpu_measure.MEASUREMENTS["kernel_cuda_first_then_ddp"] = {
        "gpus": [f"{g.index}: {g.name} {g.uuid}" for g in s.gpus],
        "kernel_pid": s.kernel["pid"],
        "rank_pids": sorted(rank_of),
        "mib_before_call": named(s.before),
        "mib_peak_during_call": named(s.during),
        "mib_after_call": named(s.after),
        "nvidia_smi_samples_during_call": s.samples,
        "sampler_errors": sampler_errors[:3],
        "ranks_run_seconds": round(s.kernel["call_seconds"], 2),
        "cell_seconds": round(cell_seconds, 2),
        "ranks": [
            {
                **{k: r[k] for k in RANK_FACTS},
                "nvidia_smi_index": index_of.get(normal_uuid(r["uuid"])),
            }
            for r in s.ranks
        ],
    }


def test_ddp_step_runs_on_every_gpu_with_nccl(scenario: Scenario) -> None:
    world = len(scenario.ranks)
    assert world == GPUS, f"one rank per visible GPU: {world} ranks, {GPUS} GPUs"
    assert scenario.kernel["cuda_initialized"], "the kernel was meant to touch CUDA first"
    for rank, r in enumerate(scenario.ranks):
        assert r["rank"] == rank
        assert r["backend"] == "nccl"
        assert r["device"] == f"cuda:{rank}"
        assert r["current_device"] == rank
        # Each rank's loss gives weight gradients 8 * (rank + 1); DDP averages them.
        assert r["weight_grad"] == [8 * (world + 1) / 2] * 4
        assert r["bias_grad"] == [8.0]
        assert r["all_reduce"] == [world * (world + 1) / 2]
        if os.environ.get("NCCL_NVLS_ENABLE") is not None:
            assert r["nccl_nvls_enable"] == os.environ["NCCL_NVLS_ENABLE"]


@needs_two
def test_each_rank_reports_its_own_gpu(scenario: Scenario) -> None:
    uuids = [normal_uuid(r["uuid"]) for r in scenario.ranks]
    assert len(set(uuids)) == len(uuids), f"ranks share a GPU: {uuids}"
    gpus = [r["gpu"] for r in scenario.ranks]
    assert gpus == list(range(len(gpus))), gpus
    if scenario.kernel["cuda_visible_devices"] is None:
        # The kernel sees every GPU, so its index is nvidia-smi's (physical) index.
        index_of = {normal_uuid(g.uuid): g.index for g in scenario.gpus}
        assert [index_of[u] for u in uuids] == gpus
        for r in scenario.ranks:
            assert r["cuda_visible_devices"].split(",")[r["rank"]] == str(r["gpu"])


def test_cuda_results_arrive_as_cpu_tensors(scenario: Scenario) -> None:
    for r in scenario.ranks:
        for name in ("weight_grad", "bias_grad", "all_reduce"):
            assert r[f"{name}_device"] == "cpu", (r["rank"], name)


def _kernel_listed(scenario: Scenario) -> None:
    if scenario.kernel["pid"] not in scenario.before:
        pytest.skip(
            "nvidia-smi does not list the kernel, which holds a CUDA tensor: per-process GPU"
            f" accounting is not available here (listing: {scenario.before})"
        )


@needs_two
def test_kernel_holds_memory_only_on_its_own_gpu(scenario: Scenario) -> None:
    _kernel_listed(scenario)
    pid = scenario.kernel["pid"]
    assert set(scenario.before[pid]) == {0}, scenario.before
    assert set(scenario.during.get(pid, {0: 0})) == {0}, (
        f"the kernel held memory on another GPU during the call: {scenario.during[pid]}"
    )
    assert set(scenario.after.get(pid, {})) == {0}, (
        f"after the call (results unpickled) the kernel holds: {scenario.after.get(pid)}"
    )


@needs_two
def test_each_rank_holds_memory_only_on_its_own_gpu(scenario: Scenario) -> None:
    _kernel_listed(scenario)
    seen = {pid: gpus for pid, gpus in scenario.during.items() if pid in scenario.rank_pids}
    if not seen:
        pytest.skip(f"no rank was caught in {scenario.samples} nvidia-smi samples")
    for r in scenario.ranks:
        if r["pid"] in seen:
            assert set(seen[r["pid"]]) == {r["gpu"]}, (
                f"rank {r['rank']} (GPU {r['gpu']}) held memory on {seen[r['pid']]}"
            )


def test_no_rank_holds_gpu_memory_after_the_call(scenario: Scenario) -> None:
    alive = [pid for pid in scenario.rank_pids if psutil.pid_exists(pid)]
    assert not alive, f"rank processes still alive after ranks.run returned: {alive}"
    holding = {pid: gpus for pid, gpus in scenario.after.items() if pid in scenario.rank_pids}
    assert not holding, f"rank pids still listed by nvidia-smi: {holding}"
