"""The C++ 4-bit decode kernel (``qlora_jax.quant.cpu_kernel``): the XLA path's bits, built and used on the CPU.

Every dequantization test elsewhere (bitsandbytes fixtures, models, training) runs through the kernel
on this machine too; these tests pin it to the XLA path bit for bit, in both of its instruction-set
variants, with the special values a real checkpoint can hold.
"""

import ctypes
import platform
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qlora_jax.quant import QUANT_TYPES, blockwise, cpu_kernel, dequantize, quantize

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the kernel is for x86-64 CPUs")

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# absmax values a decode must carry through exactly: NaN and infinite blocks (bnb keeps them), zero,
# a denormal, one whose products are denormal, and the largest finite float
SPECIAL_ABSMAX = np.array([np.nan, np.inf, 0.0, -0.0, 1e-39, 1e-37, 3.4e38, -np.nan], np.float32)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """This CPU's build (AVX-512 with its bf16 conversion here), one without that conversion and an AVX2-only
    build, each registered under its own target names."""
    suffixes = {}
    for name, flags in (("native", ()), ("avx512", ("-mno-avx512bf16",)), ("avx2", ("-mno-avx512f",))):
        cpu_kernel.register(ctypes.cdll.LoadLibrary(str(cpu_kernel.build(tmp_path_factory.mktemp(name), flags))),
                            suffix=f"_test_{name}")
        suffixes[name] = f"_test_{name}"
    return suffixes


def _blocks(rows: int, half: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    packed = rng.integers(0, 256, (rows, half), dtype=np.uint8)
    absmax = rng.uniform(0.0, 0.2, rows).astype(np.float32)
    absmax[:len(SPECIAL_ABSMAX)] = SPECIAL_ABSMAX[:rows]
    return packed, absmax


def _bits(x: jax.Array) -> np.ndarray:
    return np.asarray(x).view(np.uint8)


def _check(build_suffix, quant_type, packed, absmax, *nested) -> np.ndarray:
    """Compare the build's decode with the XLA path's in every output dtype; the f32 values."""
    for dtype in reversed(DTYPES):  # f32 last
        kernel = jax.jit(lambda *args, d=dtype: cpu_kernel.kernel_decode(*args, quant_type=quant_type, dtype=d,
                                                                          suffix=build_suffix))
        xla = jax.jit(lambda p, a, *n, d=dtype: blockwise.decode_blocks(
            p, blockwise.double_dequantize(a, *n) if n else a, quant_type, d))
        ours, expected = kernel(packed, absmax, *nested), xla(packed, absmax, *nested)
        assert ours.shape == expected.shape == (packed.shape[0], 2 * packed.shape[1]) and ours.dtype == expected.dtype
        np.testing.assert_array_equal(_bits(ours), _bits(expected), err_msg=f"{dtype.__name__} {packed.shape}")
    return np.asarray(ours, np.float32)


@pytest.mark.parametrize("build", ["native", "avx512", "avx2"])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_every_build_decodes_the_xla_paths_bits(builds, build, quant_type):
    for half in (16, 32, 2048):  # blocksize 32, 64, 4096
        packed, absmax = _blocks(24, half, seed=half)
        values = _check(builds[build], quant_type, packed, absmax)
    assert np.isnan(values[0]).all() and not np.isnan(values[8:]).any()


@pytest.mark.parametrize("build", ["native", "avx512", "avx2"])
def test_every_build_decodes_double_quantized_absmax_as_xla_does(builds, build):
    rng = np.random.default_rng(3)
    for rows, half in ((600, 32), (256, 16), (3, 2048)):
        packed, _ = _blocks(rows, half, seed=rows)
        codes = rng.integers(0, 256, rows, dtype=np.uint8)
        nested = rng.uniform(0.0, 0.3, -(-rows // 256)).astype(np.float32)
        for special_nested, offset in ((None, 0.05), (np.nan, 0.05), (np.inf, -0.01), (1e-39, 1e-38),
                                       (None, np.nan), (None, 3.4e38)):
            if special_nested is not None:
                nested[0] = special_nested
            _check(builds[build], "nf4", packed, codes, nested, np.float32(offset))


def test_a_large_decode_split_over_threads_gives_the_same_bits(builds):
    packed, absmax = _blocks(1 << 15, 32, seed=5)  # 2M values: above the kernel's 1M threshold for threads
    absmax[1000::997] = 1e-37  # denormal values here and there, decoded by whichever thread
    values = _check(builds["native"], "nf4", packed, absmax)
    assert 0 < np.abs(values[1000]).max() <= 1e-37  # a tiny row: some of its products are below f32 normals


def test_batched_decode_folds_leading_dimensions():
    q = quantize(jax.random.normal(jax.random.key(2), (3, 300, 64)) * 0.02)  # 300 blocks per weight: 2 nested
    weights = [quantize(w) for w in dequantize(q, jnp.float32)]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *weights)
    for cpu in (True, False):
        batched = jax.vmap(lambda w, cpu=cpu: dequantize(w, jnp.bfloat16, cpu))(stacked)
        np.testing.assert_array_equal(_bits(batched), _bits(jnp.stack([dequantize(w, jnp.bfloat16, False)
                                                                        for w in weights])))


def test_dequantize_uses_the_kernel_on_the_cpu_only():
    assert cpu_kernel.enabled()  # this machine has a compiler and AVX2: a failed build here is a bug
    q = quantize(jax.random.normal(jax.random.key(0), (96, 64)) * 0.02)
    traced = jax.jit(dequantize, static_argnums=1).trace(q, jnp.bfloat16)
    assert 'custom_call_target="qlora_decode_4bit_dq"' in traced.lower(lowering_platforms=("cpu",)).compile().as_text()
    assert "qlora_decode_4bit" not in traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "qlora_decode_4bit" not in jax.jit(dequantize, static_argnums=(1, 2)).lower(q, jnp.bfloat16, False).as_text()
    np.testing.assert_array_equal(_bits(dequantize(q, jnp.bfloat16)), _bits(dequantize(q, jnp.bfloat16, False)))


def test_a_machine_without_a_compiler_decodes_on_the_xla_path(tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    reason = r"4-bit decode on the CPU uses the XLA path \(the same bits, slower\): no C\+\+ compiler"
    with pytest.warns(RuntimeWarning, match=reason):
        assert cpu_kernel.load.__wrapped__() is False
    assert not list(tmp_path.iterdir())


def test_qlora_jax_cpu_kernel_off_traces_the_xla_path(monkeypatch):
    q = quantize(jax.random.normal(jax.random.key(0), (96, 64)) * 0.02)
    monkeypatch.setenv("QLORA_JAX_CPU_KERNEL", "off")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not cpu_kernel.enabled()
        assert "qlora_decode_4bit" not in jax.jit(lambda q: dequantize(q, jnp.float32)).lower(q).as_text()
    monkeypatch.setenv("QLORA_JAX_CPU_KERNEL", "on")
    assert "qlora_decode_4bit" in jax.jit(lambda q: dequantize(q, jnp.float32)).lower(q).as_text()


def test_a_cpu_without_avx2_gets_the_compilers_reason(tmp_path):
    with pytest.raises(RuntimeError, match="could not build decode_4bit.cc: .*needs AVX2"):
        cpu_kernel.build(tmp_path, ("-mno-avx512f", "-mno-avx2"))
    assert not list(tmp_path.glob("*.so"))


def test_a_build_is_kept_and_reused(tmp_path):
    library = cpu_kernel.build(tmp_path)
    stamp = library.stat().st_mtime_ns
    assert cpu_kernel.build(tmp_path) == library and library.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no scratch left behind


def test_an_empty_decode_returns_an_empty_array(builds):
    packed = np.zeros((0, 32), np.uint8)
    plain = cpu_kernel.kernel_decode(packed, np.zeros(0, np.float32), quant_type="nf4", dtype=jnp.float32,
                                     suffix=builds["native"])
    double = cpu_kernel.kernel_decode(packed, np.zeros(0, np.uint8), np.zeros(0, np.float32), np.float32(0),
                                      quant_type="nf4", dtype=jnp.bfloat16, suffix=builds["native"])
    assert plain.shape == double.shape == (0, 64) and double.dtype == jnp.bfloat16
