"""Write bitsandbytes reference fixtures for the quantization tests.

Needs the ``oracle`` extra (torch CPU + bitsandbytes). Runs bitsandbytes'
CPU implementation -- the oracle our quantization core must match byte for
byte -- on small inputs and edge cases, and writes
``tests/fixtures/bnb_quant.npz`` plus ``tests/fixtures/bnb_linear4bit.safetensors``.

    python scripts/make_quant_fixtures.py
"""

import argparse
import json
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as bnbf
import numpy as np
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "tests" / "fixtures"
FULL_DTYPE_INPUTS = ("normal_48x200", "odd_7x13", "odd_last_31x33")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _edge_case_inputs() -> dict[str, np.ndarray]:
    """Inputs that probe rounding ties, zeros and single non-zero blocks (blocksize 64)."""
    nf4 = bnbf.get_4bit_type("nf4", device="cpu").numpy()
    fp4 = np.sort(bnbf.get_4bit_type("fp4", device="cpu").numpy())
    cases = {}
    # Exact code values and exact midpoints, with absmax 1.0 so scaling is exact.
    for name, code in (("nf4", nf4), ("fp4", fp4)):
        mids = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
        vals = np.concatenate([code, mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2))])
        # XLA on the CPU flushes subnormals to zero (documented in qlora_jax.quant.blockwise).
        vals = vals[(vals == 0) | (np.abs(vals) >= np.finfo(np.float32).tiny)]
        vals = np.concatenate([vals, np.zeros(64 - vals.size % 64, np.float32)]) if vals.size % 64 else vals
        vals[0] = 1.0
        blocks = vals.reshape(-1, 64)
        blocks[:, 0] = 1.0
        cases[f"ties_{name}"] = blocks.reshape(-1, 32).astype(np.float32)
    zeros = np.zeros((4, 64), np.float32)
    zeros[1, 17] = -3.5  # one non-zero value
    zeros[2, 63] = 1e-30  # tiny absmax
    zeros[3, :] = 0.25  # constant block
    cases["zeros_and_single"] = zeros.reshape(8, 32)
    return cases


def _random_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "normal_48x200": rng.standard_normal((48, 200), dtype=np.float32),
        "heavy_tail_64x96": (rng.standard_t(3, (64, 96)) * 0.02).astype(np.float32),
        "odd_7x13": rng.standard_normal((7, 13), dtype=np.float32),
        "odd_last_31x33": rng.standard_normal((31, 33), dtype=np.float32),
        "vector_1000": rng.standard_normal((1000,), dtype=np.float32),
        "many_blocks_128x520": (rng.standard_normal((128, 520), dtype=np.float32) * 0.05),
        "single_block_1x64": rng.standard_normal((1, 64), dtype=np.float32),
    }


def _case_plan():
    """(input name, input dtype, quant type, blocksize, double quant) tuples."""
    plan = []
    for quant_type in ("nf4", "fp4"):
        for blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            plan.append(("normal_48x200", "float32", quant_type, blocksize, True))
        for double_quant in (False, True):
            for name in ("heavy_tail_64x96", "odd_7x13", "odd_last_31x33", "vector_1000", "many_blocks_128x520",
                         "single_block_1x64", f"ties_{quant_type}", "zeros_and_single"):
                plan.append((name, "float32", quant_type, 64, double_quant))
        for dtype in ("bfloat16", "float16"):
            plan.append(("normal_48x200", dtype, quant_type, 64, True))
    return plan


def make_quant_cases(rng: np.random.Generator) -> dict[str, np.ndarray]:
    inputs = {**_random_inputs(rng), **_edge_case_inputs()}
    arrays: dict[str, np.ndarray] = {}
    index = []
    for i, (name, dtype, quant_type, blocksize, double_quant) in enumerate(_case_plan()):
        x = torch.from_numpy(inputs[name]).to(TORCH_DTYPES[dtype])
        code4 = bnbf.get_4bit_type(quant_type, device="cpu")
        packed, state = bnbf.quantize_4bit(
            x, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        key = f"c{i}"
        arrays[f"input/{name}/{dtype}"] = x.float().numpy()
        arrays[f"{key}/packed"] = packed.numpy().reshape(-1)
        arrays[f"{key}/absmax"] = state.absmax.numpy()
        absmax = state.absmax
        if double_quant:
            absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
            arrays[f"{key}/offset"] = state.offset.numpy().reshape(1)
            arrays[f"{key}/nested_absmax"] = state.state2.absmax.numpy()
            arrays[f"{key}/nested_quant_map"] = state.state2.code.numpy()
            arrays[f"{key}/dequant_absmax"] = absmax.numpy()
        out_dtypes = ("float32", "bfloat16", "float16") if name in FULL_DTYPE_INPUTS else ("float32",)
        for out_dtype in out_dtypes:
            # bnb's reference (torch) dequantizer. Its AVX512 C kernel, which bnb.dequantize_4bit
            # dispatches to on such CPUs, indexes blocks per row and is wrong whenever the last
            # dimension is not a multiple of the blocksize (e.g. [64, 96] at blocksize 64).
            deq = _dequantize_4bit_compute(packed.reshape(-1), absmax, code4, blocksize, x.shape,
                                           TORCH_DTYPES[out_dtype])
            arrays[f"{key}/dequant_{out_dtype}"] = deq.float().numpy() if out_dtype == "bfloat16" else deq.numpy()
        index.append({"key": key, "input": name, "dtype": dtype, "quant_type": quant_type,
                      "blocksize": blocksize, "double_quant": double_quant, "shape": list(x.shape)})
    for n in (1, 5, 8, 13, 31, 64, 100, 255, 1000, 4097, 32768):
        values = (rng.random(n, dtype=np.float32) * 0.1).astype(np.float32)
        arrays[f"sum/{n}/input"] = values
        arrays[f"sum/{n}/mean"] = torch.from_numpy(values).mean().numpy().reshape(1)
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    arrays["code/nf4"] = bnbf.get_4bit_type("nf4", device="cpu").numpy()
    arrays["code/fp4"] = bnbf.get_4bit_type("fp4", device="cpu").numpy()
    # bnb lists an "int4" table in get_4bit_type but cannot build it (integer tensor division
    # fails); this is that table normalised the way get_4bit_type normalises the others.
    int4 = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, -0, -1, -2, -3, -4, -5, -6, -7], dtype=torch.float32)
    arrays["code/int4"] = (int4 / int4.abs().max()).numpy()
    arrays["code/dynamic_signed"] = bnbf.create_dynamic_map(signed=True).numpy()
    return arrays


def make_linear4bit_state_dicts(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """State dicts exactly as ``bnb.nn.Linear4bit`` (what transformers saves) writes them."""
    tensors = {}
    for quant_type, double_quant, dtype in (("nf4", True, torch.bfloat16), ("fp4", False, torch.float16),
                                            ("nf4", False, torch.float32)):
        prefix = f"{quant_type}_dq{int(double_quant)}_{str(dtype).removeprefix('torch.')}"
        layer = bitsandbytes.nn.Linear4bit(96, 40, bias=False, compute_dtype=dtype,
                                           compress_statistics=double_quant, quant_type=quant_type)
        weight = torch.from_numpy(rng.standard_normal((40, 96), dtype=np.float32)).to(dtype)
        layer.weight = bitsandbytes.nn.Params4bit(weight, requires_grad=False, compress_statistics=double_quant,
                                                  quant_type=quant_type)
        layer = layer.to("cpu")
        if not layer.weight.bnb_quantized:
            layer.weight._quantize("cpu")
        for k, v in layer.state_dict().items():
            tensors[f"{prefix}.{k}"] = v.contiguous()
        tensors[f"{prefix}.source_weight"] = weight.contiguous()
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(20230523)  # QLoRA's arXiv date
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "bnb_quant.npz", **make_quant_cases(rng))
    save_file(make_linear4bit_state_dicts(rng), args.out / "bnb_linear4bit.safetensors",
              metadata={"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__})
    print(f"wrote fixtures to {args.out} (bitsandbytes {bitsandbytes.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
