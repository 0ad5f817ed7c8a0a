"""The environment ranks sets for frameworks beyond torch (``ranks._frameworks``).

What each rank is given is checked here as data; that the frameworks really meet through
it (JAX's coordinator, Lightning finding torchrun) is shown by the example notebooks in
tests/test_examples.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from helpers import local_environments

from ranks._backends.local import free_port
from ranks._frameworks import FRAMEWORKS, environments
from ranks._placement import RankSpec, plan_ranks, visible_gpus


def _cpu_specs(n: int) -> list[RankSpec]:
    return plan_ranks(n, [], visible_gpus())


def test_jax_ranks_meet_at_one_coordinator_on_a_port_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    envs = local_environments(_cpu_specs(3), {})
    coordinators = {envs[r]["JAX_COORDINATOR_ADDRESS"] for r in range(3)}
    assert len(coordinators) == 1, coordinators
    host, port = coordinators.pop().rsplit(":", 1)
    assert host == envs[0]["MASTER_ADDR"]
    # rank 0's TCPStore listens on MASTER_PORT; the coordinator must not ask for the same one.
    assert port != envs[0]["MASTER_PORT"]
    # Free when handed out: it can be bound right now.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, int(port)))


def test_each_start_gets_a_fresh_coordinator_port() -> None:
    ports = {environments(_cpu_specs(2), "127.0.0.1", free_port)[0]["JAX_COORDINATOR_ADDRESS"]
             for _ in range(4)}
    # The OS may hand a port out twice; a fixed port would give one address every time.
    assert len(ports) >= 2, ports


def test_cpu_ranks_get_no_jax_device_ids() -> None:
    envs = environments(_cpu_specs(2), "127.0.0.1", free_port)
    assert all("JAX_LOCAL_DEVICE_IDS" not in env for env in envs)


def test_gpu_rank_r_owns_local_jax_device_r(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every rank sees the World's GPUs (rank r uses cuda:r): JAX must claim only that one.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    specs = plan_ranks(None, [2, 0], visible_gpus())
    envs = local_environments(specs, {})
    assert [envs[r]["CUDA_VISIBLE_DEVICES"] for r in (0, 1)] == ["6,4", "6,4"]
    assert [envs[r]["JAX_LOCAL_DEVICE_IDS"] for r in (0, 1)] == ["0", "1"]


def test_users_env_wins_over_the_kernels_and_the_kernels_loses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A coordinator in the kernel's environment belongs to the kernel's own world.
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.9:1234")
    ours = local_environments(_cpu_specs(2), {})
    assert ours[0]["JAX_COORDINATOR_ADDRESS"] != "10.0.0.9:1234"
    chosen = local_environments(_cpu_specs(2), {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:4321"})
    assert [chosen[r]["JAX_COORDINATOR_ADDRESS"] for r in (0, 1)] == ["127.0.0.1:4321"] * 2


def test_frameworks_set_only_their_own_variables() -> None:
    # Variables another library reads too (SLURM_*, OMPI_*, torchrun's) would change what
    # that library does on ranks that never use the framework.
    prefixes = {"JAX_"}
    for framework in FRAMEWORKS:
        for env in framework(_cpu_specs(2), "127.0.0.1", free_port):
            assert all(name.startswith(tuple(prefixes)) for name in env), env


def test_the_seam_imports_no_framework() -> None:
    code = "import sys, ranks._frameworks; print(sorted({'jax', 'lightning', 'accelerate', " \
           "'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.timeout(60)
def test_real_ranks_see_the_coordinator_and_the_caller_does_not() -> None:
    import ranks

    def coordinator() -> tuple[str, str]:
        import os
        return os.environ["JAX_COORDINATOR_ADDRESS"], os.environ["MASTER_PORT"]

    seen = ranks.run(coordinator, n=2)
    assert seen[0] == seen[1], seen
    address, master_port = seen[0]
    assert address.rsplit(":", 1)[1] != master_port
    assert "JAX_COORDINATOR_ADDRESS" not in os.environ
