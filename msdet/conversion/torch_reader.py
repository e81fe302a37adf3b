"""Read ``torch.save`` checkpoints with NumPy only: no PyTorch, and no code from the file is ever run.

A torch checkpoint is a pickle, and unpickling an arbitrary pickle can run arbitrary code. This reader
uses a restricted unpickler that resolves only the handful of globals a tensor state dict needs (the
tensor/parameter rebuild functions, the storage types, ``collections.OrderedDict`` and the few builtins
that protocol 2 uses for sets and bytes); any other global (``os.system``, ``builtins.eval``,
``subprocess.Popen``, a pickled ``nn.Module`` or a Lightning ``AttributeDict``...) makes it raise
:class:`UnsafeCheckpointError` naming that global before anything is called. A pickle cannot be loaded
partially, so the whole file must obey this: an official ``.pth``/``.ckpt`` made of state dicts, optimizer
and scheduler states, numbers, strings, lists, tuples and dicts loads; one that also pickles custom objects
(e.g. Lightning ``hyper_parameters`` holding config objects) is refused with that object's global named,
and must be re-saved from PyTorch as ``{"state_dict": model.state_dict()}``.

Supported layouts:

- the zip format of PyTorch >= 1.6 (``<folder>/data.pkl`` plus one raw record per storage in
  ``<folder>/data/<key>``, an optional ``<folder>/byteorder``; the folder name varies);
- the legacy stream format of PyTorch 0.4 - 1.5 (still written with ``_use_new_zipfile_serialization=False``;
  zylo117's released EfficientDet weights use it): a pickled magic number, protocol version 1001 and
  sys_info, then the main pickle whose persistent ids are ``('storage', type, key, location, numel,
  view_metadata)``, then a pickled list of storage keys and, per key, an int64 element count followed by
  the raw little-endian elements. The storage types are only known from the main pickle, which comes
  before the data, so it is unpickled twice with the same allow-list: first with tensor rebuilding
  switched off to learn each storage's type and size, then for real once the records are read.

The pre-0.4 tar format, TorchScript archives and anything else are rejected with an error naming the file.

The file is untrusted in its size too: what one load allocates for records, storages and tensors is capped
relative to the file's size and absolutely (so a zip bomb or a tensor expanded far beyond its storage stops
before allocating); the allow-listed objects refuse the BUILD opcode, so a file cannot change them for the
rest of the process; and containers nested deeper than :data:`_MAX_NESTING` are refused, since whoever walks
the result recursively would hit Python's recursion limit.
"""
from __future__ import annotations

import _compat_pickle
import collections
import contextlib
import io
import pickle
import pickletools
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "LegacyCheckpointError",
    "UnsafeCheckpointError",
    "flatten_state_dict",
    "load_torch_pickle",
    "load_torch_state",
]


class CheckpointError(ValueError):
    """A file that cannot be read as a PyTorch checkpoint."""


class CheckpointFormatError(CheckpointError):
    """The file is not a (complete, well-formed) zip-format torch checkpoint."""


class LegacyCheckpointError(CheckpointFormatError):
    """The file uses torch's pre-0.4 tar serialization, which this reader does not support."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""

    def __init__(self, message: str, global_name: str) -> None:
        super().__init__(message)
        self.global_name = global_name


def _refuse_build(self: Any, state: Any) -> None:
    """``__setstate__`` of the allow-listed objects: the BUILD opcode would change them for the whole process."""
    raise CheckpointFormatError(f"the pickle tries to modify the allow-listed global {self!r:.80} (BUILD)")


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch storage class: only its element dtype matters."""

    name: str
    dtype: str  # NumPy dtype of one element as stored; "bfloat16" is read as uint16 bits

    __setstate__ = _refuse_build


class _Function:
    """An allow-listed function as the unpickler hands it out: the pickle may call it, never modify it (a
    plain function's ``__dict__`` and ``__defaults__`` are writable). ``budget`` is passed first when set."""

    __slots__ = ("_fn", "_budget")

    def __init__(self, fn: Callable[..., Any], budget: _Budget | None = None) -> None:
        self._fn, self._budget = fn, budget

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args) if self._budget is None else self._fn(self._budget, *args)

    def __repr__(self) -> str:
        return self._fn.__name__

    __setstate__ = _refuse_build


class _Budget:
    """Bytes one load may allocate for records, storages and tensors: ``_BYTES_PER_FILE_BYTE`` times the file's
    size plus ``_MIN_BUDGET``, and never more than ``_MAX_BUDGET``."""

    def __init__(self, file_size: int) -> None:
        self.limit = min(_MAX_BUDGET, _BYTES_PER_FILE_BYTE * file_size + _MIN_BUDGET)
        self.used = 0

    def take(self, nbytes: int, what: str) -> None:
        self.used += int(nbytes)
        if self.used > self.limit:
            raise CheckpointFormatError(
                f"{what} would bring what reading this checkpoint allocates to {self.used} bytes, over its cap of "
                f"{self.limit} ({_BYTES_PER_FILE_BYTE} x the file size + {_MIN_BUDGET >> 20} MiB, at most "
                f"{_MAX_BUDGET >> 20} MiB)")


@dataclass(frozen=True)
class _Storage:
    """One storage record decoded to a flat native-endian array (bf16 already widened to float32)."""

    key: str
    array: np.ndarray


_STORAGE_DTYPES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}

# PyTorch's legacy format starts with a pickled magic number (LONG1 opcode, 10 little-endian bytes).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_MAGIC = _LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_LEGACY_PROTOCOL_VERSION = 1001
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The allocation cap of one load (see _Budget): a sound file needs about 2x its size (records and tensor
# copies), 5x with bfloat16 storages (widened to float32); tied or expanded tensors add their copies.
_BYTES_PER_FILE_BYTE = 8
_MIN_BUDGET = 16 << 20
_MAX_BUDGET = 16 << 30
#: deepest container nesting a loaded checkpoint may have (a state dict of an optimizer state is about 5)
_MAX_NESTING = 100


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointFormatError(f"bad {what} {value!r} in a tensor record")
    return value


def _rebuild_tensor_v2(budget: _Budget, storage: Any, storage_offset: Any, size: Any, stride: Any,
                       requires_grad: Any = False, backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
    """NumPy version of torch._utils._rebuild_tensor_v2: a C-contiguous copy of the strided view."""
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"tensor record without a storage (got {type(storage).__name__})")
    if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
        raise CheckpointFormatError(f"bad tensor size/stride {size!r}/{stride!r}")
    offset = _as_index(storage_offset, "storage offset")
    shape = tuple(_as_index(n, "size") for n in size)
    steps = tuple(_as_index(s, "stride") for s in stride)
    flat = storage.array
    if 0 in shape:
        return np.empty(shape, dtype=flat.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(shape, steps))
    if last >= flat.size:
        raise CheckpointFormatError(
            f"tensor of size {shape} stride {steps} offset {offset} reads past the end of storage "
            f"{storage.key!r} ({flat.size} elements)")
    nbytes = int(np.prod(shape, dtype=np.float64) * flat.itemsize)
    budget.take(nbytes, f"a tensor of size {shape} over storage {storage.key!r} ({flat.size} elements)")
    base = flat[offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=shape, strides=tuple(s * flat.itemsize for s in steps),
                                           writeable=False)
    return np.array(view, copy=True, order="C")


def _rebuild_tensor(budget: _Budget, storage: Any, storage_offset: Any, size: Any, stride: Any) -> np.ndarray:
    """torch._utils._rebuild_tensor, used by files from PyTorch 0.4."""
    return _rebuild_tensor_v2(budget, storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, requires_grad: Any = True, backward_hooks: Any = None) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise CheckpointFormatError(f"parameter record without tensor data (got {type(data).__name__})")
    return data


def _rebuild_parameter_with_state(data: Any, requires_grad: Any, backward_hooks: Any, state: Any) -> np.ndarray:
    """Python attributes a Parameter carried are dropped: only the values matter for conversion."""
    return _rebuild_parameter(data)


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """Protocol 2 pickles ``bytes`` as ``_codecs.encode(text, 'latin1')``; allow exactly that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointFormatError("_codecs.encode used for something other than pickled bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): _latin1_bytes,
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", "uint8"),
    ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", "uint8"),
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


def _skip_tensor(*args: Any, **kwargs: Any) -> None:
    """Stand-in for the rebuild functions while probing a legacy pickle for its storages."""
    return None


#: the allow-listed globals that build tensors; replaced by ``_skip_tensor`` while probing
_TENSOR_BUILDERS = (("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
                    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"))
#: the allow-listed globals that allocate: they are handed the load's budget
_ALLOCATING = (("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"))

#: load_storage(key, storage type, element count, view metadata or None) -> storage
LoadStorage = Callable[[str, _StorageType, int, Any], _Storage]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from the allow-list and whose storages come from ``load_storage``.

    ``pid_length`` is 5 for zip archives and 6 for the legacy format (which adds view metadata); with no
    ``load_storage`` any persistent id is an error. ``probe`` keeps the allow-list but builds no tensors.
    Functions are handed out as :class:`_Function` wrappers; the classes (OrderedDict, set, frozenset) are
    immutable built-in types and the storage types refuse BUILD themselves.
    """

    def __init__(self, data: bytes, source: str, budget: _Budget, load_storage: LoadStorage | None = None,
                 pid_length: int = 5, probe: bool = False):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._source = source
        self._budget = budget
        self._load_storage = load_storage
        self._pid_length = pid_length
        self._probe = probe

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 files name Python 2 modules (__builtin__, copy_reg): map them like pickle would.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load global '{module}.{name}' (nothing was executed); "
                "only tensor state-dict globals are allowed: torch rebuild functions and storage types, "
                "collections.OrderedDict, set, frozenset and bytes", f"{module}.{name}")
        if self._probe and (module, name) in _TENSOR_BUILDERS:
            return _Function(_skip_tensor)
        if isinstance(allowed, (type, _StorageType)):
            return allowed
        return _Function(allowed, self._budget if (module, name) in _ALLOCATING else None)

    def persistent_load(self, pid: Any) -> _Storage:
        if (self._load_storage is None or not isinstance(pid, tuple) or len(pid) != self._pid_length
                or _ascii(pid[0]) != "storage"):
            raise CheckpointFormatError(f"unexpected persistent id {pid!r:.200}")
        storage_type, key, numel = pid[1], _ascii(pid[2]), pid[4]
        view = pid[5] if self._pid_length == 6 else None
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"persistent id with a non-storage type {storage_type!r:.100}")
        if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
            raise CheckpointFormatError(f"bad storage key {key!r:.100}")
        return self._load_storage(key, storage_type, _as_index(numel, "storage size"), view)


def _ascii(value: Any) -> Any:
    """Python 2 era pickles may hold ``bytes`` where Python 3 ones hold ``str``."""
    if isinstance(value, bytes):
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            return value
    return value


def _decode_storage(raw: bytes | memoryview, storage_type: _StorageType, byteorder: str, what: str, numel: int,
                    budget: _Budget) -> np.ndarray:
    """Raw storage bytes -> flat native-endian array (bfloat16 widened to float32)."""
    raw_dtype = np.dtype("uint16" if storage_type.dtype == "bfloat16" else storage_type.dtype)
    raw_dtype = raw_dtype.newbyteorder("<" if byteorder == "little" else ">")
    if len(raw) != numel * raw_dtype.itemsize:
        raise CheckpointFormatError(f"{what} has {len(raw)} bytes, expected {numel} x {raw_dtype.itemsize}")
    if storage_type.dtype == "bfloat16":
        budget.take(4 * numel, f"{what} widened from bfloat16")
    elif not raw_dtype.isnative:
        budget.take(len(raw), f"{what} swapped to native byte order")
    flat = np.frombuffer(raw, dtype=raw_dtype)
    if storage_type.dtype == "bfloat16":
        return (flat.astype(np.uint32) << 16).view(np.float32)
    return flat.astype(raw_dtype.newbyteorder("="), copy=False)


def _tar_message(path: Path) -> str:
    return (f"{path}: this is PyTorch's pre-0.4 tar checkpoint format, which this reader does not support; "
            "re-save it once with PyTorch: torch.save(torch.load(old, map_location='cpu', weights_only=True), "
            "new, _use_new_zipfile_serialization=True)")


def _open_archive(path: Path) -> zipfile.ZipFile | None:
    """Open ``path`` as a zip; None for a legacy stream file; every other kind of file is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(512)
    if zipfile.is_zipfile(path):
        try:
            return zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointFormatError(f"{path}: corrupt zip archive ({e})") from e
    if head[257:262] == b"ustar":
        raise LegacyCheckpointError(_tar_message(path))
    if _LEGACY_MAGIC in head[:32]:
        return None
    if head.startswith(b"PK\x03\x04"):
        raise CheckpointFormatError(
            f"{path}: truncated or corrupt zip archive (no end-of-archive record); download it again")
    if not head:
        raise CheckpointFormatError(f"{path}: empty file, not a PyTorch checkpoint")
    raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (neither a torch zip archive nor a "
                                "legacy torch pickle)")


def _archive_folder(path: Path, names: list[str]) -> str:
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) == 1:
        return pickles[0][: -len("/data.pkl")]
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CheckpointFormatError(
            f"{path}: a TorchScript archive (torch.jit.save), not a torch.save checkpoint; save "
            "{'state_dict': model.state_dict()} with torch.save instead")
    if not pickles:
        raise CheckpointFormatError(f"{path}: zip archive without <folder>/data.pkl, not a torch.save checkpoint")
    raise CheckpointFormatError(f"{path}: zip archive with several data.pkl records: {pickles[:4]}")


def load_torch_pickle(path: str | Path) -> Any:
    """Unpickle a ``torch.save`` file (zip or legacy format) into plain Python objects with NumPy arrays.

    Dicts, lists, tuples, numbers and strings come back as themselves; every tensor or Parameter becomes
    a C-contiguous ``np.ndarray`` of the same shape and dtype (bfloat16 becomes float32). Raises
    :class:`UnsafeCheckpointError` for any global outside the allow-list, :class:`LegacyCheckpointError`
    for pre-0.4 tar files, :class:`CheckpointFormatError` for anything else that is not a sound checkpoint
    and ``FileNotFoundError`` for a missing path. All messages start with the file's path.
    """
    path = Path(path)
    archive = _open_archive(path)
    budget = _Budget(path.stat().st_size)
    if archive is None:
        obj = _load_legacy(path, budget)
    else:
        with archive as zf:
            obj = _load_zip(path, zf, budget)
    _check_nesting(obj, path)
    return obj


def _containers(obj: Any) -> list | None:
    """The objects inside ``obj`` (keys too: tuples can nest), or None when it is not a container."""
    if isinstance(obj, Mapping):
        return [*obj.keys(), *obj.values()]
    if isinstance(obj, (list, tuple, set, frozenset)):
        return list(obj)
    return None


def _check_nesting(root: Any, path: Path) -> None:
    """Refuse containers nested deeper than ``_MAX_NESTING`` levels, or in a cycle, before anyone walks them
    recursively. Iterative; a container shared by several parents is walked once (its height is kept)."""
    if _containers(root) is None:
        return
    height: dict[int, int] = {}  # id -> levels of containers from it down, once walked
    stack = [[root, iter(_containers(root)), 0]]  # container, its contents still to see, highest content so far
    on_path = {id(root)}
    while stack:
        frame = stack[-1]
        child = next(frame[1], _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(frame[0]))
            height[id(frame[0])] = frame[2] + 1
            if stack:
                stack[-1][2] = max(stack[-1][2], frame[2] + 1)
            continue
        below = height.get(id(child))
        if below is not None:
            frame[2] = max(frame[2], below)
        else:
            inner = _containers(child)
            if inner is None:
                continue
            if id(child) in on_path:
                raise CheckpointFormatError(f"{path}: a container in the checkpoint contains itself")
            stack.append([child, iter(inner), 0])
            on_path.add(id(child))
            below = 0
        if len(stack) + below > _MAX_NESTING:
            raise CheckpointFormatError(f"{path}: containers nested deeper than {_MAX_NESTING} levels, not a "
                                        "checkpoint PyTorch writes")


_END = object()


def _load_zip(path: Path, zf: zipfile.ZipFile, budget: _Budget) -> Any:
    names = zf.namelist()
    folder = _archive_folder(path, names)
    member = f"{folder}/data.pkl"
    byteorder = "little"
    if f"{folder}/byteorder" in names:
        byteorder = _read_record(zf, f"{folder}/byteorder", budget).decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"{path}: unknown byteorder record {byteorder!r:.40}")
    storages: dict[str, _Storage] = {}

    def load_storage(key: str, storage_type: _StorageType, numel: int, view: Any) -> _Storage:
        cached = storages.get(key)
        if cached is not None:
            return cached
        record = f"{folder}/data/{key}"
        if record not in names:
            raise CheckpointFormatError(f"storage record {record} is missing")
        flat = _decode_storage(_read_record(zf, record, budget), storage_type, byteorder, f"storage record {record}",
                               numel, budget)
        storages[key] = _Storage(key, flat)
        return storages[key]

    with _format_errors(path, member):
        return _RestrictedUnpickler(_read_record(zf, member, budget), f"{path}", budget, load_storage).load()


def _read_record(zf: zipfile.ZipFile, name: str, budget: _Budget) -> bytes:
    """A zip record, charged to the budget at its stated size before it is inflated (zipfile reads no more)."""
    size = zf.getinfo(name).file_size
    budget.take(size, f"record {name} ({size} bytes uncompressed)")
    return zf.read(name)


@contextlib.contextmanager
def _format_errors(path: Path, part: str) -> Iterator[None]:
    """Anything but an unsafe global going wrong inside untrusted data means a corrupt file: say which."""
    try:
        yield
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        raise CheckpointFormatError(f"{path}: {e}") from e
    except Exception as e:
        raise CheckpointFormatError(f"{path}: corrupt checkpoint ({part}: {type(e).__name__}: {e})") from e


def _next_pickle(data: bytes, start: int, path: Path, what: str) -> int:
    """End offset of the pickle starting at ``start``, found by walking its opcodes (nothing is executed)."""
    stream = io.BytesIO(data)
    stream.seek(start)
    try:
        for opcode, _arg, _pos in pickletools.genops(stream):
            if opcode.name == "STOP":
                return stream.tell()
    except Exception as e:
        raise CheckpointFormatError(
            f"{path}: truncated or corrupt legacy checkpoint ({what}: {type(e).__name__}: {e})") from e
    raise CheckpointFormatError(f"{path}: truncated legacy checkpoint ({what} has no end)")


def _load_plain(data: bytes, path: Path, what: str, budget: _Budget) -> Any:
    """A header pickle of the legacy format: allow-listed globals only, no storages."""
    with _format_errors(path, what):
        return _RestrictedUnpickler(data, f"{path}", budget).load()


def _load_legacy(path: Path, budget: _Budget) -> Any:
    """The legacy (PyTorch 0.4 - 1.5) stream format; see the module docstring for its layout."""
    data = path.read_bytes()
    budget.take(len(data), "the file")
    pos = 0
    header = []
    for what in ("magic number", "protocol version", "sys_info"):
        end = _next_pickle(data, pos, path, what)
        header.append(_load_plain(data[pos:end], path, what, budget))
        pos = end
    magic, protocol, sys_info = header
    if magic != _LEGACY_MAGIC_NUMBER:
        raise CheckpointFormatError(f"{path}: not a PyTorch checkpoint (bad legacy magic number)")
    if protocol != _LEGACY_PROTOCOL_VERSION:
        raise CheckpointFormatError(f"{path}: unsupported legacy protocol version {protocol!r:.40}")
    if not isinstance(sys_info, dict):
        raise CheckpointFormatError(f"{path}: legacy sys_info is a {type(sys_info).__name__}, not a dict")
    main_start, main_end = pos, _next_pickle(data, pos, path, "main pickle")
    main = data[main_start:main_end]
    keys_end = _next_pickle(data, main_end, path, "storage key list")
    keys = _load_plain(data[main_end:keys_end], path, "storage key list", budget)
    if not isinstance(keys, (list, tuple)):
        raise CheckpointFormatError(f"{path}: legacy storage key list is a {type(keys).__name__}, not a list")
    keys = [_ascii(k) for k in keys]

    # pass 1: which storages (type, element count) the main pickle refers to, without building tensors
    types: dict[str, tuple[_StorageType, int]] = {}

    def probe_storage(key: str, storage_type: _StorageType, numel: int, view: Any) -> _Storage:
        seen = types.setdefault(key, (storage_type, numel))
        if seen != (storage_type, numel):
            raise CheckpointFormatError(f"storage {key!r} is referred to with two types or sizes")
        return _Storage(key, np.empty(0, np.uint8))

    with _format_errors(path, "main pickle"):
        _RestrictedUnpickler(main, f"{path}", budget, probe_storage, pid_length=6, probe=True).load()

    # the records: per key an int64 little-endian element count, then the little-endian elements
    roots: dict[str, np.ndarray] = {}
    pos = keys_end
    for key in keys:
        if not isinstance(key, str) or key not in types:
            raise CheckpointFormatError(f"{path}: storage record {key!r:.80} is not referred to by the checkpoint")
        if key in roots:
            raise CheckpointFormatError(f"{path}: storage record {key!r} appears twice")
        storage_type, numel = types[key]
        if pos + 8 > len(data):
            raise CheckpointFormatError(f"{path}: truncated legacy checkpoint (storage record {key!r} is missing)")
        count = int.from_bytes(data[pos:pos + 8], "little", signed=True)
        if count != numel:
            raise CheckpointFormatError(
                f"{path}: storage record {key!r} holds {count} elements, the checkpoint expects {numel}")
        itemsize = 2 if storage_type.dtype == "bfloat16" else np.dtype(storage_type.dtype).itemsize
        start, stop = pos + 8, pos + 8 + numel * itemsize
        if stop > len(data):
            raise CheckpointFormatError(f"{path}: truncated legacy checkpoint (storage record {key!r} has "
                                        f"{len(data) - start} of {stop - start} bytes)")
        with _format_errors(path, f"storage record {key!r}"):
            roots[key] = _decode_storage(memoryview(data)[start:stop], storage_type, "little",
                                         f"storage record {key!r}", numel, budget)
        pos = stop
    missing = [k for k in types if k not in roots]
    if missing:
        raise CheckpointFormatError(f"{path}: truncated legacy checkpoint (no record for storages {missing[:4]})")

    # pass 2: the real objects
    views: dict[str, _Storage] = {}

    def load_storage(key: str, storage_type: _StorageType, numel: int, view: Any) -> _Storage:
        root = roots[key]
        if view is None:
            return views.setdefault(key, _Storage(key, root))
        if not (isinstance(view, tuple) and len(view) == 3):
            raise CheckpointFormatError(f"bad storage view metadata {view!r:.100}")
        view_key = _ascii(view[0])
        offset, size = _as_index(view[1], "view offset"), _as_index(view[2], "view size")
        if offset + size > root.size:
            raise CheckpointFormatError(f"storage view {view_key!r:.40} [{offset}, {offset + size}) lies outside "
                                        f"storage {key!r} ({root.size} elements)")
        return views.setdefault(f"view:{view_key}", _Storage(str(view_key), root[offset:offset + size]))

    with _format_errors(path, "main pickle"):
        return _RestrictedUnpickler(main, f"{path}", budget, load_storage, pid_length=6).load()


def _flatten_into(out: dict[str, np.ndarray], tree: Mapping, prefix: str, source: str) -> None:
    for key, value in tree.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{source}: state dict key {key!r:.80} under {prefix!r} is not a string")
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, Mapping):
            _flatten_into(out, value, name, source)
        else:
            raise CheckpointFormatError(
                f"{source}: state dict entry {name!r} is a {type(value).__name__}, not a tensor")


def _is_tensor_tree(tree: Any) -> bool:
    if isinstance(tree, np.ndarray):
        return True
    return isinstance(tree, Mapping) and bool(tree) and all(_is_tensor_tree(v) for v in tree.values())


def flatten_state_dict(obj: Any, prefer: tuple[str, ...] = ("state_dict",), *,
                       source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Find the state dict in a loaded checkpoint and return it as ``{dotted key: array}``.

    Looks, in order, at the top-level keys in ``prefer``, then ``"state_dict"`` and ``"model"``; failing
    those, ``obj`` itself must be a (bare) dict of tensors. Nested dicts are joined with dots.
    """
    order = tuple(prefer) + tuple(k for k in ("state_dict", "model") if k not in prefer)
    out: dict[str, np.ndarray] = {}
    if isinstance(obj, Mapping):
        for key in order:
            if isinstance(obj.get(key), Mapping):
                _flatten_into(out, obj[key], "", source)
                if not out:
                    raise CheckpointFormatError(f"{source}: the state dict under {key!r} holds no tensors")
                return out
        if _is_tensor_tree(obj):
            _flatten_into(out, obj, "", source)
            return out
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise CheckpointFormatError(
            f"{source}: no state dict found: expected a dict under one of {list(order)} or a dict of tensors; "
            f"top-level keys are [{keys}]")
    raise CheckpointFormatError(f"{source}: checkpoint holds a {type(obj).__name__}, not a dict")


def load_torch_state(path: str | Path, prefer: tuple[str, ...] = ("state_dict",)) -> dict[str, np.ndarray]:
    """Read a torch checkpoint's state dict as ``{key: np.ndarray}`` (see :func:`flatten_state_dict`)."""
    return flatten_state_dict(load_torch_pickle(path), prefer, source=str(path))
