"""The PyTorch peer of our benchmarks: transformers (+ peft + bitsandbytes) in its own process, on request.

Used by ``scripts/bench_decode.py --peer`` and ``scripts/bench_peer.py``. Reads JSON lines on
stdin, answers each with one JSON line:

- ``{"op": "decode", "variant": "bf16"|"bnb-nf4", "batch", "prompt_len", "new_tokens", "repeats"}``:
  the median time of ``generate`` making one token (prefill) and ``N + 1`` tokens
  (``min_new_tokens`` forces all of them), greedy, KV cache, as ``bench_decode.py`` times ours.
- ``{"op": "load_qlora", "rank", "alpha", "dropout", "lr"}``: the model in 4-bit (NF4 + double
  quant, f32 compute) with PEFT LoRA adapters on all 7 projections, gradient checkpointing
  per layer (``prepare_model_for_kbit_training``, the QLoRA recipe) and AdamW; answers the
  load + quantize seconds.
- ``{"op": "train_step", "input_ids": [[...]]}``: one optimizer step (loss on every token);
  answers its seconds and loss.
- ``{"op": "bnb_quantize", "name", "shape": [N, K], "seed", "path"}``: a random N(0, 0.02) weight
  quantized by bitsandbytes (NF4, blocksize 64, double quant), kept under ``name`` and written to
  ``path`` (``.npz``: the serialized state dict under ``w.weight...`` keys, and
  ``expected_f32``/``expected_bf16``, bitsandbytes' dequantization as f32). Used by
  ``scripts/bench_dequant.py``.
- ``{"op": "bnb_dequantize", "name", "dtype": "f32"|"bf16", "count"}``: the seconds of ``count``
  back-to-back ``dequantize_4bit`` calls on that weight.

Torch runs on one thread (torch's two threads stall on a shared 2-core machine). Needs the
oracle extra (torch, transformers, peft, bitsandbytes).
"""

import json
import sys
import time

import torch
from timing import median_seconds
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def nf4_config() -> BitsAndBytesConfig:
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)


def load(model_dir: str, variant: str):
    if variant == "bf16":
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(),
                                                dtype=torch.float32).eval()


def decode(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
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


class QLoRA:
    """PEFT LoRA on the bitsandbytes NF4 base, trained as the QLoRA repository trains it."""

    def __init__(self, model_dir: str, rank: int, alpha: float, dropout: float, lr: float):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        torch.manual_seed(0)
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=nf4_config(),
                                                     dtype=torch.float32)
        self.load_seconds = time.perf_counter() - start
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
        self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                                      target_modules=TARGETS, task_type="CAUSAL_LM"))
        self.model.train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=0.0)

    def step(self, input_ids: list) -> dict:
        ids = torch.tensor(input_ids)
        start = time.perf_counter()
        loss = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start, "loss": float(loss)}


class BnbWeight:
    """One weight quantized by bitsandbytes, for ``bnb_quantize`` / ``bnb_dequantize``."""

    DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}

    def __init__(self, shape: list, seed: int, path: str):
        import bitsandbytes.functional as bnbf
        import numpy as np

        self.dequantize = bnbf.dequantize_4bit
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
        self.packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        self.states = {}
        for label, dtype in self.DTYPES.items():
            self.states[label] = bnbf.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
            self.states[label].dtype = dtype
        saved = {"w.weight": self.packed, **{f"w.weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
        expected = {f"expected_{label}": self.dequantize(self.packed, s).float() for label, s in self.states.items()}
        np.savez(path, **{k: v.numpy() for k, v in {**saved, **expected}.items()})

    def time(self, label: str, count: int) -> dict:
        start = time.perf_counter()
        for _ in range(count):
            self.dequantize(self.packed, self.states[label])
        return {"seconds": time.perf_counter() - start}


def main() -> None:
    torch.set_num_threads(1)
    model_dir, models, qlora, bnb_weights = sys.argv[1], {}, None, {}
    print(json.dumps({"ready": True, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "decode":
            if request["variant"] not in models:
                models[request["variant"]] = load(model_dir, request["variant"])
            answer = decode(models[request["variant"]], request["batch"], request["prompt_len"],
                            request["new_tokens"], request["repeats"])
        elif request["op"] == "bnb_quantize":
            bnb_weights[request["name"]] = BnbWeight(request["shape"], request["seed"], request["path"])
            answer = {"ok": True}
        elif request["op"] == "bnb_dequantize":
            answer = bnb_weights[request["name"]].time(request["dtype"], request["count"])
        elif request["op"] == "load_qlora":
            qlora = QLoRA(model_dir, request["rank"], request["alpha"], request["dropout"], request["lr"])
            answer = {"seconds": qlora.load_seconds}
        else:
            answer = qlora.step(request["input_ids"])
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
