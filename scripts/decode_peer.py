"""The transformers side of ``scripts/bench_decode.py --peer``: one process, models loaded once, timings on request.

Reads JSON lines ``{"variant": "bf16"|"bnb-nf4", "batch": B, "prompt_len": T, "new_tokens": N,
"repeats": R}`` on stdin and answers each with one JSON line of prefill and decode timings,
measured as ``bench_decode.py`` measures ours: the median time of ``generate`` making one
token (prefill), and of making ``N + 1`` (``min_new_tokens`` forces all of them), greedy,
with the KV cache. Torch runs on one thread (torch's two threads stall on a shared 2-core
machine). Needs the oracle extra (torch, transformers, bitsandbytes).
"""

import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def load(model_dir: str, variant: str):
    if variant == "bf16":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                dtype=torch.float32).eval()


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator)
    mask = torch.ones_like(ids)

    def run(count):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count,
                                  do_sample=False, pad_token_id=0)

    prefill = median_seconds(lambda: run(1), repeats)
    full = median_seconds(lambda: run(new_tokens + 1), repeats)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"prefill_seconds": prefill, "decode_seconds": full - prefill, "weights_bytes": weights}


def main() -> None:
    torch.set_num_threads(1)
    model_dir, models = sys.argv[1], {}
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["variant"] not in models:
            models[request["variant"]] = load(model_dir, request["variant"])
        result = measure(models[request["variant"]], request["batch"], request["prompt_len"], request["new_tokens"],
                         request["repeats"])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
