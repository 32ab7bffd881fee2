"""The 4-bit decode on x86-64 CPUs as a C++ XLA FFI kernel (``decode_4bit.cc``), built on first use.

Why a compiled kernel rather than more XLA: XLA's CPU backend vectorizes neither the decode's
16-entry lookup nor the interleaving of each byte's two values, whatever the formulation
(``blockwise.decode_blocks`` lists what was tried); it even wrote each byte as two f32 times
its absmax, with no lookup at all, slower than bitsandbytes' C loop decodes at SmolLM2's
shapes. The kernel looks codes up with AVX-512 ``vpermps`` (AVX2: two 8-entry ``vpermps`` and
a blend), writes whole vectors, decodes the double-quantized absmax row by row as it goes, and
splits outputs above 1M values over XLA's intra-op threads. ``scripts/bench_dequant.py``
measures it next to the XLA path and bitsandbytes; ``tests/test_cpu_kernel.py`` checks it
against the XLA path bit for bit.

It is compiled once per machine with the C++ compiler in ``$CXX`` (default ``c++``; about 3 s),
``-O3 -march=native -ffp-contract=off``, against the XLA FFI headers that jaxlib ships, into
``$QLORA_JAX_CACHE/cpu_kernels`` (default ``~/.cache/qlora_jax``); the file name carries a hash
of the source, the flags, the jaxlib version and the CPU's feature flags, so a shared home
directory never hands one machine another's build. Where it cannot be built (no compiler, no
AVX2, not x86-64) or ``QLORA_JAX_CPU_KERNEL=off`` is set, decoding stays on the XLA path, which
gives the same bits; one warning says why. On a GPU or TPU host it is never built, and a
program lowered for another platform gets the XLA path (``lax.platform_dependent``)."""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from .. import assets
from . import blockwise
from .codebooks import codebook, dynamic_map_signed

SOURCE = Path(__file__).with_name("decode_4bit.cc")
TARGETS = ("qlora_decode_4bit", "qlora_decode_4bit_dq")  # f32 absmax; double-quantized absmax
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC")
_OUTPUT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _cpu_features() -> str:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def build(directory: Path, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``decode_4bit.cc`` into ``directory`` (kept if already there) and return the library's path.

    Raises ``RuntimeError`` naming the compiler's first error when there is no compiler or it fails.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r}; set CXX to choose one)")
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, *flags, jaxlib.__version__, platform.machine(),
                                    _cpu_features()]).encode()).hexdigest()[:16]
    library = Path(directory) / f"decode_4bit-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # compiled aside, then renamed: never half-written
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            errors = [line for line in result.stderr.splitlines() if "error" in line] or [result.stderr.strip()]
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {errors[0]}")
        os.replace(built, library)
    return library


def enabled() -> bool:
    """Whether a decode traced now uses the kernel: ``QLORA_JAX_CPU_KERNEL`` is not ``off`` (read at each
    trace, so one process can compare both paths), the default backend is the CPU (a GPU or TPU host
    never builds it) and the kernel is loaded (``load``)."""
    switched_off = os.environ.get("QLORA_JAX_CPU_KERNEL", "").lower() in ("0", "off", "false")
    return not switched_off and jax.default_backend() == "cpu" and load()


@functools.cache
def load() -> bool:
    """Build (or find) the kernel and register it with XLA for the CPU; False, with one warning, where it cannot."""
    try:
        library = ctypes.cdll.LoadLibrary(str(build(assets.cache_dir() / "cpu_kernels")))
    except (RuntimeError, OSError) as error:
        warnings.warn(f"4-bit decode on the CPU uses the XLA path (the same bits, slower): {error}", RuntimeWarning,
                      stacklevel=2)
        return False
    register(library)
    return True


def register(library: ctypes.CDLL, suffix: str = "") -> None:
    """Register a loaded build's two handlers with XLA for the CPU, under their names plus ``suffix``."""
    for target in TARGETS:
        jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(getattr(library, target)), platform="cpu")


def kernel_decode(packed: jax.Array, absmax: jax.Array, nested_absmax=None, offset=None, *, quant_type: str, dtype,
                  suffix: str = "") -> jax.Array:
    """The FFI call itself, for the CPU only (``suffix``: that of the build's ``register``)."""
    out = jax.ShapeDtypeStruct((*packed.shape[:-1], 2 * packed.shape[-1]), dtype)
    table = np.asarray(codebook(quant_type), np.float32)
    if nested_absmax is None:
        return jax.ffi.ffi_call(TARGETS[0] + suffix, out, vmap_method="broadcast_all")(
            packed.reshape(-1), absmax, table=table)
    return jax.ffi.ffi_call(TARGETS[1] + suffix, out, vmap_method="broadcast_all")(
        packed.reshape(-1), absmax, nested_absmax, offset, table=table,
        dynamic_map=np.asarray(dynamic_map_signed(), np.float32))


def decode_blocks(packed: jax.Array, absmax: jax.Array, quant_type: str, dtype, nested_absmax=None,
                  offset=None) -> jax.Array:
    """``blockwise.decode_blocks`` (``packed: u8[N, b/2]``, ``absmax: f32[N]`` -> ``dtype[N, b]``, the same bits)
    through the kernel when lowered for the CPU and ``enabled()``, through XLA otherwise. With ``nested_absmax:
    f32[ceil(N / 256)]`` and ``offset: f32[]``, ``absmax`` holds the double-quant codes ``u8[N]``, decoded as
    ``blockwise.double_dequantize`` does (in the kernel, row by row)."""
    dtype = jnp.dtype(dtype)

    def xla(packed, absmax, *nested):
        scales = blockwise.double_dequantize(absmax, *nested) if nested else absmax
        return blockwise.decode_blocks(packed, scales, quant_type, dtype)

    nested = () if nested_absmax is None else (nested_absmax, offset)
    if dtype not in _OUTPUT_DTYPES or packed.shape[-1] % 16 or not enabled():
        return xla(packed, absmax, *nested)
    kernel = functools.partial(kernel_decode, quant_type=quant_type, dtype=dtype)
    return jax.lax.platform_dependent(packed, absmax, *nested, cpu=kernel, default=xla)
