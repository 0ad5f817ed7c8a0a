"""Where ranks differs by operating system: chosen once, here, at import.

    linux     the warm template (fork, fds passed over a Unix socket), spawn, portable;
              SIGKILL; Gloo and NCCL on ``lo``; big buffers through ``/dev/shm``;
              C's stdout line-buffered on the ranks
    macos     portable (spawn allowed), and any other POSIX system; C's stdout as it is
    windows   portable only; no SIGKILL (SIGTERM's stand-in ends a process as hard);
              ``USE_LIBUV=0`` for torch; at most 15 ranks before Python 3.13;
              C's stdout unbuffered (its C runtime, ucrtbase, has no line buffering)

Each module has the same names; ``current`` is this system's, and the rest of the
package reads its facts from it rather than asking ``sys.platform`` itself. What must
stay a literal ``sys.platform`` check does so where mypy has to skip code for another
system (the Win32 calls of ``_portable`` and ``_winjob``), and the mechanisms that only
one system has live in their own modules (``_lifeline``'s pidfd and parent-death signal,
``_descendants`` and the rank's watcher on Linux, ``_winjob`` on Windows); see
docs/platforms.md for what users see.
"""

from __future__ import annotations

import sys

if sys.platform == "win32":
    from . import windows as current
elif sys.platform.startswith("linux"):
    from . import linux as current
else:
    from . import macos as current

__all__ = ["current"]
