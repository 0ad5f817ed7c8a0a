"""Every ```python block of README.md and docs/*.md runs as written, in order, in a real kernel.

One kernel per file, started in an empty folder, runs the file's blocks one cell each, as a
reader would paste them into a fresh notebook; any error fails the test with the block that
raised. A block whose first line is ``# needs GPUs`` runs only where GPUs are visible:
tests/gpu/test_gpu_readme.py runs every block on the GPU machine, and here such blocks are
skipped, so the blocks after one must not depend on it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from kernel import Kernel, default_kernel

from ranks._placement import visible_gpus

ROOT = Path(__file__).resolve().parent.parent
GPU_MARKER = "# needs GPUs"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(document: Path) -> list[str]:
    return _BLOCK.findall(document.read_text(encoding="utf-8"))


DOCUMENTS = [d for d in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             if python_blocks(d)]


def run_blocks(document: Path, workdir: Path, gpus: bool, only_marked: bool = False) -> None:
    """Run the document's blocks in a fresh kernel; fail on the first that raises.

    ``only_marked``: just the blocks marked ``# needs GPUs`` (each stands alone), for a
    machine with one GPU, where the others' ``n=2`` asks for a second GPU."""
    kernel: Kernel = default_kernel(str(workdir))
    try:
        for number, block in enumerate(python_blocks(document), 1):
            marked = block.startswith(GPU_MARKER)
            if (marked and not gpus) or (only_marked and not marked):
                continue
            cell = kernel.execute(block, timeout=120)
            if cell.error is not None:
                pytest.fail(f"{document.name}, block {number}, raised:\n{block}\n"
                            f"{cell.traceback}\nstdout:\n{cell.stdout}")
    finally:
        kernel.execute("%ranks stop")  # a block that failed may have left ranks running
        kernel.shutdown()


def test_the_readme_has_blocks_to_run() -> None:
    """The extraction itself: a README without blocks found would pass vacuously."""
    blocks = python_blocks(ROOT / "README.md")
    assert len(blocks) >= 5, blocks
    assert blocks[0].startswith("import ranks\n")
    assert any(block.startswith(GPU_MARKER) for block in blocks)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda d: d.name)
def test_every_block_runs_as_written(document: Path, tmp_path: Path) -> None:
    run_blocks(document, tmp_path, gpus=bool(visible_gpus()))
