"""Where each rank runs: turning ``n`` and ``gpus`` into one frozen :class:`RankSpec` per rank.

The kernel must not touch CUDA to count GPUs (a CUDA context costs hundreds of MiB and
makes the kernel unsafe to fork for tools that do), so visible GPUs are counted through
NVML (``pynvml``) or ``nvidia-smi -L``, then narrowed by the kernel's
``CUDA_VISIBLE_DEVICES`` exactly as CUDA would narrow them.

Every rank of a World sees the World's GPUs, in rank order, as its ``CUDA_VISIBLE_DEVICES``:
rank ``r`` therefore owns ``cuda:r``, which is what tutorial code that indexes devices with
``LOCAL_RANK`` expects (torchrun's convention), and ``gpus=[2, 3]`` still puts rank 0 on the
kernel's GPU 2.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RankSpec:
    """One rank's place in its World."""

    rank: int
    world_size: int
    gpu: int | None  # the kernel's index of the rank's GPU, None for a CPU rank

    @property
    def local_rank(self) -> int:
        return self.rank  # one host: the local rank is the rank

    @property
    def device(self) -> str:
        """The device as the rank names it (``cuda:r`` inside the rank's visible set)."""
        return "cpu" if self.gpu is None else f"cuda:{self.rank}"

    def describe(self) -> str:
        """Human-readable placement for messages: ``cuda:1 (GPU 3)`` or ``cpu``."""
        return "cpu" if self.gpu is None else f"cuda:{self.rank} (GPU {self.gpu})"


@functools.lru_cache(maxsize=1)
def _physical_gpu_count() -> int:
    """How many NVIDIA GPUs the machine has, without creating a CUDA context."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listing = subprocess.run(
            [smi, "-L"], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def visible_gpus(environ: os._Environ[str] | dict[str, str] | None = None) -> list[str]:
    """The GPUs the kernel may use, as the values to put in a rank's CUDA_VISIBLE_DEVICES."""
    env = os.environ if environ is None else environ
    mask = env.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return [str(i) for i in range(_physical_gpu_count())]
    visible = []
    for item in mask.split(","):
        item = item.strip()
        # CUDA stops at the first entry it cannot use; "-1" and "" hide everything after.
        if not item or item == "-1":
            break
        visible.append(item)
    return visible


def plan_ranks(n: int | None, gpus: Sequence[int] | None, visible: Sequence[str]) -> list[RankSpec]:
    """Validate ``n``/``gpus`` against the visible GPUs; raise before anything starts."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"n must be an int, not {type(n).__name__}")
    if n is not None and n < 1:
        raise ValueError(f"n must be at least 1, got n={n}")
    if gpus is not None and (isinstance(gpus, (str, bytes)) or not isinstance(gpus, Sequence)):
        raise TypeError(f"gpus must be a list of GPU indices, not {type(gpus).__name__}")
    if gpus is not None and len(gpus) == 0:
        # gpus=[] asks for CPU ranks even where GPUs are visible.
        if n is None:
            raise ValueError("gpus=[] asks for CPU ranks: say how many with n=")
        return [RankSpec(r, n, None) for r in range(n)]
    if gpus is not None:
        gpu_list = _check_gpu_ids(gpus, len(visible))
        if n is not None and n != len(gpu_list):
            raise ValueError(
                f"n={n} does not match gpus={gpu_list} ({len(gpu_list)} GPUs, one rank each);"
                " pass only one of them"
            )
        return [RankSpec(r, len(gpu_list), g) for r, g in enumerate(gpu_list)]
    if visible:
        if n is None:
            n = len(visible)
        if n > len(visible):
            raise ValueError(
                f"n={n} ranks but only {len(visible)} GPU(s) are visible; each GPU rank needs"
                f" its own GPU. Use n<={len(visible)}, or gpus=[] for {n} CPU ranks"
            )
        return [RankSpec(r, n, r) for r in range(n)]
    if n is None:
        raise ValueError("no GPU is visible: say how many CPU ranks to start with n=")
    return [RankSpec(r, n, None) for r in range(n)]


def _check_gpu_ids(gpus: Sequence[int], visible_count: int) -> list[int]:
    gpu_list = list(gpus)
    for g in gpu_list:
        if isinstance(g, bool) or not isinstance(g, int):
            raise TypeError(f"gpus must hold ints, found {g!r}")
    repeated = sorted({g for g in gpu_list if gpu_list.count(g) > 1})
    if repeated:
        raise ValueError(f"gpus={gpu_list} repeats {repeated}: each rank needs its own GPU")
    unknown = [g for g in gpu_list if not 0 <= g < visible_count]
    if unknown:
        seen = f"0..{visible_count - 1}" if visible_count else "none"
        raise ValueError(f"gpus={gpu_list}: no GPU {unknown} here (visible GPUs: {seen})")
    return gpu_list


def gpu_memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory each process holds, summed over GPUs (empty without nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    try:
        listing = subprocess.run(
            [smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    used: dict[int, int] = {}
    for row in listing.splitlines():
        pid, _, mib = row.partition(",")
        try:
            used[int(pid)] = used.get(int(pid), 0) + int(mib)
        except ValueError:
            continue  # "[N/A]" where the driver does not say
    return used
