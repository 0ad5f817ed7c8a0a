"""GPU tests: print what they measured, whatever pytest's capture mode, and keep it as JSON.

The fixtures (``kernel``, the leak check) come from ``tests/conftest.py``; this file adds only
the report of :data:`gpu_measure.MEASUREMENTS` at the end of the session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gpu_measure

# NVLink multicast must stay off on the GPU machines (it can put the host's shared GPUs out of
# service): the kernel and the ranks inherit these from this process.
for _name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
    os.environ.setdefault(_name, "0" if _name == "NCCL_NVLS_ENABLE" else "1")


def _report_path() -> Path | None:
    if os.environ.get("RANKS_GPU_REPORT"):
        return Path(os.environ["RANKS_GPU_REPORT"])
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu_measurements.json"
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not gpu_measure.MEASUREMENTS:
        return
    text = json.dumps(gpu_measure.MEASUREMENTS, indent=1, sort_keys=True, default=str)
    terminalreporter.write_sep("-", "ranks GPU measurements (MiB per GPU index)")
    terminalreporter.write_line(text)
    path = _report_path()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        terminalreporter.write_line(f"(written to {path})")
