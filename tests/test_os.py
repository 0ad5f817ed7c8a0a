"""The operating-system layer (``ranks._os``): one module per system, chosen once, each
with the same names. Windows' module cannot be imported here (it asserts its system), so
its names are read from its source: a fact missing there would fail only on Windows."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from ranks import _os
from ranks._os import linux, macos


def _public_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


def test_every_system_module_has_the_same_names() -> None:
    folder = Path(_os.__file__).parent
    expected = _public_names(folder / "linux.py")
    assert {"KILL", "TEMPLATE", "SPAWN", "c_runtime", "stream_c_stdout"} <= expected
    for name in ("macos.py", "windows.py"):
        assert _public_names(folder / name) == expected, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's choice")
def test_linux_is_chosen_here_and_streams_c_stdout() -> None:
    assert _os.current is linux
    assert linux.TEMPLATE and linux.SPAWN and linux.DATA_PLANE
    runtime = linux.c_runtime()
    linux.stream_c_stdout(runtime)  # what every rank does at start
    assert runtime.fflush(None) == 0


def test_macos_takes_the_portable_start_without_shared_memory() -> None:
    assert not macos.TEMPLATE and macos.SPAWN and not macos.DATA_PLANE
    assert macos.LOOPBACK_IFNAME is None
