"""The quantization core against bitsandbytes' own bytes (fixtures) and its invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, bnb_cases

from qlora_jax.quant import (
    QuantizedTensor,
    codebook,
    dequantize,
    dynamic_map_signed,
    from_bnb_state_dict,
    quant_state_json,
    quantize,
    to_bnb_state_dict,
)
from qlora_jax.quant.blockwise import pack_nibbles, unpack_nibbles
from qlora_jax.quant.torch_sum import torch_cpu_mean
from qlora_jax.safetensors_io import load_file

CASES = bnb_cases()
SUM_SIZES = (1, 5, 8, 13, 31, 64, 100, 255, 1000, 4097, 32768)


def _bits(array) -> np.ndarray:
    return np.asarray(array, np.float32).view(np.uint32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_codebook_is_bit_identical_to_bnb(bnb_quant, quant_type):
    np.testing.assert_array_equal(_bits(codebook(quant_type)), _bits(bnb_quant[f"code/{quant_type}"]))


def test_dynamic_map_is_bit_identical_to_bnb(bnb_quant):
    np.testing.assert_array_equal(_bits(dynamic_map_signed()), _bits(bnb_quant["code/dynamic_signed"]))


@pytest.mark.parametrize("n", SUM_SIZES)
def test_mean_follows_torch_summation_order(bnb_quant, n):
    mean = jax.jit(torch_cpu_mean)(jnp.asarray(bnb_quant[f"sum/{n}/input"]))
    assert _bits(mean) == _bits(bnb_quant[f"sum/{n}/mean"][0])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['key']}-{c['input']}-{c['dtype']}-{c['quant_type']}"
                         f"-b{c['blocksize']}-dq{int(c['double_quant'])}")
def test_quantize_matches_bnb_bytes(bnb_quant, case):
    key = case["key"]
    x = jnp.asarray(bnb_quant[f"input/{case['input']}/{case['dtype']}"]).astype(case["dtype"])
    q = quantize(x, case["quant_type"], case["blocksize"], case["double_quant"])
    np.testing.assert_array_equal(np.asarray(q.packed), bnb_quant[f"{key}/packed"])
    np.testing.assert_array_equal(np.asarray(q.absmax).view(np.uint8), bnb_quant[f"{key}/absmax"].view(np.uint8))
    if case["double_quant"]:
        assert _bits(q.offset) == _bits(bnb_quant[f"{key}/offset"][0])
        np.testing.assert_array_equal(_bits(q.nested_absmax), _bits(bnb_quant[f"{key}/nested_absmax"]))
        np.testing.assert_array_equal(_bits(q.absmax_f32()), _bits(bnb_quant[f"{key}/dequant_absmax"]))
    values = dequantize(q, jnp.float32)
    assert values.shape == tuple(case["shape"])
    # Value equality: bnb's own CPU paths disagree on the sign of a decoded zero.
    np.testing.assert_array_equal(np.asarray(values), bnb_quant[f"{key}/dequant_float32"])
    for dtype in ("bfloat16", "float16"):
        if f"{key}/dequant_{dtype}" in bnb_quant:
            got = np.asarray(dequantize(q, dtype).astype(jnp.float32))
            np.testing.assert_array_equal(got, bnb_quant[f"{key}/dequant_{dtype}"].astype(np.float32))


@pytest.mark.parametrize("prefix", ["nf4_dq1_bfloat16.", "fp4_dq0_float16.", "nf4_dq0_float32."])
def test_bnb_state_dict_bytes_match_linear4bit(prefix):
    saved = load_file(FIXTURES / "bnb_linear4bit.safetensors")
    loaded = from_bnb_state_dict(saved, prefix)
    requantized = quantize(jnp.asarray(saved[prefix + "source_weight"]), loaded.quant_type, loaded.blocksize,
                           loaded.double_quant)
    for written in (to_bnb_state_dict(loaded, prefix), to_bnb_state_dict(requantized, prefix)):
        assert set(written) == {k for k in saved if k.startswith(prefix + "weight")}
        for name, array in written.items():
            assert array.dtype == saved[name].dtype and array.shape == saved[name].shape, name
            assert array.tobytes() == saved[name].tobytes(), name


def test_quant_state_json_matches_transformers_layout():
    q = quantize(jnp.ones((4, 64), jnp.bfloat16), "nf4", 64, True)
    assert quant_state_json(q) == (
        '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4, 64], '
        '"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 1.0}')


@pytest.mark.parametrize("double_quant,expected", [(True, 4.127), (False, 4.5)])
def test_bits_per_parameter_matches_paper(double_quant, expected):
    shape = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    q = jax.eval_shape(lambda x: quantize(x, "nf4", 64, double_quant), shape)
    assert round(q.bits_per_parameter(), 3) == expected


def _max_half_gap(quant_type: str) -> float:
    table = np.sort(codebook(quant_type))
    return float(np.max(np.diff(table)) / 2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_roundtrip_error_within_half_code_gap(quant_type, double_quant):
    x = np.random.default_rng(7).standard_normal((33, 70), dtype=np.float32)  # partial last block
    q = quantize(jnp.asarray(x), quant_type, 64, double_quant)
    error = np.abs(x - np.asarray(dequantize(q, jnp.float32))).reshape(-1)
    flat = np.pad(np.abs(x).reshape(-1), (0, -x.size % 64))
    true_absmax = np.repeat(flat.reshape(-1, 64).max(axis=1), 64)[: x.size]
    stored_absmax = np.repeat(np.asarray(q.absmax_f32()), 64)[: x.size]
    bound = true_absmax * _max_half_gap(quant_type) + np.abs(true_absmax - stored_absmax)
    assert np.all(error <= bound * (1 + 1e-6))
    assert np.mean(error**2) < 0.02


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_quantize_of_dequantized_is_idempotent(quant_type):
    x = jnp.asarray(np.random.default_rng(3).standard_normal((16, 96), dtype=np.float32))
    q = quantize(x, quant_type, 64, double_quant=False)
    values = dequantize(q, jnp.float32)
    again = quantize(values, quant_type, 64, double_quant=False)
    np.testing.assert_array_equal(np.asarray(again.absmax), np.asarray(q.absmax))
    np.testing.assert_array_equal(np.asarray(dequantize(again, jnp.float32)), np.asarray(values))
    if quant_type == "nf4":  # FP4 and Int4 have two codes for 0.0 (0 and 8); a decoded zero comes back as code 0
        np.testing.assert_array_equal(np.asarray(again.packed), np.asarray(q.packed))


def test_jit_and_eager_agree_bit_for_bit():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((9, 130), dtype=np.float32))
    jitted = jax.jit(lambda v: quantize(v, "nf4", 64, True))(x)
    with jax.disable_jit():
        eager = quantize(x, "nf4", 64, True)
        eager_values = dequantize(eager, jnp.float32)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_array_equal(np.atleast_1d(got).view(np.uint8), np.atleast_1d(want).view(np.uint8))
    np.testing.assert_array_equal(_bits(dequantize(jitted, jnp.float32)), _bits(eager_values))


def test_quantized_tensor_is_a_pytree_with_static_metadata():
    q = quantize(jnp.ones((3, 64)), "fp4", 32, True)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 4
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, QuantizedTensor)
    assert (rebuilt.shape, rebuilt.dtype, rebuilt.blocksize, rebuilt.quant_type) == ((3, 64), "float32", 32, "fp4")


def test_pack_unpack_nibbles_roundtrip_and_bnb_order():
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, 1001, dtype=np.uint8))
    padded = jnp.concatenate([codes, jnp.zeros(1, jnp.uint8)])
    packed = pack_nibbles(padded)
    assert int(packed[0]) == (int(codes[0]) << 4) | int(codes[1])
    np.testing.assert_array_equal(np.asarray(unpack_nibbles(packed, 1001)), np.asarray(codes))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"blocksize": 48}, ValueError, r"blocksize=48 is not supported"),
    ({"quant_type": "nf3"}, ValueError, r"quant_type='nf3' is not supported"),
])
def test_quantize_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize(jnp.ones((4, 64)), **kwargs)


def test_quantize_rejects_integer_input():
    with pytest.raises(TypeError, match=r"expects a float32, bfloat16 or float16 array, got dtype int32"):
        quantize(jnp.ones((4, 64), jnp.int32))


def test_quantize_rejects_empty_input():
    with pytest.raises(ValueError, match=r"empty array of shape \(0, 64\)"):
        quantize(jnp.ones((0, 64)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_quantize_refuses_non_finite_weights(bad):
    x = np.ones((4, 64), np.float32)
    x[2, 5] = bad
    with pytest.raises(ValueError, match=r"1 NaN/Inf value\(s\) in an array of shape \(4, 64\)"):
        quantize(jnp.asarray(x))


def test_non_finite_weights_under_jit_decode_to_nan_never_finite():
    x = np.ones((4, 64), np.float32)
    x[2, 5] = np.inf
    q = jax.jit(lambda v: quantize(v, "nf4", 64, False))(jnp.asarray(x))
    values = np.asarray(dequantize(q, jnp.float32))
    assert np.isnan(values[2]).all() and np.isfinite(values[[0, 1, 3]]).all()


def test_int4_has_no_bnb_serialization():
    with pytest.raises(ValueError, match=r"quant_type='int4' has no bitsandbytes serialization"):
        to_bnb_state_dict(quantize(jnp.ones((2, 64)), "int4"), "layer.")


def _bnb_dict(prefix="l."):
    return to_bnb_state_dict(quantize(jnp.ones((2, 64)), "nf4", 64, True), prefix)


def test_from_bnb_rejects_missing_tensor():
    state = _bnb_dict()
    del state["l.weight.nested_absmax"]
    with pytest.raises(ValueError, match=r"missing 'l.weight.nested_absmax'"):
        from_bnb_state_dict(state, "l.")


def test_from_bnb_rejects_foreign_quant_map():
    state = _bnb_dict()
    state["l.weight.quant_map"] = codebook("fp4").copy()
    with pytest.raises(ValueError, match=r"l.weight.quant_map does not hold bitsandbytes' table"):
        from_bnb_state_dict(state, "l.")


def test_from_bnb_rejects_corrupt_quant_state_json():
    state = _bnb_dict()
    state["l.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b"{not json", np.uint8)
    with pytest.raises(ValueError, match=r"is not valid UTF-8 JSON"):
        from_bnb_state_dict(state, "l.")


def test_from_bnb_rejects_wrong_packed_size():
    state = _bnb_dict()
    state["l.weight"] = state["l.weight"][:10]
    message = r"l.weight: expected u8 with 64 elements for shape \(2, 64\), got uint8 with 10"
    with pytest.raises(ValueError, match=message):
        from_bnb_state_dict(state, "l.")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_all_zero_tensor_decodes_to_exact_zeros(quant_type, blocksize):
    """The documented all-zero difference (quant/blockwise.py): only the stored offset bits differ from bnb."""
    q = quantize(jnp.zeros((16, 96)), quant_type, blocksize, True)
    assert float(q.offset) == 0.0  # bnb: a subnormal ~1e-38, which XLA flushes to zero
    decoded = np.asarray(dequantize(q, jnp.float32))
    assert decoded.shape == (16, 96) and not decoded.any() and np.isfinite(decoded).all()
