"""The README's and docs' ```python blocks on the GPU machine, those marked ``# needs GPUs``
included (tests/test_readme.py runs the others everywhere)."""

from __future__ import annotations

from pathlib import Path

import gpu_measure
import pytest
from test_readme import DOCUMENTS, run_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(gpu_measure.gpu_count() == 0, reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_every_block_runs_on_gpus(document: Path, tmp_path: Path) -> None:
    run_blocks(document, tmp_path, gpus=True)
