"""How a rank process of the local backend starts: the one chooser of the start method.

    template   Linux's default: forked from the warm template (``_template``), which falls
               back to spawn where it cannot fork (a failed or stale template, a large env)
    spawn      Linux's fallback: a fresh interpreter given its fds (``_spawn``)
    portable   the default elsewhere (Windows, macOS): a fresh interpreter connected back
               over loopback (``_portable``)

``RANKS_START_METHOD`` chooses another where the system allows it (portable: all of them;
spawn: POSIX; see ``_os``). macOS takes the portable start although spawn would work there: spawn
without Linux's pidfd and watcher process runs nowhere in the test suite, while the
portable start runs in it on Linux and on Windows.

Every method hands back the same handle, ``_spawn.RankProcess`` (the portable start's is
a subclass), so the supervisor does not care how a rank came to be. A new start method is
one more module with a ``launch(requests, deadline, launched)``, one more name here, its
boot in ``_worker``, and its name in the test modules' ``START_METHODS``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence

from ._os import current
from ._placement import RankSpec
from ._spawn import RankProcess

log = logging.getLogger("ranks")

START_METHOD_VARIABLE = "RANKS_START_METHOD"
# What to start: the rank, its environment, its working folder, its file for stack dumps.
Request = tuple[RankSpec, Mapping[str, str], str, str]


def start_method() -> str:
    """``"template"``, ``"spawn"`` or ``"portable"``: see the module's docstring."""
    default = "template" if current.TEMPLATE else "portable"
    chosen = os.environ.get(START_METHOD_VARIABLE, "").strip().lower()
    if chosen == "portable" or (chosen == "spawn" and current.SPAWN):
        return chosen
    if chosen and chosen != "template":
        log.warning("%s=%r is not 'template', 'spawn' or 'portable'; using the default",
                    START_METHOD_VARIABLE, chosen)
    return default


def launch_ranks(
    requests: Sequence[Request], deadline: float | None,
    launched: Callable[[RankProcess], None],
) -> None:
    """Start ranks the way ``start_method`` says; hand each to ``launched`` as soon as it
    runs. TimeoutError when ``deadline`` passes first."""
    method = start_method()
    if method == "portable":
        from . import _portable

        _portable.launch(requests, deadline, launched)
    elif method == "spawn":
        from . import _spawn

        _spawn.launch(requests, deadline, launched)
    else:
        from . import _template

        _template.launch(requests, deadline, launched)


def prestart() -> None:
    """Start what the chosen method keeps warm, without waiting for it (``%load_ext``)."""
    if start_method() == "template":
        from . import _template

        _template.prestart()
