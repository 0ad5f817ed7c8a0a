"""Environment that frameworks other than torch need on each rank, one module per framework.

torchrun's variables (``RANK``, ``MASTER_ADDR``, ...) are set by ``_world`` for every rank;
they are all that torch.distributed, Accelerate, Lightning (which detects torchrun through
``TORCHELASTIC_RUN_ID``) and the Hugging Face Trainer read. A framework that reads
something else gets a module here with one function::

    environment(specs, address, free_port) -> [{name: value} for each rank, in rank order]

``address`` is the host every rank reaches (``MASTER_ADDR``); ``free_port()`` gives a port
no one listens on. The World asks :func:`environments` once per start and puts the result
under the user's ``env=`` (which wins) and over the kernel's own environment (whose values
belong to the kernel's world, not this one's).

A module may set only variables that do nothing unless its framework is used *and* asked
to read them: a rank that never imports the framework must not notice them. Nothing here
imports a framework.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .._placement import RankSpec
from . import jax

Framework = Callable[[Sequence[RankSpec], str, Callable[[], int]], list[dict[str, str]]]

FRAMEWORKS: tuple[Framework, ...] = (jax.environment,)


def environments(
    specs: Sequence[RankSpec], address: str, free_port: Callable[[], int]
) -> list[dict[str, str]]:
    """Every framework's variables for each rank, in rank order."""
    merged: list[dict[str, str]] = [{} for _ in specs]
    for framework in FRAMEWORKS:
        for env, extra in zip(merged, framework(specs, address, free_port), strict=True):
            env.update(extra)
    return merged
