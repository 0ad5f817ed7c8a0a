"""What a ``%%ranks`` cell (``World.exec``) takes from the notebook, and how a rank binds it.

A cell runs in the rank's namespace, which knows nothing of the notebook. Before it runs,
the kernel finds the names the cell reads (its bytecode's global loads, nested code
included) that the notebook defines, and sends each with the cell:

    kernel                                          rank
      names the cell reads                           for each name sent:
      ∩ the notebook's namespace ──> {name: bytes}     the rank lacks it       -> bind it
      (each pickled alone, at most MAX_VALUE_BYTES)    it came from the
      too big, or unpicklable ─────> {name: why}       notebook and is code    -> refresh it
                                                       otherwise               -> the rank's stays
                                                     unsent and lacking    -> NameError saying
                                                                               what to do

A name that cannot be sent (too big, or unpicklable: a lock, an open file) is an error only
where the rank lacks it and the cell does not assign it itself (``lock = Lock()`` on the
rank must not fail because the notebook's lock cannot travel).

The rank decides, not the kernel: only the rank knows what its namespace holds, and asking
it first would cost every cell a round trip. The price is that every cell re-sends what it
reads, so the size limit also bounds what a warm cell pays.

Functions and classes defined in the notebook travel by value (cloudpickle), modules by
name (imported on the rank). A notebook function sent with a cell gets the rank's namespace
as its globals, as if it had been defined there: it sees ``model`` created by an earlier
cell, and the globals it took from the notebook are bound by the same rule as the cell's
names. ``ranks`` itself is always bound on the rank.

Values are copied once (the rank's state is the cell's own: ``history.append`` on the rank
must not be undone by the next cell); functions and classes follow the notebook's latest
definition unless the rank rebound the name itself.
"""

from __future__ import annotations

import dis
import functools
import io
import pickle
import sys
import types
from collections.abc import Mapping
from typing import Any

import cloudpickle

from . import _serialize

# The largest pickled value a cell takes from the notebook by itself. It is re-sent with
# every cell that reads it, so it bounds what a warm cell pays: on 2 CPU ranks a 1 MiB array
# adds about 10 ms to a cell, 8 MiB about 55 ms, 32 MiB half a second, and a 2 MiB pickle of
# many small objects (a dict of lists) about 300 ms. Anything larger goes once, with
# `%ranks push`.
MAX_VALUE_BYTES = 1024 * 1024

_LOADS = frozenset({"LOAD_NAME", "LOAD_GLOBAL", "LOAD_FROM_DICT_OR_GLOBALS"})
_STORES = frozenset({"STORE_NAME", "STORE_GLOBAL"})
_NAMESPACE = "ranks:namespace"  # the persistent id that stands for the rank's namespace

Bundle = tuple[dict[str, bytes], dict[str, str]]  # pickled values; why others were not sent


def global_names(code: types.CodeType, opnames: frozenset[str]) -> set[str]:
    """The global names ``code`` (and the functions and classes it defines) load or store."""
    names = set()
    for instruction in dis.get_instructions(code):
        if instruction.opname in opnames:
            names.add(instruction.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= global_names(const, opnames)
    return names


def collect(source: str, notebook: Mapping[str, Any],
            hidden: frozenset[str] = frozenset()) -> Bundle:
    """What the cell ``source`` reads from ``notebook``, pickled for the ranks.

    A cell that does not compile sends nothing: the rank compiles it too and reports the
    SyntaxError where the cell's other errors appear.
    """
    names = _cell_names(source)
    if names is None:
        return {}, {}
    read, stored = names
    values: dict[str, bytes] = {}
    unsent: dict[str, str] = {}
    for name in sorted(read):
        if name.startswith("__") or name in hidden or name not in notebook:
            continue
        value = notebook[name]
        what = f"the notebook's {name} ({type(value).__name__}"
        size = _declared_size(value)
        try:
            if size is not None and size > MAX_VALUE_BYTES:
                raise _TooBig(_megabytes(size))
            values[name] = _dumps(value, notebook)
        except _TooBig as error:
            if name in stored:
                continue  # the cell makes its own (`big = load()`): nothing to say up front
            unsent[name] = (
                f"{what}, {error.size}) is too big to send with every cell (the"
                f" limit is {_megabytes(MAX_VALUE_BYTES)}, ranks._namespace.MAX_VALUE_BYTES)."
                f" Send it once with `%ranks push {name}` (World.push), or pass it explicitly."
            )
        except Exception as error:
            # Not an error yet: the rank may define the name itself (its own lock, its own
            # open file), and then never needs the notebook's.
            if name in stored:
                continue
            unsent[name] = (f"{what}) cannot be sent: {type(error).__name__}: {error}."
                            " Create it on the ranks instead.")
    return values, unsent


@functools.lru_cache(maxsize=64)
def _cell_names(source: str) -> tuple[frozenset[str], frozenset[str]] | None:
    """The global names a cell reads and assigns; None if it does not compile. Cached: a
    600-line cell takes tens of milliseconds to compile and read, and cells are re-run."""
    try:
        code = compile(source, "<cell>", "exec")
    except SyntaxError:
        return None
    return frozenset(global_names(code, _LOADS)), frozenset(global_names(code, _STORES))


def notebook_hidden(namespace: Mapping[str, Any]) -> frozenset[str]:
    """IPython's own names in its user namespace (In, Out, _, exit, ...): never sent."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None or shell.user_ns is not namespace:
        return frozenset()
    return frozenset(shell.user_ns_hidden)


def bind(bundle: Bundle, namespace: dict[str, Any], rank: int) -> None:
    """Bind what the kernel sent into the rank's ``namespace`` (see the module's rule)."""
    values, unsent = bundle
    if "ranks" not in namespace:
        import ranks

        namespace["ranks"] = ranks
    for name, data in values.items():
        if _takes(namespace, name):
            _Unpickler(io.BytesIO(data), namespace).load_into(name)
    for name, why in unsent.items():
        if name not in namespace:
            raise NameError(f"name {name!r} is not defined on rank {rank}, and {why}")


# --- the kernel's side --------------------------------------------------------------------


class _TooBig(Exception):
    def __init__(self, size: str) -> None:
        self.size = size


class _Limited(io.BytesIO):
    """Stops pickling as soon as the payload passes the limit. Pickling the rest only to
    say its size would cost every cell that reads a large pushed value (the rank has it, but
    the kernel cannot know) the whole pickling time."""

    def write(self, data: Any) -> int:
        if self.tell() + memoryview(data).nbytes > MAX_VALUE_BYTES:
            raise _TooBig(f"over {_megabytes(MAX_VALUE_BYTES)} pickled")
        return super().write(data)


class _CodePickler(_serialize._Pickler):
    """Pickles a notebook function so that, once loaded, its globals are the rank's
    namespace (a persistent id in place of cloudpickle's fresh globals dict) and the
    globals it took from the notebook pass through :func:`_bind`.

    This leans on cloudpickle 3's internals (``globals_ref``, ``_dynamic_function_reduce``,
    ``_function_setstate``): cloudpickle has no public hook for a function's globals.
    tests/test_notebook_cells.py fails if they change.
    """

    def __init__(self, file: io.BytesIO, notebook: Mapping[str, Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._file = file
        self._notebook = notebook
        # cloudpickle looks a function's future globals up in globals_ref by the id of its
        # globals: the notebook's functions get this stand-in, sent as _NAMESPACE.
        self._stand_in: dict[str, Any] = {}
        self.globals_ref[id(notebook)] = self._stand_in

    def persistent_id(self, obj: Any) -> str | None:
        return _NAMESPACE if obj is self._stand_in else None

    def reducer_override(self, obj: Any) -> Any:
        # An array or tensor anywhere inside (a state_dict, a model) says its size before
        # it is serialised: torch copies a whole tensor (from the GPU, too) to pickle it.
        size = _declared_size(obj)
        if size is not None and self._file.tell() + size > MAX_VALUE_BYTES:
            raise _TooBig(f"over {_megabytes(MAX_VALUE_BYTES)} pickled")
        return super().reducer_override(obj)

    def _dynamic_function_reduce(self, func: types.FunctionType) -> Any:
        reduced = super()._dynamic_function_reduce(func)
        if func.__globals__ is not self._notebook:
            return reduced
        return (*reduced[:5], _function_setstate)


def _dumps(value: Any, notebook: Mapping[str, Any]) -> bytes:
    buffer = _Limited()
    _CodePickler(buffer, notebook).dump(value)
    return buffer.getvalue()


def _declared_size(value: Any) -> int | None:
    """Arrays and tensors say their size: no need to pickle a large one to find out."""
    # Asked of the class first: an instance's __getattr__ (a proxy, a lazy object) could do
    # anything when asked for a name it lacks.
    if isinstance(value, type) or not hasattr(type(value), "nbytes"):
        return None
    try:
        nbytes = value.nbytes
    except Exception:
        return None
    return nbytes if isinstance(nbytes, int) else None


def _megabytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


# --- the rank's side ----------------------------------------------------------------------

# The notebook's functions, classes and modules this rank bound, by name: a name still bound
# to one was not rebound by the rank's own code, so the notebook's newer definition replaces it.
_code_from_notebook: dict[str, Any] = {}
_ABSENT = object()


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, namespace: dict[str, Any]) -> None:
        super().__init__(file)
        self._namespace = namespace

    def persistent_load(self, pid: Any) -> Any:
        if pid != _NAMESPACE:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._namespace

    def load_into(self, name: str) -> None:
        _bind(self._namespace, name, self.load())


def _takes(namespace: dict[str, Any], name: str) -> bool:
    """Whether the notebook's ``name`` may bind here: the rank lacks it, or holds the
    notebook's code under it (a value the rank holds is never even unpickled)."""
    current = namespace.get(name, _ABSENT)
    return current is _ABSENT or current is _code_from_notebook.get(name, _ABSENT)


def _bind(namespace: dict[str, Any], name: str, value: Any) -> None:
    if not _takes(namespace, name):
        return
    namespace[name] = value
    if _is_code(value):
        _code_from_notebook[name] = value
    else:
        _code_from_notebook.pop(name, None)  # a value: the rank's own from now on


def _is_code(value: Any) -> bool:
    return isinstance(value, (types.FunctionType, type, types.ModuleType))


def _function_setstate(func: types.FunctionType, state: Any) -> None:
    """cloudpickle's own, except that the notebook globals the function read are bound in
    the rank's namespace by :func:`_bind` (the rank's own names win) instead of written
    over it. Called by pickle on the rank: importable, hence at module level."""
    attributes, slots = state
    taken = slots.pop("__globals__")
    namespace = func.__globals__
    keep = namespace.get("__builtins__")  # cloudpickle would put its module's dict there
    cloudpickle.cloudpickle._function_setstate(func, (attributes, {**slots, "__globals__": {}}))
    if keep is None:
        namespace.pop("__builtins__", None)
    else:
        namespace["__builtins__"] = keep
    for name, value in taken.items():
        _bind(namespace, name, value)
