"""CUDA tensors as arguments, from a kernel that holds them on its GPU (one GPU is enough).

A CUDA tensor is staged through host memory and lands on the receiver's own device: a GPU
rank's GPU, a CPU rank's CPU. A CPU rank never initialises CUDA for it, and a big one
arrives through shared memory like any CPU tensor; results come back as CPU tensors.
"""

from __future__ import annotations

import gpu_measure
import pytest
from kernel import Kernel

GPUS = gpu_measure.gpu_count()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU"),
]

SETUP = """
import torch, ranks
weights = torch.nn.Parameter(torch.arange(1 << 20, dtype=torch.float32, device="cuda"))

def where(weights):
    import torch
    return (str(weights.device), weights.requires_grad, float(weights.detach().sum()),
            torch.cuda.is_initialized(), weights * 2)
"""


def test_cuda_tensor_arguments_land_on_each_ranks_own_device(kernel: Kernel) -> None:
    kernel.ok(SETUP)
    expected = float((1 << 20) * ((1 << 20) - 1) / 2)
    on_cpu = kernel.value(
        "[r[:4] for r in ranks.run(where, args=(weights,), n=2, gpus=[])]", timeout=120)
    assert on_cpu == [("cpu", True, expected, False)] * 2
    on_gpu = kernel.value(
        "[r[:4] for r in ranks.run(where, args=(weights,), gpus=[0])]", timeout=120)
    assert on_gpu == [("cuda:0", True, expected, True)]
    back = kernel.value(
        "str(ranks.run(where, args=(weights,), gpus=[0])[0][4].device)", timeout=120)
    assert back == "cpu"
