"""The fused 4-bit matmul kernels (Pallas, interpreted on CPU) against their XLA twins, their CUDA
lowering (so an op without a Triton lowering fails here, not on a user's GPU), and the QLoRA layer's
gradients with either implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import pallas as pl

from pallas_kernels import (
    BlockSizes,
    nf4_matmul,
    nf4_matmul_reference,
    nf4_matmul_t,
    nf4_matmul_t_reference,
    supports,
)
from qlora_jax.config import LoraConfig, QuantConfig
from qlora_jax.lora import LoRAParam, QLoRALinear
from qlora_jax.qmatmul import _matmul_for, resolve_kernel, tile_rows
from qlora_jax.quant import dequantize, quantize

# Relative error bound, as max |kernel - reference| / max |reference|: f32 differs only in the order of
# the f32 sums; 16-bit outputs are rounded to 8 (bf16) or 11 (f16) mantissa bits, in different sum orders.
TOLERANCE = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}

# (M, N, K, dtype, quant_type, blocksize, double_quant, seed): M off the block sizes, N a multiple of
# 16 but not of the tile, split-K over 3 and 4 blocks, every table, blocksizes 32 to 256.
CASES = [
    (1, 64, 512, jnp.bfloat16, "nf4", 64, True, 11),
    (5, 48, 192, jnp.float32, "nf4", 64, True, 12),
    (16, 80, 256, jnp.float16, "fp4", 64, False, 13),
    (33, 96, 256, jnp.float32, "int4", 128, True, 14),
    (70, 208, 128, jnp.bfloat16, "nf4", 32, False, 15),
    (130, 144, 512, jnp.float32, "nf4", 256, True, 16),
]


def _inputs(m, n, k, dtype, quant_type, blocksize, double_quant, seed):
    key_w, key_x, key_dy = jax.random.split(jax.random.key(seed), 3)
    weight = quantize(jax.random.normal(key_w, (n, k)) * 0.05, quant_type, blocksize, double_quant)
    x = jax.random.normal(key_x, (m, k)).astype(dtype)
    dy = jax.random.normal(key_dy, (m, n)).astype(dtype)
    return weight, x, dy


def _assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    assert np.isfinite(actual).all(), f"{np.isnan(actual).sum()} NaN / unwritten elements"
    assert np.isfinite(expected).all()
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error <= TOLERANCE[dtype], f"relative error {error:.3g} > {TOLERANCE[dtype]}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{jnp.dtype(c[3]).name}-{c[4]}")
def test_forward_matches_reference(case):
    weight, x, _ = _inputs(*case)
    y = nf4_matmul(x, weight, interpret=True)
    assert y.dtype == x.dtype
    _assert_close(y, nf4_matmul_reference(x, weight), case[3])


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"M{c[0]}-N{c[1]}-K{c[2]}-{jnp.dtype(c[3]).name}-{c[4]}")
def test_transposed_matches_reference(case):
    weight, _, dy = _inputs(*case)
    dx = nf4_matmul_t(dy, weight, interpret=True)
    assert dx.dtype == dy.dtype
    _assert_close(dx, nf4_matmul_t_reference(dy, weight), case[3])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_in_kernel_dequantization_is_exact(quant_type):
    """With one-hot rows of x (f32), each output is one dequantized weight: bit-equal to ``dequantize``."""
    weight = quantize(jax.random.normal(jax.random.key(3), (32, 128)), quant_type, 64, True)
    expected = np.asarray(dequantize(weight, jnp.float32))
    forward = np.asarray(nf4_matmul(jnp.eye(128, dtype=jnp.float32), weight, interpret=True))
    transposed = np.asarray(nf4_matmul_t(jnp.eye(32, dtype=jnp.float32), weight, interpret=True))
    np.testing.assert_array_equal(forward, expected.T)
    np.testing.assert_array_equal(transposed, expected)


def test_interpreter_poisons_unwritten_outputs():
    """The 'every element written' checks above rely on this: an output the kernel skips stays NaN."""
    def writes_nothing(x_ref, o_ref):
        del x_ref, o_ref

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32),
                         interpret=True)(jnp.ones((16, 16)))
    assert np.isnan(np.asarray(out)).all()


def test_split_k_and_tile_choices_agree():
    weight, x, _ = _inputs(4, 64, 512, jnp.float32, "nf4", 64, True, 21)
    one = nf4_matmul(x, weight, block_sizes=BlockSizes(16, 64, 64, splits=1), interpret=True)
    many = nf4_matmul(x, weight, block_sizes=BlockSizes(16, 32, 32, splits=8), interpret=True)
    _assert_close(many, one, jnp.float32)


_LOWERING_SHAPES = [(1, 4096, 4096), (16, 11008, 4096), (512, 4096, 11008), (4096, 8192, 8192)]


@pytest.mark.parametrize("m,n,k", _LOWERING_SHAPES)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_to_triton_for_cuda(m, n, k, dtype):
    """Triton lowering runs at ``lower`` time, on the CPU: an op Triton cannot lower fails here."""
    weight = jax.eval_shape(lambda w: quantize(w, "nf4", 64, True), jax.ShapeDtypeStruct((n, k), jnp.bfloat16))
    x = jax.ShapeDtypeStruct((m, k), dtype)
    dy = jax.ShapeDtypeStruct((m, n), dtype)
    for fn, a in [(nf4_matmul, x), (nf4_matmul_t, dy)]:
        text = jax.jit(fn).trace(a, weight).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text


def test_layer_gradient_lowers_to_triton_for_cuda():
    weight = jax.eval_shape(lambda w: quantize(w, "nf4", 64, True), jax.ShapeDtypeStruct((256, 512), jnp.bfloat16))
    matmul = _matmul_for("bfloat16", "pallas")
    grad = jax.grad(lambda x, w: matmul(x, w).astype(jnp.float32).sum())
    text = jax.jit(grad).trace(jax.ShapeDtypeStruct((2, 64, 512), jnp.bfloat16), weight).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # forward and transposed kernels


@pytest.mark.parametrize("rows,fused", [(1, True), (128, True), (4096, False)])
def test_auto_on_a_gpu_fuses_the_products_the_xla_path_would_tile(rows, fused):
    """``auto`` on a GPU (``gpu``): the Triton kernels (forward and transposed) for decoding and short
    prompts, where the XLA path would loop over row tiles; XLA's whole-weight dequantize + dot for long
    micro-batches (a 2048 x 1024 weight in bf16 tiles up to 256 rows of x)."""
    weight = jax.eval_shape(lambda w: quantize(w, "nf4", 64, True), jax.ShapeDtypeStruct((2048, 1024), jnp.bfloat16))
    assert (tile_rows(2048, 1024, 64, rows, 2) is not None) == fused
    matmul = _matmul_for("bfloat16", "gpu")
    grad = jax.grad(lambda x, w: matmul(x, w).astype(jnp.float32).sum())
    text = jax.jit(grad).trace(jax.ShapeDtypeStruct((rows, 1024), jnp.bfloat16), weight).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == (2 if fused else 0)


def _layer(kernel: str) -> QLoRALinear:
    layer = QLoRALinear(256, 96, quant=QuantConfig("nf4", 64, True, kernel=kernel),
                        lora=LoraConfig(rank=8, alpha=16, dropout=0.0), compute_dtype=jnp.float32,
                        rngs=nnx.Rngs(0))
    layer.load_weight(jax.random.normal(jax.random.key(1), (96, 256)) * 0.05)
    layer.lora_b.set_value(jax.random.normal(jax.random.key(2), (96, 8)) * 0.1)
    return layer


def _layer_grads(layer: QLoRALinear, x: jax.Array, cotangent: jax.Array):
    graphdef, lora, rest = nnx.split(layer, LoRAParam, ...)

    def loss(lora, x):
        return jnp.sum(nnx.merge(graphdef, lora, rest)(x) * cotangent)

    (value, (lora_grads, dx)) = jax.value_and_grad(loss, argnums=(0, 1))(lora, x)
    return value, lora_grads, dx


def test_layer_gradients_match_between_pallas_and_xla():
    x = jax.random.normal(jax.random.key(4), (3, 7, 256))
    cotangent = jax.random.normal(jax.random.key(5), (3, 7, 96))
    value_x, lora_x, dx_x = _layer_grads(_layer("xla"), x, cotangent)
    value_p, lora_p, dx_p = _layer_grads(_layer("pallas"), x, cotangent)
    np.testing.assert_allclose(float(value_p), float(value_x), rtol=1e-5)
    _assert_close(dx_p, dx_x, jnp.float32)
    _assert_close(lora_p["lora_a"][...], lora_x["lora_a"][...], jnp.float32)
    _assert_close(lora_p["lora_b"][...], lora_x["lora_b"][...], jnp.float32)
    assert float(jnp.abs(lora_x["lora_a"][...]).max()) > 0  # the gradient reaches A through B


def test_kernel_choice_on_cpu():
    weight = quantize(jnp.ones((32, 128)), "nf4", 64, True)
    assert resolve_kernel("auto", weight) == "xla"
    assert resolve_kernel("pallas", weight) == "interpret"
    assert resolve_kernel("xla", weight) == "xla"
    assert [resolve_kernel(k, weight, "gpu") for k in ("auto", "pallas", "xla")] == ["gpu", "pallas", "xla"]
    assert resolve_kernel("auto", weight, "tpu") == "xla"
    odd_rows = quantize(jnp.ones((24, 128)), "nf4", 64, True)
    assert not supports(odd_rows) and resolve_kernel("pallas", odd_rows) == "xla"
    with pytest.raises(ValueError, match="kernel='triton' must be one of"):
        resolve_kernel("triton", weight)
    with pytest.raises(ValueError, match="quant.kernel='mosaic' must be auto, pallas or xla"):
        QuantConfig(kernel="mosaic")


def test_kernel_input_errors():
    weight = quantize(jnp.ones((32, 128)), "nf4", 64, True)
    with pytest.raises(ValueError, match=r"x must be \[M, 128\], got shape \(4, 64\)"):
        nf4_matmul(jnp.ones((4, 64)), weight, interpret=True)
    with pytest.raises(TypeError, match="dy must be bfloat16, float16 or float32, got int32"):
        nf4_matmul_t(jnp.ones((4, 32), jnp.int32), weight, interpret=True)
    with pytest.raises(ValueError, match="K=96 must be a multiple of blocksize=64"):
        nf4_matmul(jnp.ones((4, 96)), quantize(jnp.ones((32, 96)), "nf4", 64, True), interpret=True)
    with pytest.raises(ValueError, match="N=24 rows of the weight must be a multiple of 16"):
        nf4_matmul(jnp.ones((4, 128)), quantize(jnp.ones((24, 128)), "nf4", 64, True), interpret=True)
    with pytest.raises(ValueError, match="block_k=16 must divide blocksize=64 and be >= 32"):
        nf4_matmul(jnp.ones((4, 128)), weight, block_sizes=BlockSizes(16, 32, 16), interpret=True)


@pytest.mark.parametrize("m,n,k,quant_type,blocksize,double_quant", [
    (1, 2048, 1024, "nf4", 64, True), (8, 1024, 2048, "fp4", 128, False), (32, 4104, 512, "int4", 64, True),
    (33, 2048, 1024, "nf4", 64, True), (600, 2048, 1024, "nf4", 64, True), (1, 1536, 576, "nf4", 64, True),
    (1, 1100, 1024, "nf4", 64, True)])
def test_xla_tiled_products_match_the_reference(m, n, k, quant_type, blocksize, double_quant):
    """Weights above ``TILE_ELEMENTS`` multiply tile by tile in both products where N splits into tiles and
    the rows are few enough (``16 M <= 4 N`` in f32); the rest (many rows, SmolLM2-sized weights, no
    divisor) decode whole, as the reference."""
    from qlora_jax.qmatmul import _xla_backward, _xla_forward

    weight = quantize((jax.random.normal(jax.random.key(0), (n, k)) * 0.02).astype(jnp.bfloat16), blocksize=blocksize,
                      quant_type=quant_type, double_quant=double_quant)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.float32)
    dy = jax.random.normal(jax.random.key(2), (m, n), jnp.float32)
    rows = tile_rows(n, k, blocksize, m, 4)
    assert {(1, 2048): 256, (8, 1024): 256, (32, 4104): 216, (33, 2048): 256}.get((m, n)) == rows
    ours, reference = np.asarray(_xla_forward(x, weight)), np.asarray(nf4_matmul_reference(x, weight))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE[jnp.float32] * np.abs(reference).max())
    ours, reference = np.asarray(_xla_backward(dy, weight)), np.asarray(nf4_matmul_t_reference(dy, weight))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=TOLERANCE[jnp.float32] * np.abs(reference).max())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_product_gradients_equal_autodiff(dtype):
    """The LoRA branch's own backward pass (laid out for XLA's CPU backend) against autodiff of the einsums."""
    from qlora_jax.lora import lora_product

    keys = jax.random.split(jax.random.key(0), 4)
    h = jax.random.normal(keys[0], (2, 5, 24)).astype(dtype)
    a = (0.2 * jax.random.normal(keys[1], (4, 24))).astype(dtype)
    b = (0.2 * jax.random.normal(keys[2], (40, 4))).astype(dtype)
    weights = jax.random.normal(keys[3], (2, 5, 40))

    def reference(h, a, b):
        low = jnp.einsum("...i,ri->...r", h, a, preferred_element_type=jnp.float32).astype(h.dtype)
        return jnp.einsum("...r,or->...o", low, b, preferred_element_type=jnp.float32)

    ours = jax.grad(lambda *args: jnp.sum(lora_product(*args) * weights), argnums=(0, 1, 2))(h, a, b)
    theirs = jax.grad(lambda *args: jnp.sum(reference(*args) * weights), argnums=(0, 1, 2))(h, a, b)
    np.testing.assert_array_equal(np.asarray(lora_product(h, a, b)), np.asarray(reference(h, a, b)))
    for mine, expected in zip(ours, theirs, strict=True):
        assert mine.dtype == expected.dtype and mine.shape == expected.shape
        scale = float(jnp.max(jnp.abs(expected.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(mine, np.float32), np.asarray(expected, np.float32),
                                   rtol=0, atol=TOLERANCE[dtype] * scale)
