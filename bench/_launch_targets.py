"""The functions bench/launch.py launches: module-level, so every launcher can send them.

Spawn-based launchers (``torch.multiprocessing.start_processes``, ``multiprocessing`` with
``spawn``) pickle a function by reference, so it must live in an importable module rather
than in the notebook; ``ranks`` and ``notebook_launcher`` could take a notebook function,
but get these same ones so that every launcher runs identical code.

Each launcher calls the function its own way, and both functions accept every one:

* ``ranks.run(fn, n=n)``: no argument; torchrun's variables are in the environment.
* ``notebook_launcher(fn, num_processes=n)``: no argument; ``RANK``, ``WORLD_SIZE``,
  ``MASTER_ADDR``/``MASTER_PORT`` in the environment (with one process it calls ``fn`` in
  the kernel itself, where none of them is set).
* ``start_processes(fn, args=(n, port), nprocs=n)`` and ``Process(target=fn, args=(r, n,
  port))``: the rank, world size and port as arguments, nothing in the environment.

This module imports nothing heavy at the top: the trivial workload must not pay for torch
on launchers whose ranks would not import it otherwise.
"""

from __future__ import annotations

import os
import socket

BACKEND_VARIABLE = "RANKS_BENCH_BACKEND"  # "gloo" or "nccl"; set by launch.py in the kernel


def trivial(rank: int | None = None, world_size: int = 1, port: int = 0) -> int:
    """Return this process's rank."""
    return int(os.environ.get("RANK", "0")) if rank is None else rank


def all_reduce(rank: int | None = None, world_size: int = 1, port: int = 0) -> float:
    """Join a process group (unless the launcher made one), all_reduce once, leave it."""
    import torch
    import torch.distributed as dist

    backend = os.environ.get(BACKEND_VARIABLE, "gloo")
    created = not dist.is_initialized()  # ranks.run(torch_dist=True) made it already
    if created:
        if rank is not None:
            # Launchers that pass the rank as an argument set no environment; this is a
            # fresh child process, so setting it here leaks nowhere.
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if "MASTER_PORT" in os.environ:
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
            device_id = _set_device(torch, backend, local_rank)
            dist.init_process_group(backend, device_id=device_id)
        else:
            # notebook_launcher(num_processes=1) runs us in the kernel: a world of one,
            # without touching the kernel's environment.
            device_id = _set_device(torch, backend, 0)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, device_id=device_id)
    try:
        device = "cuda" if backend == "nccl" else "cpu"
        tensor = torch.ones(1, device=device)
        dist.all_reduce(tensor)
        return float(tensor.item())
    finally:
        if created:
            dist.destroy_process_group()


def _set_device(torch: object, backend: str, local_rank: int) -> object:
    if backend != "nccl":
        return None
    device = torch.device("cuda", local_rank)  # type: ignore[attr-defined]
    torch.cuda.set_device(device)  # type: ignore[attr-defined]
    return device


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
