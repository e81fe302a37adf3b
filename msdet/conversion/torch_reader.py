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

Supported layout: the zip format of PyTorch >= 1.6 (``<folder>/data.pkl`` plus one raw record per storage
in ``<folder>/data/<key>``, an optional ``<folder>/byteorder``; the folder name varies). The legacy
(pre-1.6) format, TorchScript archives and anything else are rejected with an error naming the file.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    """The file uses torch's legacy (pre-1.6, non-zip) serialization."""


class UnsafeCheckpointError(CheckpointError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""

    def __init__(self, message: str, global_name: str) -> None:
        super().__init__(message)
        self.global_name = global_name


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch storage class: only its element dtype matters."""

    name: str
    dtype: str  # NumPy dtype of one element as stored; "bfloat16" is read as uint16 bits


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
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A stride-0 (expanded) tensor may legitimately be larger than its storage, but not absurdly so.
_MAX_EXPANDED_BYTES = 1 << 30


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointFormatError(f"bad {what} {value!r} in a tensor record")
    return value


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> np.ndarray:
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
    if nbytes > max(flat.nbytes, _MAX_EXPANDED_BYTES):
        raise CheckpointFormatError(f"implausible tensor of size {shape} over storage {storage.key!r}")
    base = flat[offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=shape, strides=tuple(s * flat.itemsize for s in steps),
                                           writeable=False)
    return np.array(view, copy=True, order="C")


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


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from the allow-list and whose storages come from the zip."""

    def __init__(self, data: bytes, source: str, load_storage: Callable[[str, _StorageType, int], _Storage]):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._source = source
        self._load_storage = load_storage

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
        return allowed

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unexpected persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"persistent id with a non-storage type {storage_type!r:.100}")
        if not isinstance(key, str) or not _STORAGE_KEY.fullmatch(key):
            raise CheckpointFormatError(f"bad storage key {key!r:.100}")
        return self._load_storage(key, storage_type, _as_index(numel, "storage size"))


def _legacy_message(path: Path) -> str:
    return (f"{path}: this is PyTorch's legacy (pre-1.6, non-zip) checkpoint format, which this reader does "
            "not support; re-save it once with PyTorch: torch.save(torch.load(old, map_location='cpu', "
            "weights_only=True), new, _use_new_zipfile_serialization=True)")


def _open_archive(path: Path) -> zipfile.ZipFile:
    """Open ``path`` as a zip, turning every other kind of file into a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(512)
    if zipfile.is_zipfile(path):
        try:
            return zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise CheckpointFormatError(f"{path}: corrupt zip archive ({e})") from e
    if _LEGACY_MAGIC in head[:32] or head[257:262] == b"ustar":
        raise LegacyCheckpointError(_legacy_message(path))
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
    """Unpickle a zip-format ``torch.save`` file into plain Python objects with NumPy arrays for tensors.

    Dicts, lists, tuples, numbers and strings come back as themselves; every tensor or Parameter becomes
    a C-contiguous ``np.ndarray`` of the same shape and dtype (bfloat16 becomes float32). Raises
    :class:`UnsafeCheckpointError` for any global outside the allow-list, :class:`LegacyCheckpointError`
    for pre-1.6 files, :class:`CheckpointFormatError` for anything else that is not a sound checkpoint and
    ``FileNotFoundError`` for a missing path. All messages start with the file's path.
    """
    path = Path(path)
    with _open_archive(path) as zf:
        names = zf.namelist()
        folder = _archive_folder(path, names)
        member = f"{folder}/data.pkl"
        byteorder = "little"
        if f"{folder}/byteorder" in names:
            byteorder = zf.read(f"{folder}/byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise CheckpointFormatError(f"{path}: unknown byteorder record {byteorder!r:.40}")
        storages: dict[str, _Storage] = {}

        def load_storage(key: str, storage_type: _StorageType, numel: int) -> _Storage:
            cached = storages.get(key)
            if cached is not None:
                return cached
            record = f"{folder}/data/{key}"
            if record not in names:
                raise CheckpointFormatError(f"storage record {record} is missing")
            raw = zf.read(record)
            raw_dtype = np.dtype("uint16" if storage_type.dtype == "bfloat16" else storage_type.dtype)
            raw_dtype = raw_dtype.newbyteorder("<" if byteorder == "little" else ">")
            if len(raw) != numel * raw_dtype.itemsize:
                raise CheckpointFormatError(
                    f"storage record {record} has {len(raw)} bytes, expected {numel} x {raw_dtype.itemsize}")
            flat = np.frombuffer(raw, dtype=raw_dtype)
            if storage_type.dtype == "bfloat16":
                flat = (flat.astype(np.uint32) << 16).view(np.float32)
            else:
                flat = flat.astype(raw_dtype.newbyteorder("="), copy=False)
            storages[key] = _Storage(key, flat)
            return storages[key]

        try:
            data = zf.read(member)
            return _RestrictedUnpickler(data, f"{path}", load_storage).load()
        except UnsafeCheckpointError:
            raise
        except CheckpointError as e:
            raise CheckpointFormatError(f"{path}: {e}") from e
        except Exception as e:  # anything else going wrong inside untrusted data means a corrupt file
            raise CheckpointFormatError(f"{path}: corrupt checkpoint ({member}: {type(e).__name__}: {e})") from e


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
