"""Every example notebook on the GPU machine, one rank per GPU (those marked ``needs_gpu``
included); tests/test_examples.py runs them on CPU ranks everywhere. The JAX example uses
CPU devices wherever it runs, so JAX on GPU ranks (each process its own GPU, through the
``JAX_LOCAL_DEVICE_IDS`` ranks sets) has a test of its own here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import gpu_measure
import pytest
from kernel import Kernel
from test_examples import EXAMPLES, missing_packages, run_example

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(gpu_measure.gpu_count() == 0, reason="needs a CUDA GPU"),
]

# The notebooks put one rank on each GPU where the kernel sees GPUs (`where == {}`).
ON_GPUS = "\nassert globals().get('where', {}) == {}, 'the ranks ran on CPUs, not GPUs'\n"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_gpus(path: Path, tmp_path: Path) -> None:
    missing = missing_packages(path)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)} (pip install {' '.join(missing)})")
    run_example(path, tmp_path, timeout=550, also=ON_GPUS)


JAX_ON_GPUS = """
import ranks

def jax_on_my_gpu():
    import os
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # a small test, not 75% of the GPU
    import jax

    me = ranks.current()
    jax.distributed.initialize(num_processes=me.world_size, process_id=me.rank)
    try:
        return [d.platform for d in jax.local_devices()], jax.device_count(), jax.process_index()
    finally:
        jax.distributed.shutdown()

seen = ranks.run(jax_on_my_gpu, timeout=300)
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs jax (pip install jax)")
def test_jax_gpu_rank_owns_its_gpu_alone(kernel: Kernel) -> None:
    # Every rank sees all of its World's GPUs (rank r uses cuda:r); JAX_LOCAL_DEVICE_IDS
    # keeps each JAX process to its own, as JAX's cluster detection would.
    kernel.ok(JAX_ON_GPUS, 300)
    seen = kernel.value("seen")
    n = len(seen)
    assert seen == [(["gpu"], n, rank) for rank in range(n)], seen
