"""ranks: run notebook code on every GPU, or on N CPU ranks, from a live Jupyter kernel.

    ranks.run(fn, n=2)           one call on fresh ranks, results in rank order
    ranks.World(n=2)             ranks that stay alive: .run .exec .push .pull .close
    ranks.current()              inside a rank: .rank .world_size .local_rank .device
    %load_ext ranks              the %ranks / %%ranks magics

Importing this package starts nothing: no thread, no process, no signal handler, no torch.
The public names are re-exported here from private modules; tests/test_exports.py pins them.
"""

from __future__ import annotations

from typing import Any

from ._context import RankInfo, current
from ._errors import RankCrashed, RankFailed, RanksError, RanksTimeout, WorldBroken
from ._run import run
from ._world import World

__all__ = [
    "RankCrashed",
    "RankFailed",
    "RankInfo",
    "RanksError",
    "RanksTimeout",
    "World",
    "WorldBroken",
    "current",
    "run",
]

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext ranks``: register the ``%ranks`` and ``%%ranks`` magics."""
    from ._magic import register

    register(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from ._magic import unregister

    unregister(ipython)
