"""Pallas GPU kernels: fused 4-bit dequantize-matmul (``nf4_matmul``), one op per module."""

from .nf4_matmul import (
    TUNED,
    BlockSizes,
    nf4_matmul,
    nf4_matmul_reference,
    nf4_matmul_t,
    nf4_matmul_t_reference,
    supports,
)

__all__ = ["TUNED", "BlockSizes", "nf4_matmul", "nf4_matmul_reference", "nf4_matmul_t", "nf4_matmul_t_reference",
           "supports"]
