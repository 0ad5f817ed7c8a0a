"""Everything that crosses between the kernel and a rank is pickled here, with cloudpickle.

cloudpickle sends code defined in the notebook (``__main__``: functions, lambdas, closures,
classes) by value and everything importable by reference, which is exactly the split a
notebook needs: a rank rebuilds the notebook's function and imports ``numpy`` itself.
A class sent by value keeps cloudpickle's tracker id, so an instance that comes back is an
instance of the kernel's own class again.

Three rules are added on top:

* code objects keep their file name and line numbers (tracebacks on a rank show the cell);
* a CUDA tensor is pickled as its CPU copy, so a result never makes the kernel create a
  CUDA context on unpickling (and never lands on a GPU the kernel does not own);
* when something cannot be pickled, :func:`dumps_call` says which argument or which global
  captured by the function it is, before any process starts.

Payloads are for one live session between processes of the same environment: cloudpickle
output is not meant for storage.
"""

from __future__ import annotations

import io
import marshal
import pickle
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import cloudpickle


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.CodeType):
            # cloudpickle renames every code object's file to "<dynamic-code>", which would
            # cost tracebacks on the rank their notebook lines. Ranks run the kernel's own
            # interpreter (sys.executable), so marshal's format is safe and keeps it all.
            return marshal.loads, (marshal.dumps(obj),)
        torch = sys.modules.get("torch")
        if (
            torch is not None
            and type(obj) is torch.Tensor  # Parameters reduce to their .data, which lands here
            and obj.device.type not in ("cpu", "meta")
        ):
            host = obj.detach().cpu().requires_grad_(obj.requires_grad and obj.is_leaf)
            return host.__reduce_ex__(self.proto)
        return super().reducer_override(obj)


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for another process of this session."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def dumps_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bytes:
    """Pickle one call; on failure raise TypeError naming the part that cannot travel."""
    try:
        return dumps((fn, args, dict(kwargs)))
    except Exception as error:
        where = _find_unpicklable(fn, args, kwargs)
        raise TypeError(
            f"cannot send {where} to the ranks: {type(error).__name__}: {error}. Create it"
            " inside the function instead, or pass something picklable in its place."
        ) from error


def _find_unpicklable(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> str:
    for index, value in enumerate(args):
        if not _picklable(value):
            return f"args[{index}] ({type(value).__name__})"
    for key, value in kwargs.items():
        if not _picklable(value):
            return f"kwargs[{key!r}] ({type(value).__name__})"
    for label, value in _captured(fn):
        if not _picklable(value):
            return f"{label} ({type(value).__name__})"
    return f"the function {getattr(fn, '__qualname__', fn)!r}"


def _picklable(value: Any) -> bool:
    try:
        dumps(value)
    except Exception:
        return False
    return True


def _captured(fn: Callable[..., Any]) -> Iterator[tuple[str, Any]]:
    """What a by-value function drags along: closure cells, globals it names, defaults."""
    func = getattr(fn, "__func__", fn)  # bound methods: look at the function
    if not isinstance(func, types.FunctionType):
        return
    name = func.__qualname__
    code = func.__code__
    for var, cell in zip(code.co_freevars, func.__closure__ or (), strict=False):
        try:
            yield f"variable {var!r} captured by {name}", cell.cell_contents
        except ValueError:  # an empty cell
            continue
    for var in sorted(global_names(code)):
        if var in func.__globals__:
            yield f"global {var!r} used by {name}", func.__globals__[var]
    for index, default in enumerate(func.__defaults__ or ()):
        yield f"default argument {index} of {name}", default


def global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names
