"""Big buffers through shared memory (``_dataplane``): mapped, not sent; value semantics;
every outcome leaves nothing in /dev/shm or the spill folder; the small-/dev/shm fallback.

Most calls run in this process (it is the "kernel": the data plane does not depend on
Jupyter); the killed-kernel case uses a real kernel.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import psutil
import pytest
from processes import made_by_another_session

import ranks
from ranks import _dataplane
from ranks._serialize import BIG_BUFFER

BIG = BIG_BUFFER // 8 * 4  # float64 elements: four times the threshold

# The functions of this module travel by value, as a notebook's do (the ranks need not
# import the test module).
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _leftovers() -> list[str]:
    """The data folders of ranks in /dev/shm and the spill folder."""
    found = []
    for root in ("/dev/shm", tempfile.gettempdir()):
        found += [os.path.join(root, n) for n in os.listdir(root)
                  if n.startswith("ranks-data-") and not made_by_another_session(n)]
    return found


@pytest.fixture(autouse=True)
def nothing_left_on_disk() -> Any:
    before = set(_leftovers())
    yield
    deadline = time.monotonic() + 5
    while set(_leftovers()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(_leftovers()) - before == set()


def mapping_of(value: Any) -> str:
    """What a rank's (or the kernel's) array or tensor is a view of: "mmap" when it lies
    in a shared-memory mapping."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        address = value.untyped_storage().data_ptr()
        with open("/proc/self/maps") as maps:
            for line in maps:
                span = line.split()[0]
                low, high = (int(x, 16) for x in span.split("-"))
                if low <= address < high:
                    return "mmap" if "ranks-data-" in line else "heap"
        return "heap"
    base = value
    while base is not None and not isinstance(base, memoryview):
        base = getattr(base, "base", None)
    return type(base.obj).__name__ if base is not None else "own"


def test_a_big_argument_is_mapped_and_a_small_one_is_sent() -> None:
    big, small = np.arange(BIG, dtype=np.float64), np.arange(10.0)

    def where(big: Any, small: Any) -> tuple[str, str, float]:
        return mapping_of(big), mapping_of(small), float(big.sum())

    results = ranks.run(where, args=(big, small), n=2)
    assert results == [("mmap", "bytearray", float(big.sum()))] * 2  # small: in the stream


def test_buffers_inside_containers_dataclasses_and_globals_are_mapped() -> None:
    @dataclasses.dataclass
    class Batch:
        x: np.ndarray

    captured = np.ones(BIG)

    def where(parts: dict[str, Any]) -> list[str]:
        return [mapping_of(parts["list"][0]), mapping_of(parts["batch"].x),
                mapping_of(captured)]

    parts = {"list": [np.zeros(BIG)], "batch": Batch(np.full(BIG, 2.0))}
    assert ranks.run(where, args=(parts,), n=2) == [["mmap"] * 3] * 2


def test_torch_cpu_tensors_are_mapped_with_dtype_shape_and_grad() -> None:
    torch = pytest.importorskip("torch")
    weight = torch.nn.Parameter(torch.randn(BIG // 512, 512))
    half = torch.ones(BIG, dtype=torch.bfloat16)

    def where(weight: Any, half: Any) -> tuple[Any, ...]:
        return (mapping_of(weight), weight.requires_grad, tuple(weight.shape),
                float(weight.detach().sum()), mapping_of(half), half.dtype, float(half.sum()))

    expected = ("mmap", True, tuple(weight.shape), float(weight.detach().sum()), "mmap",
                torch.bfloat16, float(half.sum()))
    for got in ranks.run(where, args=(weight, half), n=2):
        assert got[:3] == expected[:3] and got[4:6] == expected[4:6]
        assert got[3] == pytest.approx(expected[3], rel=1e-5) and got[6] == expected[6]


def test_a_rank_writing_its_argument_changes_neither_the_kernel_nor_its_peer() -> None:
    pytest.importorskip("torch")
    data = np.zeros(BIG)

    def write_then_look(data: Any) -> float:
        import torch.distributed as dist

        if ranks.current().rank == 0:
            data[:] = 7.0
        dist.barrier()  # rank 1 looks only after rank 0 wrote
        return float(data.sum())

    assert ranks.run(write_then_look, args=(data,), n=2, torch_dist=True) == [7.0 * BIG, 0.0]
    assert not data.any()


def test_big_results_are_mapped_stay_unchanged_and_are_released_when_dropped() -> None:
    with ranks.World(n=2) as world:
        world.exec(f"import numpy as np\nkept = np.full({BIG}, 3.0)")
        results = world.pull("kept")
        assert [mapping_of(r) for r in results] == ["mmap", "mmap"]
        world.exec("kept[:] = -1.0")  # the rank's own array changes; what the kernel got not
        assert all(float(r.sum()) == 3.0 * BIG for r in results)
        results[0][:] = 5.0  # the kernel's copy is its own, too
        assert float(results[1].sum()) == 3.0 * BIG
        assert _mapped_data_files() == 2
        del results
        assert _mapped_data_files() == 0


def _mapped_data_files() -> int:
    with open("/proc/self/maps") as maps:
        return len({line.split()[-2] for line in maps if "ranks-data-" in line})


def test_push_and_pull_use_shared_memory() -> None:
    table = np.arange(BIG, dtype=np.float64)
    with ranks.World(n=2) as world:
        world.push(table=table, mapping_of=mapping_of)
        world.exec("where = mapping_of(table)")
        assert world.pull("where") == ["mmap", "mmap"]
        world.exec("table = table * 2")
        pulled = world.pull("table")
        assert [mapping_of(p) for p in pulled] == ["mmap", "mmap"]
        assert all(float(p[-1]) == 2.0 * (BIG - 1) for p in pulled)


@pytest.mark.parametrize("outcome", ["raises", "exits", "killed"])
def test_nothing_is_left_when_a_rank_fails_after_taking_a_big_argument(outcome: str) -> None:
    def fail(data: Any) -> None:
        if outcome == "raises":
            raise ValueError("after mapping")
        if outcome == "exits":
            os._exit(3)
        os.kill(os.getpid(), signal.SIGKILL)

    with pytest.raises((ValueError, ranks.RankCrashed)):
        ranks.run(fail, args=(np.ones(BIG),), n=2)


def test_a_failed_call_releases_the_results_of_the_ranks_that_finished() -> None:
    def half_fail() -> Any:
        if ranks.current().rank == 1:
            time.sleep(0.3)
            raise RuntimeError("late")
        return np.ones(BIG)

    with ranks.World(n=2) as world, pytest.raises(RuntimeError):
        world.run(half_fail)
    # The fixture checks the folders are gone; the kernel kept no mapping either.
    assert _mapped_data_files() == 0


@pytest.mark.timeout(60)
def test_an_interrupt_while_sending_a_big_argument_leaves_nothing() -> None:
    data = np.ones(1 << 27)  # 1 GiB: the write takes long enough to be interrupted
    main = threading.main_thread().ident
    assert main is not None
    with ranks.World(n=2) as world:
        for delay in (0.05, 0.2, 0.5):
            timer = threading.Timer(delay, signal.pthread_kill, (main, signal.SIGINT))
            timer.start()
            try:
                world.run(lambda data: float(data[0]), args=(data,))
                time.sleep(1)  # the interrupt came after the call: let it land here
            except KeyboardInterrupt:
                pass
            finally:
                timer.join()
            if world.broken:
                break
            assert os.listdir(world._folders.shared) == []  # type: ignore[union-attr]


def test_a_global_resent_with_every_call_is_warned_about_once() -> None:
    weights = np.ones(BIG)

    def use() -> float:
        return float(weights[0])

    with ranks.World(n=1) as world:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                world.run(use)
        said = [str(w.message) for w in caught if "again" in str(w.message)]
    assert len(said) == 1, said
    assert "'weights' captured by" in said[0] and "World.push(weights=weights)" in said[0]


@pytest.mark.timeout(90)
def test_what_a_killed_kernel_left_is_removed_by_the_next_start(fresh_kernel: Any) -> None:
    fresh_kernel.ok("import numpy as np, ranks, time")
    cell = fresh_kernel.start(
        "ranks.run(lambda data: time.sleep(60), args=(np.ones(1 << 27),), n=2)")
    deadline = time.monotonic() + 30
    while not [p for p in _leftovers() if os.listdir(p)] and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [p for p in _leftovers() if os.listdir(p)]
    assert left, "the kernel never staged its argument"
    os.kill(fresh_kernel.pid, signal.SIGKILL)
    del cell
    deadline = time.monotonic() + 10
    while psutil.Process(fresh_kernel.pid).status() != psutil.STATUS_ZOMBIE and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    assert all(Path(p).exists() for p in left)  # nobody was left to remove them
    _dataplane.sweep()  # what the next World's start does
    assert not any(Path(p).exists() for p in left)


@pytest.mark.timeout(120)
def test_a_small_dev_shm_falls_back_to_files_and_says_so_once(tmp_path: Path) -> None:
    """A private mount namespace with a 64 MB /dev/shm, as containers often have."""
    spill = tmp_path / "spill"
    spill.mkdir()
    script = textwrap.dedent(f"""
        import os, warnings, numpy as np, ranks
        warnings.simplefilter("always")
        data = np.ones(25_000_000)  # 200 MB: more than /dev/shm holds
        with warnings.catch_warnings(record=True) as caught:
            out = ranks.run(lambda d: (float(d.sum()), np.full(25_000_000, 2.0)),
                            args=(data,), n=2)
            ranks.run(lambda d: float(d[0]), args=(data,), n=2)
        assert [o[0] for o in out] == [25e6] * 2 and float(out[1][1].sum()) == 50e6
        said = [str(w.message) for w in caught if "RANKS_SPILL_DIR" in str(w.message)]
        assert len(said) == 1, said
        print(said[0])
        del out
        assert os.listdir({str(spill)!r}) == [], os.listdir({str(spill)!r})
    """)
    mount = "mount -t tmpfs -o size=64m tmpfs /dev/shm"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a private /dev/shm here: {probe.stderr.decode().strip()}")
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f'{mount} && exec "$0" -c "$1"', sys.executable, script],
        env={**os.environ, "RANKS_SPILL_DIR": str(spill)}, capture_output=True, text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr
    assert "64 MiB" in done.stdout and str(spill) in done.stdout
