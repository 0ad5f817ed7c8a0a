"""From what each rank did to the one exception the cell shows.

The cause is the failure ``_attribution`` picks (the earliest one the kernel did not
cause): a rank's own exception comes back with its original type, the rank's traceback as
``__cause__`` and a note naming rank, pid and device; a death is a RankCrashed. Ranks
that failed later, or that were stopped because of the first failure, are summarised in a
note, so the cell leads with the root cause and not with its echoes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from . import _attribution, _serialize
from ._attribution import Outcome
from ._errors import TEMPLATE_ENDED, RankFailed, RankTraceback, add_note
from ._protocol import Failed


def build_error(
    outcomes: Mapping[int, Outcome], pids: Mapping[int, int], devices: Mapping[int, str]
) -> BaseException | None:
    """The exception for these outcomes, or None if every rank succeeded."""
    cause = _attribution.cause(outcomes)
    if cause is None:
        return None
    failed = [o for o in outcomes.values() if not o.ok]
    error = _exception_of(cause, pids, devices)
    others = sorted((o for o in failed if o is not cause), key=lambda o: o.rank)
    if others:
        add_note(error, "ranks: other ranks:\n" + "\n".join(
            f"  rank {o.rank}: {_summary(o)}" for o in others
        ))
    return error


def raising_rank(outcomes: Mapping[int, Outcome]) -> int | None:
    """The rank whose own exception the error shows (None: none raised, or one died)."""
    cause = _attribution.cause(outcomes)
    return cause.rank if cause is not None and isinstance(cause.reply, Failed) else None


def _exception_of(
    outcome: Outcome, pids: Mapping[int, int], devices: Mapping[int, str]
) -> BaseException:
    if outcome.crash is not None:
        return outcome.crash
    reply = outcome.reply
    assert isinstance(reply, Failed), reply
    where = f"rank {outcome.rank} (pid {pids.get(outcome.rank)}, {devices.get(outcome.rank)})"
    error: BaseException = RankFailed(outcome.rank, reply.type_name, reply.message,
                                      reply.traceback)
    if reply.error is not None:
        # Its class may live in a module only the rank can import, or its __reduce__ may
        # rebuild something else here: then RankFailed, which keeps the type's name, the
        # message and the traceback, stands in for it.
        with contextlib.suppress(Exception):
            rebuilt = _serialize.loads(reply.error)
            if isinstance(rebuilt, BaseException):
                error = rebuilt
    verb = "raised" if reply.during == "running the function" else f"failed while {reply.during}"
    header = "" if hasattr(error, "add_note") else f"{verb} on {where}:\n"  # 3.10: no notes
    error.__cause__ = RankTraceback(header + reply.traceback)
    add_note(error, f"ranks: {verb} on {where}")
    return error


def _summary(outcome: Outcome) -> str:
    if outcome.crash is not None:
        if outcome.crash.exitcode == TEMPLATE_ENDED:
            text = "ended with its template"
        else:
            how = outcome.crash.signal_name or f"exit code {outcome.crash.exitcode}"
            text = f"ended ({how})"
    else:
        assert isinstance(outcome.reply, Failed)
        text = f"{outcome.reply.type_name}: {outcome.reply.message}".rstrip(": ")
    if outcome.stopped_by is not None:
        text += f" after ranks sent it {outcome.stopped_by}"
    return text
