"""4-bit quantization bit-identical to bitsandbytes (NF4, FP4, Int4; blockwise absmax; double quant).

Storage format (the one place it is written down; every other module links here):

- A tensor of any shape is flattened row-major (torch's order for a
  ``[out_features, in_features]`` weight) into ``numel`` elements.
- Blocks: consecutive runs of ``blocksize`` elements (32 ... 4096, default 64); the
  last block may be partial. Each block's ``absmax = max |x|`` in float32.
- Codes: each element becomes the 4-bit index of the nearest table value to
  ``x / absmax`` (tables in ``codebooks``; a value on a midpoint takes the lower
  value). Two codes per byte: element ``2i`` in the high nibble, ``2i + 1`` in the
  low nibble; an odd ``numel`` pads one code for 0.0. ``packed: u8[ceil(numel / 2)]``.
- Double quantization (``double_quant=True``, bnb's ``compress_statistics``):
  ``offset = mean(absmax)`` (f32, torch's summation order), then ``absmax - offset``
  is quantized in blocks of 256 to ``u8`` codes of bnb's signed dynamic 8-bit map,
  with one ``f32`` ``nested_absmax`` per 256 blocks.
- Decoding: ``absmax = map[code] * nested_absmax + offset`` and
  ``x = table[code] * absmax``, both in f32, then cast to the requested dtype.

Bits per parameter: ``4 + 32 / blocksize`` (4.5 at 64), or with double quant
``4 + 8 / blocksize + 32 / (256 * blocksize)`` (4.127 at 64).
"""

from .bnb_format import from_bnb_state_dict, quant_state_json, to_bnb_state_dict
from .codebooks import QUANT_TYPES, codebook, dynamic_map_signed
from .tensor import BLOCKSIZES, QuantizedTensor, dequantize, quantize

__all__ = [
    "BLOCKSIZES", "QUANT_TYPES", "QuantizedTensor", "codebook", "dequantize", "dynamic_map_signed",
    "from_bnb_state_dict", "quant_state_json", "quantize", "to_bnb_state_dict",
]
