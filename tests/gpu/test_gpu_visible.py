"""Where GPUs are expected (scripts/gpu.sh sets RANKS_REQUIRE_GPU=1 once nvidia-smi answered),
seeing none is a failure, not a run of skipped tests that looks green."""

from __future__ import annotations

import os

import gpu_measure
import pytest

pytestmark = pytest.mark.gpu


def test_cuda_gpus_are_visible_where_required() -> None:
    if os.environ.get("RANKS_REQUIRE_GPU") != "1":
        pytest.skip("GPUs are not required here (RANKS_REQUIRE_GPU is not 1)")
    assert gpu_measure.gpu_count() > 0, "nvidia-smi answered, but torch sees no CUDA GPU"
