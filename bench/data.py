"""Big data in and out of ranks, from a live Jupyter kernel: time and memory, against the
other ways to move it.

    pip install ray            # only this comparison needs it (skipped with --no-ray)
    python bench/data.py [--size-mib 1024] [--ns 2,8] [--repeat 3] [--markdown FILE]
    python bench/data.py --threshold     # where shared memory starts to beat the socket

One real ipykernel (jupyter_client) does everything; each measurement is timed inside it,
around the transfer alone, and every receiver reads one value per 4 KiB page of what it got
(so a mapping that is never touched cannot look free):

    in       the kernel's array (--size-mib) to each of n receivers
    out      an array of --out-mib (default: --size-mib) made on each of n senders, to the
             kernel

    copy               one in-memory copy of the array in the kernel: the floor
    ranks              a warm ranks.World: World.run(read, args=(data,)) and World.pull
    mp pipe            n multiprocessing "spawn" processes, Connection.send / recv
    ray                n Ray actors: ray.put + actor.read.remote(ref); actor results ray.get

Memory: while each transfer runs, a thread samples the machine's memory in use (MemTotal -
MemAvailable: private memory of every process and every shared-memory file) every 5 ms; the
table shows the peak above where it stood before (the senders' own arrays of "out" are made
before and are part of that baseline). Run it on an otherwise idle machine.

Ray runs on this machine only: the script re-runs itself in a private network namespace
(``unshare -n``, loopback up) where Ray finds no other address to bind or probe; it starts
its own local Ray and shuts it down. Everything started here is stopped in ``finally``.
Goals (issue "Data plane"): ranks within 1.5x of one copy for n = 2 (never worse than 3x);
its extra memory about one copy per host, not one per rank.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from _kernel import Kernel

HERE = Path(__file__).resolve().parent
INSIDE = "RANKS_BENCH_PRIVATE_NET"

SETUP = """
import json, time, numpy as np, ranks
PAGE = 512  # float64 per 4 KiB page

def read(data):
    return float(data[::PAGE].sum())

def timed(fn):
    started = time.perf_counter()
    out = fn()
    return time.perf_counter() - started, out

data = np.random.default_rng(0).random({elements})
"""

MP_SETUP = """
import multiprocessing as mp
from mp_peer import serve
context = mp.get_context("spawn")
pipes, peers = [], []
for _ in range({n}):
    ours, theirs = context.Pipe()
    peer = context.Process(target=serve, args=(theirs, {made}))
    peer.start()
    pipes.append(ours); peers.append(peer)
for conn in pipes:
    conn.send(("ping", None)); conn.recv()

def mp_in():
    for conn in pipes:
        conn.send(("read", data))
    return [conn.recv() for conn in pipes]

def mp_out():
    for conn in pipes:
        conn.send(("give", None))
    return [read(conn.recv()) for conn in pipes]
"""

MP_PEER = """
import numpy as np

def serve(conn, elements):
    made = None
    while True:
        kind, value = conn.recv()
        if kind == "stop":
            return
        if kind == "ping":
            made = np.ones(elements)
            conn.send(None)
        elif kind == "read":
            conn.send(float(value[::512].sum()))
        elif kind == "give":
            conn.send(made)
"""

RAY_SETUP = """
import ray
ray.init(num_cpus={n}, include_dashboard=False, logging_level="ERROR",
         object_store_memory={store}, runtime_env={{"env_vars": {{"NCCL_NVLS_ENABLE": "0"}}}})

@ray.remote(num_cpus=1)
class Peer:
    def __init__(self, elements):
        self.made = np.ones(elements)
    def read(self, data):
        return float(data[::PAGE].sum())
    def give(self):
        return self.made

actors = [Peer.remote({made}) for _ in range({n})]
ray.get([a.read.remote(np.zeros(1)) for a in actors])

def ray_in():
    ref = ray.put(data)
    try:
        return ray.get([a.read.remote(ref) for a in actors])
    finally:
        del ref

def ray_out():
    return [read(x) for x in ray.get([a.give.remote() for a in actors])]
"""


def in_private_network() -> None:
    """Re-run this script in a network namespace of its own, loopback up (Ray binds and
    probes the machine's addresses otherwise)."""
    if os.environ.get(INSIDE) == "1" or shutil.which("unshare") is None:
        return
    command = 'ip link set lo up && exec "$0" "$@"'
    env = {**os.environ, INSIDE: "1"}
    done = subprocess.run(["unshare", "-n", "sh", "-c", command, sys.executable, *sys.argv],
                          env=env, check=False)
    sys.exit(done.returncode)


class PeakMemory:
    """The peak of the machine's memory in use (MemTotal - MemAvailable: every process's
    private memory and every shared-memory file, whoever maps it) above where it stood when
    sampling started. System-wide, so nothing a transfer holds escapes it; run the benchmark
    on an otherwise idle machine."""

    def __init__(self) -> None:
        self.base = self.peak = _in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _in_use())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _in_use()) - self.base


def _in_use() -> int:
    fields = {}
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, value = line.split(":", 1)
            fields[name] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


def measure(kernel: Kernel, expression: str, repeat: int) -> tuple[float, int]:
    """Best time of ``repeat`` runs of ``expression`` in the kernel, and the peak of the
    memory in use above where it was before, over the runs."""
    best, extra = float("inf"), 0
    for _ in range(repeat):
        memory = PeakMemory()
        try:
            out = kernel.run(f"print(json.dumps(timed(lambda: {expression})[0]))", 600)
        finally:
            extra = max(extra, memory.stop())
        best = min(best, float(out.strip().splitlines()[-1]))
        kernel.run("import gc; _ = None; gc.collect()", 60)
    return best, extra


def transfers(kernel: Kernel, n: int, elements: int, made: int, methods: list[str],
              repeat: int, folder: Path) -> list[dict[str, Any]]:
    rows = []
    kernel.run(f"w = ranks.World(n={n})\nw.exec('import numpy as np')", 300)
    kernel.run(f"w.exec('made = np.ones({made})')\nw.push(read=read)", 300)
    try:
        cases = {
            "copy": ("data.copy()", "data.copy()"),
            "ranks": ("w.run(read, args=(data,))", "[read(x) for x in w.pull('made')]"),
        }
        if "mp pipe" in methods:
            (folder / "mp_peer.py").write_text(MP_PEER)
            kernel.run(f"import sys; sys.path.insert(0, {str(folder)!r})", 30)
            kernel.run(MP_SETUP.format(n=n, made=made), 300)
            cases["mp pipe"] = ("mp_in()", "mp_out()")
        if "ray" in methods:
            store = min(int(psutil.virtual_memory().available * 0.6),
                        (elements + 2 * n * made) * 8)
            kernel.run(RAY_SETUP.format(n=n, made=made, store=store), 600)
            cases["ray"] = ("ray_in()", "ray_out()")
        for method, (into, out_of) in cases.items():
            if method not in methods and method not in ("copy", "ranks"):
                continue
            for direction, expression in (("in", into), ("out", out_of)):
                if method == "copy" and direction == "out":
                    continue
                seconds, extra = measure(kernel, expression, repeat)
                rows.append({"n": n, "direction": direction, "method": method,
                             "seconds": seconds, "extra_mib": extra / 2**20})
                print(f"  n={n} {direction:3} {method:8} {seconds:7.3f} s"
                      f"  +{extra / 2**20:7.0f} MiB", flush=True)
    finally:
        with contextlib.suppress(Exception):
            kernel.run("w.close()", 120)
        with contextlib.suppress(Exception):
            kernel.run("""
if "pipes" in globals():
    for conn, peer in zip(pipes, peers):
        conn.send(("stop", None)); peer.join(10)
    del pipes, peers
if "ray" in globals() and ray.is_initialized():
    del actors
    ray.shutdown()
""", 120)
    return rows


def threshold(kernel: Kernel, repeat: int) -> list[dict[str, Any]]:
    """Time one warm call to 2 ranks with an argument of each size, all in the stream
    against all out of band: where the second starts to win is the threshold."""
    kernel.run("from ranks import _serialize\nw = ranks.World(n=2)", 300)
    rows = []
    try:
        for power in range(14, 26):
            size = 1 << power
            kernel.run(f"blob = np.ones({size // 8})", 30)
            times = {}
            for label, limit in (("socket", 1 << 62), ("shared memory", 1)):
                out = kernel.run(f"""
_serialize.BIG_BUFFER = {limit}
for _ in range(3): w.run(read, args=(blob,))
best = min(timed(lambda: w.run(read, args=(blob,)))[0] for _ in range({repeat * 5}))
print(best)
""", 120)
                times[label] = float(out.strip().splitlines()[-1])
            rows.append({"bytes": size, **times})
            print(f"  {size:>10} B  socket {times['socket'] * 1e3:8.3f} ms"
                  f"  shared memory {times['shared memory'] * 1e3:8.3f} ms", flush=True)
    finally:
        kernel.run("w.close()", 120)
    return rows


def markdown(rows: list[dict[str, Any]], size_mib: int) -> str:
    lines = [f"| n | direction | method | seconds | x copy | extra memory (MiB of {size_mib}) |",
             "| ---: | --- | --- | ---: | ---: | ---: |"]
    floor = {r["n"]: r["seconds"] for r in rows if r["method"] == "copy"}
    for r in rows:
        ratio = r["seconds"] / floor[r["n"]] if r["n"] in floor else float("nan")
        lines.append(f"| {r['n']} | {r['direction']} | {r['method']} | {r['seconds']:.3f} |"
                     f" {ratio:.2f} | {r['extra_mib']:.0f} |")
    return "\n".join(lines)


@contextlib.contextmanager
def kernel_in(folder: Path) -> Iterator[Kernel]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    kernel = Kernel(str(folder), log=folder / "kernel.log", env=env)
    try:
        yield kernel
    finally:
        kernel.close(now=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--ns", default="2,8")
    parser.add_argument("--out-mib", type=int, default=None,
                        help="what each sender sends back (default: --size-mib); n senders of"
                        " 1 GiB need 2n GiB of memory for any method, beyond a small machine")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--threshold", action="store_true")
    parser.add_argument("--markdown", type=Path)
    options = parser.parse_args()
    in_private_network()
    elements = options.size_mib * 2**20 // 8
    methods = ["copy", "ranks", "mp pipe"]
    if not options.no_ray:
        try:
            import ray  # noqa: F401
            methods.append("ray")
        except ImportError:
            print("ray is not installed: its rows are left out (pip install ray)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp, kernel_in(Path(tmp)) as kernel:
        kernel.run(SETUP.format(elements=elements if not options.threshold else 1), 120)
        if options.threshold:
            rows = threshold(kernel, options.repeat)
            text = json.dumps(rows, indent=1)
        else:
            rows = []
            for n in (int(x) for x in options.ns.split(",")):
                made = (options.out_mib or options.size_mib) * 2**20 // 8
                rows += transfers(kernel, n, elements, made, methods, options.repeat,
                                  Path(tmp))
            text = markdown(rows, options.size_mib)
    header = (f"{datetime.date.today()}, {platform.node()}: {os.cpu_count()} cores,"
              f" {psutil.virtual_memory().total / 2**30:.0f} GiB,"
              f" Python {platform.python_version()}; {time.monotonic() - started:.0f} s")
    print(header)
    print(text)
    if options.markdown:
        options.markdown.write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
