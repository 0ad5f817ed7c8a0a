"""``ranks.current()``: what a rank knows about itself. Set once by the rank's entry point."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from typing import Any

from ._errors import RanksError


@dataclass(frozen=True)
class RankInfo:
    """The calling rank's place: ``rank``, ``world_size``, ``local_rank`` and ``device``."""

    rank: int
    world_size: int
    local_rank: int
    gpu: int | None  # the kernel's index of this rank's GPU, None on a CPU rank

    @property
    def device(self) -> Any:
        """``torch.device("cuda:<local_rank>")`` or ``torch.device("cpu")``; a str without torch.

        Ranks see their World's GPUs in rank order, so ``cuda:<local_rank>`` is the GPU this
        rank was given (the kernel's GPU ``gpu``).
        """
        name = "cpu" if self.gpu is None else f"cuda:{self.local_rank}"
        if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
            return name
        import torch

        return torch.device(name)


_current: RankInfo | None = None


def current() -> RankInfo:
    """The :class:`RankInfo` of the rank this code runs on; RanksError outside a rank."""
    if _current is None:
        raise RanksError(
            "ranks.current() is only available inside a rank (in fn or a %%ranks cell)"
        )
    return _current


def _set_current(info: RankInfo) -> None:
    global _current
    _current = info
