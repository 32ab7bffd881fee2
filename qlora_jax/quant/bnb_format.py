"""The bitsandbytes / transformers serialization of one 4-bit linear weight.

For a module prefix ``p`` (with its trailing dot, as torch's state_dict uses),
``bnb.nn.Linear4bit`` saves:

  p + "weight"                                   u8[ceil(numel / 2), 1]  packed codes
  p + "weight.absmax"                            f32[N], or u8[N] with double quant
  p + "weight.quant_map"                         f32[16]  the 4-bit table
  p + "weight.nested_absmax"                     f32[ceil(N / 256)]      (double quant)
  p + "weight.nested_quant_map"                  f32[256] dynamic map    (double quant)
  p + "weight.quant_state.bitsandbytes__<type>"  u8[...] UTF-8 JSON of the other fields
"""

import json

import jax.numpy as jnp
import numpy as np

from .blockwise import NESTED_BLOCKSIZE
from .codebooks import codebook, dynamic_map_signed
from .tensor import QuantizedTensor, validate_quant_args

_TORCH_DTYPE_NAMES = ("float32", "bfloat16", "float16")


def quant_state_json(q: QuantizedTensor) -> str:
    """The JSON that bnb's ``QuantState.as_dict(packed=True)`` writes, key order and all."""
    state = {"quant_type": q.quant_type, "blocksize": q.blocksize, "dtype": q.dtype, "shape": list(q.shape)}
    if q.double_quant:
        state.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": float(np.asarray(q.offset, np.float32))})
    return json.dumps(state)


def to_bnb_state_dict(q: QuantizedTensor, prefix: str) -> dict[str, np.ndarray]:
    """The exact tensors (names, dtypes, shapes, bytes) bnb saves for this weight."""
    if q.quant_type == "int4":
        raise ValueError("quant_type='int4' has no bitsandbytes serialization (bnb stores only nf4 and fp4)")
    key = prefix + "weight"
    state = {
        key: np.asarray(q.packed, np.uint8).reshape(-1, 1),
        f"{key}.absmax": np.asarray(q.absmax),
        f"{key}.quant_map": codebook(q.quant_type).copy(),
    }
    if q.double_quant:
        state[f"{key}.nested_absmax"] = np.asarray(q.nested_absmax, np.float32)
        state[f"{key}.nested_quant_map"] = dynamic_map_signed().copy()
    json_bytes = quant_state_json(q).encode("utf-8")
    state[f"{key}.quant_state.bitsandbytes__{q.quant_type}"] = np.frombuffer(json_bytes, np.uint8).copy()
    return state


def _require(state_dict: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name not in state_dict:
        raise ValueError(f"bitsandbytes state dict is missing {name!r}")
    return np.asarray(state_dict[name])


def _check_table(name: str, got: np.ndarray, want: np.ndarray) -> None:
    if got.shape != want.shape or not np.array_equal(got.astype(np.float32).view(np.uint32), want.view(np.uint32)):
        raise ValueError(f"{name} does not hold bitsandbytes' table (expected f32[{want.size}] identical to bnb's)")


def _read_quant_state(state_dict: dict[str, np.ndarray], key: str) -> dict:
    names = [k for k in state_dict if k.startswith(f"{key}.quant_state.bitsandbytes__")]
    if len(names) != 1:
        raise ValueError(f"expected one {key}.quant_state.bitsandbytes__<nf4|fp4> entry, found {len(names)}")
    try:
        state = json.loads(np.asarray(state_dict[names[0]], np.uint8).tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{names[0]} is not valid UTF-8 JSON: {err}") from None
    missing = {"quant_type", "blocksize", "dtype", "shape"} - set(state)
    if missing:
        raise ValueError(f"{names[0]} lacks {sorted(missing)}")
    if names[0].rsplit("__", 1)[1] != state["quant_type"]:
        raise ValueError(f"{names[0]} names a different quant_type than its JSON ({state['quant_type']!r})")
    if state["dtype"] not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"{names[0]}: dtype {state['dtype']!r} is not one of {_TORCH_DTYPE_NAMES}")
    return state


def from_bnb_state_dict(state_dict: dict[str, np.ndarray], prefix: str) -> QuantizedTensor:
    """Rebuild the ``QuantizedTensor`` that bnb saved under ``prefix``, bit for bit, without requantizing."""
    key = prefix + "weight"
    state = _read_quant_state(state_dict, key)
    quant_type, blocksize, shape = state["quant_type"], int(state["blocksize"]), tuple(int(d) for d in state["shape"])
    validate_quant_args(quant_type, blocksize)
    numel = int(np.prod(shape))
    num_blocks = -(-numel // blocksize)
    packed = _require(state_dict, key)
    if packed.dtype != np.uint8 or packed.size != (numel + 1) // 2:
        raise ValueError(f"{key}: expected u8 with {(numel + 1) // 2} elements for shape {shape}, "
                         f"got {packed.dtype} with {packed.size}")
    _check_table(f"{key}.quant_map", _require(state_dict, f"{key}.quant_map"), codebook(quant_type))
    absmax = _require(state_dict, f"{key}.absmax")
    double_quant = "nested_offset" in state
    want_dtype = np.uint8 if double_quant else np.float32
    if absmax.dtype != want_dtype or absmax.shape != (num_blocks,):
        raise ValueError(f"{key}.absmax: expected {np.dtype(want_dtype).name}[{num_blocks}], "
                         f"got {absmax.dtype}{list(absmax.shape)}")
    nested_absmax = offset = None
    if double_quant:
        _check_table(f"{key}.nested_quant_map", _require(state_dict, f"{key}.nested_quant_map"), dynamic_map_signed())
        if int(state.get("nested_blocksize", -1)) != NESTED_BLOCKSIZE:
            raise ValueError(f"{key}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {state.get('nested_blocksize')}")
        nested = _require(state_dict, f"{key}.nested_absmax")
        want_nested = -(-num_blocks // NESTED_BLOCKSIZE)
        if nested.dtype != np.float32 or nested.shape != (want_nested,):
            raise ValueError(f"{key}.nested_absmax: expected float32[{want_nested}], "
                             f"got {nested.dtype}{list(nested.shape)}")
        nested_absmax = jnp.asarray(nested)
        offset = jnp.asarray(np.float32(state["nested_offset"]))
    return QuantizedTensor(packed=jnp.asarray(packed.reshape(-1)), absmax=jnp.asarray(absmax),
                           nested_absmax=nested_absmax, offset=offset, shape=shape, dtype=state["dtype"],
                           blocksize=blocksize, quant_type=quant_type)
