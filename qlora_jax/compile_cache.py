"""JAX's persistent compilation cache under the project's cache directory.

A second run of the same command (the same model, shapes and flags) then loads its
compiled programs from disk instead of compiling them again. The cache lives in
``$QLORA_JAX_CACHE/jax_compilation_cache`` (``assets.cache_dir``); ``train.compilation_cache:
false`` or ``--no-compilation-cache`` turns it off.
"""

import jax

from .assets import cache_dir

MIN_COMPILE_SECONDS = 0.2  # smaller programs compile faster than they load


def enable_compilation_cache() -> str:
    """Point JAX's persistent compilation cache at the project's cache; returns the directory."""
    directory = cache_dir() / "jax_compilation_cache"
    directory.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return str(directory)
