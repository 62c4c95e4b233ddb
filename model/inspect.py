"""What a checkpoint file holds, without running anything from it: its sha256, its tensors' names, shapes and dtypes,
and the registered layouts (``model.registry``) it loads into.

``.safetensors`` files are read from their JSON header alone. Torch's zip checkpoints (``torch.save``) are read from
their ``data.pkl`` with an unpickler that imports nothing: the few names a tensor pickle uses (tensor and parameter
rebuilders, storage types, ``OrderedDict``) are replaced by inert stand-ins that record a shape and a dtype, tensor
data is never read, and any other name in the pickle (``os.system``, a custom class) refuses the file. Legacy
(pre-zip) torch files fall back to ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import struct
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from base.errors import InputError
from model.registry import fitting_layouts
from model.safeload import UnsafeCheckpointError, torch_load

#: Largest safetensors header and torch ``data.pkl`` read (both hold only names, shapes and offsets).
MAX_HEADER_BYTES = 100 * 2**20
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
    "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
}
_TORCH_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UInt16Storage": "uint16", "UInt32Storage": "uint32",
    "UInt64Storage": "uint64", "Float8_e4m3fnStorage": "float8_e4m3fn", "Float8_e5m2Storage": "float8_e5m2",
}
_FIX = ("from a trusted environment, re-save only the tensors, e.g. torch.save(model.state_dict(), path) or "
        "safetensors.torch.save_file(state_dict, path)")


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor: its name (dotted path in the file), shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint file as found: format, sha256, size, tensors, non-tensor entries, the state dict's place in the
    file (``state_prefix``: '' or e.g. ``model.``) and the registered layouts that state dict loads into."""

    path: str
    format: str
    sha256: str
    size_bytes: int
    tensors: tuple[TensorInfo, ...]
    layouts: tuple[str, ...]
    state_prefix: str = ""
    other: dict[str, str] = field(default_factory=dict)
    """Non-tensor entries (e.g. an epoch counter): dotted name -> type name."""
    metadata: dict[str, str] = field(default_factory=dict)
    """A safetensors file's ``__metadata__``."""

    @property
    def parameters(self) -> int:
        """Elements over all tensors."""
        return sum(t.numel for t in self.tensors)

    @property
    def dtypes(self) -> dict[str, int]:
        """Tensors per dtype."""
        return dict(sorted(Counter(t.dtype for t in self.tensors).items()))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (what `hvp models inspect --json` prints)."""
        return {"path": self.path, "format": self.format, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "tensor_count": len(self.tensors), "parameters": self.parameters, "dtypes": self.dtypes,
                "layouts": list(self.layouts), "state_prefix": self.state_prefix, "other": self.other,
                "metadata": self.metadata,
                "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in self.tensors]}


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Describe a checkpoint without executing anything from it (see the module docstring). A torch pickle that
    names anything but tensors and plain containers raises UnsafeCheckpointError naming what it asked for; a
    damaged header raises InputError naming the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {path} does not exist; check the path.")
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(9)
    metadata: dict[str, str] = {}
    if zipfile.is_zipfile(path):
        fmt, tree = "torch-zip", _torch_zip_tree(path)
    elif len(head) == 9 and head[8:9] == b"{":
        fmt, (tree, metadata) = "safetensors", _safetensors_tree(path, size)
    else:
        fmt, tree = "torch-legacy", _legacy_tree(path)
    tensors, other = [], {}
    for name, leaf in _leaves(tree):
        if isinstance(leaf, TensorInfo):
            tensors.append(TensorInfo(name, leaf.shape, leaf.dtype))
        else:
            other[name] = type(leaf).__name__
    prefix, state = _state_dict(tree)
    layouts = fitting_layouts({k: v.shape for k, v in state.items()}) if state else []
    return CheckpointInfo(path=str(path), format=fmt, sha256=file_sha256(path), size_bytes=size,
                          tensors=tuple(tensors), layouts=tuple(layouts), state_prefix=prefix, other=other,
                          metadata=metadata)


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def describe(info: CheckpointInfo, limit: int = 20) -> str:
    """A human-readable summary: format, sha256, counts, fitting layouts, then the first ``limit`` tensors."""
    lines = [f"{info.path}", f"  format      {info.format}", f"  sha256      {info.sha256}",
             f"  size        {info.size_bytes} bytes",
             f"  tensors     {len(info.tensors)} ({info.parameters} elements; "
             + ", ".join(f"{d}: {n}" for d, n in info.dtypes.items()) + ")",
             f"  layouts     {', '.join(info.layouts) or '(none registered fits)'}"
             + (f" (state dict under '{info.state_prefix}')" if info.state_prefix else "")]
    if info.other:
        lines.append("  other       " + ", ".join(f"{k} ({v})" for k, v in sorted(info.other.items())))
    if info.metadata:
        lines.append("  metadata    " + json.dumps(info.metadata, sort_keys=True))
    for t in info.tensors[:limit]:
        lines.append(f"    {t.name}  {list(t.shape)}  {t.dtype}")
    if len(info.tensors) > limit:
        lines.append(f"    ... ({len(info.tensors) - limit} more)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- safetensors
def _safetensors_tree(path: Path, size: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensor stand-ins and ``__metadata__`` from a safetensors header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise InputError(path, "<header>", f"the safetensors header claims {n} bytes in a {size}-byte file",
                             "the file is truncated or not safetensors; save it again")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise InputError(path, "<header>", f"the safetensors header is not JSON ({exc})",
                             "the file is damaged; save it again") from None
    if not isinstance(header, dict):
        raise InputError(path, "<header>", "the safetensors header is not a JSON object", "save the file again")
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    tree: dict[str, Any] = {}
    for name, entry in header.items():
        try:
            shape = tuple(int(d) for d in entry["shape"])
            dtype = _SAFETENSORS_DTYPES.get(str(entry["dtype"]), str(entry["dtype"]).lower())
            start, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InputError(path, name, "the header entry lacks a valid shape, dtype or data_offsets",
                             "the file is damaged; save it again") from None
        if not 0 <= start <= end <= size - 8 - n:
            raise InputError(path, name, f"its data [{start}, {end}) lies outside the file's data section",
                             "the file is truncated or damaged; save it again")
        tree[name] = TensorInfo(name, shape, dtype)
    return tree, metadata


# ---------------------------------------------------------------------------------------------- torch zip
@dataclass(frozen=True)
class _Storage:
    """A storage as the pickle names it: its dtype; its bytes are never read."""

    dtype: str


class _Dict(dict):  # type: ignore[type-arg]
    """An ``OrderedDict`` stand-in that takes the state BUILD gives (torch's ``_metadata``) as an attribute."""


def _tensor(storage: _Storage, offset: int, size: tuple[int, ...], *rest: Any) -> TensorInfo:
    return TensorInfo("", tuple(int(d) for d in size), storage.dtype)


def _parameter(data: TensorInfo, *rest: Any) -> TensorInfo:
    return data


def _encode(text: str, encoding: str = "utf-8") -> bytes:
    return text.encode(encoding)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("collections", "OrderedDict"): _Dict,
    ("_codecs", "encode"): _encode,  # protocol-2 pickles spell bytes this way
    **{("torch", name): _Storage(dtype) for name, dtype in _TORCH_STORAGES.items()},
}


class _InertUnpickler(pickle.Unpickler):
    """Resolves only the names in ``_ALLOWED`` (to inert stand-ins); imports nothing, runs nothing."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                self.path, "<pickle>", f"refused: the pickle asks for the Python object '{module}.{name}', which "
                "is not a tensor or a plain container (loading it would run code from the file)", _FIX)
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 2 and pid[0] == "storage" and isinstance(pid[1], _Storage):
            return pid[1]
        raise UnsafeCheckpointError(self.path, "<pickle>", f"refused: unknown persistent id {pid!r:.80}", _FIX)


def _torch_zip_tree(path: Path) -> Any:
    """The object tree of a torch zip checkpoint's ``data.pkl``, with tensors as TensorInfo stand-ins."""
    with zipfile.ZipFile(path) as zf:
        pkl = [i for i in zf.infolist() if i.filename.endswith("data.pkl") and i.filename.count("/") == 1]
        if len(pkl) != 1:
            raise InputError(path, "data.pkl", "not a torch checkpoint: no single <name>/data.pkl in the archive",
                             "save it with torch.save, or as .safetensors")
        if pkl[0].file_size > MAX_HEADER_BYTES:
            raise InputError(path, "data.pkl", f"{pkl[0].file_size} bytes of pickle (tensor data is stored apart)",
                             "re-save only the tensors (the state dict)")
        data = zf.read(pkl[0])
    try:
        return _InertUnpickler(data, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a malformed pickle, or a stand-in called with arguments it does not take
        raise UnsafeCheckpointError(path, "<pickle>", f"refused: the pickle does not read as tensors and plain "
                                    f"containers ({type(exc).__name__}: {exc})", _FIX) from None


def _legacy_tree(path: Path) -> Any:
    """A pre-zip torch file through ``torch.load(weights_only=True)`` (which refuses anything but tensors)."""
    import torch

    def stand_in(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return TensorInfo("", tuple(value.shape), str(value.dtype).removeprefix("torch."))
        if isinstance(value, Mapping):
            return {k: stand_in(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [stand_in(v) for v in value]
        return value

    return stand_in(torch_load(path))


# ---------------------------------------------------------------------------------------------- the tree
def _leaves(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted name, leaf) of every tensor stand-in and scalar in nested dicts and lists."""
    if isinstance(tree, TensorInfo):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _leaves(v, f"{prefix}.{i}" if prefix else str(i))
    else:
        yield prefix, tree


def _is_state(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(isinstance(v, TensorInfo) for v in value.values())


def _state_dict(tree: Any) -> tuple[str, dict[str, TensorInfo]]:
    """The state dict in a file: the whole file when it is name -> tensor, else the largest such dict one level
    down (e.g. SAM2's ``model``, a training checkpoint's ``state_dict``); '' and {} when there is none."""
    if _is_state(tree):
        return "", dict(tree)
    inner: list[tuple[str, dict[str, TensorInfo]]] = [
        (f"{k}.", dict(v)) for k, v in tree.items() if _is_state(v)] if isinstance(tree, Mapping) else []
    return max(inner, key=lambda kv: len(kv[1])) if inner else ("", {})
