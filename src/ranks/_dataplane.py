"""Big buffers between the kernel and its ranks: one copy per host, through shared memory.

Pickle protocol 5 hands every large contiguous buffer (numpy arrays, torch CPU tensors,
anything with ``__reduce_ex__`` producing a ``PickleBuffer``) to a callback instead of
copying it into the stream (``_serialize.pack``). Those buffers are written once into one
file in the World's folder on ``/dev/shm`` and only the file's name and the buffers' spans
travel over the control socket:

    kernel                                                 rank (each of them)
    pack(args) -> stream + buffers
    stage(): one file, buffers at aligned offsets ----->  load(): mmap the file
       (written once per call, whatever the rank count)     copy-on-write, rebuild the
    release(): unlink once every rank has answered           objects on views of it

    results, the other way: the rank stages into the same folder and replies with the
    name; the kernel maps the file and unlinks it at once, so the memory goes back to the
    system when the last object that views it is dropped.

Value semantics hold because every mapping is private (``MAP_PRIVATE``): a rank that
writes into its argument gets its own copy of the pages it touches, and neither the
kernel's object nor the other ranks' copies change. A file that is already unlinked stays
valid for whoever has it mapped.

Where ``/dev/shm`` lacks room for a call (containers often mount 64 MB), the file goes to a
folder on disk instead (``RANKS_SPILL_DIR``, default: the system's temp folder): a
file-backed mapping, slower to write but never a failed call; this is said once.

A World's folders are removed when it closes. A kernel that was killed cannot do that: the
next World started on the machine removes the folders of the same user's processes that
are gone (``sweep``). Not for Windows: a mapped file cannot be unlinked there, so ranks on
Windows keep sending buffers through the socket.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

from . import _runtime_dir
from ._os import current
from ._serialize import Packed, loads, pack

log = logging.getLogger("ranks")

# Where the rank finds its World's folders (set by the kernel for each rank it starts).
FOLDERS_VARIABLE = "RANKS_DATA_FOLDERS"
# The user's choice of a folder for file-backed mappings when /dev/shm is too small.
SPILL_VARIABLE = "RANKS_SPILL_DIR"
SHARED_MEMORY = "/dev/shm"
# A staged payload starts with this; a plain pickle starts with the PROTO opcode (0x80).
_MAGIC = b"RKS\x05"
_ALIGN = 64  # numpy's and torch's preferred alignment for what they rebuild on a view
# Room kept free on /dev/shm beyond a call's own buffers: other programs use it too.
_HEADROOM = 64 << 20
_PREFIX = "ranks-data-"
_names = itertools.count(1)
_spill_said = False
_swept = False


@dataclass(frozen=True)
class Folders:
    """The two folders of one World: on shared memory, and on disk for when it is full."""

    shared: str
    spill: str

    @classmethod
    def create(cls) -> Folders | None:
        """Make a World's folders (None where this platform keeps buffers in band)."""
        global _swept
        if not _supported():
            return None
        if not _swept:  # once per process: a killed kernel's folders stay dead
            sweep()
            _swept = True
        shared = tempfile.mkdtemp(prefix=_prefix(), dir=SHARED_MEMORY)
        try:
            spill = tempfile.mkdtemp(prefix=_prefix(), dir=_spill_root())
        except BaseException:
            shutil.rmtree(shared, ignore_errors=True)
            raise
        return cls(shared, spill)

    @classmethod
    def of_this_rank(cls) -> Folders | None:
        value = os.environ.get(FOLDERS_VARIABLE)
        if not value or not _supported():
            return None
        shared, _, spill = value.partition(os.pathsep)
        return cls(shared, spill)

    def as_variable(self) -> str:
        return f"{self.shared}{os.pathsep}{self.spill}"

    def remove(self) -> None:
        """Remove both folders; what is still mapped stays valid for its users."""
        shutil.rmtree(self.shared, ignore_errors=True)
        shutil.rmtree(self.spill, ignore_errors=True)

    def choose(self, nbytes: int) -> str:
        """Shared memory if it has room for ``nbytes``, else the spill folder (said once)."""
        global _spill_said
        stats = os.statvfs(self.shared)
        free = stats.f_bavail * stats.f_frsize
        if nbytes + _HEADROOM <= free:
            return self.shared
        if not _spill_said:
            _spill_said = True
            warnings.warn(
                f"ranks: {SHARED_MEMORY} has {free / 2**20:.0f} MiB free, too little for the"
                f" {nbytes / 2**20:.0f} MiB this call sends; big buffers go through files in"
                f" {os.path.dirname(self.spill)} instead (slower; set {SPILL_VARIABLE} to"
                " choose that folder, or give the container a larger /dev/shm)",
                RuntimeWarning, stacklevel=2,
            )
        return self.spill


def available() -> bool:
    """Whether this process can stage buffers (a World it starts will have folders)."""
    return _supported()


def send_value(value: Any, folders: Folders | None) -> bytes:
    """``value`` packed and staged: the rank's side of a result."""
    return stage(pack(value, out_of_band=folders is not None), folders)


def stage(packed: Packed, folders: Folders | None) -> bytes:
    """The payload to send for ``packed``: its buffers written once into a file of
    ``folders`` (then :func:`release` it), or a plain pickle where there are none."""
    if not packed.buffers:
        return packed.data
    if folders is None:
        raise RuntimeError("out-of-band buffers need a World's folders")  # pack() prevents it
    spans, offset = [], 0
    for view in packed.buffers:
        offset = -(-offset // _ALIGN) * _ALIGN
        spans.append((offset, view.nbytes))
        offset += view.nbytes
    path = os.path.join(folders.choose(offset), f"{os.getpid()}-{next(_names)}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        os.ftruncate(fd, offset)
        for (start, size), view in zip(spans, packed.buffers, strict=True):
            written = 0
            while written < size:  # one write moves at most ~2 GiB on Linux
                written += os.pwrite(fd, view[written:], start + written)
    except BaseException:  # an interrupt in the middle of a big write included
        os.close(fd)
        release_path(path)
        raise
    os.close(fd)
    return _MAGIC + pickle.dumps((path, tuple(spans), packed.data), protocol=5)


def load(payload: bytes, consume: bool) -> Any:
    """Rebuild what :func:`stage` sent (or a plain pickle). ``consume``: unlink the file
    once mapped (the kernel, for results; arguments are released by the kernel)."""
    if not payload.startswith(_MAGIC):
        return loads(payload)
    path, spans, data = pickle.loads(payload[len(_MAGIC):])
    try:
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
    finally:
        if consume:
            release_path(path)
    view = memoryview(mapping)
    return loads(data, [view[start:start + size] for start, size in spans])


def release(payload: bytes) -> None:
    """Remove the file behind a staged payload that was not consumed; safe to repeat."""
    if payload.startswith(_MAGIC):
        path, _, _ = pickle.loads(payload[len(_MAGIC):])
        release_path(path)


def release_path(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def sweep() -> None:
    """Remove the folders that this user's processes which are gone (a killed kernel) left
    in /dev/shm and the spill folder. Only folders named by ranks and owned by this user."""
    uid = os.getuid()
    for root in (SHARED_MEMORY, _spill_root()):
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        for entry in entries:
            if not _maker_is_gone(entry.name):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and entry.stat(
                    follow_symlinks=False
                ).st_uid == uid:
                    shutil.rmtree(entry.path, ignore_errors=True)


def _supported() -> bool:
    return current.DATA_PLANE and os.path.isdir(SHARED_MEMORY)


def _spill_root() -> str:
    return os.environ.get(SPILL_VARIABLE) or tempfile.gettempdir()


def _prefix() -> str:
    # Whose folder it is, as _runtime_dir names a process: a later process can tell
    # whether its maker is gone, even where pids are reused (containers, PID namespaces).
    return f"{_PREFIX}{_runtime_dir.process_tag()}-"


def _maker_is_gone(name: str) -> bool:
    if not name.startswith(_PREFIX):
        return False
    return _runtime_dir.tag_is_gone(name[len(_PREFIX):].rpartition("-")[0])
