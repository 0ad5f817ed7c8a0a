"""Round trip of a trivial call on warm ranks: ranks.World beside ipyparallel and loky, 2 of each.

    pip install ipyparallel loky   # not dependencies of ranks: only this comparison needs them
    python bench/world_roundtrip.py [--calls N] [--markdown FILE]

Both sides are started once and warmed up, then timed call by call, alternately (one call of
ranks, one of ipyparallel), so that drift of a busy machine hits both alike:

* from Python: ``World.run(lambda: None)`` vs ``rc[:].apply_sync(lambda: None)`` vs two
  tasks submitted to loky's reusable executor of 2 workers, waited for both; and
  ``World.exec("pass")`` vs ``rc[:].execute("pass", block=True)``;
* through a real Jupyter kernel, as a user sees it (client sends the cell, until the kernel
  is idle and has replied): ``%%ranks`` with ``pass`` vs ``%px pass``, with a plain ``pass``
  cell as the kernel's own floor.

ipyparallel runs a controller and 2 engines on loopback (``ipp.Cluster(n=2)``); the kernel
connects its own client to the same cluster. Prints median and p95 in milliseconds and the
ratio ipyparallel/ranks (goal: ranks faster, in the low milliseconds or better). Everything
started here is stopped in ``finally`` blocks, also when a step fails.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from _kernel import Kernel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

WARMUP = 20


def summary(seconds: list[float]) -> tuple[float, float]:
    """Median and p95, in milliseconds."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p95 * 1e3


def alternate(calls: int, **pairs: Callable[[], object]) -> dict[str, list[float]]:
    """Time each callable ``calls`` times, interleaved, after WARMUP untimed rounds."""
    for _ in range(WARMUP):
        for fn in pairs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in pairs}
    for _ in range(calls):
        for name, fn in pairs.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


@contextmanager
def ipp_cluster(profile_dir: str) -> Iterator[tuple[Any, str]]:
    """A running ipyparallel cluster of 2 engines, its client, and the client's url file."""
    import ipyparallel as ipp
    import psutil

    before = set(psutil.Process().children(recursive=True))
    cluster = ipp.Cluster(n=2, profile_dir=profile_dir, log_level=40)
    started: list[psutil.Process] = []
    try:
        client = cluster.start_and_connect_sync()
        # The controller, the engines and their nannies: a nanny outlives its engine for a
        # moment and is re-parented to init, so it is found now and waited for at the end.
        started = [p for p in psutil.Process().children(recursive=True) if p not in before]
        try:
            client.wait_for_engines(2, timeout=120)
            url_file = os.path.join(profile_dir, "security",
                                    f"ipcontroller-{cluster.cluster_id}-client.json")
            yield client, url_file
        finally:
            client.close()
    finally:
        try:
            cluster.stop_cluster_sync()
        finally:
            _, alive = psutil.wait_procs(started, timeout=15)
            for proc in alive:
                with suppress(psutil.NoSuchProcess):
                    proc.kill()


def measure(calls: int) -> dict[str, list[float]]:
    import ranks

    results: dict[str, list[float]] = {}
    with ExitStack() as cleanup:
        profile_dir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ranks-ipp-"))
        client, url_file = cleanup.enter_context(ipp_cluster(profile_dir))
        view = client[:]
        import loky

        executor = loky.get_reusable_executor(max_workers=2)
        cleanup.callback(executor.shutdown, wait=True, kill_workers=True)
        # The first call in a fresh process spawns its ranks while the template starts:
        # the World measured here is forked from it, as a notebook's later Worlds are.
        ranks.run(int, n=1)
        time.sleep(3)
        world = cleanup.enter_context(ranks.World(n=2))

        def nothing() -> None:
            return None

        results.update(alternate(
            calls,
            ranks_run=lambda: world.run(nothing),
            ipp_apply=lambda: view.apply_sync(nothing),
            loky_submit=lambda: [f.result() for f in [executor.submit(nothing) for _ in "ab"]],
        ))
        results.update(alternate(
            calls,
            ranks_exec=lambda: world.exec("pass"),
            ipp_execute=lambda: view.execute("pass", block=True),
        ))

        workdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="ranks-kernel-"))
        kernel = Kernel(workdir)
        # Not now=True: the kernel's exit handlers close its World (and its template).
        cleanup.callback(kernel.close, now=False)

        def cell(code: str) -> None:
            """One cell, timed end to end: sent, until the kernel is idle and has replied."""
            kernel.run(code, timeout=60.0)

        cell("%load_ext ranks\n%ranks start -n 2")
        cell(f"import ipyparallel as ipp\nrc = ipp.Client({url_file!r})\n"
             "rc.wait_for_engines(2, timeout=60)\nrc.activate()")
        results.update(alternate(
            calls,
            kernel_pass=lambda: cell("pass"),
            kernel_ranks=lambda: cell("%%ranks\npass"),
            kernel_px=lambda: cell("%px pass"),
        ))
        cell("%ranks stop\nrc.close()")
    return results


ROWS = [  # (label, ranks, ipyparallel, loky or None)
    ("Python: `w.run(lambda: None)` / `rc[:].apply_sync(lambda: None)` / 2 loky tasks",
     "ranks_run", "ipp_apply", "loky_submit"),
    ("Python: `w.exec(\"pass\")` / `rc[:].execute(\"pass\", block=True)`",
     "ranks_exec", "ipp_execute", None),
    ("Kernel cell: `%%ranks` + `pass` / `%px pass`", "kernel_ranks", "kernel_px", None),
]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def report(results: dict[str, list[float]], calls: int) -> str:
    import ipyparallel
    import loky
    import torch

    floor_median, floor_p95 = summary(results["kernel_pass"])
    lines = [
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; torch"
        f" {torch.__version__}; ipyparallel {ipyparallel.__version__}; loky"
        f" {loky.__version__}; load average {os.getloadavg()[0]:.1f} at the end; Python"
        f" {platform.python_version()}; {platform.machine()}, {os.cpu_count()} CPU cores,"
        f" no GPU used (CPU ranks); {calls} timed calls each after {WARMUP} warm-up calls,"
        " ranks, ipyparallel and loky interleaved.",
        "",
        "| call (2 ranks / 2 engines / 2 workers) | ranks median | ranks p95"
        " | ipyparallel median | ipyparallel p95 | loky median | loky p95"
        " | ipyparallel / ranks | loky / ranks |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, ours, theirs, loky_key in ROWS:
        our_median, our_p95 = summary(results[ours])
        their_median, their_p95 = summary(results[theirs])
        loky_median, loky_p95 = summary(results[loky_key]) if loky_key else (None, None)
        lines.append(
            f"| {label} | {our_median:.3f} ms | {our_p95:.3f} ms | {their_median:.3f} ms"
            f" | {their_p95:.3f} ms | {_ms(loky_median)} | {_ms(loky_p95)}"
            f" | {their_median / our_median:.1f}x"
            f" | {'-' if loky_median is None else f'{loky_median / our_median:.1f}x'} |"
        )
    lines += [
        "",
        f"Kernel floor (a plain `pass` cell through the same client): median"
        f" {floor_median:.3f} ms, p95 {floor_p95:.3f} ms; the kernel rows include it.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    options = parser.parse_args()
    text = report(measure(options.calls), options.calls)
    print(text)
    if options.markdown:
        Path(options.markdown).write_text(text + "\n")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")
