"""Accelerate and Lightning Fabric, unchanged, inside ``ranks.run`` on two GPUs, from a
kernel that touched CUDA first; and, for contrast, Accelerate's own notebook launcher in the
same kernel, which fails exactly there.

    kernel: torch.ones(1, device="cuda"); from accelerate import ...; from lightning ...
    ranks.run(accelerate_train)   Accelerator() reads torchrun's variables, makes the NCCL
                                  group itself (torch_dist=False), prepares a model, an
                                  optimizer and a DataLoader, trains, gathers and reduces
    ranks.run(fabric_train)       Fabric(accelerator="cuda", devices=2, strategy="ddp"):
                                  TorchElasticEnvironment is detected (TORCHELASTIC_RUN_ID),
                                  which creates processes externally, so fabric.launch()
                                  spawns nothing and only sets up this process
    notebook_launcher(accelerate_train, num_processes=2)
                                  forks the kernel (torch elastic, start_method="fork"); the
                                  children cannot use CUDA: "Cannot re-initialize CUDA in
                                  forked subprocess"

The notebook is written as a user would: the libraries are imported at the top, in the
kernel, so the warm template preloads them too. After each call nothing of the ranks (or of
the launcher's children) holds GPU memory and the kernel holds only its own context. The
figures (seconds per call, the launcher's error) go into the measurements report.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gpu_measure
import pytest
from kernel import Kernel

GPUS = gpu_measure.gpu_count()
MISSING = [name for name in ("accelerate", "lightning") if importlib.util.find_spec(name) is None]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs, {GPUS} visible"),
    pytest.mark.skipif(bool(MISSING), reason=f"needs {' and '.join(MISSING)} in this Python"),
]

NOTEBOOK = """
import os
import time

import torch

probe = torch.ones(1, device="cuda")  # the kernel's own CUDA context, on GPU 0
torch.cuda.synchronize()

import psutil
from accelerate import Accelerator, notebook_launcher
from lightning.fabric import Fabric
from torch.utils.data import DataLoader, TensorDataset

import ranks


def toy_data():
    torch.manual_seed(0)  # the same 64 samples on every rank; the samplers split them
    return TensorDataset(torch.randn(64, 8), torch.randn(64, 1))


def accelerate_train():
    accelerator = Accelerator()
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(toy_data(), batch_size=8)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    batches = 0
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        batches += 1
    weight = sum(p.detach().sum() for p in accelerator.unwrap_model(model).parameters())
    weights = accelerator.gather(weight.reshape(1))
    total = accelerator.reduce(torch.ones(1, device=accelerator.device), reduction="sum")
    return {
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "distributed_type": accelerator.distributed_type.value,
        "backend": str(torch.distributed.get_backend()),
        "ddp": type(model).__name__,
        "batches": batches,
        "weights": weights.tolist(),
        "reduced": total.item(),
        "pid": os.getpid(),
    }


def fabric_train():
    children_before = {p.pid for p in psutil.Process().children(recursive=True)}
    fabric = Fabric(accelerator="cuda", devices=2, strategy="ddp")
    fabric.launch()  # under torchrun's variables: sets this process up, spawns nothing
    children_after = {p.pid for p in psutil.Process().children(recursive=True)}
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(toy_data(), batch_size=8))
    batches = 0
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        batches += 1
    weight = sum(p.detach().sum() for p in model.parameters())
    weights = fabric.all_gather(weight)
    total = fabric.all_reduce(torch.ones(1, device=fabric.device), reduce_op="sum")
    return {
        "global_rank": fabric.global_rank,
        "world_size": fabric.world_size,
        "device": str(fabric.device),
        "cluster_environment": type(fabric.strategy.cluster_environment).__name__,
        "launcher": type(fabric.strategy.launcher).__name__,
        "spawned": sorted(children_after - children_before),
        "backend": str(torch.distributed.get_backend()),
        "strategy": type(fabric.strategy).__name__,
        "batches": batches,
        "weights": weights.flatten().tolist(),
        "reduced": total.item(),
        "pid": os.getpid(),
    }
"""

CALL = """
started = time.monotonic()
{name}_results = ranks.run({name}_train, timeout=300)
{name}_seconds = time.monotonic() - started
"""

LAUNCHER = """
import signal
import socket
import traceback

sigint_before = repr(signal.getsignal(signal.SIGINT))

with socket.socket() as probe_socket:  # not the default 29500: another program may hold it
    probe_socket.bind(("127.0.0.1", 0))
    free_port = probe_socket.getsockname()[1]
started = time.monotonic()
try:
    notebook_launcher(accelerate_train, num_processes=2, use_port=str(free_port))
except BaseException as error:
    launcher_error = {
        "type": f"{type(error).__module__}.{type(error).__qualname__}",
        "text": "".join(traceback.format_exception(error)),
        "seconds": time.monotonic() - started,
    }
else:
    launcher_error = None
# torch elastic's agent, run in the kernel, installs its own SIGINT/SIGTERM handlers there.
sigint_after = repr(signal.getsignal(signal.SIGINT))
"""

FORK_FAILURE = "Cannot re-initialize CUDA in forked subprocess"


@dataclass(frozen=True)
class Notebook:
    kernel: Kernel
    pid: int
    before: dict[int, int] | None  # the kernel's {GPU index: MiB} once it touched CUDA


@pytest.fixture(scope="module")
def notebook(kernel: Kernel) -> Iterator[Notebook]:
    kernel.ok(NOTEBOOK, timeout=240)
    pid = kernel.value("os.getpid()")
    yield Notebook(kernel, pid, gpu_measure.listing().get(pid))


def _call(notebook: Notebook, name: str) -> list[dict[str, Any]]:
    cell = notebook.kernel.ok(CALL.format(name=name), timeout=320)
    results: list[dict[str, Any]] = notebook.kernel.value(f"{name}_results")
    figures = gpu_measure.MEASUREMENTS.setdefault("integrations", {})[name] = {
        "ranks_run_seconds": round(notebook.kernel.value(f"{name}_seconds"), 2),
        "cell_seconds": round(cell.seconds, 2),
        "results": results,
    }
    figures["after"] = gpu_measure.check_ranks_gone({r["pid"] for r in results}, notebook.pid,
                                                    notebook.before)
    return results


def _same(values: list[float]) -> bool:
    return all(abs(v - values[0]) <= 1e-6 * max(1.0, abs(values[0])) for v in values)


def _trained_together(results: list[dict[str, Any]]) -> None:
    """What both libraries must show: a GPU per rank, one NCCL group, the data split over
    the ranks, and weights that DDP kept equal."""
    for rank, r in enumerate(results):
        assert r["device"] == f"cuda:{rank}", r
        assert r["backend"] == "nccl", r
        assert r["batches"] == 8 // GPUS, r  # 64 samples, batches of 8, split over the ranks
        assert len(r["weights"]) == GPUS and _same(r["weights"]), r  # DDP kept them equal
        assert r["reduced"] == float(GPUS), r


@pytest.mark.timeout(420)
def test_accelerate_runs_unchanged_in_ranks(notebook: Notebook) -> None:
    results = _call(notebook, "accelerate")
    assert [r["process_index"] for r in results] == list(range(GPUS)), results
    for r in results:
        assert r["num_processes"] == GPUS, r
        assert r["distributed_type"] == "MULTI_GPU", r
        assert r["ddp"] == "DistributedDataParallel", r
    _trained_together(results)
    assert results[0]["weights"] == results[1]["weights"], results


@pytest.mark.timeout(300)
def test_fabric_runs_unchanged_in_ranks(notebook: Notebook) -> None:
    results = _call(notebook, "fabric")
    assert [r["global_rank"] for r in results] == list(range(GPUS)), results
    for r in results:
        assert r["world_size"] == GPUS, r
        assert r["cluster_environment"] == "TorchElasticEnvironment", r
        assert r["spawned"] == [], f"fabric.launch() started processes: {r}"
        assert r["strategy"] == "DDPStrategy", r
    _trained_together(results)


@pytest.mark.timeout(240)
def test_notebook_launcher_fails_after_cuda_in_the_kernel(notebook: Notebook) -> None:
    """The incumbent, for contrast: it forks the kernel, whose CUDA context cannot be used
    in the children. Run last: torch elastic's agent takes over the kernel's SIGINT."""
    cell = notebook.kernel.ok(LAUNCHER, timeout=200)
    failure = notebook.kernel.value("launcher_error")
    gpu_measure.MEASUREMENTS.setdefault("integrations", {})["notebook_launcher"] = {
        "seconds": None if failure is None else round(failure["seconds"], 2),
        "type": None if failure is None else failure["type"],
        "text_tail": None if failure is None else failure["text"][-3000:],
        "cell_stderr_tail": cell.stderr[-3000:],
        "kernel_sigint_handler": [notebook.kernel.value("sigint_before"),
                                  notebook.kernel.value("sigint_after")],
    }
    assert failure is not None, f"notebook_launcher returned:\n{cell.stdout}\n{cell.stderr}"
    said = failure["text"] + cell.stdout + cell.stderr
    assert FORK_FAILURE in said, said
    gpu_measure.MEASUREMENTS["integrations"]["notebook_launcher"]["after"] = (
        gpu_measure.check_ranks_gone(set(), notebook.pid, notebook.before))
