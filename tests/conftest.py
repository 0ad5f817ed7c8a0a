"""Fixtures shared by the suite: real kernels, and a check that nothing is left behind.

Every test is followed by a leak check: a rank process (anything running ``ranks._worker``)
still alive, a child of the test process that no fixture owns, a new thread in the test
process, or a ``/dev/shm`` segment named like ranks' or multiprocessing's (``sem.mp-*``,
``psm_*``) that no process has mapped, fails the test that left it (after a
short grace for processes that are already on their way out) and is cleaned up. So do files
of ranks left on disk where nothing may remain: anything of a kernel that exited normally,
and a World's temporary folder (``tmp-*``) in this process's folder (only a closed World's
can be new: an open one outlives the test only in a fixture made before it). A killed
kernel's files are not a leak: the next ranks start removes them.

The start method is a fixture, as loky runs one suite per start method: a test module that
sets ``START_METHODS`` (a tuple of ``template``, ``spawn``, ``portable``) runs every test
once per method on Linux, the method in the test's id (``-k spawn`` picks one), with
``RANKS_START_METHOD`` set for the test process, its kernels and its ranks. Where the
method is chosen from outside (``RANKS_START_METHOD`` already set, a Windows kernel, a
system other than Linux), each module runs once, with that one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from kernel import EXITED_NORMALLY, KERNEL_PIDS, WINDOWS_KERNEL, Kernel, default_kernel
from processes import made_by_another_session, rank_processes, shm_segments, unused_shm

LEAK_GRACE = 5.0
# Identical lines of several ranks are shown once when they come close together: whether
# they do depends on timing, and most tests check each rank's own lines. Off for the
# kernels, scripts and ranks the suite starts; the tests of grouping turn it on.
os.environ.setdefault("RANKS_GROUP_OUTPUT", "0")


def _unexpected_children() -> list[psutil.Process]:
    me = psutil.Process()
    kernels = {pid for pid in KERNEL_PIDS if psutil.pid_exists(pid)}
    owned = set(kernels)
    template = _own_template_pid()
    if template is not None:
        owned.add(template)
    for pid in kernels:
        with contextlib.suppress(psutil.NoSuchProcess):
            owned |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    return [c for c in me.children(recursive=True) if c.pid not in owned]


def _own_template_pid() -> int | None:
    """This process's warm template (kept for the whole session, like a kernel's)."""
    import sys

    module = sys.modules.get("ranks._template")
    template = getattr(module, "_template", None)
    return None if template is None else int(template.pid)


def _ranks_files() -> set[Path]:
    """Under this user's ranks root in the default temp folder: the folders of processes
    that exited normally, and the World temp folders of this process."""
    root = Path(tempfile.gettempdir()) / f"ranks-{os.getuid()}"
    if not root.is_dir():
        return set()
    left = set()
    for folder in root.iterdir():
        pid = folder.name.partition("-")[0]
        if pid.isdigit() and int(pid) in EXITED_NORMALLY:
            left.add(folder)
        elif pid == str(os.getpid()):
            left |= set(folder.glob("tmp-*"))
    return left


START_METHOD_VARIABLE = "RANKS_START_METHOD"
# Read before any fixture sets it: a method chosen from outside collapses the matrix.
_CHOSEN_OUTSIDE = os.environ.get(START_METHOD_VARIABLE)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    methods = getattr(metafunc.module, "START_METHODS", None)
    if (methods is None or "ranks_start_method" not in metafunc.fixturenames or _CHOSEN_OUTSIDE
            or WINDOWS_KERNEL or not sys.platform.startswith("linux")):
        return
    metafunc.parametrize("ranks_start_method", methods, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def ranks_start_method(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The start method this module's tests run under (None: the system's default).

    Set in this process's environment for the whole module: the ranks it starts itself,
    and the kernels and scripts it starts, which inherit it.
    """
    method: str | None = getattr(request, "param", None)
    if method is None:
        yield os.environ.get(START_METHOD_VARIABLE)
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(START_METHOD_VARIABLE, method)
        yield method


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``torch`` skip where torch is not installed (torch is optional: the
    Python-version passes of scripts/test.sh run without it). With RANKS_TEST_KERNEL=windows
    only the tests that drive a kernel concern Windows: the others run this interpreter, as
    in the suite's other passes."""
    if importlib.util.find_spec("torch") is None:
        skip = pytest.mark.skip(reason="needs torch, which is not installed here")
        for item in items:
            if item.get_closest_marker("torch") is not None:
                item.add_marker(skip)
    if not WINDOWS_KERNEL:
        return
    in_kernel = [i for i in items if {"kernel", "fresh_kernel"} & set(i.fixturenames)]  # type: ignore[attr-defined]
    config.hook.pytest_deselected(items=[i for i in items if i not in in_kernel])
    items[:] = in_kernel


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    threads_before = set(threading.enumerate())
    shm_before = shm_segments()
    files_before = _ranks_files()
    yield
    if request.node.get_closest_marker("kills_kernel"):
        # A killed kernel cannot remove its data folders: the next start of ranks on the
        # machine does (test_dataplane shows it). Do that now, so the rest is still checked.
        from ranks import _dataplane

        _dataplane.sweep()
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        ranks_left = rank_processes()
        children = [c for c in _unexpected_children() if c not in ranks_left]
        # Only segments no process maps: those of a test session running beside this one
        # are in use while they exist.
        new_shm = {
            s for s in unused_shm(shm_segments() - shm_before) if not made_by_another_session(s)
        }
        if (not ranks_left and not children and not new_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    new_threads = [
        t for t in set(threading.enumerate()) - threads_before
        if t.is_alive() and not t.name.startswith(("pytest_timeout", "IPythonHistory"))
    ]
    new_files = _ranks_files() - files_before
    for proc in ranks_left + children:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    for name in new_shm:
        with contextlib.suppress(OSError):
            os.unlink(f"/dev/shm/{name}")
    problems = []
    if ranks_left:
        problems.append(f"rank processes left running: {[p.pid for p in ranks_left]}")
    if children:
        problems.append(f"child processes left running: {[(c.pid, c.name()) for c in children]}")
    if new_threads:
        problems.append(f"threads left running: {[t.name for t in new_threads]}")
    if new_shm:
        problems.append(f"shared memory left: {sorted(new_shm)}")
    if new_files:
        problems.append(f"files of ranks left on disk: {sorted(map(str, new_files))}")
        for path in new_files:
            shutil.rmtree(path, ignore_errors=True)
    assert not problems, "; ".join(problems)


@pytest.fixture(scope="module")
def kernel(
    tmp_path_factory: pytest.TempPathFactory, ranks_start_method: str | None
) -> Iterator[Kernel]:
    """One real ipykernel per test module, started in its own empty folder."""
    workdir = tmp_path_factory.mktemp("kernel")
    k = default_kernel(str(workdir))
    k.workdir = workdir  # type: ignore[attr-defined]
    k.ok("import ranks")
    yield k
    k.shutdown()


@pytest.fixture
def fresh_kernel(tmp_path: Path, ranks_start_method: str | None) -> Iterator[Kernel]:
    """A kernel of the test's own, for tests that interrupt, kill or restart it."""
    k = default_kernel(str(tmp_path))
    k.workdir = tmp_path  # type: ignore[attr-defined]
    yield k
    k.close()
