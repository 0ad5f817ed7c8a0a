"""``ranks.run``: one call on fresh ranks, a World that lives for that call alone."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import _dataplane, _serialize
from ._protocol import CallKind
from ._world import Output, World, _check_call, _check_world, _shown_ranks


def run(
    fn: Callable[..., Any],
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    n: int | None = None,
    gpus: Sequence[int] | None = None,
    timeout: float | None = None,
    output: Output = "all",
    torch_dist: bool = False,
    env: Mapping[str, str] | None = None,
    backend: str = "local",
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` once on each rank; return the results in rank order.

    Ranks are fresh interpreters (never forks of the kernel), so this works after the
    notebook initialised CUDA. ``n`` CPU ranks, or one rank per GPU of ``gpus`` (default:
    every visible GPU). Each rank sees torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_PORT``...); ``torch_dist=True`` also creates the process group (NCCL on GPUs,
    Gloo on CPUs) before ``fn`` and destroys it after, as it does any group ``fn`` left open.

    Functions, lambdas, closures and classes defined in the notebook travel by value; names
    from installed or local modules are imported on the rank. Results that hold CUDA
    tensors arrive in the kernel as CPU tensors: the kernel never creates a CUDA context
    for them.

    An exception in ``fn`` is re-raised here with its type and the rank's traceback; the
    other ranks are stopped at once. A rank that dies raises ``ranks.RankCrashed``;
    ``timeout`` (seconds, start-up included) raises ``ranks.RanksTimeout`` with the stack of
    every rank still running. ``output`` picks which ranks print into the cell: ``"all"``,
    ``"rank0"``, ``"none"`` or a list of ranks.
    """
    __tracebackhide__ = True
    args, kwargs = _check_call(fn, args, kwargs, timeout)
    specs, extra_env = _check_world(n, gpus, torch_dist, env, backend)
    shown = _shown_ranks(output, len(specs))
    # Refuse what cannot travel before anything starts.
    payload = _serialize.dumps_call(fn, args, kwargs, _dataplane.available())
    started = time.monotonic()
    world = World._started(specs, torch_dist, extra_env, backend, timeout, shown, started)
    try:
        payloads = dict.fromkeys(range(len(specs)), payload)
        return world._call(CallKind.RUN, payloads, timeout, shown, started)
    finally:
        world.close()
