"""DDP training throughput: the same script under torchrun and under ranks.run.

    python bench/ddp_throughput.py [--n N] [--steps S] [--repeats R] [--markdown FILE]

Both launchers run `bench/_ddp_workload.train` with the same settings, alternately, R
times each; the figure is the total samples per second summed over ranks, median of the
repeats. On GPUs every visible GPU gets a rank (NCCL); without, --n CPU ranks use Gloo
with a small model. Prints a table and the ratio ranks/torchrun (goal: >= 0.99).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _kernel import gpu_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def via_torchrun(n: int, config: dict[str, int]) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={n}", str(HERE / "_ddp_workload.py"),
                   json.dumps({**config, "out": out})]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"torchrun failed:\n{done.stdout}\n{done.stderr}")
        results = [json.loads(p.read_text()) for p in Path(out).glob("rank-*.json")]
    assert len(results) == n, done.stdout
    return sum(r["samples_per_s"] for r in results)


def via_ranks(n: int, gpus: int, config: dict[str, int]) -> float:
    from _ddp_workload import train

    import ranks

    placement = {"gpus": list(range(n))} if gpus else {"n": n}
    results = ranks.run(train, kwargs=config, output="none", timeout=600, **placement)
    return sum(r["samples_per_s"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", default=None)
    options = parser.parse_args()
    gpus = gpu_count()
    n = options.n or (gpus if gpus else 2)
    if gpus:
        config = {"steps": options.steps or 200, "width": 4096, "depth": 8, "batch": 512}
    else:
        config = {"steps": options.steps or 30, "warmup": 3, "width": 256, "depth": 2,
                  "batch": 64}
    torchrun, ours = [], []
    for _ in range(options.repeats):
        torchrun.append(via_torchrun(n, config))
        ours.append(via_ranks(n, gpus, config))
    import torch

    ratio = statistics.median(ours) / statistics.median(torchrun)
    where = f"{gpus} GPU(s), NCCL" if gpus else f"{os.cpu_count()} CPU cores, Gloo"
    lines = [
        f"DDP throughput, {n} ranks ({where}), torch {torch.__version__},"
        f" {datetime.date.today()}, config {config}, {options.repeats} repeats each",
        "",
        "| launcher | samples/s (median) | all repeats |",
        "| --- | ---: | --- |",
        f"| torchrun | {statistics.median(torchrun):,.0f} |"
        f" {', '.join(f'{x:,.0f}' for x in torchrun)} |",
        f"| ranks.run | {statistics.median(ours):,.0f} |"
        f" {', '.join(f'{x:,.0f}' for x in ours)} |",
        "",
        f"ratio ranks/torchrun: {ratio:.3f} (goal >= 0.99)",
    ]
    text = "\n".join(lines)
    print(text)
    if options.markdown:
        Path(options.markdown).write_text(text + "\n")


if __name__ == "__main__":
    started = time.monotonic()
    main()
    print(f"({time.monotonic() - started:.0f} s)")
