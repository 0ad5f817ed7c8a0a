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
import queue
import statistics
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


@dataclass
class Cell:
    """What one cell sent: each IOPub message with the time this process received it."""

    started: float
    messages: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    result: str | None = None

    def lines(self, name: str) -> list[tuple[float, str]]:
        out = []
        for arrived, msg in self.messages:
            if msg["msg_type"] == "stream" and msg["content"]["name"] == name:
                out += [(arrived, line) for line in msg["content"]["text"].splitlines()]
        return out

    @property
    def ended(self) -> float:
        return self.messages[-1][0]


class BenchKernel:
    """A real ipykernel driven by jupyter_client; ``cell`` records every message's arrival."""

    def __init__(self, cwd: str) -> None:
        from jupyter_client.manager import KernelManager

        self.manager = KernelManager(kernel_name="python3")
        self.manager.kernel_spec.argv[0] = sys.executable  # the interpreter with ranks
        self.manager.start_kernel(cwd=cwd, env=dict(os.environ))
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def cell(self, code: str, timeout: float = 300.0) -> Cell:
        cell = Cell(time.time())
        msg_id = self.client.execute(textwrap.dedent(code), store_history=False)
        deadline = time.monotonic() + timeout
        error = None
        while True:
            try:
                msg = self.client.get_iopub_msg(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"cell did not finish in {timeout} s: {code!r}") from None
            arrived = time.time()
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            cell.messages.append((arrived, msg))
            if msg["msg_type"] == "error":
                error = "\n".join(msg["content"]["traceback"])
            elif msg["msg_type"] == "execute_result":
                cell.result = msg["content"]["data"]["text/plain"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        self.client.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))
        if error is not None:
            raise RuntimeError(f"cell failed:\n{error}")
        return cell

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)  # its exit handlers close the World


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


def throughput(kernel: BenchKernel, lines: int, limiter: bool) -> dict[str, float]:
    kernel.cell("limits = _output.BURST_LINES, _output.RATE_LINES")
    if not limiter:
        kernel.cell("_output.BURST_LINES = _output.RATE_LINES = 10**12")
    try:
        cell = kernel.cell(f"w.run(flood, args=({lines},))")
    finally:
        kernel.cell("_output.BURST_LINES, _output.RATE_LINES = limits")
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


def latency(kernel: BenchKernel, samples: int, redraw: bool) -> list[float]:
    cell = kernel.cell(f"w.run(stamps, args=({samples}, {redraw}))")
    delays = []
    for arrived, msg in cell.messages:
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
        kernel = BenchKernel(cwd)
        try:
            kernel.cell(SETUP)
            rows = {label: throughput(kernel, lines, on)
                    for label, on in (("limiter off", False), ("limiter on", True))}
            delays = {"stdout line": latency(kernel, samples, redraw=False),
                      "\\r redraw (display)": latency(kernel, samples, redraw=True)}
            kernel.cell("w.close()")
        finally:
            kernel.close()

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
