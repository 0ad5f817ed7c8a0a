"""Every example notebook on the GPU machine, one rank per GPU (those marked ``needs_gpu``
included); tests/test_examples.py runs them on CPU ranks everywhere. The JAX example uses
CPU devices wherever it runs."""

from __future__ import annotations

from pathlib import Path

import gpu_measure
import pytest
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
