"""One call on a rank: run it in the rank's namespace and make its reply.

    Call (run | exec | push | pull | debug)
      --> load what the kernel sent           (failure: "loading what the kernel sent")
      --> run it in the namespace             (failure: "running the function")
      --> the result, big buffers staged      (failure: "sending the result to the kernel")
      --> Done (payload) | Failed (the exception pickled, its traceback, when it happened)

This is the whole of what a call means on a rank, apart from how the rank came to be and
how it talks to the kernel (``_worker``: boot per start method, the control thread, the
interrupt handler, the exit): a rank hosted elsewhere (a Ray actor) calls :func:`execute`
the same way and gets the same replies. ``sys.exit`` in the user's code is raised out of
:func:`execute` as SystemExit: ending the rank is its host's business.

While the user's code runs (:func:`user_code`, also inside pickle: ``__reduce__``,
``__setstate__``), the host's SIGINT handler raises KeyboardInterrupt; outside it, an
interrupt must not land in ranks' own code (:func:`in_user_code` tells the handler).
"""

from __future__ import annotations

import builtins
import contextlib
import linecache
import sys
import time
import traceback
import types
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from . import _context, _dataplane, _namespace, _serialize
from ._protocol import Call, CallKind, Done, Failed

_in_user_code = False


def in_user_code() -> bool:
    """Whether the user's code runs now (an interrupt is for it)."""
    return _in_user_code


@contextlib.contextmanager
def user_code() -> Iterator[None]:
    """While the user's code runs, SIGINT raises KeyboardInterrupt. Cleared before any
    failure is reported: when this rank and a peer fail together, the kernel's SIGINT
    (meant for the peer's echo) must not land in the formatting of our own error, escape
    the call loop and kill the rank."""
    global _in_user_code
    _in_user_code = True
    try:
        yield
    finally:
        _in_user_code = False


def execute(
    call: Call, namespace: dict[str, Any], folders: _dataplane.Folders | None
) -> Done | Failed:
    """The reply to ``call``, run in ``namespace``; results' big buffers go to ``folders``
    (None: through the channel). SystemExit where the user's code asked to exit."""
    linecache.cache.update(call.cells)
    try:
        with user_code():
            if call.kind is CallKind.RUN:
                fn, args, kwargs = _dataplane.load(call.payload, consume=False)
            elif call.kind is CallKind.PUSH:
                values = _dataplane.load(call.payload, consume=False)
            elif call.kind is CallKind.EXEC:
                source, filename, taken = _serialize.loads(call.payload)
                code = compile(source, filename, "exec")
                _namespace.bind(taken, namespace, _context.current().rank)
    except BaseException as error:
        return failure(call.call_id, error, "loading what the kernel sent", skip=0)

    try:
        with user_code():
            if call.kind is CallKind.RUN:
                _fill_missing_globals(fn, namespace)
                result = fn(*args, **kwargs)
            elif call.kind is CallKind.EXEC:
                namespace.setdefault("__builtins__", builtins)
                exec(code, namespace)
                result = None
            elif call.kind is CallKind.PUSH:
                namespace.update(values)
                result = None
            elif call.kind is CallKind.DEBUG:
                from ._rank_pdb import post_mortem

                post_mortem()
                result = None
            else:
                result = _pull(namespace, _serialize.loads(call.payload))
    except BaseException as error:
        if call.kind in (CallKind.RUN, CallKind.EXEC):  # the user's code, not push or pull
            _keep_for_post_mortem(error)
        # skip=1 drops this frame: the traceback starts in the user's code.
        return failure(call.call_id, error, "running the function", skip=1)

    try:
        with user_code():
            payload = _dataplane.send_value(result, folders)
    except BaseException as error:
        return failure(call.call_id, error, "sending the result to the kernel", skip=0)
    return Done(call.call_id, payload)


def failure(call_id: int | None, error: BaseException, during: str, skip: int) -> Failed:
    """The reply that reports ``error`` (``skip``: frames of ours to drop from its
    traceback). A SystemExit is raised again instead: the rank is to exit."""
    # When it failed, not when the report is ready: formatting and pickling can take long
    # enough for a peer's later failure, or our SIGINT, to look earlier than this one.
    at = time.monotonic()
    if isinstance(error, SystemExit):
        raise error
    tb: TracebackType | None = error.__traceback__
    for _ in range(skip):
        tb = tb.tb_next if tb is not None else None
    text = "".join(traceback.format_exception(type(error), error, tb))
    payload: bytes | None
    try:
        payload = _serialize.dumps(error)
        # Exceptions whose __init__ takes other args fail only here; a __reduce__ may also
        # rebuild something that is no exception at all.
        if not isinstance(_serialize.loads(payload), BaseException):
            payload = None
    except BaseException:
        payload = None
    return Failed(call_id, payload, type(error).__qualname__, _message_of(error), text, during,
                  at)


def _keep_for_post_mortem(error: BaseException) -> None:
    """Where the interpreter keeps an uncaught exception, for ``World.debug`` (and the
    user's own ``pdb.pm()``), as IPython does for ``%debug``. Without this frame."""
    tb = error.__traceback__
    sys.last_type, sys.last_value = type(error), error
    sys.last_exc = error  # type: ignore[attr-defined,unused-ignore]  # Python 3.12+ keeps it here
    sys.last_traceback = tb.tb_next if tb is not None and tb.tb_next is not None else tb


def _fill_missing_globals(fn: Any, namespace: dict[str, Any]) -> None:
    """Names a notebook function uses but the kernel lacks come from the rank's namespace.

    A function sent by value carries the kernel's values of the globals it names; one that
    names ``model`` created on the ranks (``World.exec``, ``%%ranks``) finds it here.
    """
    func = getattr(fn, "__func__", fn)
    if not isinstance(func, types.FunctionType) or func.__globals__ is namespace:
        return
    shared = func.__globals__
    # The notebook helpers fn calls share its globals (cloudpickle sends them together):
    # the names they use count too.
    todo, seen = [func], set()
    while todo:
        code = todo.pop().__code__
        if code in seen:
            continue
        seen.add(code)
        for name in _serialize.global_names(code):
            value = shared.get(name)
            if isinstance(value, types.FunctionType) and value.__globals__ is shared:
                todo.append(value)
            elif name not in shared and name in namespace:
                shared[name] = namespace[name]


def _pull(namespace: dict[str, Any], name: str) -> Any:
    try:
        return namespace[name]
    except KeyError:
        rank = _context.current().rank
        raise NameError(f"name {name!r} is not defined on rank {rank}") from None


def _message_of(error: BaseException) -> str:
    """``str(error)``, or what the traceback module prints where the user's ``__str__``
    raises: such an exception must be reported, not end the rank."""
    try:
        return str(error)
    except BaseException:
        return "<exception str() failed>"
