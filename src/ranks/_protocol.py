"""The messages on a rank's control channel, and how they are framed.

One socket pair per rank carries these, pickled and length-framed by
``multiprocessing.connection.Connection``. The user's data rides inside as cloudpickle bytes
(``payload`` fields) so the frames themselves are plain pickles of this module's classes.
The user's NCCL/Gloo traffic never uses this channel, and the ranks' output has its own pipes.

    kernel                                   rank
      | -- Init (sys.path, cwd, placement) --> |
      | <------------- Ready (pid) --- |   (after torch.distributed, if asked)
      | -- Call (run | exec | push | pull) --> |
      | <------------------ Done | Failed ---- |   (one per Call)
      | <------------------------ Interrupted -- |   SIGINT reached Python on the rank
      | -- Close ----------------------------> |   rank cleans up and exits

While a call runs, pdb on a rank (``breakpoint()``, ``World.debug``; see ``_rank_pdb``)
asks the kernel for each line it reads; the kernel answers one prompt at a time:

      | <------------- DebugPrompt (id, prompt) -- |   output flushed first
      | -- DebugInput (id, line) ------------------> |   taken by the control thread

Where signals cannot be sent to a rank (Windows, and the portable start, see ``_portable``),
two more messages stand in for them, taken by the rank's control thread at any time:

      | -- Interrupt ------------------------> |   as SIGINT: KeyboardInterrupt in the main thread
      | -- DumpStacks -----------------------> |   as SIGUSR1: every thread's stack to a file
"""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass, field
from multiprocessing.connection import Connection


class CallKind(enum.Enum):
    RUN = "run"  # payload: cloudpickled (fn, args, kwargs); result: fn's return value
    EXEC = "exec"  # payload: (source, filename, names from the notebook); result: None
    PUSH = "push"  # payload: cloudpickled {name: value}; result: None
    PULL = "pull"  # payload: the name; result: the value
    DEBUG = "debug"  # payload: empty; pdb post-mortem on the rank's last failure; result: None


@dataclass(frozen=True)
class Init:
    rank: int
    world_size: int
    gpu: int | None
    torch_dist: bool
    sys_path: tuple[str, ...]
    cwd: str
    store_path: str  # a FileStore for torch_dist=True: the rendezvous opens no TCP port


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Call:
    call_id: int
    kind: CallKind
    payload: bytes
    # Notebook cells as IPython keeps them in linecache, so tracebacks on the rank show them.
    cells: dict[str, tuple[int, None, list[str], str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Done:
    call_id: int
    payload: bytes


@dataclass(frozen=True)
class Failed:
    call_id: int | None  # None: failed while starting
    error: bytes | None  # the pickled exception, None when it would not pickle
    type_name: str
    message: str
    traceback: str
    during: str
    at: float  # time.monotonic() on the rank: system-wide, so ranks' failures can be ordered


@dataclass(frozen=True)
class Interrupted:
    """The kernel's SIGINT reached Python on the rank: it will answer (or is idle).

    Without it the kernel cannot tell a rank that is running its ``finally`` blocks from one
    blocked in C code (a collective), which no SIGINT will ever reach.
    """

    in_user_code: bool  # True: KeyboardInterrupt was raised there; False: ours will answer


@dataclass(frozen=True)
class DebugPrompt:
    prompt_id: int
    prompt: str  # labelled with the rank: "[rank 1] (Pdb) "


@dataclass(frozen=True)
class DebugInput:
    prompt_id: int
    line: str | None  # None: nobody can answer (no stdin, no terminal); pdb continues


@dataclass(frozen=True)
class Close:
    pass


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class DumpStacks:
    pass


Message = (Init | Ready | Call | Done | Failed | Interrupted | Close | Interrupt | DumpStacks
           | DebugPrompt | DebugInput)


def send(conn: Connection, message: Message) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection) -> Message:
    message: Message = pickle.loads(conn.recv_bytes())
    return message
