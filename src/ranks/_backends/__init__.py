"""Where the ranks of a World run: one interface, one module per backend, chosen by name.

A :class:`Backend` is the ranks of one World, wherever they are: it starts them, sends
each call and waits for the answers, stops and releases them, and says how they find each
other (:class:`Rendezvous`: ``MASTER_ADDR``/``MASTER_PORT``, the store that
``torch_dist=True`` meets in, the network interface for Gloo and NCCL). ``World`` holds
one and calls nothing else; what it builds (each rank's environment, the calls' payloads)
does not depend on where the ranks run.

    local   every rank a child process of the kernel, on this machine (``local``)
    ray     ranks hosted by Ray actors, on the machines of a Ray cluster: not yet

A backend is imported only when a World asks for it by name (:func:`create`), so one
whose library is missing (Ray) costs nothing until then, and then says what to do.
A new backend is a module here with a class that has :class:`Backend`'s methods, named
in BACKENDS; the rank side it starts runs ``_worker``'s call loop.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .._placement import RankSpec
    from .._protocol import CallKind, Init
    from .._stacks import ThreadStack
    from .._supervisor import WaitResult

# name -> the module that implements it (a class named Backend), or None where the name is
# known but not implemented yet: then NOT_YET says what to use instead.
BACKENDS: Mapping[str, str | None] = {"local": "ranks._backends.local", "ray": None}
NOT_YET = {
    "ray": "backend='ray' (ranks on the machines of a Ray cluster) is not available yet in"
           " this version of ranks; use backend='local' (the ranks of this machine)",
}


@dataclass(frozen=True)
class Rendezvous:
    """How the ranks of one World find each other."""

    address: str  # MASTER_ADDR: the host every rank reaches (rank 0's)
    port: int  # MASTER_PORT: free on that host when the World started
    store_path: str  # where torch_dist=True's FileStore lives (a private folder)
    socket_ifname: str | None  # GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless the user set one


class Backend(Protocol):
    """The ranks of one World. Every method runs in the calling thread; the World
    serialises calls, except :meth:`stacks`, which is safe while a call waits."""

    @property
    def rendezvous(self) -> Rendezvous: ...

    def free_port(self) -> int:
        """A port that no one listens on, on rank 0's host (for a framework's coordinator)."""
        ...

    def start(
        self, envs: Mapping[int, Mapping[str, str]], init_for: Callable[[RankSpec], Init],
        timeout: float | None, shown: Callable[[int], bool], started: float | None = None,
    ) -> WaitResult:
        """Start every rank with its environment, send it its Init, wait until all are
        ready (or one fails: then stop the rest)."""
        ...

    def call(
        self, kind: CallKind, payloads: Mapping[int, bytes],
        cells: Mapping[str, tuple[int, None, list[str], str]], timeout: float | None,
        shown: Callable[[int], bool], started: float | None = None,
    ) -> WaitResult:
        """One call on the ranks in ``payloads``; wait until each answered or ended."""
        ...

    def close(self) -> None:
        """Ask every rank to exit, force those that do not; release all (safe twice)."""
        ...

    def kill(self) -> None:
        """End every rank now, then release like :meth:`close`."""
        ...

    def dead_ranks(self) -> list[int]: ...

    @property
    def pids(self) -> dict[int, int]: ...

    def stacks(self) -> dict[int, tuple[ThreadStack, ...]]: ...

    def log_path(self, rank: int) -> str: ...

    @property
    def log_dir(self) -> str: ...

    def keep_logs(self) -> None:
        """Keep this World's logs after it closes: an error points at them."""
        ...


def check(name: object) -> None:
    """Refuse a backend that does not exist or is not available, before anything starts."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    if BACKENDS[name] is None:
        raise ValueError(NOT_YET[name])


def create(name: str, specs: list[RankSpec], cwd: str) -> Backend:
    """The backend ``name`` for these ranks, imported now (see :func:`check`)."""
    check(name)
    module = importlib.import_module(BACKENDS[name] or "")
    backend: Backend = module.Backend(specs, cwd)
    return backend
