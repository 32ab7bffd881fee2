"""Tokenizers of a Hugging Face model directory: ``tokenizer.json`` (HF ``tokenizers``) or
``tokenizer.model`` (SentencePiece), with BOS/EOS/pad and the chat template from
``tokenizer_config.json``.

Chat templates are Jinja, rendered in a sandbox the way transformers renders them
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``tojson``).
"""

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
import numpy as np

from .jsonio import read_json_object


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return read_json_object(path) if path.is_file() else {}


def _chat_template(directory: Path, config: dict) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


class Tokenizer:
    """Text <-> token ids, special token ids, and chat formatting for one model."""

    def __init__(self, directory: Path):
        config = _read_json(directory / "tokenizer_config.json")
        special = _read_json(directory / "special_tokens_map.json")
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as err:  # tokenizers raises a bare Exception for malformed files
                raise ValueError(f"{directory / 'tokenizer.json'}: cannot be read by tokenizers ({err})") from None
            self._sp = None
        elif (directory / "tokenizer.model").is_file():
            import sentencepiece

            self._sp = sentencepiece.SentencePieceProcessor()
            if not self._sp.Load(str(directory / "tokenizer.model")):
                raise ValueError(f"{directory / 'tokenizer.model'}: not a SentencePiece model")
            self._hf = None
        else:
            raise FileNotFoundError(f"{directory} has no tokenizer.json or tokenizer.model")

        def special_token(name):
            return _token_text(config.get(name)) or _token_text(special.get(name))

        self.bos_token, self.eos_token = special_token("bos_token"), special_token("eos_token")
        self.pad_token = special_token("pad_token")
        self.bos_id = self.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.token_to_id(self.eos_token) if self.eos_token else None
        pad_id = self.token_to_id(self.pad_token) if self.pad_token else None
        self.pad_id = pad_id if pad_id is not None else self.eos_id
        # tokenizer.json carries its own post-processor; SentencePiece models follow the config flags.
        self.add_bos = bool(config.get("add_bos_token", self._sp is not None))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.chat_template = _chat_template(directory, config)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size() if self._hf is not None else self._sp.GetPieceSize()

    def token_to_id(self, token: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(token)
        token_id = self._sp.PieceToId(token)
        return None if token_id == self._sp.unk_id() and token != self._sp.IdToPiece(token_id) else token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS as the tokenizer defines."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.EncodeAsIds(text)
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids = [*ids, self.eos_id]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of ``text`` (no special tokens added) and their character spans ``i64[N, 2]``."""
        if self._hf is not None:
            encoding = self._hf.encode(text, add_special_tokens=False)
            return encoding.ids, np.asarray(encoding.offsets, np.int64).reshape(-1, 2)
        proto = self._sp.EncodeAsImmutableProto(text)
        spans = [(piece.begin, piece.end) for piece in proto.pieces]
        return [piece.id for piece in proto.pieces], np.asarray(spans, np.int64).reshape(-1, 2)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._hf is not None:
            return self._hf.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._sp.DecodeIds([int(i) for i in ids])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render ``[{"role": ..., "content": ...}, ...]`` with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
            eos_token=self.eos_token or "")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a local Hugging Face model directory."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    return Tokenizer(directory)
