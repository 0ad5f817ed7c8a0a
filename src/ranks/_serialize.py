"""Everything that crosses between the kernel and a rank is pickled here, with cloudpickle.

cloudpickle sends code defined in the notebook (``__main__``: functions, lambdas, closures,
classes) by value and everything importable by reference, which is exactly the split a
notebook needs: a rank rebuilds the notebook's function and imports ``numpy`` itself.
A class sent by value keeps cloudpickle's tracker id, so an instance that comes back is an
instance of the kernel's own class again.

Three rules are added on top:

* code objects keep their file name and line numbers (tracebacks on a rank show the cell);
* a CUDA tensor is pickled as its CPU copy and unpickled onto the receiver's own device:
  a GPU rank's GPU, else the CPU. A result never makes the kernel create a CUDA context, an
  argument never makes a rank touch the kernel's GPU (or any GPU, on a CPU rank);
* when something cannot be pickled, :func:`dumps_call` says which argument or which global
  captured by the function it is, before any process starts.

Big buffers (at least ``BIG_BUFFER`` bytes: numpy arrays, torch CPU tensors, anything that
pickles through protocol 5's ``PickleBuffer``) can be taken out of the stream by
:func:`pack`; ``_dataplane`` moves them through shared memory instead of the socket.

Payloads are for one live session between processes of the same environment: cloudpickle
output is not meant for storage.
"""

from __future__ import annotations

import io
import marshal
import pickle
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import cloudpickle

# Buffers from this size on travel out of band. `bench/data.py --threshold` measures one
# warm call to 2 ranks with every buffer in the stream against every buffer in shared memory
# (a file, a mapping and an unlink per call): shared memory was slower up to 64 KiB, faster
# from 128 KiB on (0.94 against 1.73 ms), and 2.2x faster at 1 MiB. Twice the crossover, so
# that a busy machine's noise does not put the threshold on the wrong side of it.
BIG_BUFFER = 256 << 10
# A global at least this big, shipped again with every call, is worth a warning (big_captures).
RESENT_WARNING = 1 << 20


@dataclass(frozen=True)
class Packed:
    """A pickle stream and the big buffers taken out of it, in the order it refers to them."""

    data: bytes
    buffers: tuple[memoryview, ...] = ()

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(view.nbytes for view in self.buffers)


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    out_of_band = False  # set by pack(): big torch tensors may then travel as buffers

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
            return _on_own_device, (host,)
        if self.out_of_band and torch is not None and type(obj) is torch.Tensor:
            reduced = _tensor_as_buffer(obj)
            if reduced is not None:
                return reduced
        return super().reducer_override(obj)


def _on_own_device(tensor: Any) -> Any:
    """Where a CUDA tensor that was staged through host memory lands: on a GPU rank, that
    rank's own GPU; on a CPU rank and in the kernel, the CPU. Never another process's GPU:
    a rank that touched the kernel's GPU would open a CUDA context there."""
    from . import _context

    info = _context._current
    if info is None or info.gpu is None:
        return tensor
    return tensor.detach().to(info.device).requires_grad_(tensor.requires_grad)


def _tensor_as_buffer(tensor: Any) -> tuple[Any, ...] | None:
    """A big, plain, contiguous CPU tensor as one PickleBuffer of its bytes (torch's own
    reduction copies the storage into the stream). None: leave it to torch."""
    if (
        tensor.device.type != "cpu"
        or tensor.layout is not sys.modules["torch"].strided
        or not tensor.is_contiguous()
        or tensor.is_quantized
        or tensor.is_conj()
        or tensor.is_neg()
        or tensor.numel() * tensor.element_size() < BIG_BUFFER
    ):
        return None
    import torch

    try:  # a numpy view shares the tensor's memory and exposes it as a buffer
        raw = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # torch without numpy: torch's own reduction
        return None
    return _tensor_from_buffer, (
        pickle.PickleBuffer(raw), tensor.dtype, tuple(tensor.shape), tensor.requires_grad,
    )


def _tensor_from_buffer(buffer: Any, dtype: Any, shape: tuple[int, ...],
                        requires_grad: bool) -> Any:
    import torch

    flat = torch.frombuffer(buffer, dtype=torch.uint8)
    tensor = flat.view(dtype).reshape(shape)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` for another process of this session."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def pack(obj: Any, out_of_band: bool = True) -> Packed:
    """Pickle ``obj`` with its big contiguous buffers left out of the stream, by reference
    (the caller writes them out before ``obj`` can change); all in the stream where
    ``out_of_band`` is false (nowhere to put them)."""
    if not out_of_band:
        return Packed(dumps(obj))
    buffers: list[memoryview] = []

    def keep_in_stream(buffer: pickle.PickleBuffer) -> bool:
        try:
            view = buffer.raw()
        except BufferError:  # not contiguous: stays in the stream
            return True
        if view.nbytes < BIG_BUFFER:
            return True
        buffers.append(view)
        return False

    stream = io.BytesIO()
    pickler = _Pickler(stream, protocol=5, buffer_callback=keep_in_stream)
    pickler.out_of_band = True
    pickler.dump(obj)
    return Packed(stream.getvalue(), tuple(buffers))


def loads(data: bytes, buffers: Iterable[Any] = ()) -> Any:
    return pickle.loads(data, buffers=buffers)


def dumps_call(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any],
    out_of_band: bool = True,
) -> Packed:
    """Pack one call; on failure raise TypeError naming the part that cannot travel."""
    try:
        return pack((fn, args, dict(kwargs)), out_of_band)
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


def big_captures(fn: Callable[..., Any]) -> Iterator[tuple[str, Any, int]]:
    """The arrays and tensors of at least RESENT_WARNING bytes that ``fn`` drags along (by
    closure, global or default), with what :func:`_captured` calls them and their size."""
    for label, value in _captured(fn):
        size = getattr(value, "nbytes", None)
        if isinstance(size, int) and size >= RESENT_WARNING:
            yield label, value, size


def global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const)
    return names
