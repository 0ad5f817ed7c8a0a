"""Every notebook in examples/ runs top to bottom in a real Jupyter kernel, on CPU ranks.

Each notebook is executed by nbclient through ``examples/run_notebook.py``'s client (the
kernel is this interpreter, started in an empty folder), followed by one more cell from
:data:`CHECKS` that asserts what the example must have produced: its ranks' results, the
accuracy it reached, that Lightning spawned nothing. A notebook names what it imports in
its metadata (``ranks.requires``) and in its first cells (a ``# pip install`` line); one
whose framework is not installed here is skipped with the package's name (CI installs
them all: the ``examples`` extra). One marked ``ranks.needs_gpu`` is skipped here;
tests/gpu/test_gpu_examples.py runs every notebook on the GPU machine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.ipynb"))

# Run after each notebook, in its kernel: what the example must have shown. `where == {}`
# means the notebook put one rank on each GPU; the numbers hold for any number of ranks.
CHECKS = {
    "ddp_demo.ipynb": """
assert min(accuracies) > 0.9, accuracies
""",
    "accelerate_demo.ipynb": """
assert [r["process"] for r in results] == list(range(len(results))), results
assert {r["processes"] for r in results} == {len(results)}, results
assert where == {} or {r["distributed_type"] for r in results} == {"DistributedType.MULTI_CPU"}
assert results[0]["loss"] < 0.2 and min(r["accuracy"] for r in results) > 0.9, results
""",
    "lightning_fabric_demo.ipynb": """
assert [r["global_rank"] for r in results] == list(range(len(results))), results
assert {r["world_size"] for r in results} == {len(results)}, results
assert {r["cluster"] for r in results} == {"TorchElasticEnvironment"}, results
assert {r["processes_started"] for r in results} == {0}, results
assert results[0]["loss"] < 0.2 and min(r["accuracy"] for r in results) > 0.9, results
""",
    "lightning_trainer_demo.ipynb": """
assert [r["global_rank"] for r in results] == list(range(len(results))), results
assert {r["world_size"] for r in results} == {len(results)}, results
assert {r["cluster"] for r in results} == {"TorchElasticEnvironment"}, results
assert {r["lightning_spawns"] for r in results} == {False}, results
assert {r["processes_started"] for r in results} == {0}, results
assert results[0]["loss"] < 0.2 and min(r["accuracy"] for r in results) > 0.9, results
""",
    "hf_trainer_demo.ipynb": """
assert [r["process"] for r in results] == list(range(len(results))), results
assert {r["world_size"] for r in results} == {len(results)}, results
assert len(results) == 1 or {r["parallel_mode"] for r in results} == {"ParallelMode.DISTRIBUTED"}
assert min(r["accuracy"] for r in results) > 0.9, results
""",
    "jax_demo.ipynb": """
assert [r["process"] for r in results] == [0, 1], results
assert {(r["processes"], r["devices"], r["global_rows"]) for r in results} == {(2, 2, 512)}
assert [r["ranks_seen"] for r in results] == [[0, 1], [0, 1]], results
assert len({r["sum_of_y"] for r in results}) == 1, results  # one reduction over both
assert results[0]["loss"] < 1e-3, results
assert all(abs(a - b) < 0.01 for a, b in zip(results[0]["w"], [2.0, -3.0, 0.5])), results
assert "JAX_COORDINATOR_ADDRESS" not in os.environ  # nothing leaked into the kernel
""",
    "world_session_demo.ipynb": """
assert all(torch.equal(weights[0], w) for w in weights) and len(weights) >= 1
assert len(first) == len(more) == len(weights)
assert min(accuracies) > 0.9, accuracies
assert world.closed
""",
    "fsdp2_demo.ipynb": """
assert {r["weight"] for r in results} == {"DTensor"}, results
assert {r["full_shape"] for r in results} == {(64, 2)}, results
assert sum(r["my_shard"][0] for r in results) == 64, results  # each rank holds its part
assert min(r["accuracy"] for r in results) > 0.9, results
""",
}


def _client_class() -> Any:
    """examples/run_notebook.py's client: the kernel it starts is this interpreter."""
    script = ROOT / "examples" / "run_notebook.py"
    spec = importlib.util.spec_from_file_location("run_notebook", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TerminalClient


def settings(path: Path) -> dict[str, Any]:
    """The notebook's ``ranks`` metadata: ``requires`` (import names), ``needs_gpu``."""
    nb = nbformat.read(path, as_version=4)
    return dict(nb.metadata.get("ranks", {}))


def missing_packages(path: Path) -> list[str]:
    return [name for name in settings(path).get("requires", [])
            if importlib.util.find_spec(name) is None]


def run_example(path: Path, workdir: Path, timeout: float = 280.0, also: str = "") -> Any:
    """Execute the notebook, its check and ``also`` in a fresh kernel started in ``workdir``."""
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import os\n" + CHECKS[path.name] + also))
    client = _client_class()(nb, kernel_name="python3", timeout=int(timeout), color=False,
                             resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError (with the cell's traceback) on failure
    return nb


def test_every_example_is_checked_and_says_what_it_needs() -> None:
    assert {p.name for p in EXAMPLES} == set(CHECKS)
    for path in EXAMPLES:
        nb = nbformat.read(path, as_version=4)
        requires = settings(path).get("requires")
        assert requires, f"{path.name}: metadata ranks.requires names no package"
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert nb.cells[0].cell_type == "markdown", path.name
        assert first_code is nb.cells[1], f"{path.name}: the pip line must follow the title"
        pip = first_code.source.strip()
        assert pip.startswith("# pip install "), (path.name, pip)
        assert "ranks[notebook]" in pip and all(name in pip.split() for name in requires), (
            path.name, pip, requires)


def test_a_missing_framework_is_named(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["ranks"] = {"requires": ["nbformat", "no_such_framework_here"]}
    path = tmp_path / "needs_more.ipynb"
    nbformat.write(nb, path)
    assert missing_packages(path) == ["no_such_framework_here"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_on_cpu_ranks(path: Path, tmp_path: Path) -> None:
    missing = missing_packages(path)
    if missing:
        pytest.skip(f"{path.name} needs {', '.join(missing)} (pip install {' '.join(missing)})")
    if settings(path).get("needs_gpu"):
        pytest.skip(f"{path.name} needs GPUs: tests/gpu/test_gpu_examples.py runs it")
    run_example(path, tmp_path)
