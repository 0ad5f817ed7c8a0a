"""The DDP training step that bench/ddp_throughput.py runs under torchrun and under ranks.

One script, two launchers: `torchrun bench/_ddp_workload.py` runs `main()`, and ranks runs
`train()` imported from this module, so both time exactly the same code. Each rank trains
an MLP on synthetic data with DistributedDataParallel and reports samples per second over
the timed steps (after warm-up), measured between two barriers.
"""

from __future__ import annotations

import json
import os
import sys
import time


def train(steps: int = 200, warmup: int = 20, width: int = 4096, depth: int = 8,
          batch: int = 512) -> dict[str, float]:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    created = not dist.is_initialized()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(width, 10)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    generator = torch.Generator(device=device).manual_seed(rank)
    inputs = torch.randn(batch, width, device=device, generator=generator)
    labels = torch.randint(0, 10, (batch,), device=device, generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(ddp(inputs), labels)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - started
    if created:
        dist.destroy_process_group()
    return {"rank": rank, "samples_per_s": steps * batch / seconds, "seconds": seconds}


def main() -> None:
    config = json.loads(sys.argv[1])
    out = config.pop("out")
    result = train(**config)
    with open(os.path.join(out, f"rank-{result['rank']}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
