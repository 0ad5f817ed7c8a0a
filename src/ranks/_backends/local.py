"""The local backend: every rank a child process of the kernel, on this machine.

The ranks are run by ``_supervisor.Supervisor`` (one multiplexed wait over their channels,
output and deaths; escalation when they must stop), started by the chosen start method
(``_start.launch_ranks``). What this module adds is how they find each other on one
host: loopback for ``MASTER_ADDR`` and for Gloo's and NCCL's own sockets (on Linux, where
the loopback interface is ``lo``), a port free when the World starts, and a FileStore in
the World's private folder for ``torch_dist=True``, so its rendezvous opens no TCP port.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from .. import _backends
from .._os import current
from .._placement import RankSpec
from .._supervisor import Supervisor
from . import Rendezvous

LOOPBACK = "127.0.0.1"


class Backend(Supervisor):
    """:class:`ranks._backends.Backend` for the ranks of this machine."""

    def __init__(self, specs: list[RankSpec], cwd: str) -> None:
        super().__init__(specs, cwd)
        try:
            port = self.free_port()
        except BaseException:  # (EMFILE) no World yet, so no close() that would clean up
            self.close()
            raise
        # One host: Gloo's and NCCL's sockets stay on loopback unless the user says.
        ifname = current.LOOPBACK_IFNAME
        self._rendezvous = Rendezvous(LOOPBACK, port, self.rendezvous_path, ifname)

    @property
    def rendezvous(self) -> Rendezvous:
        return self._rendezvous

    def free_port(self) -> int:
        return free_port()


def free_port() -> int:
    """A loopback port no one listens on (the system's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port: int = probe.getsockname()[1]
        return port


if TYPE_CHECKING:

    def _is_a_backend(local: Backend) -> _backends.Backend:
        return local  # mypy checks here that this class has the whole interface
