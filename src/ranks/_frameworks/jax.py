"""JAX: the coordinator that ``jax.distributed.initialize()`` meets the other ranks at.

What JAX 0.10 reads from the environment (``jax/_src/distributed.py``): the coordinator's
``host:port`` from ``JAX_COORDINATOR_ADDRESS`` and the devices a process owns from
``JAX_LOCAL_DEVICE_IDS``, both only inside ``jax.distributed.initialize()``. The process
count and id it takes from arguments or from a detected cluster (Slurm, Open MPI,
Kubernetes, Cloud TPU); faking one of those would mislead Lightning and Accelerate, which
detect the same clusters, so a rank passes them itself::

    jax.distributed.initialize(num_processes=me.world_size, process_id=me.rank)

The coordinator gets a port of its own: rank 0's torch TCPStore already listens on
``MASTER_PORT``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._placement import RankSpec


def environment(
    specs: Sequence[RankSpec], address: str, free_port: Callable[[], int]
) -> list[dict[str, str]]:
    coordinator = f"{address}:{free_port()}"
    envs = []
    for spec in specs:
        env = {"JAX_COORDINATOR_ADDRESS": coordinator}
        if spec.gpu is not None:
            # Every rank sees all of its World's GPUs (rank r uses cuda:r); without this each
            # JAX process would claim all of them, as JAX's own cluster detection avoids by
            # giving process i local device i.
            env["JAX_LOCAL_DEVICE_IDS"] = str(spec.local_rank)
        envs.append(env)
    return envs
