"""Backends (``ranks._backends``): looked up by name, refused before anything starts when
they do not exist or are not available, and imported only when asked for.

The local backend itself is what every other test runs on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import ranks
from ranks._backends import BACKENDS, Rendezvous
from ranks._backends.local import LOOPBACK


def test_ray_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(ValueError, match="not available yet") as refused:
        ranks.World(n=1, backend="ray")
    assert "backend='local'" in str(refused.value)
    with pytest.raises(ValueError, match="not available yet"):
        ranks.run(int, n=1, backend="ray")


def test_an_unknown_backend_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown backend 'mpi'") as refused:
        ranks.run(int, n=1, backend="mpi")
    assert all(name in str(refused.value) for name in BACKENDS)


def test_a_backend_is_imported_only_when_a_world_asks_for_it() -> None:
    code = ("import sys, ranks\n"
            "print('ranks._backends.local' in sys.modules)\n"
            "ranks.run(int, n=1)\n"
            "print('ranks._backends.local' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"], done.stderr


@pytest.mark.timeout(60)
def test_local_ranks_meet_on_loopback_in_a_private_store() -> None:
    with ranks.World(n=2) as world:
        meet = world._backend.rendezvous
        assert isinstance(meet, Rendezvous) and meet.address == LOOPBACK
        seen = world.run(lambda: (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])))
        assert seen == [(LOOPBACK, meet.port)] * 2
        folder = os.path.dirname(meet.store_path)
        assert os.stat(folder).st_mode & 0o077 == 0, oct(os.stat(folder).st_mode)
