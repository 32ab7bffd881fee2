"""Training data: read records, render prompts, tokenize with loss masks, and batch.

Formats (``data.format``):
- ``chitchat``: the bundled Chit-Chat conversations; the first speaker is the user,
  the second the assistant; rendered with the model's chat template.
- ``alpaca``: ``{"instruction", "input"?, "output"}`` with the Alpaca prompt (QLoRA's).
- ``oasst``: ``{"text": "### Human: ... ### Assistant: ..."}`` (Guanaco); the whole text is the target.
- ``chat``: ``{"messages": [{"role", "content"}, ...]}`` with the chat template.
- ``prompt_completion``: ``{"prompt", "completion"}``.
- ``text``: ``{"text"}``: plain language modelling on every token.
Files are JSON (a list) or JSON Lines. Labels are -100 where no loss is taken.
"""

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import assets
from .config import DataConfig
from .tokenizer import Tokenizer

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response: ")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: ")


class DataError(ValueError):
    """A malformed dataset; the message names the file and line."""


@dataclass
class Example:
    """One tokenized example: ``input_ids`` and ``labels`` (``i32[T]``, IGNORE where no loss)."""

    input_ids: np.ndarray
    labels: np.ndarray
    truncated: bool = False
    messages: list[dict] | None = None
    """The conversation a chat example was rendered from (to score it otherwise, ``Encoder.content``)."""


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    skipped: int = 0
    """Malformed records skipped (data.skip_malformed)."""
    truncated: int = 0
    """Examples cut to the length limits."""
    dropped: int = 0
    """Examples with no target token left within the limits."""


def _read_json_records(path: Path) -> list[tuple[int, object]]:
    """(line number, record) pairs of a JSON list or a JSON Lines file."""
    if path.is_dir():
        raise DataError(f"data.path {path} is a directory; data.source: file reads a .json or .jsonl file "
                        "(a datasets save_to_disk directory needs data.source: hf_disk)")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        return [(0, r) for r in records]
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: invalid JSON on line {number}, column {err.colno}: {err.msg}") from None
    return out


def _read_hf_disk(directory: Path) -> list[tuple[str, object]]:
    """Rows of a Hugging Face ``datasets`` directory written by ``save_to_disk``, read by ``datasets.load_from_disk``
    (a ``DatasetDict`` gives its ``train`` split)."""
    try:
        import datasets
    except ImportError:
        raise DataError("data.source=hf_disk needs the datasets library: pip install -e '.[hf]'") from None
    if not directory.is_dir():
        raise FileNotFoundError(f"data.path {directory} does not exist (data.source=hf_disk reads a "
                                "datasets.save_to_disk directory)")
    try:
        dataset = datasets.load_from_disk(str(directory))
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a datasets.save_to_disk directory (neither a Dataset nor a "
                                "DatasetDict)") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(f"{directory} is a DatasetDict with splits {sorted(dataset)}; qlora_jax trains on its "
                            "'train' split (save that split alone, or name one 'train')")
        directory, dataset = directory / "train", dataset["train"]
    return [(f"{directory}[{i}]", row) for i, row in enumerate(dataset)]


def read_records(config: DataConfig) -> list[tuple[str, object]]:
    """(where, record) pairs from the configured file, datasets directory, or TFDS preparation."""
    path = Path(config.path)
    if config.source == "hf_disk":
        return _read_hf_disk(path)
    records = [(f"{path}:{line}" if line else f"{path}[{i}]", r)
               for i, (line, r) in enumerate(_read_json_records(path))]
    if config.source == "tfds":
        try:
            from .tfds_records import prepared_records
        except ImportError as err:
            raise DataError(f"data.source=tfds needs tensorflow-datasets: pip install -e '.[tfds]' ({err})") from None
        return prepared_records(path, records, assets.cache_dir() / "tfds")
    return records


def string_field(record: dict, name: str, where: str, required: bool = True) -> str:
    value = record.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{where}: field {name!r} is empty")
    return value


def _messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: messages[{i}] needs role system, user or assistant")
        string_field(message, "content", f"{where}: messages[{i}]")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    return messages


def chitchat_messages() -> list[list[dict]]:
    """Chit-Chat conversations as chat messages (first speaker user, second assistant)."""
    conversations = []
    for turns in assets.chitchat_conversations():
        if len(turns) < 2:
            continue
        first = turns[0]["speaker"]
        messages = [{"role": "user" if t["speaker"] == first else "assistant", "content": t["text"]}
                    for t in turns if t["text"].strip()]
        if any(m["role"] == "assistant" for m in messages):
            conversations.append(messages)
    return conversations


_WHITESPACE = re.compile(r"\s*")


def _message_spans(text: str, messages: list[dict]) -> list[tuple[str, int, int]]:
    """``(role, start, end)``: where each message's content lies in the rendered ``text``, found verbatim in
    order, or without its outer whitespace when the template trims it (LLaMA-2's, LLaMA-3's)."""
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        start = text.find(content, cursor)
        if start < 0:
            content = content.strip()
            start = text.find(content, cursor)
        if start < 0:
            raise DataError("the chat template changes message contents; cannot locate replies to train on")
        cursor = start + len(content)
        spans.append((message["role"], start, cursor))
    return spans


class Encoder:
    """Turns records into ``Example``s with the truncation and loss masking of the config."""

    def __init__(self, tokenizer: Tokenizer, config: DataConfig):
        self.tokenizer, self.config = tokenizer, config

    def source_target(self, source: str, target: str) -> Example:
        """QLoRA's collator: ``bos + source`` cut to source_max_len, ``target + eos`` cut to target_max_len."""
        t = self.tokenizer
        source_ids = t.encode((t.bos_token or "") + source, add_special_tokens=False) if source or t.bos_token else []
        target_ids = t.encode(target + (t.eos_token or ""), add_special_tokens=False)
        truncated = len(source_ids) > self.config.source_max_len or len(target_ids) > self.config.target_max_len
        source_ids = source_ids[: self.config.source_max_len]
        target_ids = target_ids[: self.config.target_max_len]
        ids = np.asarray(source_ids + target_ids, np.int32)
        source_labels = source_ids if self.config.train_on_source else [IGNORE] * len(source_ids)
        return Example(ids, np.asarray(source_labels + target_ids, np.int32), truncated)

    def chat(self, messages: list[dict]) -> Example:
        """Render with the chat template; loss on assistant replies and their end-of-turn marker only.

        The conversation is rendered and tokenized once; a token is trained when its
        characters lie inside an assistant reply (located verbatim in the rendered
        text, or without its outer whitespace when the template trims it) or the
        end-of-turn text the template puts after replies.
        """
        return self._within_budget(messages, self._chat)

    def content(self, messages: list[dict]) -> Example:
        """The tokens ``chat`` gives, with labels on the tokens of every message's content (any role) and
        nothing else: not the template's markup, not a system prompt the template adds by itself. The
        measure of ``scripts/reproduce_paper.py``'s data-type table."""
        return self._within_budget(messages, self._content)

    def _within_budget(self, messages: list[dict], encode) -> Example:
        """``encode`` of the messages that can reach ``max_len`` tokens (rendering the rest is wasted work)."""
        budget, kept = 16 * self.config.max_len, len(messages)  # characters: far beyond max_len tokens
        for k in range(len(messages)):
            budget -= len(messages[k]["content"])
            if budget < 0:
                kept = k + 1
                break
        example = encode(messages[:kept])
        if kept < len(messages) and len(example.input_ids) < self.config.max_len:
            example = encode(messages)  # the cut was too early (very long tokens): render everything
        example.messages = messages
        return example

    def _chat(self, messages: list[dict]) -> Example:
        text = self.tokenizer.apply_chat_template(messages)
        spans = [(start, self._reply_end(text, end))
                 for role, start, end in _message_spans(text, messages) if role == "assistant"]
        ids, train = self._tokens_inside(text, spans)
        if self.config.train_on_source:
            train[:] = True
        labels = np.where(train, ids, IGNORE).astype(np.int32)
        return Example(ids[: self.config.max_len], labels[: self.config.max_len], len(ids) > self.config.max_len)

    def _content(self, messages: list[dict]) -> Example:
        text = self.tokenizer.apply_chat_template(messages)
        ids, scored = self._tokens_inside(text, [(start, end) for _, start, end in _message_spans(text, messages)])
        labels = np.where(scored, ids, IGNORE).astype(np.int32)
        return Example(ids[: self.config.max_len], labels[: self.config.max_len], len(ids) > self.config.max_len)

    def _reply_end(self, text: str, end: int) -> int:
        """Where a reply's trained span ends: after the end-of-turn marker that follows it, if one does."""
        after = _WHITESPACE.match(text, end).end()  # LLaMA-2 writes " </s>" after a reply
        eot = self._end_of_turn and text.startswith(self._end_of_turn, after)
        return after + len(self._end_of_turn) if eot else end

    def _tokens_inside(self, text: str, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """``text``'s ids ``i32[T]`` and which tokens lie inside one of the character ``spans`` (``bool[T]``)."""
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        # a token's span without its leading whitespace (SentencePiece "▁Hi", GPT-2 "ĠHi" cover the space before)
        begins = np.asarray([b + (len(text[b:e]) - len(text[b:e].lstrip()) if text[b:e].strip() else 0)
                             for b, e in offsets], np.int64)
        inside = np.zeros(len(ids), bool)
        for start, end in spans:
            inside |= (begins >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
        return np.asarray(ids, np.int32), inside

    @functools.cached_property
    def _end_of_turn(self) -> str:
        """What the template writes right after an assistant reply, up to whitespace (e.g. ``<|im_end|>``)."""
        probe = [{"role": "user", "content": "\x00user\x00"}, {"role": "assistant", "content": "\x00reply\x00"}]
        text = self.tokenizer.apply_chat_template(probe)
        after = text[text.index("\x00reply\x00") + len("\x00reply\x00"):]
        return after.strip().split()[0] if after.strip() else ""

    def text(self, text: str) -> Example:
        t = self.tokenizer
        ids = t.encode(text, add_special_tokens=True)
        if t.eos_id is not None:
            ids = [*ids, t.eos_id]
        truncated = len(ids) > self.config.max_len
        ids = np.asarray(ids[: self.config.max_len], np.int32)
        return Example(ids, ids.copy(), truncated)

    def record(self, record: object, where: str) -> Example:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        fmt = self.config.format
        if fmt == "alpaca":
            instruction = string_field(record, "instruction", where)
            extra = string_field(record, "input", where, required=False)
            prompt = (ALPACA_PROMPT if extra.strip() else ALPACA_PROMPT_NO_INPUT).format(instruction=instruction,
                                                                                         input=extra)
            return self.source_target(prompt, string_field(record, "output", where))
        if fmt == "oasst":
            return self.source_target("", string_field(record, "text", where))
        if fmt == "prompt_completion":
            return self.source_target(string_field(record, "prompt", where),
                                      string_field(record, "completion", where))
        if fmt == "chat":
            return self.chat(_messages(record, where))
        return self.text(string_field(record, "text", where))


def load_dataset(config: DataConfig, tokenizer: Tokenizer, seed: int) -> Dataset:
    """Read, validate, tokenize and split the configured data (seeded, deterministic)."""
    encoder = Encoder(tokenizer, config)
    examples: list[Example] = []
    skipped = dropped = 0
    if config.format == "chitchat":
        records = [(i, {"messages": m}) for i, m in enumerate(chitchat_messages())]
        source = str(assets.chitchat_json())
        encode = encoder.chat
        items = [(f"{source} conversation {i}", r["messages"]) for i, r in records]
    else:
        items = read_records(config)
        encode = None
    if config.max_examples is not None:
        items = items[: config.max_examples]
    for where, record in items:
        try:
            example = encode(record) if encode else encoder.record(record, where)
        except DataError:
            if not config.skip_malformed:
                raise
            skipped += 1
            continue
        if not (example.labels != IGNORE).any():  # nothing to learn once truncated: dropped, and counted
            dropped += 1
            continue
        examples.append(example)
    if len(examples) <= config.eval_size:
        raise DataError(f"{config.path or 'chitchat'}: {len(examples)} usable examples ({skipped} malformed "
                        f"skipped, {dropped} with no target tokens within data.max_len={config.max_len} / "
                        f"target_max_len={config.target_max_len}), need more than data.eval_size={config.eval_size}")
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    return Dataset(train=shuffled[config.eval_size:], eval=shuffled[: config.eval_size], skipped=skipped,
                   truncated=sum(e.truncated for e in examples), dropped=dropped)


def bucket_length(length: int, limit: int, bucket: int) -> int:
    """``length`` rounded up to a multiple of ``bucket`` (at most ``limit`` rounded likewise)."""
    cap = -(-limit // bucket) * bucket
    return min(cap, max(bucket, -(-length // bucket) * bucket))


def collate(examples: list[Example], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded ``input_ids``, ``labels`` (IGNORE on padding) and ``attention_mask``: ``[B, length]``."""
    batch = len(examples)
    ids = np.full((batch, length), pad_id, np.int32)
    labels = np.full((batch, length), IGNORE, np.int32)
    mask = np.zeros((batch, length), bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = example.input_ids, example.labels, True
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class BatchIterator:
    """Endless, deterministic batches of ``grad_accum`` micro-batches: arrays ``[A, B, T]``.

    Each epoch visits the examples in a seeded order; with ``group_by_length``, chunks
    of 50 batches are sorted by length (as transformers' LengthGroupedSampler) so
    batches hold similar lengths. ``state()`` is the position (epoch, batch index),
    saved in checkpoints so a resumed run sees exactly the same batches.
    """

    MEGABATCH = 50

    def __init__(self, examples: list[Example], batch_size: int, grad_accum: int, seed: int, group_by_length: bool,
                 pad_id: int, max_length: int, bucket: int):
        if len(examples) < batch_size * grad_accum:
            raise DataError(f"{len(examples)} training examples cannot fill one step of "
                            f"batch_size={batch_size} x grad_accum={grad_accum}")
        self.examples, self.batch_size, self.grad_accum = examples, batch_size, grad_accum
        self.seed, self.group_by_length, self.pad_id, self.max_length = seed, group_by_length, pad_id, max_length
        self.bucket = bucket
        self.epoch, self.index = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        if self.group_by_length:
            size = self.MEGABATCH * self.batch_size
            chunks = [order[i:i + size] for i in range(0, len(order), size)]
            order = np.concatenate([sorted(c, key=lambda i: -len(self.examples[i].input_ids)) for c in chunks])
        usable = len(order) - len(order) % self.batch_size
        return [list(order[i:i + self.batch_size]) for i in range(0, usable, self.batch_size)]

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._batches = self._epoch_batches(self.epoch)

    def _next_micro(self) -> list[Example]:
        if self.index >= len(self._batches):
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = [self.examples[i] for i in self._batches[self.index]]
        self.index += 1
        return batch

    def __next__(self) -> dict[str, np.ndarray]:
        micro = [self._next_micro() for _ in range(self.grad_accum)]
        longest = max(len(e.input_ids) for batch in micro for e in batch)
        length = bucket_length(longest, self.max_length, self.bucket)
        parts = [collate(batch, length, self.pad_id) for batch in micro]
        return {key: np.stack([p[key] for p in parts]) for key in parts[0]}

    def __iter__(self):
        return self


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, max_length: int, bucket: int,
                 limit: int):
    """Fixed held-out micro-batches ``[1, B, T]`` (the last may be smaller), at most ``limit``."""
    for start in range(0, min(len(examples), batch_size * limit), batch_size):
        chunk = examples[start:start + batch_size]
        length = bucket_length(max(len(e.input_ids) for e in chunk), max_length, bucket)
        yield {k: v[None] for k, v in collate(chunk, length, pad_id).items()}
