"""Read and write safetensors files with numpy, checking every size before allocating.

Format: ``u64`` little-endian header length, a UTF-8 JSON header mapping tensor
names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the end of the header) plus an optional ``"__metadata__"`` of strings, then the
raw little-endian bytes. bf16 is read through ``ml_dtypes``. Tensors are read one
at a time from a memory map, so loading a model never holds a whole file in RAM.
"""

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The order of the reference (Rust) writer's Dtype enum: it lays tensors out by dtype, highest first, then by name.
_WRITE_RANK = {name: rank for rank, name in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32",
                                                       "F64", "I64"))}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the reference implementation enforces


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupted or not safetensors at all."""


def _fail(path: Path, message: str) -> SafetensorsError:
    return SafetensorsError(f"{path}: not a valid safetensors file: {message}")


def _check_entry(path: Path, name: str, entry: object, data_size: int) -> None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(path, f"tensor {name!r} needs exactly dtype, shape and data_offsets")
    if entry["dtype"] not in DTYPES:
        raise _fail(path, f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise _fail(path, f"tensor {name!r} has data_offsets {offsets!r} outside the {data_size} data bytes")
    nbytes = math.prod(shape) * DTYPES[entry["dtype"]].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(path, f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but "
                          f"{entry['dtype']}{shape} needs {nbytes}")


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Parse and validate the header: returns (tensor entries, metadata, byte offset of the data)."""
    path = Path(path)
    file_size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _fail(path, f"file has {file_size} bytes, fewer than the 8-byte header length")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(MAX_HEADER_BYTES, file_size - 8):
            raise _fail(path, f"header claims {header_len} bytes but the file has {file_size}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"header is not UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "__metadata__ is not an object")
    data_size = file_size - 8 - header_len
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return header, metadata, 8 + header_len


class SafetensorsFile:
    """A validated safetensors file; ``get(name)`` reads one tensor into a new numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.entries, self.metadata, self._data_start = read_header(self.path)
        self._file = open(self.path, "rb")  # noqa: SIM115 -- closed by close() / __exit__

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        """A copy of tensor ``name`` (little-endian, its stored dtype and shape)."""
        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        entry = self.entries[name]
        begin, end = (self._data_start + o for o in entry["data_offsets"])
        array = np.empty(entry["shape"], DTYPES[entry["dtype"]])
        view = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < end - begin:
            read = os.preadv(self._file.fileno(), [view[done:]], begin + done)
            if read == 0:
                raise SafetensorsError(f"{self.path}: file ended while reading tensor {name!r}")
            done += read
        return array


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a (small) safetensors file."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name) for name in f.keys()}


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in safetensors format atomically (a temporary file renamed into place)."""
    arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
    specs = [(name, array.shape, array.dtype) for name, array in arrays.items()]
    save_streaming(specs, lambda name: arrays[name], path, metadata)


def save_streaming(specs: list[tuple[str, tuple[int, ...], np.dtype]], produce: Callable[[str], np.ndarray],
                   path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write tensors one at a time: ``specs`` lists (name, shape, dtype); ``produce(name)`` returns each array.

    Only one tensor is in memory at once. The file appears atomically (temporary file, fsync, rename).
    The layout is the reference writer's (tensors by dtype, then name; header padded to 8 bytes), so
    the same tensors give the same bytes as ``safetensors.torch.save_file``.
    """
    path = Path(path)
    for name, _, dtype in specs:
        if np.dtype(dtype) not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {np.dtype(dtype)} cannot be stored in safetensors")
    specs = sorted(specs, key=lambda spec: (-_WRITE_RANK[_NAMES[np.dtype(spec[2])]], spec[0]))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data to 8 bytes, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in specs:
            array = np.ascontiguousarray(produce(name), dtype=np.dtype(dtype).newbyteorder("<"))
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced shape {array.shape}, declared {tuple(shape)}")
            f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
