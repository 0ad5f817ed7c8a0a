"""The messages between the kernel and its warm template (``_template``), and their framing.

One ``SOCK_SEQPACKET`` socket pair carries them: one message per packet, pickled, with the
fds it hands over passed beside it (``SCM_RIGHTS``), never inside it.

    kernel (Template)                                  template process (serve)
      | <------------------------- TemplateReady ---- |  once, after the first Preload
      | -- Configure (sys.path, cwd, environment) --> |  before each Preload
      | -- Preload (module names) ------------------> |  the notebook's newer imports
      | -- Fork (env, cwd, stacks path)               |
      |      + fds [control, stdout, stderr] -------> |  fork(): the child becomes a rank
      | <------------- Forked (pid) + fd [exit] ----- |  exit pipe: the child's wait status
      | <----------- Poisoned (module, why) --------- |  instead, once forking is unsafe
      | -- close (EOF) -----------------------------> |  exits once its ranks are gone

Like ``_protocol``'s, the classes are frozen dataclasses and the frames plain pickles of
them; both ends import this module (the template is a process of ranks' own).
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 22


@dataclass(frozen=True)
class Configure:
    """Import what comes next from here, under this environment (None: keep the one the
    template has: the kernel's was too large to send)."""

    sys_path: tuple[str, ...]
    cwd: str
    environment: Mapping[str, str] | None


@dataclass(frozen=True)
class Preload:
    modules: tuple[str, ...]


@dataclass(frozen=True)
class Fork:
    """Fork a rank with this environment and folder; its control socket and output pipes
    come beside the message."""

    env: Mapping[str, str]
    cwd: str
    stacks_path: str


@dataclass(frozen=True)
class TemplateReady:
    """The first preload is done. ``report``: ``skipped`` {module: why} and, if forking
    became unsafe, ``poisoned`` (the module, or ``(template)``) and ``why``."""

    report: Mapping[str, Any]


@dataclass(frozen=True)
class Forked:
    """The rank's pid; its exit pipe comes beside the message."""

    pid: int


@dataclass(frozen=True)
class Poisoned:
    """No fork: ``module`` made forking unsafe (``why``)."""

    module: str
    why: str


ToTemplate = Configure | Preload | Fork
ToKernel = TemplateReady | Forked | Poisoned


def send(sock: socket.socket, message: ToTemplate | ToKernel, fds: Sequence[int] = ()) -> None:
    """One message, with ``fds`` beside it. OSError (EMSGSIZE: too large, nothing sent)."""
    socket.send_fds(sock, [pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)], list(fds))


def recv(sock: socket.socket) -> tuple[ToTemplate | ToKernel | None, list[int]]:
    """The next message and the fds beside it; None at end of stream (the other end closed)."""
    data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 4)
    if not data:
        return None, fds
    message: ToTemplate | ToKernel = pickle.loads(data)
    return message, fds
