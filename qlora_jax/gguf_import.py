"""Convert a llama-architecture GGUF file into a Hugging Face model directory.

Writes ``config.json``, ``model.safetensors`` (bf16, one tensor in memory at a
time), ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json``.
Weights are dequantized by the ``gguf`` package (Q4_0, Q4_1, Q8_0, F16, F32, ...).
llama.cpp's converter permutes the rows of q and k for its rotary layout; we undo
it. The tokenizer must be byte-level BPE (``tokenizer.ggml.model == "gpt2"``); it is
rebuilt as a ``tokenizers`` BPE with the same vocabulary, merges and special tokens.
"""

import json
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np

from .config import ModelConfig, RopeConfig
from .safetensors_io import save_streaming

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
# llama.cpp pre-tokenizer names whose splitting we rebuild: digits one by one (smollm), or plain GPT-2.
_PRE_TOKENIZERS = ("smollm", "gpt2", "default")
_CONTROL, _USER_DEFINED = 3, 4  # gguf TokenType values


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise ValueError(f"{reader.data.filename if hasattr(reader.data, 'filename') else 'GGUF'}: missing {key!r}")
    return field.contents()


def gguf_config(reader: gguf.GGUFReader, source: str) -> ModelConfig:
    """The model config that a llama GGUF's metadata describes."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: general.architecture={arch!r}; only 'llama' GGUF files can be converted")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    return ModelConfig(
        model_type="llama", vocab_size=int(_field(reader, "llama.vocab_size", vocab)), hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")), num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope=RopeConfig(theta=float(_field(reader, "llama.rope.freq_base", 10000.0))),
        max_position_embeddings=int(_field(reader, "llama.context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", -1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", -1)),
        pad_token_id=int(_field(reader, "tokenizer.ggml.padding_token_id", -1)), torch_dtype="bfloat16",
    )


def unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k rows: ``[heads * K, D]`` with each head's halves re-interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.weight"
    return None


def _tensor_plan(reader: gguf.GGUFReader, config: ModelConfig, source: str) -> dict[str, gguf.ReaderTensor]:
    plan = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            if tensor.name.endswith("rope_freqs.weight"):
                raise ValueError(f"{source}: rope_freqs tensors (llama 3.1 rope scaling) are not supported")
            continue
        plan[name] = tensor
    expected = 3 + 9 * config.num_hidden_layers - int(config.tie_word_embeddings)
    if len(plan) != expected:
        raise ValueError(f"{source}: found {len(plan)} of the {expected} llama tensors")
    return plan


def _dequantized(tensor: gguf.ReaderTensor, hf_name: str, config: ModelConfig) -> np.ndarray:
    values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # gguf lists ne0 (columns) first
    values = values.reshape(shape)
    if hf_name.endswith("q_proj.weight"):
        values = unpermute_rope_rows(values, config.num_attention_heads)
    elif hf_name.endswith("k_proj.weight"):
        values = unpermute_rope_rows(values, config.num_key_value_heads)
    return values.astype(ml_dtypes.bfloat16)


def _tokenizer_json(reader: gguf.GGUFReader, source: str) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; "
                         f"supported: gpt2 (byte-level BPE) with pre-tokenizer in {_PRE_TOKENIZERS}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
               for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)]
    tokenizer.add_special_tokens([t for t in special if t.special])
    tokenizer.add_tokens([t for t in special if not t.special])
    return tokenizer.to_str(pretty=True)


def _tokenizer_config(reader: gguf.GGUFReader, config: ModelConfig) -> dict:
    tokens = _field(reader, "tokenizer.ggml.tokens")

    def token(token_id):
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    out = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(config.bos_token_id),
        "eos_token": token(config.eos_token_id), "pad_token": token(config.pad_token_id),
        "unk_token": token(int(_field(reader, "tokenizer.ggml.unknown_token_id", -1))),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "model_max_length": config.max_position_embeddings, "clean_up_tokenization_spaces": False,
    }
    if "tokenizer.chat_template" in reader.fields:
        out["chat_template"] = _field(reader, "tokenizer.chat_template")
    return out


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face directory for ``gguf_path`` into ``out_dir`` (created); returns ``out_dir``."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError, IndexError) as err:
        raise ValueError(f"{gguf_path}: not a readable GGUF file ({err})") from None
    config = gguf_config(reader, str(gguf_path))
    plan = _tensor_plan(reader, config, str(gguf_path))
    tokenizer_json = _tokenizer_json(reader, str(gguf_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = [(name, tuple(int(d) for d in reversed(plan[name].shape)), ml_dtypes.bfloat16) for name in sorted(plan)]
    save_streaming(specs, lambda name: _dequantized(plan[name], name, config), out_dir / "model.safetensors",
                   metadata={"format": "pt", "source": gguf_path.name})
    hf_config = config.to_hf_dict()
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out_dir / "tokenizer.json").write_text(tokenizer_json)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(reader, config), indent=2))
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                  "pad_token_id": config.pad_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out_dir
