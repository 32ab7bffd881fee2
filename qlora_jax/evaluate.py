"""``python -m qlora_jax.evaluate --model DIR [--adapter DIR] (--data FILE | --mmlu DIR)``: measure a model.

Perplexity:
- plain text (``--format text``, records ``{"text": ...}``): every token after the first,
  each long text scored in sliding windows of ``--max-len`` tokens moved by ``--stride``
  (each token is predicted once, with up to ``max_len - stride`` tokens of context
  carried over: transformers' perplexity recipe);
- chat / instruction data (``--format chat|alpaca|oasst|prompt_completion|chitchat``): the
  target tokens only, as training counts them.

MMLU-style multiple choice (``--mmlu DIR``): the standard CSV layout
(``DIR/dev/<subject>_dev.csv`` for the k-shot examples, ``DIR/test/<subject>_test.csv``;
rows ``question, A, B, C, D, answer``), prompts as the QLoRA repository builds them
("The following are multiple choice questions (with answers) about <subject>." then k
solved examples, then the question ending in ``Answer:``), scored by the logits of the
four answer letters' own tokens at the last position (``answer_letter_ids``).
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .cli import add_model_args, apply_runtime_flags, model_source, quant_config
from .config import DATA_FORMATS, DataConfig
from .data import IGNORE, DataError, load_dataset, read_records, string_field
from .loading import load_for_inference
from .loss import token_loss
from .model import LlamaForCausalLM
from .tokenizer import Tokenizer

_BUCKET = 64  # sequences are right-padded to a multiple of this: one compile per bucket
CHOICES = ("A", "B", "C", "D")


@nnx.jit
def _loss_sums(model: LlamaForCausalLM, ids: jax.Array, mask: jax.Array, labels: jax.Array):
    """``ids, labels: i32[1, T]`` -> (summed next-token loss over labels != IGNORE, count)."""
    hidden = model.hidden_states(ids, mask)[:, :-1]
    return token_loss(hidden, labels[:, 1:], model.unembedding(), 0)


@nnx.jit
def _last_logits(model: LlamaForCausalLM, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """f32 logits ``[V]`` after the last real token of ``ids: i32[1, T]`` (right-padded)."""
    logits = model(ids, mask)  # [1, T, V]
    return logits[0, jnp.sum(mask) - 1]


def _padded(ids: list[int] | np.ndarray, labels=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    length = -(-len(ids) // _BUCKET) * _BUCKET
    padded_ids = np.zeros((1, length), np.int32)
    mask = np.zeros((1, length), bool)
    padded_labels = np.full((1, length), IGNORE, np.int32)
    padded_ids[0, : len(ids)], mask[0, : len(ids)] = ids, True
    padded_labels[0, : len(ids)] = ids if labels is None else labels
    return jnp.asarray(padded_ids), jnp.asarray(mask), jnp.asarray(padded_labels)


def score_tokens(model: LlamaForCausalLM, ids: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """Summed loss and count of predicting ``labels[1:]`` (IGNORE: skipped) from ``ids`` (one sequence)."""
    padded_ids, mask, padded_labels = _padded(ids, labels)
    total, count = _loss_sums(model, padded_ids, mask, padded_labels)
    return float(total), int(count)


def text_scores(model: LlamaForCausalLM, ids: list[int], max_len: int, stride: int) -> tuple[float, int]:
    """Sliding-window loss of one long token sequence: each token after the first is predicted exactly once."""
    total, count, scored_until = 0.0, 0, 1  # the first token has no prediction
    begin = 0
    while scored_until < len(ids):
        end = min(begin + max_len, len(ids))
        window = np.asarray(ids[begin:end], np.int32)
        labels = window.copy()
        labels[: scored_until - begin] = IGNORE  # already scored in an earlier window
        window_total, window_count = score_tokens(model, window, labels)
        total, count, scored_until = total + window_total, count + window_count, end
        begin += stride
    return total, count


def perplexity(model: LlamaForCausalLM, tokenizer: Tokenizer, data: DataConfig, max_len: int,
               stride: int) -> dict:
    """Mean loss and perplexity over the records of ``data`` (see the module doc for what is scored)."""
    total, count, sequences = 0.0, 0, 0
    if data.format == "text":
        for where, record in read_records(data):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            ids = tokenizer.encode(string_field(record, "text", where))
            seq_total, seq_count = text_scores(model, ids, max_len, stride)
            total, count, sequences = total + seq_total, count + seq_count, sequences + 1
    else:
        dataset = load_dataset(data, tokenizer, seed=0)
        for example in dataset.eval + dataset.train:
            seq_total, seq_count = score_tokens(model, example.input_ids, example.labels)
            total, count, sequences = total + seq_total, count + seq_count, sequences + 1
    if count == 0:
        raise DataError(f"{data.path}: no tokens to score")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "sequences": sequences}


def _read_mmlu_csv(path: Path) -> list[tuple[str, list[str], str]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if len(row) != 6 or row[5].strip() not in CHOICES:
                raise DataError(f"{path}:{line}: expected question, A, B, C, D, answer (A-D); got {len(row)} fields")
            rows.append((row[0], row[1:5], row[5].strip()))
    return rows


def _format_question(question: str, options: list[str], answer: str | None) -> str:
    text = question + "".join(f"\n{letter}. {option}" for letter, option in zip(CHOICES, options, strict=True))
    return text + "\nAnswer:" + (f" {answer}\n\n" if answer is not None else "")


def mmlu_prompt(subject: str, shots: list[tuple[str, list[str], str]], question: str, options: list[str]) -> str:
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(_format_question(q, o, a) for q, o, a in shots) + _format_question(question, options, None)


def answer_letter_ids(tokenizer: Tokenizer) -> list[int]:
    """The token of each answer letter as it follows ``Answer:`` in the few-shot prompts.

    That is the letter's own token, as the QLoRA repository scores it: ``▁A`` in SentencePiece
    LLaMA (where the first token of ``encode(" A")`` is a bare ``▁`` for all four letters),
    ``ĠA`` in GPT-2-style BPE. ``ValueError`` unless the four are single, distinct tokens.
    """
    prefix = tokenizer.encode("Answer:", add_special_tokens=False)
    ids = []
    for letter in CHOICES:
        full = tokenizer.encode(f"Answer: {letter}", add_special_tokens=False)
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            raise ValueError(f"this tokenizer does not write answer letter {letter!r} after 'Answer:' as one token "
                             f"({full[len(prefix):]}); MMLU scoring needs one token per letter")
        ids.append(full[-1])
    if len(set(ids)) != len(CHOICES):
        raise ValueError(f"the answer letters A-D share tokens {ids}; MMLU scoring needs four distinct tokens")
    return ids


def mmlu(model: LlamaForCausalLM, tokenizer: Tokenizer, directory: Path, k: int) -> dict:
    """Per-subject and mean accuracy over ``directory/test/*_test.csv`` with k-shot prompts from ``dev/``."""
    tests = sorted((directory / "test").glob("*_test.csv"))
    if not tests:
        raise FileNotFoundError(f"{directory}/test has no <subject>_test.csv files (MMLU's CSV layout)")
    choice_ids = answer_letter_ids(tokenizer)
    subjects = {}
    for test_file in tests:
        subject = test_file.name[: -len("_test.csv")]
        dev_file = directory / "dev" / f"{subject}_dev.csv"
        shots = _read_mmlu_csv(dev_file)[:k] if k else []
        if len(shots) < k:
            raise DataError(f"{dev_file}: {len(shots)} examples, fewer than k={k}")
        correct = 0
        questions = _read_mmlu_csv(test_file)
        for question, options, answer in questions:
            ids = tokenizer.encode(mmlu_prompt(subject, shots, question, options))
            padded_ids, mask, _ = _padded(ids)
            logits = np.asarray(_last_logits(model, padded_ids, mask))
            correct += CHOICES[int(np.argmax(logits[choice_ids]))] == answer
        subjects[subject] = {"accuracy": correct / len(questions), "questions": len(questions)}
    return {"subjects": subjects, "mean_accuracy": float(np.mean([s["accuracy"] for s in subjects.values()])),
            "k": k}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qlora_jax.evaluate", description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--data", type=Path, help="JSON / JSON Lines records for perplexity")
    parser.add_argument("--format", default="text", choices=DATA_FORMATS)
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per window / example")
    parser.add_argument("--stride", type=int, help="sliding-window step for plain text (default: half of --max-len)")
    parser.add_argument("--mmlu", type=Path, help="directory in MMLU's CSV layout (dev/, test/)")
    parser.add_argument("--k", type=int, default=5, help="MMLU shots")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        apply_runtime_flags(args)
        if (args.data is None) == (args.mmlu is None):
            raise ValueError("give exactly one of --data FILE and --mmlu DIR")
        args.stride = args.stride or args.max_len // 2
        if not 0 < args.stride <= args.max_len:
            raise ValueError(f"--stride={args.stride} must be in [1, --max-len={args.max_len}]")
        source = model_source(args)
        model, tokenizer = load_for_inference(source, args.adapter, quant_config(args), args.revision,
                                              args.compute_dtype)
        if args.mmlu:
            result = mmlu(model, tokenizer, args.mmlu, args.k)
        else:
            data = DataConfig(format=args.format, path=str(args.data), max_len=args.max_len, eval_size=0)
            result = perplexity(model, tokenizer, data, args.max_len, args.stride)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"model": source, "adapter": str(args.adapter) if args.adapter else None,
              "quant": args.quant, **result}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
