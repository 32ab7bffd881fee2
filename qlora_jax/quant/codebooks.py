"""The 4-bit and 8-bit code tables, exactly as bitsandbytes defines them.

Every table is a ``float32`` numpy array built the way ``bitsandbytes.functional``
builds it (same literals, same float32 division), so ``code[i]`` is bit-identical
to bnb's ``get_4bit_type(...)[i]`` and ``create_dynamic_map(signed=True)[i]``.
"""

import functools
from typing import Literal

import numpy as np

QuantType = Literal["nf4", "fp4", "int4"]
QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4", "int4")

# QLoRA §3 / bnb get_4bit_type("nf4"): quantiles of N(0, 1), normalised to [-1, 1].
_NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
# bnb get_4bit_type("fp4"): E2M1 with exponent bias 2, listed in bit-pattern order
# (bit 3 is the sign), then divided by the largest magnitude (12). bnb writes the
# negative zero as the integer -0, so code 8 is +0.0 like code 0.
_FP4_VALUES = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# bnb get_4bit_type("int4"): symmetric integers -7..7 in bnb's order, divided by 7.
_INT4_VALUES = [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7]


def _normalised(values: list[float]) -> np.ndarray:
    table = np.asarray(values, dtype=np.float32)
    return table / np.abs(table).max()


CODEBOOKS: dict[str, np.ndarray] = {
    "nf4": _normalised(_NF4_VALUES),
    "fp4": _normalised(_FP4_VALUES),
    "int4": _normalised(_INT4_VALUES),
}


def codebook(quant_type: str) -> np.ndarray:
    """The 16-entry ``f32[16]`` table that maps a 4-bit code to a value in [-1, 1]."""
    if quant_type not in CODEBOOKS:
        raise ValueError(f"quant_type={quant_type!r} is not supported; expected one of {QUANT_TYPES}")
    return CODEBOOKS[quant_type]


def rounding_bounds(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between neighbouring code values and the value order, as bnb's CPU quantizer uses them.

    Returns ``(bounds: f32[15], order: i32[16])``: a scaled value ``v`` gets the
    code ``order[sum(v > bounds)]``, so a value exactly on a midpoint rounds to the
    lower code value (torch.bucketize with right=False). ``order`` is a stable
    argsort, which puts code 0 before code 8 (both 0.0 in FP4 and Int4) as torch's
    argsort does for these tables.
    """
    table = codebook(quant_type)
    order = np.argsort(table, kind="stable").astype(np.int32)
    ordered = table[order]
    bounds = (ordered[:-1] + ordered[1:]) / np.float32(2)
    return bounds.astype(np.float32), order


# bnb create_dynamic_map(signed=True) as float32 bit patterns, sorted ascending. Recorded
# rather than recomputed: the table comes from torch.linspace, whose float32 rounding
# (vectorised arange from both ends) numpy does not reproduce. Checked against the live
# bitsandbytes table by scripts/make_quant_fixtures.py and tests/test_quant.py.
_DYNAMIC_SIGNED_BITS = (
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
)


def dynamic_map_signed() -> np.ndarray:
    """bnb ``create_dynamic_map(signed=True)``: the ``f32[256]`` table of double quantization.

    A dynamic-exponent 8-bit format (Dettmers 2015): for exponent i in 0..6 the
    midpoints of ``linspace(0.1, 1, 2**i + 1)`` times ``10**(i - 6)``, both signs,
    plus 0 and 1, sorted. Not FP8.
    """
    return np.asarray(_DYNAMIC_SIGNED_BITS, dtype=np.uint32).view(np.float32)


@functools.cache
def dynamic_map_lut() -> np.ndarray:
    """bnb 0.50's CPU lookup table for the 8-bit map: ``u8[65536]``, slot k -> code nearest ``k / 32767.5 - 1``.

    Distances are taken in float64 against the unmodified map; a slot exactly
    between two codes takes the lower one.
    """
    table = dynamic_map_signed().astype(np.float64)
    centres = np.arange(65536, dtype=np.float64) / 32767.5 - 1.0
    midpoints = (table[:-1] + table[1:]) / 2
    lut = np.searchsorted(midpoints, centres, side="left").astype(np.uint8)
    lut.flags.writeable = False
    return lut
