"""The README's and docs' ```python blocks on the GPU machine, those marked ``# needs GPUs``
included (tests/test_readme.py runs the others everywhere).

With one GPU only the marked blocks run (each stands alone): the others start ``n=2`` ranks,
which on a GPU machine means two GPUs."""

from __future__ import annotations

from pathlib import Path

import gpu_measure
import pytest
from test_readme import DOCUMENTS, GPU_MARKER, python_blocks, run_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(gpu_measure.gpu_count() == 0, reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_every_block_runs_on_gpus(document: Path, tmp_path: Path) -> None:
    one_gpu = gpu_measure.gpu_count() < 2
    if one_gpu and not any(b.startswith(GPU_MARKER) for b in python_blocks(document)):
        pytest.skip(f"{document.name} has no block marked {GPU_MARKER!r}; its n=2 blocks"
                    " need two GPUs here")
    run_blocks(document, tmp_path, gpus=True, only_marked=one_gpu)
