"""Text generation with the KV cache, and ``python -m qlora_jax.generate``.

    python -m qlora_jax.generate --model DIR [--adapter DIR] (--prompt TEXT | --chat | --prompts FILE.jsonl)
        [--max-new-tokens 128] [--temperature 0] [--top-k 0] [--top-p 1] [--seed 0] [--stop TEXT ...] [--raw]

Greedy (temperature 0) or sampled with temperature / top-k / top-p and a seed; stops at
EOS or at a stop string. ``--prompt`` streams one reply to the terminal token by token;
``--chat`` is an interactive conversation (the model's chat template, history kept);
``--prompts`` runs a JSON Lines file of ``{"prompt": ...}`` or ``{"messages": [...]}``
records as one left-padded batch and prints one JSON line per record. Prompts go
through the chat template unless ``--raw``. On a GPU the 4-bit layers decode with the
fused split-K kernel (``quant.kernel: auto``).
"""

import argparse
import functools
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cli import add_model_args, apply_runtime_flags, model_source, quant_config
from .loading import load_for_inference
from .model import KVCache, LlamaForCausalLM
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen."""

    temperature: float = 0.0
    """0: greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


def pick_token(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """``logits: f32[B, V]`` -> ``i32[B]`` next tokens."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        cutoff = jnp.min(jnp.where(before < sampling.top_p, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "sampling"))
def generate_ids(model: LlamaForCausalLM, ids: jax.Array, mask: jax.Array, *, max_new_tokens: int,
                  sampling: Sampling) -> jax.Array:
    """Left-padded ``ids: i32[B, T]`` -> ``i32[B, max_new_tokens]`` continuation."""
    batch, prompt_len = ids.shape
    cache = KVCache.empty(model.config, batch, prompt_len + max_new_tokens, model.compute_dtype)
    logits, cache = model.decode(ids, mask, cache)

    def step(carry, step_key):
        cache, last_logits = carry
        token = pick_token(last_logits, step_key, sampling)
        logits, cache = model.decode(token[:, None], jnp.ones((batch, 1), bool), cache)
        return (cache, logits[:, -1]), token

    keys = jax.random.split(jax.random.key(sampling.seed), max_new_tokens)
    _, tokens = jax.lax.scan(step, (cache, logits[:, -1]), keys)
    return tokens.T


PROMPT_BUCKET = 64
"""Prompts are left-padded to a multiple of this many tokens, so a new prompt (or a longer chat history)
rarely means a new compilation: the decode programs depend on the padded width only."""
_compiled: set[tuple] = set()


def _left_padded(tokenizer: Tokenizer, prompts: list[str]) -> tuple[jax.Array, jax.Array]:
    """``i32[B, W]`` ids and ``bool[B, W]`` mask, every prompt ending at the last column; W a multiple of
    ``PROMPT_BUCKET``."""
    encoded = [tokenizer.encode(p) for p in prompts]
    width = -(-max(len(e) for e in encoded) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.full((len(encoded), width), tokenizer.pad_id if tokenizer.pad_id is not None else 0, np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for row, tokens in enumerate(encoded):  # left padding: every prompt ends at the last column
        ids[row, width - len(tokens):] = tokens
        mask[row, width - len(tokens):] = True
    return jnp.asarray(ids), jnp.asarray(mask)


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def _announced(what: str, shape: tuple):
    """Print one line before the first call of a program for ``shape`` in this process (compiling, or loading it
    from the persistent cache) and how long that call took; silent afterwards."""
    key = (what, *shape)
    if key in _compiled:
        return None
    _compiled.add(key)
    print(f"compiling the {what} for batch {shape[0]} x {shape[1]}-token prompts + {shape[2]} new tokens ...",
          file=sys.stderr, flush=True)
    return time.perf_counter()


def _report(started) -> None:
    if started is not None:
        print(f"compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def _before_end(tokenizer: Tokenizer, tokens: list[int]) -> tuple[list[int], bool]:
    """``tokens`` up to the first end-of-sequence id (any of ``tokenizer.stop_ids``), and whether one came."""
    end = next((i for i, token in enumerate(tokens) if token in tokenizer.stop_ids), None)
    return (tokens, False) if end is None else (tokens[:end], True)


def _finish(tokenizer: Tokenizer, tokens: list[int], stop: tuple[str, ...]) -> str:
    """Decode up to the first end-of-sequence id, then cut at the first stop string."""
    return _cut_at_stop(tokenizer.decode(_before_end(tokenizer, tokens)[0]), stop)


def generate(model: LlamaForCausalLM, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int = 32,
             temperature: float = 0.0, seed: int = 0, *, sampling: Sampling | None = None,
             stop: tuple[str, ...] = ()) -> list[str]:
    """Continue each prompt (already formatted, e.g. by ``apply_chat_template``), as one batch."""
    sampling = sampling or Sampling(temperature=temperature, seed=seed)
    ids, mask = _left_padded(tokenizer, prompts)
    started = _announced("batched decode", (*ids.shape, max_new_tokens))
    out = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, sampling=sampling)
    _report(started)
    return [_finish(tokenizer, list(row), stop) for row in np.asarray(out)]


# Streaming calls the model once per token, so these are plain jax.jit functions of the model's split state:
# nnx.jit would split and merge the whole module on every call (about as long as the decode step on a CPU).
@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, state, ids: jax.Array, mask: jax.Array, cache: KVCache):
    logits, cache = nnx.merge(graphdef, state).decode(ids, mask, cache)
    return logits[:, -1], cache


STREAM_CHUNK = 8
"""Tokens decoded per call while streaming: one compiled loop of 8 steps instead of 8 calls (each call pays
dispatch and, on a CPU, work XLA otherwise shares across the steps of a loop); text appears 8 tokens at a time."""


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("sampling",))
def _next_tokens(graphdef, state, last_logits: jax.Array, cache: KVCache, keys: jax.Array, *, sampling: Sampling):
    """``len(keys)`` more tokens ``i32[len(keys)]`` after ``last_logits: f32[1, V]``, and the state to go on."""
    model = nnx.merge(graphdef, state)

    def step(carry, key):
        last_logits, cache = carry
        token = pick_token(last_logits, key, sampling)
        logits, cache = model.decode(token[:, None], jnp.ones((1, 1), bool), cache)
        return (logits[:, -1], cache), token[0]

    (last_logits, cache), tokens = jax.lax.scan(step, (last_logits, cache), keys)
    return tokens, last_logits, cache


def stream(model: LlamaForCausalLM, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, sampling: Sampling,
           stop: tuple[str, ...] = ()) -> Iterator[str]:
    """Yield the reply to one prompt piece by piece as tokens are decoded (``STREAM_CHUNK`` at a time); stops at
    EOS or a stop string. Token ``i`` is chosen with the same key as in ``generate``, so the text is the same."""
    ids, mask = _left_padded(tokenizer, [prompt])
    chunk = min(STREAM_CHUNK, max_new_tokens)
    chunks = -(-max_new_tokens // chunk)
    cache = KVCache.empty(model.config, 1, ids.shape[1] + chunks * chunk, model.compute_dtype)
    started = _announced("decode step", (*ids.shape, max_new_tokens))
    graphdef, state = nnx.split(model)
    last_logits, cache = _prefill(graphdef, state, ids, mask, cache)
    keys = jax.random.split(jax.random.key(sampling.seed), max_new_tokens)
    keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], chunks * chunk - max_new_tokens, axis=0)])
    tokens, shown = [], ""
    for start in range(0, max_new_tokens, chunk):
        new, last_logits, cache = _next_tokens(graphdef, state, last_logits, cache, keys[start:start + chunk],
                                               sampling=sampling)
        started = _report(started)
        new, ended = _before_end(tokenizer, [int(t) for t in np.asarray(new)][: max_new_tokens - start])
        tokens += new
        decoded = tokenizer.decode(tokens)
        text = _cut_at_stop(decoded, stop)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
            shown = text
        if ended or len(text) < len(decoded):  # end of sequence, or a stop string appeared
            break


def _read_prompts(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: invalid JSON on line {number}, column {err.colno}: {err.msg}") from None
        if not isinstance(record, dict) or not (isinstance(record.get("prompt"), str)
                                                or isinstance(record.get("messages"), list)):
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": TEXT}} or {{\"messages\": [...]}}")
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def _format(tokenizer: Tokenizer, record: dict, raw: bool) -> str:
    if raw:
        return record["prompt"] if "prompt" in record else "\n".join(m["content"] for m in record["messages"])
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _chat(model, tokenizer, args, sampling) -> None:
    history = []
    print("chat: empty line or Ctrl-D to quit", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        history.append({"role": "user", "content": line.rstrip("\n")})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        reply = ""
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, sampling, tuple(args.stop)):
            print(piece, end="", flush=True)
            reply += piece
        print()
        history.append({"role": "assistant", "content": reply})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.generate", description=__doc__.splitlines()[0])
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--chat", action="store_true")
    source.add_argument("--prompts", type=Path)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--raw", action="store_true", help="do not apply the chat template")
    args = parser.parse_args(argv)
    try:
        apply_runtime_flags(args)
        sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
        records = _read_prompts(args.prompts) if args.prompts else None
        model, tokenizer = load_for_inference(model_source(args), args.adapter, quant_config(args), args.revision,
                                              args.compute_dtype)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.chat:
        _chat(model, tokenizer, args, sampling)
    elif args.prompt is not None:
        prompt = _format(tokenizer, {"prompt": args.prompt}, args.raw)
        for piece in stream(model, tokenizer, prompt, args.max_new_tokens, sampling, tuple(args.stop)):
            print(piece, end="", flush=True)
        print()
    else:
        prompts = [_format(tokenizer, r, args.raw) for r in records]
        replies = generate(model, tokenizer, prompts, args.max_new_tokens, sampling=sampling, stop=tuple(args.stop))
        for record, reply in zip(records, replies, strict=True):
            print(json.dumps({**record, "completion": reply}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
