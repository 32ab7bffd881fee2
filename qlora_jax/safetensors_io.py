"""Read safetensors with the ``safetensors`` library; write them one tensor at a time.

Reading goes through ``safetensors.safe_open(framework="numpy")``: lazy (one tensor at a
time from a memory map), header and offset checks in Rust, bf16 through ml_dtypes. Its errors become
one line naming the file.

Format (for the writer): ``u64`` little-endian header length, a UTF-8 JSON header mapping
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the end of the header) plus an optional ``"__metadata__"`` of strings, then the raw
little-endian bytes.
"""

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

_NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16", np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
# The order of the reference (Rust) writer's Dtype enum: it lays tensors out by dtype, highest first, then by name.
_WRITE_RANK = {name: rank for rank, name in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32",
                                                       "F64", "I64"))}


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupted or not safetensors at all."""


class SafetensorsFile:
    """An open safetensors file; ``get(name)`` reads one tensor into a new numpy array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._file = safe_open(str(self.path), framework="numpy")
        except SafetensorError as err:
            raise SafetensorsError(f"{self.path}: not a valid safetensors file: {err}") from None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file = None

    def keys(self) -> list[str]:
        return list(self._file.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        """A copy of tensor ``name`` in its stored dtype and shape.

        Read through a mapping opened for this one tensor: pages of the file mapped by a
        long-lived handle would stay in this process's resident set, and a streaming load
        would grow by the whole checkpoint instead of one tensor.
        """
        try:
            with safe_open(str(self.path), framework="numpy") as single:
                return single.get_tensor(name)
        except SafetensorError as err:
            raise SafetensorsError(f"{self.path}: cannot read tensor {name!r}: {err}") from None


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

    Kept by hand because the library's writers (``safetensors.numpy.save_file``/``save``)
    take every tensor at once: exporting or converting a 65B model would hold it all in
    RAM. Here only one tensor is in memory at once. The file appears atomically
    (temporary file, fsync, rename). The layout is the reference writer's (tensors by
    dtype, then name; header padded to 8 bytes), so the same tensors give the same bytes
    as ``safetensors.torch.save_file``.
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
