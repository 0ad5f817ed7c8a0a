"""Rank output into a notebook cell: throughput and latency, as the Jupyter client sees it.

    python bench/output.py [--lines N] [--samples S] [--markdown FILE]

Everything runs in a real ipykernel (jupyter_client), on a ``ranks.World`` of 2 CPU ranks
started once; every figure is taken where a user's browser would be: at the client, when
the IOPub message arrives (``time.time()`` in this process, same machine as the ranks).

Throughput: each rank prints N short lines as fast as it can.

    limiter off   ranks._output's per-rank limit raised out of reach in the kernel: the
                  rate of the whole path (pipe -> router -> ipykernel -> ZMQ -> client),
                  from the first stream message to the last
    limiter on    the defaults (a burst, then RATE_LINES a second per rank): how fast the
                  ranks wrote, how many lines reached the cell, how long the cell took

Latency: each rank prints ``time.time()`` S times, 20 ms apart; a sample is the arrival of
the message holding that line minus the stamp. Also for a redrawn line (``"\\r"``, shown as
a display that is updated at most every PROGRESS_INTERVAL): stamp to update_display_data.
Prints median, p95 and max in milliseconds.
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
from pathlib import Path

from _kernel import Cell, Kernel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def run_cell(kernel: Kernel, code: str) -> Cell:
    """Run one cell (five minutes at most); what it sent. CellFailed if it raised."""
    return kernel.execute(code, timeout=300.0).check()


def summary(seconds: list[float]) -> tuple[float, float, float]:
    """Median, p95 and max, in milliseconds."""
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered) * 1e3, p95 * 1e3, ordered[-1] * 1e3


SETUP = """
    import ast, time, ranks
    import ranks._output as _output

    def flood(n):
        started = time.perf_counter()
        for i in range(n):
            print(f"line {i} of the flood")
        return time.perf_counter() - started

    def stamps(n, redraw):
        import sys
        for _ in range(n):
            if redraw:
                sys.stdout.write(f"\\rT {time.time()!r}")
                sys.stdout.flush()
            else:
                print(f"T {time.time()!r}")
            time.sleep(0.02)
        if redraw:
            print()

    w = ranks.World(n=2)
    w.run(lambda: None)  # warm
"""


def throughput(kernel: Kernel, lines: int, limiter: bool) -> dict[str, float]:
    run_cell(kernel, "limits = _output.BURST_LINES, _output.RATE_LINES")
    if not limiter:
        run_cell(kernel, "_output.BURST_LINES = _output.RATE_LINES = 10**12")
    try:
        cell = run_cell(kernel, f"w.run(flood, args=({lines},))")
    finally:
        run_cell(kernel, "_output.BURST_LINES, _output.RATE_LINES = limits")
    assert cell.result is not None
    loop_seconds = max(float(s) for s in cell.result.strip("[]").split(","))
    shown = [(t, line) for t, line in cell.lines("stdout") if " of the flood" in line]
    first, last = shown[0][0], shown[-1][0]
    return {
        "written": 2 * lines,
        "written_per_s": 2 * lines / loop_seconds,
        "shown": len(shown),
        "shown_per_s": len(shown) / max(last - first, 1e-9),
        "cell_s": cell.ended - cell.started,
        "rank_s": loop_seconds,
    }


def latency(kernel: Kernel, samples: int, redraw: bool) -> list[float]:
    cell = run_cell(kernel, f"w.run(stamps, args=({samples}, {redraw}))")
    delays = []
    for msg in cell.messages:
        arrived = msg["arrived"]
        if redraw and msg["msg_type"] in ("display_data", "update_display_data"):
            texts = [msg["content"]["data"]["text/plain"]]
        elif not redraw and msg["msg_type"] == "stream":
            texts = msg["content"]["text"].splitlines()
        else:
            continue
        for text in texts:
            if " T " in text:
                delays.append(arrived - float(text.rsplit(" ", 1)[1]))
    return delays


def report(lines: int, samples: int) -> str:
    with tempfile.TemporaryDirectory() as cwd:
        kernel = Kernel(cwd)
        try:
            run_cell(kernel, SETUP)
            rows = {label: throughput(kernel, lines, on)
                    for label, on in (("limiter off", False), ("limiter on", True))}
            delays = {"stdout line": latency(kernel, samples, redraw=False),
                      "\\r redraw (display)": latency(kernel, samples, redraw=True)}
            run_cell(kernel, "w.close()")
        finally:
            kernel.close(now=False)  # its exit handlers close the World

    when = datetime.datetime.now().isoformat(timespec="seconds")
    out = [f"rank output into a cell, 2 CPU ranks, {os.cpu_count()} cores, "
           f"Python {platform.python_version()}, {when}", "",
           f"Throughput: each rank prints {lines:,} lines as fast as it can", "",
           "| limiter | ranks wrote (lines/s) | reached the cell"
           " | at the client (lines/s, first to last) | ranks' loop (s) | cell (s) |",
           "|---|---:|---:|---:|---:|---:|"]
    for label, row in rows.items():
        out.append(f"| {label} | {row['written_per_s']:,.0f} | {row['shown']:,.0f} of "
                   f"{row['written']:,.0f} | {row['shown_per_s']:,.0f} | {row['rank_s']:.2f}"
                   f" | {row['cell_s']:.2f} |")
    out += ["", f"Latency: rank's write to the client's receipt, 2 ranks x {samples} samples"
            " 20 ms apart", "", "| what | samples | median (ms) | p95 (ms) | max (ms) |",
            "|---|---:|---:|---:|---:|"]
    for label, seconds in delays.items():
        median, p95, worst = summary(seconds)
        out.append(f"| {label} | {len(seconds)} | {median:.2f} | {p95:.2f} | {worst:.2f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000, help="lines per rank")
    parser.add_argument("--samples", type=int, default=50, help="latency samples per rank")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    options = parser.parse_args()
    text = report(options.lines, options.samples)
    print(text)
    if options.markdown:
        Path(options.markdown).write_text(text + "\n")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")
